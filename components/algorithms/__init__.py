"""Algorithm registry: job-spec name → module holding that algorithm's ``Config``, ``Client`` and ``Server``.

Adding an algorithm = one module in this folder + one line here + its tests. Importing this package
is cheap (module paths only); an algorithm's module, and torch, load when it is first used.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from medsilo.errors import MedsiloError, did_you_mean

REGISTRY: dict[str, str] = {
    # personalized FL, one backbone everywhere
    "local": "medsilo.components.algorithms.local",
    "fedavg": "medsilo.components.algorithms.fedavg",
    "fedprox": "medsilo.components.algorithms.fedprox",
    "ditto": "medsilo.components.algorithms.ditto",
    "fedrep": "medsilo.components.algorithms.fedrep",
    "fedper": "medsilo.components.algorithms.fedper",
    "fedala": "medsilo.components.algorithms.fedala",
    "feddbe": "medsilo.components.algorithms.feddbe",
    "gpfl": "medsilo.components.algorithms.gpfl",
    "fedcp": "medsilo.components.algorithms.fedcp",
    # heterogeneous FL: each site may run its own backbone (shared feature dimension d)
    "fedproto": "medsilo.components.algorithms.fedproto",
    "fedtgp": "medsilo.components.algorithms.fedtgp",
    "fedktl": "medsilo.components.algorithms.fedktl",
    "feddistill": "medsilo.components.algorithms.feddistill",
    "lgfedavg": "medsilo.components.algorithms.lgfedavg",
}
"""Every algorithm a job may name."""

ALGORITHMS: tuple[str, ...] = tuple(REGISTRY)

PFL_ALGORITHMS: tuple[str, ...] = ALGORITHMS[: ALGORITHMS.index("fedcp") + 1]
"""Local, FedAvg and the personalized methods: one backbone at every site (they share weights)."""

HTFL_ALGORITHMS: tuple[str, ...] = ("local", *ALGORITHMS[ALGORITHMS.index("fedproto") :])
"""Local and the methods that work across different backbones: they share only d- or K-sized tensors."""


def algorithm_module(name: str) -> ModuleType:
    """The module implementing ``name`` (case-insensitive).

    Raises:
        MedsiloError: unknown name, with the closest match and the valid names.
    """
    key = str(name).lower()
    if key not in REGISTRY:
        raise MedsiloError(f"unknown algorithm '{name}'; {did_you_mean(key, ALGORITHMS)}choose from {', '.join(ALGORITHMS)}")
    return importlib.import_module(REGISTRY[key])
