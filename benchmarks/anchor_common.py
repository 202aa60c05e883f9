"""The plain PyTorch pieces the anchor benchmark's two non-medsilo engines share (:mod:`benchmarks.anchor`).

A site's data comes from medsilo's loader (the same images, splits and augmentation a medsilo site trains on);
evaluation and the local epoch are written out plainly, as a PFLlib-style client would write them.
"""

from __future__ import annotations

import torch
from torch import nn

from medsilo.config import load_sites_file, read_manifest
from medsilo.medical.data import load_site_data

CLASSES = ["normal", "pneumonia"]


def site_data(sites_file, site: str, image_size: int, seed: int):
    """The ``SiteData`` (train/val/test) of ``site`` in ``sites_file``, as a medsilo site loads it."""
    from medsilo.components.executor import site_seed

    entry = load_sites_file(sites_file).sites[site]
    return load_site_data(read_manifest(entry.manifest, CLASSES), modality="cxr", image_size=image_size,
                          seed=site_seed(seed, site))  # fmt: skip


def evaluate(model: nn.Module, split) -> float:
    """Accuracy of ``model`` on ``split`` (one batch: the splits are small)."""
    model.eval()
    with torch.no_grad():
        x = torch.stack([split[i][0] for i in range(len(split))])
        correct = (model(x).argmax(1) == split.labels).float().mean()
    return float(correct)


def train_epoch(model: nn.Module, split, *, batch_size: int, lr: float, seed: int) -> int:
    """One local epoch of SGD (momentum 0.9, cross-entropy); returns the number of steps."""
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    batch = min(batch_size, len(split))
    loader = torch.utils.data.DataLoader(split, batch_size=batch, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed),
                                         drop_last=len(split) % batch == 1)  # fmt: skip
    steps = 0
    for x, y in loader:
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        steps += 1
    return steps
