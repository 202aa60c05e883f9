"""The one local-training loop and the one evaluation every algorithm and benchmark uses.

Algorithms supply only what differs — an extra loss term (FedProx's proximal term, FedProto's
prototype distance …), which parameters the optimiser sees, what to upload — and call
:func:`local_epochs` for the batches. Evaluation (:func:`predict`, :func:`classification_metrics`)
is the same for every method, so accuracies are comparable.

:func:`private_epochs` is the same loop as DP-SGD (record-level differential privacy of the trained
model, :mod:`medsilo.secure.dp`): Poisson-sampled batches, per-record gradients (``torch.func``), each
clipped, summed and noised. It shares the prediction path and the extra-loss contract with
:func:`local_epochs`; the extra loss is evaluated per record.

**Two tasks, one loop.** The task loss is :func:`task_loss`, chosen by the labels themselves: int64 class
indices ``(B,)`` (``task: single``) give softmax cross-entropy; float targets ``(B, L)`` with NaN for unknown
(``task: multilabel``) give the sigmoid binary cross-entropy of the known entries only. Evaluation of a
multi-label model (:func:`multilabel_metrics`, :func:`evaluate_splits`) reports per-label AUROC, their
macro mean, and per-label F1 at a threshold chosen on validation (:func:`choose_thresholds`).

Plain PyTorch: nothing here imports NVFlare.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from medsilo.secure.dp import clipped_gradient_sum, gaussian_gradient, poisson_sample, poisson_schedule

ExtraLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``extra_loss(features (B, d), logits (B, K), labels (B,)) -> scalar`` added to the task loss (labels are
``(B, L)`` float targets in a multi-label job)."""

Forward = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""``forward(x (B, C, H, W), y (B,)) -> (logits (B, K), extra_loss scalar)`` for algorithms whose
prediction path is not ``head(features(x))`` (FedCP, GPFL, FedDBE …)."""

PER_RECORD_FLOATS = 64 * 2**20
"""Default bound on the per-record gradient entries :func:`private_epochs` holds at once (256 MiB of
float32; its float64 clipping works tensor by tensor on top)."""


def task_loss(logits: torch.Tensor, labels: torch.Tensor, class_weight: torch.Tensor | None = None,
              logit_shift: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """The task loss of a batch: mean cross-entropy for class indices, masked binary cross-entropy for targets.

    Args:
        logits: ``(B, K)``.
        labels: int64 ``(B,)`` class indices (single-label), or float ``(B, K)`` targets in {0, 1} with NaN
            for an unknown entry (multi-label: one sigmoid per output).
        class_weight: ``(K,)`` per-class loss weights (single-label only; :func:`balanced_class_weights`), the
            weighted mean as :func:`torch.nn.functional.cross_entropy` defines it.
        logit_shift: ``(K,)`` added to every row of ``logits`` before the cross-entropy (single-label only): the
            site's log class prior :func:`log_prior` gives the logit-adjusted loss (``training.loss:
            logit-adjusted``). Training only; the model predicts with its plain logits.

    Returns:
        0-d tensor. Multi-label: the mean of ``BCEWithLogits`` over the *known* entries only; unknown entries
        contribute nothing, not even a gradient (a batch with none known gives 0).
    """
    if not labels.is_floating_point():
        shifted = logits if logit_shift is None else logits + logit_shift
        return nn.functional.cross_entropy(shifted, labels, weight=class_weight)
    known = ~torch.isnan(labels)
    targets = torch.where(known, labels, torch.zeros_like(labels))
    per_entry = nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    per_entry = torch.where(known, per_entry, torch.zeros_like(per_entry))  # masked, so no gradient flows
    return per_entry.sum() / known.sum().clamp_min(1)


def probabilities(logits: torch.Tensor, multilabel: bool = False) -> torch.Tensor:
    """``(B, K)`` probabilities of ``logits``: softmax over classes, or one sigmoid per label (multi-label)."""
    return torch.sigmoid(logits) if multilabel else torch.softmax(logits, dim=1)


def lr_factor(schedule: str, rnd: int, rounds: int, *, warmup: int = 0, step_rounds: int = 10,
              step_gamma: float = 0.5) -> float:  # fmt: skip
    """The multiple of the job's learning rate that round ``rnd`` (1-based, of ``rounds``) trains with.

    Warm-up: round r ≤ W uses r/W. After it, over the remaining R − W rounds (j = r − W − 1 = 0, 1, …):
    ``constant`` 1; ``cosine`` ½(1 + cos(π·j/(R − W))), from 1 down to just above 0 at the last round;
    ``step`` γ^⌊j/S⌋. A round past ``rounds`` (the final evaluation) uses the last round's factor.
    """
    rnd = min(max(rnd, 1), rounds)
    if rnd <= warmup:
        return rnd / warmup
    j, span = rnd - warmup - 1, rounds - warmup
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * j / span))
    if schedule == "step":
        return step_gamma ** (j // step_rounds)
    raise ValueError(f"lr_schedule: must be constant, cosine or step, got {schedule!r}")


def balanced_class_weights(counts: torch.Tensor) -> torch.Tensor:
    """Per-class loss weights N / (K·n_c) from a site's class counts ``(K,)``: every class present weighs as
    much in the loss as any other; a class with no image gets 1 (it never occurs in a batch)."""
    counts = counts.double()
    present = counts > 0
    weights = torch.ones_like(counts)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return weights.float()


def log_prior(counts: torch.Tensor) -> torch.Tensor:
    """``log π`` ``(K,)`` from class counts ``(K,)``: π_c = max(n_c, 1) / Σ max(n, 1), so a class with no image
    (or, for counts released under DP, a count the noise pushed below 1) counts as one, never as log 0."""
    counts = counts.detach().double().clamp_min(1.0)
    return (counts / counts.sum()).log().float()


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
    class_weight: torch.Tensor | None = None,
    logit_shift: torch.Tensor | None = None,
) -> float:
    """Train for ``epochs`` passes over ``loader``; returns the mean task loss (:func:`task_loss`, with
    ``class_weight`` and ``logit_shift`` when given).

    By default the logits are ``model.head(model.features(x))`` and ``extra_loss`` (if any) sees
    features, logits and labels. An algorithm with its own prediction path passes ``forward`` instead,
    returning logits and its extra term.

    Args:
        model: the module put in train mode: a :class:`~medsilo.medical.models.zoo.SplitModel`, or a
            container holding every module ``forward`` uses.
        loader: yields ``(x (B, C, H, W), y (B,))``, or ``y (B, K)`` float targets (multi-label).
        optimizer: steps whatever parameters the algorithm chose.
        epochs: full passes (≥ 1).
        extra_loss: algorithm-specific term for the default path, or ``None``.
        forward: replaces the default path (then ``extra_loss`` must be ``None``).
        scheduler: stepped after every batch when given.
        class_weight: ``(K,)`` per-class loss weights (single-label; the job's ``class_weights: balanced``).
        logit_shift: ``(K,)`` added to the logits inside the loss (single-label; ``loss: logit-adjusted``).

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
            loss = task_loss(logits, y, class_weight, logit_shift)
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


def private_epochs(
    model: nn.Module,
    data: torch.utils.data.Dataset,
    optimizer: torch.optim.Optimizer,
    *,
    epochs: int,
    batch_size: int,
    grad_clip: float,
    noise_multiplier: float,
    generator: torch.Generator,
    extra_loss: ExtraLoss | None = None,
    microbatch: int | None = None,
    logit_shift: torch.Tensor | None = None,
) -> float:
    """DP-SGD (Abadi et al. 2016) for ``epochs`` epochs; returns the mean task (cross-entropy) loss.

    T, q = :func:`~medsilo.secure.dp.poisson_schedule` ``(N, batch_size, epochs)``: T = epochs·⌈N/B⌉ steps,
    each on a batch drawn by Poisson sampling at rate q = B/N (:func:`~medsilo.secure.dp.poisson_sample`).
    Per step: the gradient of every sampled record's own loss ``CE(head(features(x_i)) [+ logit_shift], y_i) +
    extra_loss(features_i, logits_i, y_i)`` with respect to the trained parameters (those in
    ``optimizer``; others are constants) is computed with ``torch.func`` (``functional_call`` + ``vmap``
    + ``grad``), clipped to joint L2 norm ≤ ``grad_clip`` and summed
    (:func:`~medsilo.secure.dp.clipped_gradient_sum`); ``N(0, (σ·grad_clip)²)`` is added per coordinate
    (:func:`~medsilo.secure.dp.gaussian_gradient`), the sum is divided by the *expected* batch size q·N
    (not the drawn one, which is data-dependent) and ``optimizer`` steps on it. An empty batch still
    steps on noise. Draw order from ``generator`` per step: the ``(N,)`` Poisson draw, then the noise of
    each trained parameter in ``model.named_parameters()`` order.

    **BatchNorm and other train-mode behaviour.** The model runs in **eval mode** throughout: BatchNorm
    normalises with its running statistics, which are never updated (it acts as a fixed affine map whose
    weight and bias are trained), and dropout is off. A record's loss thus depends on that record alone,
    and no statistic of the private data is used or stored. The running statistics must not come from
    the private data: a model whose BatchNorm has already tracked batches (``num_batches_tracked > 0``)
    or tracks none (``track_running_stats=False``, batch statistics even in eval mode) is refused. A
    fresh zoo model keeps its initial statistics (mean 0, variance 1) for good.

    Privacy effect: nothing leaves the site; the trained parameters are the output of T Poisson-
    subsampled Gaussian mechanisms of multiplier ``noise_multiplier`` (record-level, add/remove one record),
    i.e. ``GaussianEvent(σ, steps=T, sampling_rate=q)``, which the caller charges before training. This
    holds when ``extra_loss`` of a record depends on no other record and every other input is public or
    already charged. The returned loss is a non-private statistic: keep it at the site.

    Args:
        model: a :class:`~medsilo.medical.models.zoo.SplitModel` (``features`` and ``head``).
        data: the private training records, items ``(x (C, H, W), y ())`` (augmentation per item is fine:
            it depends on that record only).
        optimizer: steps the trained parameters (SGD with momentum, Adam …: post-processing of the noisy
            gradients).
        epochs: E ≥ 1.
        batch_size: expected batch size B ≥ 1 (capped at N).
        grad_clip: G > 0, per-record gradient bound.
        noise_multiplier: σ > 0 of the gradient noise (std σ·G).
        generator: the site's secret ``torch.Generator`` (batches and noise); never the global RNG.
        extra_loss: the algorithm's term on the default path, called per record with ``features (1, d)``,
            ``logits (1, K)``, ``labels (1,)`` (inside ``vmap``: no data-dependent Python control flow).
        microbatch: records per ``vmap`` call, which bounds the memory of per-record gradients (no effect
            on the result); ``None``: as many as keep them under :data:`PER_RECORD_FLOATS` floats (a whole
            batch for the ``cnn``, 5 records for ``resnet18``).
        logit_shift: ``(K,)`` added to the logits inside each record's loss (``loss: logit-adjusted``). It must be
            public or already charged (class counts released under DP), never the site's true counts: those
            depend on every record, and a record's loss would then depend on the others.

    Raises:
        FloatingPointError: a record's loss became NaN or infinite.
        ValueError: bad arguments, optimizer parameters that are not ``model``'s, or BatchNorm statistics
            that may come from data.
        medsilo.secure.dp.DPError: non-finite gradients or bad DP parameters (nothing is trained on them).
    """
    trained = _trained_parameters(model, optimizer)
    if microbatch is None:
        microbatch = max(1, PER_RECORD_FLOATS // sum(p.numel() for p in trained.values()))
    if epochs < 1 or microbatch < 1:
        raise ValueError(f"epochs and microbatch: must be ≥ 1, got {epochs} and {microbatch}")
    n = len(data)
    steps, rate = poisson_schedule(n, batch_size, epochs)
    expected = rate * n
    _check_frozen_batchnorm(model)
    per_record = _per_record_gradients(model, trained, extra_loss, logit_shift)
    model.eval()
    total, count = 0.0, 0
    for _ in range(steps):
        batch = poisson_sample(n, rate, generator)
        grad_sum = {
            name: torch.zeros(p.shape, dtype=torch.float64, device=p.device) for name, p in trained.items()
        }
        for chunk in batch.split(microbatch) if len(batch) else ():
            x, y = torch.utils.data.default_collate([data[int(i)] for i in chunk])
            grads, losses = per_record(x, y)
            if not bool(torch.isfinite(losses).all()):
                raise FloatingPointError("training loss is not finite; lower the learning rate")
            losses = losses[:, 0]
            for name, g in clipped_gradient_sum(grads, grad_clip).items():
                grad_sum[name] += g
            total += float(losses.sum())
            count += len(chunk)
        noisy = gaussian_gradient(grad_sum, grad_clip, noise_multiplier, generator)
        optimizer.zero_grad(set_to_none=True)
        for name, p in trained.items():
            p.grad = (noisy[name] / expected).to(p.dtype)
        optimizer.step()
    return total / max(count, 1)


def per_record_gradients(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    params: Iterable[nn.Parameter] | None = None,
    extra_loss: ExtraLoss | None = None,
    logit_shift: torch.Tensor | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Each record's own gradient, as :func:`private_epochs` computes it (eval mode, ``torch.func``).

    Args:
        model: a :class:`~medsilo.medical.models.zoo.SplitModel` (put in eval mode).
        x: images ``(B, C, H, W)``.
        y: labels ``(B,)``.
        params: the parameters to differentiate (default all of ``model``'s).
        extra_loss: as in :func:`private_epochs`, per record.
        logit_shift: as in :func:`private_epochs`.

    Returns:
        name → per-record gradients ``(B, *shape)`` of the parameters in ``params``, and each record's task
        (cross-entropy) loss ``(B,)``.
    """
    chosen = {id(p) for p in (model.parameters() if params is None else params)}
    trained = {name: p for name, p in model.named_parameters() if id(p) in chosen}
    model.eval()
    grads, losses = _per_record_gradients(model, trained, extra_loss, logit_shift)(x, y)
    return grads, losses[:, 0]


class _SplitForward(nn.Module):
    """``x -> (features, logits)`` of a split model, so ``functional_call`` can run the default path."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.model.features(x)
        return features, self.model.head(features)


def _per_record_gradients(
    model: nn.Module, trained: dict[str, nn.Parameter], extra_loss: ExtraLoss | None,
    logit_shift: torch.Tensor | None = None,
) -> Callable[[torch.Tensor, torch.Tensor], tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """``(x (B, C, H, W), y (B,)) -> ({name: (B, *shape)}, losses (B, 2))`` at the current parameters; the
    loss columns are each record's task (cross-entropy) loss and its whole objective (task + extra)."""
    wrapper = _SplitForward(model)

    def record_loss(
        params: dict[str, torch.Tensor], constants: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        state = {f"model.{name}": t for name, t in {**constants, **params}.items()}
        features, logits = functional_call(wrapper, state, (x.unsqueeze(0),))
        labels = y.unsqueeze(0)
        task = task_loss(logits, labels, logit_shift=logit_shift)
        extra = (
            extra_loss(features, logits, labels)
            if extra_loss is not None
            else torch.zeros((), device=x.device)
        )
        objective = task + extra
        return objective, torch.stack([task.detach(), objective.detach()])

    batched = vmap(grad(record_loss, has_aux=True), in_dims=(None, None, 0, 0))

    def run(x: torch.Tensor, y: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        params = {name: p.detach() for name, p in trained.items()}
        constants = {name: p.detach() for name, p in model.named_parameters() if name not in trained}
        constants |= dict(model.named_buffers())
        return batched(params, constants, x, y)

    return run


def _trained_parameters(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, nn.Parameter]:
    """The parameters ``optimizer`` steps, by their names in ``model``."""
    names = {id(p): name for name, p in model.named_parameters()}
    stepped = [p for group in optimizer.param_groups for p in group["params"]]
    foreign = [p for p in stepped if id(p) not in names]
    if foreign or not stepped:
        raise ValueError(
            f"optimizer: steps {len(foreign)} tensor(s) that are not parameters of the model ({len(stepped)} "
            f"in all); DP-SGD clips and noises the model's parameters only"
        )
    chosen = {id(p) for p in stepped}
    return {name: p for name, p in model.named_parameters() if id(p) in chosen}


def _check_frozen_batchnorm(model: nn.Module) -> None:
    """Refuse BatchNorm whose statistics may come from data (:func:`private_epochs`, BatchNorm)."""
    for name, m in model.named_modules():
        if not isinstance(m, nn.modules.batchnorm._BatchNorm):
            continue
        if not m.track_running_stats or m.running_mean is None:
            raise ValueError(
                f"BatchNorm '{name}' uses batch statistics even in eval mode; DP-SGD cannot train it"
            )
        if int(m.num_batches_tracked) > 0:
            raise ValueError(
                f"BatchNorm '{name}' has tracked {int(m.num_batches_tracked)} batch(es) of data; DP-SGD would use "
                f"those statistics unprotected (train this model privately from its initialisation)"
            )


@torch.no_grad()
def predict(
    model: nn.Module, loader: torch.utils.data.DataLoader, multilabel: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities ``(N, K)`` (:func:`probabilities`) and labels ``(N,)`` or targets ``(N, K)`` over
    ``loader``, in eval mode."""
    model.eval()
    probs, labels = [], []
    for x, y in loader:
        probs.append(probabilities(model(x), multilabel))
        labels.append(y)
    return torch.cat(probs), torch.cat(labels)


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x`` with ties given their average rank (as ``scipy.stats.rankdata``)."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    edges = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1], True])
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat((edges[:-1] + edges[1:] + 1) / 2.0, np.diff(edges))
    return ranks


def auroc(probs: np.ndarray, labels: np.ndarray) -> float:
    """AUROC as :func:`classification_metrics` defines it (binary for two classes or two present; else the macro
    one-vs-rest mean over the present classes on probabilities renormalised over them; NaN with fewer than two
    present), from ranks (Mann–Whitney, ties averaged): the same numbers as scikit-learn's ``roc_auc_score``
    (checked in ``tests/unit/test_export.py``), one implementation for evaluation and the model card's
    bootstrap (fast enough to run a thousand times)."""
    present = np.unique(labels)
    if len(present) < 2:
        return math.nan
    if probs.shape[1] == 2:
        columns, positives = probs[:, 1:2], [1]
    else:
        sub = probs[:, present] / probs[:, present].sum(1, keepdims=True)
        columns, positives = (sub[:, 1:2], [present[1]]) if len(present) == 2 else (sub, list(present))
    scores = []
    for column, cls in zip(columns.T, positives, strict=True):
        pos = labels == cls
        n_pos, n_neg = int(pos.sum()), int((~pos).sum())
        ranks = average_ranks(column)
        scores.append((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
    return float(np.mean(scores))


def classification_metrics(probs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Accuracy, balanced accuracy and AUROC of probabilities ``(N, K)`` against labels ``(N,)``.

    Balanced accuracy is the mean recall over the classes present in the labels (a site that predicts its
    majority class for everything scores 1/K-present, however skewed its data); NaN without labels.

    AUROC (:func:`auroc`) is binary (positive class 1) for K = 2 and macro one-vs-rest for K > 2 over the
    classes present in the labels; with exactly two present (a label-skewed site of a K-class job) it is
    the binary AUROC of the two, on probabilities renormalised over them. It is NaN when the labels hold
    fewer than two classes, since it is undefined there.
    """
    y = labels.numpy()
    p = probs.double().numpy()
    predicted = p.argmax(1)
    acc = float((predicted == y).mean()) if len(y) else math.nan
    present = np.unique(y)
    balanced = float(np.mean([(predicted[y == c] == c).mean() for c in present])) if len(y) else math.nan
    return {"acc": acc, "balanced_acc": balanced, "auroc": auroc(p, y) if len(y) else math.nan}


def label_auroc(scores: np.ndarray, targets: np.ndarray) -> float:
    """Binary AUROC of one label over its known entries (NaN targets left out); NaN unless both 0 and 1 occur."""
    known = ~np.isnan(targets)
    y = targets[known]
    if len(np.unique(y)) < 2:
        return math.nan
    return auroc(np.stack([1 - scores[known], scores[known]], 1), y.astype(np.int64))


def choose_thresholds(probs: torch.Tensor, targets: torch.Tensor) -> list[float]:
    """Per label, the threshold ``t`` (predict present when ``p ≥ t``) that maximises F1 on these (validation)
    probabilities ``(N, K)`` against targets ``(N, K)`` (NaN = unknown, left out).

    Candidates are the label's own known probabilities; ties go to the highest threshold (the fewest false
    positives). A label with no known positive has no F1 to maximise: its threshold is 0.5.
    """
    p, y = probs.double().numpy(), targets.double().numpy()
    out = []
    for k in range(p.shape[1]):
        known = ~np.isnan(y[:, k])
        scores, truth = p[known, k], y[known, k] == 1
        if not truth.any():
            out.append(0.5)
            continue
        order = np.argsort(-scores, kind="stable")
        s, t = scores[order], truth[order]
        tp = np.cumsum(t)
        fp = np.cumsum(~t)
        f1 = 2 * tp / (2 * tp + fp + (truth.sum() - tp))
        last = np.r_[s[1:] != s[:-1], True]  # predict ≥ s[i] takes every tie of s[i]
        best = int(np.flatnonzero(last)[np.argmax(f1[last])])
        out.append(float(s[best]))
    return out


def multilabel_metrics(
    probs: torch.Tensor, targets: torch.Tensor, labels: Iterable[str], thresholds: Iterable[float]
) -> dict[str, float]:
    """A multi-label evaluation as flat numbers (``results.json`` keeps one number per key).

    Args:
        probs: ``(N, K)`` sigmoid probabilities.
        targets: ``(N, K)`` 1.0 / 0.0, NaN for unknown (left out of every figure).
        labels: the K label names.
        thresholds: the K decision thresholds (:func:`choose_thresholds` on validation).

    Returns:
        ``auroc/<label>`` (binary AUROC, NaN without both values known), ``macro_auroc`` (mean of the defined
        ones; NaN if none) and ``auroc`` (the same, so single-label readers see a comparable figure),
        ``f1/<label>`` at its threshold (NaN with no positive known or predicted), ``macro_f1``,
        ``threshold/<label>``, ``acc`` = ``correct`` / ``n``: exact-match accuracy over the ``n`` images with at
        least one known label (``correct``: every known label of the image predicted right).
    """
    labels, cut = list(labels), torch.tensor(list(thresholds), dtype=torch.float64)
    p, y = probs.double(), targets.double()
    known = ~torch.isnan(y)
    predicted = p >= cut
    truth = y == 1
    out: dict[str, float] = {}
    aurocs, f1s = [], []
    for k, name in enumerate(labels):
        a = label_auroc(p[:, k].numpy(), y[:, k].numpy())
        kk = known[:, k]
        tp = int((predicted[:, k] & truth[:, k] & kk).sum())
        fp = int((predicted[:, k] & ~truth[:, k] & kk).sum())
        fn = int((~predicted[:, k] & truth[:, k] & kk).sum())
        f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else math.nan
        out[f"auroc/{name}"], out[f"f1/{name}"], out[f"threshold/{name}"] = a, f1, float(cut[k])
        aurocs.append(a)
        f1s.append(f1)
    defined = [a for a in aurocs if not math.isnan(a)]
    out["macro_auroc"] = out["auroc"] = float(np.mean(defined)) if defined else math.nan
    defined_f1 = [f for f in f1s if not math.isnan(f)]
    out["macro_f1"] = float(np.mean(defined_f1)) if defined_f1 else math.nan
    scored = known.any(1)
    right = ((predicted == truth) | ~known).all(1) & scored
    out["correct"], out["n"] = int(right.sum()), int(scored.sum())
    out["acc"] = out["correct"] / out["n"] if out["n"] else math.nan
    return out


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
        ``{"acc", "balanced_acc", "auroc", "correct", "n", "predicted_classes"}`` (counts: ``correct``, ``n``,
        and how many distinct classes the model predicted on the split — 1 flags a constant predictor).
    """
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False)
    probs, labels = [], []
    for x, y in loader:
        probs.append(scores(x))
        labels.append(y)
    p, y = torch.cat(probs), torch.cat(labels)
    out = classification_metrics(p, y)
    predicted = p.argmax(1)
    return {**out, "correct": int((predicted == y).sum()), "n": int(len(y)),
            "predicted_classes": int(len(torch.unique(predicted)))}  # fmt: skip


@torch.no_grad()
def score_split(
    scores: Callable[[torch.Tensor], torch.Tensor], data: torch.utils.data.Dataset, batch_size: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """``scores`` of every image of ``data`` ``(N, K)`` and its labels or targets, in order."""
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False)
    probs, labels = [], []
    for x, y in loader:
        probs.append(scores(x))
        labels.append(y)
    return torch.cat(probs), torch.cat(labels)


def evaluate_splits(scores: Callable[[torch.Tensor], torch.Tensor], data, labels: Iterable[str] | None = None,
                    batch_size: int = 256) -> dict[str, dict[str, float]]:  # fmt: skip
    """A site's evaluation of its deployed model: ``{"val": …, "test": …}``.

    Single-label (``labels`` ``None``): :func:`evaluate_split` of each split. Multi-label (``labels`` the
    job's labels): the thresholds are chosen on validation (:func:`choose_thresholds`), then both splits are
    scored with them (:func:`multilabel_metrics`): test never chooses anything.

    Args:
        scores: the client half's ``scores`` (sigmoid probabilities for a multi-label job).
        data: the site's :class:`~medsilo.medical.data.SiteData`.
        labels: a multi-label job's label names, else ``None``.
        batch_size: evaluation batch size.
    """
    if labels is None:
        return {split: evaluate_split(scores, data.split(split), batch_size) for split in ("val", "test")}
    val = score_split(scores, data.split("val"), batch_size)
    test = score_split(scores, data.split("test"), batch_size)
    cut = choose_thresholds(*val)
    return {"val": multilabel_metrics(*val, labels, cut), "test": multilabel_metrics(*test, labels, cut)}
