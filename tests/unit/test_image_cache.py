"""The preprocessed-image cache: a second load decodes nothing, gives the same tensors, and re-reads exactly
the files that changed (also when their modification time was put back); another reading setting or changed
reader code never gets these pixels; a broken or unwritable cache is only a miss, never a failed job."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from medsilo.config import read_manifest
from medsilo.medical.data import load_site_data
from medsilo.medical.data.readers import LoadCXR
from medsilo.medical.synth import SynthRequest, synthesize


@pytest.fixture
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "h"
    synthesize(out, SynthRequest("cxr", sites=1, images_per_site=24, seed=3), workers=1, progress=False)
    return out / "hospital-1"


@pytest.fixture
def reads(monkeypatch):
    """Counts the files the CXR reader decodes."""
    seen: list[str] = []
    real = LoadCXR.read

    def counting(self, path):
        seen.append(str(path))
        return real(self, path)

    monkeypatch.setattr(LoadCXR, "read", counting)
    return seen


def _load(site, cache, **kw):
    manifest = read_manifest(site / "manifest.csv", ["normal", "pneumonia"])
    return load_site_data(manifest, modality="cxr", image_size=kw.pop("image_size", 16), cache=cache, **kw)


def test_the_second_load_decodes_nothing_and_gives_the_same_tensors(site, tmp_path, reads):
    cache = tmp_path / "c"
    first = _load(site, cache)
    assert len(reads) == 24 and len(list(cache.glob("*.npz"))) == 1
    reads.clear()
    second = _load(site, cache)
    assert reads == []
    for split in ("train", "val", "test"):
        assert torch.equal(first.split(split).images, second.split(split).images)
        assert torch.equal(first.split(split).labels, second.split(split).labels)
    assert [p.name for p in cache.iterdir() if p.name.startswith(".tmp")] == []
    assert cache.stat().st_mode & 0o777 == 0o700 and (cache / ".gitignore").read_text().strip().endswith("*")
    (file,) = cache.glob("*.npz")
    assert file.stat().st_mode & 0o777 == 0o600


def test_a_changed_file_is_read_again_and_only_it(site, tmp_path, reads):
    cache = tmp_path / "c"
    _load(site, cache)
    files = sorted((site / "images").rglob("*.dcm"))
    other = files[1]
    shutil.copyfile(other, files[0])  # another image in its place: new size or time
    os.utime(files[0], ns=(os.stat(other).st_atime_ns, os.stat(other).st_mtime_ns + 10**9))
    reads.clear()
    data = _load(site, cache)
    assert reads == [str(files[0])]
    fresh = _load(site, None)
    for split in ("train", "val", "test"):
        assert torch.equal(data.split(split).images, fresh.split(split).images)


def test_another_reading_setting_does_not_get_these_pixels(site, tmp_path, reads):
    cache = tmp_path / "c"
    _load(site, cache)
    reads.clear()
    _load(site, cache, image_size=12)
    assert len(reads) == 24  # other size: its own file
    reads.clear()
    _load(site, cache, allow_identifiable=True)
    assert len(reads) == 24  # accepted under another policy: never served to this one, nor the other way
    assert len(list(cache.glob("*.npz"))) == 3


def test_a_broken_cache_file_is_a_miss_and_is_rewritten(site, tmp_path, reads):
    cache = tmp_path / "c"
    _load(site, cache)
    (file,) = cache.glob("*.npz")
    file.write_bytes(b"PK\x03\x04 not a zip at all")
    reads.clear()
    data = _load(site, cache)
    assert len(reads) == 24 and len(data.train) > 0
    reads.clear()
    _load(site, cache)
    assert reads == []


def test_a_file_replaced_with_its_old_size_and_time_is_read_again(site, tmp_path, reads):
    """``cp -p`` / ``rsync -t`` keep size and modification time; the status-change time still moves."""
    cache = tmp_path / "c"
    _load(site, cache)
    files = sorted((site / "images").rglob("*.dcm"))
    st = os.stat(files[0])
    assert os.stat(files[1]).st_size == st.st_size  # uncompressed synthetic CRs: all the same size
    shutil.copyfile(files[1], files[0])
    os.utime(files[0], ns=(st.st_atime_ns, st.st_mtime_ns))
    reads.clear()
    _load(site, cache)
    assert reads == [str(files[0])]


def test_changed_reader_code_reads_everything_again(site, tmp_path, reads, monkeypatch):
    from medsilo.medical.data import cache as cache_module

    cache = tmp_path / "c"
    _load(site, cache)
    monkeypatch.setattr(cache_module, "code_identity", lambda: "a tightened de-identification check")
    reads.clear()
    _load(site, cache)
    assert len(reads) == 24


def test_an_unwritable_cache_is_a_warning_not_a_failed_job(site, tmp_path, reads, caplog):
    blocker = tmp_path / "c"
    blocker.write_text("a file where the cache folder should be")
    data = _load(site, blocker)
    assert len(data.train) > 0 and len(reads) == 24
    assert "could not update the image cache" in caplog.text


def test_the_cache_folder_is_bounded_and_stale_temporary_files_are_swept(site, tmp_path, monkeypatch):
    from medsilo.medical.data import cache as cache_module

    cache = tmp_path / "c"
    _load(site, cache, image_size=12)
    (old,) = cache.glob("*.npz")
    os.utime(old, (1, 1))  # long unused
    stale = cache / ".tmp-killed.npz"
    stale.write_bytes(b"half")
    os.utime(stale, (1, 1))
    monkeypatch.setattr(cache_module, "MAX_BYTES", old.stat().st_size + 1)  # room for one file
    _load(site, cache)
    assert not old.exists() and not stale.exists() and len(list(cache.glob("*.npz"))) == 1
