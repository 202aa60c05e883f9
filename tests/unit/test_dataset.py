"""Loading a site's dataset: splits in memory, unusable files skipped up to a limit, clear failures."""

from __future__ import annotations

import pytest
import torch

from medsilo.config import read_manifest
from medsilo.errors import DataError
from medsilo.medical.data import load_site_data
from medsilo.medical.data.transforms import normalize
from medsilo.medical.synth import SynthRequest, synthesize


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("ds") / "h"
    synthesize(out, SynthRequest("cxr", sites=1, images_per_site=30, seed=5), workers=1, progress=False)
    return out / "hospital-1"


def _manifest(site):
    return read_manifest(site / "manifest.csv", ["normal", "pneumonia"])


def test_loads_splits_as_small_tensors(site):
    data = load_site_data(_manifest(site), modality="cxr", image_size=16, seed=0)
    m = _manifest(site)
    for split in ("train", "val", "test"):
        ds = data.split(split)
        assert len(ds) == len(m.split(split))
        assert ds.images.shape[1:] == (1, 16, 16) and ds.images.dtype == torch.float32
        assert 0.0 <= ds.images.min() and ds.images.max() <= 1.0
        assert ds.labels.tolist() == [r.label for r in m.split(split)]
    assert data.failures == []
    # evaluation items are just the normalised cached image; training items are augmented
    x, y = data.test[0]
    torch.testing.assert_close(x, normalize(data.test.images[0]))
    assert data.test.augment is None and data.train.augment is not None


def test_training_augmentation_is_seeded(site):
    a = load_site_data(_manifest(site), modality="cxr", image_size=16, seed=1)
    b = load_site_data(_manifest(site), modality="cxr", image_size=16, seed=1)
    xa = torch.stack([a.train[i][0] for i in range(len(a.train))])
    xb = torch.stack([b.train[i][0] for i in range(len(b.train))])
    torch.testing.assert_close(xa, xb)
    plain = normalize(a.train.images)
    assert not torch.allclose(xa, plain)  # something was augmented


def test_augmentation_none_feeds_the_exact_preprocessed_pixels(site):
    runs = [load_site_data(_manifest(site), modality="cxr", image_size=16, seed=s, augmentation="none") for s in (1, 2)]
    assert runs[0].train.augment is None and runs[0].augmentation == ()
    batches = []
    for data in runs:
        loader = torch.utils.data.DataLoader(data.train, batch_size=4, shuffle=True,
                                             generator=torch.Generator().manual_seed(9))  # fmt: skip
        batches.append([x for x, _ in loader])
    for xa, xb in zip(*batches, strict=True):
        torch.testing.assert_close(xa, xb, rtol=0, atol=0)  # the seed of the (absent) augmentation is irrelevant
    items = torch.stack([runs[0].train[i][0] for i in range(len(runs[0].train))])
    torch.testing.assert_close(items, normalize(runs[0].train.images), rtol=0, atol=0)


def test_a_listed_augmentation_is_the_one_applied(site):
    from medsilo.config.augment import RandFlip

    data = load_site_data(_manifest(site), modality="cxr", image_size=16, seed=0,
                          augmentation=[RandFlip(prob=1.0, spatial_axis=1)])  # fmt: skip
    assert data.augmentation == (RandFlip(prob=1.0, spatial_axis=1),)
    x, _ = data.train[0]
    torch.testing.assert_close(x, normalize(data.train.images[0]).flip(-1))


def _png_site(folder, modes: list[str]):
    """A generic-image site: one PNG per (split, label) in the given Pillow modes, cycling."""
    import numpy as np
    from PIL import Image

    folder.mkdir()
    rows = ["path,label,patient_id,split"]
    kinds = [(split, label) for split in ("train", "val", "test") for label in ("0", "1")]
    for i, (split, label) in enumerate(kinds):
        mode = modes[i % len(modes)]
        pixels = np.full((6, 10, 3) if mode == "RGB" else (6, 10), 20 * i + 10, dtype=np.uint8)
        Image.fromarray(pixels, mode).save(folder / f"{i}.png")
        rows.append(f"{i}.png,{label},P{i},{split}")
    (folder / "manifest.csv").write_text("\n".join(rows) + "\n")
    return read_manifest(folder / "manifest.csv", ["0", "1"])


def test_generic_images_take_their_channels_from_the_data_or_the_job(tmp_path):
    gray = load_site_data(_png_site(tmp_path / "g", ["L"]), modality="image", image_size=8)
    assert gray.channels == 1 and gray.train.augment is None  # no augmentation by default
    mixed = load_site_data(_png_site(tmp_path / "m", ["L", "RGB"]), modality="image", image_size=8)
    assert mixed.channels == 3  # grayscale files replicated beside the colour ones
    first = mixed.train.images[0]
    torch.testing.assert_close(first[0], first[2])
    forced = load_site_data(_png_site(tmp_path / "f", ["RGB"]), modality="image", image_size=8, channels=1)
    assert forced.channels == 1


def _damage(site, count: int) -> list[str]:
    rows = [r for r in _manifest(site).rows if r.split == "train"][:count]
    for r in rows:
        r.path.write_bytes(r.path.read_bytes()[:700])
    return [str(r.path) for r in rows]


def test_a_few_unreadable_files_are_skipped_and_reported(tmp_path, site):
    import shutil

    copy = tmp_path / "site"
    shutil.copytree(site, copy)
    damaged = _damage(copy, 1)
    data = load_site_data(_manifest(copy), modality="cxr", image_size=16, max_unreadable_fraction=0.1)
    assert [f.path for f in data.failures] == damaged
    assert "not a readable DICOM image" in data.failures[0].reason
    assert len(data.train) == len(_manifest(copy).split("train")) - 1


def test_too_many_unreadable_files_fail_with_a_summary(tmp_path, site):
    import shutil

    copy = tmp_path / "site"
    shutil.copytree(site, copy)
    _damage(copy, 4)
    with pytest.raises(DataError, match=r"4 of 30 images \(13%\) could not be used, more than the allowed 5% "
                                         r"\(data.max_unreadable_fraction\): 4× not a readable DICOM image"):  # fmt: skip
        load_site_data(_manifest(copy), modality="cxr", image_size=16)


def test_an_empty_split_fails(tmp_path, site):
    import shutil

    copy = tmp_path / "site"
    shutil.copytree(site, copy)
    for r in _manifest(copy).split("val"):
        r.path.unlink()
    with pytest.raises(DataError, match=r"no usable image in split\(s\) val"):
        load_site_data(_manifest(copy), modality="cxr", image_size=16, max_unreadable_fraction=0.9)


def test_wrong_modality_files_are_unusable(site):
    with pytest.raises(DataError, match="not a readable image"):
        load_site_data(_manifest(site), modality="pathology", image_size=16)


def test_a_folder_of_damaged_dicoms_is_skipped_file_by_file_with_reasons(tmp_path, site):
    """Truncated, wrong transfer syntax, no pixel data, absurd dimensions, PHI present: each file is skipped
    with its own reason (no decoder is asked to allocate the declared 60000² pixels), the rest loads."""
    import shutil

    import pydicom
    from pydicom.encaps import encapsulate

    copy = tmp_path / "site"
    shutil.copytree(site, copy)
    files = [r.path for r in _manifest(copy).split("train")][:5]
    files[0].write_bytes(files[0].read_bytes()[:1200])  # truncated
    ds = pydicom.dcmread(files[1])  # claims JPEG, holds garbage
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.50"
    ds.PixelData = encapsulate([b"\xff\xd8not a jpeg\xff\xd9"])
    ds["PixelData"].VR = "OB"
    ds.save_as(files[1], enforce_file_format=True)
    ds = pydicom.dcmread(files[2])
    del ds.PixelData
    ds.save_as(files[2])
    ds = pydicom.dcmread(files[3])
    ds.Rows = ds.Columns = 60000
    ds.save_as(files[3])
    ds = pydicom.dcmread(files[4])
    ds.PatientBirthDate, ds.PatientIdentityRemoved = "19700101", "NO"
    ds.save_as(files[4])
    data = load_site_data(_manifest(copy), modality="cxr", image_size=16, max_unreadable_fraction=0.2)
    reasons = {f.path: f.reason for f in data.failures}
    assert set(reasons) == {str(f) for f in files}
    assert "not a readable DICOM image" in reasons[str(files[0])]
    assert "not a readable DICOM image" in reasons[str(files[1])] and "not a readable" in reasons[str(files[2])]
    assert "60000×60000 pixels, more than the 64-megapixel limit" in reasons[str(files[3])]
    assert "PatientBirthDate" in reasons[str(files[4])] and "1970" not in reasons[str(files[4])]  # tags, not values
    assert len(data.train) == len(_manifest(copy).split("train")) - 5
