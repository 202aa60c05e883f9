"""GPFL: conditional valve, conditional inputs and GCE losses by hand; uploads are shared parts × n."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from medsilo.components.algorithms import gpfl
from tests.helpers import aggregate, tiny_setup

LN_SCALE = math.sqrt(1 + 1e-5)  # LayerNorm of a 2-vector [u, v], u < v, is [-1, 1] / sqrt(1 + eps)


def test_conditional_valve_by_hand():
    # Prepare: γ reads c as is, β reads it swapped; LayerNorm keeps its initial weight 1, bias 0
    cov = gpfl.ConditionalValve(2)
    with torch.no_grad():
        cov.gamma[0].weight.copy_(torch.eye(2))
        cov.beta[0].weight.copy_(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
        cov.gamma[0].bias.zero_()
        cov.beta[0].bias.zero_()
    c = torch.tensor([1.0, 3.0])  # γ(c) = [-1, 1] / s, β(c) = [1, -1] / s
    z = torch.tensor([[2.0, -1.0], [0.5, 4.0]])

    # Execute
    out = cov(z, c)

    # Assert: ReLU(z ⊙ (γ + 1) + β)
    s = LN_SCALE
    expected = torch.tensor(
        [
            [2 * (1 - 1 / s) + 1 / s, 0.0],  # second entry -1·(1 + 1/s) - 1/s < 0 is cut by the ReLU
            [0.5 * (1 - 1 / s) + 1 / s, 4 * (1 + 1 / s) - 1 / s],
        ]
    )
    torch.testing.assert_close(out, expected)


def test_conditional_inputs_by_hand():
    table = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    prior = torch.tensor([0.5, 0.25, 0.25])
    generic, personal = gpfl.conditional_inputs(table, prior)
    torch.testing.assert_close(generic, torch.tensor([4 / 3, 5 / 3]))  # mean of the rows
    torch.testing.assert_close(personal, torch.tensor([0.5 + 0.75, 0.5 + 0.75]))  # prior-weighted sum


def test_label_prior_counts_every_training_label_even_when_the_loader_drops_one():
    # 7 images, batch 6: the loader drops the lone last image (BatchNorm), the prior must not
    client = gpfl.Client(tiny_setup(n=7, batch_size=6), gpfl.Config())
    assert len(torch.cat([y for _, y in client.train_loader(1)])) == 6
    torch.testing.assert_close(client.prior, torch.tensor([3 / 7, 2 / 7, 2 / 7]))  # labels 0,1,2,0,1,2,0
    table = client.gce.weight.detach()
    torch.testing.assert_close(client.personal, 3 / 7 * table[0] + 2 / 7 * table[1] + 2 / 7 * table[2])
    torch.testing.assert_close(client.generic, (table[0] + table[1] + table[2]) / 3)


def test_cosine_gce_loss_by_hand():
    features = torch.tensor([[2.0, 0.0], [0.0, -3.0]])
    table = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-2.0, 0.0]])
    labels = torch.tensor([0, 2])
    # row 0: cosines [1, 0, -1], true class 0; row 1: cosines [0, -1, 0], true class 2 (unscaled)
    e = math.e
    expected = (-math.log(e / (e + 1 + 1 / e)) - math.log(1 / (1 + 1 / e + 1))) / 2
    loss = gpfl.cosine_embedding_loss(features, table, labels)
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    # scale-free in both arguments
    rescaled = gpfl.cosine_embedding_loss(5 * features, 3 * table, labels)
    assert float(rescaled) == pytest.approx(expected, rel=1e-6)


def test_embedding_distance_is_the_unsquared_frobenius_norm_over_the_batch():
    features = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    table = torch.tensor([[0.0, 0.0], [1.0, 1.0], [5.0, 5.0]])
    labels = torch.tensor([1, 2])  # differences [[0, 1], [-2, -1]]
    assert float(gpfl.embedding_distance(features, table, labels)) == pytest.approx(math.sqrt(6.0))


def test_training_objective_wires_generic_input_to_gce_and_personal_input_to_head():
    client = gpfl.Client(tiny_setup(n=7), gpfl.Config(lam=0.5))  # skewed prior: p_i differs from g
    assert not torch.allclose(client.personal, client.generic)
    client.model.eval()  # deterministic BatchNorm so both computations see the same features
    x, y = next(iter(client.train_loader(1)))
    with torch.no_grad():
        logits, extra = client.forward(x, y)
        z = client.model.features(x)
        f_generic = client.cov(z, client.generic)
        distance = torch.linalg.vector_norm(f_generic - client.frozen_gce[y])
        expected_extra = gpfl.cosine_embedding_loss(f_generic, client.gce.weight, y) + 0.5 * distance
        torch.testing.assert_close(logits, client.model.head(client.cov(z, client.personal)))
        torch.testing.assert_close(extra, expected_extra)


def test_gce_and_cov_get_weight_decay_mu_and_the_model_does_not():
    client = gpfl.Client(tiny_setup(lr=0.05), gpfl.Config(mu=0.1))
    opt = client.optimizer(client.parameter_groups())
    params = [p for group in client.parameter_groups() for p in group["params"]]
    for p in params:
        p.grad = torch.zeros_like(p)
    gce_before = client.gce.weight.detach().clone()
    head_before = client.model.head.weight.detach().clone()
    opt.step()  # zero gradient: only the decay moves a parameter, p ← p (1 − lr μ)
    torch.testing.assert_close(client.gce.weight, gce_before * (1 - 0.05 * 0.1))
    torch.testing.assert_close(client.model.head.weight, head_before)


def test_shared_modules_start_identical_at_sites_with_different_seeds():
    a = gpfl.Client(tiny_setup("a", seed=1), gpfl.Config())
    b = gpfl.Client(tiny_setup("b", seed=2), gpfl.Config())
    a.receive(None, 1)
    b.receive(None, 1)
    torch.testing.assert_close(a.gce.weight, b.gce.weight)
    for pa, pb in zip(a.cov.parameters(), b.cov.parameters()):
        torch.testing.assert_close(pa, pb)


@pytest.fixture(scope="module")
def round_one():
    """Two sites (n = 8 and 4) after one local round, their uploads, then the received payload."""
    a = gpfl.Client(tiny_setup("a", n=8, seed=1), gpfl.Config())
    b = gpfl.Client(tiny_setup("b", n=4, seed=2), gpfl.Config())
    ua, ub = a.train(1), b.train(1)
    trained = {
        site: {
            "params": {k: v.detach().clone() for k, v in c.model.named_parameters()},
            "gce": c.gce.weight.detach().clone(),
            "cov": {k: v.detach().clone() for k, v in c.cov.named_parameters()},
            "buffers": {k: v.clone() for k, v in c.model.named_buffers()},
        }
        for site, c in (("a", a), ("b", b))
    }
    payload = gpfl.Server(gpfl.Config(), 3, ["a", "b"]).update(aggregate([ua.sums, ub.sums]), 1)
    a.receive(payload, 2)
    b.receive(payload, 2)
    return {"a": a, "b": b, "ua": ua, "ub": ub, "trained": trained}


def test_upload_is_the_shared_parts_times_n_and_never_the_head(round_one):
    up, trained = round_one["ua"].sums, round_one["trained"]["a"]
    base = {k for k in trained["params"] if k.startswith("base.")}
    cov = {f"cov.{k}" for k in trained["cov"]}
    assert set(up) == base | cov | {"gce.weight", "n"}
    assert not any(k.startswith("head.") for k in up)  # the personal head stays at the site
    assert float(up["n"]) == 8.0
    assert up["gce.weight"].shape == (3, 4) and up["gce.weight"].dtype == torch.float32
    torch.testing.assert_close(up["gce.weight"], trained["gce"] * 8)
    torch.testing.assert_close(up["base.backbone.0.weight"], trained["params"]["base.backbone.0.weight"] * 8)
    torch.testing.assert_close(up["cov.gamma.0.weight"], trained["cov"]["gamma.0.weight"] * 8)
    assert round_one["ua"].train_loss > 0


def test_receive_recovers_the_weighted_means_and_keeps_local_state(round_one):
    a, b, ta, tb = round_one["a"], round_one["b"], round_one["trained"]["a"], round_one["trained"]["b"]
    mean = lambda u, v: (8 * u + 4 * v) / 12  # noqa: E731  (n-weighted, written out)
    for site in (a, b):
        torch.testing.assert_close(site.gce.weight, mean(ta["gce"], tb["gce"]))
        torch.testing.assert_close(site.frozen_gce, mean(ta["gce"], tb["gce"]))
        beta = mean(ta["cov"]["beta.0.weight"], tb["cov"]["beta.0.weight"])
        torch.testing.assert_close(site.cov.beta[0].weight, beta)
        key = "base.backbone.4.weight"
        conv = mean(ta["params"][key], tb["params"][key])
        torch.testing.assert_close(dict(site.model.named_parameters())[key], conv)
    # personal heads and BatchNorm statistics are untouched
    torch.testing.assert_close(a.model.head.weight, ta["params"]["head.weight"])
    torch.testing.assert_close(b.model.head.weight, tb["params"]["head.weight"])
    assert not torch.equal(a.model.head.weight, b.model.head.weight)
    for k, v in a.model.named_buffers():
        torch.testing.assert_close(v, ta["buffers"][k])
    # conditional inputs come from the site's own trained table, before it was overwritten
    generic, personal = gpfl.conditional_inputs(ta["gce"], a.prior)
    torch.testing.assert_close(a.generic, generic)
    torch.testing.assert_close(a.personal, personal)


def test_scores_are_the_personal_path_deterministic_probabilities(round_one):
    a = round_one["a"]
    x = torch.stack([a.setup.data.test[i][0] for i in range(len(a.setup.data.test))])
    first, second = a.scores(x), a.scores(x)
    assert first.shape == (6, 3)
    torch.testing.assert_close(first.sum(1), torch.ones(6))
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    with torch.no_grad():
        expected = torch.softmax(a.model.head(a.cov(a.model.features(x), a.personal)), dim=1)
    torch.testing.assert_close(first, expected)


def test_config_defaults_are_the_tuned_values_and_bad_values_are_refused():
    assert gpfl.Config().lam == 0.01 and gpfl.Config().mu == 0.1
    with pytest.raises(ValidationError, match="lam"):
        gpfl.Config(lam=-1.0)
    with pytest.raises(ValidationError, match="lamda"):
        gpfl.Config(lamda=1.0)
