"""Backbones by name, each split into a feature extractor ``base`` and a linear ``head``.

Every model is a :class:`SplitModel`: ``base`` maps images ``(B, C, H, W)`` to features ``(B, d)``
and ``head`` is ``Linear(d, K)``. ``d`` is the job's shared feature dimension, so heterogeneous
sites (different backbones) still emit features and prototypes of one shape. A backbone's native
feature vector ``(B, native_dim)`` is brought to ``d`` by a parameter-free
``nn.AdaptiveAvgPool1d(d)``, as in the HtFL reference library (HtFLlib; see
``shared/reference/algorithms.md`` §3.2): there is no learned projection.

===================  ==========  =================  ==============  =========================
backbone             native dim  parameters (C=1)   smallest H = W  source
===================  ==========  =================  ==============  =========================
``cnn``              64          60,706             16              4 conv blocks, this module
``cnn-in``           64          60,706             16              ``cnn``, instance norm
``resnet18``         512         11,170,370         1               MONAI ``resnet18``
``densenet121``      1024        6,947,714          29              MONAI ``DenseNet121``
``efficientnet-b0``  1280        4,007,102          32              MONAI ``EfficientNetBN``
``resnet10-lite``    128         308,018            1               MONAI ``ResNet``, narrow
``densenet-lite``    112         75,810             16              MONAI ``DenseNet``, small
===================  ==========  =================  ==============  =========================

Parameters are the trainable ones at ``in_channels=1``, ``num_classes=2``, ``feature_dim=64``;
3-channel inputs add the extra stem weights: ``2 * 9 * 16`` (cnn), ``2 * 49 * 64`` (resnet18,
densenet121) or ``2 * 9 * 32`` (efficientnet-b0). "Smallest" is the smallest square input the
network accepts (in train mode BatchNorm also needs a batch of at least 2).

Input size: 64×64 is the recommended size on CPU. One training step (batch 32, 64×64, 1 channel,
forward + backward + SGD step) on 2 CPU cores took about 0.06 s (cnn), 0.23 s (resnet18),
0.5 s (densenet121) and 0.35 s (efficientnet-b0): densenet121 and efficientnet-b0 are slow on small
CPU sites and are meant for GPU sites or larger time budgets. The two ``-lite`` backbones keep the
residual and dense-connection families affordable on CPU for heterogeneous-FL jobs (about 0.03 s and
0.07 s per step on one core, vs 0.14 s for ``cnn`` measured alongside): three architecture families
(plain, residual, dense) in the time of one ``cnn``-sized budget.

Backbone notes:

* ``cnn-in``: the ``cnn`` with ``GroupNorm(C, C)`` (instance normalisation with a learned per-channel scale and
  shift) in place of each BatchNorm. It has the same parameters and no running statistics: every image is
  normalised by its own statistics, in training and in use alike, so a scanner's gain or offset on the image does
  not reach the features, and nothing about other images is stored in the model. This is the backbone for DP
  jobs: DP-SGD runs a BatchNorm network in eval mode with its initial statistics (mean 0, variance 1) for good,
  which on the four-finding hospitals left a pooled AUROC of 0.651 where instance normalisation reaches 0.774
  (BENCHMARKS.md, "A private path that learns"). Same seed, same initial weights as ``cnn`` (the norms draw no
  random numbers).
* ``resnet18``: stem ``conv1_t_stride=2`` (MONAI's default stride 1 costs 4x the compute of the
  usual ResNet) and ``bias_downsample=False`` (MONAI defaults to a redundant bias before the
  shortcut BatchNorm); the result has exactly torchvision's ResNet-18 layer shapes.
* ``densenet121``: MONAI's ``class_layers`` keep ReLU, pooling and flatten; only the final
  ``Linear`` is removed.
* ``efficientnet-b0``: the base ends with MONAI's pooling, flatten and ``Dropout(0.2)`` (active in
  train mode); only ``_fc`` is replaced. MONAI's TF-style "same" padding is computed once for
  224×224 inputs, and its BatchNorm uses ``momentum=0.01`` (running statistics follow the data
  10x more slowly than PyTorch's default 0.1).
* ``resnet10-lite``: MONAI ``ResNet`` with basic blocks, one block per stage (ResNet-10 depth) and
  widths 16/32/64/128 instead of 64/128/256/512; stem as ``resnet18``.
* ``densenet-lite``: MONAI ``DenseNet`` with ``init_features=32``, ``growth_rate=16``,
  ``block_config=(2, 4, 4)``, ``bn_size=2``; final ``Linear`` removed as for ``densenet121``.
* A ``feature_dim`` larger than the native dimension repeats native entries (no new information).

BatchNorm: every backbone but ``cnn-in`` uses BatchNorm, so ``state_dict()`` holds running statistics that are
not parameters. Which of them are federated (FedAvg-style averaging, or kept local as in FedBN) is
the algorithm's decision, not the zoo's.

Nothing downloads: every network is built with random initialisation (``pretrained=False``).
MONAI is imported only when a MONAI backbone is built, so importing this module stays cheap.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn

from medsilo.errors import did_you_mean
from medsilo.medical.models import BACKBONES

IN_CHANNELS: tuple[int, ...] = (1, 3)
"""Allowed image channels: 1 for chest X-ray, 3 for pathology."""


class PoolProjection(nn.Module):
    """Parameter-free projection of a feature vector to ``d`` entries by adaptive average pooling.

    Output entry ``j`` is the mean of native entries ``floor(j * n / d)`` to
    ``ceil((j + 1) * n / d) - 1`` (PyTorch's ``AdaptiveAvgPool1d``); when ``d`` divides ``n`` these
    are the means of consecutive groups of ``n / d`` entries.

    Args:
        native_dim: ``n``, the length of the incoming vector.
        feature_dim: ``d``, the length of the outgoing vector.
    """

    def __init__(self, native_dim: int, feature_dim: int):
        super().__init__()
        self.native_dim = native_dim
        self.feature_dim = feature_dim
        self.pool = nn.AdaptiveAvgPool1d(feature_dim)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        """Project ``v``.

        Args:
            v: native features ``(B, n)``.

        Returns:
            features ``(B, d)``.
        """
        return self.pool(v.unsqueeze(1)).squeeze(1)

    def extra_repr(self) -> str:
        return f"{self.native_dim} -> {self.feature_dim}"


class SplitModel(nn.Module):
    """A backbone with a feature/head split: ``forward(x) = head(base(x))``.

    Every trainable parameter lives in ``base`` or ``head``, so algorithms may share, freeze or
    personalise ``model.base.parameters()`` and ``model.head.parameters()`` separately.

    Args:
        name: backbone name, one of :data:`medsilo.medical.models.BACKBONES`.
        backbone: module mapping images ``(B, C, H, W)`` to native features ``(B, native_dim)``.
        native_dim: length of the backbone's feature vector.
        in_channels: ``C``, image channels.
        num_classes: ``K``, number of classes.
        feature_dim: ``d``, shared feature dimension.

    Attributes:
        base: ``backbone`` followed by ``project``: a parameter-free :class:`PoolProjection` when
            ``native_dim != feature_dim``, ``nn.Identity`` otherwise. Maps ``(B, C, H, W)`` to
            ``(B, d)``.
        head: ``nn.Linear(d, K)``.
        name, in_channels, num_classes, feature_dim, native_dim: the plain settings above.
    """

    def __init__(
        self,
        name: str,
        backbone: nn.Module,
        native_dim: int,
        *,
        in_channels: int,
        num_classes: int,
        feature_dim: int,
    ):
        super().__init__()
        self.name = name
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.feature_dim = feature_dim
        self.native_dim = native_dim
        project = nn.Identity() if native_dim == feature_dim else PoolProjection(native_dim, feature_dim)
        self.base = nn.Sequential(OrderedDict([("backbone", backbone), ("project", project)]))
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Features of a batch of images.

        Args:
            x: images ``(B, C, H, W)`` with ``C == in_channels``.

        Returns:
            features ``(B, d)``.

        Raises:
            ValueError: when ``x`` is not 4-D or has the wrong number of channels.
        """
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"{self.name}: expected images (B, {self.in_channels}, H, W), got shape {tuple(x.shape)}"
            )
        return self.base(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of a batch of images.

        Args:
            x: images ``(B, C, H, W)`` with ``C == in_channels``.

        Returns:
            logits ``(B, K)``.
        """
        return self.head(self.features(x))

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, in_channels={self.in_channels}, num_classes={self.num_classes}, "
            f"feature_dim={self.feature_dim}, native_dim={self.native_dim}"
        )


def _cnn(in_channels: int, instance_norm: bool = False) -> tuple[nn.Module, int]:
    """4 blocks of Conv 3×3 (padding 1), BatchNorm, ReLU, MaxPool 2, then global average pooling.

    ``instance_norm``: ``GroupNorm(C, C)`` (one group per channel: each image's channel is normalised by its own
    mean and variance, with a learned scale and shift) in place of every BatchNorm — ``cnn-in``."""
    layers: list[nn.Module] = []
    channels = (16, 32, 64, 64)
    for c_in, c_out in zip((in_channels, *channels[:-1]), channels):
        layers += [
            nn.Conv2d(c_in, c_out, kernel_size=3, padding=1),
            nn.GroupNorm(c_out, c_out) if instance_norm else nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        ]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(1)]
    return nn.Sequential(*layers), channels[-1]


def _resnet18(in_channels: int) -> tuple[nn.Module, int]:
    """MONAI ResNet-18 (2-D, stride-2 stem) without its classifier; ends with pooling and flatten."""
    from monai.networks.nets import resnet18

    net = resnet18(
        pretrained=False,
        spatial_dims=2,
        n_input_channels=in_channels,
        conv1_t_stride=2,
        bias_downsample=False,
        feed_forward=False,
    )
    return net, net.layer4[-1].conv2.out_channels


def _densenet121(in_channels: int) -> tuple[nn.Module, int]:
    """MONAI DenseNet-121 (2-D) with the final ``Linear`` of ``class_layers`` removed."""
    from monai.networks.nets import DenseNet121

    net = DenseNet121(spatial_dims=2, in_channels=in_channels, out_channels=2, pretrained=False)
    native_dim = net.class_layers.out.in_features
    del net.class_layers.out
    return net, native_dim


def _efficientnet_b0(in_channels: int) -> tuple[nn.Module, int]:
    """MONAI EfficientNet-B0 (2-D) with ``_fc`` replaced by identity; ends with pooling and dropout."""
    from monai.networks.nets import EfficientNetBN

    net = EfficientNetBN(
        "efficientnet-b0",
        pretrained=False,  # MONAI's default is True, which downloads ImageNet weights
        progress=False,
        spatial_dims=2,
        in_channels=in_channels,
        num_classes=2,
    )
    native_dim = net._fc.in_features
    net._fc = nn.Identity()
    return net, native_dim


def _resnet10_lite(in_channels: int) -> tuple[nn.Module, int]:
    """A narrow MONAI ResNet-10 (one basic block per stage, widths 16-128) without its classifier."""
    from monai.networks.nets import ResNet

    net = ResNet(
        block="basic",
        layers=[1, 1, 1, 1],
        block_inplanes=[16, 32, 64, 128],
        spatial_dims=2,
        n_input_channels=in_channels,
        conv1_t_stride=2,
        bias_downsample=False,
        feed_forward=False,
    )
    return net, net.layer4[-1].conv2.out_channels


def _densenet_lite(in_channels: int) -> tuple[nn.Module, int]:
    """A small MONAI DenseNet (3 dense blocks of 2/4/4 layers) with its final ``Linear`` removed."""
    from monai.networks.nets import DenseNet

    net = DenseNet(spatial_dims=2, in_channels=in_channels, out_channels=2, init_features=32, growth_rate=16,
                   block_config=(2, 4, 4), bn_size=2)  # fmt: skip
    native_dim = net.class_layers.out.in_features
    del net.class_layers.out
    return net, native_dim


BUILDERS: dict[str, Callable[[int], tuple[nn.Module, int]]] = {
    "cnn": _cnn,
    "cnn-in": lambda in_channels: _cnn(in_channels, instance_norm=True),
    "resnet18": _resnet18,
    "densenet121": _densenet121,
    "efficientnet-b0": _efficientnet_b0,
    "resnet10-lite": _resnet10_lite,
    "densenet-lite": _densenet_lite,
}
"""Backbone name -> builder ``(in_channels) -> (module (B, C, H, W) -> (B, native_dim), native_dim)``."""

if set(BUILDERS) != set(BACKBONES):
    raise RuntimeError(
        "medsilo.medical.models.zoo.BUILDERS and medsilo.medical.models.BACKBONES disagree: "
        f"only in BUILDERS: {sorted(set(BUILDERS) - set(BACKBONES))}, "
        f"only in BACKBONES: {sorted(set(BACKBONES) - set(BUILDERS))}"
    )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def build_model(
    name: str,
    *,
    in_channels: int,
    num_classes: int,
    feature_dim: int,
    seed: int | None = None,
) -> SplitModel:
    """Build a backbone by name, randomly initialised, with a ``Linear(d, K)`` head.

    Args:
        name: one of :data:`medsilo.medical.models.BACKBONES`.
        in_channels: ``C``, 1 (chest X-ray) or 3 (pathology).
        num_classes: ``K`` >= 2.
        feature_dim: ``d`` >= 2, the shared feature dimension.
        seed: when given, the weights depend only on it; the caller's global torch RNG state is
            left unchanged. When ``None``, the global torch RNG is used as usual.

    Returns:
        a :class:`SplitModel` mapping ``(B, C, H, W)`` to logits ``(B, K)``, in train mode, on CPU.

    Raises:
        ValueError: for an unknown ``name`` (with a suggestion and the valid names) or an
            out-of-range ``in_channels``, ``num_classes``, ``feature_dim`` or ``seed``.
    """
    if name not in BUILDERS:
        raise ValueError(
            f"name: unknown backbone {name!r}; {did_you_mean(name, BACKBONES)}"
            f"(valid: {', '.join(BACKBONES)})"
        )
    if not _is_int(in_channels) or in_channels not in IN_CHANNELS:
        raise ValueError(f"in_channels: must be 1 or 3, got {in_channels!r}")
    if not _is_int(num_classes) or num_classes < 2:
        raise ValueError(f"num_classes: must be an integer >= 2, got {num_classes!r}")
    if not _is_int(feature_dim) or feature_dim < 2:
        raise ValueError(f"feature_dim: must be an integer >= 2, got {feature_dim!r}")
    if seed is not None and (not _is_int(seed) or seed < 0):
        raise ValueError(f"seed: must be None or an integer >= 0, got {seed!r}")

    def build() -> SplitModel:
        backbone, native_dim = BUILDERS[name](in_channels)
        return SplitModel(
            name,
            backbone,
            native_dim,
            in_channels=in_channels,
            num_classes=num_classes,
            feature_dim=feature_dim,
        )

    if seed is None:
        return build()
    # fork_rng restores the CPU generator afterwards; seeding only that generator (not
    # torch.manual_seed, which also reseeds every CUDA device) leaves all global state unchanged.
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        return build()


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters (``requires_grad``) in ``module``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


__all__ = ["BUILDERS", "IN_CHANNELS", "PoolProjection", "SplitModel", "build_model", "count_parameters"]
