"""FedALA: lower layers from the global model, higher ones blended by learned W ∈ [0, 1], from round 2."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from medsilo.components.algorithms import fedala
from medsilo.components.algorithms.base import load_mean
from tests.helpers import aggregate, tiny_setup


def _round_one(config: fedala.Config, *, batch_size: int = 4):
    """Sites a (n = 12) and b (n = 4) train round 1; returns a, the round-1 payload and a's θ_i."""
    a = fedala.Client(tiny_setup("a", n=12, seed=1, batch_size=batch_size), config)
    b = fedala.Client(tiny_setup("b", n=4, seed=2, batch_size=batch_size), config)
    ua, ub = a.train(1), b.train(1)
    payload = fedala.Server(config, 3, ["a", "b"]).update(aggregate([ua.sums, ub.sums]), 1)
    local = [p.detach().clone() for p in a.model.parameters()]
    return a, payload, local


def _global(payload) -> list[torch.Tensor]:
    """θ_g by an independent route: the weighted mean loaded into a fresh model."""
    model = tiny_setup().model
    load_mean(model, payload, "w.")
    return [p.detach() for p in model.parameters()]


def test_blend_and_weight_step_by_hand():
    # θ̂ = θ_i + (θ_g − θ_i) ⊙ W with θ_i = [1, 2], θ_g = [3, −2], W = [0.5, 0.25]
    local, glob, w = torch.tensor([1.0, 2.0]), torch.tensor([3.0, -2.0]), torch.tensor([0.5, 0.25])
    torch.testing.assert_close(fedala.ala_blend(local, glob - local, w), torch.tensor([2.0, 1.0]))
    # W − η g ⊙ d = [1, 1, 0.5, 0.1] − 1·[0.2, −0.2, −0.4, 0.3]; clipped into [0, 1]
    w = torch.tensor([1.0, 1.0, 0.5, 0.1])
    g = torch.tensor([0.2, -0.1, 0.4, 0.3])
    d = torch.tensor([1.0, 2.0, -1.0, 1.0])
    torch.testing.assert_close(fedala.ala_weight_step(w, g, d, 1.0), torch.tensor([0.8, 1.0, 0.9, 0.0]))


def test_convergence_rule_and_slice():
    assert not fedala.converged([1.0, 1.0], 3, 0.1)  # window not full
    assert fedala.converged([5.0, 1.0, 1.1, 0.9], 3, 0.1)  # pstdev(1, 1.1, 0.9) = 0.0816
    assert not fedala.converged([1.0, 1.2, 0.8], 3, 0.1)  # pstdev = 0.163
    rows = fedala.ala_slice(12, 80, torch.Generator().manual_seed(0))
    assert len(rows) == 9 and 0 <= rows.start <= 3 and list(rows) == list(range(rows.start, rows.start + 9))
    assert fedala.ala_slice(12, 100, torch.Generator().manual_seed(0)) == range(0, 12)


def test_round_one_receive_runs_no_ala():
    client = fedala.Client(tiny_setup(), fedala.Config())
    before = [p.detach().clone() for p in client.model.parameters()]
    client.receive(None, 1)
    for p, q in zip(client.model.parameters(), before):
        torch.testing.assert_close(p.detach(), q)
    assert client.weights is None and client.ala_passes == 0

    # a payload before any local training is loaded whole: still no ALA
    _, payload, _ = _round_one(fedala.Config())
    client.receive(payload, 1)
    for p, g in zip(client.model.parameters(), _global(payload)):
        torch.testing.assert_close(p.detach(), g)
    assert client.weights is None and client.ala_passes == 0


def test_receive_takes_lower_layers_and_blends_higher_ones():
    a, payload, local = _round_one(fedala.Config(max_first_passes=3))
    glob = _global(payload)
    buffers = {k: t.clone() for k, t in a.model.named_buffers()}

    a.receive(payload, 2)

    params = [p.detach() for p in a.model.parameters()]
    for p, g in zip(params[:-2], glob[:-2]):  # lower tensors are the global ones
        torch.testing.assert_close(p, g)
    assert [w.shape for w in a.weights] == [a.model.head.weight.shape, a.model.head.bias.shape]
    for p, loc, g, w in zip(params[-2:], local[-2:], glob[-2:], a.weights):
        assert float(w.min()) >= 0.0 and float(w.max()) <= 1.0
        torch.testing.assert_close(p, loc + (g - loc) * w)  # θ̂ with the learned W
    assert any(float(w.min()) < 1.0 for w in a.weights)  # W was learned, not left at 1
    for k, t in a.model.named_buffers():  # BatchNorm statistics untouched by ALA
        torch.testing.assert_close(t, buffers[k])


def test_one_weight_step_matches_the_formula():
    # One batch holding the whole split, one pass: W = clip(1 − η ∇_θ̂CE ⊙ (θ_g − θ_i), 0, 1) with θ̂ = θ_g
    eta = 2000.0
    a, payload, local = _round_one(
        fedala.Config(eta=eta, rand_percent=100, num_pre_loss=2, max_first_passes=1), batch_size=12
    )
    glob = _global(payload)
    probe = tiny_setup().model
    load_mean(probe, payload, "w.")
    probe.train()
    x = torch.stack([a.setup.data.train[i][0] for i in range(12)])
    y = torch.stack([a.setup.data.train[i][1] for i in range(12)])
    loss = torch.nn.functional.cross_entropy(probe(x), y)
    grads = torch.autograd.grad(loss, [probe.head.weight, probe.head.bias])

    a.receive(payload, 2)

    assert a.ala_passes == 1
    heads = [a.model.head.weight, a.model.head.bias]
    for w, g, loc, th, p in zip(a.weights, grads, local[-2:], glob[-2:], heads):
        expected = torch.clamp(1.0 - eta * g * (th - loc), 0.0, 1.0)
        torch.testing.assert_close(w, expected, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(p.detach(), loc + (th - loc) * expected, atol=1e-6, rtol=1e-5)
    flat = torch.cat([w.flatten() for w in a.weights])
    assert bool((flat == 1.0).any()) and bool((flat < 0.95).any())  # clipped at 1 and moved down


def test_first_ala_is_capped_and_later_rounds_do_one_warm_started_pass():
    # A threshold no loss sequence meets: the first ALA stops at the cap instead of hanging
    # (η tiny so that W stays where it is put)
    config = fedala.Config(eta=1e-12, threshold=1e-12, num_pre_loss=10, max_first_passes=3)
    a, payload, _ = _round_one(config)
    a.receive(payload, 2)
    assert a.ala_passes == 3

    a.train(2)
    local = [p.detach().clone() for p in a.model.parameters()]
    a.weights = [torch.full_like(w, 0.5) for w in a.weights]  # hand-set W, read by the next ALA
    a.receive(payload, 3)
    assert a.ala_passes == 1
    glob = _global(payload)
    for p, loc, g in zip([a.model.head.weight, a.model.head.bias], local[-2:], glob[-2:]):
        torch.testing.assert_close(p.detach(), loc + 0.5 * (g - loc))  # warm start: W = 0.5, not reset to 1


def test_first_ala_stops_when_pass_losses_settle():
    a, payload, _ = _round_one(fedala.Config(threshold=1e3, num_pre_loss=2, max_first_passes=20))
    a.receive(payload, 2)
    assert a.ala_passes == 2


def test_layer_idx_counts_parameter_tensors():
    a, payload, local = _round_one(fedala.Config(layer_idx=4, max_first_passes=1))
    a.receive(payload, 2)
    params = list(a.model.parameters())
    assert [w.shape for w in a.weights] == [p.shape for p in params[-4:]]
    for p, g in zip(params[:-4], _global(payload)[:-4]):
        torch.testing.assert_close(p.detach(), g)


def test_upload_is_local_model_times_n_and_scores_are_probabilities():
    client = fedala.Client(tiny_setup(n=12), fedala.Config())
    up = client.train(1)
    params = dict(client.model.named_parameters())
    assert set(up.sums) == {f"w.{k}" for k in params} | {"n"}
    assert float(up.sums["n"]) == 12.0
    torch.testing.assert_close(up.sums["w.head.weight"], params["head.weight"].detach() * 12)
    x = torch.stack([client.setup.data.test[i][0] for i in range(3)])
    p = client.scores(x)
    torch.testing.assert_close(p.sum(1), torch.ones(3))
    torch.testing.assert_close(client.scores(x), p)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("layer_idx", 0),
        ("rand_percent", 0),
        ("rand_percent", 101),
        ("num_pre_loss", 1),
        ("max_first_passes", 0),
        ("eta", 0.0),
        ("threshold", 0.0),
    ],
)
def test_bad_config_is_refused(field, value):
    with pytest.raises(ValidationError, match=field):
        fedala.Config(**{field: value})


def test_layer_idx_above_the_model_is_refused():
    with pytest.raises(ValueError, match="layer_idx: must be ≤ 18"):
        fedala.Client(tiny_setup(), fedala.Config(layer_idx=19))
