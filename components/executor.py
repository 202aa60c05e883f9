"""SiteExecutor: the NVFlare ``Executor`` that runs an algorithm's client half at one hospital.

The job's first task is ``join``. There the site resolves everything from its *own* side — never from the
job — and answers whether it takes part (the server fixes the job's participants from the answers):

1. the site config: ``<site workspace>/local/medsilo_site.yml`` in a deployment, or, in the simulator,
   this site's entry of the ``sites.yml`` named by the ``MEDSILO_SITES_FILE`` environment variable
   (the job folder is the same in both cases and carries no paths);
2. the site policy (:func:`medsilo.secure.policy.check_job`): dataset present, algorithm allowed,
   privacy mode strong enough — otherwise the site refuses;
3. the dataset named by the job, through the site's manifest; unusable files are skipped up to the
   site's limit (:func:`medsilo.medical.data.load_site_data`);
4. the site's model from the zoo (the job's backbone for this site), and the algorithm's client half;
5. the **privacy pipeline** of the job's mode (:mod:`medsilo.secure.pipeline`): the only way anything of this
   site's data leaves. Before anything is read it checks the site's ledger against the server's record and
   ledgers the rules in force; it admits or refuses a DP job against the budget; on every ``train`` task it
   refuses, before training, a round whose upload could not leave (round out of order, another participant
   set, a round uploaded before), then charges, seals, signs and ledgers the upload before it is returned;
   it opens (decrypts) what the server sends and answers ``release`` tasks where the mode has them. The
   executor never sees a ciphertext. Evaluation figures are ledgered before they leave, and a job is
   evaluated once per round and once at the end, never on request.

The job spec arrives as one encoded string (:func:`medsilo.config.job.encode_job`): NVFlare expands
``{$ENV}`` references in job-config strings, which must never reach a spec value.

Each ``train`` task then: applies the server payload, evaluates the model this site deploys on its
val and test splits (these metrics belong to the previous round), trains, and returns the protected upload;
if the upload is refused after training, the client half is put back as it was. The final ``evaluate``
task applies the last payload and evaluates only; the ``export`` task after it writes the model of the round
the server selected into the site's own workspace, with a model card and a ledger entry
(:mod:`medsilo.components.export`; the site keeps the candidates in memory meanwhile, at most two: the
server's best round so far and the round just evaluated). After each upload the site checkpoints its client half
(:mod:`medsilo.components.checkpoint`); the ``join`` of a resumed job names the interrupted job and round
whose checkpoint it restores (recorded in the site's ``policy_loaded`` entry).

A problem the site can name (bad config, missing dataset, policy refusal, too many unreadable files,
diverged training, a refused release) is returned to the server as a result carrying ``error`` in its
metadata and no parameters, so the server can stop the job with the site's reason; nothing is uploaded in
that case. Problems reading the site's data reach the server only as counts and kinds (file names may carry
patient or study names); the full message is in the site's log. Logs carry names, counts and timings only —
never image values or patient identifiers.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from nvflare.apis.executor import Executor
from nvflare.apis.fl_constant import FLContextKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.apis.signal import Signal
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.utils.fl_model_utils import FLModelUtils

import medsilo
from medsilo.components import checkpoint
from medsilo.components.algorithms import algorithm_module
from medsilo.components.algorithms.base import SiteSetup
from medsilo.components.export import (
    MODELS_DIR_ENV,
    Candidates,
    ExportError,
    ExportFacts,
    export_model,
)
from medsilo.components.training import evaluate_splits
from medsilo.components.wire import (  # noqa: F401 - RUN_ID_ENV is part of the site's documented environment
    RUN_ID_ENV,
    TASK_EVALUATE,
    TASK_EXPORT,
    TASK_JOIN,
    TASK_RELEASE,
    TASK_TRAIN,
    job_identity,
    payload_bytes,
)
from medsilo.config import JobSpec, augment, load_site_config, load_sites_file, read_manifest
from medsilo.config.job import decode_job, spec_digest
from medsilo.config.loading import validate
from medsilo.errors import DataError, MedsiloError
from medsilo.medical.data import ImageSet, load_site_data
from medsilo.medical.data.dataset import dataset_manifest
from medsilo.medical.models import build_model
from medsilo.medical.synth.pcevolve.evolve import PCEvolveConfig, charged_evolve
from medsilo.medical.synth.pcevolve.store import write_synthetic
from medsilo.secure.dp import BudgetExceeded
from medsilo.secure.keys import Party
from medsilo.secure.pipeline import pipeline_module
from medsilo.secure.pipeline.base import JobTerms, to_numpy, to_torch
from medsilo.secure.policy import check_job
from medsilo.secure.upload import NAME as JOB_ID, WIRE_PARAM

SITES_FILE_ENV = "MEDSILO_SITES_FILE"
"""Simulator only: path of the ``sites.yml`` standing in for every site's own config."""
THREADS_ENV = "MEDSILO_SITE_THREADS"
"""Simulator only: torch threads per site (several sites share one machine there)."""
SITE_CONFIG = Path("local") / "medsilo_site.yml"
"""A deployed site's config, relative to its workspace."""


def site_seed(job_seed: int, site: str) -> int:
    """A per-site seed derived from the job seed and the site name (stable on every machine)."""
    return job_seed * 1_000_003 + int(hashlib.sha256(site.encode()).hexdigest()[:8], 16) % 1_000_003


@dataclass
class _SiteState:
    client: Any
    data: Any
    batch_size: int
    pipeline: Any
    events: list
    seed: int


class SiteExecutor(Executor):
    """Runs the job's algorithm at this site.

    Args:
        job: the job spec, encoded (:func:`medsilo.config.job.encode_job`); decoded and validated here.
    """

    def __init__(self, job: str):
        super().__init__()
        self.job = job  # attribute name must equal the argument name for NVFlare's job export
        # a bad argument is reported at the first task, not here: NVFlare's own build error would repeat the
        # (environment-expanded) argument in its message
        try:
            self._job, self._job_error = decode_job(job), None
        except MedsiloError as exc:
            self._job, self._job_error = {}, str(exc)
        self._spec = None
        self._state: _SiteState | None = None
        self._config = None
        self._started = False
        self._evaluated = False
        self._exported = False
        self._synthetic: dict | None = None
        self._candidates = Candidates()

    # ---- NVFlare entry point -------------------------------------------------------------------

    def execute(self, task_name: str, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        if task_name not in (TASK_JOIN, TASK_TRAIN, TASK_EVALUATE, TASK_RELEASE, TASK_EXPORT):
            return make_reply(ReturnCode.TASK_UNKNOWN)
        site = fl_ctx.get_identity_name()
        joining = task_name == TASK_JOIN
        try:
            if self._job_error:
                raise MedsiloError(self._job_error)
            incoming = FLModelUtils.from_shareable(shareable)
            meta = incoming.meta or {}
            rnd = meta.get("round", 0)
            if joining:
                return self._join(site, meta, fl_ctx)
            if not self._started:
                raise MedsiloError(f"site {site}: task '{task_name}' before this job's 'join'; the site takes part "
                                   "only in jobs it joined")  # fmt: skip
            state = self._state
            pipeline = state.pipeline
            if task_name == TASK_RELEASE:
                wire = pipeline.release(rnd, incoming.params or {})
                self.log_info(fl_ctx, f"{site}: released round {rnd}'s aggregate")
                return FLModelUtils.to_shareable(FLModel(params={WIRE_PARAM: wire}, params_type=ParamsType.FULL,
                                                         meta={"round": rnd}))  # fmt: skip
            if task_name == TASK_EXPORT:
                return self._export(site, rnd, meta.get("selected_round"), state, fl_ctx)
            if task_name == TASK_EVALUATE:
                if self._evaluated or rnd != self._spec.training.rounds + 1:
                    raise MedsiloError(f"site {site}: a job is evaluated once, after its last round; this request "
                                       "is refused")  # fmt: skip
                self._evaluated = True
            else:  # refused before training when the upload could not leave: nothing is trained, nothing charged
                pipeline.precheck(rnd, meta.get("participants"))
            best = meta.get("best_round")  # which kept candidate may still be selected (checked before anything)
            if best is not None and (isinstance(best, bool) or not isinstance(best, int) or not 1 <= best < rnd - 1):
                raise MedsiloError(f"site {site}: the server's best round must be an earlier round; refused")
            t0 = time.perf_counter()
            payload = pipeline.open(rnd, incoming.params or {}, meta)
            state.client.receive(to_torch(payload) or None, rnd)
            out: dict[str, Any] = {"round": rnd}
            if task_name == TASK_EVALUATE or rnd > 1:
                out["eval"] = self._evaluate(state)
                # the model just scored is the round's candidate for export (with the server's best so far)
                self._candidates.keep(rnd - 1, state.client, out["eval"], best)
            if abort_signal.triggered:
                return make_reply(ReturnCode.TASK_ABORTED)
            params: dict[str, Any] = {}
            figures = dict(out.get("eval", {}))
            if task_name == TASK_TRAIN:
                params, spent, loss = self._train(site, rnd, meta.get("participants"), state, fl_ctx)
                # the training loss is a statistic of the training images no DP mechanism covers: DP modes keep it
                out["train_loss"] = math.nan if pipeline.noised else loss
                if not pipeline.noised:
                    figures["train"] = {"loss": loss}
                if spent is not None:
                    out["privacy_spent"] = spent
                if self._synthetic:
                    out["synthetic"] = self._synthetic
            if figures:  # the figures leave with this reply: ledgered first
                pipeline.record_metrics(rnd, task_name, figures)
            out["seconds"] = round(time.perf_counter() - t0, 3)
            self.log_info(fl_ctx, f"{site}: {task_name} round {rnd} done in {out['seconds']} s, "
                                  f"upload {payload_bytes(params)} bytes")  # fmt: skip
            return FLModelUtils.to_shareable(FLModel(params=params, params_type=ParamsType.FULL, meta=out))
        except (MedsiloError, FloatingPointError) as exc:
            text = str(exc)
            self.log_error(fl_ctx, text if text.startswith(f"site {site}") else f"site {site}: {text}")
            meta = {"error": self._reason_for_server(site, exc)}
            if isinstance(exc, BudgetExceeded) and joining:
                meta["refused"] = True  # declined before anything left: the job may go on without this site
            return FLModelUtils.to_shareable(FLModel(params={}, params_type=ParamsType.FULL, meta=meta))

    def _export(self, site: str, rnd: Any, selected: Any, state: _SiteState, fl_ctx: FLContext) -> Shareable:
        """The job's last task: write the model of the ``selected`` round into this site's workspace
        (:mod:`medsilo.components.export`); the reply holds the round and the model's digest, no path."""
        spec = self._spec
        rounds = spec.training.rounds
        if self._exported or not self._evaluated or rnd != rounds + 1:
            raise MedsiloError(f"site {site}: a job's model is exported once, after its evaluation; refused")
        if isinstance(selected, bool) or not isinstance(selected, int) or not 1 <= selected <= rounds:
            raise MedsiloError(f"site {site}: the export must name a round within 1…{rounds}; refused")
        self._exported = True
        try:
            self._candidates.restore(selected, state.client)
        except ExportError as exc:
            raise MedsiloError(f"site {site}: {exc}") from exc
        job = job_identity(fl_ctx)
        cost = state.pipeline.model_privacy()  # a resumed job's model was also trained by the interrupted job
        facts = ExportFacts(site=site, job_id=job, spec_digest=spec_digest(self._job), job_name=spec.name,
                            algorithm=spec.algorithm.name, modality=spec.modality, classes=tuple(spec.classes),
                            task=spec.task,
                            image_size=spec.image_size, round=selected, privacy_mode=spec.privacy.mode,
                            epsilon=cost["epsilon"], delta=cost["delta"], trained_by=tuple(cost["jobs"]),
                            augmentation=augment.describe(state.data.augmentation), medsilo_version=medsilo.__version__)
        models = os.environ.get(MODELS_DIR_ENV)
        folder = Path(models) / site if models else \
            Path(fl_ctx.get_prop(FLContextKey.WORKSPACE_ROOT) or ".") / "models" / job  # fmt: skip
        folder.parent.mkdir(parents=True, exist_ok=True)
        try:
            done = export_model(folder, state.client, state.data, facts,
                                lambda what: state.pipeline.record_export(rnd, what))  # fmt: skip
        except ExportError as exc:
            raise MedsiloError(f"site {site}: {exc}") from exc
        self.log_info(fl_ctx, f"{site}: exported the model of round {selected} to {folder}")
        reply = {"round": rnd, "export": {"round": selected, "sha256": done["sha256"]}}
        return FLModelUtils.to_shareable(FLModel(params={}, params_type=ParamsType.FULL, meta=reply))

    def _join(self, site: str, meta: dict[str, Any], fl_ctx: FLContext) -> Shareable:
        """The job's first task: load everything, check the ledger against the server's record, ledger the
        rules in force (and the checkpoint a resumed job restores), admit or refuse the job."""
        if self._started:
            raise MedsiloError(f"site {site}: this job was joined already")
        resume = meta.get("resume_from")
        if resume is not None:
            self._check_resume(site, resume, fl_ctx)
        state = self._prepare(site, fl_ctx, (meta.get("anchors") or {}).get(site), resume)
        if resume is not None:  # an interrupted job goes on where it stopped
            checkpoint.load_site(self._checkpoints(fl_ctx), site, resume["round"], state.client, job_id=resume["job"],
                                 spec_digest=spec_digest(self._job))  # fmt: skip
        # a DP job that cannot fit the site's budget is refused here (after a resume's checkpoint: counts a resumed
        # job already drew are not planned again)
        once = state.client.once_dp_events(self._spec.privacy.dp) if state.pipeline.noised else []
        state.pipeline.admit(state.events, once)
        self._started = True
        self.log_info(fl_ctx, f"{site}: joined job {job_identity(fl_ctx)}")
        return FLModelUtils.to_shareable(FLModel(params={}, params_type=ParamsType.FULL, meta={"round": 0}))

    def _check_resume(self, site: str, resume: Any, fl_ctx: FLContext) -> None:
        """A resume names the *interrupted* job (another job id) and the round it completed, exactly; whether the
        site's ledger vouches for it is the pipeline's check at join."""
        ok = isinstance(resume, dict) and set(resume) == {"job", "round"} and isinstance(resume["job"], str) \
            and JOB_ID.fullmatch(resume["job"]) is not None and isinstance(resume["round"], int) \
            and not isinstance(resume["round"], bool)  # fmt: skip
        if not ok or resume["job"] == job_identity(fl_ctx) or not 1 <= resume["round"] <= self._job_rounds():
            raise MedsiloError(f"site {site}: a resume must name another (interrupted) job and a round within the "
                               "job's rounds; refused")  # fmt: skip
        augmentation = self._job.get("augmentation")
        if isinstance(augmentation, dict) and augmentation.get("pcevolve"):
            raise MedsiloError(f"site {site}: a job with augmentation.pcevolve is not resumed (the site would "
                               "synthesize and spend privacy budget again); run it afresh")  # fmt: skip

    def _job_rounds(self) -> int:
        training = self._job.get("training")
        rounds = training.get("rounds") if isinstance(training, dict) else None
        return rounds if isinstance(rounds, int) and not isinstance(rounds, bool) else 0

    def _train(self, site: str, rnd: int, participants: Any, state: _SiteState,
               fl_ctx: FLContext) -> tuple[dict[str, Any], dict | None, float]:  # fmt: skip
        """One round's local training, protected upload and checkpoint. If the upload is refused after training
        (a budget another job spent meanwhile), the client half goes back to its state before the round, so
        nothing it learnt then can reach a later release."""
        pipeline = state.pipeline
        torch.manual_seed(state.seed * 1_000_003 + rnd)  # anything drawing from torch's global RNG: per round
        # this round's cost: the algorithm's per-round events, plus what is drawn once per job (class counts)
        events = [*state.client.once_dp_events(self._spec.privacy.dp), *state.events] if pipeline.noised else []
        dp = pipeline.noise(rnd, events)
        before = checkpoint.snapshot(state.client)
        try:
            upload = state.client.train_private(rnd, dp) if dp is not None else state.client.train(rnd)
        except Exception as exc:  # noqa: BLE001 - whatever stopped training: undo it, close the round, say little
            checkpoint.restore_snapshot(state.client, before)
            pipeline.close_round(rnd, exc if isinstance(exc, MedsiloError | FloatingPointError) else
                                 MedsiloError(f"training failed ({type(exc).__name__})"))  # fmt: skip
            raise MedsiloError(f"site {site}: round {rnd}'s training failed; the round is closed (the site's log "
                               "has the reason)") from exc  # fmt: skip
        try:
            wire, spent = pipeline.protect(rnd, participants, to_numpy(upload.sums), events)
        except BaseException:  # whatever stopped the upload: nothing left, so nothing of the round may stay (class
            checkpoint.restore_snapshot(state.client, before)  # counts drawn for it included: they were not charged)
            raise
        # after the ledger entry: a checkpoint that cannot be written stops the reply (the ledger then shows an
        # upload that never left, and the round cannot be uploaded again)
        checkpoint.save_site(self._checkpoints(fl_ctx), site, rnd, state.client, job_id=job_identity(fl_ctx),
                             spec_digest=spec_digest(self._job))  # fmt: skip
        return {WIRE_PARAM: wire}, spent, upload.train_loss

    @staticmethod
    def _reason_for_server(site: str, exc: Exception) -> str:
        """What the server is told when this site fails a task. Reading the site's own data names its files
        (paths may carry patient or study names): the server gets counts and kinds of problems only; the full
        message stays in the site's log."""
        if isinstance(exc, DataError):
            summary = exc.public or f"its dataset could not be used ({type(exc).__name__})"
            return f"site {site}: {summary}; the details (file names) are in the site's log"
        text = str(exc)
        return text if text.startswith(f"site {site}") else f"site {site}: {text}"

    def _checkpoints(self, fl_ctx: FLContext) -> Path:
        return checkpoint.checkpoint_dir(fl_ctx.get_prop(FLContextKey.WORKSPACE_ROOT) or ".", self._job.get("name", "?"),
                                         spec_digest(self._job))  # fmt: skip

    # ---- setup, once per job -------------------------------------------------------------------

    def _prepare(self, site: str, fl_ctx: FLContext, anchor: Any, resume: Any) -> _SiteState:
        spec = validate(self._job, JobSpec, f"job '{self._job.get('name', '?')}'")
        config = self._site_config(site, fl_ctx)
        check_job(config, spec)
        self._config = config
        workspace = Path(fl_ctx.get_prop(FLContextKey.WORKSPACE_ROOT) or ".")
        algo = algorithm_module(spec.algorithm.name)
        terms = JobTerms.of(job_identity(fl_ctx), spec, releases=algo.Server.needs_plaintext_aggregate,
                            digest=spec_digest(self._job))  # fmt: skip
        pipeline = pipeline_module(spec.privacy.mode).Site(Party(site, workspace), terms, config.privacy)
        # before anything is read or charged: the ledger as the server last saw it, the rules in force
        pipeline.start(anchor, resume)
        threads = int(os.environ.get(THREADS_ENV, 0)) or config.compute.threads
        torch.set_num_threads(threads)

        ref = config.datasets[spec.dataset]
        outside = config.data.allow_paths_outside_manifest
        file = dataset_manifest(ref, spec.classes, allow_outside=outside)  # whole slides: their patch manifest
        manifest = read_manifest(file, spec.classes, allow_outside=outside,
                                 labels=spec.labels, unknown=spec.unknown or "ignore")  # fmt: skip
        seed = site_seed(spec.seed, site)
        t0 = time.perf_counter()
        data = load_site_data(
            manifest,
            modality=spec.modality,
            image_size=spec.image_size,
            max_unreadable_fraction=config.data.max_unreadable_fraction,
            allow_identifiable=config.data.allow_identifiable_dicom,
            seed=seed,
            augmentation=spec.training.augmentation,
            channels=spec.channels,
            views=spec.views,
            cache=self._image_cache(site, workspace) if config.data.cache_images else None,
        )
        self.log_info(fl_ctx, f"{site}: loaded {len(data.train)}/{len(data.val)}/{len(data.test)} train/val/test "
                              f"images in {time.perf_counter() - t0:.1f} s, skipped {len(data.failures)}")  # fmt: skip
        aug = spec.augmentation.pcevolve
        if aug is not None and site in aug.sites:
            data = self._pcevolve(site, spec, config, manifest, data, workspace, seed, fl_ctx)

        model = build_model(spec.backbone_for(site), in_channels=data.channels,
                            num_classes=len(spec.classes), feature_dim=spec.feature_dim, seed=spec.seed)  # fmt: skip
        batch = min(spec.training.batch_size, config.compute.max_batch_size)
        setup = SiteSetup(site=site, model=model, data=data, num_classes=len(spec.classes),
                          training=spec.training, seed=seed, batch_size=batch, task=spec.task)  # fmt: skip
        client = algo.Client(setup, spec.algorithm.config())
        events = client.dp_events(spec.privacy.dp) if pipeline.noised else []
        self._spec = spec
        self._state = _SiteState(client=client, data=data, batch_size=batch, pipeline=pipeline, events=events, seed=seed)
        return self._state

    def _pcevolve(self, site: str, spec, config, manifest, data, workspace: Path, seed: int, fl_ctx: FLContext):
        """Add PCEvolve's DP synthetic images to this site's training split (job ``augmentation.pcevolve``).

        The selections are charged to the site's budget first (a run that cannot fit is refused: the
        site declines the job). The images stay at the site: they are written with a manifest marking
        them ``source = pcevolve`` under ``<workspace>/pcevolve/<job id>/`` for the record, and used in
        memory for training only (val and test stay real).
        """
        aug = spec.augmentation.pcevolve
        cfg = PCEvolveConfig(epsilon=aug.epsilon, iterations=aug.iterations, candidates=aug.candidates,
                             per_class=aug.images_per_class, picks=aug.picks, utility=aug.utility, keep=aug.keep,
                             keep_epsilon=aug.keep_epsilon, encoder=aug.encoder, seed=seed)  # fmt: skip
        t0 = time.perf_counter()
        # the generator was checked against this site's privacy.pcevolve_generators by check_job
        job = job_identity(fl_ctx)
        val = data.val if aug.keep == "val" else None
        result = charged_evolve(Party(site, workspace), job, config.privacy, aug.generator, spec.modality,
                                spec.classes, spec.image_size, data.train.images, data.train.labels, cfg,
                                val_images=None if val is None else val.images,
                                val_labels=None if val is None else val.labels)  # fmt: skip
        out = workspace / "pcevolve" / job
        if not out.exists():
            write_synthetic(out, manifest, result.synthetic, spec.modality, site)
        images = torch.as_tensor(np.stack([c.image for c in result.synthetic]))
        labels = torch.tensor([c.label for c in result.synthetic], dtype=torch.int64)
        data.train = ImageSet(torch.cat([data.train.images, images]), torch.cat([data.train.labels, labels]),
                              data.train.augment)  # fmt: skip
        self._synthetic = {"images": len(result.synthetic), "epsilon": aug.epsilon, "encoder": aug.encoder,
                           "utility": aug.utility, "kept_iteration": result.kept_iteration}  # fmt: skip
        self.log_info(fl_ctx, f"{site}: PCEvolve added {len(result.synthetic)} synthetic training images "
                              f"(ε = {aug.epsilon:g}) in {time.perf_counter() - t0:.1f} s")  # fmt: skip
        return data

    @staticmethod
    def _image_cache(site: str, workspace: Path) -> Path:
        """The site's preprocessed-image cache: beside ``sites.yml`` in simulation (a run's workspace is new each
        time), inside the workspace when deployed."""
        sites_file = os.environ.get(SITES_FILE_ENV)
        return Path(sites_file).resolve().parent / "cache" / site if sites_file else workspace / "cache" / "images"

    @staticmethod
    def _site_config(site: str, fl_ctx: FLContext):
        sites_file = os.environ.get(SITES_FILE_ENV)
        if sites_file:
            configs = load_sites_file(sites_file).site_configs()
            if site not in configs:
                raise MedsiloError(f"site {site}: not listed in {sites_file} (sites: {', '.join(configs)})")
            return configs[site]
        workspace = Path(fl_ctx.get_prop(FLContextKey.WORKSPACE_ROOT) or ".")
        path = workspace / SITE_CONFIG
        if not path.is_file():
            raise MedsiloError(f"site {site}: no site config at {path}; copy the template from the startup kit and fill it in")
        return load_site_config(path)

    def _evaluate(self, state: _SiteState) -> dict[str, dict[str, float]]:
        labels = self._spec.labels if self._spec.multilabel else None  # multi-label: thresholds chosen on val
        return evaluate_splits(state.client.scores, state.data, labels)
