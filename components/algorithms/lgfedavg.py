r"""LG-FedAvg, heterogeneous variant: federated head, local feature extractors (Liang et al., 2020,
"Think Locally, Act Globally: Federated Learning with Local and Global Representations",
`arXiv:2001.01523 <https://arxiv.org/abs/2001.01523>`_; HtFL form of ``shared/reference/algorithms.md``
§4.5).

Each site i keeps its own feature extractor φ_i (``model.base``, any zoo backbone: the bases are
heterogeneous and never leave the site); only the linear head h = ``Linear(d, K)``, the same shape in
every zoo model, is federated:

.. math::

    h \leftarrow \sum_i \frac{n_i}{\sum_j n_j}\, h_i, \qquad
    (\varphi_i, h_i) \leftarrow \arg\min \mathcal{L}_i(h_i \circ \varphi_i) \text{ from } h_i = h

Each round a site overwrites its head with the n-weighted mean head and trains the *whole* local
model (φ_i and h) for ``local_epochs`` on cross-entropy. Sites finish the mean themselves from the
aggregate, so the server only ever adds (works under CKKS). BatchNorm running statistics stay local.

**Initial head.** The reference starts every client from client 0's head in round 1. Here every site
builds its model from the job seed; sites with the *same* backbone therefore start with the same head,
but the head is built after the backbone, which consumes the seeded generator differently per
architecture, so sites with different backbones start with different heads. Before round 1 (no
payload) each site keeps its own initial head; from round 2 on every site starts the round from the
same mean head.

Deployed model at a site: its own φ_i (with its BatchNorm statistics) and the head it trained in the
last round (starting from the global head).

Uploads (per site, per round):
    ``head.weight``  (K, d) float32: W_i × n_i. Reveals the site's locally trained classifier (its
    class priors through the biases and class directions in its feature space); encrypted under
    ``ckks``. Nothing of φ_i leaves the site.
    ``head.bias``    (K,) float32: b_i × n_i; as above.
    ``n``            () float32: training images. Reveals dataset size; encrypted under ``ckks``.

Privacy modes: all. No hyper-parameters. Reference-code bugs fixed: none listed (the reference fails
with heads of different shapes, e.g. ViT; every zoo model has a ``Linear(d, K)`` head).
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

HEAD = "head."
"""Upload prefix of the shared head h."""


FAMILY = "htfl"
"""Heterogeneous FL: sites share only d- or K-sized tensors, so each may run its own backbone."""
MIXED_BACKBONES = True
"""Whether a job may give its sites different backbones."""
MULTILABEL = True
"""Whether a job may be multi-label (``task: multilabel``): sigmoid outputs, masked BCE in the shared loop."""
RECIPE = COSINE_RECIPE
"""The training recipe chosen on validation data (:data:`.base.COSINE_RECIPE`; ``benchmarks/recipe.py``, BENCHMARKS.md)."""


class Config(AlgorithmConfig):
    """LG-FedAvg has no hyper-parameters."""


class Client(BaseClient):
    """LG-FedAvg at one site: local base φ_i (kept between rounds), global head h."""

    def receive(self, payload: Tensors | None, rnd: int) -> None:
        """Overwrite the head with the n-weighted mean head; the base and BatchNorm statistics are kept.

        Before round 1 (``payload`` is ``None``) the site's own initial head is kept.
        """
        if payload:
            load_mean(self.model.head, payload, HEAD)

    def train(self, rnd: int) -> Upload:
        """Train the whole local model (φ_i and h) for ``local_epochs`` on cross-entropy.

        Returns:
            ``head.weight`` = W_i · n_i ((K, d) float32), ``head.bias`` = b_i · n_i ((K,) float32) and
            ``n`` = n_i (() float32), plus the mean training loss.
        """
        loss = self.fit(rnd)
        n = self.setup.n_train
        return Upload({**weighted_params(self.model.head, n, HEAD), **count(n)}, loss)


class Server(BaseServer):
    """Linear: the payload is the aggregate Σ h_i n_i, Σ n_i."""
