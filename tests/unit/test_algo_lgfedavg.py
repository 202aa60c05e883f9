"""LG-FedAvg: only the head is uploaded (× n); sites overwrite their head with the mean, bases stay local."""

from __future__ import annotations

import math

import torch

from medsilo.components.algorithms import lgfedavg
from tests.helpers import aggregate, tiny_setup


def _clone(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_upload_is_head_parameters_times_n_and_nothing_from_the_base():
    # Prepare
    setup = tiny_setup(n=12)
    client = lgfedavg.Client(setup, lgfedavg.Config())
    # Execute
    up = client.train(1)
    # Assert
    assert set(up.sums) == {"head.weight", "head.bias", "n"}
    assert up.sums["head.weight"].shape == (3, 4) and up.sums["head.bias"].shape == (3,)
    assert all(v.dtype == torch.float32 for v in up.sums.values())
    assert float(up.sums["n"]) == 12.0
    torch.testing.assert_close(up.sums["head.weight"], setup.model.head.weight.detach() * 12)
    torch.testing.assert_close(up.sums["head.bias"], setup.model.head.bias.detach() * 12)
    assert up.train_loss > 0


def test_local_training_updates_both_base_and_head():
    setup = tiny_setup(n=12)
    base, head = _clone(setup.model.base), _clone(setup.model.head)
    lgfedavg.Client(setup, lgfedavg.Config()).train(1)
    assert not torch.equal(setup.model.head.weight, head["weight"])
    assert not torch.equal(setup.model.base.backbone[0].weight, base["backbone.0.weight"])


def test_receive_loads_the_weighted_mean_head_and_keeps_base_and_bn_statistics():
    # Prepare: two sites (n = 12 and 4) after one local round
    a = lgfedavg.Client(tiny_setup("a", n=12, seed=1), lgfedavg.Config())
    b = lgfedavg.Client(tiny_setup("b", n=4, seed=2), lgfedavg.Config())
    ua, ub = a.train(1), b.train(1)
    head_a, head_b = _clone(a.model.head), _clone(b.model.head)
    base_a = _clone(a.model.base)  # parameters and BatchNorm buffers
    assert not torch.equal(head_a["weight"], head_b["weight"])
    # Execute
    payload = lgfedavg.Server(lgfedavg.Config(), 3, ["a", "b"]).update(aggregate([ua.sums, ub.sums]), 1)
    a.receive(payload, 2)
    b.receive(payload, 2)
    # Assert: head = (12 h_a + 4 h_b) / 16 at both sites, by hand
    for name in ("weight", "bias"):
        expected = (12 * head_a[name] + 4 * head_b[name]) / 16
        torch.testing.assert_close(getattr(a.model.head, name).detach(), expected)
        torch.testing.assert_close(getattr(b.model.head, name).detach(), expected)
    for name, v in a.model.base.state_dict().items():  # base weights and running statistics untouched
        assert torch.equal(v, base_a[name]), name
    assert any("running_mean" in k for k in base_a)


def test_receive_none_keeps_the_sites_own_initialisation():
    setup = tiny_setup()
    before = _clone(setup.model)
    lgfedavg.Client(setup, lgfedavg.Config()).receive(None, 1)
    for k, v in setup.model.state_dict().items():
        assert torch.equal(v, before[k])


def test_two_backbone_round_shares_the_head_and_keeps_each_base():
    # Prepare: a cnn site and a resnet18 site (same d = 4, K = 3), both built from the same seed
    a = lgfedavg.Client(tiny_setup("a", n=8, seed=1, backbone="cnn"), lgfedavg.Config())
    b = lgfedavg.Client(tiny_setup("b", n=8, seed=2, backbone="resnet18"), lgfedavg.Config())
    assert not torch.equal(a.model.head.weight, b.model.head.weight)  # different initial heads (documented)
    server = lgfedavg.Server(lgfedavg.Config(), 3, ["a", "b"])
    # Execute: round 1, aggregate, receive, round 2
    ua, ub = a.train(1), b.train(1)
    base_b = _clone(b.model.base)
    payload = server.update(aggregate([ua.sums, ub.sums]), 1)
    a.receive(payload, 2)
    b.receive(payload, 2)
    # Assert: one head everywhere, equal to the mean; the resnet18 base is untouched; round 2 runs
    torch.testing.assert_close(a.model.head.weight, b.model.head.weight)
    torch.testing.assert_close(a.model.head.bias.detach(), (ua.sums["head.bias"] + ub.sums["head.bias"]) / 16)
    for name, v in b.model.base.state_dict().items():
        assert torch.equal(v, base_b[name]), name
    x = a.setup.data.test.images[:4]
    assert not torch.allclose(a.scores(x), b.scores(x))  # same head, different bases
    for c in (a, b):
        p = c.scores(x)
        assert p.shape == (4, 3)
        torch.testing.assert_close(p.sum(1), torch.ones(4))
        assert math.isfinite(c.train(2).train_loss)
