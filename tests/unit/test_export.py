"""The exported model: one code path with evaluation, bounded candidates, an atomic bundle, ``predict`` checks."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch

from medsilo.components.algorithms import ALGORITHMS, algorithm_module
from medsilo.components.export import (
    Candidates,
    Deployed,
    ExportError,
    ExportFacts,
    auroc,
    export_model,
    trace,
)
from medsilo.components.training import classification_metrics
from medsilo.errors import MedsiloError
from tests.helpers import tiny_setup


def _batch(client, n: int = 6) -> torch.Tensor:
    return torch.stack([client.setup.data.test[i][0] for i in range(n)])


@pytest.mark.parametrize("name", ALGORITHMS)
def test_every_algorithms_traced_model_is_its_scores(name):
    module = algorithm_module(name)
    client = module.Client(tiny_setup(n=8), module.Config())
    client.train(1)
    x = _batch(client)
    buffer = io.BytesIO()
    torch.jit.save(trace(client, x), buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    other = torch.stack([client.setup.data.val[i][0] for i in range(5)])  # not the batch it was traced on
    torch.testing.assert_close(loaded(other), client.scores(other), rtol=1e-5, atol=1e-6)
    state = Deployed(client).state_dict()
    assert any(k.startswith("parts.model.") for k in state)


def test_candidates_keep_the_best_round_and_the_last_one_only():
    module = algorithm_module("fedavg")
    client = module.Client(tiny_setup(n=8), module.Config())
    kept = Candidates()
    weights = {}
    for rnd, best in [(1, None), (2, None), (3, 1), (4, 3)]:
        client.train(rnd)
        weights[rnd] = client.model.head.weight.detach().clone()
        kept.keep(rnd, client, {"test": {"acc": rnd / 10}}, best)
    assert sorted(kept.states) == [3, 4]  # round 3 is the best so far, 4 just evaluated; 1 and 2 dropped
    assert kept.restore(3, client) == {"test": {"acc": 0.3}}
    torch.testing.assert_close(client.model.head.weight, weights[3])
    with pytest.raises(ExportError, match="round 1 is not among the rounds this site kept \\(3, 4\\)"):
        kept.restore(1, client)


def test_the_rank_auroc_equals_scikit_learns():
    """The evaluation's AUROC (no scikit-learn in a site process) against ``roc_auc_score`` itself: binary,
    macro one-vs-rest, two classes present of K, one present, and scores with ties."""
    from sklearn.metrics import roc_auc_score

    for k, kinds, seed, ties in [(2, 2, 0, False), (10, 10, 1, False), (10, 2, 2, False), (4, 3, 3, False),
                                 (5, 1, 4, False), (2, 2, 5, True), (4, 4, 6, True)]:  # fmt: skip
        g = torch.Generator().manual_seed(seed)
        probs = torch.softmax(torch.randn(50, k, generator=g) * 2, 1)
        if ties:
            probs = torch.softmax(torch.round(torch.randn(50, k, generator=g)), 1)  # few distinct values
        labels = torch.randint(0, kinds, (50,), generator=g)
        y, p = labels.numpy(), probs.double().numpy()
        present = np.unique(y)
        if len(present) < 2:
            want = math.nan
        elif k == 2:
            want = roc_auc_score(y, p[:, 1])
        elif len(present) == 2:
            want = roc_auc_score(y == present[1], p[:, present[1]] / p[:, present].sum(1))
        else:
            sub = p[:, present] / p[:, present].sum(1, keepdims=True)
            want = roc_auc_score(y, sub, multi_class="ovr", average="macro", labels=present)
        got = classification_metrics(probs, labels)["auroc"]
        assert (np.isnan(want) and np.isnan(got)) or got == pytest.approx(want, abs=1e-12)
        assert (np.isnan(got) and np.isnan(auroc(p, y))) or auroc(p, y) == got


def _facts(**change) -> ExportFacts:
    base = dict(site="a", job_id="run-1", spec_digest="d" * 64, job_name="j", algorithm="fedavg", modality="cxr",
                classes=("0", "1", "2"), image_size=16, round=1, privacy_mode="none", epsilon=None, delta=None,
                augmentation=[], medsilo_version="0")  # fmt: skip
    return ExportFacts(**{**base, **change})


def test_the_bundle_is_written_whole_and_once(tmp_path):
    module = algorithm_module("fedavg")
    client = module.Client(tiny_setup(n=8), module.Config())
    client.train(1)
    recorded = []
    done = export_model(tmp_path / "m", client, client.setup.data, _facts(),
                        lambda what: recorded.append(what) or "h" * 64)  # fmt: skip
    meta = json.loads((tmp_path / "m" / "configs" / "metadata.json").read_text())
    assert meta["medsilo"]["model_sha256"] == done["sha256"] == recorded[0]["model_sha256"]
    assert meta["medsilo"]["data_counts"]["train"] == {"0": 3, "1": 3, "2": 2}
    low, high = meta["medsilo"]["metrics"]["test"]["ci95"]["acc"]
    assert low <= meta["medsilo"]["metrics"]["test"]["acc"] <= high
    card = (tmp_path / "m" / "docs" / "README.md").read_text()
    assert "research only" in card and "h" * 64 in card
    with pytest.raises(ExportError, match="exists already"):
        export_model(tmp_path / "m", client, client.setup.data, _facts(), lambda what: "x")
    # a failure part-way (here: the ledger refuses the entry) leaves no folder, not even a partial one
    with pytest.raises(MedsiloError, match="ledger says no"):
        export_model(tmp_path / "n", client, client.setup.data, _facts(),
                     lambda what: (_ for _ in ()).throw(MedsiloError("ledger says no")))  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_predict_refuses_a_model_file_that_is_not_the_exported_one(tmp_path):
    from medsilo.components.export import load_bundle

    module = algorithm_module("fedavg")
    client = module.Client(tiny_setup(n=8), module.Config())
    export_model(tmp_path / "m", client, client.setup.data, _facts(), lambda what: "h" * 64)
    assert load_bundle(tmp_path / "m")[0]["classes"] == ["0", "1", "2"]
    model = tmp_path / "m" / "models" / "model.ts"
    model.write_bytes(model.read_bytes() + b"\0")
    with pytest.raises(MedsiloError, match="differs from the model the export recorded"):
        load_bundle(tmp_path / "m")
    with pytest.raises(MedsiloError, match="not an exported model"):
        load_bundle(tmp_path)


def test_predict_scores_a_manifest_without_labels(tmp_path, capsys):
    from PIL import Image

    from medsilo.cli import main

    module = algorithm_module("fedavg")
    client = module.Client(tiny_setup(n=8), module.Config())
    export_model(tmp_path / "m", client, client.setup.data, _facts(modality="image"), lambda what: "h" * 64)
    (tmp_path / "new").mkdir()
    for i in range(3):
        Image.fromarray(np.full((20, 20), 60 * i, dtype=np.uint8)).save(tmp_path / "new" / f"{i}.png")
    (tmp_path / "new" / "broken.png").write_bytes(b"not a png")
    (tmp_path / "new" / "list.csv").write_text("path\n0.png\n1.png\n2.png\nbroken.png\n")
    out = tmp_path / "p.csv"
    assert main(["predict", "--model", str(tmp_path / "m"), "--manifest", str(tmp_path / "new" / "list.csv"),
                 "--out", str(out), "--quiet"]) == 0  # fmt: skip
    lines = out.read_text().splitlines()
    assert lines[0] == "path,pred,score_0,score_1,score_2" and [r.split(",")[0] for r in lines[1:]] == ["0.png", "1.png", "2.png"]
    printed = capsys.readouterr().out
    assert "skipped" in printed and "broken.png" in printed and "scored 3 image(s), skipped 1" in printed


def test_predict_with_the_sites_ledger_refuses_a_bundle_it_did_not_export(tmp_path):
    """A model file is code. Whoever can replace ``model.ts`` can rewrite the digest in ``metadata.json`` beside
    it; the site's signed ``model_export`` entry is what they cannot rewrite."""
    from medsilo.components.export import load_bundle
    from medsilo.secure import pki
    from medsilo.secure.ledger import Ledger, entry_hash

    ca = pki.make_local_ca(None)
    ledger = Ledger(tmp_path / "ledger.jsonl", "a", *pki.issue_certificate(*ca, "a", None))
    (tmp_path / "ca.pem").write_text(pki.certificate_pem(ca[1]))
    module = algorithm_module("fedavg")
    client = module.Client(tiny_setup(n=8), module.Config())
    export_model(tmp_path / "m", client, client.setup.data, _facts(),
                 lambda what: entry_hash(ledger.append("model_export", job="run-1", round=1, privacy=None, what=what)))
    meta, model = load_bundle(tmp_path / "m", tmp_path / "ledger.jsonl", tmp_path / "ca.pem")
    assert meta["site"] == "a" and model == (tmp_path / "m" / "models" / "model.ts").read_bytes()
    # another model put in its place, its digest rewritten in the metadata: the metadata check alone passes …
    other = module.Client(tiny_setup(n=8, model_seed=7), module.Config())
    export_model(tmp_path / "x", other, other.setup.data, _facts(), lambda what: "h" * 64)
    (tmp_path / "m" / "models" / "model.ts").write_bytes((tmp_path / "x" / "models" / "model.ts").read_bytes())
    meta_file = tmp_path / "m" / "configs" / "metadata.json"
    swapped = json.loads(meta_file.read_text())
    swapped["medsilo"]["model_sha256"] = json.loads((tmp_path / "x" / "configs" / "metadata.json").read_text())["medsilo"]["model_sha256"]
    meta_file.write_text(json.dumps(swapped))
    assert load_bundle(tmp_path / "m")[0]["site"] == "a"
    # … the site's ledger does not
    with pytest.raises(MedsiloError, match="no verified model_export entry of site a .* records this model"):
        load_bundle(tmp_path / "m", tmp_path / "ledger.jsonl", tmp_path / "ca.pem")


def test_a_link_planted_where_the_bundle_goes_is_not_followed(tmp_path):
    module = algorithm_module("fedavg")
    client = module.Client(tiny_setup(n=8), module.Config())
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "run-1").symlink_to(outside)
    with pytest.raises(ExportError, match="the model folder of run-1 exists already"):
        export_model(tmp_path / "models" / "run-1", client, client.setup.data, _facts(), lambda what: "h" * 64)
    assert list(outside.iterdir()) == [] and [p.name for p in (tmp_path / "models").iterdir()] == ["run-1"]
