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
}
"""Every algorithm a job may name."""

ALGORITHMS: tuple[str, ...] = tuple(REGISTRY)


def algorithm_module(name: str) -> ModuleType:
    """The module implementing ``name`` (case-insensitive).

    Raises:
        MedsiloError: unknown name, with the closest match and the valid names.
    """
    key = str(name).lower()
    if key not in REGISTRY:
        raise MedsiloError(f"unknown algorithm '{name}'; {did_you_mean(key, ALGORITHMS)}choose from {', '.join(ALGORITHMS)}")
    return importlib.import_module(REGISTRY[key])
