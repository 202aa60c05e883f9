"""Jobs in the real NVFlare simulator: tiny images, few rounds, results.json checked.

Each simulator run starts real NVFlare server and site processes (~30 s on 2 cores), so this file
keeps its runs few and tiny.
"""

from __future__ import annotations

import json

import pytest

from medsilo.cli import main
from medsilo.config import JobSpec, load_sites_file
from medsilo.errors import MedsiloError
from medsilo.jobs.simulate import run_simulation
from medsilo.medical.synth import SynthRequest, synthesize
from medsilo.secure.ledger import LEDGER_FILE, entries
from tests.helpers import check_exported_models


@pytest.fixture(scope="module")
def sites_yml(tmp_path_factory):
    out = tmp_path_factory.mktemp("hospitals") / "cxr"
    return synthesize(out, SynthRequest("cxr", sites=3, images_per_site=24, seed=2), workers=1, progress=False)


def _spec(algorithm: str, **params) -> JobSpec:
    return JobSpec(name=f"t-{algorithm}", modality="cxr", classes=["normal", "pneumonia"], dataset="cxr",
                   image_size=16, model="cnn", feature_dim=8, algorithm={"name": algorithm, "params": params},
                   training={"rounds": 2, "local_epochs": 1, "batch_size": 8, "lr": 0.01})  # fmt: skip


def _check(results: dict, algorithm: str, sites: list[str], shares_weights: bool, models: dict | None = None) -> None:
    assert results["algorithm"] == algorithm and results["sites"] == sites
    assert results["models"] == (models or {s: "cnn" for s in sites})
    assert [r["round"] for r in results["rounds"]] == [1, 2]
    mean_val = {r["round"]: sum(r["metrics"][s]["val_acc"] for s in sites) / len(sites) for r in results["rounds"]}
    assert results["selected_round"] == max(mean_val, key=lambda k: (mean_val[k], -k))
    for r in results["rounds"]:
        assert set(r["metrics"]) == set(sites) and r["seconds"] > 0
        for m in r["metrics"].values():
            assert 0 <= m["val_acc"] <= 1 and 0 <= m["test_acc"] <= 1 and m["train_loss"] > 0
            assert m["test_auroc"] is None or 0 <= m["test_auroc"] <= 1
    if shares_weights:
        assert all(r["bytes_up"] > 0 for r in results["rounds"])
        assert results["rounds"][0]["bytes_down"] == 0 < results["rounds"][1]["bytes_down"]
    final = results["final"]
    assert set(final["per_site"]) == set(sites)
    assert min(final["per_site"][s]["test_acc"] for s in sites) == final["worst_acc"] <= final["mean_acc"]
    assert 0 <= final["pooled_acc"] <= 1
    assert results["privacy"]["mode"] == "none"


def test_fedavg_through_the_cli(sites_yml, tmp_path, capsys):
    spec_file = tmp_path / "job.yml"
    spec_file.write_text(json.dumps(_spec("fedavg").model_dump(mode="json")))  # JSON is valid YAML
    run_dir = tmp_path / "run"
    assert main(["sim", str(spec_file), "--data", str(sites_yml), "--out", str(run_dir), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "hospital-3" in out and "round chosen" in out
    results = json.loads((run_dir / "results.json").read_text())
    _check(results, "fedavg", ["hospital-1", "hospital-2", "hospital-3"], shares_weights=True)
    assert (run_dir / "job" / "t-fedavg" / "meta.json").is_file()


def test_personalized_method(sites_yml, tmp_path):
    results = run_simulation(_spec("fedrep"), sites_yml, tmp_path / "run", progress=False)
    _check(results, "fedrep", ["hospital-1", "hospital-2", "hospital-3"], shares_weights=True)
    check_exported_models(results, tmp_path / "run" / "models", sites_yml)  # a weight-sharing pFL method


def test_heterogeneous_backbones_with_per_site_server_form(sites_yml, tmp_path):
    # three architectures, FedTGP as published: the server trains on each site's prototypes
    models = {"hospital-1": "cnn", "hospital-2": "resnet10-lite", "hospital-3": "densenet-lite"}
    spec = _spec("fedtgp", form="published").model_copy(update={"model": models})
    results = run_simulation(spec, sites_yml, tmp_path / "run", progress=False)
    _check(results, "fedtgp", list(models), shares_weights=True, models=models)
    assert results["algorithm_form"] == "per-site"
    # K x d prototype sums and K counts up, in signed wires whose bytes each site's ledger records;
    # K x d generated prototypes down (float32)
    ledgers = sites_yml.parent / "ledgers"
    sent = [e for s in models for e in entries(ledgers / s / LEDGER_FILE)
            if e["event"] == "release" and e["what"]["kind"] == "upload" and e["job"] == results["job_id"] and e["round"] == 1]  # fmt: skip
    assert [e["what"]["plaintext_bytes"] for e in sent] == [(2 * 8 + 2) * 4] * 3
    assert results["rounds"][0]["bytes_up"] == sum(e["what"]["bytes"] for e in sent)
    assert results["rounds"][1]["bytes_down"] == 3 * 2 * 8 * 4
    check_exported_models(results, tmp_path / "run" / "models", sites_yml)  # prototypes as the classifier


def test_a_failing_site_stops_the_job_with_its_reason(sites_yml, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(sites_yml.parent, data)
    sites = load_sites_file(data / "sites.yml")
    broken = sorted((data / "hospital-2" / "images").glob("*.dcm"))[:6]
    for path in broken:
        path.write_bytes(b"not a dicom file")
    with pytest.raises(MedsiloError, match=r"stopped: site hospital-2: .*6 of 24 images \(25%\) could not be used"):
        run_simulation(_spec("fedavg"), data / "sites.yml", tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "results.json").exists()
    assert len(sites.sites) == 3


def test_preflight_refuses_before_anything_starts(sites_yml, tmp_path):
    spec = _spec("fedavg").model_copy(update={"dataset": "chest"})
    with pytest.raises(MedsiloError, match="asks for dataset 'chest', which this site does not define"):
        run_simulation(spec, sites_yml, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
    hetero = _spec("fedavg").model_copy(update={"model": {"hospital-1": "cnn"}})
    with pytest.raises(MedsiloError, match=r"missing \['hospital-2', 'hospital-3'\]"):
        run_simulation(hetero, sites_yml, tmp_path / "run2", progress=False)


def test_real_images_in_the_generic_modality_with_the_jobs_augmentation(tmp_path):
    """scikit-learn's digits as three label-skewed sites (PNG, modality ``image``), FedDistill, no augmentation:
    results.json says which augmentation ran and carries each site's counts beside both means; each site's
    exported model runs with torch alone and its metadata reads as a MONAI bundle's."""
    import csv

    from medsilo.medical.synth.digits import CLASSES, DigitsRequest, write_digit_sites

    sites_yml = write_digit_sites(tmp_path / "digits", DigitsRequest(sites=3, alpha=0.5, size=16, seed=1))
    spec = JobSpec(name="t-digits", modality="image", classes=[int(c) for c in CLASSES], dataset="digits",
                   image_size=16, model="cnn", feature_dim=8, algorithm={"name": "feddistill"},
                   training={"rounds": 2, "batch_size": 16, "augmentation": "none"})  # fmt: skip
    results = run_simulation(spec, sites_yml, tmp_path / "run", progress=False)
    assert results["augmentation"] == {"choice": "none", "steps": []}
    tests = {}
    for site in results["sites"]:
        with (tmp_path / "digits" / site / "manifest.csv").open() as fh:
            tests[site] = sum(row["split"] == "test" for row in csv.DictReader(fh))
    for r in results["rounds"]:
        assert {s: m["n_test"] for s, m in r["metrics"].items()} == tests
        correct = sum(m["test_acc"] * m["n_test"] for m in r["metrics"].values())
        assert r["pooled_test_acc"] == pytest.approx(correct / sum(tests.values()))
        assert r["mean_test_acc"] == pytest.approx(sum(m["test_acc"] for m in r["metrics"].values()) / 3)
    assert results["final"]["mean_acc"] > 0.3  # ten classes: well above chance after two rounds
    folders = check_exported_models(results, tmp_path / "run" / "models", sites_yml)
    # every round's figures as TensorBoard scalars, step = round
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(tmp_path / "run" / "tb"))
    board.Reload()
    pooled = [(e.step, e.value) for e in board.Scalars("pooled/test_acc")]
    assert pooled == [(r["round"], pytest.approx(r["pooled_test_acc"])) for r in results["rounds"]]
    assert {"site-1/val_acc", "round/bytes_up", "mean/val_acc"} <= set(board.Tags()["scalars"])

    from monai.bundle import ConfigParser

    bundle = ConfigParser()
    bundle.read_meta(folders["site-1"] / "configs" / "metadata.json")
    bundle.read_config(folders["site-1"] / "configs" / "inference.json")
    assert bundle.get("_meta_#medsilo#round") == results["selected_round"]
    assert bundle.get("_meta_#network_data_format#inputs#image#num_channels") == 1
    assert bundle.get_parsed_content("preprocessing#transforms#2#b_max") == 2.0
    # the TorchScript file needs torch only: a fresh interpreter that never imports medsilo runs it
    probe = ("import sys, torch; m = torch.jit.load(sys.argv[1]); p = m(torch.zeros(2, 1, 16, 16)); "
             "assert p.shape == (2, 10) and abs(float(p.sum()) - 2) < 1e-4; "
             "assert not [k for k in sys.modules if k.startswith('medsilo')]")  # fmt: skip
    import subprocess
    import sys

    subprocess.run([sys.executable, "-c", probe, str(folders["site-1"] / "models" / "model.ts")], check=True,
                   cwd=tmp_path)  # fmt: skip


def test_an_interrupted_run_stops_the_simulator_and_leaves_no_temporary_folder(sites_yml, tmp_path, monkeypatch):
    # Ctrl-C while following the simulator: the launcher is stopped and its TMPDIR (job zips, sockets) removed
    from medsilo.jobs import simulate

    scratch = tmp_path / "tmpdir"
    scratch.mkdir()
    started = []

    def interrupted(proc, *args, **kwargs):
        started.append(proc)
        raise KeyboardInterrupt

    monkeypatch.setattr(simulate, "_short_tmpdir", lambda: scratch)
    monkeypatch.setattr(simulate, "_follow", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_simulation(_spec("fedavg"), sites_yml, tmp_path / "run", progress=False)
    assert started and started[0].poll() is not None  # the simulator's launcher was stopped
    assert not scratch.exists()
