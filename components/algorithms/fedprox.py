"""FedProx: FedAvg with a proximal term (Li et al., 2020,
`arXiv:1812.06127 <https://arxiv.org/abs/1812.06127>`_).

Each site starts the round from the global model ``w_g``, keeps a frozen copy of it, and trains
``local_epochs`` on

.. math::

    \\min_w \\; \\mathrm{CE}(w) + \\frac{\\mu}{2} \\lVert w - w_g \\rVert_2^2 ,

so every gradient step is ``−η (∇CE(w) + μ (w − w_g))``: local models are pulled back toward the
round's global model, which limits client drift on non-IID sites. The norm runs over every shared
parameter (BatchNorm statistics are buffers, not parameters, and stay local). Aggregation is FedAvg's:
``w_g ← Σ_i n_i w_i / Σ_i n_i``, finished by each site from the aggregate (works under CKKS).

Deployed model at a site: the global parameters with the site's own BatchNorm statistics (as FedAvg).

Defaults:
    ``mu = 0.01``. The reference library (PFLlib) defaults to ``μ = 0``, which *is* FedAvg, so that
    default is not kept and ``μ = 0`` is rejected (run ``fedavg`` instead). 0.01 is the middle of the
    paper's grid {0.001, 0.01, 0.1, 1}: with the job's usual ``lr ≈ 0.01`` one step shrinks the
    distance to ``w_g`` by a factor ``1 − ημ ≈ 0.9999``, a gentle pull that damps drift over a round
    of a few hundred steps without freezing local progress. Raise it (0.1–1) for strongly non-IID
    sites or many local epochs.

Uploads (per site, per round; the same as FedAvg):
    ``w.<param>``  same shape as the parameter, float32: parameters × n_i. Reveals the locally trained
    model (model-inversion risk); encrypted under ``ckks``.
    ``n``          () float32: training images. Reveals dataset size; encrypted under ``ckks``.

Privacy modes: all (the server only adds).

Reference-code issues fixed:
    * ``μ = 0`` default switches the method off; here ``mu`` must be ``> 0``.
    * The reference's reported training loss adds ``0.5 μ ‖w − w_g‖`` (an un-squared norm) to the
      cross-entropy. Here the reported loss is the mean cross-entropy only, comparable across
      algorithms; the optimised objective uses the squared norm, as in the paper.
"""

from __future__ import annotations

from pydantic import Field

from medsilo.components.algorithms.base import (
    COSINE_RECIPE,
    AlgorithmConfig,
    Client as BaseClient,
    Server as BaseServer,
    Tensors,
    Upload,
    count,
    frozen_copy,
    load_mean,
    proximal_loss,
    weighted_params,
)

FAMILY = "pfl"
"""Personalized FL: every site runs the same backbone and shares (part of) its weights."""
MIXED_BACKBONES = False
"""Whether a job may give its sites different backbones."""
MULTILABEL = True
"""Whether a job may be multi-label (``task: multilabel``): sigmoid outputs, masked BCE in the shared loop."""
RECIPE = COSINE_RECIPE
"""The training recipe chosen on validation data (:data:`.base.COSINE_RECIPE`; ``benchmarks/recipe.py``, BENCHMARKS.md)."""


class Config(AlgorithmConfig):
    """FedProx hyper-parameters.

    Attributes:
        mu: proximal weight μ (≥ 0; ``μ = 0``, the reference's default, is exactly FedAvg). Default 0.01.
    """

    mu: float = Field(default=0.01, ge=0)


class Client(BaseClient):
    """FedProx at one site: FedAvg's exchange, local loss CE + (μ/2)‖w − w_g‖²."""

    config: Config

    def receive(self, payload: Tensors | None, rnd: int) -> None:
        """Load the global weighted mean (before round 1 the shared seeded initialisation is kept)."""
        if payload:
            load_mean(self.model, payload, "w.")

    def train(self, rnd: int) -> Upload:
        """Train from the received global model with the proximal term; upload like FedAvg.

        ``w_g`` is a frozen copy of the parameters at the start of the round, i.e. the global model
        just received (or the shared initialisation in round 1).

        Uploads:
            ``w.<param>`` (parameter shape) float32: θ_i · n_i. Reveals the local model; encrypted
            under ``ckks``.
            ``n`` () float32: n_i, training images. Reveals dataset size; encrypted under ``ckks``.

        Returns:
            the upload and the mean cross-entropy over the round's batches (proximal term excluded).
        """
        params = list(self.model.parameters())
        anchor = frozen_copy(params)
        loss = self.fit(rnd, extra_loss=proximal_loss(params, anchor, self.config.mu))
        n = self.setup.n_train
        return Upload({**weighted_params(self.model, n, "w."), **count(n)}, loss)


class Server(BaseServer):
    """Linear: the payload is the aggregate Σ θ_i n_i, Σ n_i (FedAvg)."""
