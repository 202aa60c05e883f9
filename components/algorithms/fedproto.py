r"""FedProto: federated prototype learning across heterogeneous clients (Tan et al., AAAI 2022,
`arXiv:2105.00243 <https://arxiv.org/abs/2105.00243>`_).

Sites may run different backbones; they share only *class prototypes*, vectors in the common feature
space ``z = φ_i(x) ∈ R^d`` (``model.features``). With ``P^k`` the global prototype of class k, site i
minimises per batch (``shared/reference/algorithms.md`` §4.1)

.. math::

    \mathcal{L}_i = \mathrm{CE}\big(h_i(\varphi_i(x)), y\big)
                    + \lambda \cdot \mathrm{MSE}\big(\varphi_i(x), P^{y}\big)

where MSE is the element mean over the batch and the d features. A sample whose class has no global
prototype contributes 0 to the MSE term (its target is its own detached feature) but still counts in
the mean, as in the reference. The whole model (φ_i and h_i) is trained; nothing of it leaves the site.

**Local prototypes** are the per-class means of the detached features of every sample seen during
this round's training (all local epochs, train mode, i.e. from the moving model), collected inside
the loss (no extra pass), as in the reference.

**Server** (linear, so it runs under every privacy mode, CKKS included): the payload *is* the
aggregate, and each site finishes the division itself,
:math:`P^k = \sum_i \texttt{proto\_sum}_i[k] / \sum_i \texttt{proto\_count}_i[k]`; a class whose
total count is below ½ (i.e. 0: counts are integers, the ½ absorbs CKKS approximation error) has no
prototype. What the two tensors hold is set by ``weighting``:

* ``"sites"`` (default, the reference code): ``proto_sum`` holds the site's per-class *mean* and
  ``proto_count`` a 0/1 presence indicator, so P^k is the *unweighted* mean over the sites that have
  class k. The paper's formula weights by sample counts (FedProto issue #6); the reference does not.
* ``"samples"``: ``proto_sum`` holds per-class feature *sums* and ``proto_count`` the per-class
  sample counts (over all local epochs), so P^k is the sample-weighted mean feature of class k.

**Deployed model / inference** is the nearest global prototype: distances
``D[b, k] = MSE(φ_i(x_b), P^k)`` and probabilities ``softmax(−D)`` over the classes that have a
prototype; classes without one get probability exactly 0 (the reference gives them distance +∞). The
head is trained (CE term) but unused at test once prototypes exist. **Before any global prototype
exists** (the evaluation before round 1, or a federation in which no class has data yet) the site
deploys its own model, ``softmax(h_i(φ_i(x)))``: the reference reports accuracy 0 there, which makes
the round-0 row meaningless.

Defaults: ``lam`` λ = 10, HtFLlib's ``total.sh`` (PFLlib's default is 1.0; λ weights the element-mean
MSE, not the paper's Euclidean distance, HtFLlib issue #2). ``weighting = "sites"``, the reference code.

Uploads (per site, per round), fixed shapes whatever classes the site has:
    ``proto_sum``    (K, d) float32: ``"sites"``: per-class mean feature of the site (zero rows for
    classes it did not see); ``"samples"``: per-class feature sums. Reveals the site's class-mean
    representations (a domain fingerprint; feature-inversion risk) and, through zero rows, which
    classes it has; encrypted under ``ckks``.
    ``proto_count``  (K,) float32: ``"sites"``: 1 for each class the site saw, else 0 (reveals its
    label set); ``"samples"``: per-class sample counts over the round's local epochs (reveals its label
    histogram and dataset size). Encrypted under ``ckks``.
No parameter, and no list of class ids, ever leaves the site.

Privacy modes: all (the server only adds). Under ``dp`` and ``ckks+dp`` (**record-level**: neighbouring
datasets of a site differ by adding or removing one training image, :mod:`medsilo.secure.dp`) a round
is two mechanisms, both charged to the site's budget before it trains (:meth:`Client.dp_events`):

1. **DP-SGD training** of the whole model (φ_i and h_i; :meth:`~.base.Client.fit_private`,
   :func:`medsilo.components.training.private_epochs`): T = E·⌈N/B⌉ steps, each on a Poisson-sampled
   batch (rate q = B/N), the gradient of every record's own loss ``CE + λ·MSE(clip_C(φ_i(x)), P^y)``
   clipped to joint norm G (``grad_clip``), summed, noised with std σ_sgd·G. One record changes the sum
   by at most G: ``GaussianEvent(σ_sgd, steps=T, sampling_rate=q)``. BatchNorm runs in eval mode on
   its initial statistics (affine only; nothing estimated from the data is used or kept), dropout is off,
   and the global prototypes P are public (post-processing of earlier charged releases). Without batch
   normalisation the zoo backbones learn far less: BENCHMARKS.md measures what this costs.
2. **The release**: an eval-mode pass of the trained φ_i over the training images (each image once,
   no augmentation) gives one feature vector per image; each is clipped to norm C, and the per-class
   sums and counts get Gaussian noise (:func:`medsilo.secure.dp.gaussian_sum`), i.e. the
   ``"samples"`` weighting whatever ``weighting`` says (a per-site mean would need an unnoised count).
   For every *fixed* φ_i, one record moves ``[S, C·n]`` by at most √2·C: ``GaussianEvent(σ)``.

Why the pair is DP: φ_i depends on every record through training, so the √2·C bound of step 2 does
not hold for the release alone (removing one record changes φ_i and every row). It holds for every fixed
φ_i, and φ_i is the output of step 1, a DP mechanism on the same data whose output is never released;
by adaptive composition (which RDP accounting supports) the pair (φ_i, release) costs the composition
of both events, and the upload, a function of the pair, costs no more. Across rounds the same argument
chains: a round starts from the previous round's φ_i (output of charged mechanisms) and the server's
payload (post-processing of charged releases). Not covered: a patient with several images (only through
group privacy, :mod:`medsilo.secure.dp`); N itself, which sets q and is treated as public; anything the
site sends besides the upload (e.g. the round's metrics). The prototypes collected during training are
not used under DP: they hold each image once per local epoch from a moving model.

Reference-code behaviour (HtFLlib ``clientproto.py``/``serverproto.py``) and what we do:

* Missing classes are signalled by empty-list sentinels and prototypes travel as a class-id → vector
  dict of variable size; here every upload is a fixed-shape sum with zero rows and counts, so it can
  be summed under CKKS and noised under DP.
* Unweighted server mean: kept as the default, made expressible as a sum (``weighting``).
* Accuracy 0 before the first prototypes: the site's own head instead (see above).
* AUROC reported as 0 (prototype methods return no scores): here ``softmax(−D)`` probabilities.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
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
from medsilo.config.job import DPSpec
from medsilo.medical.data import ImageSet
from medsilo.secure.dp import DPRelease, GaussianEvent, gaussian_sum

PROTO_SUM = "proto_sum"
"""Upload name of the per-class feature sums / means ``(K, d)``."""

PROTO_COUNT = "proto_count"
"""Upload name of the per-class counts / presence indicators ``(K,)``."""


Weighting = Literal["sites", "samples"]


FAMILY = "htfl"
"""Heterogeneous FL: sites share only d- or K-sized tensors, so each may run its own backbone."""
MIXED_BACKBONES = True
"""Whether a job may give its sites different backbones."""
MULTILABEL = False
"""Whether a job may be multi-label (``task: multilabel``): no, prototypes are per-class feature means: an image has one class."""
RECIPE = COSINE_RECIPE
"""The training recipe chosen on validation data (:data:`.base.COSINE_RECIPE`; ``benchmarks/recipe.py``, BENCHMARKS.md)."""


class Config(AlgorithmConfig):
    """FedProto hyper-parameters.

    Attributes:
        lam: λ ≥ 0, weight of the prototype MSE term (default 10, HtFLlib).
        weighting: how sites are combined into a global prototype: ``"sites"`` (unweighted mean over
            the sites having the class, the reference; default) or ``"samples"`` (sample-weighted).
        normalize: scale every feature to norm √d (:func:`rms_normalize`) before it is averaged into a
            prototype, compared with one or scored (default off, the reference). Backbones whose features
            differ in scale then meet on one sphere: without it the site with the largest features sets
            the global prototypes and pulls the others' features to its scale.
    """

    lam: float = Field(default=10.0, ge=0)
    weighting: Weighting = "sites"
    normalize: bool = False


class Client(BaseClient):
    """FedProto at one site: a personal model of any backbone, global prototypes as the classifier.

    Attributes:
        global_protos: ``(K, d)`` float32, the global prototypes last received (zero rows where absent),
            or ``None`` before the first payload.
        has_proto: ``(K,)`` bool, which classes have a global prototype (all False before round 1).
        clip: under DP, the clipping bound C: the prototypes are then means of features clipped to norm C,
            so the prototype loss and nearest-prototype scoring compare them with clipped features too
            (unclipped features far outside the ball would all be nearest to whichever prototype has the
            largest norm). ``None`` otherwise.
    """

    config: Config
    dp_form = "class_sums"

    def __init__(self, setup: SiteSetup, config: Config):
        super().__init__(setup, config)
        self.global_protos: torch.Tensor | None = None
        self.has_proto = torch.zeros(setup.num_classes, dtype=torch.bool)
        self.clip: float | None = None

    def receive(self, payload: Tensors | None, rnd: int) -> None:
        """Finish the global prototypes from the aggregate: ``Σ proto_sum / Σ proto_count`` per class.

        ``None`` (before round 1, or a round with nothing new) keeps the current prototypes.
        """
        if payload:
            self.global_protos, self.has_proto = mean_prototypes(payload[PROTO_SUM], payload[PROTO_COUNT])

    def train(self, rnd: int) -> Upload:
        """Train φ_i and h_i on ``CE + λ·MSE(z, P^y)``, collecting this round's local prototypes.

        Returns:
            ``proto_sum`` ((K, d) float32) and ``proto_count`` ((K,) float32) as set by ``weighting``
            (module docstring), and the mean cross-entropy.
        """
        k, d = self.setup.num_classes, self.model.head.in_features
        sums, counts = torch.zeros(k, d), torch.zeros(k)
        prototype_loss = self.prototype_loss()

        def extra(features: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            batch_sums, batch_counts = class_sums(self.normalized(features.detach()), labels, k)
            sums.add_(batch_sums)
            counts.add_(batch_counts)
            return prototype_loss(features, logits, labels)

        loss = self.fit(rnd, extra_loss=extra)
        return Upload(prototype_upload(sums, counts, self.config.weighting), loss)

    def train_private(self, rnd: int, dp: DPRelease) -> Upload:
        """Train with DP-SGD on ``CE + λ·MSE(clip_C(z), P^y)``, then release DP per-class feature sums.

        Exactly the two mechanisms of :meth:`dp_events` (module docstring, "Privacy modes"): DP-SGD over
        :meth:`~.base.Client.dp_schedule`'s T steps at rate q with ``dp.sgd()``'s (G, σ_sgd), then
        :func:`~medsilo.secure.dp.gaussian_sum` of the clipped eval-mode features of every training image
        (once each) with (C, σ) = (``dp.clip``, ``dp.noise_multiplier``). Noise and Poisson batches come
        from ``dp.generator``. BatchNorm running statistics are not touched.

        Privacy effect: leaves the site as ``proto_sum`` (K, d) float32, noised sums of clipped features
        (noise std √2·σ·C), and ``proto_count`` (K,) float32, noised counts (std √2·σ), for all K classes;
        record-level, costing :meth:`dp_events` (the site charges and ledgers them before this runs).

        Returns:
            the upload and the mean cross-entropy of the DP-SGD steps (a non-private statistic).

        Raises:
            medsilo.secure.dp.DPError: ``dp`` carries no DP-SGD settings, or a non-finite input (nothing is
                trained or released).
        """
        dp.sgd()  # fail closed before anything changes
        self.clip = dp.clip
        loss = self.fit_private(rnd, dp, extra_loss=self.prototype_loss())
        features, labels = self.train_features()
        sums, counts = gaussian_sum(features, labels, self.setup.num_classes, dp.clip, dp.noise_multiplier,
                                    dp.generator)  # fmt: skip
        return Upload({PROTO_SUM: sums, PROTO_COUNT: counts}, loss)

    def dp_events(self, dp: DPSpec) -> list[GaussianEvent]:
        """One private round's cost: DP-SGD training, then the class-sum release.

        Returns:
            ``[GaussianEvent(σ_sgd, steps=T, sampling_rate=q), GaussianEvent(σ)]`` with (T, q) from
            :meth:`~.base.Client.dp_schedule` (this site's N, batch size and local epochs), σ_sgd =
            ``dp.sgd_noise_multiplier`` and σ = ``dp.noise_multiplier``.
        """
        steps, rate = self.dp_schedule()
        return [
            GaussianEvent(noise_multiplier=dp.sgd_noise_multiplier, steps=steps, sampling_rate=rate),
            GaussianEvent(noise_multiplier=dp.noise_multiplier),
        ]

    @torch.no_grad()
    def train_features(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``φ_i(x)`` ``(N, d)`` (:meth:`normalized`) and labels ``(N,)`` of every training image, once each:
        eval mode, no gradient, without the training split's augmentation."""
        self.model.eval()
        train = self.setup.data.train
        loader = torch.utils.data.DataLoader(ImageSet(train.images, train.labels), batch_size=self.setup.batch_size,
                                             shuffle=False)  # fmt: skip
        batches = [(self.normalized(self.model.features(x)), y) for x, y in loader]
        return torch.cat([f for f, _ in batches]), torch.cat([y for _, y in batches])

    @torch.no_grad()
    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Nearest-prototype probabilities ``(B, K)`` for images ``(B, C, H, W)``, in eval mode.

        ``softmax(−MSE(φ_i(x), P^k))`` over the classes with a prototype (0 for the others); the site's
        own ``softmax(h_i(φ_i(x)))`` while no class has one.
        """
        self.model.eval()
        z = self.model.features(x)
        if self.global_protos is None or not bool(self.has_proto.any()):
            return torch.softmax(self.model.head(z), dim=1)
        return nearest_prototype_scores(self.prototype_space(z), self.global_protos, self.has_proto)

    def normalized(self, features: torch.Tensor) -> torch.Tensor:
        """Features ``(B, d)`` at norm √d when ``Config.normalize`` is set (:func:`rms_normalize`), else unchanged."""
        return rms_normalize(features) if self.config.normalize else features

    def prototype_space(self, features: torch.Tensor) -> torch.Tensor:
        """Features ``(B, d)`` as compared with prototypes: :meth:`normalized`, then clipped to norm :attr:`clip`
        under DP (:func:`clip_features`, differentiable)."""
        features = self.normalized(features)
        return features if self.clip is None else clip_features(features, self.clip)

    def prototype_loss(self) -> ExtraLoss:
        """``λ·MSE(z, P^y)`` against the current global prototypes, as an ``extra_loss`` (0 before any)."""
        protos, present, lam, space = self.global_protos, self.has_proto, self.config.lam, self.prototype_space

        def extra(features: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            if protos is None or lam == 0 or not bool(present.any()):
                return torch.zeros(())
            return lam * prototype_mse(space(features), labels, protos, present)

        return extra


class Server(BaseServer):
    """Linear: the payload is the aggregate ``Σ proto_sum``, ``Σ proto_count``; sites divide."""


# ---- pure helpers (shared with FedTGP) ------------------------------------------------------------


def class_sums(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class feature sums and counts of one batch.

    Args:
        features: ``(B, d)`` (use detached features; no gradient is kept).
        labels: ``(B,)`` int64 in ``[0, K)``.
        num_classes: K.

    Returns:
        sums ``(K, d)`` float32 (zero rows for absent classes) and counts ``(K,)`` float32.
    """
    features = features.detach().float()
    sums = torch.zeros(num_classes, features.shape[1]).index_add_(0, labels, features)
    counts = torch.bincount(labels, minlength=num_classes).float()
    return sums, counts


def clip_features(features: torch.Tensor, clip: float) -> torch.Tensor:
    """Row-wise L2 clipping ``z · min(1, C/‖z‖)`` as a differentiable tensor expression.

    What the prototype loss and nearest-prototype scoring compare under DP (the release itself clips
    with :func:`medsilo.secure.dp.clip_rows`, which adds a float-rounding guard and input checks but
    detaches). Gradients flow into ``features``; no data-dependent Python control flow, so it runs
    per record inside ``vmap``.

    Args:
        features: ``(B, d)``.
        clip: C > 0.

    Returns:
        ``(B, d)``; rows within norm C unchanged.
    """
    norms = features.pow(2).sum(1, keepdim=True).clamp_min(torch.finfo(features.dtype).tiny).sqrt()
    return features * (clip / norms).clamp(max=1.0)


def rms_normalize(features: torch.Tensor) -> torch.Tensor:
    """Rows scaled to norm √d, i.e. root-mean-square 1 per element (differentiable; a zero row stays 0).

    Scale-free like a unit normalisation, but the element-mean MSE between two such rows stays in [0, 4]
    as for features of unit scale, so λ keeps its meaning.
    """
    return F.normalize(features, dim=1) * features.shape[1] ** 0.5


def prototype_upload(sums: torch.Tensor, counts: torch.Tensor, weighting: Weighting) -> Tensors:
    """The prototype upload of one site from its per-class feature sums.

    Args:
        sums: ``(K, d)`` per-class feature sums.
        counts: ``(K,)`` per-class sample counts.
        weighting: ``"sites"``: per-class means and 0/1 presence; ``"samples"``: sums and counts.

    Returns:
        ``{"proto_sum": (K, d) float32, "proto_count": (K,) float32}``.
    """
    sums, counts = sums.float(), counts.float()
    if weighting == "samples":
        return {PROTO_SUM: sums.clone(), PROTO_COUNT: counts.clone()}
    means, present = class_means(sums, counts)
    return {PROTO_SUM: means, PROTO_COUNT: present.float()}


def mean_prototypes(proto_sum: torch.Tensor, proto_count: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Prototypes from (summed) prototype sums and counts.

    Args:
        proto_sum: ``(K, d)``.
        proto_count: ``(K,)``.

    Returns:
        prototypes ``(K, d)`` float32 (``proto_sum[k] / proto_count[k]``; zero rows for absent classes,
        :func:`~medsilo.components.algorithms.base.class_means`) and the presence mask ``(K,)`` bool.
    """
    return class_means(proto_sum, proto_count)


def prototype_mse(
    features: torch.Tensor, labels: torch.Tensor, protos: torch.Tensor, present: torch.Tensor
) -> torch.Tensor:
    """``MSE(z, P^y)``, element mean over the batch and d; samples of classes without a prototype add 0.

    Args:
        features: ``z`` ``(B, d)`` (gradients flow into it).
        labels: ``(B,)`` int64.
        protos: ``(K, d)`` global prototypes (constants).
        present: ``(K,)`` bool, which rows of ``protos`` exist.

    Returns:
        a scalar: ``Σ_{b: y_b has a prototype} ‖z_b − P^{y_b}‖² / (B·d)``.
    """
    has = present[labels][:, None]
    target = torch.where(has, protos.detach()[labels], features.detach())
    return F.mse_loss(features, target)


def prototype_distances(features: torch.Tensor, protos: torch.Tensor) -> torch.Tensor:
    """``D[b, k] = MSE(z_b, P^k)`` (mean over d of the squared differences), computed directly (≥ 0).

    Args:
        features: ``(B, d)``.
        protos: ``(K, d)``.

    Returns:
        ``(B, K)``.
    """
    return (features[:, None, :] - protos[None, :, :]).pow(2).mean(dim=2)


def nearest_prototype_scores(
    features: torch.Tensor, protos: torch.Tensor, present: torch.Tensor
) -> torch.Tensor:
    """Nearest-prototype class probabilities ``softmax(−D)``, exactly 0 for classes without a prototype.

    Args:
        features: ``(B, d)``.
        protos: ``(K, d)``.
        present: ``(K,)`` bool, at least one True.

    Returns:
        ``(B, K)`` probabilities (rows sum to 1; the argmax is the nearest present prototype).
    """
    logits = -prototype_distances(features, protos).masked_fill(~present[None, :], float("inf"))
    return torch.softmax(logits, dim=1)
