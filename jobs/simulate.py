"""Run a job spec in the NVFlare simulator on ``sites.yml`` hospitals: what ``medsilo sim`` does.

The job is exported exactly as for a real deployment (:mod:`.builder`), then run in NVFlare's simulator in a
child process (:mod:`.simworkers`: the site workers are forked from one process that imported torch, MONAI and
NVFlare once), whose sites read their data through the ``sites.yml`` named
by ``MEDSILO_SITES_FILE``. The simulator workspace gets a ``local/resources.json`` whose class
allow-list names exactly the classes a provisioned site and server admit (the controller, the executor and the
sites' privacy-scope filter). Every run gets a fresh run id (``MEDSILO_RUN_ID``) that stands in for the job id in
ledgers, signatures and checkpoints: NVFlare's simulator names every job ``simulate_job``. The parent process
follows the round controller's ``progress.jsonl`` for a progress display and, at the end, copies
``results.json`` into the run folder.

Run folder layout::

    RUN_DIR/results.json        # DESIGN §12 (only when the job completed)
    RUN_DIR/job/<name>/         # the exported NVFlare job
    RUN_DIR/workspace/          # simulator workspace: server/ and one folder per site, with logs
    RUN_DIR/simulator.log       # the simulator's console output
    RUN_DIR/he_keys/            # encrypted modes: this run's CKKS contexts (medsilo.secure.keys)
    RUN_DIR/checkpoints/        # the server's state after each round, each site's after each train task

``resume=True`` (``medsilo sim --resume``) continues an interrupted run in the same RUN_DIR from its last
checkpointed round (:mod:`medsilo.components.checkpoint`), with the same CKKS keys.

Each site's privacy ledger lives in ``ledgers/<site>/privacy_ledger.jsonl`` beside ``sites.yml`` (with
the local PKI in ``ledgers/pki/``), so budgets span runs: ``medsilo audit verify ledgers/ --root-ca
ledgers/pki/rootCA.pem`` checks them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

from tqdm import tqdm

from medsilo.components.checkpoint import CHECKPOINT_DIR_ENV, SERVER_FILE
from medsilo.components.controller import FAILURE_FILE, PROGRESS_FILE, RESULTS_FILE, TENSORBOARD_DIR
from medsilo.components.executor import RUN_ID_ENV, SITES_FILE_ENV, THREADS_ENV
from medsilo.components.export import MODELS_DIR_ENV
from medsilo.config import JobSpec, SitesFile, load_sites_file
from medsilo.config.common import SERVER_COMPONENTS, SITE_COMPONENTS
from medsilo.errors import MedsiloError
from medsilo.jobs.builder import export_job
from medsilo.secure.keys import (
    HE_DIR_ENV,
    LEDGER_DIR_ENV,
    ensure_simulation_pki,
    generate_simulation_contexts,
)
from medsilo.secure.pipeline import pipeline_module
from medsilo.secure.policy import check_job

RUN_MARKER = "medsilo-run.json"
"""Written into a run folder; only folders carrying it are ever replaced."""


def preflight(spec: JobSpec, sites: SitesFile) -> list[str]:
    """Check, before anything starts, that every site can run ``spec``; returns the site names.

    Raises:
        MedsiloError: a site lacks the dataset, has another modality, refuses the algorithm, or the
            job's model map names no backbone for a site (or names a site that does not exist).
    """
    names = list(sites.sites)
    for config in sites.site_configs().values():
        check_job(config, spec)
    check_model_map(spec, names)
    return names


def check_model_map(spec: JobSpec, names: list[str]) -> None:
    """A heterogeneous job's site → backbone map must name exactly the network's sites ``names``."""
    if spec.heterogeneous:
        missing = [s for s in names if s not in spec.model]
        unknown = [s for s in spec.model if s not in names]
        if missing or unknown:
            raise MedsiloError(
                f"job '{spec.name}': model: the site → backbone map must cover exactly the sites "
                f"{', '.join(names)}; missing {missing or 'none'}, unknown {unknown or 'none'}"
            )


def _prepare_run_dir(run_dir: Path) -> None:
    if run_dir.exists() and any(run_dir.iterdir()):
        if not (run_dir / RUN_MARKER).is_file():
            raise MedsiloError(f"{run_dir}: folder is not empty and is not a medsilo run folder; choose another --out")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)


def _allow_list(workspace: Path) -> None:
    """The simulator's ``local/resources.json``: one file for server and sites, so the union of both lists."""
    local = workspace / "local"
    local.mkdir(parents=True, exist_ok=True)
    resources = {"format_version": 2, "class_allow_list": [*SERVER_COMPONENTS, *SITE_COMPONENTS],
                 "class_list_enforcement_mode": "enforce"}  # fmt: skip
    (local / "resources.json").write_text(json.dumps(resources, indent=2) + "\n")


def run_simulation(
    spec: JobSpec,
    sites_file: str | Path,
    run_dir: str | Path,
    *,
    progress: bool = True,
    label: str | None = None,
    resume: bool = False,
    workers: str = "fork",
    position: int | None = None,
) -> dict[str, Any]:
    """Run ``spec`` on the hospitals of ``sites_file``; returns the parsed ``results.json``.

    Args:
        spec: the validated job spec (its ``training.rounds`` already final).
        sites_file: the ``sites.yml`` standing in for each site's config.
        run_dir: run folder (created; a previous medsilo run folder is replaced).
        progress: show a per-round progress bar on stderr.
        label: name shown on the progress bar (default: the job name).
        resume: continue the interrupted run in ``run_dir`` from its last completed round.
        position: line of the progress bar (jobs run side by side each keep their own line).
        workers: ``fork`` starts the site workers from one pre-imported process, ``fresh`` as new interpreters
            (NVFlare's own way; :mod:`.simworkers`).

    Raises:
        MedsiloError: a preflight refusal, nothing to resume, or the job stopped — with the sites' reasons.
    """
    sites_file = Path(sites_file).resolve()
    sites = load_sites_file(sites_file)
    names = preflight(spec, sites)
    run_dir = Path(run_dir).resolve()
    if resume:
        _prepare_resume(run_dir, spec)
    else:
        _prepare_run_dir(run_dir)
    run_id = f"sim-{uuid.uuid4().hex[:16]}"
    (run_dir / RUN_MARKER).write_text(json.dumps({"job": spec.name, "sites_file": str(sites_file),
                                                  "run_id": run_id}) + "\n")  # fmt: skip
    job_dir = export_job(spec, run_dir / "job", min_sites=len(names), resume=resume)
    workspace = run_dir / "workspace"
    _allow_list(workspace)

    cores = os.cpu_count() or 1
    env = {
        **os.environ,
        SITES_FILE_ENV: str(sites_file),
        THREADS_ENV: str(max(1, cores // len(names))),
        "PYTHONUNBUFFERED": "1",
        "MALLOC_ARENA_MAX": os.environ.get("MALLOC_ARENA_MAX", "2"),  # as NVFlare's sub_start.sh recommends for sites
        CHECKPOINT_DIR_ENV: str(run_dir / "checkpoints"),
        MODELS_DIR_ENV: str(run_dir / "models"),
        RUN_ID_ENV: run_id,
    }
    # each party's privacy ledger persists beside sites.yml (a site's workspace outlives its jobs), signed
    # with a certificate from a local root CA made once there (medsilo.secure.keys)
    ledgers = sites_file.parent / "ledgers"
    made = not ledgers.is_dir()
    ensure_simulation_pki(ledgers, names)
    env[LEDGER_DIR_ENV] = str(ledgers)
    where = [f"privacy ledgers and the simulation's signing keys {'made in' if made else 'kept in'} {ledgers} "
             f"(budgets span runs; delete the folder to start them over)"]  # fmt: skip
    if pipeline_module(spec.privacy.mode).Site.encrypted:  # NVFlare's HE recipe refuses the simulator; not ours
        keys = run_dir / "he_keys"
        if not (resume and keys.is_dir()):  # a resumed job's checkpointed payload is encrypted under these keys
            generate_simulation_contexts(keys, names, spec.privacy.poly_modulus_degree)
        env[HE_DIR_ENV] = str(keys)
        where.append(f"CKKS keys of this run in {keys}")
    print(f"{label or spec.name}: " + "; ".join(where), file=sys.stderr, flush=True)
    cmd = [sys.executable, "-m", "medsilo.jobs.simworkers", "--workers", workers, str(job_dir), "-w", str(workspace),
           "-c", ",".join(names), "-t", str(len(names))]  # fmt: skip
    server_dir = workspace / "server" / "simulate_job"
    log_path = run_dir / "simulator.log"
    tmp = _short_tmpdir()
    env["TMPDIR"] = str(tmp)  # job zips, log copies and the simulator's AF_UNIX sockets live here
    try:
        with log_path.open("w") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=run_dir)
            try:
                _follow(proc, server_dir / PROGRESS_FILE, spec, label or spec.name, progress, position,
                        error_log=workspace / "server" / "error_log.txt")  # fmt: skip
            finally:
                if proc.poll() is None:
                    proc.terminate()
                    proc.wait(timeout=30)
    finally:  # also on Ctrl-C or a failure to start
        shutil.rmtree(tmp, ignore_errors=True)

    if (server_dir / TENSORBOARD_DIR).is_dir():  # `tensorboard --logdir RUN_DIR/tb`
        shutil.copytree(server_dir / TENSORBOARD_DIR, run_dir / TENSORBOARD_DIR, dirs_exist_ok=True)
    results_path = server_dir / RESULTS_FILE
    if results_path.is_file():
        shutil.copyfile(results_path, run_dir / RESULTS_FILE)
        return json.loads(results_path.read_text())
    failure = server_dir / FAILURE_FILE
    if failure.is_file():
        dead = _unstarted_workers(workspace / "server" / "error_log.txt")
        why = f"; NVFlare's simulator could not start {len(dead)} site worker(s): {dead[0]}" if dead else ""
        raise MedsiloError(f"job '{spec.name}' stopped: {json.loads(failure.read_text())['error']}{why} "
                           f"(logs: {workspace})")  # fmt: skip
    raise MedsiloError(
        f"job '{spec.name}' ended without results (simulator exit code {proc.returncode}); "
        f"last lines of {log_path}: {_tail(log_path)}"
    )


def _prepare_resume(run_dir: Path, spec: JobSpec) -> None:
    """Keep an interrupted run's checkpoints and keys; clear what the new simulator run writes again."""
    if not (run_dir / RUN_MARKER).is_file() or not (run_dir / "checkpoints" / SERVER_FILE).is_file():
        raise MedsiloError(f"{run_dir}: nothing to resume (no medsilo run with a completed round here); "
                           "run without --resume")  # fmt: skip
    if spec.augmentation.pcevolve is not None:
        raise MedsiloError(f"job '{spec.name}': resume is not supported with augmentation.pcevolve (the sites "
                           "would synthesize and spend privacy budget again); run it afresh")  # fmt: skip
    for stale in ("job", "workspace"):
        shutil.rmtree(run_dir / stale, ignore_errors=True)
    for stale in (RESULTS_FILE, "simulator.log"):
        (run_dir / stale).unlink(missing_ok=True)


def _short_tmpdir() -> Path:
    """A fresh, short temporary folder for the simulator's TMPDIR.

    The simulator binds AF_UNIX sockets under TMPDIR, and Linux caps a socket path at 107 bytes; a
    TMPDIR inside a deep run folder (pytest's tmp_path, a long ``--out``) fails with "AF_UNIX path too
    long". So the folder goes under the system temp root, or under /tmp when that root is itself long.
    """
    root = Path(tempfile.gettempdir())
    if len(str(root)) > 40 and Path("/tmp").is_dir():
        root = Path("/tmp")
    return Path(tempfile.mkdtemp(prefix="medsilo-", dir=root))


WORKER_START_FAILURE = "run_client_thread error"
"""What NVFlare's simulator writes to the server's ``error_log.txt`` when a site's worker process never came up (e.g.
"Failed to create connection to the child process …, timeout: 60.0" on an overloaded machine). That site never
joins the job."""


def _unstarted_workers(error_log: Path) -> list[str]:
    """NVFlare's messages for the site workers its simulator could not start, from the server's ``error_log``."""
    lines = error_log.read_text(errors="replace").splitlines() if error_log.is_file() else []
    return [line.split(" - ERROR - ", 1)[-1].strip() for line in lines if WORKER_START_FAILURE in line]


def _follow(proc: subprocess.Popen, progress_file: Path, spec: JobSpec, label: str, show: bool,
            position: int | None = None, error_log: Path | None = None) -> None:
    """Wait for the simulator, turning each new progress line into a tick of the bar.

    Raises:
        MedsiloError: a site worker never started and the job has no ``reliability.task_timeout``: its server would
            wait for that site's ``join`` forever, so the simulator is stopped (the caller ends it) and nothing is
            reported as a result.
    """
    seen = 0
    with tqdm(total=spec.training.rounds, desc=label, unit="round", disable=not show, leave=True,
              position=position) as bar:
        while True:
            try:
                proc.wait(timeout=0.5)
                done = True
            except subprocess.TimeoutExpired:
                done = False
            seen = tick(bar, progress_file, seen)
            if done:
                return
            # workers start before round 1, so once a round is done there is nothing more to look for
            watch = error_log is not None and not spec.reliability.task_timeout and seen == 0
            dead = _unstarted_workers(error_log) if watch else []
            if dead:
                raise MedsiloError(
                    f"job '{spec.name}' stopped: NVFlare's simulator could not start {len(dead)} site worker(s) "
                    f"({dead[0]}), and with reliability.task_timeout = 0 the server would wait for them forever. "
                    f"This happens on an overloaded machine: run fewer jobs side by side and start it again "
                    f"(logs: {error_log.parent.parent})"
                )


def tick(bar, progress_file: Path | None, seen: int) -> int:
    """Advance ``bar`` by the rounds ``progress_file`` gained since ``seen`` lines; returns the lines seen now.

    A file that is missing or shorter than before (the deployed server removes its job folder when the job
    ends) changes nothing.
    """
    lines = progress_file.read_text().splitlines() if progress_file is not None and progress_file.is_file() else []
    for line in lines[seen:]:
        acc = json.loads(line).get("mean_val_acc")
        bar.set_postfix_str(f"val acc {acc:.3f}" if acc is not None else "")
        bar.update(1)
    return max(seen, len(lines))


def _tail(path: Path, lines: int = 5) -> str:
    text = path.read_text(errors="replace").splitlines() if path.is_file() else []
    return " | ".join(line.strip() for line in text[-lines:])
