r"""FedDistill (FD): federated distillation of per-class logits (Jeong et al., 2018, "Communication-Efficient
On-Device Machine Learning: Federated Distillation and Augmentation under Non-IID Private Data",
`arXiv:1811.11479 <https://arxiv.org/abs/1811.11479>`_).

Nothing of the model is shared, so every site may run its own backbone (only K must agree). Each site
shares, per class k, the mean logit vector its model produced for training images of class k; the
server averages them into global per-class logits :math:`\bar L^k \in \mathbb{R}^K`, and each site
distils its model towards them (``shared/reference/algorithms.md`` §4.4):

.. math::

    \mathcal{L}_i = \mathrm{CE}\big(f_i(x), y\big)
        + \lambda\, T^2\, \mathrm{KL}\Big(\mathrm{softmax}(\bar L^{y}/T) \,\Big\|\, \mathrm{softmax}(f_i(x)/T)\Big)

The KL term is averaged over the batch; a sample whose class has no global logit yet (round 1, or a
class no site has) contributes 0. The site's logits are collected *during* the round's training, from
the detached outputs the shared loop computes anyway (train mode, the moving model, every local
epoch), so FD costs no extra forward pass.

**Weighting** (``Config.weighting``). The reference averages the sites' per-class means *unweighted*:
:math:`\bar L^k = \frac{1}{|S_k|}\sum_{i \in S_k} L_i^k` over the sites S_k that have class k. Both
choices are sums here, so the server only adds (works under CKKS and DP) and sites finish the mean:

* ``"sites"`` (default, the reference): a site uploads :math:`L_i^k \cdot [k \in S_i]` (its class
  mean, a zero row for an absent class) and the presence indicator :math:`[k \in S_i]`; the mean is
  Σ rows / Σ indicators. Every site counts once per class, however small it is, and one site's
  upload has bounded size per row (helps DP sensitivity).
* ``"samples"``: a site uploads the per-class logit sums and the number of logits collected; the
  mean is the pooled mean over all training outputs of class k. Large sites dominate.

A class counts as having a global logit when its aggregated count is ≥ 0.5 (at least one site, or
one logit), which also keeps DP-noised or CKKS-rounded counts near 0 from producing huge means.

Defaults: λ (``distill_weight``) = 1 (reference); T (``temperature``) = 1: the reference has no
temperature (it uses raw logits), and T = 1 keeps the term on the scale of the cross-entropy; the
T² factor (Hinton et al., 2015) keeps the gradient scale independent of T when T is changed.

Deployed model at a site: its own model, ``softmax(f_i(x))``. BatchNorm statistics stay local.

Uploads (per site, per round), identical names, shapes and dtypes at every site whatever classes it
has (the semantics of the two depend on ``weighting``, which the whole job shares):
    ``logit_sum``    (K, K) float32: row k = the site's mean training logit of class k (``"sites"``) or
    their sum (``"samples"``); a zero row for a class the site does not have. Reveals the site's
    class-conditional predictions (how its model confuses classes) and, through the zero rows, which
    classes it has; encrypted under ``ckks``.
    ``logit_count``  (K,) float32: 1/0 presence of class k (``"sites"``) or the number of logits
    collected for class k, = n_k × local_epochs less a dropped one-image final batch (``"samples"``).
    Reveals the site's label set, respectively its label distribution; encrypted under ``ckks``.

Privacy modes: all (every upload is a sum).

Reference-code bugs fixed:

* **Raw logits as a soft target**: the reference passes the global logit vector itself as the
  probability target of a soft cross-entropy; logits can be negative and do not sum to 1, so the
  target is not a distribution and the term is unbounded below. Here the target is
  softmax(global/T) and the term is the KL divergence (≥ 0, 0 exactly when the distributions agree).
* **Absent classes**: the reference targets a sample of a class without a global logit with its own
  detached output (a non-zero, meaningless entropy-like term); here such samples contribute 0.
* **Missing-class sentinels**: the reference signals absent classes with empty lists; here every
  site uploads fixed shapes with zero rows and zero counts, and no division by 0 happens anywhere.
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch.nn import functional as F

from medsilo.components.algorithms.base import (
    COSINE_RECIPE,
    AlgorithmConfig,
    Client as BaseClient,
    Server as BaseServer,
    SiteSetup,
    Tensors,
    Upload,
    class_means,
)
from medsilo.components.training import ExtraLoss

LOGIT_SUM = "logit_sum"
"""Upload: per-class logit rows ``(K, K)`` (means × presence, or sums; see ``Config.weighting``)."""

LOGIT_COUNT = "logit_count"
"""Upload: per-class presence indicators or logit counts ``(K,)``."""

FAMILY = "htfl"
"""Heterogeneous FL: sites share only d- or K-sized tensors, so each may run its own backbone."""
MIXED_BACKBONES = True
"""Whether a job may give its sites different backbones."""
MULTILABEL = False
"""Whether a job may be multi-label (``task: multilabel``): no, it distils per-class mean logits: an image has one class."""
RECIPE = COSINE_RECIPE
"""The training recipe chosen on validation data (:data:`.base.COSINE_RECIPE`; ``benchmarks/recipe.py``, BENCHMARKS.md)."""


class Config(AlgorithmConfig):
    """FedDistill's hyper-parameters.

    Attributes:
        weighting: how sites' per-class logits are averaged: ``"sites"`` (default, the reference:
            unweighted mean over the sites that have the class) or ``"samples"`` (pooled mean over
            every training logit of the class).
        distill_weight: λ, weight of the distillation term, ≥ 0 (default 1, the reference's value;
            0 leaves plain local training).
        temperature: T > 0 of the softened distributions (default 1; the reference has none).
    """

    weighting: Literal["sites", "samples"] = "sites"
    distill_weight: float = Field(default=1.0, ge=0)
    temperature: float = Field(default=1.0, gt=0)

    @model_validator(mode="after")
    def _warn_distillation_off(self) -> Config:
        if self.distill_weight == 0:
            warnings.warn(
                "feddistill: distill_weight = 0 switches distillation off (local training only)", stacklevel=2
            )
        return self


class Client(BaseClient):
    """FedDistill at one site: its own model, pulled towards the global per-class logits.

    Attributes:
        global_logits: :math:`\\bar L` ``(K, K)``, row k the global logit of class k (zero where absent).
        has_global: ``(K,)`` bool, classes that have a global logit (none before the first payload).
    """

    config: Config

    def __init__(self, setup: SiteSetup, config: Config):
        super().__init__(setup, config)
        k = setup.num_classes
        self.global_logits = torch.zeros(k, k)
        self.has_global = torch.zeros(k, dtype=torch.bool)

    def receive(self, payload: Tensors | None, rnd: int) -> None:
        """Finish the global per-class logits from the aggregate: Σ ``logit_sum`` / Σ ``logit_count``.

        The model is left as it is. Before round 1 (``payload`` is ``None``) there are no global
        logits and the first round trains on cross-entropy alone.
        """
        if payload:
            self.global_logits, self.has_global = global_logits(payload[LOGIT_SUM], payload[LOGIT_COUNT])

    def train(self, rnd: int) -> Upload:
        """Train the whole model for ``local_epochs`` on CE + λ·T²·KL, collecting its training logits.

        Returns:
            ``logit_sum`` ((K, K) float32) and ``logit_count`` ((K,) float32), see the module docstring,
            plus the mean cross-entropy.
        """
        k = self.setup.num_classes
        sums, counts = torch.zeros(k, k), torch.zeros(k)
        loss = self.fit(rnd, extra_loss=self.distill_loss(sums, counts))
        rows, indicator = site_rows(sums, counts, self.config.weighting)
        return Upload({LOGIT_SUM: rows, LOGIT_COUNT: indicator}, loss)

    def distill_loss(self, sums: torch.Tensor, counts: torch.Tensor) -> ExtraLoss:
        """The shared loop's extra term; it also adds each batch's detached logits into ``sums``/``counts``.

        Args:
            sums: ``(K, K)`` accumulator of per-class logit sums, updated in place.
            counts: ``(K,)`` accumulator of per-class logit counts, updated in place.
        """
        weight, temperature = self.config.distill_weight, self.config.temperature

        def extra(features: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            add_class_sums(sums, counts, logits.detach(), labels)
            if weight == 0 or not bool(self.has_global.any()):
                return torch.zeros(())
            return weight * distillation(logits, labels, self.global_logits, self.has_global, temperature)

        return extra


class Server(BaseServer):
    """Linear: the payload is the aggregate (Σ ``logit_sum``, Σ ``logit_count``)."""


# ---- pure helpers ---------------------------------------------------------------------------------


@torch.no_grad()
def add_class_sums(
    sums: torch.Tensor, counts: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor
) -> None:
    """Add a batch into per-class accumulators, in place.

    Args:
        sums: ``(K, K)``; row ``labels[b]`` gains ``logits[b]``.
        counts: ``(K,)``; entry ``labels[b]`` gains 1.
        logits: ``(B, K)`` (detached).
        labels: ``(B,)`` int64.
    """
    sums.index_add_(0, labels, logits.float())
    counts += torch.bincount(labels, minlength=counts.numel()).float()


def site_rows(sums: torch.Tensor, counts: torch.Tensor, weighting: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A site's upload from its per-class logit sums ``(K, K)`` and counts ``(K,)``.

    Returns:
        ``(rows (K, K), count (K,))`` float32: for ``"samples"`` the sums and counts themselves; for
        ``"sites"`` the per-class means (zero rows where the count is 0) and 0/1 presence indicators.
    """
    if weighting == "samples":
        return sums.float().clone(), counts.float().clone()
    if weighting != "sites":
        raise ValueError(f"weighting: must be 'sites' or 'samples', got {weighting!r}")
    means, present = class_means(sums, counts)
    return means, present.float()


def global_logits(sums: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Global per-class logits from the aggregate.

    Args:
        sums: Σ_i rows_i ``(K, K)``.
        counts: Σ_i count_i ``(K,)``.

    Returns:
        ``(logits (K, K), present (K,) bool)``: row k = sums[k] / counts[k] for present classes, a zero
        row otherwise (:func:`~medsilo.components.algorithms.base.class_means`).
    """
    return class_means(sums, counts)


def distillation(
    logits: torch.Tensor,
    labels: torch.Tensor,
    targets: torch.Tensor,
    present: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """``T² · mean_b [y_b present] · KL(softmax(targets[y_b]/T) ‖ softmax(logits_b/T))``, a scalar.

    Args:
        logits: the site's logits ``(B, K)`` (gradient flows into them).
        labels: ``(B,)`` int64.
        targets: global per-class logits ``(K, K)`` (no gradient).
        present: ``(K,)`` bool, classes with a global logit; other samples contribute 0.
        temperature: T > 0.
    """
    log_q = F.log_softmax(logits / temperature, dim=1)
    log_p = F.log_softmax(targets[labels].detach() / temperature, dim=1)
    kl = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(1)
    return temperature**2 * (kl * present[labels].float()).mean()
