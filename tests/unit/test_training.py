"""The shared training loop and evaluation metrics."""

from __future__ import annotations

import math

import pytest
import torch

from medsilo.components.training import (
    classification_metrics,
    local_epochs,
    make_optimizer,
    predict,
    recalibrate_batchnorm,
)
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
