"""The private-path diagnostic's controls change only what they name: GroupNorm replaces every BatchNorm, eval-mode
SGD leaves BatchNorm statistics alone, the pooled site keeps every label, a site scores with its own statistics only
under ``--batchnorm site``, and DP-SGD refuses batch statistics."""

from __future__ import annotations

import pytest
import torch

from benchmarks.dp_private_path import Pooled, main, scored, sgd_epoch, use_groupnorm
from medsilo.components.training import per_record_gradients
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


def test_groupnorm_replaces_every_batchnorm_and_keeps_per_image_gradients():
    model = build_model("cnn", in_channels=1, num_classes=3, feature_dim=64, seed=0)
    use_groupnorm(model)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert sum(isinstance(m, torch.nn.GroupNorm) for m in model.modules()) == 4
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


def test_dp_sgd_with_batch_statistics_is_refused_before_any_work(capsys):
    with pytest.raises(SystemExit):
        main(["--step", "dp-sgd", "--batchnorm", "train"])
    assert "only with --step sgd" in capsys.readouterr().err


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
