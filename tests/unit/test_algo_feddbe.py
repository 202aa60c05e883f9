"""FedDBE: the mean regulariser and PRBM by hand; μ_g fixed once as the n-weighted mean; m̄_i stays local."""

from __future__ import annotations

import warnings

import pydantic
import pytest
import torch

from medsilo.components.algorithms import feddbe
from medsilo.errors import MedsiloError
from tests.helpers import aggregate, tiny_setup


def _train_images(setup) -> torch.Tensor:
    return torch.stack([setup.data.train[i][0] for i in range(setup.n_train)])


def test_mean_regulariser_by_hand():
    mean = torch.tensor([1.0, 2.0, 0.0, -2.0])
    global_mean = torch.tensor([0.0, 0.0, 1.0, 0.0])
    # differences (1, 2, −1, −2) → ½·(1 + 4 + 1 + 4) / 4 = 1.25 → × κ = 50
    assert float(feddbe.mean_regulariser(mean, global_mean, 50.0)) == pytest.approx(62.5)
    assert float(feddbe.mean_regulariser(mean, global_mean, 0.0)) == 0.0


def test_ema_and_bias_correction_by_hand():
    b1, b2 = torch.tensor([1.0]), torch.tensor([4.0])
    step1 = feddbe.ema(torch.zeros(1), b1, 0.5)  # 0.5
    step2 = feddbe.ema(step1, b2, 0.5)  # 0.25 + 2 = 2.25
    torch.testing.assert_close(step2, torch.tensor([2.25]))
    torch.testing.assert_close(feddbe.debias(step1, 0.5, 1), b1)  # 0.5 / (1 − 0.5)
    torch.testing.assert_close(feddbe.debias(step2, 0.5, 2), torch.tensor([3.0]))  # 2.25 / 0.75
    torch.testing.assert_close(feddbe.debias(b2, 1.0, 7), b2)  # m = 1: the batch mean itself


def test_forward_uses_prbm_and_regularises_the_debiased_running_mean():
    # Prepare: μ_g and m̄_i set by hand, m = 0.5, κ = 50
    setup = tiny_setup(n=12)
    client = feddbe.Client(setup, feddbe.Config(momentum=0.5, kl_weight=50.0))
    client.global_mean = torch.tensor([0.1, -0.2, 0.3, 0.0])
    with torch.no_grad():
        client.prbm.copy_(torch.tensor([1.0, -1.0, 0.5, 2.0]))
    x = _train_images(setup)
    x1, x2 = x[:4], x[4:8]
    model = setup.model.eval()  # eval mode: features do not depend on the batch, so they can be recomputed
    z1, z2 = model.features(x1).detach(), model.features(x2).detach()
    client.reset_running_mean()
    # Execute
    logits1, extra1 = client.dbe_forward(x1, torch.zeros(4, dtype=torch.long))
    logits2, extra2 = client.dbe_forward(x2, torch.zeros(4, dtype=torch.long))
    # Assert: logits = h(z + m̄_i)
    torch.testing.assert_close(logits1, model.head(z1 + client.prbm))
    # batch 1: debiased mean = mean(z1); batch 2: (0.25·mean(z1) + 0.5·mean(z2)) / 0.75
    mu1 = z1.mean(0)
    mu2 = (0.25 * z1.mean(0) + 0.5 * z2.mean(0)) / 0.75
    torch.testing.assert_close(extra1, 50 * (0.5 * (mu1 - client.global_mean) ** 2).mean())
    torch.testing.assert_close(extra2, 50 * (0.5 * (mu2 - client.global_mean) ** 2).mean())
    # the stored running mean is detached (gradient only through the current batch)
    torch.testing.assert_close(client.running_mean, 0.25 * z1.mean(0) + 0.5 * z2.mean(0))
    assert not client.running_mean.requires_grad and client.batches == 2
    # the regulariser does not reach the PRBM; the task path does
    (grad_prbm,) = torch.autograd.grad(extra2, client.prbm, allow_unused=True)
    assert grad_prbm is None or torch.count_nonzero(grad_prbm) == 0


def test_running_mean_restarts_at_zero_every_round():
    # Prepare: m = 0.5 so a stale μ_i would matter; n = 12, batch 4 → 3 batches per round
    client = feddbe.Client(tiny_setup(n=12, batch_size=4), feddbe.Config(momentum=0.5))
    client.global_mean = torch.zeros(4)
    client.train(2)
    assert client.batches == 3 and torch.count_nonzero(client.running_mean) > 0
    seen: list[tuple[int, torch.Tensor]] = []
    forward = client.dbe_forward

    def spy(x, y):
        seen.append((client.batches, client.running_mean.clone()))
        return forward(x, y)

    client.dbe_forward = spy
    # Execute
    client.train(3)
    # Assert: the first batch of round 3 starts from μ_i = 0, t = 0
    assert seen[0][0] == 0 and torch.count_nonzero(seen[0][1]) == 0
    assert client.batches == 3


def test_round1_is_fedavg_plus_the_feature_sum():
    # Prepare
    setup = tiny_setup(n=12)
    client = feddbe.Client(setup, feddbe.Config())
    # Execute
    up = client.train(1)
    # Assert: w.* × n, n, and Σ φ(x) over the 12 training images (eval mode)
    params = dict(setup.model.named_parameters())
    assert set(up.sums) == {f"w.{k}" for k in params} | {"n", "dbe.mean_sum"}
    torch.testing.assert_close(up.sums["w.head.weight"], params["head.weight"].detach() * 12)
    setup.model.eval()
    with torch.no_grad():
        expected = setup.model.features(_train_images(setup)).sum(0)
    assert up.sums["dbe.mean_sum"].shape == (4,)
    torch.testing.assert_close(up.sums["dbe.mean_sum"], expected)
    assert torch.count_nonzero(client.prbm) == 0  # no PRBM training in the warm-up round


def test_global_mean_is_set_once_as_the_n_weighted_mean():
    # Prepare: sites with n = 12 and 4
    a = feddbe.Client(tiny_setup("a", n=12, seed=1), feddbe.Config())
    b = feddbe.Client(tiny_setup("b", n=4, seed=2), feddbe.Config())
    server = feddbe.Server(feddbe.Config(), 3, ["a", "b"])
    ua, ub = a.train(1), b.train(1)
    mean_a, mean_b = ua.sums["dbe.mean_sum"] / 12, ub.sums["dbe.mean_sum"] / 4
    head_a, head_b = a.model.head.weight.detach().clone(), b.model.head.weight.detach().clone()
    # Execute: round 2's payload carries μ_g
    payload = server.update(aggregate([ua.sums, ub.sums]), 1)
    a.receive(payload, 2)
    b.receive(payload, 2)
    # Assert: μ_g = (12 μ_a + 4 μ_b) / 16 at both sites; the model is the n-weighted mean
    expected = (12 * mean_a + 4 * mean_b) / 16
    torch.testing.assert_close(a.global_mean, expected)
    torch.testing.assert_close(b.global_mean, expected)
    torch.testing.assert_close(a.model.head.weight, (12 * head_a + 4 * head_b) / 16)
    # later rounds upload no feature sum, and a later payload cannot move μ_g
    ua2, ub2 = a.train(2), b.train(2)
    assert "dbe.mean_sum" not in ua2.sums and "dbe.mean_sum" not in ub2.sums
    later = server.update(aggregate([ua2.sums, ub2.sums]), 2)
    later["dbe.mean_sum"] = torch.full((4,), 100.0)
    a.receive(later, 3)
    torch.testing.assert_close(a.global_mean, expected)


def test_prbm_is_trained_kept_and_never_uploaded():
    a = feddbe.Client(tiny_setup("a", n=12, seed=1), feddbe.Config())
    b = feddbe.Client(tiny_setup("b", n=4, seed=2), feddbe.Config())
    payload = aggregate([a.train(1).sums, b.train(1).sums])
    a.receive(payload, 2)
    b.receive(payload, 2)
    up = a.train(2)
    prbm = a.prbm.detach().clone()
    assert torch.count_nonzero(prbm) > 0  # trained from round 2 on
    assert set(up.sums) == {f"w.{k}" for k, _ in a.model.named_parameters()} | {"n"}
    a.receive(aggregate([up.sums, b.train(2).sums]), 3)
    assert torch.equal(a.prbm.detach(), prbm)  # receive leaves it alone


def test_scores_are_deterministic_probabilities_with_the_prbm():
    setup = tiny_setup()
    client = feddbe.Client(setup, feddbe.Config())
    with torch.no_grad():
        client.prbm.copy_(torch.tensor([3.0, -3.0, 1.0, 0.0]))
    x = setup.data.test.images[:4]
    p = client.scores(x)
    torch.testing.assert_close(p.sum(1), torch.ones(4))
    assert torch.equal(p, client.scores(x))
    with torch.no_grad():
        expected = torch.softmax(setup.model.head(setup.model.features(x) + client.prbm), dim=1)
    torch.testing.assert_close(p, expected)
    assert not torch.allclose(p, torch.softmax(setup.model(x), dim=1))


def test_round2_without_global_mean_is_refused():
    client = feddbe.Client(tiny_setup(site="late"), feddbe.Config())
    with pytest.raises(MedsiloError, match="site 'late'.*round 2.*global mean"):
        client.train(2)


def test_config_defaults_bounds_and_off_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = feddbe.Config()
    assert (config.kl_weight, config.momentum) == (50.0, 1.0)
    with pytest.warns(UserWarning, match="kl_weight = 0"):
        feddbe.Config(kl_weight=0)
    for bad in ({"momentum": 0.0}, {"momentum": 1.5}, {"kl_weight": -1.0}):
        with pytest.raises(pydantic.ValidationError, match=next(iter(bad))):
            feddbe.Config(**bad)
