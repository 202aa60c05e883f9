"""A toy site: a few random 16×16 images and a zoo model, for algorithm unit tests and micro-benchmarks.

Shipped with the package (not with the tests) so that benchmarks, which never import tests, can time an
algorithm's real upload without a dataset.
"""

from __future__ import annotations

import torch

from medsilo.components.algorithms.base import SiteSetup
from medsilo.config.job import Training
from medsilo.medical.data import ImageSet, SiteData
from medsilo.medical.models import build_model


def tiny_setup(site: str = "a", *, n: int = 12, num_classes: int = 3, feature_dim: int = 4, seed: int = 0,
               model_seed: int = 0, batch_size: int = 4, local_epochs: int = 1, lr: float = 0.05,
               backbone: str = "cnn", labels: list[int] | None = None, loss: str = "cross-entropy"):  # fmt: skip
    """A :class:`SiteSetup` over random 16×16 one-channel images, for algorithm unit tests and micro-benchmarks.

    Class k images get +k brightness so there is something to learn; labels cycle over the K classes.
    ``model_seed`` is shared by all sites of a test (same initial weights, as in a homogeneous job).
    ``backbone`` picks the zoo model (heterogeneous tests mix them); ``labels`` restricts the *training*
    split to those classes (a site that never saw the others), val/test still cycle over all K. ``loss`` is the
    job's ``training.loss``.
    """
    g = torch.Generator().manual_seed(seed)

    def split(count: int, present: list[int] | None = None) -> ImageSet:
        cycle = torch.tensor(present if present else list(range(num_classes)))
        labels = cycle[torch.arange(count) % len(cycle)]
        images = torch.rand(count, 1, 16, 16, generator=g) * 0.5 + labels.view(-1, 1, 1, 1) * (0.5 / num_classes)
        return ImageSet(images.clamp(0, 1), labels)

    data = SiteData(train=split(n, labels), val=split(6), test=split(6), classes=tuple(map(str, range(num_classes))),
                    modality="cxr")  # fmt: skip
    model = build_model(backbone, in_channels=1, num_classes=num_classes, feature_dim=feature_dim, seed=model_seed)
    training = Training(rounds=2, local_epochs=local_epochs, batch_size=batch_size, lr=lr, optimizer="sgd", momentum=0.0,
                        loss=loss)  # fmt: skip
    return SiteSetup(site=site, model=model, data=data, num_classes=num_classes, training=training, seed=seed,
                     batch_size=batch_size)  # fmt: skip
