"""Multi-label chest X-ray jobs in the real NVFlare simulator (issue 17): FedAvg and a personalized method (FedPer)
on synthetic hospitals with co-occurring findings and blank (unknown) training labels; 16 px, 2 rounds."""

from __future__ import annotations

import csv
import json

import pytest

from medsilo.cli import main
from medsilo.config import JobSpec
from medsilo.jobs.simulate import run_simulation
from medsilo.medical.synth import SynthRequest, synthesize
from medsilo.medical.synth.multilabel import ML_FINDINGS

LABELS = list(ML_FINDINGS)


@pytest.fixture(scope="module")
def sites_yml(tmp_path_factory):
    out = tmp_path_factory.mktemp("hospitals") / "cxr-ml"
    return synthesize(out, SynthRequest("cxr", sites=2, images_per_site=40, seed=5, multilabel=True), workers=1,
                      progress=False)  # fmt: skip


def _spec(algorithm: str) -> JobSpec:
    return JobSpec(name=f"t-ml-{algorithm}", modality="cxr", task="multilabel", labels=LABELS, dataset="cxr",
                   image_size=16, model="cnn", feature_dim=8, algorithm={"name": algorithm},
                   training={"rounds": 2, "local_epochs": 1, "batch_size": 8, "lr": 0.01})  # fmt: skip


@pytest.mark.parametrize("algorithm", ["fedavg", "fedper"])
def test_multilabel_job_writes_per_label_auroc_and_selects_on_macro_auroc(sites_yml, tmp_path, algorithm):
    results = run_simulation(_spec(algorithm), sites_yml, tmp_path / "run", progress=False)
    sites = ["hospital-1", "hospital-2"]
    assert (results["task"], results["selected_on"], results["sites"]) == (
        "multilabel",
        "val_macro_auroc",
        sites,
    )
    macro = {}
    for r in results["rounds"]:
        for s in sites:
            m = r["metrics"][s]
            assert set(m["test_auroc_per_label"]) == set(LABELS) == set(m["thresholds"])
            assert all(v is None or 0 <= v <= 1 for v in m["test_auroc_per_label"].values())
        macro[r["round"]] = r["mean_val_macro_auroc"]
    assert results["selected_round"] == max(macro, key=lambda k: (macro[k], -k))
    final = results["final"]
    assert final["labels"] == LABELS and 0 <= final["mean_macro_auroc"] <= 1
    for s in sites:
        per_site = final["per_site"][s]
        assert set(per_site["test_auroc_per_label"]) == set(LABELS)
        assert per_site["test_macro_auroc"] == pytest.approx(
            sum(v for v in per_site["test_auroc_per_label"].values() if v is not None)
            / sum(v is not None for v in per_site["test_auroc_per_label"].values()))  # fmt: skip
    # each site's exported model: the card lists the labels and thresholds, and predict on its test split
    # reproduces the thresholded labels and the macro-AUROC results.json reports
    site = sites[0]
    folder = tmp_path / "run" / "models" / site
    meta = json.loads((folder / "configs" / "metadata.json").read_text())["medsilo"]
    assert meta["labels"] == LABELS and meta["round"] == results["selected_round"]
    assert meta["thresholds"] == pytest.approx(final["per_site"][site]["thresholds"])
    manifest = sites_yml.parent / site / "manifest.csv"
    out = tmp_path / "pred.csv"
    assert main(["predict", "--model", str(folder), "--manifest", str(manifest), "--split", "test",
                 "--out", str(out), "--quiet"]) == 0  # fmt: skip
    with out.open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == results["rounds"][0]["metrics"][site]["n_test"]
    assert all(r[f"pred_{c}"] in ("0", "1") and r[f"true_{c}"] in ("0", "1") for r in rows for c in LABELS)
    assert main(["report", str(tmp_path / "run"), "--out", str(tmp_path / "r.html")]) == 0
    assert "Multi-label: AUROC per label" in (tmp_path / "r.html").read_text()
