"""Atomic writes of key, context and certificate files (one helper for every secure module)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from medsilo.errors import MedsiloError


def write_atomic(path: str | os.PathLike, data: bytes, mode: int, what: str = "file",
                 error: type[MedsiloError] = MedsiloError) -> Path:  # fmt: skip
    """Write ``data`` to ``path`` via a temporary file in the same folder and a rename, with ``mode``.

    Readers never see a half-written key or context file, and a secret file is never readable by others,
    not even for a moment (the mode is set before any byte is written).

    Args:
        path: the file to write (its folder must exist).
        data: the bytes.
        mode: permission bits, e.g. ``0o600`` for a private key.
        what: what the file is, for messages ("private key", "CKKS context" …).
        error: the :class:`~medsilo.errors.MedsiloError` subclass raised on failure.

    Raises:
        error: naming ``path``: a missing folder or a failed write (the temporary file is removed).
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise error(f"{path}: folder {path.parent} does not exist")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise error(f"{path}: cannot write {what} ({e.strerror or e})") from e
    return path
