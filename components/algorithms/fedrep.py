r"""FedRep: federated representation, personal head, trained in alternation (Collins et al., ICML 2021,
`arXiv:2102.07078 <https://arxiv.org/abs/2102.07078>`_).

Same split and payload as FedPer (:mod:`.fedper`): the feature extractor φ (``model.base``) is
federated, the linear head h_i (``model.head``) stays at the site. What differs is the local round
(``shared/reference/algorithms.md`` §2.6), two phases with separate optimisers (job settings, same lr):

1. **head phase**: φ frozen, train h_i for ``head_epochs`` epochs:
   :math:`h_i \leftarrow \arg\min_h \mathcal{L}_i(h \circ \varphi_g)`;
2. **representation phase**: h_i frozen, train φ for the job's ``local_epochs``:
   :math:`\varphi_i \leftarrow \arg\min_\varphi \mathcal{L}_i(h_i \circ \varphi)`, started from φ_g.

The server averages the bases, :math:`\varphi_g = \sum_i n_i \varphi_i / \sum_i n_i`; sites finish the
mean themselves from the aggregate, so the server only ever adds (works under CKKS). BatchNorm
running statistics stay local (see :mod:`.base`); they keep following the data in both phases
(train mode, as in the reference), and are never uploaded.

Frozen means ``requires_grad=False`` for the phase, not merely "left out of the optimiser": the head
phase then runs φ forward only (no backward through φ, no gradients stored for it), which is about a
third of the compute of a full training epoch.

Default ``head_epochs = 5`` (reference ``plocal_epochs = 1``). The FedRep authors fit the head for
many more local epochs than the representation (their code runs ``local_ep - local_rep_ep`` head
epochs, typically 10 - 1 = 9, per representation epoch), so that h_i has adapted to the freshly
averaged φ_g before φ is trained against it; with one epoch at a small learning rate the head lags
behind the new representation. Five is a compromise with CPU cost: the head phase adds roughly 5 × ⅓ ≈ 1.7
epochs of compute per round on top of ``local_epochs``. It is not a sure win: users report FedRep
below FedPer on CIFAR-100 with 5 head epochs (PFLlib issue #206), while PFLlib's own benchmark, run
with 1, has FedRep above FedPer; set ``head_epochs: 1`` to reproduce the reference.

Deployed model at a site: the global base φ (with the site's BatchNorm statistics) and the site's
own head h_i, trained against that φ in the last round.

Uploads (per site, per round):
    ``base.<param>``  same shape as the base parameter, float32: φ_i × n_i. Reveals the locally trained
    feature extractor (model-inversion risk); encrypted under ``ckks``. The head (d·K + K floats)
    never leaves the site.
    ``n``             () float32: training images. Reveals dataset size; encrypted under ``ckks``.

Privacy modes: all. Reference-code bugs fixed: none listed for FedRep.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from pydantic import Field
from torch import nn

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
"""The training recipe chosen on validation data (:data:`.base.COSINE_RECIPE`; ``benchmarks/recipe.py``, BENCHMARKS.md)."""


class Config(AlgorithmConfig):
    """FedRep's hyper-parameters.

    Attributes:
        head_epochs: epochs of the head phase (φ frozen) before the representation phase, ≥ 1
            (default 5; the reference's ``plocal_epochs`` is 1; see the module docstring). The
            representation phase runs the job's ``local_epochs``.
    """

    head_epochs: int = Field(default=5, ge=1)


class Client(BaseClient):
    """FedRep at one site: shared base φ, personal head h_i (``self.model.head``, kept between rounds)."""

    config: Config

    def receive(self, payload: Tensors | None, rnd: int) -> None:
        """Load the n-weighted mean of the bases; the personal head is left as it is.

        Before round 1 (``payload`` is ``None``) the shared seeded initialisation is kept.
        """
        if payload:
            load_mean(self.model.base, payload, BASE)

    def train(self, rnd: int) -> Upload:
        """Head phase, then representation phase (:meth:`train_head`, :meth:`train_base`).

        Returns:
            ``base.*`` = φ_i · n_i (parameter shapes, float32) and ``n`` = n_i (() float32), plus the
            mean cross-entropy over every batch of both phases.
        """
        head_loss = self.train_head(rnd)
        base_loss = self.train_base(rnd)
        head_epochs, base_epochs = self.config.head_epochs, self.setup.training.local_epochs
        loss = (head_loss * head_epochs + base_loss * base_epochs) / (head_epochs + base_epochs)
        n = self.setup.n_train
        return Upload({**weighted_params(self.model.base, n, BASE), **count(n)}, loss)

    def train_head(self, rnd: int) -> float:
        """Phase 1: train the head h_i for ``head_epochs`` with φ frozen; returns the mean loss."""
        with frozen(self.model.base):
            return self.fit(rnd, params=self.model.head.parameters(), epochs=self.config.head_epochs)

    def train_base(self, rnd: int) -> float:
        """Phase 2: train φ for the job's ``local_epochs`` with the head frozen; returns the mean loss."""
        with frozen(self.model.head):
            return self.fit(rnd, params=self.model.base.parameters())


class Server(BaseServer):
    """Linear: the payload is the aggregate Σ φ_i n_i, Σ n_i."""


@contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """Turn off ``requires_grad`` on ``module``'s parameters for the block, then restore each flag."""
    params = list(module.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
