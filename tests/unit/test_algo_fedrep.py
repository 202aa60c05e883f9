"""FedRep: base-only uploads; each round trains the head (φ frozen), then φ (head frozen)."""

from __future__ import annotations

import pydantic
import pytest
import torch

from medsilo.components.algorithms import fedrep
from tests.helpers import aggregate, tiny_setup


def _clone(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def _changed(module: torch.nn.Module, before: dict[str, torch.Tensor]) -> set[str]:
    return {k for k, p in module.named_parameters() if not torch.equal(p, before[k])}


def test_head_phase_changes_only_the_head_and_computes_no_base_gradient():
    # Prepare
    setup = tiny_setup(n=12)
    client = fedrep.Client(setup, fedrep.Config(head_epochs=2))
    base, head = _clone(setup.model.base), _clone(setup.model.head)
    # Execute
    loss = client.train_head(1)
    # Assert
    assert loss > 0
    assert _changed(setup.model.base, base) == set()
    assert _changed(setup.model.head, head) == {"weight", "bias"}
    assert all(p.grad is None for p in setup.model.base.parameters())  # φ really frozen, not just skipped
    assert all(p.requires_grad for p in setup.model.parameters())  # flags restored


def test_base_phase_changes_only_the_base():
    setup = tiny_setup(n=12)
    client = fedrep.Client(setup, fedrep.Config())
    base, head = _clone(setup.model.base), _clone(setup.model.head)
    client.train_base(1)
    assert _changed(setup.model.head, head) == set()
    assert {"backbone.0.weight", "backbone.4.weight"} <= _changed(setup.model.base, base)  # convs moved
    assert all(p.grad is None for p in setup.model.head.parameters())
    assert all(p.requires_grad for p in setup.model.parameters())


def test_round_runs_head_epochs_then_local_epochs():
    # Prepare: n = 12, batch 4 → 3 batches per epoch; record which half is frozen at every head call
    setup = tiny_setup(n=12, batch_size=4, local_epochs=1)
    client = fedrep.Client(setup, fedrep.Config(head_epochs=2))
    frozen_log: list[tuple[bool, bool]] = []
    conv = setup.model.base.backbone[0]

    def record(head, inputs, output):
        frozen_log.append((not conv.weight.requires_grad, not head.weight.requires_grad))

    setup.model.head.register_forward_hook(record)
    # Execute
    client.train(1)
    # Assert: 2 head epochs × 3 batches with φ frozen, then 1 epoch × 3 batches with h frozen
    assert frozen_log == [(True, False)] * 6 + [(False, True)] * 3


def test_train_loss_is_the_epoch_weighted_mean_of_both_phases(monkeypatch):
    client = fedrep.Client(tiny_setup(local_epochs=1), fedrep.Config(head_epochs=2))
    monkeypatch.setattr(client, "train_head", lambda rnd: 1.0)
    monkeypatch.setattr(client, "train_base", lambda rnd: 4.0)
    assert client.train(1).train_loss == pytest.approx((2 * 1.0 + 1 * 4.0) / 3)


def test_upload_is_base_times_n_and_receive_keeps_the_personal_head():
    # Prepare
    a = fedrep.Client(tiny_setup("a", n=12, seed=1), fedrep.Config(head_epochs=1))
    b = fedrep.Client(tiny_setup("b", n=4, seed=2), fedrep.Config(head_epochs=1))
    ua, ub = a.train(1), b.train(1)
    base_a, base_b, head_a = _clone(a.model.base), _clone(b.model.base), _clone(a.model.head)
    buffers_a = {k: v.clone() for k, v in a.model.named_buffers()}
    # Assert the upload: base × n and n only
    assert set(ua.sums) == {f"base.{k}" for k in base_a} | {"n"}
    torch.testing.assert_close(ua.sums["base.backbone.0.weight"], base_a["backbone.0.weight"] * 12)
    # Execute
    payload = fedrep.Server(fedrep.Config(), 3, ["a", "b"]).update(aggregate([ua.sums, ub.sums]), 1)
    a.receive(payload, 2)
    # Assert: base = (12 φ_a + 4 φ_b) / 16; head and BN statistics untouched
    for name, p in a.model.base.named_parameters():
        torch.testing.assert_close(p, (12 * base_a[name] + 4 * base_b[name]) / 16)
    assert _changed(a.model.head, head_a) == set()
    for name, v in a.model.named_buffers():
        assert torch.equal(v, buffers_a[name])


def test_scores_are_deterministic_probabilities():
    client = fedrep.Client(tiny_setup(), fedrep.Config(head_epochs=1))
    client.train(1)
    x = client.setup.data.test.images[:4]
    p = client.scores(x)
    torch.testing.assert_close(p.sum(1), torch.ones(4))
    assert torch.equal(p, client.scores(x))


def test_config_defaults_and_bounds():
    assert fedrep.Config().head_epochs == 5
    with pytest.raises(pydantic.ValidationError, match="head_epochs"):
        fedrep.Config(head_epochs=0)
