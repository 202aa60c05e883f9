"""``medsilo data check``: a mixed real folder is read the way a job reads it; every unusable file is named with
its reason, grouped by kind, and the exit status follows the data policy's unreadable limit."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import yaml
from pydicom.data import get_testdata_file
from pydicom.uid import DigitalXRayImageStorageForProcessing

from medsilo.cli import main
from medsilo.config import read_manifest
from medsilo.config.site import DataPolicy
from medsilo.medical.data.check import scan_dataset, verdicts
from medsilo.medical.synth import SynthRequest, synthesize
from tests.helpers import write_dicom

HEADER = "path,label,patient_id,split\n"
SPLITS = ("train", "train", "val", "val", "test", "test")


def _good(folder: Path) -> list[str]:
    """Six readable CR chest X-rays, one per class in each split (PA and AP views)."""
    names = []
    for i in range(6):
        stored = np.full((16, 16), 200 * i + 100, np.uint16)
        write_dicom(folder / f"good{i}.dcm", stored, ViewPosition="PA" if i % 3 else "AP")
        names.append(f"good{i}.dcm")
    return names


def _manifest(folder: Path, names: list[str]) -> Path:
    rows = [f"{name},{'normal' if i % 2 == 0 else 'pneumonia'},P{i},{SPLITS[i % 6]}\n" for i, name in enumerate(names)]
    path = folder / "manifest.csv"
    path.write_text(HEADER + "".join(rows))
    return path


@pytest.fixture()
def mixed(tmp_path) -> tuple[Path, dict[str, str]]:
    """Six good files plus one of each problem, in the order of the manifest: name → expected group."""
    folder = tmp_path / "export"
    folder.mkdir()
    names = _good(folder)
    shutil.copy(get_testdata_file("CT_small.dcm"), folder / "ct.dcm")  # a real CT slice
    shutil.copy(get_testdata_file("MR_small.dcm"), folder / "mr.dcm")  # a real MR slice
    shutil.copy(get_testdata_file("RG1_J2KR.dcm"), folder / "rg1.dcm")  # real CR, JPEG 2000, identifying test tags
    (folder / "corrupt.dcm").write_bytes((folder / "good0.dcm").read_bytes()[:900])
    (folder / "notes.dcm").write_text("exported by mistake")
    write_dicom(folder / "raw.dcm", np.full((16, 16), 7, np.uint16), Modality="DX",
                PresentationIntentType="FOR PROCESSING", SOPClassUID=DigitalXRayImageStorageForProcessing)  # fmt: skip
    problems = {"ct.dcm": "wrong modality", "mr.dcm": "wrong modality", "raw.dcm": "wrong modality",
                "rg1.dcm": "identifying", "corrupt.dcm": "not an image", "notes.dcm": "not an image",
                "gone.dcm": "missing file"}  # fmt: skip
    return _manifest(folder, names + list(problems)), problems


def _groups(out: str) -> dict[str, str]:
    """file name → the group header it is listed under in the report."""
    found, group = {}, None
    for line in out.splitlines():
        if line.startswith("  ") and not line.startswith("    ") and line.rstrip().endswith("):"):
            group = line.strip().rsplit(" (", 1)[0]
        elif line.startswith("    line "):
            found[Path(line.split(": ")[1]).name] = group
    return found


def test_a_mixed_folder_names_every_problem_file_with_its_reason_and_exits_1(mixed, capsys):
    manifest, problems = mixed
    assert main(["data", "check", str(manifest), "--modality", "cxr", "--quiet"]) == 1
    out = capsys.readouterr().out
    assert _groups(out) == problems
    lines = {Path(line.split(": ")[1]).name: line for line in out.splitlines() if line.startswith("    line ")}
    assert lines["ct.dcm"].startswith("    line 8: ") and "Modality is 'CT' (computed tomography), not a chest X-ray" in lines["ct.dcm"]
    assert "Modality is 'MR' (magnetic resonance)" in lines["mr.dcm"]
    assert "PresentationIntentType is 'FOR PROCESSING'" in lines["raw.dcm"]
    assert "identifying DICOM attributes are filled in (" in lines["rg1.dcm"] and "PatientName" in lines["rg1.dcm"]
    assert "not a readable DICOM image" in lines["corrupt.dcm"]
    assert "not DICOM" in lines["notes.dcm"]
    assert lines["gone.dcm"].endswith("gone.dcm: file not found")
    assert "7 of 13 file(s) unusable (54%):" in out
    # counts per split and class, views, and the verdicts a job would reach
    assert re.search(r"^  split\s+normal\s+pneumonia\n  train\s+1\s+1\n  val\s+1\s+1\n  test\s+1\s+1$", out, re.M)
    assert "  train: AP 1, PA 1\n  val: AP 1, PA 1\n  test: AP 0, PA 2" in out
    assert "fail  dataset: " in out and "6 of 13 files unreadable (limit 5%)" in out
    assert "fail  de-identification: 1 DICOM file(s) with identifying attributes" in out
    assert "check(s) failed (dataset, de-identification) under the default data policy" in out


def test_counts_per_split_and_class(mixed):
    manifest, _ = mixed
    report = scan_dataset(read_manifest(manifest), "cxr", DataPolicy(), progress=False)
    assert dict(report.counts) == {(s, c): 1 for s in ("train", "val", "test") for c in ("normal", "pneumonia")}
    assert [p.kind for p in report.problems] == ["wrong modality", "wrong modality", "wrong modality", "identifying",
                                                 "not an image", "not an image", "missing file"]  # fmt: skip
    assert report.problems[0].line == 8 and report.identifying[0].keywords  # keywords only, never values


def test_the_site_config_sets_the_unreadable_limit(tmp_path, capsys):
    folder = tmp_path / "export"
    folder.mkdir()
    names = _good(folder)
    shutil.copy(get_testdata_file("CT_small.dcm"), folder / "ct.dcm")
    manifest = _manifest(folder, [*names, "ct.dcm"])
    assert main(["data", "check", str(manifest), "--modality", "cxr", "--quiet"]) == 1  # 1 of 7 > 5%
    assert "1 of 7 files unreadable (limit 5%)" in capsys.readouterr().out
    site = tmp_path / "medsilo_site.yml"
    site.write_text(yaml.safe_dump({"site": "hospital-1", "datasets": {"cxr": {"manifest": str(manifest), "modality": "cxr"}},
                                    "data": {"max_unreadable_fraction": 0.2}}))  # fmt: skip
    assert main(["data", "check", str(manifest), "--modality", "cxr", "--site-config", str(site), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "warn  dataset: " in out and "6 images" in out and "1 unreadable skipped" in out
    assert f"a job would read this data (under the data policy of {site})" in out


def test_a_clean_folder_passes(tmp_path, capsys):
    folder = tmp_path / "export"
    folder.mkdir()
    manifest = _manifest(folder, _good(folder))
    assert main(["data", "check", str(manifest), "--modality", "cxr", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "every file is usable" in out and "ok    dataset: " in out and "ok    de-identification: " in out


def test_dicom_in_a_pathology_check_is_not_an_image(tmp_path, capsys):
    folder = tmp_path / "export"
    folder.mkdir()
    manifest = _manifest(folder, _good(folder))
    assert main(["data", "check", str(manifest), "--modality", "pathology", "--quiet"]) == 1
    out = capsys.readouterr().out
    assert "  not an image (6):" in out and "not a readable image" in out and "views" not in out


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "manifest.csv: manifest not found"),
        ("", "manifest.csv: empty manifest"),
        ("path,lable\nx.dcm,normal\n", "manifest.csv: line 1: unknown column 'lable'; did you mean 'label'?"),
    ],
)
def test_a_missing_or_malformed_manifest_is_one_line_and_exit_2(tmp_path, capsys, content, message):
    manifest = tmp_path / "manifest.csv"
    if content is not None:
        manifest.write_text(content)
    assert main(["data", "check", str(manifest), "--modality", "cxr", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("medsilo: error: ") and message in err and "\n" not in err


def test_a_bad_site_config_is_one_line_and_exit_2(tmp_path, capsys):
    folder = tmp_path / "export"
    folder.mkdir()
    manifest = _manifest(folder, _good(folder))
    site = tmp_path / "medsilo_site.yml"
    site.write_text(yaml.safe_dump({"site": "h", "datasets": {"cxr": {"manifest": "m.csv", "modality": "cxr"}},
                                    "data": {"max_unreadable_fraction": 2}}))  # fmt: skip
    assert main(["data", "check", str(manifest), "--modality", "cxr", "--site-config", str(site), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "data.max_unreadable_fraction" in err and str(site) in err


def test_verdicts_are_those_of_site_check(mixed):
    """``medsilo site check`` judges a dataset with the same function (its rows carry the dataset's name)."""
    manifest, _ = mixed
    report = scan_dataset(read_manifest(manifest), "cxr", DataPolicy(max_unreadable_fraction=0.9), progress=False)
    rows = verdicts(report, "cxr")
    assert [(name, status) for name, status, _ in rows] == [("dataset cxr", "warn"), ("de-identification cxr", "fail")]


def test_a_missing_codec_is_grouped_and_fails_the_check(tmp_path):
    """On a machine without the pylibjpeg packages (a fresh interpreter where they cannot be imported), a JPEG
    Lossless chest X-ray is listed under 'codec missing' with the syntax and what to install."""
    folder = tmp_path / "export"
    folder.mkdir()
    names = _good(folder)
    ds = pydicom.dcmread(get_testdata_file("JPEG-LL.dcm"))
    ds.Modality, ds.PatientName, ds.PatientID, ds.PatientIdentityRemoved = "CR", "ANON", "ANON", "YES"
    ds.save_as(folder / "lossless.dcm", enforce_file_format=True)
    manifest = _manifest(folder, [*names, "lossless.dcm"])
    code = ("import sys\n"
            "for name in ('pylibjpeg', 'libjpeg', 'openjpeg', 'rle'):\n"
            "    sys.modules[name] = None  # as if not installed\n"
            "from medsilo.cli import main\n"
            "sys.exit(main(['data', 'check', sys.argv[1], '--modality', 'cxr', '--quiet']))\n")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code, str(manifest)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    assert "  codec missing (1):" in done.stdout
    assert (f"    line 8: {folder / 'lossless.dcm'}: no decoder installed for transfer syntax 'JPEG Lossless, "
            "Non-Hierarchical, First-Order Prediction (Process 14 [Selection Value 1])'; install it with 'pip install "
            "pylibjpeg pylibjpeg-libjpeg'") in done.stdout  # fmt: skip


def test_a_multilabel_manifest_is_checked_per_label(tmp_path, capsys):
    # no job names the labels here: the columns besides path/patient_id/split are read as the labels
    synthesize(tmp_path / "ml", SynthRequest("cxr", sites=1, images_per_site=12, seed=3, multilabel=True),
               workers=1, progress=False)  # fmt: skip
    manifest = tmp_path / "ml" / "hospital-1" / "manifest.csv"
    assert main(["data", "check", str(manifest), "--modality", "cxr", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"split\s+pneumonia\s+effusion\s+nodule\s+cardiomegaly", out)
    assert "a job would read this data" in out
