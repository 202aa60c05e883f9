"""Privacy modes in the real NVFlare simulator: encrypted FedProto, an aggregate release, DP budgets."""

from __future__ import annotations

import shutil

import pytest
import yaml

from medsilo.config import JobSpec
from medsilo.errors import MedsiloError
from medsilo.jobs.simulate import run_simulation
from medsilo.medical.synth import SynthRequest, synthesize
from medsilo.secure.ledger import LEDGER_FILE, entries, verify

MODELS = {"hospital-1": "cnn", "hospital-2": "resnet10-lite", "hospital-3": "cnn"}


@pytest.fixture(scope="module")
def sites_yml(tmp_path_factory):
    out = tmp_path_factory.mktemp("hospitals") / "cxr"
    return synthesize(out, SynthRequest("cxr", sites=3, images_per_site=24, seed=4), workers=1, progress=False)


def _spec(algorithm: str, mode: str, min_contributors: int = 2, dp: dict | None = None, models=MODELS,
          **params) -> JobSpec:  # fmt: skip
    privacy = {"mode": mode, "min_contributors": min_contributors} | ({"dp": dp} if dp else {})
    return JobSpec(name=f"t-{algorithm}-{mode.replace('+', '-')}", modality="cxr", classes=["normal", "pneumonia"], dataset="cxr",
                   image_size=16, model=models, feature_dim=8, algorithm={"name": algorithm, "params": params},
                   training={"rounds": 2, "local_epochs": 1, "batch_size": 8, "lr": 0.01},
                   privacy=privacy)  # fmt: skip


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
    # the server never saw a plaintext upload: every site encrypted every round, and the server recorded each
    ledgers = sites_yml.parent / "ledgers"
    for site in MODELS:
        sent = [e for e in entries(ledgers / site / LEDGER_FILE) if e["job"] == secret["job_id"] and e["event"] == "release" and e["what"]["kind"] == "upload"]
        assert [e["round"] for e in sent] == [1, 2] and all(e["what"]["encrypted"] for e in sent)
    received = [e for e in entries(ledgers / "server" / LEDGER_FILE) if e["job"] == secret["job_id"] and e["event"] == "received"]
    assert sorted((e["round"], e["what"]["site"]) for e in received) == [(r, s) for r in (1, 2) for s in sorted(MODELS)]
    assert all(e["what"]["statement"]["body"] == "ckks" for e in received)


def test_ckks_fedavg_gives_the_plaintext_predictions(sites_yml, tmp_path):
    # FedAvg sends every weight: 15 ciphertexts per upload for this cnn, summed by the sites themselves; the CKKS
    # sum's ~1e-7 relative error must not change a prediction (BENCHMARKS "What CKKS secure aggregation costs")
    plain = run_simulation(_spec("fedavg", "none", models="cnn"), sites_yml, tmp_path / "none", progress=False)
    secret = run_simulation(_spec("fedavg", "ckks", models="cnn"), sites_yml, tmp_path / "ckks", progress=False)
    assert secret["privacy"]["mode"] == "ckks"
    assert len(plain["rounds"]) == len(secret["rounds"]) == 2
    for a, b in zip(plain["rounds"], secret["rounds"]):
        for site in MODELS:
            assert a["metrics"][site]["test_acc"] == b["metrics"][site]["test_acc"]
            assert a["metrics"][site]["test_auroc"] == pytest.approx(b["metrics"][site]["test_auroc"], abs=1e-6)
        assert b["bytes_up"] > 10 * a["bytes_up"]  # the weights did travel as ciphertexts


def test_aggregate_release_runs_and_is_refused_below_min_contributors(sites_yml, tmp_path):
    # FedTGP (aggregate form) learns on the server: under ckks a site releases the sum each round
    results = run_simulation(_spec("fedtgp", "ckks", 3, form="aggregate"), sites_yml, tmp_path / "ok", progress=False)
    assert [r["round"] for r in results["rounds"]] == [1, 2]
    ledgers = sites_yml.parent / "ledgers"
    job = results["job_id"]
    records = [e for site in MODELS for e in entries(ledgers / site / LEDGER_FILE)
               if e["event"] == "aggregate_release" and e["job"] == job]  # fmt: skip
    assert sorted((r["round"], r["party"]) for r in records) == [(1, "hospital-1"), (2, "hospital-2")]  # rotates
    assert all(r["what"]["participants"] == sorted(MODELS) for r in records)
    assert all(r["what"]["contributors"] == 3 and r["what"]["min_contributors"] == 3 for r in records)
    # the server's own ledger shows what it sent: the release requests (ciphertexts) and the payloads
    server = [e for e in entries(ledgers / "server" / LEDGER_FILE) if e["job"] == job]
    requests = [e for e in server if e["what"]["kind"] == "release_request"]
    assert [(e["round"], e["what"]["to"]) for e in requests[-2:]] == [(1, ["hospital-1"]), (2, ["hospital-2"])]
    assert any(e["what"]["kind"] == "payload" and not e["what"]["encrypted"] for e in server)
    assert [e["what"]["site"] for e in server if e["event"] == "received" and e["what"]["kind"] == "aggregate"] == [
        "hospital-1", "hospital-2"]  # fmt: skip
    assert verify([ledgers / s / LEDGER_FILE for s in [*MODELS, "server"]], root_ca=ledgers / "pki" / "rootCA.pem") == []
    # four contributors required, three sites exist: every site refuses to upload into so small a round
    with pytest.raises(MedsiloError, match=r"stopped: site hospital-\d: round 1 has 3 participants, fewer than this "
                                           r"site's min_contributors 4"):  # fmt: skip
        run_simulation(_spec("fedtgp", "ckks", 4, form="aggregate"), sites_yml, tmp_path / "few", progress=False)
    assert not (tmp_path / "few" / "results.json").exists()


def test_dp_job_spends_budget_and_a_capped_site_refuses_the_next_one(sites_yml, tmp_path):
    # a copy of the hospitals where hospital-2 caps its budget at ε = 6 (δ = 1e-5)
    data = tmp_path / "data"
    shutil.copytree(sites_yml.parent, data, ignore=shutil.ignore_patterns("ledgers"))
    sites = yaml.safe_load((data / "sites.yml").read_text())
    sites["sites"]["hospital-2"]["privacy"] = {"budget": {"epsilon": 6.0, "delta": 1e-5}}
    (data / "sites.yml").write_text(yaml.safe_dump(sites))
    spec = _spec("fedproto", "dp", dp={"noise_multiplier": 2.0, "clip": 1.0})
    first = run_simulation(spec, data / "sites.yml", tmp_path / "first", progress=False)
    spent = first["privacy_spent"]
    assert set(spent) == set(MODELS) and all(3.5 < s["epsilon"] < 6 and s["delta"] == 1e-5 for s in spent.values())
    ledger = data / "ledgers" / "hospital-2" / LEDGER_FILE
    releases = [e for e in entries(ledger) if e["event"] == "release" and e["what"]["kind"] == "upload"]
    assert [e["round"] for e in releases] == [1, 2] and releases[-1]["privacy"]["job_epsilon"] == pytest.approx(
        spent["hospital-2"]["epsilon"])
    # a round is DP-SGD (σ_sgd = σ = 2, ~14 images in batches of 8) plus the release: 2 rounds cost ε ≈ 4.5;
    # a second identical job would take hospital-2 past ε = 6: it refuses at round 1, the others go on
    second = run_simulation(spec, data / "sites.yml", tmp_path / "second", progress=False)
    assert second["sites"] == ["hospital-1", "hospital-3"]
    assert "hospital-2" in second["refused"] and "ε" in second["refused"]["hospital-2"]
    after = entries(ledger)
    assert after[-1]["event"] == "refusal" and len([e for e in after if e["event"] == "release" and e["what"]["kind"] == "upload"]) == 2
    assert verify([data / "ledgers" / s / LEDGER_FILE for s in MODELS],
                  root_ca=data / "ledgers" / "pki" / "rootCA.pem") == []  # fmt: skip


def test_fedavg_dp_sgd_form_charges_the_dp_sgd_steps_of_each_site(sites_yml, tmp_path):
    from medsilo.config import read_manifest
    from medsilo.config.site import load_sites_file
    from medsilo.secure.dp import GaussianEvent, PrivacyAccountant, poisson_schedule

    spec = _spec("fedavg", "dp", dp={"noise_multiplier": 50.0, "clip": 1.0, "sgd_noise_multiplier": 1.5},
                 models="cnn", dp_form="dp-sgd")  # fmt: skip
    results = run_simulation(spec, sites_yml, tmp_path / "run", progress=False)
    ledgers = sites_yml.parent / "ledgers"
    for site, entry in load_sites_file(sites_yml).sites.items():
        steps, rate = poisson_schedule(len(read_manifest(entry.manifest).split("train")), 8, 1)
        job = [e for e in entries(ledgers / site / LEDGER_FILE) if e["job"] == results["job_id"]]
        releases = [e for e in job if e["event"] == "release" and e["what"]["kind"] == "upload"]
        assert [e["round"] for e in releases] == [1, 2]
        # one DP-SGD event a round, at σ_sgd and this site's own (T, q); the release's σ = 50 is not used
        assert all(e["privacy"]["events"] == [GaussianEvent(1.5, steps=steps, sampling_rate=rate).to_json()]
                   for e in releases)  # fmt: skip
        expected = PrivacyAccountant(delta=1e-5).cost(*[GaussianEvent(1.5, steps=steps, sampling_rate=rate)] * 2)[1]
        assert results["privacy_spent"][site]["epsilon"] == pytest.approx(expected)
        assert releases[-1]["privacy"]["job_epsilon"] == pytest.approx(expected)


def test_ckks_plus_dp_noises_before_encrypting_and_records_both(sites_yml, tmp_path):
    spec = _spec("fedproto", "ckks+dp", dp={"noise_multiplier": 3.0, "clip": 1.0})
    results = run_simulation(spec, sites_yml, tmp_path / "run", progress=False)
    assert set(results["privacy_spent"]) == set(MODELS)
    ledgers = sites_yml.parent / "ledgers"
    for site in MODELS:
        job = [e for e in entries(ledgers / site / LEDGER_FILE) if e["job"] == results["job_id"]]
        assert [e["event"] for e in job][:1] == ["policy_loaded"]
        releases = [e for e in job if e["event"] == "release" and e["privacy"] is not None
                    and any(ev["noise_multiplier"] == 3.0 for ev in e["privacy"]["events"])]  # fmt: skip
        assert [e["round"] for e in releases] == [1, 2]
        # what left is the ciphertext (its digest and size), and it cost ε
        assert all(e["what"]["encrypted"] and e["what"]["bytes"] > 100 * e["what"]["plaintext_bytes"]
                   for e in releases)  # fmt: skip
        assert releases[-1]["privacy"]["job_epsilon"] == pytest.approx(results["privacy_spent"][site]["epsilon"])
        assert any(e["event"] == "decrypt" for e in job)


def test_pcevolve_augments_a_site_before_training_and_charges_its_ledger(sites_yml, tmp_path):
    pcevolve = {"sites": ["hospital-3"], "epsilon": 4.0, "images_per_class": 4, "iterations": 2}
    spec = JobSpec.model_validate({**_spec("fedproto", "none").model_dump(), "augmentation": {"pcevolve": pcevolve}})
    results = run_simulation(spec, sites_yml, tmp_path / "run", progress=False)
    assert results["synthetic"] == {"hospital-3": {"images": 8, "epsilon": 4.0, "encoder": "pretrained", "utility": "vote",
                                                   "kept_iteration": 2}}  # fmt: skip
    ledger = entries(sites_yml.parent / "ledgers" / "hospital-3" / LEDGER_FILE)
    charged = [e for e in ledger if e["event"] == "synthetic_release" and e["job"] == results["job_id"]]
    assert [e["round"] for e in charged][-2:] == [1, 2]
    # vote utility: 8 picks per iteration at ε 4/(T·k) = 0.25 each, the two classes composed in parallel
    assert charged[-1]["privacy"]["pure_epsilon"] == pytest.approx(2.0)
    assert charged[-1]["what"]["encoder"] == "pretrained" and charged[-1]["what"]["utility"] == "vote"
    # the synthetic images stay at the site, marked in a manifest beside its workspace
    kept = tmp_path / "run" / "workspace" / "hospital-3" / "pcevolve" / results["job_id"] / "manifest.csv"
    assert kept.read_text().count(",pcevolve") == 8
    log = (tmp_path / "run" / "workspace" / "hospital-3" / "log.txt").read_text()
    assert "PCEvolve added 8 synthetic training images" in log
