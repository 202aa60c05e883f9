"""The model zoo: backbones by name, each split into ``features(x) -> (B, d)`` and a linear ``head``.

Importing this package is cheap; torch loads only when :func:`build_model` is called.
"""

from medsilo.config import registry

BACKBONES: tuple[str, ...] = ("cnn", "cnn-in", "resnet18", "densenet121", "efficientnet-b0", "resnet10-lite", "densenet-lite")
"""Backbone names a job spec may use (see :mod:`medsilo.medical.models.zoo`)."""
registry.provide("backbones", BACKBONES)


def build_model(
    name: str, *, in_channels: int, num_classes: int, feature_dim: int, seed: int | None = None
):
    """Build a backbone by name; see :func:`medsilo.medical.models.zoo.build_model`."""
    from medsilo.medical.models.zoo import build_model as _build

    return _build(
        name, in_channels=in_channels, num_classes=num_classes, feature_dim=feature_dim, seed=seed
    )


__all__ = ["BACKBONES", "build_model"]
