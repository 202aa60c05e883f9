"""Atomic files (medsilo.fs): a reader sees the old file or the whole new one, never a part."""

from __future__ import annotations

import pytest


def test_an_atomic_write_leaves_the_old_file_or_the_new_one(tmp_path):
    from medsilo.fs import atomic_open, write_atomic

    target = tmp_path / "results.json"
    write_atomic(target, "old")
    with pytest.raises(RuntimeError), atomic_open(target, "w") as fh:
        fh.write("half of the new")
        raise RuntimeError("the writer died")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["results.json"]
    write_atomic(target, b"secret", 0o600)
    assert target.read_bytes() == b"secret" and target.stat().st_mode & 0o777 == 0o600
