"""FedProx: the proximal gradient μ(w − w_g), one SGD step by hand, FedAvg's exchange, μ > 0."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from medsilo.components.algorithms import fedavg, fedprox
from medsilo.components.algorithms.base import proximal_term
from tests.helpers import aggregate, tiny_setup


def test_proximal_term_value_and_gradient_by_hand():
    # Prepare: w = [1, 2] and b = [-1], anchor w_g = [0, 4] and [1], μ = 0.5
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    b = torch.tensor([-1.0], requires_grad=True)
    anchor = [torch.tensor([0.0, 4.0]), torch.tensor([1.0])]
    # Execute
    term = proximal_term([w, b], anchor, 0.5)
    term.backward()
    # Assert: (0.5/2)·(1 + 4 + 4) = 2.25; gradient μ(w − w_g) = 0.5·[1, −2] and 0.5·[−2]
    assert float(term.detach()) == pytest.approx(2.25)
    torch.testing.assert_close(w.grad, torch.tensor([0.5, -1.0]))
    torch.testing.assert_close(b.grad, torch.tensor([-1.0]))


def test_one_sgd_step_is_minus_lr_times_ce_gradient_plus_mu_pull():
    # Prepare: one batch per epoch (n = batch = 4), plain SGD, two epochs so the second step sees w ≠ w_g
    lr, mu = 0.05, 3.0
    make = lambda: tiny_setup(n=4, batch_size=4, local_epochs=2, lr=lr)  # noqa: E731
    client = fedprox.Client(make(), fedprox.Config(mu=mu))
    w_g = {k: p.detach().clone() for k, p in client.model.named_parameters()}

    # Independent computation: plain SGD by hand on the same batches
    manual = make().model
    manual.train()
    loader = client.train_loader(1)  # the shared loop iterates this loader once per epoch
    batches = [batch for _ in range(2) for batch in loader]
    for step, (x, y) in enumerate(batches):
        manual.zero_grad()
        torch.nn.functional.cross_entropy(manual(x), y).backward()
        with torch.no_grad():
            for k, p in manual.named_parameters():
                pull = mu * (p - w_g[k])  # zero at the first step, where w = w_g
                if step == 0:
                    assert float(pull.abs().max()) == 0.0
                p -= lr * (p.grad + pull)

    # Execute
    client.train(1)

    # Assert: w₂ = w₁ − η(∇CE(w₁) + μ(w₁ − w_g)) for every parameter
    for k, p in client.model.named_parameters():
        torch.testing.assert_close(p, manual.state_dict()[k], atol=1e-5, rtol=1e-4)


def test_difference_from_fedavg_is_exactly_the_pull():
    # Same setup trained by FedAvg and FedProx for two one-batch epochs: step 1 is identical (w = w_g),
    # step 2 differs by −η μ (w₁ − w_g) and nothing else.
    lr, mu = 0.05, 2.0
    w_g = dict(tiny_setup(n=4, batch_size=4).model.named_parameters())
    one_step = fedavg.Client(tiny_setup(n=4, batch_size=4, local_epochs=1, lr=lr), fedavg.Config())
    plain = fedavg.Client(tiny_setup(n=4, batch_size=4, local_epochs=2, lr=lr), fedavg.Config())
    prox = fedprox.Client(tiny_setup(n=4, batch_size=4, local_epochs=2, lr=lr), fedprox.Config(mu=mu))
    one_step.train(1), plain.train(1), prox.train(1)
    w1 = dict(one_step.model.named_parameters())
    w2_plain = dict(plain.model.named_parameters())
    for k, p in prox.model.named_parameters():
        expected = w2_plain[k] - lr * mu * (w1[k] - w_g[k])
        torch.testing.assert_close(p, expected, atol=1e-5, rtol=1e-4)
    assert float((prox.model.head.weight - plain.model.head.weight).detach().abs().max()) > 1e-4


def test_upload_is_fedavg_shaped_sums():
    setup = tiny_setup(n=12)
    up = fedprox.Client(setup, fedprox.Config()).train(1)
    params = dict(setup.model.named_parameters())
    assert set(up.sums) == {f"w.{k}" for k in params} | {"n"}
    assert float(up.sums["n"]) == 12.0
    conv = "base.backbone.0.weight"
    torch.testing.assert_close(up.sums[f"w.{conv}"], params[conv].detach() * 12)
    assert up.train_loss > 0


def test_receive_recovers_weighted_mean_and_keeps_bn_statistics():
    a = fedprox.Client(tiny_setup("a", n=12, seed=1), fedprox.Config())
    b = fedprox.Client(tiny_setup("b", n=4, seed=2), fedprox.Config())
    ua, ub = a.train(1), b.train(1)
    expected = (12 * a.model.head.bias.detach() + 4 * b.model.head.bias.detach()) / 16
    buffers = {k: v.clone() for k, v in a.model.named_buffers()}
    payload = fedprox.Server(fedprox.Config(), 3, ["a", "b"]).update(aggregate([ua.sums, ub.sums]), 1)
    a.receive(payload, 2)
    torch.testing.assert_close(a.model.head.bias, expected)
    for k, v in a.model.named_buffers():
        torch.testing.assert_close(v, buffers[k])


def test_scores_are_deterministic_probabilities():
    client = fedprox.Client(tiny_setup(), fedprox.Config())
    client.train(1)
    x = torch.stack([client.setup.data.test[i][0] for i in range(3)])
    p = client.scores(x)
    assert p.shape == (3, 3)
    torch.testing.assert_close(p.sum(1), torch.ones(3))
    torch.testing.assert_close(client.scores(x), p)


def test_mu_must_not_be_negative():
    with pytest.raises(ValidationError, match="greater than or equal to 0"):
        fedprox.Config(mu=-0.1)


def test_mu_zero_the_reference_default_is_fedavg():
    prox = fedprox.Client(tiny_setup(n=8), fedprox.Config(mu=0.0)).train(1).sums
    plain = fedavg.Client(tiny_setup(n=8), fedavg.Config()).train(1).sums
    assert set(prox) == set(plain)
    for k in plain:
        torch.testing.assert_close(prox[k], plain[k], rtol=0, atol=0)
