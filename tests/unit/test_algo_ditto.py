"""Ditto: the personal model is pulled toward w by μ(v − w), never uploaded, kept across rounds."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from medsilo.components.algorithms import ditto, fedavg
from tests.helpers import aggregate, tiny_setup


def _params(module):
    return {k: p.detach().clone() for k, p in module.named_parameters()}


def test_ptrain_step_is_ce_gradient_plus_pull_toward_w_by_hand():
    # Prepare: one batch (n = batch = 4), plain SGD, personal model shifted away from w by δ
    lr, mu = 0.05, 4.0
    client = ditto.Client(tiny_setup(n=4, batch_size=4, lr=lr), ditto.Config(mu=mu))
    with torch.no_grad():
        for i, p in enumerate(client.personal.parameters()):
            p.add_(0.01 * (i + 1))
    w, v0 = _params(client.model), _params(client.personal)

    # Independent computation: ∇CE(v₀) on the same batch, in train mode, on a copy of v₀
    probe = tiny_setup(n=4, batch_size=4).model
    probe.load_state_dict(client.personal.state_dict())
    probe.train()
    x, y = next(iter(client.train_loader(1)))
    torch.nn.functional.cross_entropy(probe(x), y).backward()
    grads = {k: p.grad for k, p in probe.named_parameters()}

    # Execute
    client.train(1)

    # Assert: v₁ = v₀ − η(∇CE(v₀) + μ(v₀ − w)) for every parameter
    for k, p in client.personal.named_parameters():
        expected = v0[k] - lr * (grads[k] + mu * (v0[k] - w[k]))
        torch.testing.assert_close(p.detach(), expected, atol=1e-5, rtol=1e-4)


def test_global_half_is_exactly_fedavg_and_personal_model_is_not_uploaded():
    setup = tiny_setup(n=12)
    client = ditto.Client(setup, ditto.Config())
    up = client.train(1)
    reference = fedavg.Client(tiny_setup(n=12), fedavg.Config()).train(1)

    params = dict(client.model.named_parameters())
    assert set(up.sums) == {f"w.{k}" for k in params} | {"n"}
    assert float(up.sums["n"]) == 12.0
    for k, v in up.sums.items():  # the uploaded global copy is FedAvg's local update, × n
        torch.testing.assert_close(v, reference.sums[k])
    for k in ("base.backbone.0.weight", "head.weight"):  # v_i trained apart, absent from the upload
        assert not torch.allclose(up.sums[f"w.{k}"], client.personal.get_parameter(k).detach() * 12)
    assert client.personal is not client.model


def test_receive_sets_w_to_the_weighted_mean_and_keeps_v_across_rounds():
    a = ditto.Client(tiny_setup("a", n=12, seed=1), ditto.Config())
    b = ditto.Client(tiny_setup("b", n=4, seed=2), ditto.Config())
    ua, ub = a.train(1), b.train(1)
    expected = (12 * a.model.head.weight.detach() + 4 * b.model.head.weight.detach()) / 16
    personal, buffers = _params(a.personal), {k: t.clone() for k, t in a.personal.named_buffers()}

    payload = ditto.Server(ditto.Config(), 3, ["a", "b"]).update(aggregate([ua.sums, ub.sums]), 1)
    a.receive(payload, 2)

    torch.testing.assert_close(a.model.head.weight.detach(), expected)
    for k, p in a.personal.named_parameters():  # receive never touches v_i
        torch.testing.assert_close(p.detach(), personal[k])
    for k, t in a.personal.named_buffers():
        torch.testing.assert_close(t, buffers[k])

    a.train(2)  # round 2 continues from round 1's v_i, not from the global model
    restart = ditto.Client(tiny_setup("a", n=12, seed=1), ditto.Config())
    restart.receive(payload, 2)
    restart.train(2)
    assert not torch.allclose(a.personal.head.weight, restart.personal.head.weight)


def test_scores_use_the_personal_model_deterministically():
    client = ditto.Client(tiny_setup(), ditto.Config())
    client.train(1)
    x = torch.stack([client.setup.data.test[i][0] for i in range(3)])
    p = client.scores(x)
    client.personal.eval()
    torch.testing.assert_close(p, torch.softmax(client.personal(x), 1).detach())
    client.model.eval()
    assert not torch.allclose(p, torch.softmax(client.model(x), 1).detach())
    torch.testing.assert_close(p.sum(1), torch.ones(3))
    torch.testing.assert_close(client.scores(x), p)


def test_mu_zero_the_reference_default_makes_the_personal_model_a_local_one():
    from medsilo.components.algorithms import local

    ditto_client = ditto.Client(tiny_setup(n=12, local_epochs=1), ditto.Config(mu=0.0))
    alone = local.Client(tiny_setup(n=12, local_epochs=1), local.Config())
    other = ditto.Client(tiny_setup("b", n=8, seed=3), ditto.Config(mu=0.0))
    uploads = [ditto_client.train(1).sums, other.train(1).sums]
    alone.train(1)
    ditto_client.receive(ditto.Server(ditto.Config(mu=0.0), 3, ["a", "b"]).update(aggregate(uploads), 1), 2)
    ditto_client.train(2)
    alone.train(2)
    for (k, v), (_, p) in zip(ditto_client.personal.named_parameters(), alone.model.named_parameters(), strict=True):
        torch.testing.assert_close(v.detach(), p.detach(), rtol=0, atol=0, msg=k)  # the global model never pulled
    assert not torch.allclose(ditto_client.model.head.weight, alone.model.head.weight)  # w did move


@pytest.mark.parametrize(("field", "value"), [("mu", -0.1), ("plocal_epochs", 0)])
def test_bad_config_is_refused(field, value):
    with pytest.raises(ValidationError, match=field):
        ditto.Config(**{field: value})
