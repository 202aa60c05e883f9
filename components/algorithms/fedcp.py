"""FedCP: federated conditional policy (Zhang et al., KDD 2023,
`arXiv:2307.01217 <https://arxiv.org/abs/2307.01217>`_).

A shared *conditional policy network* (CPN) splits every feature vector ``z = φ_i(x) ∈ R^d`` into a
personalized part, read by the site's own head ``h_p``, and a global part, read by a frozen copy
``h_g`` of the global head::

    (s_p, s_g) = softmax over the pair axis of CPN(z ⊙ c_i / ‖c_i‖) reshaped to (B, 2, d)
    logits     = h_p(z ⊙ s_p) + h_g(z ⊙ s_g)                    (s_p + s_g = 1 per feature)

``CPN = Linear(d, 2d) + LayerNorm(2d) + ReLU``; ``c_i ∈ R^d`` is the site's context vector, the column
sum ``Σ_k W_p[k, :]`` of its personal head weight, refreshed whenever a new global head arrives
(``U(0, 1)`` before that). Local objective per batch, over ``φ_i``, ``h_p`` and the CPN::

    L = CE(logits, y) + λ · MMD²(φ_i(x), φ_g(x))

with ``φ_g`` a frozen copy of the last received global extractor and the biased (V-statistic)
within-batch estimator ``MMD²(a, b) = mean k(a_i, a_j) + mean k(b_i, b_j) − 2 mean k(a_i, b_j)`` over all
index pairs, including ``i = j``, with the kernel ``k(a, b) = Σ_{σ ∈ {10, 15, 20, 50}} exp(−‖a − b‖² / (2σ))``
(as the reference; it is non-negative, and depends on the batch size).

Training samples the gate with the soft Gumbel-softmax (temperature ``tau``), noise drawn from a
generator seeded by (site seed, round); evaluation uses the deterministic softmax. While ``h_g = h_p``
(round 1: both are the initial head) the logits do not depend on the gate, so the CPN starts learning
in round 2 (as in the reference).

Deployed model at a site: ``softmax(h_p(z ⊙ s_p) + h_g(z ⊙ s_g))`` with the deterministic gate.

Defaults: ``lam`` (λ) = 5, the FedCP repository's ``run_me`` value (PFLlib's ``main.py`` default of 1.0
is not the tuned one); ``tau`` = 1 (soft Gumbel-softmax, as in the reference).

Uploads (per site, per round), all sums the server adds:
    ``base.<param>``  parameter shapes of ``φ``, float32: ``φ_i · n_i``. Reveals the locally trained
    extractor (model-inversion risk); encrypted under ``ckks``.
    ``cpn.<param>``   CPN parameter shapes, float32: ``θ_CPN,i · n_i`` (2d² + 6d values). Trained on
    features gated by the site context; encrypted under ``ckks``.
    ``head.weight`` (K, d), ``head.bias`` (K,) float32: ``½(h_p + h_g) · n_i``. Half of it is the
    personal head, whose rows reveal the site's label mix; encrypted under ``ckks``.
    ``n``             () float32: training images. Reveals dataset size; encrypted under ``ckks``.
The personal head itself, the context ``c_i`` and the frozen copies never leave the site.

Privacy modes: all (the server only adds; each site finishes the weighted means itself).

Reference-code bugs (PFLlib ``clientcp.py``/``servercp.py``) and what we do:

* **Stochastic predictions**: the reference samples Gumbel noise at test time too (its soft
  Gumbel-softmax ignores train/eval), so accuracy changes between two evaluations of one model;
  ``scores`` uses the deterministic softmax.
* Gumbel noise comes from the global RNG there; here from a per-(site, round) generator.
* The aggregated head and CPN reach only that round's selected clients in the reference; here every
  site receives them with the next payload.
* The CPN is initialised identically at every site from a job-level seed (derived from the job's
  initial model weights), never from the site seed.
* Kept as in the reference: ``φ_g`` runs in train mode during training (BatchNorm on batch statistics,
  like ``φ_i``), so ``MMD²`` compares the two extractors on the same footing.
"""

from __future__ import annotations

import copy

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
    mmd2,
    shared_init,
    weighted_params,
)

FAMILY = "pfl"
"""Personalized FL: every site runs the same backbone and shares (part of) its weights."""
MIXED_BACKBONES = False
"""Whether a job may give its sites different backbones."""
MULTILABEL = False
"""Whether a job may be multi-label (``task: multilabel``): no, not validated for multi-label heads yet (its gate and head are trained with per-class softmax metrics)."""
RECIPE = COSINE_RECIPE
"""The training recipe chosen on validation data (:data:`.base.COSINE_RECIPE`; ``benchmarks/recipe.py``, BENCHMARKS.md)."""


class Config(AlgorithmConfig):
    """FedCP hyper-parameters.

    Attributes:
        lam: λ ≥ 0, weight of the ``MMD²(φ_i(x), φ_g(x))`` term (default 5).
        tau: temperature > 0 of the gate softmax (Gumbel-softmax in training; default 1).
    """

    lam: float = Field(default=5.0, ge=0)
    tau: float = Field(default=1.0, gt=0)


class Client(BaseClient):
    """FedCP at one site.

    Attributes:
        cpn: the conditional policy network (shared).
        global_head: ``h_g``, the last received global head (frozen).
        global_base: ``φ_g``, the last received global extractor (frozen).
        context: ``c_i`` ``(d,)``, column sum of the personal head weight (``U(0, 1)`` before round 2).
    """

    config: Config

    def __init__(self, setup: SiteSetup, config: Config):
        super().__init__(setup, config)
        d = self.model.head.in_features
        with shared_init(self.model):
            self.cpn = PolicyNetwork(d)
        self.global_head = _frozen_copy(self.model.head)
        self.global_base = _frozen_copy(self.model.base)
        self.context = torch.rand(d, generator=torch.Generator().manual_seed(setup.seed))

    def receive(self, payload: Tensors | None, rnd: int) -> None:
        """Load ``φ`` into ``φ_i`` and ``φ_g``, refresh the context, then load ``h_g`` and the CPN.

        Before round 1 (``payload`` is ``None``) ``h_g`` and ``φ_g`` stay copies of the initial head and
        extractor, and the CPN its shared initialisation.
        """
        if not payload:
            return
        load_mean(self.model.base, payload, "base.")
        load_mean(self.global_base, payload, "base.")
        self.context = self.model.head.weight.detach().sum(dim=0).clone()
        load_mean(self.global_head, payload, "head.")
        load_mean(self.cpn, payload, "cpn.")

    def train(self, rnd: int) -> Upload:
        """Train ``φ_i``, ``h_p`` and the CPN on ``CE + λ MMD²``; upload the shared parts × n.

        Uploads ``base.*`` (φ_i · n), ``cpn.*`` (CPN · n), ``head.*`` (½(h_p + h_g) · n), all float32,
        and ``n`` (() float32). See the module docstring for what each reveals.
        """
        noise = torch.Generator().manual_seed(_gumbel_seed(self.setup.seed, rnd))
        frozen = {"global_head": self.global_head, "global_base": self.global_base}
        container = nn.ModuleDict({"model": self.model, "cpn": self.cpn, **frozen})
        params = [*self.model.parameters(), *self.cpn.parameters()]
        loss = self.fit(rnd, model=container, params=params, forward=lambda x, y: self.forward(x, y, noise))
        n = self.setup.n_train
        heads = zip(self.model.head.named_parameters(), self.global_head.named_parameters())
        mixed_head = {f"head.{name}": 0.5 * (p.detach().float() + g.detach().float()) * float(n)
                      for (name, p), (_, g) in heads}  # fmt: skip
        sums = {
            **weighted_params(self.model.base, n, "base."),
            **weighted_params(self.cpn, n, "cpn."),
            **mixed_head,
            **count(n),
        }
        return Upload(sums, loss)

    @torch.no_grad()
    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Class probabilities ``(B, K)`` of the gated two-head model for images ``(B, C, H, W)``.

        Eval mode and the deterministic gate: the same input always gives the same output.
        """
        self.model.eval()
        self.cpn.eval()
        return torch.softmax(self.logits(self.model.features(x)), dim=1)

    def forward(
        self, x: torch.Tensor, y: torch.Tensor, noise: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The training path for the shared loop: gated two-head logits and the MMD term for one batch.

        Args:
            x: images ``(B, C, H, W)``.
            y: labels ``(B,)`` (unused: the MMD term needs none).
            noise: generator of the Gumbel noise of the gate (``None``: deterministic gate).

        Returns:
            logits ``(B, K)`` and the scalar ``λ · MMD²(φ_i(x), φ_g(x))`` (no gradient into ``φ_g``).
        """
        z = self.model.features(x)
        with torch.no_grad():
            z_global = self.global_base(x)
        return self.logits(z, noise), self.config.lam * mmd2(z, z_global)

    def logits(self, z: torch.Tensor, noise: torch.Generator | None = None) -> torch.Tensor:
        """``h_p(z ⊙ s_p) + h_g(z ⊙ s_g)`` ``(B, K)`` for features ``z`` ``(B, d)``.

        The gate is the Gumbel-softmax with noise from ``noise`` when given, else the plain softmax.
        """
        gate_input = z * F.normalize(self.context, dim=0)
        s_personal, s_global = feature_gates(self.cpn(gate_input), self.config.tau, noise)
        return self.model.head(z * s_personal) + self.global_head(z * s_global)


class Server(BaseServer):
    """Linear: the payload is the aggregate Σ φ_i n_i, Σ θ_CPN,i n_i, Σ ½(h_p + h_g)_i n_i, Σ n_i."""


# ---- modules and pure helpers ---------------------------------------------------------------------


class PolicyNetwork(nn.Module):
    """The CPN: ``Linear(d, 2d) + LayerNorm(2d) + ReLU``, output viewed as gate logits ``(B, 2, d)``.

    Args:
        dim: ``d``, the feature dimension.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.fc = nn.Sequential(nn.Linear(dim, 2 * dim), nn.LayerNorm(2 * dim), nn.ReLU())

    def forward(self, gate_input: torch.Tensor) -> torch.Tensor:
        """Gate logits.

        Args:
            gate_input: ``z ⊙ c / ‖c‖`` ``(B, d)``.

        Returns:
            logits ``(B, 2, d)``: index 0 of the pair axis for the personal head, 1 for the global one.
        """
        return self.fc(gate_input).view(-1, 2, self.dim)


def feature_gates(
    logits: torch.Tensor, tau: float, noise: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature split ``(s_p, s_g)`` with ``s_p + s_g = 1``.

    Args:
        logits: gate logits ``(B, 2, d)``.
        tau: softmax temperature > 0.
        noise: when given, the soft Gumbel-softmax with Gumbel(0, 1) noise from this CPU generator
            (training); when ``None``, the deterministic ``softmax(logits / tau)`` (evaluation).

    Returns:
        ``s_p`` and ``s_g``, each ``(B, d)`` in ``[0, 1]``.
    """
    if noise is not None:
        exponential = torch.empty(logits.shape).exponential_(generator=noise)
        gumbel = -exponential.clamp_min(torch.finfo(torch.float32).tiny).log()
        logits = logits + gumbel.to(device=logits.device, dtype=logits.dtype)
    gates = torch.softmax(logits / tau, dim=1)
    return gates[:, 0, :], gates[:, 1, :]


def _frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` whose parameters take no gradient."""
    frozen = copy.deepcopy(module)
    frozen.requires_grad_(False)
    return frozen


def _gumbel_seed(site_seed: int, rnd: int) -> int:
    """Seed of round ``rnd``'s Gumbel noise at a site; a different stream from the data order's."""
    return (site_seed * 100_003 + rnd) ^ 0x5DEECE66D
