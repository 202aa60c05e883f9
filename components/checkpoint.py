"""Checkpoints that let an interrupted job resume from its last completed round.

Who writes what:

* the **server** (:class:`~medsilo.components.controller.RoundController`), after each completed round:
  ``server.pkl`` — the round number, the payload for the next round, the algorithm's server half, the
  run recorder (metrics so far), the sites and the failures so far, and the digest of the job spec;
* each **site** (:class:`~medsilo.components.executor.SiteExecutor`), after each ``train`` task:
  ``<site>/round-<r>.pkl`` — the algorithm's client half (models, optimiser state, personal parts), never
  its images: the dataset is re-read from the site's own disk and attached again on load. The last two
  rounds are kept (a site can be one round ahead of the server's last completed round).

A resumed job starts at round r + 1 of the server's checkpoint; its first ``train`` task tells the sites
``resume_from = r`` and each site restores its round-r state. Data order and augmentation are seeded by
(site, round), so a seeded job resumed this way gives the results of the uninterrupted run (DP noise
excepted: it comes from the OS on purpose).

Where: simulation (``MEDSILO_CHECKPOINT_DIR``, set by ``medsilo sim`` to ``RUN_DIR/checkpoints``), or
``<workspace>/checkpoints/<job name>/`` of each party in a deployment. Checkpoints are pickles written
by the party itself into its own workspace; they are trusted like the rest of that workspace and must
never be loaded from anywhere else.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
from pathlib import Path
from typing import Any

from medsilo.errors import MedsiloError

CHECKPOINT_DIR_ENV = "MEDSILO_CHECKPOINT_DIR"
SERVER_FILE = "server.pkl"
KEEP_ROUNDS = 2
_DATA = "site-data"


class CheckpointError(MedsiloError):
    """A checkpoint needed to resume is missing, unreadable or of another job."""


def checkpoint_dir(workspace: str | Path, job_name: str) -> Path:
    """The checkpoint folder of this party for ``job_name`` (simulation: the env folder, shared)."""
    base = os.environ.get(CHECKPOINT_DIR_ENV)
    return Path(base) if base else Path(workspace) / "checkpoints" / job_name


def spec_digest(job: dict) -> str:
    """SHA-256 of the job spec (JSON-plain): a checkpoint only resumes the job that wrote it."""
    return hashlib.sha256(json.dumps(job, sort_keys=True).encode()).hexdigest()


def _write(path: Path, payload: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(path)  # a checkpoint is complete or absent, never half written
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot write the checkpoint ({exc.strerror or exc}); free space or fix "
                              "the folder's permissions") from exc


def save_server(folder: Path, state: dict[str, Any]) -> None:
    """Write the server's state after a completed round (atomic)."""
    _write(folder / SERVER_FILE, pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL))


def load_server(folder: Path, job: dict) -> dict[str, Any] | None:
    """The server's last checkpoint for ``job``, or ``None`` when there is none.

    Raises:
        CheckpointError: the file is unreadable, or was written by another job spec.
    """
    path = folder / SERVER_FILE
    if not path.is_file():
        return None
    try:
        state = pickle.loads(path.read_bytes())
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means the same thing to the user
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(exc).__name__}); start the job afresh") from exc
    if state.get("spec") != spec_digest(job):
        raise CheckpointError(f"{path}: written by another version of job '{job.get('name')}'; a job resumes only "
                              "with the exact spec it started with")  # fmt: skip
    return state


def save_site(folder: Path, site: str, rnd: int, client: Any, data: Any) -> None:
    """Write a site's client half after its ``train`` task of round ``rnd``, without the images."""

    class _Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return _DATA if obj is data else None

    buf = io.BytesIO()
    _Pickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(client)
    _write(folder / site / f"round-{rnd}.pkl", buf.getvalue())
    for old in (folder / site).glob("round-*.pkl"):
        if int(old.stem.split("-")[1]) <= rnd - KEEP_ROUNDS:
            old.unlink(missing_ok=True)


def load_site(folder: Path, site: str, rnd: int, data: Any) -> Any:
    """The site's client half as it was after round ``rnd``, with ``data`` (re-read by the site) attached.

    Raises:
        CheckpointError: no checkpoint of that round, or it cannot be read.
    """
    path = folder / site / f"round-{rnd}.pkl"
    if not path.is_file():
        raise CheckpointError(f"site {site}: cannot resume from round {rnd}: {path} is missing "
                              "(the site's checkpoints were removed or it never finished that round)")  # fmt: skip

    class _Unpickler(pickle.Unpickler):
        def persistent_load(self, pid):
            if pid != _DATA:
                raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")
            return data

    try:
        return _Unpickler(io.BytesIO(path.read_bytes())).load()
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"site {site}: {path}: unreadable checkpoint ({type(exc).__name__})") from exc
