"""A manifest cannot bring files from outside its folder into a job unless the site config allows it.

The threat: whoever can write a dataset's ``manifest.csv`` (a data curator, an export script, a shared
data folder) but not the site config names ``../../other-study/...``, an absolute path, or a symbolic link
that leads out. A job would then train on, and through the model reveal, files the site never approved
for this dataset. Every reader of manifests must refuse such a row, naming the manifest, the line, the
path and the setting that allows it: ``data.allow_paths_outside_manifest``.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from medsilo.cli import main
from medsilo.config import ManifestError, SiteConfig, load_site_config, load_sites_file, read_manifest
from medsilo.medical.data.check import check_dataset
from medsilo.provisioning.check import check_kit
from tests.helpers import write_dicom

HEADER = "path,label,patient_id,split\n"
SETTING = "set data.allow_paths_outside_manifest: true in the site config"
ALLOW = {"allow_paths_outside_manifest": True}


@pytest.fixture
def layout(tmp_path) -> dict[str, Path]:
    """``data/`` (the dataset: a manifest, ``images/a.dcm``, ``deep/er/b.dcm``) beside ``secret/x.dcm``."""
    data, secret = tmp_path / "data", tmp_path / "secret"
    for folder in (data / "images", data / "deep" / "er", secret):
        folder.mkdir(parents=True)
    for path in (data / "images" / "a.dcm", data / "deep" / "er" / "b.dcm", secret / "x.dcm"):
        path.write_bytes(b"image")
    return {"data": data, "secret": secret, "manifest": data / "manifest.csv"}


def _manifest(layout: dict[str, Path], *cells: str) -> Path:
    rows = [f"{cell},normal,P{i},train" for i, cell in enumerate(cells)]
    layout["manifest"].write_text(HEADER + "\n".join(rows) + "\n")
    return layout["manifest"]


def _escapes(layout: dict[str, Path]) -> dict[str, str]:
    """Each way out: the row's path as written."""
    (layout["data"] / "link.dcm").symlink_to(layout["secret"] / "x.dcm")
    (layout["data"] / "linked-dir").symlink_to(layout["secret"], target_is_directory=True)
    return {
        "dot-dot": "../secret/x.dcm",
        "dot-dot inside a subfolder": "images/../../secret/x.dcm",
        "absolute": str(layout["secret"] / "x.dcm"),
        "symlinked file": "link.dcm",
        "symlinked folder": "linked-dir/x.dcm",
    }


@pytest.mark.parametrize("way", ["dot-dot", "dot-dot inside a subfolder", "absolute", "symlinked file",
                                 "symlinked folder"])  # fmt: skip
def test_a_row_leading_outside_is_refused_naming_manifest_line_path_and_setting(layout, way):
    cell = _escapes(layout)[way]
    manifest = _manifest(layout, "images/a.dcm", cell)
    with pytest.raises(ManifestError) as info:
        read_manifest(manifest)
    message = str(info.value)
    assert message.startswith(f"{manifest}: line 3: path: {cell!r} ")
    assert f"outside the manifest's folder {layout['data']}" in message and message.endswith(SETTING)
    target = layout["secret"] / "x.dcm"
    assert str(target) in message  # where it really leads
    assert ("through a symbolic link" in message) == way.startswith("symlinked")


@pytest.mark.parametrize("way", ["dot-dot", "absolute", "symlinked file", "symlinked folder"])
def test_the_site_setting_allows_them_as_resolved_paths(layout, way):
    cell = _escapes(layout)[way]
    rows = read_manifest(_manifest(layout, "images/a.dcm", cell), allow_outside=True).rows
    assert [r.path for r in rows] == [layout["data"] / "images" / "a.dcm", layout["secret"] / "x.dcm"]


def test_paths_inside_the_folder_still_load_however_written(layout):
    (layout["data"] / "alias").symlink_to(layout["data"] / "deep", target_is_directory=True)  # stays inside
    manifest = _manifest(layout, "images/a.dcm", "deep/er/b.dcm", "images/../deep/../images/c.dcm",
                         str(layout["data"] / "images" / "d.dcm"), "alias/er/e.dcm")  # fmt: skip
    rows = read_manifest(manifest).rows
    data = layout["data"]
    assert [r.path for r in rows] == [data / "images" / "a.dcm", data / "deep" / "er" / "b.dcm",
                                      data / "images" / "c.dcm", data / "images" / "d.dcm",
                                      data / "deep" / "er" / "e.dcm"]  # fmt: skip


def test_two_spellings_of_one_file_are_one_image(layout):
    manifest = _manifest(layout, "images/a.dcm", "deep/../images/a.dcm")
    with pytest.raises(ManifestError, match=r"line 3: path: same image as line 2"):
        read_manifest(manifest)


def test_the_setting_is_off_unless_the_site_config_says_so(tmp_path):
    site = {"site": "hospital-1", "datasets": {"cxr": {"manifest": "m.csv", "modality": "cxr"}}}
    assert SiteConfig.model_validate(site).data.allow_paths_outside_manifest is False
    path = tmp_path / "medsilo_site.yml"
    path.write_text(yaml.safe_dump({**site, "data": ALLOW}))
    assert load_site_config(path).data.allow_paths_outside_manifest is True
    sites = tmp_path / "sites.yml"
    entry = {"dataset": "cxr", "manifest": "m.csv", "modality": "cxr"}
    sites.write_text(yaml.safe_dump({"sites": {"a": entry, "b": {**entry, "data": ALLOW}}}))
    configs = load_sites_file(sites).site_configs()  # what the simulator and medsilo pcevolve --sites use
    assert [c.data.allow_paths_outside_manifest for c in configs.values()] == [False, True]


# ---- the commands that read manifests -------------------------------------------------------------


def _dicom_dataset(folder: Path) -> list[Path]:
    """Six readable chest X-rays, two classes in each split."""
    folder.mkdir(parents=True)
    return [write_dicom(folder / f"{i}.dcm", np.full((16, 16), 100 * i, np.uint16)) for i in range(6)]


def _rows(images: list[Path]) -> str:
    labels = [(s, c) for s in ("train", "val", "test") for c in ("normal", "pneumonia")]
    return HEADER + "".join(f"{img},{c},P{i},{s}\n" for i, (img, (s, c)) in enumerate(zip(images, labels)))


def _dataset_row(kit: Path) -> tuple[str, str]:
    return next((r.status, r.detail) for r in check_kit(kit, datasets=check_dataset, progress=False) if r.name == "dataset cxr")


def test_site_check_refuses_the_dataset_and_honours_the_setting(tmp_path):
    """``medsilo site check`` reads the manifest as a job would; only its dataset row is looked at here."""
    manifest = tmp_path / "dataset" / "manifest.csv"
    manifest.parent.mkdir()
    manifest.write_text(_rows(_dicom_dataset(tmp_path / "elsewhere")))
    kit = tmp_path / "hospital-1"
    (kit / "local").mkdir(parents=True)
    config = {"site": "hospital-1", "datasets": {"cxr": {"manifest": str(manifest), "modality": "cxr"}}}
    (kit / "local" / "medsilo_site.yml").write_text(yaml.safe_dump(config))
    status, detail = _dataset_row(kit)
    assert status == "fail" and detail.startswith(f"{manifest}: line 2: path: ") and detail.endswith(SETTING)
    (kit / "local" / "medsilo_site.yml").write_text(yaml.safe_dump({**config, "data": ALLOW}))
    status, detail = _dataset_row(kit)
    assert status == "ok", detail


def test_pcevolve_refuses_before_spending_anything_and_honours_the_setting(tmp_path, capsys, monkeypatch):
    """``medsilo pcevolve`` reads the site's manifest first: a refused one leaves no output and no ledger."""
    monkeypatch.setenv("MEDSILO_LEDGER_DIR", str(tmp_path / "ledgers"))  # restored after the test
    manifest = tmp_path / "dataset" / "manifest.csv"
    manifest.parent.mkdir()
    manifest.write_text(_rows(_dicom_dataset(tmp_path / "elsewhere")))
    entry = {"dataset": "cxr", "manifest": str(manifest), "modality": "cxr"}
    sites = tmp_path / "sites.yml"
    sites.write_text(yaml.safe_dump({"sites": {"hospital-1": entry}}))
    out = tmp_path / "syn"
    argv = ["pcevolve", "--sites", str(sites), "--site", "hospital-1", "--out", str(out), "--epsilon", "1",
            "--iterations", "1", "--per-class", "2", "--image-size", "16", "--no-progress"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(rf"medsilo: error: {re.escape(str(manifest))}: line 2: path: .*{SETTING}\n", err), err
    assert not list(tmp_path.glob("syn*")) and not list(tmp_path.rglob("privacy_ledger.jsonl"))
    sites.write_text(yaml.safe_dump({"sites": {"hospital-1": {**entry, "data": ALLOW}}}))
    assert main(argv) == 0
    assert (out / "manifest.csv").is_file()
