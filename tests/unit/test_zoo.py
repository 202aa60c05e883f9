"""Tests for :mod:`medsilo.medical.models.zoo`: shapes, parameter counts, base/head split, seeding,
no downloads, argument checks and the parameter-free feature projection."""

from __future__ import annotations

import socket

import pytest
import torch
from torch import nn

import medsilo.medical.models as models
from medsilo.medical.models import BACKBONES
from medsilo.medical.models.zoo import BUILDERS, PoolProjection, SplitModel, build_model, count_parameters

NATIVE_DIM = {"cnn": 64, "cnn-in": 64, "resnet18": 512, "densenet121": 1024, "efficientnet-b0": 1280, "resnet10-lite": 128,
              "densenet-lite": 112}  # fmt: skip


def _monai_classifier(name: str, in_channels: int, num_classes: int) -> nn.Module:
    """The plain MONAI classifier with the zoo's constructor arguments, built independently."""
    from monai.networks.nets import DenseNet121, EfficientNetBN, resnet18

    if name == "resnet18":
        return resnet18(
            pretrained=False,
            spatial_dims=2,
            n_input_channels=in_channels,
            conv1_t_stride=2,
            bias_downsample=False,
            num_classes=num_classes,
        )
    if name == "densenet121":
        return DenseNet121(
            spatial_dims=2, in_channels=in_channels, out_channels=num_classes, pretrained=False
        )
    return EfficientNetBN(
        "efficientnet-b0",
        pretrained=False,
        progress=False,
        spatial_dims=2,
        in_channels=in_channels,
        num_classes=num_classes,
    )


def test_registry_matches_backbones():
    assert set(BUILDERS) == set(BACKBONES)


@pytest.mark.parametrize(
    "name, in_channels, num_classes, feature_dim, input_shape",
    [
        ("cnn", 1, 2, 64, (2, 1, 16, 16)),  # d == native: identity projection; smallest input
        ("cnn", 3, 3, 16, (2, 3, 32, 32)),  # d < native
        ("cnn", 1, 4, 128, (2, 1, 20, 24)),  # d > native, non-square input
        ("cnn-in", 3, 4, 64, (2, 3, 16, 16)),
        ("resnet18", 1, 2, 64, (2, 1, 32, 32)),
        ("resnet18", 3, 3, 512, (2, 3, 8, 8)),
        ("densenet121", 1, 2, 2048, (2, 1, 32, 32)),
        ("densenet121", 3, 5, 64, (2, 3, 29, 29)),  # smallest input densenet121 accepts
        ("efficientnet-b0", 1, 3, 64, (2, 1, 32, 32)),  # smallest input efficientnet-b0 accepts
        ("resnet10-lite", 1, 2, 64, (2, 1, 16, 16)),
        ("densenet-lite", 3, 2, 64, (2, 3, 16, 16)),  # smallest input densenet-lite accepts
        ("efficientnet-b0", 3, 2, 1280, (2, 3, 32, 40)),
    ],
)
def test_shapes(name, in_channels, num_classes, feature_dim, input_shape):
    model = build_model(
        name, in_channels=in_channels, num_classes=num_classes, feature_dim=feature_dim, seed=0
    )
    assert isinstance(model, SplitModel)
    assert (model.name, model.in_channels, model.num_classes) == (name, in_channels, num_classes)
    assert (model.feature_dim, model.native_dim) == (feature_dim, NATIVE_DIM[name])
    pooled = isinstance(model.base.project, PoolProjection)
    assert pooled == (feature_dim != NATIVE_DIM[name])

    model.eval()
    x = torch.rand(input_shape)
    with torch.no_grad():
        features = model.features(x)
        logits = model(x)
    assert features.shape == (input_shape[0], feature_dim)
    assert logits.shape == (input_shape[0], num_classes)
    torch.testing.assert_close(logits, model.head(features))


@pytest.mark.parametrize("in_channels", [1, 3])
def test_cnn_parameter_count_by_formula(in_channels):
    num_classes, feature_dim = 3, 4
    model = build_model("cnn", in_channels=in_channels, num_classes=num_classes, feature_dim=feature_dim)

    expected = 0
    for c_in, c_out in [(in_channels, 16), (16, 32), (32, 64), (64, 64)]:
        expected += c_in * c_out * 3 * 3 + c_out  # conv weight + bias
        expected += 2 * c_out  # BatchNorm weight + bias
    expected += feature_dim * num_classes + num_classes  # head

    assert count_parameters(model) == expected


@pytest.mark.parametrize(
    "name, in_channels", [("resnet18", 3), ("densenet121", 1), ("efficientnet-b0", 3)]
)
def test_monai_parameter_count_is_classifier_minus_fc_plus_head(name, in_channels):
    num_classes, feature_dim = 3, 64
    model = build_model(name, in_channels=in_channels, num_classes=num_classes, feature_dim=feature_dim)
    reference = _monai_classifier(name, in_channels, num_classes)

    native = NATIVE_DIM[name]
    expected = (
        count_parameters(reference)
        - (native * num_classes + num_classes)
        + (feature_dim * num_classes + num_classes)
    )
    assert count_parameters(model) == expected


def test_count_parameters_skips_frozen():
    layer = nn.Linear(3, 2)  # 6 weights + 2 biases
    layer.bias.requires_grad_(False)
    assert count_parameters(layer) == 6


@pytest.mark.parametrize("name", BACKBONES)
def test_every_parameter_is_in_exactly_one_of_base_and_head(name):
    model = build_model(name, in_channels=1, num_classes=3, feature_dim=32)
    base = {id(p) for p in model.base.parameters()}
    head = {id(p) for p in model.head.parameters()}
    assert base.isdisjoint(head)
    assert base | head == {id(p) for p in model.parameters()}
    assert count_parameters(model.head) == 32 * 3 + 3


def _same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("name", BACKBONES)
def test_seed_gives_identical_weights_and_leaves_global_rng_alone(name):
    kwargs = dict(in_channels=1, num_classes=2, feature_dim=64)
    rng_before = torch.random.get_rng_state()
    first = build_model(name, **kwargs, seed=7)
    assert torch.equal(torch.random.get_rng_state(), rng_before)

    torch.rand(5)  # move the global RNG: a seeded build must not depend on it
    second = build_model(name, **kwargs, seed=7)
    other = build_model(name, **kwargs, seed=8)

    assert _same_state(first, second)
    assert not _same_state(first, other)


def test_package_wrapper_forwards_seed():
    kwargs = dict(in_channels=3, num_classes=2, feature_dim=8, seed=3)
    assert _same_state(models.build_model("cnn", **kwargs), build_model("cnn", **kwargs))


def test_nothing_downloads(monkeypatch, tmp_path):
    import monai.apps
    import monai.networks.nets.densenet
    import monai.networks.nets.resnet
    import torch.utils.model_zoo

    def refuse(*args, **kwargs):
        raise AssertionError(f"download attempted: {args!r}")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no cached weights to fall back on
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(torch.utils.model_zoo, "load_url", refuse)  # used by MONAI's EfficientNet
    monkeypatch.setattr(monai.networks.nets.densenet, "load_state_dict_from_url", refuse)  # bound at import
    monkeypatch.setattr(monai.networks.nets.resnet, "hf_hub_download", refuse)
    monkeypatch.setattr(monai.apps, "download_url", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)

    for name in BACKBONES:
        build_model(name, in_channels=3, num_classes=2, feature_dim=64)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(name="resnet-18"), r"name: unknown backbone 'resnet-18'; did you mean 'resnet18'\?"),
        (dict(name="vit"), r"unknown backbone 'vit'; \(valid: cnn, cnn-in, resnet18, densenet121, efficientnet-b0, resnet10-lite, densenet-lite\)"),
        (dict(in_channels=2), r"in_channels: must be 1 or 3, got 2"),
        (dict(in_channels=True), r"in_channels: must be 1 or 3, got True"),
        (dict(num_classes=1), r"num_classes: must be an integer >= 2, got 1"),
        (dict(feature_dim=1), r"feature_dim: must be an integer >= 2, got 1"),
        (dict(seed=-1), r"seed: must be None or an integer >= 0, got -1"),
    ],
)
def test_bad_arguments(kwargs, match):
    args = dict(name="cnn", in_channels=1, num_classes=2, feature_dim=8) | kwargs
    with pytest.raises(ValueError, match=match):
        build_model(**args)


def test_features_rejects_wrong_channels():
    model = build_model("cnn", in_channels=1, num_classes=2, feature_dim=8)
    with pytest.raises(ValueError, match=r"cnn: expected images \(B, 1, H, W\), got shape \(2, 3, 16, 16\)"):
        model.features(torch.rand(2, 3, 16, 16))


def test_projection_is_parameter_free_and_averages_groups():
    model = build_model("resnet18", in_channels=1, num_classes=2, feature_dim=64)
    project = model.base.project
    assert list(project.parameters()) == [] and project.state_dict() == {}

    v = torch.arange(2 * 512, dtype=torch.float32).reshape(2, 512) ** 1.5  # not linear within a group
    expected = torch.stack([torch.stack([row[8 * j : 8 * j + 8].mean() for j in range(64)]) for row in v])
    torch.testing.assert_close(project(v), expected)


def test_features_are_the_pooled_backbone_vector():
    model = build_model("cnn", in_channels=1, num_classes=2, feature_dim=16, seed=0).eval()
    x = torch.rand(2, 1, 16, 16)
    with torch.no_grad():
        native = model.base.backbone(x)  # (2, 64)
        features = model.features(x)  # (2, 16)
    torch.testing.assert_close(features, native.reshape(2, 16, 4).mean(-1))


def test_cnn_in_is_the_cnn_with_instance_norm():
    """Same seed, same weights and parameter count as the ``cnn``; no BatchNorm, so no running statistics."""
    plain = build_model("cnn", in_channels=1, num_classes=4, feature_dim=64, seed=3)
    inst = build_model("cnn-in", in_channels=1, num_classes=4, feature_dim=64, seed=3)
    assert count_parameters(inst) == count_parameters(plain)
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), inst.parameters()))
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in inst.modules())
    norms = [m for m in inst.modules() if isinstance(m, nn.GroupNorm)]
    assert [(m.num_groups, m.num_channels) for m in norms] == [(16, 16), (32, 32), (64, 64), (64, 64)]
    assert list(inst.buffers()) == []


def test_cnn_in_features_ignore_a_gain_and_other_images():
    """Each image is normalised by its own statistics: a gain on the image leaves its features as they were (an
    offset would not, quite: the convolutions' zero padding sees it at the borders), and so does the rest of the batch, in train and eval mode alike (the BatchNorm ``cnn`` differs)."""
    x = torch.rand(4, 1, 32, 32)
    inst = build_model("cnn-in", in_channels=1, num_classes=2, feature_dim=64, seed=0)
    plain = build_model("cnn", in_channels=1, num_classes=2, feature_dim=64, seed=0).eval()
    for mode in (True, False):
        inst.train(mode)
        with torch.no_grad():
            f = inst.features(x)
            assert torch.allclose(inst.features(3.0 * x), f, atol=1e-4)
            assert torch.allclose(inst.features(x[:1]), f[:1], atol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(plain.features(3.0 * x), plain.features(x), atol=1e-2)
