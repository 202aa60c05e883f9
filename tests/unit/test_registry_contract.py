"""The contract every registered algorithm keeps (``components/algorithms/base.py``), checked over the registry.

For each algorithm: it declares its metadata (family, mixed backbones, DP form, server forms); two sites'
uploads have the same names and fixed shapes and add; the server half turns their sum into a payload that the
sites take; the upload survives a CKKS round trip; a job giving sites different backbones is refused exactly
when the algorithm does not declare it can mix them; it declares whether it can train a multi-label model
(``MULTILABEL``), and those that say so train one with the same upload names and shapes (so DP and CKKS apply
unchanged), while the others are refused at validation. (Evaluation = export: ``test_export.py``.)
"""

from __future__ import annotations

import pytest
import torch

from medsilo.components.algorithms import ALGORITHMS, FAMILIES, algorithm_module
from medsilo.config import JobSpec
from medsilo.config.loading import ConfigError
from tests.helpers import aggregate, multilabel_setup, tiny_setup

MULTILABEL_CAPABLE = {"local", "fedavg", "fedprox", "ditto", "fedper", "fedrep", "fedala", "feddbe", "lgfedavg"}
"""Issue 17: the weight-sharing methods and LG-FedAvg train multi-label heads; the prototype methods cannot."""


@pytest.mark.parametrize("name", ALGORITHMS)
def test_an_algorithm_declares_what_it_is(name):
    module = algorithm_module(name)
    assert module.FAMILY in FAMILIES and isinstance(module.MIXED_BACKBONES, bool)
    assert module.MIXED_BACKBONES == (module.FAMILY != "pfl")  # sharing weights needs one backbone
    assert module.Client.dp_form in (None, "update", "class_sums")
    assert module.Server.form_for(module.Config()) in ("sums", "per-site")
    assert isinstance(module.MULTILABEL, bool) and module.MULTILABEL == (name in MULTILABEL_CAPABLE)


def test_a_declared_recipe_is_a_training_block_a_job_can_use():
    declared = {name: algorithm_module(name).RECIPE for name in ALGORITHMS if hasattr(algorithm_module(name), "RECIPE")}
    assert {"local", "fedavg", "fedper"} <= set(declared)  # swept first (BENCHMARKS.md)
    for name, recipe in declared.items():
        spec = JobSpec(name="j", modality="cxr", classes=["a", "b"], dataset="d", algorithm={"name": name},
                       training={"rounds": 20, **recipe})  # fmt: skip
        assert {k: getattr(spec.training, k) for k in recipe} == recipe, name


def test_the_plain_recipe_is_the_job_defaults():
    # FedTGP declares PLAIN_RECIPE; a job that leaves its training block alone must get exactly that recipe
    from medsilo.components.algorithms.base import PLAIN_RECIPE

    spec = JobSpec(name="j", modality="cxr", classes=["a", "b"], dataset="d", algorithm={"name": "fedtgp"})
    assert {k: getattr(spec.training, k) for k in PLAIN_RECIPE} == dict(PLAIN_RECIPE)


def test_each_algorithm_declares_the_recipe_its_sweep_chose():
    # what benchmarks/recipe.py wrote (its "chosen": per algorithm, the recipe with the best mean validation score)
    import json
    from pathlib import Path

    from benchmarks.recipe import RECIPES

    sweep = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "recipe_4x300_a1_k2_r20.json"
    chosen = json.loads(sweep.read_text())["chosen"]
    assert set(chosen) == set(ALGORITHMS)  # every algorithm has been swept (BENCHMARKS.md)
    for name, recipe in chosen.items():
        assert dict(algorithm_module(name).RECIPE) == dict(RECIPES[recipe]), name
    unswept = [name for name in ALGORITHMS if name not in chosen]
    assert not any(hasattr(algorithm_module(name), "RECIPE") for name in unswept), unswept  # no claim without a sweep


def test_the_demo_job_trains_with_its_algorithm_s_recipe():
    from importlib.resources import files
    from pathlib import Path

    from medsilo.config import load_job_spec

    demo = load_job_spec(Path(str(files("medsilo.jobs") / "cxr_demo.yml")))
    recipe = algorithm_module(demo.algorithm.name).RECIPE
    assert {k: getattr(demo.training, k) for k in recipe} == recipe


@pytest.mark.parametrize("name", ALGORITHMS)
def test_a_multilabel_job_runs_exactly_the_algorithms_that_declare_it(name):
    spec = {"name": "j", "modality": "cxr", "task": "multilabel", "labels": ["a", "b", "c"], "dataset": "cxr",
            "algorithm": {"name": name}}  # fmt: skip
    if algorithm_module(name).MULTILABEL:
        assert JobSpec(**spec).classes == ["a", "b", "c"]
        return
    capable = ", ".join(a for a in ALGORITHMS if a in MULTILABEL_CAPABLE)
    refusal = rf"cannot train a multi-label model .*algorithms that can: {capable}(\s|$)"
    with pytest.raises((ConfigError, ValueError), match=refusal):
        JobSpec(**spec)


@pytest.mark.parametrize("name", sorted(MULTILABEL_CAPABLE))
def test_multilabel_sites_upload_what_single_label_sites_upload(name):
    module = algorithm_module(name)
    config = module.Config()
    single = module.Client(tiny_setup("a", n=8), config).train(1).sums
    clients = [module.Client(multilabel_setup(site, n=8, seed=i), config) for i, site in enumerate(("a", "b"))]
    uploads = [c.train(1) for c in clients]
    assert all(u.train_loss > 0 and torch.isfinite(torch.tensor(u.train_loss)) for u in uploads)
    # the upload does not depend on the task: same names and shapes, so DP clipping and CKKS apply unchanged
    assert {k: v.shape for k, v in uploads[0].sums.items()} == {k: v.shape for k, v in single.items()}
    payload = module.Server(config, 3, ["a", "b"]).update(aggregate([u.sums for u in uploads]), 1)
    for client in clients:
        client.receive(payload or None, 2)
        client.train(2)
        x = torch.stack([client.setup.data.test[i][0] for i in range(6)])
        probs = client.scores(x)  # one sigmoid per label: in [0, 1], not a distribution over labels
        assert probs.shape == (6, 3) and bool(((probs >= 0) & (probs <= 1)).all())
        assert not torch.allclose(probs.sum(1), torch.ones(6))


@pytest.mark.parametrize("name", ALGORITHMS)
def test_uploads_are_fixed_named_sums_the_server_turns_into_a_payload(name):
    from medsilo.secure.ckks import decrypt, encrypt, make_context

    module = algorithm_module(name)
    config = module.Config()
    clients = [module.Client(tiny_setup(site, n=8, seed=i), config) for i, site in enumerate(("a", "b"))]
    uploads = [c.train(1).sums for c in clients]
    assert set(uploads[0]) == set(uploads[1])
    assert all(uploads[0][k].shape == uploads[1][k].shape for k in uploads[0])
    server = module.Server(config, 3, ["a", "b"])
    total = aggregate(uploads)
    payload = server.update_from_sites(dict(zip("ab", uploads, strict=True)), 1) if server.form == "per-site" \
        else server.update(total, 1)  # fmt: skip
    assert all(torch.isfinite(torch.as_tensor(v)).all() for v in payload.values())
    for client in clients:
        client.receive(payload or None, 2)
        client.train(2)
    if uploads[0]:
        ctx = make_context(8192)
        back = decrypt(ctx, encrypt(ctx, uploads[0]))
        for key, value in uploads[0].items():
            torch.testing.assert_close(back[key], value.float(), atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("name", ALGORITHMS)
def test_mixed_backbones_are_refused_unless_declared(name):
    spec = {"name": "j", "modality": "cxr", "classes": ["a", "b"], "dataset": "cxr", "algorithm": {"name": name},
            "model": {"hospital-1": "cnn", "hospital-2": "resnet10-lite"}}  # fmt: skip
    if algorithm_module(name).MIXED_BACKBONES:
        assert JobSpec(**spec).heterogeneous
    else:
        with pytest.raises((ConfigError, ValueError), match="shares backbone weights"):
            JobSpec(**spec)
