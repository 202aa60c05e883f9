"""RoundController: the NVFlare ``ModelController`` that hosts an algorithm's server half.

First every site is sent ``join``: it loads its data, checks its ledger against the server's record and
admits or refuses the job; the sites that join are the job's participants, announced unchanged with every
round (participant sets that change between rounds could be set against each other). For each round it sends
the current payload to every participant with the ``train`` task; the job's **privacy pipeline**
(:mod:`medsilo.secure.pipeline`, server half) checks and records each site's signed upload and turns the round
into the next payload — a plaintext update by the algorithm's server half, an encrypted sum, or an update
from an aggregate one site released. The controller records timings, payload bytes and the metrics the sites
report; it never handles a ciphertext itself. After the last round a final ``evaluate`` task scores the
last payload, and an ``export`` task tells every site which round was selected, so that each site keeps
that round's model in its own workspace (:mod:`medsilo.components.export`; each train and evaluate task
carries the best round so far, ``best_round``, so a site keeps at most two candidates). It then writes, into its run folder (which
``nvflare job download`` and the simulator workspace both expose):

* ``progress.jsonl`` — one line per round as it completes (read by ``medsilo sim`` for its display);
* ``results.json`` — DESIGN §12, written only when every round completed at every site;
* ``failure.json`` — instead of ``results.json`` when the job stopped: the sites' own reasons;
* ``tb/`` — TensorBoard event files, one point per completed round (per-site and mean figures, bytes, seconds).

After each completed round it checkpoints its state (:mod:`medsilo.components.checkpoint`); a job
exported with ``resume`` continues from the last checkpointed round of an interrupted run.

Every payload it sends (global model, prototypes, encrypted sums, release requests) first gets a
``release`` entry in the server's privacy ledger: tensor names, shapes, bytes, SHA-256, encrypted or not, the
task and the receiving sites — never values; every upload it accepts gets a ``received`` entry with the
site's signed statement (its ledger head), against which site ledgers are audited.

A site that answers with an error (policy refusal, missing dataset, unreadable data …) or does not
answer at all stops the job: nothing is written as if it were complete — unless the job sets
``reliability.min_sites``: then the round completes with the sites that answered (at least that many),
the failed site is recorded (``failures`` in ``results.json``, a line in the report) and asked again
next round; its metrics for rounds it could not evaluate are left out, never filled in. A site that
declines the job at ``join`` (exhausted privacy budget), or does not answer it under ``min_sites``, is not a
participant; the job goes on when ``privacy.min_contributors`` sites joined.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from nvflare.apis.fl_constant import FLContextKey
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.workflows.model_controller import ModelController

from medsilo.components import checkpoint
from medsilo.components.algorithms import algorithm_module
from medsilo.components.results import RunRecorder, TensorBoardLog
from medsilo.components.wire import (
    TASK_EVALUATE,
    TASK_EXPORT,
    TASK_JOIN,
    TASK_RELEASE,
    TASK_TRAIN,
    job_identity,
    payload_bytes,
)
from medsilo.config import JobSpec, augment
from medsilo.config.job import decode_job, spec_digest
from medsilo.config.loading import validate
from medsilo.errors import MedsiloError
from medsilo.fs import write_atomic
from medsilo.secure.keys import SERVER, Party
from medsilo.secure.pipeline import pipeline_module
from medsilo.secure.pipeline.base import JobTerms, RoundSkipped

RESULTS_FILE, PROGRESS_FILE, FAILURE_FILE = "results.json", "progress.jsonl", "failure.json"
TENSORBOARD_DIR = "tb"


class JobStopped(Exception):
    """The round loop cannot continue; the message says which sites failed and why."""


class RoundController(ModelController):
    """Runs the job's rounds.

    Args:
        job: the job spec, encoded (:func:`medsilo.config.job.encode_job`); decoded and validated when the job runs.
        task_timeout: seconds to wait for each site per task (0 = no limit).
        resume: continue from the last round checkpointed by an interrupted run of this same job
            (:mod:`medsilo.components.checkpoint`); without a checkpoint the job starts at round 1.
    """

    def __init__(self, job: str, task_timeout: int = 0, resume: bool = False):
        super().__init__(persistor_id="", ignore_result_error=True, task_check_period=0.1)
        self.job = job  # attribute names must equal argument names for NVFlare's job export
        self.task_timeout = task_timeout
        self.resume = resume
        # NVFlare expands {$ENV} in job-config strings: the spec is encoded, the other arguments type-checked,
        # no message repeats their values, and a bad one stops the job when it runs (an error raised here would
        # be repeated, argument and all, by NVFlare's own build error)
        self._job, self._job_error = {}, None
        try:
            if isinstance(task_timeout, bool) or not isinstance(task_timeout, int) or task_timeout < 0:
                raise MedsiloError(f"task_timeout: must be an integer ≥ 0 (got a {type(task_timeout).__name__})")
            if not isinstance(resume, bool):
                raise MedsiloError(f"resume: must be true or false (got a {type(resume).__name__})")
            self._job = decode_job(job)
        except MedsiloError as exc:
            self._job_error = str(exc)
        self._min_sites: int | None = None
        self._failures: list[dict[str, Any]] = []
        self._pipeline = None

    def run(self) -> None:
        run_dir = Path(os.path.dirname(self.fl_ctx.get_prop(FLContextKey.APP_ROOT)))
        try:
            if self._job_error:
                raise JobStopped(f"server: {self._job_error}")
            spec = validate(self._job, JobSpec, f"job '{self._job.get('name', '?')}'")
            self._min_sites = spec.reliability.min_sites
            self.task_timeout = spec.reliability.task_timeout or self.task_timeout
            sites = sorted(self.sample_clients())
            algo = algorithm_module(spec.algorithm.name)
            job_id = job_identity(self.fl_ctx)
            digest = spec_digest(self._job)
            terms = JobTerms.of(job_id, spec, releases=algo.Server.needs_plaintext_aggregate, digest=digest)
            self._pipeline = pipeline_module(spec.privacy.mode).Server(Party(SERVER, self._workspace_root()), terms)
            saved = checkpoint.checkpoint_dir(self._workspace_root(), spec.name, digest)
            payload: dict[str, np.ndarray] = {}
            rounds, first = spec.training.rounds, 1
            state = checkpoint.load_server(saved, spec_digest=digest) if self.resume else None
            resume_from = {"job": state.job_id, "round": state.round} if state is not None else None
            # join: every site loads its data, checks its ledger, admits or refuses the job; the sites that
            # join are the job's participants, one set for every round (sets that differ between rounds could
            # be set against each other)
            joined = self._ask(TASK_JOIN, {}, 0, rounds, state.sites if state else sites, refusable=True,
                               tolerant=True, resume_from=resume_from, first=True)  # fmt: skip
            refused = {s: m.meta["error"] for s, m in joined.items() if m.meta.get("refused")}
            sites = self._without_refused(sorted(joined), refused, spec)
            if state is not None:
                if sites != state.sites:
                    raise JobStopped(f"a resumed job needs the sites of the interrupted one ({', '.join(state.sites)}); "
                                     f"joined: {', '.join(sites) or 'none'}")  # fmt: skip
                payload, self._failures, first = state.payload, state.failures, state.round + 1
                recorder = state.recorder
                recorder.job_id = job_id
                server = algo.Server(spec.algorithm.config(), len(spec.classes), sites)
                state.restore_server(server)
                self.info(f"job {spec.name}: resuming after round {state.round} of job {state.job_id} from {saved}")
            else:
                server = algo.Server(spec.algorithm.config(), len(spec.classes), sites)
                recorder = RunRecorder(job=spec.name, algorithm=spec.algorithm.name,
                                       privacy={"mode": spec.privacy.mode}, sites=sites,
                                       models={s: spec.backbone_for(s) for s in sites}, algorithm_form=server.form,
                                       refused=refused, job_id=job_id,
                                       select_on=spec.evaluation.select_on)  # fmt: skip
                self.info(f"job {spec.name}: {spec.algorithm.name} on {len(sites)} sites for {rounds} rounds")
            board = TensorBoardLog(run_dir / TENSORBOARD_DIR)
            for rnd in range(first, rounds + 1):
                t0 = time.perf_counter()
                replies = self._ask(TASK_TRAIN, payload, rnd, rounds, sites, tolerant=True,
                                    extra={"best_round": self._best(recorder)})  # fmt: skip
                self._record_evaluations(recorder, rnd - 1, replies)
                for site, m in replies.items():
                    if m.meta.get("privacy_spent"):
                        recorder.set_spent(site, **m.meta["privacy_spent"])
                    if m.meta.get("synthetic"):
                        recorder.synthetic[site] = dict(m.meta["synthetic"])
                uploads = {s: m.params or {} for s, m in replies.items()}
                bytes_up = sum(payload_bytes(u) for u in uploads.values())
                bytes_down = payload_bytes(payload) * len(sites)
                payload = self._next_payload(server, payload, uploads, rnd, rounds, sites)
                bytes_up += self._pipeline.release_bytes  # an aggregate release's round trip counts as traffic
                recorder.add_training(rnd, seconds=time.perf_counter() - t0, bytes_up=bytes_up, bytes_down=bytes_down,
                                      train_loss={s: float(m.meta["train_loss"]) for s, m in replies.items()})  # fmt: skip
                checkpoint.save_server(saved, round=rnd, job_id=job_id, spec_digest=digest, payload=payload,
                                       server=server, recorder=recorder, sites=sites, failures=self._failures)  # fmt: skip
                if rnd > 1:
                    self._progress(run_dir, recorder.progress(rnd - 1))
                    board.add_round(recorder.round_summary(rnd - 1))
            replies = self._ask(TASK_EVALUATE, payload, rounds + 1, rounds, sites, tolerant=True,
                                extra={"best_round": self._best(recorder)})  # fmt: skip
            self._record_evaluations(recorder, rounds, replies)
            self._progress(run_dir, recorder.progress(rounds))
            board.add_round(recorder.round_summary(rounds))
            board.close()
            recorder.set_failures(self._failures)
            exports = self._export(recorder.selected_round(), rounds, sites)
            results = {**recorder.results(), "exports": exports, "augmentation": {
                "choice": spec.training.augmentation if isinstance(spec.training.augmentation, str) else "list",
                "steps": augment.describe(spec.augmentation_steps)}}  # fmt: skip
            self._write(run_dir / RESULTS_FILE, results)
            self.info(f"job {spec.name}: done; selected round {results['selected_round']}, "
                      f"mean test accuracy {results['final']['mean_acc']:.3f}")  # fmt: skip
        except JobStopped as exc:
            self._write(run_dir / FAILURE_FILE, {"error": str(exc)})
            self.error(f"job stopped: {exc}")
            self.panic(str(exc))
        except Exception as exc:  # noqa: BLE001 - any other failure is reported, then re-raised to NVFlare
            self._write(run_dir / FAILURE_FILE, {"error": f"server: {type(exc).__name__}: {exc}"})
            raise

    def _next_payload(self, server, payload: dict[str, np.ndarray], uploads: dict[str, dict[str, np.ndarray]],
                      rnd: int, rounds: int, announced: list[str]) -> dict[str, np.ndarray]:  # fmt: skip
        """The payload for round ``rnd + 1``: what the privacy pipeline's server half makes of the round's
        uploads from the ``announced`` participants (a plaintext update, an encrypted sum, or an update from a
        released aggregate). A round whose aggregate cannot be released (a participant did not answer or
        declined the job) keeps the current payload."""
        def ask_release(site: str, request: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            reply = self._ask(TASK_RELEASE, request, rnd, rounds, [site])[site]
            self.info(f"round {rnd}: {site} released the aggregate of {len(request)} signed contributions")
            return reply.params or {}

        try:
            return self._pipeline.combine(rnd, announced, uploads, server, ask_release)
        except RoundSkipped as exc:
            self.warning(str(exc))
            return payload
        except MedsiloError as exc:
            raise JobStopped(f"server: round {rnd}: {exc}") from exc

    def _best(self, recorder) -> int | None:
        """The best round so far (the round :meth:`RunRecorder.selected_round` would report now, on the job's
        ``evaluation.select_on``), or ``None``. The failures so far count first: a round whose evaluation a failed
        site never sent is complete without it, so the sites keep the very candidate the server later selects."""
        recorder.set_failures(self._failures)
        return recorder.selected_round() if recorder.complete_rounds() else None

    def _export(self, selected: int, rounds: int, sites: list[str]) -> dict[str, dict[str, Any]]:
        """Ask every site to keep its model of the ``selected`` round (the job's product, written at the site);
        returns site → ``{"round", "sha256"}`` or ``{"error"}``. A site that cannot export does not undo the
        job: its reason is reported in ``results.json`` ``exports``."""
        data = FLModel(params={}, params_type=ParamsType.FULL, current_round=rounds, total_rounds=rounds,
                       meta={"round": rounds + 1, "selected_round": selected})  # fmt: skip
        results = self.send_model_and_wait(task_name=TASK_EXPORT, data=data, targets=sites, timeout=self.task_timeout)
        replies = {m.meta.get("client_name"): m.meta for m in results}
        out = {}
        for site in sites:
            meta = replies.get(site) or {"error": f"site {site}: no answer to task 'export'"}
            if isinstance(meta.get("export"), dict):
                out[site] = {"round": int(meta["export"]["round"]), "sha256": str(meta["export"]["sha256"])[:64]}
            else:
                out[site] = {"error": str(meta.get("error", "no model"))[:600]}
                self.warning(f"{site} kept no model: {out[site]['error']}")
        return out

    def _without_refused(self, sites: list[str], refused: dict[str, str], spec) -> list[str]:
        """The sites that go on after some refused the job at ``join`` (e.g. an exhausted privacy budget).

        Nothing from a refusing site reached the server. The job continues when at least
        ``privacy.min_contributors`` sites remain, else it stops with every site's reason.
        """
        if not refused:
            return sites
        remaining = [s for s in sites if s not in refused]
        if len(remaining) < spec.privacy.min_contributors:
            raise JobStopped("; ".join(refused.values()) + f"; only {len(remaining)} site(s) remain, the job needs "
                             f"privacy.min_contributors = {spec.privacy.min_contributors}")  # fmt: skip
        for reason in refused.values():
            self.warning(f"continuing without a site: {reason}")
        return remaining

    def _workspace_root(self) -> str:
        ws = self.fl_ctx.get_prop(FLContextKey.WORKSPACE_OBJECT)
        return ws.get_root_dir() if ws is not None else "."

    def _ask(self, task: str, payload: dict[str, np.ndarray], rnd: int, rounds: int, sites: list[str],
             refusable: bool = False, tolerant: bool = False, resume_from: dict | None = None,
             first: bool = False, extra: dict[str, Any] | None = None) -> dict[str, FLModel]:  # fmt: skip
        """Send ``task`` to every site; return site → reply, or stop the job naming the failing sites.

        The task's metadata carries the round and the job's participant set (which every upload's signature
        names); the job's first task (``join``) carries each site's ledger anchor. With ``refusable``,
        replies marked ``refused`` (the site declined the whole job before anything left it) are returned for
        the caller to drop. With ``tolerant`` and the job's ``reliability.min_sites`` set, sites that answered
        with an error or not at all (died, timed out) are recorded as failed for this task and left out, as
        long as ``min_sites`` answered; otherwise any failure stops the job (the uploads that did arrive are
        recorded in the server's ledger first). ``resume_from`` (the ``join`` of a resumed job:
        ``{"job": id, "round": r}``) tells the sites which checkpoint to restore.
        """
        try:
            meta = {"round": rnd} | (self._pipeline.announce(rnd, sites, first) if task != TASK_RELEASE else {})
            if payload:  # ledgered before it is sent: nothing leaves that the server's ledger would not show
                self._pipeline.record_send(task, payload, rnd, sites)
        except MedsiloError as exc:
            raise JobStopped(f"server: cannot use its privacy ledger: {exc}") from exc
        if resume_from is not None:
            meta["resume_from"] = resume_from
        meta |= extra or {}
        data = FLModel(params=payload, params_type=ParamsType.FULL, current_round=max(rnd - 1, 0), total_rounds=rounds,
                       meta=meta)  # fmt: skip
        results = self.send_model_and_wait(task_name=task, data=data, targets=sites, timeout=self.task_timeout)
        replies = {m.meta.get("client_name"): m for m in results}
        errors = [m.meta["error"] for m in replies.values()
                  if m.meta.get("error") and not (refusable and m.meta.get("refused"))]  # fmt: skip
        missing = [s for s in sites if s not in replies]
        if errors or missing:
            reasons = errors + [f"site {s}: no result for task '{task}' within the task timeout or at all (see "
                                f"that site's log)" for s in missing]  # fmt: skip
            failed = {s: m.meta["error"] for s, m in replies.items()
                      if m.meta.get("error") and not (refusable and m.meta.get("refused"))}  # fmt: skip
            failed |= {s: r for s, r in zip(missing, reasons[len(errors):])}
            answered = {s: m for s, m in replies.items() if s in sites and s not in failed}
            working = [s for s, m in answered.items() if not m.meta.get("refused")]
            if not (tolerant and self._min_sites is not None) or len(working) < self._min_sites:
                if task == TASK_TRAIN:  # what the others sent is anchored in the server's ledger all the same
                    self._pipeline.record(rnd, sites, {s: m.params or {} for s, m in answered.items()})
                short = "" if not (tolerant and self._min_sites is not None) else (
                    f"; only {len(working)} site(s) answered task '{task}' of round {rnd}, the job needs "
                    f"reliability.min_sites = {self._min_sites}")  # fmt: skip
                raise JobStopped("; ".join(reasons) + short)
            for site, reason in failed.items():
                self.warning(f"round {rnd}: continuing without {site} for task '{task}': {reason}")
                self._failures.append({"site": site, "round": rnd, "task": task, "reason": reason})
            return answered
        return replies

    @staticmethod
    def _record_evaluations(recorder, rnd: int, replies: dict[str, FLModel]) -> None:
        if rnd < 1:
            return
        for site, m in replies.items():
            ev = m.meta.get("eval")
            if ev is None:
                raise JobStopped(f"site {site}: sent no evaluation for round {rnd}")
            recorder.add_evaluation(rnd, site, ev["val"], ev["test"])

    @staticmethod
    def _progress(run_dir: Path, line: dict[str, Any]) -> None:
        with (run_dir / PROGRESS_FILE).open("a") as fh:
            fh.write(json.dumps(line) + "\n")

    @staticmethod
    def _write(path: Path, data: dict[str, Any]) -> None:
        write_atomic(path, json.dumps(data, indent=2) + "\n")
