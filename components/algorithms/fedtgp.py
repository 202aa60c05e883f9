r"""FedTGP: trainable global prototypes with adaptive-margin-enhanced contrastive learning (Zhang et al.,
AAAI 2024, `arXiv:2401.03230 <https://arxiv.org/abs/2401.03230>`_).

Sites run any backbones with a shared feature dimension d, as in FedProto (:mod:`.fedproto`), and
train with the same loss (``shared/reference/algorithms.md`` §4.2):

.. math::

    \mathcal{L}_i = \mathrm{CE}\big(h_i(\varphi_i(x)), y\big)
                    + \lambda \cdot \mathrm{MSE}\big(\varphi_i(x), \hat P^{y}\big)

with :math:`\hat P^k` the server's *trainable global prototypes* (TGPs). After local training a site
computes its prototypes by an eval-mode pass over its training images (no gradient) and uploads them
as fixed-shape sums (``weighting`` as in FedProto).

**Server.** A TGP network ``Embedding(K, d) → Linear(d, d_h) + ReLU → Linear(d_h, d)`` (kept across
rounds, initialised from ``server_seed``) maps class k to :math:`\hat P^k`. Each round, from training
pairs ``(P, k)`` (below):

1. class centres :math:`Q^k` = unweighted mean of the pairs of class k; for every class with a
   centre, its gap = the Euclidean distance to the nearest other centre (a class with no neighbour
   gets the global minimum gap); **margin** δ = min(max gap, τ);
2. ``server_epochs`` epochs of SGD (lr ``server_lr``, shuffled batches of ``server_batch_size``
   pairs) on :math:`\mathrm{CE}(-D, k)`, where :math:`D_{b,c} = \lVert P_b - \hat P^c \rVert` for all K
   TGPs, plus δ on the true class: pairs are pulled to their class's TGP and pushed from the others
   by at least the margin;
3. the payload is :math:`\hat P^c` for **all** K classes (a class no site has gets a TGP too; it is
   only ever pushed away as a negative).

``form`` chooses the training pairs:

* ``"published"`` (default, the paper): one pair per (site, class) the site has, its own prototype
  ``proto_sum_i[k] / proto_count_i[k]``. The server reads every site's upload separately
  (:attr:`Server.form` ``"per-site"``), so it runs in privacy mode ``none`` only.
* ``"aggregate"``: only the summed upload is read; one pair per class any site has, the class mean
  ``Σ_i proto_sum_i[k] / Σ_i proto_count_i[k]`` (with ``weighting="sites"`` this is exactly the
  reference's centre :math:`Q^k`). The server learns from the plaintext aggregate
  (``needs_plaintext_aggregate``): under ``ckks`` it needs an aggregate release (DESIGN §5); under
  ``dp`` it is post-processing of the noised sums.

**Privacy modes** ``dp`` and ``ckks+dp`` (aggregate form only; record-level): the client is FedProto's
(:meth:`.fedproto.Client.train_private`, :meth:`.fedproto.Client.dp_events`): DP-SGD training towards the
TGPs (``GaussianEvent(σ_sgd, T, q)``), then Gaussian-noised per-class sums of the DP-trained model's
clipped eval-mode features (``GaussianEvent(σ)``, sensitivity √2·C for that fixed model), both charged
per round; the argument (adaptive composition) and what it does not cover are in :mod:`.fedproto`. The
TGPs a site trains towards are computed by the server from noised sums only, so they are
post-processing and public to the site's mechanisms.

**Inference**: nearest global prototype (MSE distance), probabilities ``softmax(−D)``, exactly as
FedProto (FedTGP issue #6: intended); before the first TGPs arrive the site's own head.

Defaults: ``lam`` λ = 10 (HtFLlib ``total.sh``; the paper's λ = 0.1 weights a Euclidean distance, not
the element-mean MSE); ``tau`` τ = 100 (``margin_threthold``); ``server_epochs`` = 100; ``server_lr`` =
0.01 and ``server_batch_size`` = 10 (the reference reuses its local lr and batch size, whose defaults
these are); ``hidden_dim`` d_h = d (reference 512 = d); ``weighting = "sites"`` (the reference centres
are unweighted means over sites); ``form = "published"``.

Uploads (per site, per round), fixed shapes whatever classes the site has:
    ``proto_sum``    (K, d) float32: per-class mean (``"sites"``) or sum (``"samples"``) of the site's
    eval-mode training features, zero rows for classes it does not have. Reveals the site's
    class-mean representations (domain fingerprint; feature-inversion risk) and its label set. In
    ``published`` form the server reads it per site, in plaintext.
    ``proto_count``  (K,) float32: 0/1 presence (``"sites"``) or per-class image counts
    (``"samples"``). Reveals the label set or label histogram.
Payload down: ``global_protos`` (K, d) float32, the TGPs.

Reference-code bugs fixed (HtFLlib/FedTGP ``clienttgp.py``/``servertgp.py``):

* **NaN distances**: the reference takes ``sqrt`` of the expanded squared distance
  ``‖a‖² + ‖b‖² − 2a·b``, which rounds to ≤ 0 when a prototype meets its TGP (NaN forward or
  gradient). Here it is clamped at 0 and ε = 1e-8 is added before the square root.
* **Margin sentinel**: with fewer than two classes present the reference's "no neighbour" sentinel
  (1e9) survives and the margin silently becomes τ; here no gap can be measured and δ = 0.
* **Unseeded server**: the TGP initialisation and the batch order are drawn from ``server_seed``
  (per round), never from global state.
* Missing classes as empty-list sentinels and class-id dicts: here fixed-shape sums with zero rows.
* Accuracy 0 before the first TGPs: the site's own head instead.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from medsilo.components.algorithms.base import (
    PLAIN_RECIPE,
    AlgorithmConfig,
    Server as BaseServer,
    Tensors,
    Upload,
)
from medsilo.components.algorithms.fedproto import (
    PROTO_COUNT,
    PROTO_SUM,
    Client as PrototypeClient,
    Weighting,
    class_sums,
    mean_prototypes,
    prototype_upload,
)

GLOBAL_PROTOS = "global_protos"
"""Payload name of the TGPs ``(K, d)``."""

EPS = 1e-8
"""Added to the clamped squared distance before the square root (finite gradients at distance 0)."""


FAMILY = "htfl"
"""Heterogeneous FL: sites share only d- or K-sized tensors, so each may run its own backbone."""
MIXED_BACKBONES = True
"""Whether a job may give its sites different backbones."""
MULTILABEL = False
"""Whether a job may be multi-label (``task: multilabel``): no, prototypes are per-class feature means: an image has one class."""
RECIPE = PLAIN_RECIPE
"""The training recipe chosen on validation data: the job defaults (:data:`.base.PLAIN_RECIPE`; ``benchmarks/recipe.py``,
BENCHMARKS.md), ahead of the cosine recipe within noise."""


class Config(AlgorithmConfig):
    """FedTGP hyper-parameters.

    Attributes:
        lam: λ ≥ 0, weight of the MSE term towards the TGPs (default 10, HtFLlib).
        weighting: what a site's ``proto_sum``/``proto_count`` hold, as in FedProto (default ``"sites"``).
        normalize: features at norm √d before they meet prototypes, as in FedProto (default off).
        form: ``"published"`` (the server trains on every site's prototypes; privacy mode ``none``) or
            ``"aggregate"`` (only on the summed per-class means).
        tau: τ ≥ 0, cap of the adaptive margin (default 100).
        server_epochs: epochs of TGP training per round (default 100).
        server_lr: SGD learning rate of the TGP network (default 0.01).
        server_batch_size: training pairs per server batch (default 10).
        hidden_dim: d_h, hidden width of the TGP network (default ``None`` = d).
        server_seed: seed of the TGP initialisation and the server's batch order (default 0).
    """

    lam: float = Field(default=10.0, ge=0)
    weighting: Weighting = "sites"
    normalize: bool = False
    form: Literal["published", "aggregate"] = "published"
    tau: float = Field(default=100.0, ge=0)
    server_epochs: int = Field(default=100, ge=1)
    server_lr: float = Field(default=0.01, gt=0)
    server_batch_size: int = Field(default=10, ge=1)
    hidden_dim: int | None = Field(default=None, ge=1)
    server_seed: int = Field(default=0, ge=0)


class Client(PrototypeClient):
    """FedTGP at one site: FedProto's loss and classifier, prototypes from an eval pass after training."""

    config: Config

    def receive(self, payload: Tensors | None, rnd: int) -> None:
        """Take the K TGPs as the global prototypes (every class has one); ``None`` keeps the current."""
        if payload:
            self.global_protos = payload[GLOBAL_PROTOS].float()
            self.has_proto = torch.ones(self.setup.num_classes, dtype=torch.bool)

    def train(self, rnd: int) -> Upload:
        """Train φ_i and h_i on ``CE + λ·MSE(z, P̂^y)``, then upload prototypes from an eval-mode pass.

        Returns:
            ``proto_sum`` ((K, d) float32) and ``proto_count`` ((K,) float32) as set by ``weighting``
            (module docstring), and the mean cross-entropy.
        """
        loss = self.fit(rnd, extra_loss=self.prototype_loss())
        sums, counts = self.feature_sums()
        return Upload(prototype_upload(sums, counts, self.config.weighting), loss)

    @torch.no_grad()
    def feature_sums(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-class sums ``(K, d)`` and counts ``(K,)`` of ``φ_i(x)`` over every training image.

        Eval mode, no gradient, and without the training split's augmentation (as the reference's
        ``collect_protos``); see :meth:`~.fedproto.Client.train_features`.
        """
        return class_sums(*self.train_features(), self.setup.num_classes)


class Server(BaseServer):
    """Trains the TGP network on the sites' prototypes; the payload is the K TGPs.

    Attributes:
        tgp: the :class:`TrainablePrototypes` network (built at the first update, kept across rounds).
        margin: δ of the last update.
        losses: mean server loss of every epoch of the last update.
    """

    needs_plaintext_aggregate: ClassVar[bool] = True
    config: Config

    def __init__(self, config: Config, num_classes: int, sites: list[str]):
        super().__init__(config, num_classes, sites)
        self.tgp: TrainablePrototypes | None = None
        self.margin = 0.0
        self.losses: list[float] = []

    def rebuild_module(self, name: str, shapes: dict[str, tuple[int, ...]]) -> nn.Module:
        """Checkpoint hook: a fresh TGP network for a checkpoint holding one (built at the first update).

        Args:
            name: the attribute; only ``"tgp"`` is built lazily.
            shapes: parameter name → shape in the checkpoint (``embedding.weight`` is ``(K, d)``).

        Returns:
            the network :meth:`train_round` would build for that d; ``self`` is not changed.

        Raises:
            ValueError: another attribute, or no ``(K, d)`` embedding among the shapes.
        """
        embedding = shapes.get("embedding.weight", ())
        if name != "tgp" or len(embedding) != 2:
            raise ValueError(f"fedtgp: no lazily built module '{name}' with parameter shapes {shapes}")
        d = embedding[1]
        return build_tgp(self.num_classes, d, self.config.hidden_dim or d, self.config.server_seed)

    @classmethod
    def form_for(cls, config: Config) -> str:
        """``"per-site"`` for the published form, ``"sums"`` for the aggregate form."""
        return "per-site" if config.form == "published" else "sums"

    def update(self, aggregate: Tensors, rnd: int) -> Tensors:
        """Aggregate form: train on one pair per class, the class mean ``Σ proto_sum / Σ proto_count``.

        Raises:
            ValueError: the form is ``published`` (it needs each site's upload: ``update_from_sites``).
        """
        if self.config.form == "published":
            raise ValueError(
                "fedtgp: form 'published' trains on each site's prototypes; call update_from_sites"
            )
        protos, present = mean_prototypes(aggregate[PROTO_SUM], aggregate[PROTO_COUNT])
        return self.train_round(protos[present], torch.nonzero(present).flatten(), rnd)

    def update_from_sites(self, uploads: dict[str, Tensors], rnd: int) -> Tensors:
        """Published form: train on one pair per (site, class the site has), its own prototype.

        In the aggregate form the uploads are summed first (same as :meth:`update`).
        """
        if self.config.form == "aggregate":
            names = (PROTO_SUM, PROTO_COUNT)
            return self.update({n: sum(u[n] for u in uploads.values()) for n in names}, rnd)
        protos, labels = [], []
        for site in sorted(uploads):
            site_protos, present = mean_prototypes(uploads[site][PROTO_SUM], uploads[site][PROTO_COUNT])
            protos.append(site_protos[present])
            labels.append(torch.nonzero(present).flatten())
        return self.train_round(torch.cat(protos), torch.cat(labels), rnd)

    def train_round(self, protos: torch.Tensor, labels: torch.Tensor, rnd: int) -> Tensors:
        """Margin, TGP training and payload for one round.

        Args:
            protos: training prototypes ``(M, d)``.
            labels: their classes ``(M,)`` int64.
            rnd: the round (seeds the batch order).

        Returns:
            ``{"global_protos": (K, d) float32}``, or ``{}`` when there is no pair (sites keep theirs).
        """
        if len(labels) == 0:
            return {}
        c = self.config
        if self.tgp is None:
            d = protos.shape[1]
            self.tgp = build_tgp(self.num_classes, d, c.hidden_dim or d, c.server_seed)
        sums, counts = class_sums(protos, labels, self.num_classes)
        centres, present = mean_prototypes(sums, counts)
        self.margin = adaptive_margin(centres[present], c.tau)
        g = torch.Generator().manual_seed(c.server_seed * 100_003 + rnd)
        self.losses = train_tgp(self.tgp, protos, labels, self.margin, epochs=c.server_epochs, lr=c.server_lr,
                                batch_size=c.server_batch_size, generator=g)  # fmt: skip
        self.tgp.eval()
        with torch.no_grad():
            return {GLOBAL_PROTOS: self.tgp().float()}


# ---- the TGP network and pure helpers -------------------------------------------------------------


class TrainablePrototypes(nn.Module):
    """``Embedding(K, d) → Linear(d, d_h) + ReLU → Linear(d_h, d)``: one global prototype per class.

    Args:
        num_classes: K.
        dim: d.
        hidden: d_h.
    """

    def __init__(self, num_classes: int, dim: int, hidden: int):
        super().__init__()
        self.embedding = nn.Embedding(num_classes, dim)
        self.generator = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))

    def forward(self) -> torch.Tensor:
        """The TGPs of all K classes, ``(K, d)``."""
        return self.generator(self.embedding.weight)


def build_tgp(num_classes: int, dim: int, hidden: int, seed: int) -> TrainablePrototypes:
    """A :class:`TrainablePrototypes` whose weights depend only on ``seed`` (global RNG state untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        return TrainablePrototypes(num_classes, dim, hidden)


def euclidean_distances(a: torch.Tensor, b: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """``‖a_i − b_j‖`` by the expanded square, clamped at 0, plus ``eps`` before the square root.

    Args:
        a: ``(B, d)``.
        b: ``(K, d)``.
        eps: added under the root so the gradient stays finite where the distance is 0.

    Returns:
        ``(B, K)``, each ≥ √eps; finite values and gradients.
    """
    squared = a.pow(2).sum(1, keepdim=True) + b.pow(2).sum(1)[None, :] - 2 * a @ b.T
    return torch.sqrt(squared.clamp_min(0) + eps)


def adaptive_margin(centres: torch.Tensor, tau: float) -> float:
    """δ = min(max over classes of the distance to the nearest other centre, τ).

    Args:
        centres: ``(C, d)``, the centres of the classes that have pairs.
        tau: the cap τ.

    Returns:
        δ; 0 with fewer than two centres (no gap exists).
    """
    if len(centres) < 2:
        return 0.0
    dist = (centres[:, None, :] - centres[None, :, :]).norm(dim=2)
    dist.fill_diagonal_(float("inf"))
    return min(float(dist.min(dim=1).values.max()), float(tau))


def margin_loss(
    protos: torch.Tensor, labels: torch.Tensor, tgps: torch.Tensor, margin: float
) -> torch.Tensor:
    """``CE(−(D + δ·onehot(y)), y)``, with ``D = ‖P_b − P̂^c‖`` from :func:`euclidean_distances`.

    Args:
        protos: ``(B, d)`` training prototypes.
        labels: ``(B,)`` int64.
        tgps: ``(K, d)`` (gradients flow into them).
        margin: δ.

    Returns:
        the batch-mean loss, a scalar.
    """
    dist = euclidean_distances(protos, tgps) + margin * F.one_hot(labels, tgps.shape[0])
    return F.cross_entropy(-dist, labels)


def train_tgp(tgp: TrainablePrototypes, protos: torch.Tensor, labels: torch.Tensor, margin: float, *, epochs: int,
              lr: float, batch_size: int, generator: torch.Generator) -> list[float]:  # fmt: skip
    """Train ``tgp`` with plain SGD on :func:`margin_loss` over shuffled batches of (prototype, class) pairs.

    Args:
        tgp: the network (trained in place).
        protos: ``(M, d)`` training prototypes (constants).
        labels: ``(M,)`` int64.
        margin: δ.
        epochs: passes over the pairs.
        lr: SGD learning rate.
        batch_size: pairs per step (the last batch may be smaller).
        generator: draws the batch order.

    Returns:
        the mean loss of every epoch.
    """
    protos = protos.detach().float()
    opt = torch.optim.SGD(tgp.parameters(), lr=lr)
    tgp.train()
    losses = []
    for _ in range(epochs):
        total = 0.0
        for idx in torch.randperm(len(labels), generator=generator).split(batch_size):
            loss = margin_loss(protos[idx], labels[idx], tgp(), margin)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        losses.append(total / len(labels))
    return losses
