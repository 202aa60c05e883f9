"""Local: every site trains on its own data only — the no-federation baseline.

Nothing is uploaded and nothing is received; the round engine still evaluates every site each round,
so Local is directly comparable with the federated methods run on the same sites and seeds.

Uploads: none. Privacy modes: all (nothing leaves the site). No hyper-parameters.
"""

from __future__ import annotations

from medsilo.components.algorithms.base import (
    COSINE_RECIPE,
    AlgorithmConfig,
    Client as BaseClient,
    Server as BaseServer,
    Upload,
)

FAMILY = "local"
"""No federation: nothing is shared, so each site may run any backbone."""
MIXED_BACKBONES = True
"""Whether a job may give its sites different backbones."""
MULTILABEL = True
"""Whether a job may be multi-label (``task: multilabel``): sigmoid outputs, masked BCE in the shared loop."""
RECIPE = COSINE_RECIPE
"""The training recipe chosen on validation data (:data:`.base.COSINE_RECIPE`; ``benchmarks/recipe.py``)."""


class Config(AlgorithmConfig):
    """Local has no hyper-parameters."""


class Client(BaseClient):
    """A site training alone."""

    def train(self, rnd: int) -> Upload:
        """Train locally; upload nothing."""
        return Upload({}, self.fit(rnd))


class Server(BaseServer):
    """Nothing to aggregate: the payload stays empty."""
