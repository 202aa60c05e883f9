"""The names a job spec is validated against, provided by the layers that own them (DESIGN §2).

``medsilo.config`` is a leaf: it imports nothing above it. Yet a spec names an algorithm (whose module
declares its hyper-parameters, family and forms) and backbones (the model zoo's). The owners *provide*
them here when they are imported — ``medsilo.components.algorithms`` calls :func:`provide` with itself,
``medsilo.medical.models`` with its backbone names — and validation asks this registry.

When a spec is validated before anyone imported the owners (a script that only calls
:func:`medsilo.config.load_job_spec`), :func:`algorithms` and :func:`backbones` import them by name: the
one deliberate upward reference of the config layer, by name at first use and never at import time, so
the import graph stays a tree (``tests/unit/test_imports.py``).
"""

from __future__ import annotations

import importlib
from typing import Any

OWNERS: dict[str, str] = {"algorithms": "medsilo.components.algorithms", "backbones": "medsilo.medical.models"}
"""What provides each kind of name: the algorithm registry module, the model zoo package."""

_provided: dict[str, Any] = {}


def provide(kind: str, value: Any) -> None:
    """Called by an owner (:data:`OWNERS`) when it is imported: ``algorithms`` → the registry module (with
    ``ALGORITHMS``, ``algorithm_module(name)``, ``family(name)``); ``backbones`` → the backbone names."""
    if kind not in OWNERS:
        raise ValueError(f"registry: unknown kind {kind!r}; one of {', '.join(OWNERS)}")
    _provided[kind] = value


def _get(kind: str) -> Any:
    if kind not in _provided:
        importlib.import_module(OWNERS[kind])  # the owner calls provide() as it is imported
    return _provided[kind]


def algorithms() -> Any:
    """The algorithm registry (:mod:`medsilo.components.algorithms`)."""
    return _get("algorithms")


def backbones() -> tuple[str, ...]:
    """The model zoo's backbone names."""
    return tuple(_get("backbones"))
