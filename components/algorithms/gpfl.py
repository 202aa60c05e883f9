"""GPFL: global and personalized feature learning (Zhang et al., ICCV 2023,
`arXiv:2308.10279 <https://arxiv.org/abs/2308.10279>`_).

Each site splits the features ``z = φ(x) ∈ R^d`` of its shared extractor into two views with a
shared *conditional valve* ``CoV(z, c) = ReLU(z ⊙ (γ(c) + 1) + β(c))`` (``γ``, ``β``: each
``Linear(d, d) + ReLU + LayerNorm(d)``):

* the **personalized** view ``f_P = CoV(z, p_i)`` feeds the site's own head ``h_i`` (never shared);
* the **generic** view ``f_G = CoV(z, g)`` is pulled towards a shared *global category embedding*
  table ``E ∈ R^{K×d}`` (GCE).

The conditional inputs come from the table: ``g = (1/K) Σ_k E_k`` and ``p_i = Σ_k π_i(k) E_k``, with
``π_i`` the site's training label prior. Local objective per batch::

    L = CE(h_i(f_P), y) + CE(cos(f_G, E), y) + λ ‖f_G − Ē[y]‖_F

where ``cos(f_G, E)_{bk} = <f_G,b / ‖f_G,b‖, E_k / ‖E_k‖>`` (``(B, K)``), ``Ē`` is a frozen copy of the
table received this round and ``‖·‖_F`` is the Frobenius norm over the whole batch (not squared, not
averaged, as in the reference). ``E`` and the CoV get an extra weight decay ``μ`` (their own parameter
group); ``φ`` and ``h_i`` use the job's optimiser settings unchanged.

Deployed model at a site: ``softmax(h_i(CoV(φ(x), p_i)))``.

Defaults: ``lam`` (λ) = 0.01 and ``mu`` (μ) = 0.1, the GPFL repository's tuned values for the 4-layer
CNN (our ``cnn`` backbone is of that size). PFLlib's ``main.py`` defaults (λ = 1, μ = 0) are not tuned
values; for ResNet-18 backbones the GPFL repository uses λ = 1e-4, μ = 0 (set them in the job spec).

Uploads (per site, per round), all sums the server adds:
    ``base.<param>``  parameter shapes of ``φ``, float32: ``φ_i · n_i``. Reveals the locally trained
    extractor (model-inversion risk); encrypted under ``ckks``.
    ``gce.weight``    (K, d) float32: ``E_i · n_i``. Class embeddings trained on local labels; reveals
    which classes the site saw (rows of absent classes move only by weight decay); encrypted under
    ``ckks``.
    ``cov.<param>``   CoV parameter shapes, float32: ``θ_CoV,i · n_i`` (2d² + 6d values).
    ``n``             () float32: training images. Reveals dataset size; encrypted under ``ckks``.
The personal head ``h_i``, the prior ``π_i`` and the conditional inputs never leave the site.

Privacy modes: all (the server only adds; each site finishes the weighted means itself).

Reference-code behaviour (PFLlib ``clientgpfl.py``/``servergpfl.py``) and what we do:

* The label prior is counted over a ``drop_last`` loader, so the last partial batch is skipped; we
  count every training label.
* The conditional inputs start as zero vectors until the first table arrives, which makes
  ``f_P = f_G`` in round 1; we compute them from the shared initial table instead.
* Kept as in the reference: conditional inputs are recomputed when a new table arrives, from the
  site's *own* (locally trained) table just before it is overwritten, so they lag one round.
* Kept as in the reference, a known weakness: the cosine logits are unscaled, in ``[−1, 1]``, so the
  GCE cross-entropy can never fall below ``log(1 + (K − 1) e^{−2})`` (0.13 nats for K = 2) and its
  gradients stay weak even for well-separated features.
* The CoV and the table are initialised identically at every site from a job-level seed (derived from
  the job's initial model weights), never from the site seed.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F

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
    shared_init,
    weighted_params,
)

FAMILY = "pfl"
"""Personalized FL: every site runs the same backbone and shares (part of) its weights."""
MIXED_BACKBONES = False
"""Whether a job may give its sites different backbones."""
MULTILABEL = False
"""Whether a job may be multi-label (``task: multilabel``): no, its conditional embeddings and GCE are per class (a class index per image)."""
RECIPE = COSINE_RECIPE
"""The training recipe chosen on validation data (:data:`.base.COSINE_RECIPE`; ``benchmarks/recipe.py``, BENCHMARKS.md)."""


class Config(AlgorithmConfig):
    """GPFL hyper-parameters.

    Attributes:
        lam: λ ≥ 0, weight of the embedding-distance term ``‖f_G − Ē[y]‖_F`` (default 0.01).
        mu: μ ≥ 0, weight decay of the GCE table and the CoV (default 0.1).
    """

    lam: float = Field(default=0.01, ge=0)
    mu: float = Field(default=0.1, ge=0)


class Client(BaseClient):
    """GPFL at one site: shared ``φ``, CoV and GCE; personal head and conditional inputs.

    Attributes:
        cov: the conditional valve (shared).
        gce: the class-embedding table ``E``, an ``nn.Embedding(K, d)`` (shared).
        frozen_gce: ``Ē`` (K, d), the table as last received (the initial table before round 2).
        prior: ``π_i`` (K,), the fraction of training images per class.
        generic: ``g`` (d,), generic conditional input.
        personal: ``p_i`` (d,), personalized conditional input.
    """

    config: Config

    def __init__(self, setup: SiteSetup, config: Config):
        super().__init__(setup, config)
        d, k = self.model.head.in_features, setup.num_classes
        with shared_init(self.model):
            self.cov = ConditionalValve(d)
            self.gce = nn.Embedding(k, d)
        self.frozen_gce = self.gce.weight.detach().clone()
        self.prior = label_prior(setup.data.train.class_counts(k))
        self.generic, self.personal = conditional_inputs(self.frozen_gce, self.prior)

    def receive(self, payload: Tensors | None, rnd: int) -> None:
        """Load the means of ``φ``, GCE and CoV; the head stays personal.

        The conditional inputs are recomputed from the site's own table *before* it is overwritten
        (as the reference). Before round 1 (``payload`` is ``None``) the shared initialisation is kept.
        """
        if not payload:
            return
        load_mean(self.model.base, payload, "base.")
        self.generic, self.personal = conditional_inputs(self.gce.weight.detach(), self.prior)
        load_mean(self.gce, payload, "gce.")
        self.frozen_gce = self.gce.weight.detach().clone()
        load_mean(self.cov, payload, "cov.")

    def train(self, rnd: int) -> Upload:
        """Train ``φ``, ``h_i``, CoV and GCE on the GPFL objective; upload the shared parts × n.

        Uploads ``base.*`` (φ · n), ``gce.weight`` ((K, d) E · n), ``cov.*`` (CoV · n), all float32, and
        ``n`` (() float32). See the module docstring for what each reveals.
        """
        container = nn.ModuleDict({"model": self.model, "cov": self.cov, "gce": self.gce})
        loss = self.fit(rnd, model=container, params=self.parameter_groups(), forward=self.forward)
        n = self.setup.n_train
        sums = {
            **weighted_params(self.model.base, n, "base."),
            **weighted_params(self.gce, n, "gce."),
            **weighted_params(self.cov, n, "cov."),
            **count(n),
        }
        return Upload(sums, loss)

    @torch.no_grad()
    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """``softmax(h_i(CoV(φ(x), p_i)))`` ``(B, K)`` for images ``(B, C, H, W)``, in eval mode."""
        self.model.eval()
        self.cov.eval()
        return torch.softmax(self.model.head(self.cov(self.model.features(x), self.personal)), dim=1)

    def parameter_groups(self) -> list[dict]:
        """Optimiser groups: ``φ`` and ``h_i`` with the job's settings; GCE and CoV with weight decay μ."""
        return [
            {"params": list(self.model.parameters())},
            {"params": [*self.gce.parameters(), *self.cov.parameters()], "weight_decay": self.config.mu},
        ]

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The training path for the shared loop: personal logits and the GCE terms for one batch.

        Args:
            x: images ``(B, C, H, W)``.
            y: labels ``(B,)``.

        Returns:
            logits ``h_i(f_P)`` ``(B, K)`` and the scalar ``L_GCE(f_G, y) + λ‖f_G − Ē[y]‖_F``.
        """
        z = self.model.features(x)
        f_generic = self.cov(z, self.generic)
        logits = self.model.head(self.cov(z, self.personal))
        extra = cosine_embedding_loss(f_generic, self.gce.weight, y)
        extra = extra + self.config.lam * embedding_distance(f_generic, self.frozen_gce, y)
        return logits, extra


class Server(BaseServer):
    """Linear: the payload is the aggregate Σ φ_i n_i, Σ E_i n_i, Σ θ_CoV,i n_i, Σ n_i."""


# ---- modules and pure helpers ---------------------------------------------------------------------


class ConditionalValve(nn.Module):
    """Conditional valve ``CoV(z, c) = ReLU(z ⊙ (γ(c) + 1) + β(c))``.

    ``γ`` and ``β`` are each ``Linear(d, d) + ReLU + LayerNorm(d)``.

    Args:
        dim: ``d``, the feature dimension.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.LayerNorm(dim))
        self.beta = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.LayerNorm(dim))

    def forward(self, z: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """Modulate features by a condition.

        Args:
            z: features ``(B, d)``.
            condition: conditional input ``(d,)`` (broadcast over the batch) or ``(B, d)``.

        Returns:
            modulated features ``(B, d)``, non-negative.
        """
        return F.relu(z * (self.gamma(condition) + 1) + self.beta(condition))


def label_prior(counts: torch.Tensor) -> torch.Tensor:
    """``π(k)``: per-class image counts ``(K,)`` as fractions ``(K,)`` float32 (zeros if there are none)."""
    counts = counts.float()
    return counts / counts.sum().clamp_min(1.0)


def conditional_inputs(table: torch.Tensor, prior: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Generic and personalized conditional inputs from a class-embedding table.

    Args:
        table: ``E`` ``(K, d)``.
        prior: ``π_i`` ``(K,)``, summing to 1.

    Returns:
        ``g = mean_k E_k`` ``(d,)`` and ``p_i = Σ_k π_i(k) E_k`` ``(d,)``, detached.
    """
    table = table.detach()
    return table.mean(dim=0), prior.to(table.dtype) @ table


def cosine_embedding_loss(features: torch.Tensor, table: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the unscaled cosine similarities between features and class embeddings.

    Args:
        features: ``f_G`` ``(B, d)``.
        table: ``E`` ``(K, d)`` (trainable: gradients reach the table).
        labels: ``(B,)`` int64.

    Returns:
        the mean over the batch of ``−log softmax_k(cos(f_G,b, E_k))[y_b]``, a scalar.
    """
    cosine = F.normalize(features, dim=1) @ F.normalize(table, dim=1).T
    return F.cross_entropy(cosine, labels)


def embedding_distance(features: torch.Tensor, table: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``‖f_G − Ē[y]‖_F``: Frobenius norm over the whole batch (not squared, not averaged).

    Args:
        features: ``f_G`` ``(B, d)``.
        table: ``Ē`` ``(K, d)``, treated as a constant.
        labels: ``(B,)`` int64.

    Returns:
        a scalar.
    """
    return torch.linalg.vector_norm(features - table.detach()[labels])
