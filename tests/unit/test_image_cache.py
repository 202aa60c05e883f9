"""The preprocessed-image cache: a second load decodes nothing, gives the same tensors, and re-reads exactly
the files that changed; another reading setting never gets these pixels; a broken cache is only a miss."""

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
