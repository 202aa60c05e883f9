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

Under ``dp`` (site-level): the upload is θ_g + Δ̃ with Δ = θ_i − θ_g clipped to norm C and Gaussian
noise added (:func:`.base.private_weights`), and ``n`` = 1, so sites are averaged with equal weight
(their dataset sizes would otherwise leave unnoised).

Privacy modes: all. No hyper-parameters.
"""

from __future__ import annotations

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
from medsilo.secure.dp import DPRelease

FAMILY = "pfl"
"""Personalized FL: every site runs the same backbone and shares (part of) its weights."""
MIXED_BACKBONES = False
"""Whether a job may give its sites different backbones."""
MULTILABEL = True
"""Whether a job may be multi-label (``task: multilabel``): sigmoid outputs, masked BCE in the shared loop."""
RECIPE = COSINE_RECIPE
"""The training recipe chosen on validation data (:data:`.base.COSINE_RECIPE`; ``benchmarks/recipe.py``)."""


class Config(AlgorithmConfig):
    """FedAvg has no hyper-parameters."""


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
        """Train as :meth:`train`; upload the DP global-plus-noisy-update ``w.*`` and ``n`` = 1.

        Costs the default :meth:`~.base.Client.dp_events`, one ``GaussianEvent(dp.noise_multiplier)``
        (``gaussian_update``, sensitivity 2·C between any two datasets of the site). Training starts from
        :attr:`reference`, public to the server, whatever the model holds now (had the server sent nothing, the
        model would still hold this site's own training, and Δ would reveal it unclipped)."""
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                p.copy_(self.reference[name])
        before = {name: t.clone() for name, t in self.reference.items()}
        loss = self.fit(rnd)
        return Upload({**private_weights(self.model, before, dp, "w."), **count(1)}, loss)


class Server(BaseServer):
    """Linear: the payload is the aggregate Σ θ_i n_i, Σ n_i."""


def _parameters(model) -> Tensors:
    """Detached float copies of ``model``'s parameters, by name."""
    return {name: p.detach().float().clone() for name, p in model.named_parameters()}
