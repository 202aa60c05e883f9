"""One privacy pipeline per privacy mode (DESIGN §3): a site half that protects an upload and a server half
that combines what arrives.

Each mode is one module holding a ``Site`` and a ``Server`` class (:mod:`.base` has the shared flow):

* :mod:`.none` — plaintext, signed and ledgered;
* :mod:`.dp` — noised and charged to the site's budget;
* :mod:`.ckks` — encrypted under CKKS; the server adds ciphertexts; aggregate release for server-side learning;
* :mod:`.ckks_dp` — both.

A new mode = one module here + one line in :data:`PIPELINES` (and the mode's name in the config schema).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from medsilo.errors import MedsiloError

PIPELINES: dict[str, str] = {
    "none": "medsilo.secure.pipeline.none",
    "dp": "medsilo.secure.pipeline.dp",
    "ckks": "medsilo.secure.pipeline.ckks",
    "ckks+dp": "medsilo.secure.pipeline.ckks_dp",
}
"""Privacy mode → the module holding its ``Site`` and ``Server`` halves."""


def pipeline_module(mode: str) -> ModuleType:
    """The module of privacy mode ``mode``.

    Raises:
        MedsiloError: an unknown mode (never a silent fallback to plaintext).
    """
    if mode not in PIPELINES:
        raise MedsiloError(f"privacy mode {mode!r} has no pipeline; modes: {', '.join(PIPELINES)}")
    return importlib.import_module(PIPELINES[mode])
