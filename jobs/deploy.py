"""Run a job spec on a real NVFlare deployment through the admin API: what ``medsilo poc submit`` does.

The job folder is exported exactly as ``medsilo job build`` writes it (:mod:`.builder`), submitted with an
admin identity's ``Session`` (NVFlare signs the folder with that identity's key; each site checks the
signature, the submitter's rights and its class allow-list), followed until NVFlare reports it finished,
and downloaded. Works with any admin ``Session``: the POC's or a production network's.

Run folder layout::

    RUN_DIR/results.json        # DESIGN §12, plus the NVFlare job_id (only when the job completed)
    RUN_DIR/report.html         # written by the CLI (medsilo poc submit), which renders reports
    RUN_DIR/<job id>/workspace/  # the server's job workspace as NVFlare's download returns it (logs, audit.log)
    RUN_DIR/<job id>/job/        # the job as the server stored it
"""

from __future__ import annotations

import json
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tqdm import tqdm

from medsilo.components.controller import FAILURE_FILE, PROGRESS_FILE, RESULTS_FILE
from medsilo.config import JobSpec
from medsilo.errors import MedsiloError
from medsilo.jobs.builder import export_job
from medsilo.jobs.simulate import tick

COMPLETED = "FINISHED:COMPLETED"


class DeployError(MedsiloError):
    """A deployed job was refused, failed, or did not finish in time."""


def run_deployed(spec: JobSpec, session, *, job_root: str | Path, run_dir: str | Path, min_sites: int,
                 server_workspace: str | Path | None = None, progress: bool = True, timeout: float = 1800.0,
                 resume: bool = False) -> dict[str, Any]:  # fmt: skip
    """Submit ``spec`` with ``session`` and wait for it; returns the parsed ``results.json``.

    Args:
        spec: the validated job spec.
        session: an open NVFlare admin ``Session`` (the caller closes it).
        job_root: folder the job is exported into (a fresh ``<name>-<time>`` sub-folder each call: NVFlare
            writes signature files into what it submits).
        run_dir: where the result goes (replaced if it exists).
        min_sites: sites that must be connected before NVFlare deploys the job.
        server_workspace: the server's workspace when it is on this machine (POC): its ``progress.jsonl``
            then moves the progress bar per round; otherwise the bar shows NVFlare's job status only.
        progress: show the bar.
        timeout: seconds before the job is aborted.
        resume: the server continues from the last round an earlier, interrupted run of this same job
            checkpointed (``<server workspace>/checkpoints/<job name>/``, the sites' likewise), e.g. after a
            server restart.

    Raises:
        DeployError: the submission was refused (e.g. the identity may not submit), the job did not end
            ``FINISHED:COMPLETED`` (with the controller's reason when it wrote one), or timed out.
    """

    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S-%f")
    job_dir = export_job(spec, Path(job_root) / f"{spec.name}-{stamp}", min_sites=min_sites, resume=resume)
    try:
        job_id = session.submit_job(str(job_dir))
    except Exception as exc:  # NVFlare raises its own exception types with the server's reason
        raise DeployError(f"submission of job '{spec.name}' refused: {exc}") from exc
    follow = Path(server_workspace) / job_id / PROGRESS_FILE if server_workspace else None
    status, seen = "SUBMITTED", 0
    deadline = time.monotonic() + timeout
    with tqdm(total=spec.training.rounds, desc=f"{spec.name} ({job_id[:8]})", unit="round",
              disable=not progress) as bar:  # fmt: skip
        while not status.startswith("FINISHED"):
            if time.monotonic() > deadline:
                session.abort_job(job_id)
                raise DeployError(f"job {job_id} ('{spec.name}') still {status} after {timeout:.0f} s; aborted it")
            time.sleep(1.0)
            status = session.get_job_meta(job_id).get("status", status)
            seen = tick(bar, follow, seen)
            if not seen:  # until the first round is done, NVFlare's status is all there is to show
                bar.set_postfix_str(status.lower())
    run_dir = Path(run_dir).resolve()
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    downloaded = None
    try:
        downloaded = Path(session.download_job_result(job_id, destination=str(run_dir)))
    except Exception as exc:  # a job that never ran has nothing to download
        if status == COMPLETED:
            raise DeployError(f"job {job_id} completed but its result could not be downloaded: {exc}") from exc
    found = _find(downloaded, RESULTS_FILE)
    if status != COMPLETED or found is None:
        failure = _find(downloaded, FAILURE_FILE)
        reason = json.loads(failure.read_text())["error"] if failure else "no reason written by the controller"
        raise DeployError(f"job {job_id} ('{spec.name}') ended {status}: {reason} (downloaded logs: {run_dir})")
    results = {**json.loads(found.read_text()), "job_id": job_id}  # the id the ledgers and audit logs name
    (run_dir / RESULTS_FILE).write_text(json.dumps(results, indent=2) + "\n")
    return results


def _find(folder: Path | None, name: str) -> Path | None:
    hits = sorted(folder.rglob(name)) if folder is not None and folder.is_dir() else []
    return hits[0] if hits else None
