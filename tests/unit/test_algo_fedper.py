"""FedPer: only the base φ is uploaded (× n); sites load the base mean and keep their own heads."""

from __future__ import annotations

import torch

from medsilo.components.algorithms import fedper
from tests.helpers import aggregate, tiny_setup


def _clone(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_upload_is_base_parameters_times_n_and_no_head():
    # Prepare
    setup = tiny_setup(n=12)
    client = fedper.Client(setup, fedper.Config())
    # Execute
    up = client.train(1)
    # Assert
    base = dict(setup.model.base.named_parameters())
    assert set(up.sums) == {f"base.{k}" for k in base} | {"n"}
    assert not any(k.startswith("head") or ".head." in k for k in up.sums)  # the head never leaves
    assert float(up.sums["n"]) == 12.0
    for k, p in base.items():
        torch.testing.assert_close(up.sums[f"base.{k}"], p.detach() * 12)
    assert up.train_loss > 0


def test_local_training_updates_both_base_and_head():
    setup = tiny_setup(n=12)
    client = fedper.Client(setup, fedper.Config())
    base, head = _clone(setup.model.base), _clone(setup.model.head)
    client.train(1)
    assert not torch.equal(setup.model.head.weight, head["weight"])
    assert not torch.equal(setup.model.base.backbone[0].weight, base["backbone.0.weight"])


def test_receive_loads_the_base_mean_and_keeps_head_and_bn_statistics():
    # Prepare: two sites (n = 12 and 4) after one local round
    a = fedper.Client(tiny_setup("a", n=12, seed=1), fedper.Config())
    b = fedper.Client(tiny_setup("b", n=4, seed=2), fedper.Config())
    ua, ub = a.train(1), b.train(1)
    base_a, base_b = _clone(a.model.base), _clone(b.model.base)
    head_a = _clone(a.model.head)
    buffers_a = {k: v.clone() for k, v in a.model.named_buffers()}
    # Execute
    payload = fedper.Server(fedper.Config(), 3, ["a", "b"]).update(aggregate([ua.sums, ub.sums]), 1)
    a.receive(payload, 2)
    b.receive(payload, 2)
    # Assert: base = (12 φ_a + 4 φ_b) / 16 at both sites
    for name, p in a.model.base.named_parameters():
        expected = (12 * base_a[name] + 4 * base_b[name]) / 16
        torch.testing.assert_close(p, expected)
        torch.testing.assert_close(dict(b.model.base.named_parameters())[name], expected)
    for name, p in a.model.head.named_parameters():  # personal head untouched
        assert torch.equal(p, head_a[name])
    assert not torch.equal(a.model.head.weight, b.model.head.weight)
    for name, v in a.model.named_buffers():  # running statistics stay local
        assert torch.equal(v, buffers_a[name])


def test_receive_none_keeps_the_shared_initialisation():
    setup = tiny_setup()
    before = _clone(setup.model)
    fedper.Client(setup, fedper.Config()).receive(None, 1)
    for k, v in setup.model.state_dict().items():
        assert torch.equal(v, before[k])


def test_scores_are_deterministic_probabilities_of_the_personal_model():
    a = fedper.Client(tiny_setup("a", n=12, seed=1), fedper.Config())
    b = fedper.Client(tiny_setup("b", n=4, seed=2), fedper.Config())
    payload = aggregate([a.train(1).sums, b.train(1).sums])
    a.receive(payload, 2)
    b.receive(payload, 2)
    x = a.setup.data.test.images[:4]
    pa = a.scores(x)
    assert pa.shape == (4, 3)
    torch.testing.assert_close(pa.sum(1), torch.ones(4))
    assert torch.equal(pa, a.scores(x))
    assert not torch.allclose(pa, b.scores(x))  # same base, different heads
