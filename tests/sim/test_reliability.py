"""A site that fails every task: the job stops by default, and goes on without it under min_sites."""

from __future__ import annotations

import pytest

from medsilo.config import JobSpec
from medsilo.errors import MedsiloError
from medsilo.jobs.simulate import run_simulation
from medsilo.medical.synth import SynthRequest, synthesize
from medsilo.secure.ledger import LEDGER_FILE, entries


@pytest.fixture(scope="module")
def sites_yml(tmp_path_factory):
    out = tmp_path_factory.mktemp("hospitals") / "cxr"
    sites = synthesize(out, SynthRequest("cxr", sites=3, images_per_site=24, seed=6), workers=1, progress=False)
    for image in (out / "hospital-3" / "images").iterdir():  # hospital-3's disk is garbage: every task fails there
        image.write_bytes(b"not a dicom")
    return sites


def _spec(**reliability) -> JobSpec:
    return JobSpec(name="t-reliability", modality="cxr", classes=["normal", "pneumonia"], dataset="cxr", image_size=16,
                   model="cnn", feature_dim=8, algorithm={"name": "fedavg"},
                   training={"rounds": 2, "local_epochs": 1, "batch_size": 8, "lr": 0.01}, reliability=reliability)  # fmt: skip


def test_a_failing_site_stops_the_job_unless_min_sites_allows_going_on(sites_yml, tmp_path):
    with pytest.raises(MedsiloError, match=r"site hospital-3: .*could not be used"):
        run_simulation(_spec(), sites_yml, tmp_path / "strict", progress=False)
    assert not (tmp_path / "strict" / "results.json").exists()

    results = run_simulation(_spec(min_sites=2), sites_yml, tmp_path / "tolerant", progress=False)
    assert [(f["site"], f["round"], f["task"]) for f in results["failures"]] == [
        ("hospital-3", 1, "train"), ("hospital-3", 2, "train"), ("hospital-3", 3, "evaluate")]  # fmt: skip
    assert "could not be used" in results["failures"][0]["reason"]
    assert [r["round"] for r in results["rounds"]] == [1, 2]
    assert all(set(r["metrics"]) == {"hospital-1", "hospital-2"} for r in results["rounds"])  # nothing made up
    assert results["final"]["per_site"]["hospital-3"] == {"test_acc": None, "test_auroc": None}
    assert 0 <= results["final"]["mean_acc"] <= 1
    # hospital-3's ledger claims no upload: nothing ever left it
    ledger = sites_yml.parent / "ledgers" / "hospital-3" / LEDGER_FILE
    assert not any(e["event"] == "release" for e in (entries(ledger) if ledger.exists() else []))
    # below min_sites the job stops, naming the rule
    with pytest.raises(MedsiloError, match=r"only 2 site\(s\) answered task 'train' of round 1, the job needs "
                                           r"reliability.min_sites = 3"):  # fmt: skip
        run_simulation(_spec(min_sites=3), sites_yml, tmp_path / "few", progress=False)
