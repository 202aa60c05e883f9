"""FedALA: adaptive local aggregation (Zhang et al., AAAI 2023,
`arXiv:2212.01197 <https://arxiv.org/abs/2212.01197>`_).

FedAvg's exchange, with a learned *local initialisation*: instead of overwriting its model with the
global one, each site blends the two, element-wise, with weights it learns on its own data.

Parameter tensors, in ``model.parameters()`` order, are split into *lower* ones (all but the last
``p = layer_idx``) and *higher* ones (the last ``p``; ``p = 2`` is the head's weight and bias). Before
local training in round ``t ≥ 2`` (ALA, in ``receive``):

* lower tensors: ``θ_i ← θ_g`` (the global ones);
* higher tensors: ``θ̂ = θ_i + (θ_g − θ_i) ⊙ W`` with element-wise weights ``W ∈ [0, 1]`` (shapes of
  the higher tensors, initialised to 1, kept at the site and warm-started across rounds), learned
  on a random contiguous slice of ``rand_percent`` % of the local training split, batch = the local
  batch size. Per batch:

  .. math::

      W \\leftarrow \\mathrm{clip}\\big(W - \\eta \\, \\nabla_{\\hat\\theta} \\mathrm{CE} \\odot
      (\\theta_g - \\theta_i),\\ 0,\\ 1\\big), \\qquad
      \\hat\\theta \\leftarrow \\theta_i + (\\theta_g - \\theta_i) \\odot W

  (the chain rule through θ̂; θ_i and θ_g stay fixed). The first time ALA runs, passes over the
  slice repeat until the population std of the last ``num_pre_loss`` pass losses (mean CE over the
  pass) is below ``threshold``, at most ``max_first_passes`` passes; later rounds do exactly one pass.

Then ordinary ``local_epochs`` of CE training from the ALA-initialised model, which is uploaded
(weighted by n_i) and averaged as in FedAvg. In round 1 (nothing received yet) sites start from the
shared seeded initialisation and no ALA runs.

Deployed model at a site (``scores``): the ALA-initialised, then locally trained model, with the
site's own BatchNorm statistics.

BatchNorm during ALA: the weight-learning forward passes run in train mode (batch statistics, the
same normalisation as the local training that follows) on a temporary copy of the model; the copy is
discarded afterwards, so the site model's running statistics are unchanged by ALA (as in the
reference, which also learns on a deep copy). Eval mode was not chosen: the running statistics were
estimated under the *local* lower layers, which ALA has just replaced by the global ones.

Defaults (reference repository's ``run_me`` settings): ``eta = 1.0``, ``rand_percent = 80``,
``layer_idx = 2``, ``threshold = 0.1``, ``num_pre_loss = 10``; ``max_first_passes = 20`` is ours (the
reference has no cap). ``layer_idx`` must be ≥ 1 and at most the number of parameter tensors.

Uploads (per site, per round; the same as FedAvg):
    ``w.<param>``  same shape as the parameter, float32: locally trained parameters × n_i. Reveals
    the local model (model-inversion risk); encrypted under ``ckks``.
    ``n``          () float32: training images. Reveals dataset size; encrypted under ``ckks``.
    The ALA weights ``W`` never leave the site.

Privacy modes: all (the server only adds).

Reference-code issues fixed:
    * Round 1 was detected by "the sum of (global − local) over the first tensor is 0", which can
      misfire either way; here the explicit round number decides (ALA from round 2 on).
    * ``layer_idx = 0`` selected *all* tensors (Python ``[-0:]``); here ``layer_idx ≥ 1`` is required
      and a value above the model's number of parameter tensors is refused.
    * The first ALA's convergence loop had no bound and can hang for small thresholds; it is capped
      at ``max_first_passes`` passes.
    * The slice start came from the unseeded global ``random``; here it is drawn from a generator
      seeded by the site seed and the round.
    * The convergence check used the *last batch's* loss of each pass (and needed ``num_pre_loss + 1``
      passes); here it uses the pass's mean loss, which is less noisy, once ``num_pre_loss`` exist.
    * The slice loader dropped every incomplete batch, so a slice smaller than one batch gave no
      batch at all and the loop failed on an unset loss; here the batch is at most the slice and
      only a final batch of exactly one image is dropped.
"""

from __future__ import annotations

import copy
import statistics
from collections.abc import Sequence

import torch
from pydantic import Field
from torch import nn

from medsilo.components.algorithms.base import (
    COSINE_RECIPE,
    AlgorithmConfig,
    Client as BaseClient,
    Server as BaseServer,
    SiteSetup,
    Tensors,
    Upload,
    count,
    load_mean,
    weighted_params,
)
from medsilo.components.training import task_loss

_SLICE_STREAM = 50_000
"""Offset that keeps the ALA slice generator apart from the training loader's (same site seed, round)."""


FAMILY = "pfl"
"""Personalized FL: every site runs the same backbone and shares (part of) its weights."""
MIXED_BACKBONES = False
"""Whether a job may give its sites different backbones."""
MULTILABEL = True
"""Whether a job may be multi-label (``task: multilabel``): sigmoid outputs, masked BCE in the shared loop."""
RECIPE = COSINE_RECIPE
"""The training recipe chosen on validation data (:data:`.base.COSINE_RECIPE`; ``benchmarks/recipe.py``, BENCHMARKS.md)."""


class Config(AlgorithmConfig):
    """FedALA hyper-parameters.

    Attributes:
        eta: step size η of the weight learning (> 0). Default 1.0.
        rand_percent: share s of the local training split, in %, that ALA learns on (1–100). Default 80.
        layer_idx: p, the number of trailing parameter tensors that are blended (≥ 1; 2 = the head's
            weight and bias). Default 2.
        threshold: the first ALA stops once the std of the last ``num_pre_loss`` pass losses is below
            this (> 0). Default 0.1.
        num_pre_loss: window of pass losses for that std (≥ 2). Default 10.
        max_first_passes: cap on the first ALA's passes (≥ 1). Default 20.
    """

    eta: float = Field(default=1.0, gt=0)
    rand_percent: int = Field(default=80, ge=1, le=100)
    layer_idx: int = Field(default=2, ge=1)
    threshold: float = Field(default=0.1, gt=0)
    num_pre_loss: int = Field(default=10, ge=2)
    max_first_passes: int = Field(default=20, ge=1)


class Client(BaseClient):
    """FedALA at one site: learns how much of the global higher layers to take, then trains locally.

    Attributes:
        weights: the ALA weights ``W``, one tensor per higher parameter (same shapes), in [0, 1];
            ``None`` until the first ALA.
        ala_passes: passes over the slice made by the most recent ALA (0: none has run).

    Raises:
        ValueError: ``layer_idx`` exceeds the model's number of parameter tensors.
    """

    config: Config

    def __init__(self, setup: SiteSetup, config: Config):
        super().__init__(setup, config)
        tensors = len(list(self.model.parameters()))
        if config.layer_idx > tensors:
            raise ValueError(
                f"layer_idx: must be ≤ {tensors} (parameter tensors of the model), got {config.layer_idx}"
            )
        self.weights: list[torch.Tensor] | None = None
        self.ala_passes = 0
        self._ala_started = False

    def receive(self, payload: Tensors | None, rnd: int) -> None:
        """Initialise the local model from the global one: ALA from round 2 on.

        Before round 1 (``payload is None``) the shared seeded initialisation is kept; a payload in
        round 1 (no local training yet) is loaded as it is.
        """
        if payload is None:
            return
        if rnd < 2:
            load_mean(self.model, payload, "w.")
            return
        global_model = copy.deepcopy(self.model)  # carries this site's BatchNorm statistics
        load_mean(global_model, payload, "w.")
        self.ala_passes = self._adaptive_local_aggregation(global_model, rnd)

    def train(self, rnd: int) -> Upload:
        """Train the ALA-initialised model on CE; upload it like FedAvg.

        Uploads:
            ``w.<param>`` (parameter shape) float32: θ_i · n_i. Reveals the local model; encrypted
            under ``ckks``.
            ``n`` () float32: n_i, training images. Reveals dataset size; encrypted under ``ckks``.
        """
        loss = self.fit(rnd)
        n = self.setup.n_train
        return Upload({**weighted_params(self.model, n, "w."), **count(n)}, loss)

    def _adaptive_local_aggregation(self, global_model: nn.Module, rnd: int) -> int:
        """Overwrite the lower tensors with ``global_model``'s, learn ``W``, set the higher ones to θ̂.

        ``global_model`` (a copy of the site model holding θ_g) becomes the scratch model θ̂ and is
        discarded by the caller. Returns the number of passes made.
        """
        p = self.config.layer_idx
        local = list(self.model.parameters())
        scratch = list(global_model.parameters())
        with torch.no_grad():
            for mine, theirs in zip(local[:-p], scratch[:-p]):
                mine.copy_(theirs)
        for frozen in scratch[:-p]:  # no gradients needed below the blended tensors
            frozen.requires_grad_(False)
        higher = scratch[-p:]
        base = [t.detach().clone() for t in local[-p:]]  # θ_i
        diffs = [g.detach() - b for g, b in zip(higher, base)]  # θ_g − θ_i
        if self.weights is None:
            self.weights = [torch.ones_like(b) for b in base]
        _set(higher, [ala_blend(b, d, w) for b, d, w in zip(base, diffs, self.weights)])

        first = not self._ala_started
        loader = self._slice_loader(rnd)
        losses: list[float] = []
        global_model.train()
        for _ in range(self.config.max_first_passes if first else 1):
            total, seen = 0.0, 0
            for x, y in loader:
                loss = task_loss(global_model(x), y)
                grads = torch.autograd.grad(loss, higher)
                eta = self.config.eta
                self.weights = [ala_weight_step(w, g, d, eta) for w, g, d in zip(self.weights, grads, diffs)]
                _set(higher, [ala_blend(b, d, w) for b, d, w in zip(base, diffs, self.weights)])
                total += float(loss.detach()) * len(y)
                seen += len(y)
            losses.append(total / seen)
            if first and converged(losses, self.config.num_pre_loss, self.config.threshold):
                break
        self._ala_started = True
        _set(local[-p:], [t.detach() for t in higher])
        return len(losses)

    def _slice_loader(self, rnd: int) -> torch.utils.data.DataLoader:
        """Batches, in stored order, of a random contiguous slice of ``rand_percent`` % of the train split.

        Batch = the site's batch size; a final batch of exactly one image is dropped (BatchNorm in train
        mode), as in :meth:`train_loader`.
        """
        data = self.setup.data.train
        g = torch.Generator().manual_seed(self.setup.seed * 100_003 + _SLICE_STREAM + rnd)
        rows = ala_slice(len(data), self.config.rand_percent, g)
        batch = min(self.setup.batch_size, len(rows))
        subset = torch.utils.data.Subset(data, rows)
        single_tail = len(rows) % batch == 1
        return torch.utils.data.DataLoader(subset, batch_size=batch, shuffle=False, drop_last=single_tail)


class Server(BaseServer):
    """Linear: the payload is the aggregate Σ θ_i n_i, Σ n_i (FedAvg)."""


# ---- pure helpers ---------------------------------------------------------------------------------


def ala_blend(local: torch.Tensor, diff: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``θ̂ = θ_i + (θ_g − θ_i) ⊙ W``.

    Args:
        local: θ_i, any shape.
        diff: θ_g − θ_i, same shape.
        weight: W, same shape, in [0, 1].

    Returns:
        θ̂, same shape.
    """
    return local + diff * weight


def ala_weight_step(weight: torch.Tensor, grad: torch.Tensor, diff: torch.Tensor, eta: float) -> torch.Tensor:
    """One ALA weight update ``clip(W − η ∇_θ̂ CE ⊙ (θ_g − θ_i), 0, 1)``.

    Args:
        weight: W, any shape.
        grad: ∇_θ̂ CE, same shape.
        diff: θ_g − θ_i, same shape.
        eta: step size η.

    Returns:
        the new W, same shape, in [0, 1].
    """
    return torch.clamp(weight - eta * grad * diff, 0.0, 1.0)


def converged(losses: Sequence[float], window: int, threshold: float) -> bool:
    """True when at least ``window`` losses exist and the population std of the last ``window`` is below
    ``threshold``."""
    return len(losses) >= window and statistics.pstdev(losses[-window:]) < threshold


def ala_slice(n: int, percent: int, generator: torch.Generator) -> range:
    """A random contiguous run of ``max(1, ⌊n · percent / 100⌋)`` row indices out of ``n``.

    The start is uniform over ``0 … n − size`` (``generator`` decides).
    """
    size = max(1, n * percent // 100)
    start = int(torch.randint(0, n - size + 1, (1,), generator=generator))
    return range(start, start + size)


@torch.no_grad()
def _set(targets: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> None:
    """Copy ``values`` into ``targets`` in place (parameters keep their identity)."""
    for t, v in zip(targets, values):
        t.copy_(v)
