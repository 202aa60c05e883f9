"""Algorithm registry: job-spec name → module holding that algorithm's ``Config``, ``Client`` and ``Server``.

Adding an algorithm = one module in this folder + one line here + its tests. Importing this package
is cheap (module paths only); an algorithm's module, and torch, load when it is first used. What an
algorithm *is* — its family (``FAMILY``: ``local``, ``pfl`` or ``htfl``), whether sites may run different
backbones (``MIXED_BACKBONES``), its DP form (``Client.dp_form``) and server forms (``Server.form_for``) —
its module declares; the groups below and spec validation (through :mod:`medsilo.config.registry`, which
this package fills on import) read those declarations, never a position in this list.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

from medsilo.config import registry
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

FAMILIES = ("local", "pfl", "htfl")
"""``local``: no federation; ``pfl``: personalized FL with one backbone everywhere (sites share weights);
``htfl``: heterogeneous FL (sites share only d- or K-sized tensors, so backbones may differ)."""


def __getattr__(name: str) -> tuple[str, ...]:
    # the groups load every algorithm module to read its declaration, so they are computed on first use
    if name == "PFL_ALGORITHMS":  # Local, FedAvg and the personalized methods: one backbone at every site
        return tuple(a for a in ALGORITHMS if algorithm_module(a).FAMILY in ("local", "pfl"))
    if name == "HTFL_ALGORITHMS":  # Local and the methods that work across different backbones
        return tuple(a for a in ALGORITHMS if algorithm_module(a).MIXED_BACKBONES)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def algorithm_module(name: str) -> ModuleType:
    """The module implementing ``name`` (case-insensitive).

    Raises:
        MedsiloError: unknown name, with the closest match and the valid names.
    """
    key = str(name).lower()
    if key not in REGISTRY:
        raise MedsiloError(f"unknown algorithm '{name}'; {did_you_mean(key, ALGORITHMS)}choose from {', '.join(ALGORITHMS)}")
    return importlib.import_module(REGISTRY[key])


registry.provide("algorithms", sys.modules[__name__])
