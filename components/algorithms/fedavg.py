"""FedAvg: federated averaging (McMahan et al., 2017, `arXiv:1602.05629 <https://arxiv.org/abs/1602.05629>`_).

Each site starts the round from the global model, trains ``local_epochs`` on cross-entropy, and
uploads its parameters weighted by its number of training images; the new global model is
``θ = Σ_i n_i θ_i / Σ_i n_i``. Sites finish that mean themselves from the aggregate, so the server
only ever adds (works under CKKS). BatchNorm statistics stay local (see :mod:`.base`).

Deployed model at a site: the global parameters with the site's own BatchNorm statistics.

Uploads (per site, per round):
    ``w.<param>``  same shape as the parameter, float32: parameters × n_i. Reveals the locally trained
    model (model-inversion risk); encrypted under ``ckks``.
    ``n``          () float32: training images. Reveals dataset size; encrypted under ``ckks``.

Privacy modes: all. Under ``dp`` and ``ckks+dp`` the upload's ``n`` is 1, so sites are averaged with equal
weight (their dataset sizes would otherwise leave unnoised), and ``Config.dp_form`` picks how the weights are
made private. Each round starts from the last global model, whatever the site's model holds:

* ``"update"`` (default): the site trains as usual and uploads θ_g + Δ̃, with Δ = θ_i − θ_g clipped to norm C
  and Gaussian noise added (:func:`.base.private_weights`). One ``GaussianEvent(σ)`` a round, with sensitivity
  2·C between *any* two datasets of the site: the noise hides the whole hospital, which costs so much that 8
  sites learn nothing at ε = 8 (BENCHMARKS.md). It is the cross-device form, for many sites.
* ``"dp-sgd"`` (record-level, the form for a few hospitals): the site trains with DP-SGD
  (:meth:`~.base.Client.fit_private`: T = E·⌈N/B⌉ Poisson-sampled steps at rate q = B/N, each image's gradient
  clipped to ``grad_clip`` G, noise std σ_sgd·G, BatchNorm in eval mode on its initial statistics) and uploads
  the trained weights θ_i as they are. They are post-processing of DP-SGD's output, so no second mechanism runs
  and the round costs ``GaussianEvent(σ_sgd, steps=T, sampling_rate=q)`` alone. Its noise is per step and per
  image, not per hospital. Single-label jobs only (DP-SGD's per-image loss is cross-entropy).
"""

from __future__ import annotations

from typing import Literal

import torch

from medsilo.components.algorithms.base import (
    COSINE_RECIPE,
    AlgorithmConfig,
    Client as BaseClient,
    Server as BaseServer,
    Tensors,
    Upload,
    count,
    load_mean,
    private_weights,
    weighted_params,
)
from medsilo.config.job import DPSpec
from medsilo.secure.dp import DPRelease, GaussianEvent

FAMILY = "pfl"
"""Personalized FL: every site runs the same backbone and shares (part of) its weights."""
MIXED_BACKBONES = False
"""Whether a job may give its sites different backbones."""
MULTILABEL = True
"""Whether a job may be multi-label (``task: multilabel``): sigmoid outputs, masked BCE in the shared loop."""
RECIPE = COSINE_RECIPE
"""The training recipe chosen on validation data (:data:`.base.COSINE_RECIPE`; ``benchmarks/recipe.py``)."""


class Config(AlgorithmConfig):
    """FedAvg's one option says how a private round makes its weights private (module docstring).

    Attributes:
        dp_form: ``"update"`` (default; a clipped, noised weight update: site-level, for many sites) or
            ``"dp-sgd"`` (DP-SGD training, the trained weights uploaded: record-level, for a few hospitals).
            Used only under privacy modes ``dp`` and ``ckks+dp``.
    """

    dp_form: Literal["update", "dp-sgd"] = "update"


class Client(BaseClient):
    """FedAvg at one site.

    Attributes:
        reference: the last global model this site received (before round 1 the shared seeded
            initialisation), by parameter name: what a private round's update is taken against, so the
            released update never carries the site's own earlier, non-private training.
    """

    dp_form = "update"

    def __init__(self, setup, config):
        super().__init__(setup, config)
        self.reference = _parameters(self.model)

    def receive(self, payload: Tensors | None, rnd: int) -> None:
        """Load the global weighted mean (before round 1 the shared seeded initialisation is kept)."""
        if payload:
            load_mean(self.model, payload, "w.")
            self.reference = _parameters(self.model)

    def train(self, rnd: int) -> Upload:
        """Train the global model locally; upload ``w.*`` = θ_i · n_i and ``n`` = n_i."""
        loss = self.fit(rnd)
        n = self.setup.n_train
        return Upload({**weighted_params(self.model, n, "w."), **count(n)}, loss)

    def train_private(self, rnd: int, dp: DPRelease) -> Upload:
        """Train from :attr:`reference` (the last global model, public to the server, whatever the model holds
        now: had the server sent nothing, it would still hold this site's own training) in ``Config.dp_form``;
        upload ``w.*`` and ``n`` = 1.

        * ``"update"``: train as :meth:`train`; ``w.*`` = θ_g + Δ̃, the clipped, noised update
          (:func:`.base.private_weights`, sensitivity 2·C between any two datasets of the site).
        * ``"dp-sgd"``: train with DP-SGD (:meth:`~.base.Client.fit_private`); ``w.*`` = the trained θ_i.

        Privacy effect: exactly the mechanisms of :meth:`dp_events`, which the site charges and ledgers before this
        runs; ``n`` = 1 so the dataset size does not leave.

        Raises:
            medsilo.secure.dp.DPError: ``"dp-sgd"`` and ``dp`` carries no DP-SGD settings (nothing is trained).
        """
        if self.config.dp_form == "dp-sgd":
            dp.sgd()  # fail closed before anything changes
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                p.copy_(self.reference[name])
        if self.config.dp_form == "dp-sgd":
            loss = self.fit_private(rnd, dp)
            return Upload({**weighted_params(self.model, 1, "w."), **count(1)}, loss)
        before = {name: t.clone() for name, t in self.reference.items()}
        loss = self.fit(rnd)
        return Upload({**private_weights(self.model, before, dp, "w."), **count(1)}, loss)

    @classmethod
    def trains_with_dp_sgd(cls, config: Config) -> bool:
        """True in the ``"dp-sgd"`` form."""
        return config.dp_form == "dp-sgd"

    def dp_events(self, dp: DPSpec) -> list[GaussianEvent]:
        """One private round's cost in ``Config.dp_form``.

        Returns:
            ``"update"``: ``[GaussianEvent(dp.noise_multiplier)]``, the release. ``"dp-sgd"``:
            ``[GaussianEvent(dp.sgd_noise_multiplier, steps=T, sampling_rate=q)]`` with (T, q) from
            :meth:`~.base.Client.dp_schedule`; the upload of the trained weights is post-processing.
        """
        if self.config.dp_form == "dp-sgd":
            steps, rate = self.dp_schedule()
            return [GaussianEvent(noise_multiplier=dp.sgd_noise_multiplier, steps=steps, sampling_rate=rate)]
        return super().dp_events(dp)


class Server(BaseServer):
    """Linear: the payload is the aggregate Σ θ_i n_i, Σ n_i."""


def _parameters(model) -> Tensors:
    """Detached float copies of ``model``'s parameters, by name."""
    return {name: p.detach().float().clone() for name, p in model.named_parameters()}
