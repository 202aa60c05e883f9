r"""FedPer: federated base layers, personal head (Arivazhagan et al., 2019,
`arXiv:1912.00818 <https://arxiv.org/abs/1912.00818>`_).

The model is split into a feature extractor φ (``model.base``) and a linear head h_i (``model.head``).
Only φ is federated; every site keeps its own head:

.. math::

    \min_{\varphi, h_1..h_N} \sum_i \frac{n_i}{n} \mathcal{L}_i(h_i \circ \varphi), \qquad
    \varphi \leftarrow \sum_i \frac{n_i}{\sum_j n_j} \varphi_i

Each round a site loads the n-weighted mean of the bases (its head untouched) and trains the *whole*
model (φ and h_i together) for ``local_epochs`` on cross-entropy, as in the reference
(``shared/reference/algorithms.md`` §2.5). Sites finish the mean themselves from the aggregate, so
the server only ever adds (works under CKKS). BatchNorm running statistics stay local (see
:mod:`.base`).

Deployed model at a site: the global base φ (with the site's BatchNorm statistics) and the site's
own head h_i.

Uploads (per site, per round):
    ``base.<param>``  same shape as the base parameter, float32: φ_i × n_i. Reveals the locally trained
    feature extractor (model-inversion risk); encrypted under ``ckks``. The head (d·K + K floats)
    never leaves the site.
    ``n``             () float32: training images. Reveals dataset size; encrypted under ``ckks``.

Privacy modes: all. No hyper-parameters. Reference-code bugs fixed: none (FedPer has none listed).
"""

from __future__ import annotations

from medsilo.components.algorithms.base import (
    COSINE_RECIPE,
    AlgorithmConfig,
    Client as BaseClient,
    Server as BaseServer,
    Tensors,
    Upload,
    count,
    load_mean,
    weighted_params,
)

BASE = "base."
"""Upload prefix of the shared feature extractor φ."""


FAMILY = "pfl"
"""Personalized FL: every site runs the same backbone and shares (part of) its weights."""
MIXED_BACKBONES = False
"""Whether a job may give its sites different backbones."""
MULTILABEL = True
"""Whether a job may be multi-label (``task: multilabel``): sigmoid outputs, masked BCE in the shared loop."""
RECIPE = COSINE_RECIPE
"""The training recipe chosen on validation data (:data:`.base.COSINE_RECIPE`; ``benchmarks/recipe.py``)."""


class Config(AlgorithmConfig):
    """FedPer has no hyper-parameters."""


class Client(BaseClient):
    """FedPer at one site: shared base φ, personal head h_i (``self.model.head``, kept between rounds)."""

    def receive(self, payload: Tensors | None, rnd: int) -> None:
        """Load the n-weighted mean of the bases; the personal head is left as it is.

        Before round 1 (``payload`` is ``None``) the shared seeded initialisation is kept.
        """
        if payload:
            load_mean(self.model.base, payload, BASE)

    def train(self, rnd: int) -> Upload:
        """Train the whole model (φ and h_i) for ``local_epochs`` on cross-entropy.

        Returns:
            ``base.*`` = φ_i · n_i (parameter shapes, float32) and ``n`` = n_i (() float32), plus the
            mean training loss.
        """
        loss = self.fit(rnd)
        n = self.setup.n_train
        return Upload({**weighted_params(self.model.base, n, BASE), **count(n)}, loss)


class Server(BaseServer):
    """Linear: the payload is the aggregate Σ φ_i n_i, Σ n_i."""
