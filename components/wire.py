"""What the server and site halves agree on: task names, the job's identity, payload sizes.

Both :mod:`.controller` (server) and :mod:`.executor` (site) import this module, neither imports the other's
internals.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from nvflare.apis.fl_context import FLContext

from medsilo.errors import MedsiloError
from medsilo.secure.upload import NAME as JOB_ID

RUN_ID_ENV = "MEDSILO_RUN_ID"
"""Simulator only: the run's id, which stands in for the job id (NVFlare's simulator names every job
``simulate_job``, and ledgers and signatures must tell runs apart)."""
TASK_JOIN, TASK_TRAIN, TASK_EVALUATE, TASK_RELEASE, TASK_EXPORT = "join", "train", "evaluate", "release", "export"
"""The tasks of a job, in order: ``join`` once, ``train`` per round (with ``release`` where the server asks for
an aggregate), ``evaluate`` once after the last round, ``export`` once at the end."""


def job_identity(fl_ctx: FLContext) -> str:
    """The id ledgers, signatures and checkpoints bind to: NVFlare's job id, or the simulator run's id.

    Raises:
        MedsiloError: an id that is not a plain name (it names folders and appears in signed statements).
    """
    value = os.environ.get(RUN_ID_ENV) or fl_ctx.get_job_id()
    if not isinstance(value, str) or not JOB_ID.fullmatch(value):
        raise MedsiloError("the job id is not a plain name (letters, digits, '.', '_', '-'); refusing it")
    return value


def payload_bytes(arrays: dict[str, Any] | None) -> int:
    """Bytes of a payload's tensors as sent (array buffers; byte strings count their size)."""
    total = 0
    for v in (arrays or {}).values():
        total += len(v) if isinstance(v, (bytes, bytearray)) else int(np.asarray(v).nbytes)
    return total
