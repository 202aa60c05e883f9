"""A site's preprocessed-image cache: the second job at a site does not decode its images again.

Decoding is most of a site's start-up on real data (JPEG 2000 and JPEG-LS chest X-rays take tens of
milliseconds each). :func:`medsilo.medical.data.load_site_data` with ``cache=DIR`` keeps every image it read
and preprocessed, and serves it again when nothing it depends on has changed:

* **One file per reading setting**: ``DIR/<digest>.npz``, the digest taken over the cache format, medsilo's
  version, the modality, image size, channel choice and whether identifying DICOMs are allowed (an image
  accepted under one policy is never served under a stricter one). Another job with other settings gets its
  own file.
* **Per image**: served only when the file's path, size and modification time (ns) are those it had when it
  was cached — the rule ``make`` and pip's caches use. Replacing a file, editing it or touching it reads it
  again; a row not in the cache is read and added. Unreadable files are never cached: a codec installed later
  gets its chance.
* **Format**: an uncompressed ``.npz`` (each image float32 exactly as the reader and resize produced it,
  plus the index as a JSON string), loaded with ``allow_pickle=False`` — nothing in it is executed.
* **Atomic**: written to a temporary file beside it and renamed into place, so a reader sees the old file or
  the new one, never half of one; two jobs at once simply both write a complete file.

The cache holds preprocessed patient images: it lives inside the site's workspace (deployed:
``<workspace>/cache/images``; simulation: ``cache/<site>`` beside ``sites.yml``) and never leaves it. Whoever
can write there can also change the images themselves.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

import medsilo

CACHE_FORMAT = 1
"""Bumped whenever a reader or the resize changes what an image becomes."""


class ImageCache:
    """The cache file of one reading setting (module docstring).

    Args:
        folder: the cache folder (created on :meth:`save`).
        settings: what the preprocessed pixels depend on besides the file (JSON-plain).
    """

    def __init__(self, folder: Path, settings: dict[str, Any]):
        key = json.dumps({"format": CACHE_FORMAT, "medsilo": medsilo.__version__, **settings}, sort_keys=True)
        self.file = Path(folder) / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.npz"
        self._index: dict[str, dict[str, Any]] = {}
        self._arrays: dict[str, np.ndarray] = {}
        self._npz = None
        self.hits = self.misses = 0
        if self.file.is_file():
            try:
                self._npz = np.load(self.file, allow_pickle=False)
                self._index = json.loads(str(self._npz["index"]))
            except (OSError, ValueError, KeyError, zipfile.BadZipFile):  # unreadable or foreign: start over
                self._npz, self._index = None, {}

    @staticmethod
    def _stamp(path: Path) -> tuple[int, int] | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        return st.st_size, st.st_mtime_ns

    def get(self, path: Path) -> tuple[np.ndarray, str | None] | None:
        """The cached ``(image, view)`` of ``path`` if the file is unchanged, else ``None``."""
        entry = self._index.get(str(path))
        if entry is None or self._npz is None or self._stamp(path) != (entry["size"], entry["mtime_ns"]):
            self.misses += 1
            return None
        try:
            image = self._npz[entry["member"]]
        except (KeyError, ValueError, OSError, zipfile.BadZipFile):
            self.misses += 1
            return None
        self.hits += 1
        self._arrays[str(path)] = image
        return image, entry.get("view")

    def put(self, path: Path, image: np.ndarray, view: str | None) -> None:
        """Remember a freshly read image (stamped with its file's size and time now)."""
        stamp = self._stamp(path)
        if stamp is None:
            return
        self._index[str(path)] = {"size": stamp[0], "mtime_ns": stamp[1], "view": view}
        self._arrays[str(path)] = np.ascontiguousarray(image, dtype=np.float32)

    def save(self) -> None:
        """Write what this load used (hits and new reads; rows no longer listed are dropped), atomically."""
        if self.misses == 0 and len(self._arrays) == len(self._index):
            return  # every image came from the file as it is
        keep = {p: e for p, e in self._index.items() if p in self._arrays}
        members = {}
        for i, (path, entry) in enumerate(sorted(keep.items())):
            entry["member"] = f"i{i}"
            members[f"i{i}"] = self._arrays[path]
        self.file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.file.parent, prefix=".tmp-", suffix=".npz")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, index=np.array(json.dumps(keep)), **members)
            os.replace(tmp, self.file)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        if self._npz is not None:
            self._npz.close()
            self._npz = None
