"""FedDistill: per-class logit sums from the training outputs, sites finish the mean, KL distillation."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from medsilo.components.algorithms import feddistill
from tests.helpers import aggregate, tiny_setup


def _recorded_training_logits(client, rnd: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train ``client`` for round ``rnd`` while a forward hook records every head output; returns the
    recorded logits ``(N, K)``, their labels ``(N,)`` (replayed from the seeded loader) and the upload."""
    seen: list[torch.Tensor] = []
    hook = client.model.head.register_forward_hook(lambda m, i, out: seen.append(out.detach().clone()))
    try:
        up = client.train(rnd)
    finally:
        hook.remove()
    loader = client.train_loader(rnd)  # one loader for all epochs, as in the shared loop
    labels = torch.cat([y for _ in range(client.setup.training.local_epochs) for _, y in loader])
    return torch.cat(seen), labels, up


def test_samples_upload_is_the_per_class_sum_of_the_logits_the_loop_produced():
    # Prepare: 2 local epochs, so every image is seen twice by a moving model
    client = feddistill.Client(tiny_setup(n=12, local_epochs=2), feddistill.Config(weighting="samples"))
    # Execute
    logits, labels, up = _recorded_training_logits(client, 1)
    # Assert: keys, shapes, dtypes; sums and counts equal the hand-summed recorded outputs
    assert set(up.sums) == {"logit_sum", "logit_count"}
    assert up.sums["logit_sum"].shape == (3, 3) and up.sums["logit_sum"].dtype == torch.float32
    assert up.sums["logit_count"].shape == (3,) and up.sums["logit_count"].dtype == torch.float32
    expected = torch.stack([logits[labels == k].sum(0) for k in range(3)])
    torch.testing.assert_close(up.sums["logit_sum"], expected)
    assert up.sums["logit_count"].tolist() == [8.0, 8.0, 8.0]  # 4 images per class × 2 epochs
    # the model moved: the final model's outputs on the same batches sum to something else
    with torch.no_grad():
        client.model.train()
        loader = client.train_loader(1)
        final = torch.cat([client.model(x) for _ in range(2) for x, _ in loader])
    final_sums = torch.stack([final[labels == k].sum(0) for k in range(3)])
    assert not torch.allclose(final_sums, expected, atol=1e-3)


def test_sites_upload_is_the_per_class_mean_with_presence_indicators():
    client = feddistill.Client(tiny_setup(n=12), feddistill.Config())  # default: weighting = "sites"
    logits, labels, up = _recorded_training_logits(client, 1)
    expected = torch.stack([logits[labels == k].mean(0) for k in range(3)])
    torch.testing.assert_close(up.sums["logit_sum"], expected)
    assert up.sums["logit_count"].tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("weighting", ["sites", "samples"])
def test_absent_class_gives_a_zero_row_and_zero_count_and_training_stays_finite(weighting):
    # Prepare: K = 3, both sites' training data hold classes 0 and 2 only (class 1 absent everywhere)
    cfg = feddistill.Config(weighting=weighting)
    a = feddistill.Client(tiny_setup("a", n=8, seed=1, labels=[0, 2]), cfg)
    b = feddistill.Client(tiny_setup("b", n=4, seed=2, labels=[0, 2]), cfg)
    # Execute
    ua, ub = a.train(1), b.train(1)
    payload = feddistill.Server(cfg, 3, ["a", "b"]).update(aggregate([ua.sums, ub.sums]), 1)
    a.receive(payload, 2)
    up2 = a.train(2)
    # Assert
    assert torch.equal(ua.sums["logit_sum"][1], torch.zeros(3))
    assert float(ua.sums["logit_count"][1]) == 0.0
    assert float(ua.sums["logit_count"][0]) == (1.0 if weighting == "sites" else 4.0)
    assert a.has_global.tolist() == [True, False, True]
    assert torch.isfinite(a.global_logits).all() and torch.equal(a.global_logits[1], torch.zeros(3))
    assert all(torch.isfinite(t).all() for t in up2.sums.values()) and math.isfinite(up2.train_loss)


def test_sites_and_samples_weighting_by_hand():
    # Prepare: class 0 logits: site A three outputs averaging [3, 0, 0], site B one output [0, 3, 0];
    # class 1 only at site A ([0, 0, 6] once); class 2 nowhere
    labels_a, labels_b = torch.tensor([0, 0, 0, 1]), torch.tensor([0])
    logits_a = torch.tensor([[2.0, 0, 0], [3, 0, 0], [4, 0, 0], [0, 0, 6]])
    logits_b = torch.tensor([[0.0, 3, 0]])
    acc = {}
    for site, logits, labels in (("a", logits_a, labels_a), ("b", logits_b, labels_b)):
        sums, counts = torch.zeros(3, 3), torch.zeros(3)
        feddistill.add_class_sums(sums, counts, logits, labels)
        acc[site] = (sums, counts)
    # Execute
    means = {}
    for weighting in ("sites", "samples"):
        rows = [feddistill.site_rows(*acc[s], weighting) for s in ("a", "b")]
        means[weighting] = feddistill.global_logits(rows[0][0] + rows[1][0], rows[0][1] + rows[1][1])
    # Assert: sites = unweighted mean of the two site means; samples = pooled mean of four outputs
    sites, present = means["sites"]
    torch.testing.assert_close(sites, torch.tensor([[1.5, 1.5, 0], [0, 0, 6], [0, 0, 0]]))
    samples, present_s = means["samples"]
    torch.testing.assert_close(samples, torch.tensor([[2.25, 0.75, 0], [0, 0, 6], [0, 0, 0]]))
    assert present.tolist() == present_s.tolist() == [True, True, False]


def test_global_logits_treat_counts_below_one_half_as_absent():
    sums = torch.tensor([[1e-3, 0, 0], [4.0, 2, 0], [0, 0, 0]])
    rows, present = feddistill.global_logits(sums, torch.tensor([0.01, 2.0, 0.0]))  # 0.01: noise, no site
    assert present.tolist() == [False, True, False]
    torch.testing.assert_close(rows, torch.tensor([[0.0, 0, 0], [2, 1, 0], [0, 0, 0]]))


def test_distillation_is_zero_on_agreement_positive_otherwise_and_zero_without_a_global_logit():
    # Prepare: K = 3; class 0 has global logits, class 1 has none
    targets = torch.tensor([[0.0, 0.0, math.log(2.0)], [0, 0, 0], [0, 0, 0]])
    present = torch.tensor([True, False, False])
    t = 1.0
    # Execute / Assert: equal logits → 0 (also shifted by a constant: same softmax)
    same = feddistill.distillation(targets[[0]] + 5.0, torch.tensor([0]), targets, present, t)
    assert abs(float(same)) < 1e-6
    # uniform logits vs p = [1/4, 1/4, 1/2]: KL(p ‖ q) by hand, halved by the class-1 sample's 0
    logits = torch.zeros(2, 3)
    value = feddistill.distillation(logits, torch.tensor([0, 1]), targets, present, t)
    p = torch.tensor([0.25, 0.25, 0.5])
    assert float(value) == pytest.approx(float((p * (p / (1 / 3)).log()).sum()) / 2, rel=1e-5)
    assert float(value) > 0
    # a class without a global logit contributes exactly 0 and no gradient
    z = torch.randn(4, 3, requires_grad=True)
    none = feddistill.distillation(z, torch.tensor([1, 1, 2, 2]), targets, present, t)
    none.backward()
    assert float(none.detach()) == 0.0 and torch.equal(z.grad, torch.zeros(4, 3))


def test_distillation_temperature_scales_by_t_squared():
    targets = torch.tensor([[2.0, 0.0, -1.0], [0, 0, 0], [0, 0, 0]])
    present = torch.tensor([True, True, True])
    logits = torch.tensor([[0.5, 1.0, 0.0]])
    value = feddistill.distillation(logits, torch.tensor([0]), targets, present, 2.0)
    p, q = torch.softmax(targets[0] / 2, 0), torch.softmax(logits[0] / 2, 0)
    assert float(value) == pytest.approx(4 * float((p * (p / q).log()).sum()), rel=1e-5)


def test_extra_loss_uses_the_received_global_logits_and_lambda():
    # Prepare: a client that received global logits for class 0 only
    client = feddistill.Client(tiny_setup(), feddistill.Config(distill_weight=3.0))
    sums = torch.tensor([[1.0, 0, 0], [0, 0, 0], [0, 0, 0]])
    client.receive({"logit_sum": sums, "logit_count": torch.tensor([1.0, 0, 0])}, 2)
    extra = client.distill_loss(torch.zeros(3, 3), torch.zeros(3))
    # Execute / Assert
    logits = torch.zeros(2, 3)
    expected = 3.0 * feddistill.distillation(
        logits, torch.tensor([0, 1]), sums, torch.tensor([True, False, False]), 1
    )
    torch.testing.assert_close(extra(torch.zeros(2, 4), logits, torch.tensor([0, 1])), expected)
    assert float(extra(torch.zeros(1, 4), torch.tensor([[1.0, 0, 0]]), torch.tensor([0]))) == pytest.approx(
        0.0, abs=1e-6
    )
    assert float(extra(torch.zeros(1, 4), torch.randn(1, 3), torch.tensor([2]))) == 0.0


def test_receive_none_keeps_model_and_no_global_logits():
    setup = tiny_setup()
    before = {k: v.clone() for k, v in setup.model.state_dict().items()}
    client = feddistill.Client(setup, feddistill.Config())
    client.receive(None, 1)
    assert not client.has_global.any()
    for k, v in setup.model.state_dict().items():
        assert torch.equal(v, before[k])


def test_two_backbone_round_train_server_receive_scores():
    # Prepare: a cnn site and a resnet18 site (same d and K), different label sets
    cfg = feddistill.Config()
    a = feddistill.Client(tiny_setup("a", n=8, seed=1, backbone="cnn", labels=[0, 1]), cfg)
    b = feddistill.Client(tiny_setup("b", n=8, seed=2, backbone="resnet18"), cfg)
    server = feddistill.Server(cfg, 3, ["a", "b"])
    # Execute: round 1, aggregate, round 2 with distillation
    ua, ub = a.train(1), b.train(1)
    payload = server.update(aggregate([ua.sums, ub.sums]), 1)
    for c in (a, b):
        c.receive(payload, 2)
    ua2 = a.train(2)
    # Assert: uploads have the same shapes; the class-2 global logit comes from b alone
    assert {k: v.shape for k, v in ua.sums.items()} == {k: v.shape for k, v in ub.sums.items()}
    torch.testing.assert_close(a.global_logits[2], ub.sums["logit_sum"][2])
    torch.testing.assert_close(a.global_logits, b.global_logits)
    assert a.has_global.all() and math.isfinite(ua2.train_loss)
    x = a.setup.data.test.images[:4]
    for c in (a, b):
        p = c.scores(x)
        assert p.shape == (4, 3)
        torch.testing.assert_close(p.sum(1), torch.ones(4))


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"weighting": "clients"}, "weighting"),
        ({"temperature": 0}, "temperature"),
        ({"distill_weight": -1}, "distill"),
    ],
)
def test_config_rejects_bad_values(params, match):
    with pytest.raises(ValidationError, match=match):
        feddistill.Config(**params)


def test_config_warns_when_distillation_is_off():
    with pytest.warns(UserWarning, match="distill_weight = 0"):
        feddistill.Config(distill_weight=0)
