"""The one local-training loop and the one evaluation every algorithm and benchmark uses.

Algorithms supply only what differs — an extra loss term (FedProx's proximal term, FedProto's
prototype distance …), which parameters the optimiser sees, what to upload — and call
:func:`local_epochs` for the batches. Evaluation (:func:`predict`, :func:`classification_metrics`)
is the same for every method, so accuracies are comparable.

Plain PyTorch: nothing here imports NVFlare.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import nn

ExtraLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``extra_loss(features (B, d), logits (B, K), labels (B,)) -> scalar`` added to the task loss."""

Forward = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""``forward(x (B, C, H, W), y (B,)) -> (logits (B, K), extra_loss scalar)`` for algorithms whose
prediction path is not ``head(features(x))`` (FedCP, GPFL, FedDBE …)."""


def make_optimizer(
    params: Iterable[torch.nn.Parameter],
    *,
    name: str = "sgd",
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
) -> torch.optim.Optimizer:
    """The local optimiser (``sgd`` with momentum, or ``adam``), built fresh each round."""
    factories: dict[str, Callable[[], torch.optim.Optimizer]] = {
        "sgd": lambda: torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay),
        "adam": lambda: torch.optim.Adam(params, lr=lr, weight_decay=weight_decay),
    }
    if name not in factories:
        raise ValueError(f"optimizer: must be one of {sorted(factories)}, got {name!r}")
    return factories[name]()


def local_epochs(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    optimizer: torch.optim.Optimizer,
    *,
    epochs: int,
    extra_loss: ExtraLoss | None = None,
    forward: Forward | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> float:
    """Train for ``epochs`` passes over ``loader``; returns the mean task (cross-entropy) loss.

    By default the logits are ``model.head(model.features(x))`` and ``extra_loss`` (if any) sees
    features, logits and labels. An algorithm with its own prediction path passes ``forward`` instead,
    returning logits and its extra term.

    Args:
        model: the module put in train mode: a :class:`~medsilo.medical.models.zoo.SplitModel`, or a
            container holding every module ``forward`` uses.
        loader: yields ``(x (B, C, H, W), y (B,))``.
        optimizer: steps whatever parameters the algorithm chose.
        epochs: full passes (≥ 1).
        extra_loss: algorithm-specific term for the default path, or ``None``.
        forward: replaces the default path (then ``extra_loss`` must be ``None``).
        scheduler: stepped after every batch when given.

    Raises:
        FloatingPointError: the loss became NaN or infinite (diverged training is never uploaded).
    """
    if epochs < 1:
        raise ValueError(f"epochs: must be ≥ 1, got {epochs}")
    if forward is not None and extra_loss is not None:
        raise ValueError("pass either forward or extra_loss, not both")
    if forward is None:

        def forward(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            features = model.features(x)
            logits = model.head(features)
            extra = extra_loss(features, logits, y) if extra_loss is not None else torch.zeros(())
            return logits, extra

    model.train()
    total, count = 0.0, 0
    for _ in range(epochs):
        for x, y in loader:
            logits, extra = forward(x, y)
            loss = nn.functional.cross_entropy(logits, y)
            objective = loss + extra
            if not torch.isfinite(objective):
                raise FloatingPointError("training loss is not finite; lower the learning rate")
            optimizer.zero_grad(set_to_none=True)
            objective.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            total += float(loss.detach()) * len(y)
            count += len(y)
    return total / max(count, 1)


@torch.no_grad()
def predict(model: nn.Module, loader: torch.utils.data.DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
    """Class probabilities ``(N, K)`` and labels ``(N,)`` over ``loader``, in eval mode."""
    model.eval()
    probs, labels = [], []
    for x, y in loader:
        probs.append(torch.softmax(model(x), dim=1))
        labels.append(y)
    return torch.cat(probs), torch.cat(labels)


def classification_metrics(probs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Accuracy and AUROC of probabilities ``(N, K)`` against labels ``(N,)``.

    AUROC is binary (positive class 1) for K = 2 and macro one-vs-rest for K > 2 (sklearn);
    it is NaN when the labels hold fewer than two classes, since it is undefined there.
    """
    from sklearn.metrics import roc_auc_score

    y = labels.numpy()
    p = probs.double().numpy()
    acc = float((p.argmax(1) == y).mean()) if len(y) else math.nan
    present = np.unique(y)
    if len(present) < 2:
        auroc = math.nan
    elif p.shape[1] == 2:
        auroc = float(roc_auc_score(y, p[:, 1]))
    else:
        # restrict to classes present in y; renormalise so rows sum to 1 as sklearn requires
        sub = p[:, present] / p[:, present].sum(1, keepdims=True)
        auroc = float(roc_auc_score(y, sub, multi_class="ovr", average="macro", labels=present))
    return {"acc": acc, "auroc": auroc}


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, loader: torch.utils.data.DataLoader) -> None:
    """Re-estimate BatchNorm running statistics on ``loader`` (AdaBN), without changing any weight."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the whole pass
    model.train()
    for x, _ in loader:
        model(x)
    for m, momentum in zip(bns, momenta):
        m.momentum = momentum
    model.eval()


@torch.no_grad()
def evaluate_split(
    scores: Callable[[torch.Tensor], torch.Tensor], data: torch.utils.data.Dataset, batch_size: int = 256
) -> dict[str, float]:
    """Score one split with a site's deployed model: accuracy, AUROC, and the counts pooling needs.

    Args:
        scores: maps a batch ``(B, C, H, W)`` to class probabilities ``(B, K)`` (an algorithm's
            ``Client.scores``).
        data: yields ``(x, y)``.
        batch_size: evaluation batch size.

    Returns:
        ``{"acc", "auroc", "correct", "n"}`` (``correct`` and ``n`` are counts).
    """
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False)
    probs, labels = [], []
    for x, y in loader:
        probs.append(scores(x))
        labels.append(y)
    p, y = torch.cat(probs), torch.cat(labels)
    out = classification_metrics(p, y)
    return {**out, "correct": int((p.argmax(1) == y).sum()), "n": int(len(y))}
