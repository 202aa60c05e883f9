"""Synthetic hospitals: determinism, DICOM validity, site profiles, splits by patient, scarce sites, skew."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pydicom
import pydicom.config
import pytest

from medsilo.config import load_sites_file, read_manifest
from medsilo.errors import MedsiloError
from medsilo.medical.synth import SynthRequest, cxr, pathology, synthesize


@pytest.fixture(scope="module")
def cxr_sites(tmp_path_factory):
    out = tmp_path_factory.mktemp("cxr") / "hospitals"
    synthesize(out, SynthRequest("cxr", sites=4, images_per_site=24, seed=3, scarce={"hospital-3": 4}),
               workers=1, progress=False)  # fmt: skip
    return out


def _files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path, cxr_sites):
    again = tmp_path / "again"
    synthesize(again, SynthRequest("cxr", sites=4, images_per_site=24, seed=3, scarce={"hospital-3": 4}),
               workers=2, progress=False)  # fmt: skip  (2 workers: result must not depend on it)
    assert _files(again) == _files(cxr_sites)
    other = tmp_path / "other"
    synthesize(other, SynthRequest("cxr", sites=1, images_per_site=10, seed=4), workers=1, progress=False)
    a = (other / "hospital-1/images/000000.dcm").read_bytes()
    b = (cxr_sites / "hospital-1/images/000000.dcm").read_bytes()
    assert a != b


def test_dicom_files_are_valid_cr_with_unique_uids(cxr_sites):
    uids = set()
    for path in sorted(cxr_sites.glob("hospital-*/images/*.dcm")):
        with pydicom.config.strict_reading():  # invalid values raise instead of warning
            ds = pydicom.dcmread(path)
            ds.to_json_dict()  # touches (and so validates) every element
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.SOPClassUID == pydicom.uid.ComputedRadiographyImageStorage == ds.file_meta.MediaStorageSOPClassUID
        assert ds.Modality == "CR" and ds.BodyPartExamined == "CHEST"
        assert ds.pixel_array.shape == (ds.Rows, ds.Columns)
        assert int(ds.pixel_array.max()) <= 2**ds.BitsStored - 1
        assert ds.PatientIdentityRemoved == "YES" and ds.PatientBirthDate == ""
        assert ds.SOPInstanceUID not in uids
        uids.add(ds.SOPInstanceUID)
    assert len(uids) > 60


def test_hospitals_have_different_scanners(cxr_sites):
    first = {site: pydicom.dcmread(next(iter(sorted((cxr_sites / site / "images").glob("*.dcm")))))
             for site in ("hospital-1", "hospital-2", "hospital-3", "hospital-4")}  # fmt: skip
    assert len({ds.Manufacturer for ds in first.values()}) == 4
    assert len({(ds.Rows, ds.BitsStored) for ds in first.values()}) == 4
    assert first["hospital-2"].PhotometricInterpretation == "MONOCHROME1"
    assert float(first["hospital-4"].RescaleSlope) == 2.0 and float(first["hospital-4"].RescaleIntercept) == -1024


def test_manifests_split_by_patient_and_sites_yml_is_valid(cxr_sites):
    sites = load_sites_file(cxr_sites / "sites.yml")
    assert list(sites.sites) == ["hospital-1", "hospital-2", "hospital-3", "hospital-4"]
    for entry in sites.sites.values():
        m = read_manifest(entry.manifest, ["normal", "pneumonia"])
        splits_of: dict[str, set[str]] = {}
        for row in m.rows:
            assert row.path.is_file()
            splits_of.setdefault(row.patient_id, set()).add(row.split)
        assert all(len(s) == 1 for s in splits_of.values())
        for split, per_class in m.counts().items():
            assert all(n >= 1 for n in per_class.values()), (entry.manifest, split, per_class)


def test_scarce_site_has_few_training_images_but_full_evaluation(cxr_sites):
    summary = json.loads((cxr_sites / "synth.json").read_text())["sites"]
    scarce = summary["hospital-3"]["split_counts"]
    normal = summary["hospital-1"]["split_counts"]
    assert sum(scarce["train"].values()) == 4 < sum(normal["train"].values())
    for split in ("val", "test"):  # ~20 % of 24 images each, up to patient granularity
        assert sum(scarce[split].values()) >= 4 and sum(normal[split].values()) >= 4


def test_rerun_reuses_and_foreign_or_different_output_is_protected(tmp_path, cxr_sites):
    req = SynthRequest("cxr", sites=4, images_per_site=24, seed=3, scarce={"hospital-3": 4})
    before = (cxr_sites / "synth.json").stat().st_mtime_ns
    synthesize(cxr_sites, req, progress=False)
    assert (cxr_sites / "synth.json").stat().st_mtime_ns == before  # cached, not rewritten

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(MedsiloError, match="not empty and was not made by 'medsilo synth'"):
        synthesize(foreign, req, progress=False)
    assert (foreign / "notes.txt").read_text() == "keep me"

    small = tmp_path / "small"
    synthesize(small, SynthRequest("cxr", sites=1, images_per_site=10), workers=1, progress=False)
    with pytest.raises(MedsiloError, match="pass --force"):
        synthesize(small, SynthRequest("cxr", sites=1, images_per_site=12), workers=1, progress=False)
    synthesize(small, SynthRequest("cxr", sites=1, images_per_site=12), workers=1, progress=False, force=True)
    assert len(read_manifest(small / "hospital-1/manifest.csv").rows) == 12
    assert not list(tmp_path.glob(".*partial*"))


def test_dirichlet_skew_varies_class_mix_with_a_floor(tmp_path):
    out = tmp_path / "skew"
    req = SynthRequest("pathology", sites=4, images_per_site=40, seed=1, dirichlet_alpha=0.3, patch_size=32)
    synthesize(out, req, workers=1, progress=False)
    summary = json.loads((out / "synth.json").read_text())["sites"]
    mixes = [tuple(s["class_counts"].values()) for s in summary.values()]
    assert all(sum(m) == 40 and min(m) >= 3 for m in mixes)
    assert len(set(mixes)) > 1
    first = next(iter(sorted(out.glob("hospital-1/images/*.png"))))
    from PIL import Image

    with Image.open(first) as im:
        assert im.mode == "RGB" and im.size == (32, 32)


@pytest.mark.parametrize(
    "req, match",
    [
        (SynthRequest("ct", 2, 20), r"--modality: must be 'cxr' or 'pathology'"),
        (SynthRequest("cxr", 0, 20), r"--sites: must be between 1 and 64"),
        (SynthRequest("cxr", 2, 5), r"--images-per-site: must be at least 10"),
        (SynthRequest("cxr", 2, 20, scarce={"hospital-9": 4}), r"--scarce: unknown site 'hospital-9'"),
        (SynthRequest("cxr", 2, 20, scarce={"hospital-1": 1}), r"needs at least one training image per class"),
        (SynthRequest("cxr", 2, 20, classes=("normal", "tumor")), r"--classes: cxr classes must be"),
        (SynthRequest("pathology", 2, 20, classes=("normal", "tumor", "high-grade")), r"'tumor' is what the grades"),
        (SynthRequest("cxr", 2, 20, dirichlet_alpha=0), r"--dirichlet-alpha: must be > 0"),
    ],
)
def test_bad_requests(tmp_path, req, match):
    with pytest.raises(MedsiloError, match=match):
        synthesize(tmp_path / "x", req, progress=False)
    assert not (tmp_path / "x").exists()


def test_findings_add_density_inside_the_lungs_only():
    rng = np.random.default_rng(0)
    patient = cxr.sample_patient(rng, "pneumonia")
    healthy = dataclasses.replace(patient, finding="normal")
    sick = cxr.render_density(patient, np.random.default_rng(1))
    clean = cxr.render_density(healthy, np.random.default_rng(1))
    added = sick - clean
    assert added.min() >= -1e-6 and added.sum() > 5  # consolidation is denser
    assert np.abs(added[:, :8]).max() < 1e-6  # nothing outside the body / lungs (image border)


def test_scanner_chain_encodes_photometric_and_bits():
    rng = np.random.default_rng(0)
    density = cxr.render_density(cxr.sample_patient(rng, "normal"), rng)
    mono1 = cxr.acquire(density, cxr.CXR_SCANNERS[1], np.random.default_rng(5))
    mono2 = cxr.acquire(density, dataclasses.replace(cxr.CXR_SCANNERS[1], photometric="MONOCHROME2"),
                        np.random.default_rng(5))  # fmt: skip
    assert mono1.shape == (256, 256) and mono1.dtype == np.uint16
    np.testing.assert_array_equal(mono1, (2**14 - 1) - mono2)
    neutral = cxr.CXR_SCANNERS[2].scaled(0.0)
    assert neutral.gamma == 1.0 and neutral.blur == 0.3 and neutral.matrix == cxr.CXR_SCANNERS[2].matrix


def test_tumour_patches_carry_more_haematoxylin():
    def mean_h(label: str) -> float:
        rng = np.random.default_rng(7)
        vals = []
        for _ in range(12):
            haem, _ = pathology.render_stains(pathology.sample_atypia(rng, label), rng, 48, 1.0)
            vals.append(haem.mean())
        return float(np.mean(vals))

    assert mean_h("tumor") > 1.5 * mean_h("normal")
    # the graded classes are ordered the same way: each grade's nuclei carry more haematoxylin than the last
    assert mean_h("normal") < mean_h("low-grade") < mean_h("high-grade")


def test_pathology_grades_are_three_ordered_classes(tmp_path):
    rng = np.random.default_rng(0)
    means = {g: np.mean([pathology.sample_atypia(rng, g) for _ in range(2000)])
             for g in ("normal", "low-grade", "high-grade")}  # fmt: skip
    assert means["normal"] < 0.35 < means["low-grade"] < 0.6 < means["high-grade"]
    out = tmp_path / "grades"
    req = SynthRequest("pathology", sites=2, images_per_site=30, seed=0, patch_size=32,
                       classes=("normal", "low-grade", "high-grade"))  # fmt: skip
    synthesize(out, req, workers=1, progress=False)
    summary = json.loads((out / "synth.json").read_text())
    assert summary["request"]["classes"] == ["normal", "low-grade", "high-grade"]
    assert all(set(s["class_counts"]) == {"normal", "low-grade", "high-grade"} and min(s["class_counts"].values()) > 0
               for s in summary["sites"].values())  # fmt: skip
    with pytest.raises(ValueError, match="label must be one of"):
        pathology.sample_atypia(rng, "grade-4")


def test_atypia_boundaries_are_where_the_likelier_class_changes():
    from scipy import stats

    def likelier(x: float, a: str, b: str) -> str:
        return max((a, b), key=lambda c: stats.beta.pdf(x, *pathology.ATYPIA_LAWS[c]))

    for lower, upper in [("normal", "tumor"), ("normal", "low-grade"), ("low-grade", "high-grade")]:
        x = pathology.atypia_boundary(lower, upper)
        assert likelier(x - 0.01, lower, upper) == lower and likelier(x + 0.01, lower, upper) == upper
    assert pathology.atypia_boundary("normal", "tumor") == pytest.approx(0.5)  # the two-class laws are mirrors
    assert pathology.atypia_boundary("normal", "low-grade") < pathology.atypia_boundary("low-grade", "high-grade")
    with pytest.raises(ValueError, match="must peak below"):
        pathology.atypia_boundary("high-grade", "low-grade")


def test_stain_site_changes_colour_not_shape():
    rng_a, rng_b = np.random.default_rng(2), np.random.default_rng(2)
    ref = pathology.stain_patch(0.5, pathology.STAIN_SITES[0], rng_a, 32)
    assert ref.shape == (32, 32, 3) and ref.dtype == np.uint8
    light_h = dataclasses.replace(pathology.STAIN_SITES[0], h_scale=0.3, noise=0.0)
    strong_h = dataclasses.replace(pathology.STAIN_SITES[0], h_scale=2.0, noise=0.0)
    assert pathology.stain_patch(0.5, strong_h, rng_a, 32).mean() < pathology.stain_patch(0.5, light_h, rng_b, 32).mean()


def test_digits_are_real_images_dealt_to_label_skewed_sites(tmp_path, capsys):
    """``medsilo synth --modality digits``: all 1,797 scikit-learn digits, each at exactly one site, as PNGs the
    generic reader reads; a Dirichlet(0.1) deal gives sites few classes; the same request reuses the folder."""
    from PIL import Image

    from medsilo.cli import main
    from medsilo.config import load_sites_file, read_manifest
    from medsilo.medical.synth.digits import CLASSES

    out = tmp_path / "digits"
    assert main(["synth", "--modality", "digits", "--out", str(out), "--sites", "4", "--dirichlet-alpha", "0.1",
                 "--quiet"]) == 0  # fmt: skip
    assert "site-4" in capsys.readouterr().out
    sites = load_sites_file(out / "sites.yml").sites
    manifests = {s: read_manifest(e.manifest, CLASSES) for s, e in sites.items()}
    images = [r.path for m in manifests.values() for r in m.rows]
    assert len(images) == len(set(images)) == 1797 and all(e.modality == "image" for e in sites.values())
    held = [len({r.label for r in m.rows if r.split == "train"}) for m in manifests.values()]
    assert min(held) < 10  # label skew: some site lacks classes
    with Image.open(images[0]) as im:
        assert im.mode == "L" and im.size == (32, 32)
    stamp = (out / "sites.yml").stat().st_mtime_ns
    assert main(["synth", "--modality", "digits", "--out", str(out), "--sites", "4", "--dirichlet-alpha", "0.1",
                 "--quiet"]) == 0  # fmt: skip
    assert (out / "sites.yml").stat().st_mtime_ns == stamp
