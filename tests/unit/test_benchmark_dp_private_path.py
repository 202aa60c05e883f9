"""The private-path diagnostic's controls change only what they name: GroupNorm (8 groups, or the zoo's `cnn-in`)
leaves no BatchNorm, eval-mode SGD leaves BatchNorm statistics alone, the pooled site keeps every label, a site
scores with its own statistics only under ``--batchnorm site``, DP-SGD refuses batch statistics, the logit-adjusted
loss is cross-entropy on shifted logits, head-only DP-SGD leaves the backbone alone, a frozen bias stays put, and
public pre-training trains."""

from __future__ import annotations

import argparse

import pytest
import torch

from benchmarks.dp_private_path import (
    Pooled,
    dp_sgd_epoch,
    label_prior,
    main,
    pretrain,
    scored,
    sgd_epoch,
    trained_parameters,
    use_groupnorm,
)
from medsilo.components.training import per_record_gradients, task_loss
from medsilo.medical.models.zoo import build_model


class _Images(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 1, 16, 16, generator=g)
        self.labels = torch.randint(0, 3, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.x[i], self.labels[i]


@pytest.mark.parametrize("per_channel", [False, True])
def test_groupnorm_replaces_every_batchnorm_and_keeps_per_image_gradients(per_channel):
    # --batchnorm groupnorm swaps the norms; --batchnorm instancenorm builds the zoo's cnn-in
    model = build_model("cnn-in" if per_channel else "cnn", in_channels=1, num_classes=3, feature_dim=64, seed=0)
    if not per_channel:
        use_groupnorm(model)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert [(m.num_groups, m.num_channels) for m in norms] == [
        ((c if per_channel else 8), c) for c in (16, 32, 64, 64)
    ]
    data = _Images(4, seed=1)
    grads, _ = per_record_gradients(model, data.x, data.labels)
    # per image: image 0's gradient does not change when image 1 is replaced (no batch statistics)
    other = data.x.clone()
    other[1] = torch.randn(1, 16, 16)
    grads_other, _ = per_record_gradients(model, other, data.labels)
    name = next(iter(grads))
    assert torch.allclose(grads[name][0], grads_other[name][0], atol=1e-6)
    assert not torch.allclose(grads[name][1], grads_other[name][1])


@pytest.mark.parametrize("train_mode", [False, True])
def test_sgd_epoch_uses_batch_statistics_only_in_train_mode(train_mode):
    model = build_model("cnn", in_channels=1, num_classes=3, feature_dim=64, seed=0)
    data = _Images(20, seed=2)
    before = {k: v.clone() for k, v in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    sgd_epoch(model, data, optimizer, 8, torch.Generator().manual_seed(0), torch.ones(3, dtype=torch.float64),
              train_mode)  # fmt: skip
    tracked = [int(m.num_batches_tracked) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert tracked == ([3] * 4 if train_mode else [0] * 4)  # 20 images in batches of 8: 3 batches
    assert any(not torch.equal(before[k], p) for k, p in model.named_parameters())


def test_pooled_site_holds_every_sites_labels_in_order():
    a, b = _Images(5, seed=3), _Images(7, seed=4)
    pooled = Pooled([a, b])
    assert len(pooled) == 12
    assert torch.equal(pooled.labels, torch.cat([a.labels, b.labels]))
    assert torch.equal(pooled[6][0], b[1][0])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--step", "dp-sgd", "--batchnorm", "train"], "only with --step sgd"),
        (["--step", "sgd", "--batchnorm", "train", "--train", "head"], "not with --batchnorm train"),
    ],
)
def test_batch_statistics_are_refused_where_they_would_break_the_control_before_any_work(argv, message, capsys):
    with pytest.raises(SystemExit):
        main(argv)
    assert message in capsys.readouterr().err


def test_a_site_scores_with_statistics_of_its_own_images_only_under_site_batchnorm():
    model = build_model("cnn", in_channels=1, num_classes=3, feature_dim=64, seed=0)
    data = _Images(12, seed=5)
    data.x += 2.0  # a site whose images are brighter than the initial statistics assume
    first = model.base.backbone[1]  # the first BatchNorm2d, after the first Conv2d
    assert torch.equal(first.running_mean, torch.zeros_like(first.running_mean))
    own = scored(model, data, "site")
    assert own is not model and not own.training
    with torch.no_grad():
        expected = model.base.backbone[0](data.x).mean(dim=(0, 2, 3))
    assert torch.allclose(own.base.backbone[1].running_mean, expected, atol=1e-5)
    assert torch.equal(first.running_mean, torch.zeros_like(first.running_mean))  # the global model is untouched
    same = scored(model, data, "initial")
    assert same is model and not model.training


def test_logit_adjusted_loss_is_cross_entropy_on_logits_shifted_by_the_log_prior():
    labels = torch.tensor([0, 0, 0, 1, 0])
    prior = label_prior(labels, 3)  # class 2 has no image: counted as one
    assert torch.allclose(prior, torch.tensor([4 / 6, 1 / 6, 1 / 6]).log())
    logits, y = torch.randn(4, 3, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 1])
    ce = torch.nn.functional.cross_entropy
    total = task_loss(logits, y, logit_shift=prior)  # what sgd_epoch and (per record) dp_sgd_epoch train on
    assert torch.allclose(total, ce(logits + prior, y))
    assert not torch.allclose(total, ce(logits, y))


def test_head_only_dp_sgd_leaves_the_backbone_alone():
    model = build_model("cnn-in", in_channels=1, num_classes=3, feature_dim=64, seed=0)
    before = {k: v.clone() for k, v in model.named_parameters()}
    optimizer = torch.optim.SGD(model.head.parameters(), lr=0.1)
    dp_sgd_epoch(model, _Images(40, seed=7), optimizer, 8, 1.0, 1e-4, torch.Generator().manual_seed(0),
                 torch.ones(3, dtype=torch.float64), label_prior(torch.tensor([0, 1, 2]), 3))  # fmt: skip
    changed = {k for k, p in model.named_parameters() if not torch.equal(before[k], p)}
    assert changed == {"head.weight", "head.bias"}


def test_public_pretraining_moves_every_layer_towards_the_public_labels():
    model = build_model("cnn-in", in_channels=1, num_classes=3, feature_dim=64, seed=0)
    public = torch.utils.data.ConcatDataset([_Images(24, seed=8), _Images(24, seed=9)])
    x = torch.cat([part.x for part in public.datasets])
    y = torch.cat([part.labels for part in public.datasets])
    loss = lambda: float(torch.nn.functional.cross_entropy(model.eval()(x), y))  # noqa: E731
    first = loss()
    before = {k: v.clone() for k, v in model.named_parameters()}
    args = argparse.Namespace(public_pretrain=3, weight_decay=0.0)
    pretrain(model, public, args, generator=torch.Generator().manual_seed(0))
    # every weight moves (a convolution's bias does not need to: instance normalisation right after cancels it)
    assert all(not torch.equal(before[k], p) for k, p in model.named_parameters() if k.endswith("weight"))
    assert loss() < first


def test_frozen_bias_trains_everything_but_the_heads_bias():
    model = build_model("cnn", in_channels=1, num_classes=3, feature_dim=64, seed=0)
    names = {id(p): name for name, p in model.named_parameters()}
    assert {names[id(p)] for p in trained_parameters(model, "head")} == {"head.weight", "head.bias"}
    assert len(trained_parameters(model, "all")) == len(names)
    frozen = {names[id(p)] for p in trained_parameters(model, "frozen-bias")}
    assert frozen == set(names.values()) - {"head.bias"}
    bias = model.head.bias.clone()
    optimizer = torch.optim.SGD(trained_parameters(model, "frozen-bias"), lr=0.1, momentum=0.9, weight_decay=1e-3)
    dp_sgd_epoch(model, _Images(24, seed=10), optimizer, 8, 1.0, 1.0, torch.Generator().manual_seed(0),
                 torch.ones(3, dtype=torch.float64))  # fmt: skip
    assert torch.equal(model.head.bias, bias)
    assert model.head.bias.grad is None  # no noise was even drawn for it
