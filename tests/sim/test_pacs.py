"""A PACS as a site's data source, against a real Orthanc with its DICOMweb plugin (medsilo.medical.data.pacs).

The module starts its own Orthanc (Debian packages ``orthanc`` and ``orthanc-dicomweb``; ``make test`` installs
them) on a free loopback port with a temporary config — storage under tmp, DICOMweb plugin on, HTTP basic
authentication with one test user, no DICOM port — loads one synthetic hospital into it through Orthanc's REST
API (``POST /instances``), and stops it after the module. Without Orthanc the tests fail, saying how to install it.
"""

from __future__ import annotations

import csv
import glob
import json
import shutil
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
import yaml

from medsilo.config import JobSpec, load_site_config, read_manifest
from medsilo.config.loading import ConfigError
from medsilo.jobs.simulate import run_simulation
from medsilo.medical.data.check import check_dataset
from medsilo.medical.data.dataset import dataset_manifest
from medsilo.medical.data.pacs import (
    INDEX,
    INSTANCES,
    PacsError,
    cache_folder,
    password,
    pull,
    read_labels,
    resolve,
)
from medsilo.medical.synth import SynthRequest, synthesize

USER, SECRET = "medsilo-test", "orthanc-s3cret"
PASSWORD_ENV = "MEDSILO_TEST_PACS_PASSWORD"
PLUGIN_GLOBS = ("/usr/share/orthanc/plugins/libOrthancDicomWeb.so", "/usr/lib/orthanc/libOrthancDicomWeb.so*",
                "/usr/lib/*/orthanc/plugins/libOrthancDicomWeb.so*")  # fmt: skip
INSTALL = ("needs Orthanc with its DICOMweb plugin: install the Debian packages with "
           "'apt-get update && apt-get install -y orthanc orthanc-dicomweb' (as root; 'make test' does it)")  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _orthanc() -> tuple[str, str]:
    binary = shutil.which("Orthanc") or next(
        (p for p in ("/usr/sbin/Orthanc", "/usr/bin/Orthanc") if Path(p).is_file()), None
    )
    plugin = next((p for pattern in PLUGIN_GLOBS for p in sorted(glob.glob(pattern))), None)
    if binary is None or plugin is None:
        pytest.fail(
            f"tests/sim/test_pacs.py {INSTALL} (missing: {'the Orthanc program' if binary is None else 'its DICOMweb plugin libOrthancDicomWeb.so'})"
        )
    return binary, plugin


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    """A running Orthanc: yields its DICOMweb root URL; stopped (and waited for) after the module."""
    binary, plugin = _orthanc()
    home = tmp_path_factory.mktemp("orthanc")
    port = _free_port()
    config = {
        "Name": "medsilo-test", "StorageDirectory": str(home / "db"), "IndexDirectory": str(home / "db"),
        "HttpPort": port, "DicomServerEnabled": False, "DicomPort": _free_port(), "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True, "RegisteredUsers": {USER: SECRET}, "Plugins": [plugin],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}, "SaveJobs": False,
    }  # fmt: skip
    (home / "orthanc.json").write_text(json.dumps(config))
    log = (home / "orthanc.log").open("w")
    proc = subprocess.Popen([binary, str(home / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if requests.get(f"{base}/system", auth=(USER, SECRET), timeout=1).ok:
                    break
            except requests.ConnectionError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(
                    f"Orthanc did not start (exit {proc.poll()}): {(home / 'orthanc.log').read_text()[-2000:]}"
                )
            time.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def hospital(orthanc, tmp_path_factory):
    """Two synthetic hospitals; hospital-2's images are loaded into the Orthanc and listed in a label CSV (its
    last row names only the study: QIDO-RS finds the instance). Returns (sites.yml, label CSV, rows)."""
    sites_yml = synthesize(tmp_path_factory.mktemp("hospitals") / "cxr",
                           SynthRequest("cxr", sites=2, images_per_site=20, seed=5), workers=1, progress=False)  # fmt: skip
    manifest = sites_yml.parent / "hospital-2" / "manifest.csv"
    with manifest.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    labels = []
    for row in rows:
        data = (manifest.parent / row["path"]).read_bytes()
        requests.post(f"{orthanc}/instances", data=data, auth=(USER, SECRET), timeout=10).raise_for_status()
        ds = pydicom.dcmread(manifest.parent / row["path"], stop_before_pixels=True)
        labels.append([ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, row["label"], row["patient_id"],
                       row["split"], row["path"]])  # fmt: skip
    labels[-1][1:3] = ["", ""]
    csv_file = tmp_path_factory.mktemp("labels") / "pacs_labels.csv"
    _write_labels(csv_file, [r[:6] for r in labels])
    return sites_yml, csv_file, labels


def _write_labels(path: Path, rows: list[list[str]]) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["study_uid", "series_uid", "sop_uid", "label", "patient_id", "split"])
        writer.writerows(rows)
    return path


def _site_config(tmp: Path, endpoint: str, labels: Path, **pacs) -> Path:
    """A kit's ``local/medsilo_site.yml`` whose dataset ``cxr`` lives in the PACS."""
    (tmp / "local").mkdir(parents=True, exist_ok=True)
    source = {"url": f"{endpoint}/dicom-web", "labels": str(labels), "username": USER, "password_env": PASSWORD_ENV,
              "timeout_s": 5, **pacs}  # fmt: skip
    path = tmp / "local" / "medsilo_site.yml"
    path.write_text(
        yaml.safe_dump({"site": "hospital-2", "datasets": {"cxr": {"modality": "cxr", "pacs": source}}})
    )
    return path


def test_pull_caches_resumes_and_refetches_a_corrupt_file(orthanc, hospital, tmp_path, monkeypatch):
    sites_yml, labels, rows = hospital
    monkeypatch.setenv(PASSWORD_ENV, SECRET)
    config = load_site_config(_site_config(tmp_path, orthanc, labels))
    ref = config.datasets["cxr"]
    folder = cache_folder(ref.pacs)
    assert folder.parent == tmp_path / "local" / "data_cache"  # default: beside the kit's config

    first = pull(ref.pacs)
    assert (first.wanted, first.fetched, first.reused) == (len(rows), len(rows), 0)
    manifest = read_manifest(first.manifest, ["normal", "pneumonia"])
    # the manifest keeps the label CSV's rows, order and columns; its files are the PACS's instances
    assert [(r.split, manifest.classes[r.label]) for r in manifest.rows] == [(r[5], r[3]) for r in rows]
    originals = [sites_yml.parent / "hospital-2" / r[6] for r in rows]
    for row, original in zip(manifest.rows, originals):
        cached, source = pydicom.dcmread(row.path), pydicom.dcmread(original)
        assert (
            cached.SOPInstanceUID == source.SOPInstanceUID
        )  # the study-only last row found its instance too
        np.testing.assert_array_equal(cached.pixel_array, source.pixel_array)

    assert {p.stat().st_mode & 0o777 for p in folder.rglob("*") if p.is_file() and p.name != ".lock"} == {
        0o600
    }
    again = pull(ref.pacs)  # resumable: everything cached and verified, nothing fetched
    assert (again.fetched, again.reused, again.removed) == (0, len(rows), 0)

    victims = sorted((folder / INSTANCES).iterdir())[:2]
    victims[0].write_bytes(victims[0].read_bytes()[:-1] + b"\x00")  # same size, one byte changed
    victims[1].unlink()
    repaired = pull(ref.pacs)
    assert (repaired.fetched, repaired.reused) == (2, len(rows) - 2)
    index = json.loads((folder / INDEX).read_text())["instances"]
    assert set(index) == {r.path.stem for r in manifest.rows}
    assert pull(ref.pacs).fetched == 0

    # the hook every reader of a site dataset goes through: a PACS dataset is its cache's manifest
    assert dataset_manifest(ref, ["normal", "pneumonia"]) == first.manifest
    # and medsilo site check reads the cached files as a job would
    checked = {
        row: (status, detail) for row, status, detail in check_dataset("cxr", ref, config, progress=False)
    }
    assert checked["dataset cxr"][0] == "ok" and f"{len(rows)} images" in checked["dataset cxr"][1], checked


def test_cache_cap_stops_the_pull_and_the_next_run_resumes(orthanc, hospital, tmp_path, monkeypatch):
    _, labels, rows = hospital
    monkeypatch.setenv(PASSWORD_ENV, SECRET)
    size = (Path(read_manifest(pull(load_site_config(_site_config(tmp_path / "probe", orthanc, labels))
                                    .datasets["cxr"].pacs).manifest).rows[0].path)).stat().st_size  # fmt: skip
    capped = load_site_config(
        _site_config(tmp_path, orthanc, labels, max_cache_mb=size * 3.5 / 1e6)
    ).datasets["cxr"]
    with pytest.raises(PacsError, match=r"max_cache_mb .* with 3 of 20 instances cached"):
        pull(capped.pacs)
    roomy = load_site_config(_site_config(tmp_path, orthanc, labels, max_cache_mb=100)).datasets["cxr"]
    resumed = pull(roomy.pacs)
    assert (resumed.fetched, resumed.reused) == (len(rows) - 3, 3)


def test_wrong_password_is_one_clear_line(orthanc, hospital, tmp_path, monkeypatch):
    _, labels, _ = hospital
    monkeypatch.setenv(PASSWORD_ENV, "not-the-password")
    config = load_site_config(_site_config(tmp_path, orthanc, labels))
    with pytest.raises(PacsError, match=r"dicom-web: the PACS refused the credentials \(HTTP 401\); check pacs.username"
                                        rf" and the password in environment variable {PASSWORD_ENV}") as err:  # fmt: skip
        pull(config.datasets["cxr"].pacs)
    assert "not-the-password" not in str(err.value) and "\n" not in str(err.value)
    # medsilo site check reports it as the dataset's failing row
    [(row, status, detail)] = check_dataset("cxr", config.datasets["cxr"], config, progress=False)
    assert (row, status) == ("dataset cxr", "fail") and "HTTP 401" in detail
    monkeypatch.delenv(PASSWORD_ENV)
    with pytest.raises(
        PacsError, match=rf"pacs.password_env: environment variable {PASSWORD_ENV} is not set"
    ):
        pull(config.datasets["cxr"].pacs)


def test_unreachable_pacs_is_one_clear_line(hospital, tmp_path, monkeypatch):
    _, labels, _ = hospital
    monkeypatch.setenv(PASSWORD_ENV, SECRET)
    url = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    source = load_site_config(_site_config(tmp_path, url, labels)).datasets["cxr"].pacs
    with pytest.raises(PacsError, match=rf"^{url}/dicom-web: cannot connect to the PACS .*check pacs.url"):
        pull(source)


def test_missing_instance_names_the_label_csv_line(orthanc, hospital, tmp_path, monkeypatch):
    _, labels, rows = hospital
    monkeypatch.setenv(PASSWORD_ENV, SECRET)
    bad = _write_labels(
        tmp_path / "labels.csv", [rows[0][:6], [rows[1][0], rows[1][1], "1.2.3.4.5", "normal", "P9", "train"]]
    )
    source = load_site_config(_site_config(tmp_path, orthanc, bad)).datasets["cxr"].pacs
    with pytest.raises(
        PacsError, match=rf"labels.csv: line 3: {orthanc}/dicom-web has no such instance \(HTTP 404\)"
    ):
        pull(source)
    study_only = _write_labels(tmp_path / "study.csv", [["1.2.3.4.6", "", "", "normal", "P9", "train"]])
    source = load_site_config(_site_config(tmp_path, orthanc, study_only)).datasets["cxr"].pacs
    with pytest.raises(PacsError, match=r"study.csv: line 2: .* has no instance matching this row"):
        pull(source)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("sop_uid,label\n1.2.3,normal\n", r"line 1: no study_uid column"),
        ("study_uid,path,label\n1.2,a.dcm,normal\n", r"line 1: column path: a label CSV names instances by UID"),
        ("study_uid,sop_uid,label\n1.2,../../etc/passwd,normal\n", r"line 2: column sop_uid: not a DICOM UID"),
        ("study_uid,sop_uid,label\n,1.2.3,normal\n", r"line 2: column study_uid: empty"),
        ("study_uid,series_uid,sop_uid,label\n1.2,1.3,1.4,normal\n1.2,1.3,1.4,pneumonia\n",
         r"line 3: names an instance that line 2 names already"),
        ("study_uid,label\n", r"no rows"),
    ],
)  # fmt: skip
def test_label_csv_errors_name_the_line_and_column(tmp_path, text, message):
    (tmp_path / "labels.csv").write_text(text)
    source = load_site_config(_site_config(tmp_path, "http://127.0.0.1:1", tmp_path / "labels.csv")).datasets[
        "cxr"
    ]
    with pytest.raises(PacsError, match=message):  # refused before anything is asked of the PACS
        resolve(None, read_labels(source.pacs.labels)[1], source.pacs, call=None)


@pytest.mark.parametrize(
    ("pacs", "message"),
    [
        ({"password": "x"}, r"datasets.cxr.pacs: password: never write the password in the config"),
        ({"url": "http://u:pw@h/dicom-web"}, r"datasets.cxr.pacs: url: holds a user or password"),
        ({"password_env": None}, r"datasets.cxr.pacs: username is set but no password"),
        ({"password_file": "pw.txt"}, r"give password_env or password_file, not both"),
        ({"max_cache_mb": 0}, r"datasets.cxr.pacs.max_cache_mb: must be greater than 0"),
    ],
)
def test_site_config_refuses_bad_pacs_settings(tmp_path, pacs, message):
    path = _site_config(tmp_path, "http://127.0.0.1:1", tmp_path / "l.csv", **pacs)
    with pytest.raises(ConfigError, match=message) as err:
        load_site_config(path)
    assert "pw@" not in str(err.value)


def test_password_file_must_be_private(tmp_path):
    secret = tmp_path / "pacs.pw"
    secret.write_text(f"{SECRET}\n")
    secret.chmod(0o644)
    source = load_site_config(_site_config(tmp_path, "http://127.0.0.1:1", tmp_path / "l.csv", password_env=None,
                                           password_file=str(secret))).datasets["cxr"].pacs  # fmt: skip
    with pytest.raises(PacsError, match=r"pacs.password_file: .*pacs.pw must be owned by this user and readable by it "
                                        r"alone \(mode 0644\); run chmod 600"):  # fmt: skip
        password(source)
    secret.chmod(0o600)
    assert password(source) == SECRET


def test_simulator_job_with_one_site_in_the_pacs(orthanc, hospital, tmp_path, monkeypatch):
    sites_yml, labels, _ = hospital
    monkeypatch.setenv(PASSWORD_ENV, SECRET)
    sites = yaml.safe_load(sites_yml.read_text())["sites"]
    sites["hospital-1"]["manifest"] = str(sites_yml.parent / sites["hospital-1"]["manifest"])
    sites["hospital-2"] = {"dataset": "cxr", "modality": "cxr", "pacs": {
        "url": f"{orthanc}/dicom-web", "labels": str(labels), "username": USER, "password_env": PASSWORD_ENV}}  # fmt: skip
    mixed = tmp_path / "sites.yml"
    mixed.write_text(yaml.safe_dump({"sites": sites}))
    spec = JobSpec(name="t-pacs", modality="cxr", classes=["normal", "pneumonia"], dataset="cxr", image_size=16,
                   model="cnn", feature_dim=8, algorithm={"name": "fedavg", "params": {}},
                   training={"rounds": 2, "local_epochs": 1, "batch_size": 8, "lr": 0.01})  # fmt: skip
    results = run_simulation(spec, mixed, tmp_path / "run", progress=False)
    assert results["sites"] == ["hospital-1", "hospital-2"] and [r["round"] for r in results["rounds"]] == [
        1,
        2,
    ]
    assert all(0 <= r["metrics"]["hospital-2"]["val_acc"] <= 1 for r in results["rounds"])
    # hospital-2 read its images from the PACS: they sit in its cache, beside the sites.yml that names the PACS
    cached = list((tmp_path / "data_cache").glob(f"pacs_labels-*/{INSTANCES}/*.dcm"))
    assert len(cached) == 20
