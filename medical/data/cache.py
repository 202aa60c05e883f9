"""A site's preprocessed-image cache: the second job at a site does not decode its images again.

Decoding is most of a site's start-up on real data (JPEG 2000 and JPEG-LS chest X-rays take tens of
milliseconds each). :func:`medsilo.medical.data.load_site_data` with ``cache=DIR`` keeps every image it read
and preprocessed, and serves it again when nothing it depends on has changed:

* **One file per dataset and reading setting**: ``DIR/<digest>.npz``, the digest taken over the manifest's
  path, the modality, image size, channel count, whether identifying DICOMs are allowed (an image accepted
  under one policy is never served under a stricter one), the cache format, medsilo's version, the source of
  the modules that read, check and resize images (``readers``, ``deid``, ``transforms``) and the versions of
  the libraries under them. A tightened check or another decoder reads everything again.
* **Per image**: served only while the file's path, size, modification and status-change times (ns), inode
  and device are those it had when it was read. Copying another image over it, even with ``cp -p`` or
  ``rsync -t`` (which keep the modification time), changes the status-change time, which no user call can
  set back. A file that changed while it was being read is not cached. Unreadable files are never cached (a
  codec installed later gets its chance).
* **Format**: an uncompressed ``.npz`` (each image float32 exactly as the reader and resize produced it, plus
  the index as a JSON string), loaded with ``allow_pickle=False`` — nothing in it is executed.
* **Atomic, bounded, best effort**: written to a temporary file and renamed into place (a reader sees the old
  file or the new one); the least recently used files beyond :data:`MAX_BYTES` are removed, and temporary
  files a killed process left are swept. A cache that cannot be read or written (full disk, read-only folder)
  is a warning, never a failed job.

The cache holds preprocessed patient images: it lives inside the site's workspace (deployed:
``<workspace>/cache/images``; simulation: ``cache/<site>`` beside ``sites.yml``), folder 0700, files 0600,
with a ``.gitignore`` of ``*``, and never leaves the site. Whoever can write there can also change the images.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

import medsilo

log = logging.getLogger(__name__)

CACHE_FORMAT = 2
"""Bumped whenever the file layout changes."""

MAX_BYTES = 4 * 2**30
"""Most bytes a cache folder keeps; least recently used files beyond it are removed."""

_SOURCES = ("readers.py", "deid.py", "transforms.py")
_LIBRARIES = ("pydicom", "pylibjpeg", "pylibjpeg-libjpeg", "pylibjpeg-openjpeg", "pylibjpeg-rle", "monai", "pillow",
              "numpy", "torch")  # fmt: skip
_STALE_TMP_SECONDS = 3600


def code_identity() -> str:
    """Digest of what turns a file into preprocessed pixels: this package's readers/checks/resize and libraries."""
    h = hashlib.sha256()
    here = Path(__file__).resolve().parent
    for name in _SOURCES:
        h.update(name.encode() + b"\0" + (here / name).read_bytes())
    for lib in _LIBRARIES:
        try:
            h.update(f"{lib}={importlib.metadata.version(lib)}".encode())
        except importlib.metadata.PackageNotFoundError:
            h.update(f"{lib}=none".encode())
    return h.hexdigest()


def stamp(path: Path) -> list[int] | None:
    """What must be unchanged for a cached image to be served: size, mtime, ctime (ns), inode, device."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


class ImageCache:
    """The cache file of one dataset and reading setting (module docstring).

    Args:
        folder: the cache folder (created on :meth:`save`).
        settings: what the preprocessed pixels depend on besides the file and the code (JSON-plain).
    """

    def __init__(self, folder: Path, settings: dict[str, Any]):
        key = json.dumps({"format": CACHE_FORMAT, "medsilo": medsilo.__version__, "code": code_identity(), **settings},
                         sort_keys=True)  # fmt: skip
        self.folder = Path(folder)
        self.file = self.folder / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.npz"
        self._index: dict[str, dict[str, Any]] = {}
        self._arrays: dict[str, np.ndarray] = {}
        self._npz = None
        self.hits = self.added = 0
        if self.file.is_file():
            try:
                self._npz = np.load(self.file, allow_pickle=False)
                self._index = json.loads(str(self._npz["index"]))
            except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:  # only a cache: start over
                log.warning("%s: unreadable image cache, reading every image again (%s)", self.file, exc)
                self._npz, self._index = None, {}

    def get(self, path: Path) -> tuple[np.ndarray, str | None] | None:
        """The cached ``(image, view)`` of ``path`` if the file is unchanged, else ``None``."""
        entry = self._index.get(str(path))
        if entry is None or self._npz is None or stamp(path) != entry["stamp"]:
            return None
        try:
            image = self._npz[entry["member"]]
        except (KeyError, ValueError, OSError, zipfile.BadZipFile):
            return None
        self.hits += 1
        self._arrays[str(path)] = image
        return image, entry.get("view")

    def put(self, path: Path, before: list[int] | None, image: np.ndarray, view: str | None) -> None:
        """Remember a freshly read image, if its file is as it was before the read (``before`` = :func:`stamp`)."""
        if before is None or stamp(path) != before:
            return
        self._index[str(path)] = {"stamp": before, "view": view}
        self._arrays[str(path)] = np.ascontiguousarray(image, dtype=np.float32)
        self.added += 1

    def save(self) -> None:
        """Write what this load used (rows no longer listed are dropped), atomically; then bound the folder."""
        try:
            if self.added or len(self._arrays) != len(self._index):
                self._write()
            elif self.file.is_file():
                os.utime(self.file)  # used: the most recent for eviction
            self._bound()
        except OSError as exc:
            log.warning("%s: could not update the image cache (%s); the job goes on without it", self.folder, exc)
        finally:
            if self._npz is not None:
                self._npz.close()
                self._npz = None

    def _write(self) -> None:
        keep = {p: e for p, e in self._index.items() if p in self._arrays}
        members = {}
        for i, (path, entry) in enumerate(sorted(keep.items())):
            entry["member"] = f"i{i}"
            members[f"i{i}"] = self._arrays[path]
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        ignore = self.folder / ".gitignore"
        if not ignore.exists():
            ignore.write_text("# preprocessed patient images: never commit\n*\n")
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".tmp-", suffix=".npz")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, index=np.array(json.dumps(keep)), **members)
            os.replace(tmp, self.file)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _bound(self) -> None:
        """Sweep stale temporary files; remove least recently used cache files beyond :data:`MAX_BYTES`."""
        now = time.time()
        for tmp in self.folder.glob(".tmp-*.npz"):
            if now - tmp.stat().st_mtime > _STALE_TMP_SECONDS:
                tmp.unlink(missing_ok=True)
        files = sorted(self.folder.glob("*.npz"), key=lambda p: p.stat().st_mtime, reverse=True)
        total = 0
        for f in files:
            total += f.stat().st_size
            if total > MAX_BYTES and f != self.file:
                f.unlink(missing_ok=True)
