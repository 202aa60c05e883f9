"""Multi-label chest X-ray (issue 17 part 4): the job fields, label-column manifests, masked BCE, thresholds
chosen on validation, round selection on macro-AUROC, export/predict, the report and the synthetic findings."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch

from medsilo.cli import main
from medsilo.components.algorithms import algorithm_module
from medsilo.components.export import ExportFacts, export_model
from medsilo.components.results import RunRecorder
from medsilo.components.training import (
    choose_thresholds,
    evaluate_splits,
    multilabel_metrics,
    private_epochs,
    task_loss,
)
from medsilo.config import JobSpec, load_job_spec, read_manifest
from medsilo.config.loading import ConfigError
from medsilo.config.manifest import ManifestError, write_manifest
from medsilo.medical.models import build_model
from medsilo.medical.synth import SynthRequest, synthesize
from medsilo.medical.synth.multilabel import ML_FINDINGS, draw_findings
from medsilo.report import render_html
from medsilo.secure.ckks import decrypt, encrypt, make_context
from medsilo.secure.dp import DPRelease
from tests.helpers import multilabel_setup

LABELS = ["pneumonia", "effusion", "nodule"]


def _spec(**change) -> dict:
    return {"name": "j", "modality": "cxr", "task": "multilabel", "labels": LABELS, "dataset": "cxr",
            "algorithm": {"name": "fedavg"}, **change}  # fmt: skip


# ---- job spec ------------------------------------------------------------------------------------------------


def test_a_multilabel_spec_fills_classes_policy_and_selection():
    spec = JobSpec(**_spec())
    assert (spec.classes, spec.unknown, spec.evaluation.select_on, spec.multilabel) == (
        LABELS, "ignore", "val_macro_auroc", True)  # fmt: skip
    assert JobSpec(**_spec(classes=LABELS, unknown="negative")).unknown == "negative"
    single = JobSpec(
        name="s", modality="cxr", classes=["a", "b"], dataset="cxr", algorithm={"name": "fedavg"}
    )
    assert (single.task, single.labels, single.evaluation.select_on) == ("single", None, "val_balanced_acc")
    # what the controller and the sites re-validate from the dumped spec is the same job
    assert JobSpec(**spec.model_dump(mode="json")) == spec


@pytest.mark.parametrize(
    "change, match",
    [
        ({"labels": ["a"]}, r"labels.*at least 2"),
        ({"labels": ["Edema", "edema"]}, r"unique ignoring case.*Edema, edema"),
        ({"labels": ["split", "edema"]}, r"'split' is a manifest column name"),
        ({"labels": ["a,b", "c"]}, r"labels\.0"),
        ({"labels": None}, r"labels: a multi-label job lists its findings"),
        ({"classes": ["normal", "pneumonia"]}, r"classes: a multi-label model's outputs are its labels"),
        ({"unknown": "maybe"}, r"unknown"),
        ({"evaluation": {"select_on": "val_acc"}}, r"selects rounds on val_macro_auroc"),
        ({"task": "single", "classes": ["a", "b"]}, r"labels: only a multi-label job has labels"),
        ({"algorithm": {"name": "fedproto"}}, r"'fedproto' cannot train a multi-label model .*algorithms that can: "
                                              r"local, fedavg, fedprox, ditto, fedrep, fedper, fedala, feddbe, lgfedavg"),
        ({"augmentation": {"pcevolve": {"sites": ["h"], "epsilon": 1.0}}}, r"PCEvolve .* multi-label"),
    ],
)  # fmt: skip
def test_bad_multilabel_specs_name_the_field(tmp_path, change, match):
    file = tmp_path / "job.yml"
    file.write_text(json.dumps({k: v for k, v in _spec(**change).items() if v is not None}))
    with pytest.raises(ConfigError, match=match):
        load_job_spec(file)


def test_a_single_label_job_still_needs_its_classes():
    with pytest.raises(ValueError, match="classes: required"):
        JobSpec(name="s", modality="cxr", dataset="cxr", algorithm={"name": "fedavg"})


# ---- manifests -------------------------------------------------------------------------------------------------


def _manifest(tmp_path, text: str):
    for i in range(4):
        (tmp_path / f"{i}.dcm").write_bytes(b"x")
    (tmp_path / "m.csv").write_text(text)
    return tmp_path / "m.csv"


def test_label_columns_are_read_with_the_unknown_policy(tmp_path):
    file = _manifest(tmp_path, "path,patient_id,split,Pneumonia,effusion,nodule\n"
                               "0.dcm,p0,train,1,,0\n1.dcm,p1,val,0,1.0,-1\n2.dcm,p2,test,1,0,1\n")  # fmt: skip
    ignore = read_manifest(file, labels=LABELS)
    assert ignore.classes == tuple(LABELS) and ignore.multilabel and ignore.rows[0].label == -1
    first, second = ignore.rows[0].targets, ignore.rows[1].targets
    assert first[0] == 1.0 and math.isnan(first[1]) and first[2] == 0.0  # blank: unknown
    assert second[1] == 1.0 and math.isnan(second[2])  # CheXpert's -1 (uncertain) reads as blank
    assert read_manifest(file, labels=LABELS, unknown="negative").rows[0].targets == (1.0, 0.0, 0.0)
    assert read_manifest(file, labels=LABELS, unknown="positive").rows[0].targets == (1.0, 1.0, 0.0)
    assert ignore.counts()["test"] == {"pneumonia": 1, "effusion": 0, "nodule": 1}


@pytest.mark.parametrize(
    "text, match",
    [
        ("path,patient_id,pneumonia,effusion,nodule\n0.dcm,p0,1,yes,0\n",
         r"m\.csv: line 2: column 'effusion': 'yes' is not a label value; write 1 \(present\), 0"),
        ("path,patient_id,pneumonia,effusion\n0.dcm,p0,1,0\n", r"m\.csv: line 1: missing required column 'nodule'"),
        ("path,label,pneumonia,effusion,nodule\n0.dcm,x,1,0,0\n", r"line 1: column 'label': a multi-label job reads"),
        ("path,pneumonia,efusion,nodule,effusion\n0.dcm,1,0,0,0\n",
         r"line 1: unknown column 'efusion'; did you mean 'effusion'"),
    ],
)  # fmt: skip
def test_bad_label_columns_name_file_line_and_column(tmp_path, text, match):
    with pytest.raises(ManifestError, match=match):
        read_manifest(_manifest(tmp_path, text), labels=LABELS)


def test_multilabel_manifest_round_trip(tmp_path):
    row = {"path": "0.dcm", "patient_id": "p", "split": "train", "pneumonia": "1", "effusion": "", "nodule": "0"}  # fmt: skip
    _manifest(tmp_path, "")
    write_manifest(tmp_path / "w.csv", [row], labels=LABELS)
    header = (tmp_path / "w.csv").read_text().splitlines()[0]
    assert header == "path,patient_id,split,pneumonia,effusion,nodule"
    assert read_manifest(tmp_path / "w.csv", labels=LABELS).rows[0].targets[::2] == (1.0, 0.0)


# ---- the loss --------------------------------------------------------------------------------------------------


def test_masked_bce_ignores_unknown_entries_even_in_the_gradient():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 3, generator=g, requires_grad=True)
    targets = (torch.rand(5, 3, generator=g) < 0.5).float()
    targets[0, 1] = targets[3, 2] = targets[4, 0] = float("nan")
    task_loss(logits, targets).backward()
    unknown = torch.isnan(targets)
    assert bool((logits.grad[unknown] == 0).all()) and bool((logits.grad[~unknown] != 0).all())
    # the known entries' mean BCE, written out by hand
    p = torch.sigmoid(logits.detach())[~unknown]
    y = targets[~unknown]
    by_hand = -(y * p.log() + (1 - y) * (1 - p).log()).mean()
    torch.testing.assert_close(task_loss(logits.detach(), targets), by_hand)
    # changing an unknown entry's logit changes nothing
    moved = logits.detach().clone()
    moved[0, 1] += 5.0
    torch.testing.assert_close(task_loss(moved, targets), by_hand)
    # class indices still give cross-entropy
    labels = torch.tensor([0, 2, 1, 1, 0])
    torch.testing.assert_close(task_loss(logits, labels), torch.nn.functional.cross_entropy(logits, labels))


def test_dp_sgd_trains_a_multilabel_head_with_unknowns():
    setup = multilabel_setup(n=10)
    model = build_model("cnn", in_channels=1, num_classes=3, feature_dim=4, seed=0)
    before = [p.detach().clone() for p in model.parameters()]
    loss = private_epochs(model, setup.data.train, torch.optim.SGD(model.parameters(), lr=0.1), epochs=1,
                          batch_size=5, grad_clip=1.0, noise_multiplier=0.5,
                          generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert math.isfinite(loss) and loss > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_fedavg_dp_and_ckks_uploads_of_a_multilabel_site():
    module = algorithm_module("fedavg")
    client = module.Client(multilabel_setup(n=8), module.Config())
    up = client.train_private(
        1, DPRelease(clip=0.5, noise_multiplier=1e-6, generator=torch.Generator().manual_seed(0))
    )
    assert float(up.sums["n"]) == 1.0 and all(torch.isfinite(v).all() for v in up.sums.values())
    ctx = make_context(8192)
    back = decrypt(ctx, encrypt(ctx, up.sums))
    for key, value in up.sums.items():
        torch.testing.assert_close(back[key], value.float(), atol=1e-3, rtol=1e-4)


# ---- thresholds and metrics ------------------------------------------------------------------------------------


def test_thresholds_maximise_f1_on_validation_per_label():
    # label 0: positives at 0.9, 0.6; negatives at 0.7, 0.2 -> t = 0.6 gives F1 0.8 (t = 0.9: 0.667)
    # label 1: no positive known -> 0.5; unknown entries are left out
    probs = torch.tensor([[0.9, 0.3], [0.7, 0.8], [0.6, 0.1], [0.2, 0.9]])
    targets = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, float("nan")], [0.0, float("nan")]])
    assert choose_thresholds(probs, targets) == pytest.approx([0.6, 0.5])
    m = multilabel_metrics(probs, targets, ["a", "b"], [0.6, 0.5])
    assert m["f1/a"] == pytest.approx(0.8) and m["auroc/a"] == pytest.approx(0.75)
    assert math.isnan(m["auroc/b"]) and m["macro_auroc"] == m["auroc"] == pytest.approx(0.75)
    assert m["f1/b"] == 0.0  # one false positive (0.8 ≥ 0.5) against a known negative
    # exact match: rows 0, 2, 3 right (unknowns do not count), row 1 wrong (0.7 ≥ 0.6 on a negative)
    assert (m["correct"], m["n"], m["acc"]) == (3, 4, 0.75)


def test_evaluation_applies_the_validation_thresholds_to_test():
    module = algorithm_module("fedper")
    client = module.Client(multilabel_setup(n=12), module.Config())
    client.train(1)
    out = evaluate_splits(client.scores, client.setup.data, LABELS)
    val_probs = torch.cat(
        [client.scores(x) for x, _ in torch.utils.data.DataLoader(client.setup.data.val, 6)]
    )
    cut = choose_thresholds(val_probs, client.setup.data.val.labels)
    assert (
        [out["test"][f"threshold/{c}"] for c in LABELS]
        == [out["val"][f"threshold/{c}"] for c in LABELS]
        == cut
    )
    assert set(out["test"]) >= {"auroc/nodule", "f1/nodule", "macro_auroc", "acc", "correct", "n"}


# ---- results: selection on macro-AUROC -------------------------------------------------------------------------


def _ev(acc: float, macro: float, per_label: tuple[float, float]) -> dict:
    out = {
        "acc": acc,
        "auroc": macro,
        "macro_auroc": macro,
        "macro_f1": 0.5,
        "correct": int(10 * acc),
        "n": 10,
    }
    for name, a in zip(("x", "y"), per_label):
        out |= {f"auroc/{name}": a, f"f1/{name}": 0.5, f"threshold/{name}": 0.4}
    return out


def test_multilabel_rounds_are_selected_on_validation_macro_auroc():
    rec = RunRecorder(
        "j", "fedavg", {"mode": "none"}, ["a", "b"], {"a": "cnn", "b": "cnn"}, select_on="val_macro_auroc"
    )
    for rnd, (val_acc, val_macro) in enumerate(
        [(0.9, 0.6), (0.5, 0.8)], start=1
    ):  # accuracy would pick round 1
        rec.add_training(rnd, seconds=1.0, bytes_up=1, bytes_down=1, train_loss={"a": 0.5, "b": 0.5})
        for site in ("a", "b"):
            rec.add_evaluation(
                rnd, site, _ev(val_acc, val_macro, (0.5, 0.5)), _ev(0.7, 0.75, (0.7, math.nan))
            )
    res = RunRecorder.from_json(rec.to_json()).results()  # the checkpointed recorder selects the same way
    assert (res["selected_round"], res["task"], res["selected_on"]) == (2, "multilabel", "val_macro_auroc")
    site = res["final"]["per_site"]["a"]
    assert site["test_auroc_per_label"] == {"x": 0.7, "y": None} and site["thresholds"] == {
        "x": 0.4,
        "y": 0.4,
    }
    assert res["final"]["labels"] == ["x", "y"] and res["final"]["mean_macro_auroc"] == pytest.approx(0.75)
    assert res["rounds"][1]["mean_val_macro_auroc"] == pytest.approx(0.8)
    html = render_html([{**res, "label": "FedAvg"}])
    assert "Multi-label: AUROC per label" in html and "<td>x</td><td>0.700</td>" in html


def test_single_label_results_keep_their_schema():
    rec = RunRecorder("j", "fedavg", {"mode": "none"}, ["a"], {"a": "cnn"})
    rec.add_training(1, seconds=1.0, bytes_up=1, bytes_down=1, train_loss={"a": 0.5})
    rec.add_evaluation(
        1,
        "a",
        {"acc": 0.5, "auroc": 0.5, "correct": 5, "n": 10},
        {"acc": 0.5, "auroc": 0.5, "correct": 5, "n": 10},
    )
    res = rec.results()
    assert "task" not in res and "labels" not in res["final"]
    assert "Multi-label" not in render_html([res])


# ---- export and predict ----------------------------------------------------------------------------------------


def _facts() -> ExportFacts:
    return ExportFacts(site="hospital-1", job_id="job-1", spec_digest="d" * 64, job_name="j", algorithm="fedper",
                       modality="image", classes=tuple(LABELS), image_size=16, round=1, privacy_mode="none",
                       epsilon=None, delta=None, augmentation=[], medsilo_version="0", task="multilabel")  # fmt: skip


def test_export_and_predict_a_multilabel_model(tmp_path, capsys):
    from PIL import Image

    module = algorithm_module("fedper")
    client = module.Client(multilabel_setup(n=12), module.Config())
    client.train(1)
    export_model(tmp_path / "m", client, client.setup.data, _facts(), lambda what: "h" * 64)
    meta = json.loads((tmp_path / "m" / "configs" / "metadata.json").read_text())["medsilo"]
    want = evaluate_splits(client.scores, client.setup.data, LABELS)  # what the job's evaluation reported
    assert meta["task"] == "multilabel" and meta["labels"] == LABELS
    assert meta["thresholds"] == pytest.approx({c: want["val"][f"threshold/{c}"] for c in LABELS})
    assert meta["metrics"]["test"]["per_label"]["nodule"]["auroc"] == pytest.approx(
        want["test"]["auroc/nodule"]
    )
    assert meta["data_counts"]["train"]["pneumonia"]["unknown"] > 0
    card = (tmp_path / "m" / "docs" / "README.md").read_text()
    assert "one probability per label" in card and "| nodule |" in card and "threshold" in card

    # predict: per-label probabilities, thresholded labels, and the truth when the manifest has the columns
    images = client.setup.data.test.images
    rows = []
    for i in range(4):
        Image.fromarray((images[i, 0].numpy() * 255).round().astype(np.uint8)).save(tmp_path / f"{i}.png")
        rows.append({"path": f"{i}.png", "patient_id": f"p{i}", "split": "test", "pneumonia": str(i % 2),
                     "effusion": "" if i == 0 else "1", "nodule": "0"})  # fmt: skip
    write_manifest(tmp_path / "new.csv", rows, labels=LABELS)
    out = tmp_path / "p.csv"
    assert main(["predict", "--model", str(tmp_path / "m"), "--manifest", str(tmp_path / "new.csv"),
                 "--out", str(out), "--quiet"]) == 0  # fmt: skip
    with out.open() as fh:
        got = list(csv.DictReader(fh))
    assert list(got[0]) == ["path", *[f"prob_{c}" for c in LABELS], *[f"pred_{c}" for c in LABELS],
                            *[f"true_{c}" for c in LABELS]]  # fmt: skip
    for row in got:
        for c in LABELS:
            assert row[f"pred_{c}"] == str(int(float(row[f"prob_{c}"]) >= meta["thresholds"][c] - 5e-7))
    assert got[0]["true_effusion"] == "" and got[1]["true_pneumonia"] == "1"
    assert "macro-AUROC" in capsys.readouterr().out


# ---- synthetic findings ----------------------------------------------------------------------------------------


def test_synthetic_findings_co_occur():
    rng = np.random.default_rng(0)
    draws = [draw_findings(rng) for _ in range(4000)]
    has = {f: np.array([f in d for d in draws]) for f in ML_FINDINGS}
    assert (
        0.1 < has["effusion"].mean() < 0.4 and any(len(d) >= 2 for d in draws) and any(not d for d in draws)
    )
    # effusion comes with cardiomegaly (heart failure) far more often than without it
    assert has["effusion"][has["cardiomegaly"]].mean() > 2 * has["effusion"][~has["cardiomegaly"]].mean()


def test_multilabel_hospitals_write_label_columns_with_blanks_in_train_only(tmp_path):
    sites = synthesize(
        tmp_path / "ml", SynthRequest("cxr", 1, 30, seed=3, multilabel=True), workers=1, progress=False
    )
    manifest = sites.parent / "hospital-1" / "manifest.csv"
    with manifest.open() as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["path", "patient_id", "split", *ML_FINDINGS]
    blanks = {r["split"] for r in rows for c in ML_FINDINGS if r[c] == ""}
    assert blanks <= {"train"} and all(
        r[c] in ("0", "1") for r in rows if r["split"] != "train" for c in ML_FINDINGS
    )
    parsed = read_manifest(manifest, labels=list(ML_FINDINGS))
    assert len(parsed.rows) == 30 and any(sum(v == 1.0 for v in r.targets) >= 2 for r in parsed.rows)
    with pytest.raises(Exception, match="only chest X-ray"):
        SynthRequest("pathology", 1, 30, multilabel=True).check()
