"""The shared training loop and evaluation metrics."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from medsilo.components.algorithms import fedavg
from medsilo.components.toy import tiny_setup
from medsilo.components.training import (
    balanced_class_weights,
    classification_metrics,
    local_epochs,
    lr_factor,
    make_optimizer,
    per_record_gradients,
    predict,
    private_epochs,
    recalibrate_batchnorm,
)
from medsilo.config import JobSpec
from medsilo.medical.models import build_model


def _toy_loader(n: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = torch.randn(n, 1, 16, 16, generator=g) * 0.3
    x[y == 1, :, :8] += 1.0  # class 1 has a bright top half
    ds = torch.utils.data.TensorDataset(x, y)
    return torch.utils.data.DataLoader(ds, batch_size=16, shuffle=True, generator=g)


def test_metrics_by_hand():
    probs = torch.tensor([[0.9, 0.1], [0.4, 0.6], [0.35, 0.65], [0.2, 0.8]])
    labels = torch.tensor([0, 0, 1, 1])
    m = classification_metrics(probs, labels)
    assert m["acc"] == 0.75
    # positives' scores {0.65, 0.8} vs negatives' {0.1, 0.6}: all 4 pairs ordered -> AUROC 1
    assert m["auroc"] == 1.0
    m = classification_metrics(torch.tensor([[0.3, 0.7], [0.6, 0.4]]), torch.tensor([0, 1]))
    assert m["acc"] == 0.0 and m["auroc"] == 0.0


def test_auroc_of_a_multiclass_job_at_a_site_with_two_classes():
    probs = torch.tensor([[0.1, 0.2, 0.7], [0.2, 0.6, 0.2], [0.3, 0.1, 0.6], [0.1, 0.8, 0.1]])
    labels = torch.tensor([2, 1, 1, 2])  # class 0 absent
    # P(2 | 1 or 2): the 2s score 0.78 and 0.11, the 1s 0.25 and 0.86: one of four (2, 1) pairs ordered
    m = classification_metrics(probs, labels)
    assert m["auroc"] == 0.25 and m["acc"] == 0.5


def test_multiclass_and_single_class_auroc():
    probs = torch.tensor([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8], [0.6, 0.3, 0.1]])
    labels = torch.tensor([0, 1, 2, 0])
    assert classification_metrics(probs, labels)["auroc"] == 1.0
    single = classification_metrics(probs[:2], torch.tensor([0, 0]))
    assert single["acc"] == 0.5 and math.isnan(single["auroc"])


def test_local_epochs_learns_a_separable_task():
    model = build_model("cnn", in_channels=1, num_classes=2, feature_dim=8, seed=0)
    loader = _toy_loader()
    before = classification_metrics(*predict(model, loader))["acc"]
    opt = make_optimizer(model.parameters(), name="adam", lr=1e-2)
    loss = local_epochs(model, loader, opt, epochs=5)
    after = classification_metrics(*predict(model, loader))["acc"]
    assert loss < 0.69 and after >= 0.95 and after > before


def test_extra_loss_is_added_and_sees_features():
    seen = {}

    def push_class_1_down(features, logits, labels):
        seen["shapes"] = (tuple(features.shape), tuple(logits.shape), tuple(labels.shape))
        return 5.0 * logits[:, 1].mean()

    def margin(extra):
        model = build_model("cnn", in_channels=1, num_classes=2, feature_dim=8, seed=0)
        opt = make_optimizer(model.parameters(), lr=0.01)
        local_epochs(model, _toy_loader(), opt, epochs=2, extra_loss=extra)
        probs, _ = predict(model, _toy_loader())
        return float(probs[:, 1].mean())

    assert margin(push_class_1_down) < margin(None) - 0.2
    assert seen["shapes"] == ((16, 8), (16, 2), (16,))


def test_non_finite_loss_stops_training():
    model = build_model("cnn", in_channels=1, num_classes=2, feature_dim=8, seed=0)
    opt = make_optimizer(model.parameters(), lr=0.01)
    with pytest.raises(FloatingPointError, match="not finite"):
        local_epochs(model, _toy_loader(), opt, epochs=1, extra_loss=lambda f, logits, y: torch.tensor(float("nan")))


def test_unknown_optimizer():
    with pytest.raises(ValueError, match="optimizer: must be one of"):
        make_optimizer([torch.nn.Parameter(torch.zeros(1))], name="lbfgs")


def test_recalibrate_batchnorm_changes_statistics_not_weights():
    model = build_model("cnn", in_channels=1, num_classes=2, feature_dim=8, seed=0)
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    shifted = [(x + 5.0, y) for x, y in _toy_loader()]
    recalibrate_batchnorm(model, shifted)
    assert bn.running_mean.abs().sum() > 0 and bn.momentum == 0.1
    for k, v in model.state_dict().items():
        if k in weights:
            torch.testing.assert_close(v, weights[k])
    assert not model.training


# ---- DP-SGD ------------------------------------------------------------------------------------------------


def _toy_data(n: int = 12, seed: int = 0) -> torch.utils.data.TensorDataset:
    return _toy_loader(n, seed).dataset


def _pull_features_to_label(features: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor):
    """An extra loss that reads features, logits and labels of its record."""
    return (features - labels[:, None].float()).pow(2).mean() + 0.1 * logits.pow(2).mean()


def test_per_record_gradients_equal_autograd_on_each_record_alone():
    # Prepare
    model = build_model("cnn", in_channels=1, num_classes=2, feature_dim=8, seed=0)
    x, y = _toy_data(n=5).tensors
    # Execute
    grads, losses = per_record_gradients(model, x, y, extra_loss=_pull_features_to_label)
    # Assert: record i's gradient is that of its own loss, computed by plain autograd (eval mode)
    assert not model.training
    for i in range(5):
        model.zero_grad()
        features = model.features(x[i : i + 1])
        logits = model.head(features)
        task = torch.nn.functional.cross_entropy(logits, y[i : i + 1])
        (task + _pull_features_to_label(features, logits, y[i : i + 1])).backward()
        assert float(losses[i]) == pytest.approx(float(task.detach()), rel=1e-5)
        for name, p in model.named_parameters():
            torch.testing.assert_close(grads[name][i], p.grad, rtol=1e-4, atol=1e-6)


def test_private_epochs_one_step_is_the_hand_written_dp_sgd_step():
    # Prepare: N = 12, B = 3 -> q = 1/4; epochs chosen so T = 4 steps; plain SGD with lr 0.5
    data = _toy_data(n=12)
    model = build_model("cnn", in_channels=1, num_classes=2, feature_dim=8, seed=0)
    start = {k: p.detach().clone() for k, p in model.named_parameters()}
    clip, sigma, lr = 0.05, 0.7, 0.5
    # Execute: one epoch of the shared loop from a seeded generator
    private_epochs(model, data, make_optimizer(model.parameters(), lr=lr, momentum=0.0), epochs=1, batch_size=3,
                   grad_clip=clip, noise_multiplier=sigma, generator=torch.Generator().manual_seed(7))  # fmt: skip
    # Assert: replay the documented draw order (Poisson draw, then noise per parameter) by hand
    expected = build_model("cnn", in_channels=1, num_classes=2, feature_dim=8, seed=0)
    g = torch.Generator().manual_seed(7)
    for _ in range(4):
        keep = torch.rand(12, generator=g, dtype=torch.float64) < 0.25
        total = {k: torch.zeros(p.shape, dtype=torch.float64) for k, p in expected.named_parameters()}
        for i in torch.nonzero(keep).flatten().tolist():
            expected.zero_grad()
            x, y = data[i]
            torch.nn.functional.cross_entropy(expected.eval()(x[None]), y[None]).backward()
            norm = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in expected.parameters()))
            for k, p in expected.named_parameters():
                total[k] += p.grad.double() * min(1.0, clip / norm)
        with torch.no_grad():
            for k, p in expected.named_parameters():
                noise = torch.randn(p.shape, generator=g, dtype=torch.float64) * sigma * clip
                p -= (lr * (total[k] + noise) / 3).float()
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected.get_parameter(k).detach(), rtol=1e-4, atol=1e-6)
        assert not torch.equal(p.detach(), start[k])


def test_private_epochs_with_little_noise_learns_and_keeps_batchnorm_statistics():
    model = build_model("cnn", in_channels=1, num_classes=2, feature_dim=8, seed=0)
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    loader = _toy_loader()
    before = classification_metrics(*predict(model, loader))["acc"]
    opt = make_optimizer(model.parameters(), name="adam", lr=1e-2)
    private_epochs(model, loader.dataset, opt, epochs=3, batch_size=16, grad_clip=1.0, noise_multiplier=0.1,
                   generator=torch.Generator().manual_seed(0), extra_loss=_pull_features_to_label)  # fmt: skip
    after = classification_metrics(*predict(model, loader))["acc"]
    assert after >= 0.9 and after > before
    for k, v in model.state_dict().items():
        if k in stats:
            assert torch.equal(v, stats[k]), k


def test_private_epochs_refuses_batchnorm_statistics_that_may_come_from_data():
    opt = lambda m: make_optimizer(m.parameters(), lr=0.01)  # noqa: E731
    kwargs = dict(epochs=1, batch_size=4, grad_clip=1.0, noise_multiplier=1.0, generator=torch.Generator())
    seen = build_model("cnn", in_channels=1, num_classes=2, feature_dim=8, seed=0)
    seen.train()(_toy_data().tensors[0])  # a train-mode pass estimates statistics from the data
    with pytest.raises(ValueError, match=r"BatchNorm 'base\.backbone\.1' has tracked 1 batch"):
        private_epochs(seen, _toy_data(), opt(seen), **kwargs)
    batch_stats = build_model("cnn", in_channels=1, num_classes=2, feature_dim=8, seed=0)
    batch_stats.base.backbone[1].track_running_stats = False
    with pytest.raises(ValueError, match="uses batch statistics even in eval mode"):
        private_epochs(batch_stats, _toy_data(), opt(batch_stats), **kwargs)


def test_private_epochs_refuses_non_finite_losses_and_foreign_parameters():
    model = build_model("cnn", in_channels=1, num_classes=2, feature_dim=8, seed=0)
    kwargs = dict(epochs=1, batch_size=12, grad_clip=1.0, noise_multiplier=1.0, generator=torch.Generator())
    with pytest.raises(FloatingPointError, match="not finite"):
        private_epochs(model, _toy_data(), make_optimizer(model.parameters(), lr=0.01),
                       extra_loss=lambda f, logits, y: torch.tensor(float("nan")), **kwargs)  # fmt: skip
    foreign = make_optimizer([torch.nn.Parameter(torch.zeros(3))], lr=0.01)
    with pytest.raises(ValueError, match="steps 1 tensor.* not parameters of the model"):
        private_epochs(model, _toy_data(), foreign, **kwargs)


class _Reads(torch.utils.data.Dataset):
    """A dataset recording which records are read."""

    def __init__(self, data: torch.utils.data.TensorDataset):
        self.data, self.read = data, []

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        self.read.append(index)
        return self.data[index]


def test_private_epochs_takes_every_step_even_on_an_empty_poisson_batch():
    # Prepare: N = 64, B = 1 -> q = 1/64, T = 64 steps; about a third of them draw no record
    model = build_model("cnn", in_channels=1, num_classes=2, feature_dim=8, seed=0)
    data = _Reads(_toy_data(n=64))
    opt = make_optimizer(model.head.parameters(), lr=0.1, momentum=0.0)
    reads_per_step = []
    step = opt.step

    def counted_step(*args, **kwargs):
        reads_per_step.append(len(data.read) - sum(reads_per_step))
        return step(*args, **kwargs)

    opt.step = counted_step
    start = model.head.weight.detach().clone()
    # Execute
    private_epochs(model, data, opt, epochs=1, batch_size=1, grad_clip=1.0, noise_multiplier=1.0,
                   generator=torch.Generator().manual_seed(0))  # fmt: skip
    # Assert: T steps, some of them on noise alone; only the head (the optimizer's parameters) moved
    assert len(reads_per_step) == 64 and reads_per_step.count(0) >= 10
    assert not torch.equal(model.head.weight.detach(), start)


# ---- the training recipe a job chooses (schedules, clipping, class weights) and balanced accuracy --------


def test_balanced_accuracy_is_not_fooled_by_a_majority_class_predictor():
    labels = torch.tensor([0] * 9 + [1])
    constant = torch.tensor([[0.9, 0.1]] * 10)  # always class 0
    m = classification_metrics(constant, labels)
    assert m["acc"] == 0.9 and m["balanced_acc"] == 0.5
    right = torch.tensor([[0.9, 0.1]] * 8 + [[0.1, 0.9]] * 2)  # one 0 wrong, the 1 right
    assert classification_metrics(right, labels)["balanced_acc"] == pytest.approx((8 / 9 + 1) / 2)


@pytest.mark.parametrize(("schedule", "kwargs", "expected"), [
    ("constant", {}, [1, 1, 1, 1, 1]),
    ("cosine", {}, [1, 0.5 * (1 + math.cos(math.pi / 5)), 0.5 * (1 + math.cos(2 * math.pi / 5)),
                    0.5 * (1 + math.cos(3 * math.pi / 5)), 0.5 * (1 + math.cos(4 * math.pi / 5))]),
    ("cosine", {"warmup": 2}, [0.5, 1, 1, 0.5 * (1 + math.cos(math.pi / 3)), 0.5 * (1 + math.cos(2 * math.pi / 3))]),
    ("step", {"step_rounds": 2, "step_gamma": 0.1}, [1, 1, 0.1, 0.1, 0.01]),
])  # fmt: skip
def test_learning_rate_schedules_over_rounds(schedule, kwargs, expected):
    got = [lr_factor(schedule, r, 5, **kwargs) for r in range(1, 6)]
    assert got == pytest.approx(expected)
    assert lr_factor(schedule, 6, 5, **kwargs) == got[-1]  # the final evaluation: the last round's
    assert all(g > 0 for g in got)  # never zero: the last round still trains


def test_a_client_trains_with_the_scheduled_rate_clips_and_weights_classes():
    setup = tiny_setup(n=12, num_classes=3, labels=[0, 0, 0, 0, 0, 1])  # 10 of class 0, 2 of class 1, none of 2
    t = setup.training.model_copy(update={"rounds": 4, "lr_schedule": "step", "lr_step_rounds": 1,
                                          "lr_step_gamma": 0.5, "grad_clip_norm": 1e-3, "class_weights": "balanced"})  # fmt: skip
    setup = dataclasses.replace(setup, training=t)
    client = fedavg.Client(setup, fedavg.Config())
    assert [client.optimizer(setup.model.parameters(), r).param_groups[0]["lr"] for r in (1, 2, 3)] == \
        pytest.approx([t.lr, t.lr / 2, t.lr / 4])  # fmt: skip
    weights = client.class_weight()
    assert weights.tolist() == pytest.approx([12 / (2 * 10), 12 / (2 * 2), 1.0])
    before = torch.nn.utils.parameters_to_vector(setup.model.parameters()).detach().clone()
    client.fit(1)
    moved = torch.nn.utils.parameters_to_vector(setup.model.parameters()).detach() - before
    steps = math.ceil(12 / setup.batch_size)  # every step's gradient clipped to 1e-3, SGD without momentum
    assert 0 < moved.norm() <= steps * t.lr * 1e-3 * (1 + 1e-4)
    assert balanced_class_weights(torch.tensor([0, 0, 4])).tolist() == [1.0, 1.0, 1.0]


def test_recipe_fields_are_validated_against_the_job():
    base = {"name": "r", "modality": "cxr", "classes": ["a", "b"], "dataset": "d", "algorithm": {"name": "fedavg"}}
    spec = JobSpec(**base, training={"rounds": 5, "lr_schedule": "cosine", "warmup_rounds": 1})
    assert spec.evaluation.select_on == "val_balanced_acc"  # the single-label default
    with pytest.raises(ValueError, match="warmup_rounds: 5 leaves no round after warm-up"):
        JobSpec(**base, training={"rounds": 5, "warmup_rounds": 5})
    with pytest.raises(ValueError, match="class_weights: 'balanced' weights depend on every training record"):
        JobSpec(**base, training={"class_weights": "balanced"},
                privacy={"mode": "dp", "dp": {"noise_multiplier": 1.0, "clip": 1.0}})  # fmt: skip
    with pytest.raises(ValueError, match="lr_schedule"):
        JobSpec(**base, training={"lr_schedule": "linear"})
    with pytest.raises(ValueError, match="val_macro_auroc' is for multi-label jobs"):
        JobSpec(**base, evaluation={"select_on": "val_macro_auroc"})


def test_a_rounds_override_shortens_a_warm_up_that_no_longer_fits():
    from medsilo.cli.sim import with_rounds

    base = {"name": "r", "modality": "cxr", "classes": ["a", "b"], "dataset": "d", "algorithm": {"name": "fedavg"}}
    spec = JobSpec(**base, training={"rounds": 20, "lr_schedule": "cosine", "warmup_rounds": 3})
    for rounds, warmup in ((10, 3), (3, 2), (1, 0)):
        short = with_rounds(spec, rounds)
        assert (short.training.rounds, short.training.warmup_rounds) == (rounds, warmup)
        JobSpec.model_validate(short.model_dump())  # still a spec the file could have given
