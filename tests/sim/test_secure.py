"""Privacy mode ``ckks`` in the real NVFlare simulator: encrypted FedProto, and an aggregate release."""

from __future__ import annotations

import json

import pytest

from medsilo.config import JobSpec
from medsilo.errors import MedsiloError
from medsilo.jobs.simulate import run_simulation
from medsilo.medical.synth import SynthRequest, synthesize

MODELS = {"hospital-1": "cnn", "hospital-2": "resnet10-lite", "hospital-3": "cnn"}


@pytest.fixture(scope="module")
def sites_yml(tmp_path_factory):
    out = tmp_path_factory.mktemp("hospitals") / "cxr"
    return synthesize(out, SynthRequest("cxr", sites=3, images_per_site=24, seed=4), workers=1, progress=False)


def _spec(algorithm: str, mode: str, min_contributors: int = 2, **params) -> JobSpec:
    return JobSpec(name=f"t-{algorithm}-{mode}", modality="cxr", classes=["normal", "pneumonia"], dataset="cxr",
                   image_size=16, model=MODELS, feature_dim=8, algorithm={"name": algorithm, "params": params},
                   training={"rounds": 2, "local_epochs": 1, "batch_size": 8, "lr": 0.01},
                   privacy={"mode": mode, "min_contributors": min_contributors})  # fmt: skip


def test_ckks_fedproto_gives_the_plaintext_results(sites_yml, tmp_path):
    plain = run_simulation(_spec("fedproto", "none"), sites_yml, tmp_path / "none", progress=False)
    secret = run_simulation(_spec("fedproto", "ckks"), sites_yml, tmp_path / "ckks", progress=False)
    assert secret["privacy"]["mode"] == "ckks"
    for a, b in zip(plain["rounds"], secret["rounds"]):
        for site in MODELS:
            # same predictions at every site and round; the loss may differ in the last float digits
            assert a["metrics"][site]["test_acc"] == b["metrics"][site]["test_acc"]
            assert a["metrics"][site]["test_auroc"] == pytest.approx(b["metrics"][site]["test_auroc"], abs=1e-6)
            assert a["metrics"][site]["train_loss"] == pytest.approx(b["metrics"][site]["train_loss"], abs=1e-5)
        # ciphertexts: ~230 KB per site and direction instead of 2 x (K x d + K) floats
        assert b["bytes_up"] > 100 * a["bytes_up"]
    assert secret["rounds"][1]["bytes_down"] > 100 * plain["rounds"][1]["bytes_down"]
    # the server never saw a plaintext upload: every site encrypted every round
    for site in MODELS:
        log = (tmp_path / "ckks" / "workspace" / site / "log.txt").read_text()
        assert log.count("CKKSEncryptor") >= 2 and "encrypted" in log


def test_aggregate_release_runs_and_is_refused_below_min_contributors(sites_yml, tmp_path):
    # FedTGP (aggregate form) learns on the server: under ckks a site releases the sum each round
    results = run_simulation(_spec("fedtgp", "ckks", 3, form="aggregate"), sites_yml, tmp_path / "ok", progress=False)
    assert [r["round"] for r in results["rounds"]] == [1, 2]
    records = [json.loads(line) for site in MODELS
               for line in _lines(tmp_path / "ok" / "workspace" / site / "medsilo_releases.jsonl")]  # fmt: skip
    assert sorted(r["tag"] for r in records) == ["simulate_job/round-1", "simulate_job/round-2"]
    assert {r["site"] for r in records} == {"hospital-1", "hospital-2"}  # the releasing site rotates
    assert all(r["contributors"] == 3 and r["min_contributors"] == 3 for r in records)
    # four signed contributors required, three sites exist: the releasing site refuses, the job stops
    with pytest.raises(MedsiloError, match=r"stopped: site hospital-1: .*3 contributors, need ≥ 4"):
        run_simulation(_spec("fedtgp", "ckks", 4, form="aggregate"), sites_yml, tmp_path / "few", progress=False)
    assert not (tmp_path / "few" / "results.json").exists()


def _lines(path):
    return path.read_text().splitlines() if path.is_file() else []
