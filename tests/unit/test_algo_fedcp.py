"""FedCP: the feature gate, MMD² by hand, deterministic scores, context and mixed-head uploads."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from medsilo.components.algorithms import fedcp
from medsilo.components.algorithms.base import mmd2
from tests.helpers import aggregate, tiny_setup


def kernel(squared_distance: float) -> float:
    """Σ_σ exp(−d² / (2σ)) over σ ∈ {10, 15, 20, 50}, written out."""
    return sum(math.exp(-squared_distance / (2 * sigma)) for sigma in (10, 15, 20, 50))


def test_gate_splits_every_feature_into_two_shares_summing_to_one():
    logits = torch.randn(3, 2, 4, generator=torch.Generator().manual_seed(0))
    s_p, s_g = fedcp.feature_gates(logits, tau=2.0)
    assert s_p.shape == s_g.shape == (3, 4)
    torch.testing.assert_close(s_p + s_g, torch.ones(3, 4))
    # a two-way softmax is the logistic function of the logit difference
    torch.testing.assert_close(s_p, torch.sigmoid((logits[:, 0] - logits[:, 1]) / 2.0))

    noisy_p, noisy_g = fedcp.feature_gates(logits, 2.0, torch.Generator().manual_seed(7))
    again_p, _ = fedcp.feature_gates(logits, 2.0, torch.Generator().manual_seed(7))
    torch.testing.assert_close(noisy_p + noisy_g, torch.ones(3, 4))
    torch.testing.assert_close(noisy_p, again_p, rtol=0, atol=0)  # seeded noise: reproducible
    assert not torch.allclose(noisy_p, s_p)  # and it is noise


def test_mmd2_by_hand():
    a = torch.tensor([[0.0], [1.0]])
    b = torch.tensor([[0.0], [3.0]])
    # squared distances: a–a {0, 1, 1, 0}; b–b {0, 9, 9, 0}; a–b {0, 9, 1, 4}
    within_a = (2 * kernel(0) + 2 * kernel(1)) / 4
    within_b = (2 * kernel(0) + 2 * kernel(9)) / 4
    across = (kernel(0) + kernel(9) + kernel(1) + kernel(4)) / 4
    expected = within_a + within_b - 2 * across
    assert float(mmd2(a, b)) == pytest.approx(expected, rel=1e-5)
    assert float(mmd2(b, a)) == pytest.approx(expected, rel=1e-5)


def test_mmd2_is_zero_for_identical_samples_and_positive_otherwise():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g) + 2
    assert float(mmd2(a, a.clone())) == 0.0
    assert float(mmd2(a, b)) > 0


def test_before_round_one_the_frozen_copies_are_the_initial_model_and_the_cpn_is_shared():
    a = fedcp.Client(tiny_setup("a", seed=1), fedcp.Config())
    b = fedcp.Client(tiny_setup("b", seed=2), fedcp.Config())
    a.receive(None, 1)
    b.receive(None, 1)
    torch.testing.assert_close(a.global_head.weight, a.model.head.weight)
    for p, q in zip(a.global_base.parameters(), a.model.base.parameters()):
        torch.testing.assert_close(p, q)
        assert not p.requires_grad
    for p, q in zip(a.cpn.parameters(), b.cpn.parameters()):  # same job-level init, different site seeds
        torch.testing.assert_close(p, q)
    assert a.context.shape == (4,) and 0 <= float(a.context.min()) and float(a.context.max()) < 1


@pytest.fixture(scope="module")
def round_one():
    """Two sites (n = 8 and 4) after one local round, their uploads, then the received payload."""
    a = fedcp.Client(tiny_setup("a", n=8, seed=1), fedcp.Config())
    b = fedcp.Client(tiny_setup("b", n=4, seed=2), fedcp.Config())
    initial = {
        "head": {k: v.detach().clone() for k, v in a.model.head.named_parameters()},
        "base": {k: v.detach().clone() for k, v in a.model.base.named_parameters()},
    }
    ua, ub = a.train(1), b.train(1)
    trained = {
        site: {
            "params": {k: v.detach().clone() for k, v in c.model.named_parameters()},
            "cpn": {k: v.detach().clone() for k, v in c.cpn.named_parameters()},
            "global_head": {k: v.detach().clone() for k, v in c.global_head.named_parameters()},
            "global_base": {k: v.detach().clone() for k, v in c.global_base.named_parameters()},
            "buffers": {k: v.clone() for k, v in c.model.named_buffers()},
        }
        for site, c in (("a", a), ("b", b))
    }
    payload = fedcp.Server(fedcp.Config(), 3, ["a", "b"]).update(aggregate([ua.sums, ub.sums]), 1)
    a.receive(payload, 2)
    b.receive(payload, 2)
    return {"a": a, "b": b, "ua": ua, "ub": ub, "initial": initial, "trained": trained}


def test_training_leaves_the_frozen_global_head_and_base_alone(round_one):
    initial, trained = round_one["initial"], round_one["trained"]["a"]
    for k, v in initial["head"].items():
        torch.testing.assert_close(trained["global_head"][k], v)
    for k, v in initial["base"].items():
        torch.testing.assert_close(trained["global_base"][k], v)
    assert not torch.equal(trained["params"]["head.weight"], initial["head"]["weight"])  # h_p did train
    assert round_one["ua"].train_loss > 0


def test_upload_keys_and_the_mixed_head_times_n(round_one):
    up, trained = round_one["ua"].sums, round_one["trained"]["a"]
    base = {k for k in trained["params"] if k.startswith("base.")}
    cpn = {f"cpn.{k}" for k in trained["cpn"]}
    assert set(up) == base | cpn | {"head.weight", "head.bias", "n"}
    assert float(up["n"]) == 8.0
    for name in ("weight", "bias"):
        expected = 0.5 * (trained["params"][f"head.{name}"] + trained["global_head"][name]) * 8
        torch.testing.assert_close(up[f"head.{name}"], expected)
    torch.testing.assert_close(up["base.backbone.0.weight"], trained["params"]["base.backbone.0.weight"] * 8)
    torch.testing.assert_close(up["cpn.fc.0.weight"], trained["cpn"]["fc.0.weight"] * 8)
    assert all(v.dtype == torch.float32 for v in up.values())


def test_receive_loads_the_means_keeps_the_personal_head_and_sets_the_context(round_one):
    a, b, ta, tb = round_one["a"], round_one["b"], round_one["trained"]["a"], round_one["trained"]["b"]
    mean = lambda u, v: (8 * u + 4 * v) / 12  # noqa: E731  (n-weighted, written out)
    mixed = lambda t: 0.5 * (t["params"]["head.weight"] + t["global_head"]["weight"])  # noqa: E731
    key = "backbone.4.weight"
    for site in (a, b):
        conv = mean(ta["params"][f"base.{key}"], tb["params"][f"base.{key}"])
        torch.testing.assert_close(dict(site.model.base.named_parameters())[key], conv)
        torch.testing.assert_close(dict(site.global_base.named_parameters())[key], conv)
        torch.testing.assert_close(site.global_head.weight, mean(mixed(ta), mixed(tb)))
        cpn = mean(ta["cpn"]["fc.0.weight"], tb["cpn"]["fc.0.weight"])
        torch.testing.assert_close(site.cpn.fc[0].weight, cpn)
    torch.testing.assert_close(a.model.head.weight, ta["params"]["head.weight"])  # personal head untouched
    torch.testing.assert_close(b.model.head.weight, tb["params"]["head.weight"])
    for k, v in a.model.named_buffers():  # BatchNorm statistics stay local
        torch.testing.assert_close(v, ta["buffers"][k])
    # context: column sum over classes of the personal head weight (K, d) -> (d,)
    w = ta["params"]["head.weight"]
    torch.testing.assert_close(a.context, w[0] + w[1] + w[2])


def test_two_head_logits_written_out(round_one):
    a = round_one["a"]
    z = 3 * torch.randn(5, 4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = a.logits(z)
        gates = torch.softmax(a.cpn.fc(z * a.context / a.context.norm()).view(5, 2, 4), dim=1)
        expected = a.model.head(z * gates[:, 0]) + a.global_head(z * gates[:, 1])
    torch.testing.assert_close(logits, expected)


def test_scores_are_deterministic_probabilities_of_the_gated_two_head_model(round_one):
    a = round_one["a"]
    x = torch.stack([a.setup.data.test[i][0] for i in range(len(a.setup.data.test))])
    first, second = a.scores(x), a.scores(x)
    assert first.shape == (6, 3)
    torch.testing.assert_close(first.sum(1), torch.ones(6))
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    with torch.no_grad():
        a.model.eval()
        torch.testing.assert_close(first, torch.softmax(a.logits(a.model.features(x)), dim=1))


def test_training_samples_gumbel_noise_and_scoring_does_not(monkeypatch):
    client = fedcp.Client(tiny_setup(n=4), fedcp.Config())
    gates, seen = fedcp.feature_gates, []

    def spy(logits, tau, noise=None):
        seen.append(noise)
        return gates(logits, tau, noise)

    monkeypatch.setattr(fedcp, "feature_gates", spy)
    client.train(1)
    assert seen and all(isinstance(g, torch.Generator) for g in seen)
    seen.clear()
    client.scores(torch.stack([client.setup.data.test[i][0] for i in range(2)]))
    assert seen == [None]


def site_with_a_distinct_global_head(seed: int) -> fedcp.Client:
    """A site whose h_g differs from h_p, as after round 1 (while h_g = h_p the gate has no effect)."""
    client = fedcp.Client(tiny_setup(n=4, seed=seed), fedcp.Config())
    with torch.no_grad():
        client.global_head.weight.copy_(torch.randn(3, 4, generator=torch.Generator().manual_seed(5)))
    return client


def test_training_is_reproducible_for_a_site_and_round():
    first = site_with_a_distinct_global_head(3).train(1)
    second = site_with_a_distinct_global_head(3).train(1)
    assert first.train_loss == second.train_loss
    torch.testing.assert_close(first.sums["cpn.fc.0.weight"], second.sums["cpn.fc.0.weight"], rtol=0, atol=0)


def test_the_extra_loss_is_lambda_times_mmd2_between_local_and_frozen_global_features():
    client = fedcp.Client(tiny_setup(n=4), fedcp.Config(lam=2.0))
    with torch.no_grad():  # local extractor drifts away from the frozen global copy
        for p in client.model.base.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    client.model.eval()
    client.global_base.eval()
    x, y = next(iter(client.train_loader(1)))
    with torch.no_grad():
        _, extra = client.forward(x, y)
        expected = 2.0 * mmd2(client.model.features(x), client.global_base(x))
    assert float(expected) > 0
    torch.testing.assert_close(extra, expected)


def test_config_defaults_and_bad_values():
    assert fedcp.Config().lam == 5.0 and fedcp.Config().tau == 1.0
    with pytest.raises(ValidationError, match="tau"):
        fedcp.Config(tau=0.0)
    with pytest.raises(ValidationError, match="lam"):
        fedcp.Config(lam=-1.0)
