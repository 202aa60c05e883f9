"""Files written whole or not at all: one helper for every layer (a leaf, like :mod:`medsilo.errors`).

A reader — another process, a crashed run's resume, an auditor — never sees half a file: bytes go to a
temporary file in the same folder, are flushed to disk, and the file is renamed into place.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from medsilo.errors import MedsiloError


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", *, perms: int | None = None, **kwargs: Any) -> Iterator[IO]:
    """Open a temporary sibling of ``path`` for writing; on success it replaces ``path``, on error it is removed.

    Args:
        path: the file to write (its folder must exist).
        mode: ``"w"`` (text) or ``"wb"``.
        perms: permission bits set before anything is written (e.g. ``0o600`` for a secret); default
            ``0o644`` (the usual mode of new files; the process umask is not read: changing it to read it
            would race with other threads creating files).
        **kwargs: passed to :func:`open` (``encoding``, ``newline``).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644 if perms is None else perms)
        with os.fdopen(fd, mode, **kwargs) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomic(path: str | os.PathLike, data: bytes | str, mode: int | None = None, what: str = "file",
                 error: type[MedsiloError] = MedsiloError) -> Path:  # fmt: skip
    """Write ``data`` (bytes, or text as UTF-8) to ``path`` whole, with permission bits ``mode``.

    Raises:
        error: naming ``path``: a missing folder or a failed write (nothing is left behind).
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise error(f"{path}: folder {path.parent} does not exist")
    try:
        with atomic_open(path, "wb", perms=mode) as fh:
            fh.write(data.encode("utf-8") if isinstance(data, str) else data)
    except OSError as e:
        raise error(f"{path}: cannot write {what} ({e.strerror or e})") from e
    return path
