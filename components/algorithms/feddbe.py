r"""FedDBE: Domain Bias Eliminator (Zhang et al., NeurIPS 2023, "Eliminating Domain Bias for Federated
Learning in Representation Space", `arXiv:2311.14975 <https://arxiv.org/abs/2311.14975>`_).

FedAvg of the full model, plus two per-site devices on the feature space (z = φ(x) ∈ R^d):

* a **personalised representation bias memory** (PRBM) m̄_i ∈ R^d, trainable, initialised to 0 and
  never shared: the head sees :math:`h(z + \bar m_i)`, so the site's domain bias is absorbed by m̄_i
  instead of by the shared φ;
* a **mean regulariser** pulling the site's running batch-feature mean μ_i towards a global mean
  feature μ_g fixed once for the whole job.

Per batch B of a round (``shared/reference/algorithms.md`` §2.10), with μ_i reset to 0 at the start
of the round and t the batch counter of the round:

.. math::

    \mu_i &\leftarrow (1-m)\,\mu_i^{\text{detached}} + m\,\tfrac{1}{|B|}\textstyle\sum_{x\in B}\varphi(x),
    \qquad \hat\mu_i = \mu_i / (1-(1-m)^t) \\
    \mathcal{L} &= \mathrm{CE}\big(h(\varphi(x) + \bar m_i), y\big)
                  + \kappa \cdot \tfrac{1}{d}\textstyle\sum_j \tfrac12(\hat\mu_{i,j} - \mu_{g,j})^2

The gradient of the regulariser reaches φ only through the current batch's mean (μ_i is detached
after every step). One optimiser (job settings) updates φ, h and m̄_i; m̄_i gets no weight decay (the
reference trains it with a separate plain SGD at the same learning rate).

**μ_g in a sum-only, linear-server job.** Round 1 is a warm-up that is also an ordinary FedAvg round:
no PRBM, no regulariser (μ_g is unknown), and besides the model each site uploads ``dbe.mean_sum`` =
Σ φ(x) over its training images (eval mode, after training, without augmentation). In ``receive``
before round 2 each site sets μ_g = Σ_i mean_sum_i / Σ_i n_i, the n-weighted mean feature of the
federation, once; later payloads never change it and no site uploads ``dbe.mean_sum`` again.

Defaults (the authors' tuned values from the DBE repository's ``run_me``, not PFLlib's):

* ``kl_weight`` κ = 50. PFLlib's default 0 switches the regulariser off (only the PRBM remains).
* ``momentum`` m = 1: μ_i is the current batch's mean, so every batch's mean feature is matched to
  μ_g and its gradient has full weight. PFLlib's default 0.1 makes μ_i an EMA over ~10 batches
  whose current-batch gradient is scaled by 0.1.

Reference-code bugs fixed:

* **Zero-initialised EMA without bias correction**: with m < 1 the reference's μ_i starts each round
  at 0, so early in the round it pulls 0.1 × (batch mean) towards μ_g, i.e. the batch mean towards
  10 μ_g. Here the regulariser uses the bias-corrected :math:`\hat\mu_i` (as Adam does); with the
  default m = 1 the correction is exactly 1.
* **μ_g from a biased, partial estimate**: the reference takes each client's *running* EMA at the
  end of its warm-up training (the last batch's mean when m = 1, a zero-biased EMA when m = 0.1).
  Here μ_g is the exact n-weighted mean of φ(x) over every training image of every site.
* **Warm-up outside the rounds**: the reference trains every client once in the server constructor
  (changing client state before round 0; a late-joining client has no μ_g). Here the warm-up is
  round 1 itself, and a site that reaches round ≥ 2 without μ_g stops with an error instead of
  silently running FedAvg.

Deployed model at a site: the global φ and h (with the site's BatchNorm statistics) and the site's
PRBM: ``softmax(h(φ(x) + m̄_i))``.

Uploads (per site, per round):
    ``w.<param>``     same shape as the parameter, float32: parameters × n_i. Reveals the locally
    trained model (model-inversion risk); encrypted under ``ckks``. m̄_i and μ_i never leave the site.
    ``n``             () float32: training images. Reveals dataset size; encrypted under ``ckks``.
    ``dbe.mean_sum``  (d,) float32, round 1 only: Σ φ(x) over the site's training images. Reveals the
    site's mean representation (a fingerprint of its scanner/domain); encrypted under ``ckks``.

Privacy modes: all (every upload is a sum).
"""

from __future__ import annotations

import warnings

import torch
from pydantic import Field, model_validator
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
from medsilo.components.training import probabilities
from medsilo.errors import MedsiloError
from medsilo.medical.data import ImageSet

WEIGHTS = "w."
"""Upload prefix of the full shared model (φ and h)."""

MEAN_SUM = "dbe.mean_sum"
"""Round-1 upload: Σ φ(x) over the site's training images, ``(d,)``."""


FAMILY = "pfl"
"""Personalized FL: every site runs the same backbone and shares (part of) its weights."""
MIXED_BACKBONES = False
"""Whether a job may give its sites different backbones."""
MULTILABEL = True
"""Whether a job may be multi-label (``task: multilabel``): sigmoid outputs, masked BCE in the shared loop."""
RECIPE = COSINE_RECIPE
"""The training recipe chosen on validation data (:data:`.base.COSINE_RECIPE`; ``benchmarks/recipe.py``, BENCHMARKS.md)."""


class Config(AlgorithmConfig):
    """FedDBE's hyper-parameters.

    Attributes:
        kl_weight: κ, weight of the mean regulariser, ≥ 0 (default 50, the DBE authors' value;
            0 keeps only the PRBM, as PFLlib's default does).
        momentum: m in (0, 1], weight of the current batch in the running feature mean μ_i (default 1:
            μ_i is the batch mean; PFLlib uses 0.1).
    """

    kl_weight: float = Field(default=50.0, ge=0)
    momentum: float = Field(default=1.0, gt=0, le=1)

    @model_validator(mode="after")
    def _warn_regulariser_off(self) -> Config:
        if self.kl_weight == 0:
            warnings.warn(
                "feddbe: kl_weight = 0 switches the mean regulariser off; only the PRBM remains", stacklevel=2
            )
        return self


class Client(BaseClient):
    """FedDBE at one site.

    Attributes:
        prbm: m̄_i, the site's PRBM ``(d,)``, trainable, kept between rounds, never uploaded.
        global_mean: μ_g ``(d,)``, set once from round 2's payload (``None`` before).
        running_mean: μ_i ``(d,)``, detached, reset to 0 at the start of every round.
        batches: t, batches seen this round (for the bias correction).
    """

    config: Config

    def __init__(self, setup: SiteSetup, config: Config):
        super().__init__(setup, config)
        d = self.model.head.in_features
        self.prbm = nn.Parameter(torch.zeros(d))
        self.global_mean: torch.Tensor | None = None
        self.running_mean = torch.zeros(d)
        self.batches = 0

    def receive(self, payload: Tensors | None, rnd: int) -> None:
        """Load the global model (mean of ``w.*``); take μ_g from the first payload carrying it.

        The PRBM and BatchNorm statistics are left as they are. Before round 1 (``payload`` is ``None``)
        the shared seeded initialisation is kept.
        """
        if not payload:
            return
        load_mean(self.model, payload, WEIGHTS)
        if self.global_mean is None and MEAN_SUM in payload:
            self.global_mean = (payload[MEAN_SUM] / float(payload["n"])).detach().float().clone()

    def train(self, rnd: int) -> Upload:
        """Round 1: plain FedAvg training plus the feature sum. Later rounds: PRBM + mean regulariser.

        Returns:
            ``w.*`` = θ_i · n_i (parameter shapes, float32), ``n`` = n_i (() float32) and, in round 1
            only, ``dbe.mean_sum`` = Σ φ(x) over the training images ((d,) float32); plus the mean
            cross-entropy.

        Raises:
            MedsiloError: round ≥ 2 without μ_g (the site missed round 1's aggregate or lost its state).
        """
        n = self.setup.n_train
        if rnd == 1:
            loss = self.fit(rnd)
            sums = {**weighted_params(self.model, n, WEIGHTS), **count(n)}
            sums[MEAN_SUM] = feature_sum(self.model, self.setup.data.train, self.setup.batch_size)
            return Upload(sums, loss)
        if self.global_mean is None:
            raise MedsiloError(
                f"site '{self.setup.site}': feddbe round {rnd} has no global mean feature μ_g; it comes "
                f"once, with the aggregate of round 1 ('{MEAN_SUM}'), which this site did not receive"
            )
        self.reset_running_mean()
        groups = [{"params": list(self.model.parameters())}, {"params": [self.prbm], "weight_decay": 0.0}]
        loss = self.fit(rnd, params=groups, forward=self.dbe_forward)
        return Upload({**weighted_params(self.model, n, WEIGHTS), **count(n)}, loss)

    def reset_running_mean(self) -> None:
        """Start a round: μ_i = 0, t = 0."""
        self.running_mean = torch.zeros_like(self.prbm.detach())
        self.batches = 0

    def dbe_forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One training batch: update μ_i, return the PRBM logits and the mean regulariser.

        Args:
            x: images ``(B, C, H, W)``.
            y: labels ``(B,)`` (unused; the shared loop adds the cross-entropy).

        Returns:
            logits ``h(φ(x) + m̄_i)`` ``(B, K)`` and the scalar κ · mean(½(μ̂_i − μ_g)²).
        """
        z = self.model.features(x)
        self.batches += 1
        mean = ema(self.running_mean, z.mean(0), self.config.momentum)
        self.running_mean = mean.detach()
        corrected = debias(mean, self.config.momentum, self.batches)
        extra = mean_regulariser(corrected, self.global_mean, self.config.kl_weight)
        return self.model.head(z + self.prbm), extra

    @torch.no_grad()
    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """``softmax(h(φ(x) + m̄_i))`` ``(B, K)`` for images ``(B, C, H, W)``, in eval mode."""
        self.model.eval()
        return probabilities(self.model.head(self.model.features(x) + self.prbm), self.setup.multilabel)


class Server(BaseServer):
    """Linear: the payload is the aggregate (Σ θ_i n_i, Σ n_i and, after round 1, Σ mean_sum_i)."""


# ---- pure helpers ---------------------------------------------------------------------------------


def ema(previous: torch.Tensor, batch_mean: torch.Tensor, momentum: float) -> torch.Tensor:
    """``(1 − m) · previous + m · batch_mean``, shapes ``(d,)``; gradient flows through ``batch_mean`` only
    when ``previous`` is detached."""
    return (1.0 - momentum) * previous + momentum * batch_mean


def debias(mean: torch.Tensor, momentum: float, steps: int) -> torch.Tensor:
    """Bias-corrected zero-initialised EMA after ``steps`` ≥ 1 updates: ``mean / (1 − (1 − m)^steps)``."""
    return mean / (1.0 - (1.0 - momentum) ** steps)


def mean_regulariser(mean: torch.Tensor, global_mean: torch.Tensor, kl_weight: float) -> torch.Tensor:
    """``κ · mean_j ½ (mean_j − global_mean_j)²`` for feature means ``(d,)``; a scalar."""
    return kl_weight * (0.5 * (mean - global_mean) ** 2).mean()


@torch.no_grad()
def feature_sum(model: nn.Module, images: ImageSet, batch_size: int) -> torch.Tensor:
    """Σ φ(x) over every image of ``images``, in eval mode and without augmentation.

    Args:
        model: a :class:`~medsilo.medical.models.zoo.SplitModel`.
        images: the site's training split (its ``augment`` is not applied).
        batch_size: images per forward pass.

    Returns:
        the feature sum ``(d,)`` float32 (= mean feature × number of images).
    """
    model.eval()
    plain = ImageSet(images.images, images.labels)
    loader = torch.utils.data.DataLoader(plain, batch_size=max(1, batch_size))
    return sum(model.features(x).float().sum(0) for x, _ in loader)
