"""A malicious server drives a real site executor with tasks of its own making.

The site is medsilo's ``SiteExecutor`` on a synthetic hospital, called the way NVFlare calls it (a task name, a
shareable, an FL context); the server's side is whatever the attacker puts in the task. Each attack must be
refused before anything is trained, evaluated or charged, with the refusal in the site's ledger.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import yaml
from nvflare.apis.fl_constant import FLContextKey, ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.signal import Signal
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.utils.fl_model_utils import FLModelUtils

from medsilo.components.checkpoint import CHECKPOINT_DIR_ENV
from medsilo.components.executor import RUN_ID_ENV, SITES_FILE_ENV, SiteExecutor
from medsilo.config import JobSpec
from medsilo.config.job import encode_job
from medsilo.config.site import Budget, PrivacyPolicy
from medsilo.medical.synth import SynthRequest, synthesize
from medsilo.secure.keys import LEDGER_DIR_ENV, Party, ensure_simulation_pki
from medsilo.secure.ledger import LEDGER_FILE, entries
from medsilo.secure.pipeline import pipeline_module
from medsilo.secure.pipeline.base import JobTerms

SITES = ["hospital-1", "hospital-2"]
DP = {"noise_multiplier": 1.0, "clip": 1.0}


@pytest.fixture(scope="module")
def hospitals(tmp_path_factory):
    out = tmp_path_factory.mktemp("site-attacks") / "cxr"
    return synthesize(out, SynthRequest("cxr", sites=2, images_per_site=24, seed=6), workers=1, progress=False)


@pytest.fixture
def site(hospitals, tmp_path, monkeypatch):
    """``site(spec, budget=None) -> task(name, round, params=None, **meta) -> reply FLModel``: hospital-1 in
    run ``run-1``, with an ε cap when ``budget`` is given."""
    ledgers = tmp_path / "ledgers"
    ensure_simulation_pki(ledgers, SITES)
    monkeypatch.setenv(LEDGER_DIR_ENV, str(ledgers))
    monkeypatch.setenv(SITES_FILE_ENV, str(hospitals))
    monkeypatch.setenv(RUN_ID_ENV, "run-1")
    monkeypatch.setenv(CHECKPOINT_DIR_ENV, str(tmp_path / "checkpoints"))

    def make(spec: JobSpec, budget: float | None = None):
        if budget is not None:  # the site's own config caps its budget (beside the module's sites.yml)
            sites = yaml.safe_load(hospitals.read_text())
            sites["sites"][SITES[0]]["privacy"] = {"budget": {"epsilon": budget, "delta": 1e-5}}
            capped = hospitals.with_name(f"sites-{tmp_path.name}.yml")
            capped.write_text(yaml.safe_dump(sites))
            monkeypatch.setenv(SITES_FILE_ENV, str(capped))
        executor = SiteExecutor(encode_job(spec.model_dump(mode="json")))
        ctx = FLContext()
        ctx.set_prop(ReservedKey.IDENTITY_NAME, SITES[0], private=False, sticky=False)
        ctx.set_prop(FLContextKey.WORKSPACE_ROOT, str(tmp_path / "workspace"), private=True, sticky=False)

        def task(name: str, rnd: int, params: dict | None = None, **meta) -> FLModel:
            shareable = FLModelUtils.to_shareable(FLModel(params=params or {}, params_type=ParamsType.FULL,
                                                          meta={"round": rnd, **meta}))  # fmt: skip
            return FLModelUtils.from_shareable(executor.execute(name, shareable, ctx, Signal()))

        task.executor = executor
        task.ledger = ledgers / SITES[0] / LEDGER_FILE
        return task

    return make


def _spec(mode: str = "none", algorithm: str = "fedavg", rounds: int = 2, **privacy) -> JobSpec:
    return JobSpec(name="attacked", modality="cxr", classes=["normal", "pneumonia"], dataset="cxr", image_size=16,
                   model="cnn", feature_dim=8, algorithm={"name": algorithm},
                   training={"rounds": rounds, "local_epochs": 1, "batch_size": 8},
                   privacy={"mode": mode, **privacy})  # fmt: skip


def _weights(task) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in task.executor._state.client.model.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_site_takes_no_task_before_it_joined_and_joins_once(site):
    task = site(_spec())
    refused = task("train", 1, participants=SITES)
    assert "before this job's 'join'" in refused.meta["error"] and refused.params == {}
    assert "error" not in task("join", 0).meta
    assert "joined already" in task("join", 0).meta["error"]


def test_rounds_outside_the_job_or_going_back_are_refused_before_training(site):
    task = site(_spec())
    task("join", 0)
    assert "error" not in task("train", 1, participants=SITES).meta
    before = _weights(task)
    # a round far past the job's (2**32 + 1 would share round 1's seeds), the same round again, an earlier one
    for rnd, message in ((2**32 + 1, "outside 1…2"), (1, "round 1 of job run-1 was uploaded before")):
        reply = task("train", rnd, participants=SITES)
        assert message in reply.meta["error"] and reply.params == {}
        assert _same(before, _weights(task))  # nothing was trained
    # a participant set other than the one the site signed in round 1
    reply = task("train", 2, participants=[SITES[0]])
    assert "differs from the one this site signed in round 1" in reply.meta["error"]
    refusals = [e for e in entries(task.ledger) if e["event"] == "refusal"]
    assert len(refusals) == 3 and all(e["what"]["sent"] is False for e in refusals)
    assert all(len(e["reason"]) < 300 for e in refusals)


def test_a_resume_must_name_another_interrupted_job(site):
    task = site(_spec())
    for resume in ({"job": "run-1", "round": 1}, {"job": "run-0", "round": 9}, {"job": "run-0"}):
        reply = task("join", 0, resume_from=resume)
        assert "a resume must name another (interrupted) job" in reply.meta["error"]
    assert not task.ledger.exists() or entries(task.ledger) == []


def test_evaluation_is_answered_once_after_the_last_round_and_ledgered(site):
    task = site(_spec())
    task("join", 0)
    assert "evaluated once" in task("evaluate", 1).meta["error"]  # not an oracle on request
    task("train", 1, participants=SITES)
    task("train", 2, participants=SITES)
    reply = task("evaluate", 3)
    assert set(reply.meta["eval"]) == {"val", "test"}
    assert "evaluated once" in task("evaluate", 3).meta["error"]
    metrics = [e for e in entries(task.ledger) if e["event"] == "release" and e["what"]["kind"] == "metrics"]
    assert [(e["round"], e["what"]["task"]) for e in metrics] == [(1, "train"), (2, "train"), (3, "evaluate")]
    assert [e["what"]["splits"] for e in metrics] == [["train"], ["test", "train", "val"], ["test", "val"]]
    assert all(len(e["what"]["sha256"]) == 64 for e in metrics)


def test_a_private_round_after_the_first_needs_the_servers_payload(site):
    task = site(_spec("dp", dp=DP))
    task("join", 0)
    task("train", 1, participants=SITES)
    reply = task("train", 2, participants=SITES)  # the server "forgot" to send the aggregate
    assert "sent no payload for round 2" in reply.meta["error"] and reply.params == {}


def test_a_round_refused_after_training_leaves_the_model_as_it_was(site, monkeypatch):
    # a DP job fits the budget at join and when its round starts; while it trains, another job at the same site
    # spends the rest (the race the ledger lock decides): the upload is refused and the training undone
    # σ = 1: one release costs ε ≈ 4.7, two ≈ 7.1, three ≈ 8.8 — a cap of 8 takes this 2-round job alone
    budget = PrivacyPolicy(budget=Budget(epsilon=8.0, delta=1e-5))
    task = site(_spec("dp", dp=DP), budget=8.0)
    task("join", 0)
    state = task.executor._state
    client, real = state.client, type(state.client).train_private
    other = pipeline_module("dp").Site(Party(SITES[0], "."), JobTerms.of("run-2", _spec("dp", rounds=6, dp=DP),
                                                                          releases=False), budget)  # fmt: skip

    def train_while_another_job_spends(self, rnd, dp):
        upload = real(self, rnd, dp)
        for r in (1, 2):
            other.protect(r, SITES, {"s": np.ones(2, np.float32)}, state.events)
        return upload

    monkeypatch.setattr(type(client), "train_private", train_while_another_job_spends)
    before = _weights(task)
    reply = task("train", 1, participants=SITES)
    assert "ε" in reply.meta["error"] and reply.params == {}
    assert _same(before, _weights(task))
    assert entries(task.ledger)[-1]["event"] == "refusal"


def test_fedavg_dp_update_is_taken_against_what_the_server_sent():
    """Even if the server sends no new model, a FedAvg private release differs from the model the site last
    received by at most the clipping bound (plus noise): the site's own earlier training is not in it."""
    from medsilo.components.algorithms import fedavg
    from medsilo.secure.dp import DPRelease
    from tests.helpers import tiny_setup

    client = fedavg.Client(tiny_setup("a", n=12, lr=0.5, local_epochs=3), fedavg.Config())
    received = {k: v.clone() for k, v in client.reference.items()}
    client.train(1)  # ordinary training moves the model far
    moved = sum(float((p.detach() - received[k]).pow(2).sum()) for k, p in client.model.named_parameters()) ** 0.5
    assert moved > 1.0
    client.receive(None, 2)
    clip = 0.01
    upload = client.train_private(2, DPRelease(clip=clip, noise_multiplier=1e-6, generator=torch.Generator()))
    released = {k[2:]: v for k, v in upload.sums.items() if k.startswith("w.")}
    distance = sum(float((released[k] - received[k]).pow(2).sum()) for k in released) ** 0.5
    assert distance <= clip * 1.01


def test_a_job_is_joined_once_so_its_preparation_is_never_redone(site, monkeypatch):
    spec = _spec()
    site(spec)("join", 0)
    again = site(spec)("join", 0)  # a new executor of the same job (run-1): the ledger remembers
    assert "job run-1 was joined before" in again.meta["error"]


def test_a_resume_must_be_of_an_interrupted_job_the_site_vouches_for(site, monkeypatch):
    spec = _spec(rounds=3)
    first = site(spec)
    first("join", 0)
    first("train", 1, participants=SITES)  # run-1 stops after round 1 (the server's checkpoint)
    monkeypatch.setenv(RUN_ID_ENV, "run-2")
    resumed = site(spec)
    assert "error" not in resumed("join", 0, resume_from={"job": "run-1", "round": 1}).meta
    # the resumed job goes on from round 2 with run-1's participants; run-1 itself is closed
    assert "round 1 is done" in resumed("train", 1, participants=SITES).meta["error"]
    assert "differs from the one this site signed in job run-1" in resumed("train", 2, participants=[SITES[0]]).meta["error"]
    assert "error" not in resumed("train", 2, participants=SITES).meta
    monkeypatch.setenv(RUN_ID_ENV, "run-1")
    assert "was resumed as job run-2" in first("train", 2, participants=SITES).meta["error"]
    # a second resume of run-1, or a resume of a job this site never ran with this spec, is refused
    monkeypatch.setenv(RUN_ID_ENV, "run-3")
    assert "it was resumed before, as job run-2" in site(spec)("join", 0, resume_from={"job": "run-1", "round": 1}).meta["error"]
    monkeypatch.setenv(RUN_ID_ENV, "run-4")
    other = site(_spec(rounds=2))
    assert "holds no join of that job with this job's spec" in other("join", 0, resume_from={"job": "run-2", "round": 1}).meta["error"]


def test_a_completed_job_is_never_resumed(site, monkeypatch):
    spec = _spec()
    done = site(spec)
    done("join", 0)
    done("train", 1, participants=SITES)
    done("train", 2, participants=SITES)
    done("evaluate", 3)
    monkeypatch.setenv(RUN_ID_ENV, "run-2")
    reply = site(spec)("join", 0, resume_from={"job": "run-1", "round": 1})
    assert "that job completed" in reply.meta["error"]


def test_a_round_whose_training_fails_is_undone_and_closed(site, monkeypatch):
    # training that fails part-way (a loss gone infinite on some record: an answer about the data) must leave
    # nothing behind, and the round cannot be asked again for another such answer
    task = site(_spec())
    task("join", 0)
    client = task.executor._state.client
    real = type(client).train

    def train_then_diverge(self, rnd):
        real(self, rnd)  # some steps were taken …
        raise FloatingPointError("training loss is not finite")  # … then a record made the loss infinite

    monkeypatch.setattr(type(client), "train", train_then_diverge)
    before = _weights(task)
    reply = task("train", 1, participants=SITES)
    assert "round 1's training failed; the round is closed" in reply.meta["error"] and reply.params == {}
    assert "not finite" not in reply.meta["error"]  # the reason stays in the site's log
    assert _same(before, _weights(task))  # undone
    again = task("train", 1, participants=SITES)
    assert "was closed when its training failed" in again.meta["error"]
    closed = [e for e in entries(task.ledger) if e["event"] == "refusal" and e["what"].get("closed")]
    assert len(closed) == 1


def test_the_training_loss_is_ledgered_and_a_private_round_keeps_it(site):
    """The mean training loss is a statistic of the training images: it leaves only after a metrics entry
    records it, and never from a DP round (no mechanism covers it)."""
    plain = site(_spec())
    plain("join", 0)
    reply = plain("train", 1, participants=SITES)
    assert isinstance(reply.meta["train_loss"], float) and not math.isnan(reply.meta["train_loss"])
    recorded = [e["what"] for e in entries(plain.ledger) if e["what"].get("kind") == "metrics"]
    assert recorded[-1]["splits"] == ["train"] and recorded[-1]["figures"] == ["loss"]


def test_a_private_round_keeps_its_training_loss(site):
    private = site(_spec("dp", algorithm="fedproto", dp=DP))
    private("join", 0)
    reply = private("train", 1, participants=SITES)
    assert math.isnan(reply.meta["train_loss"]) and "error" not in reply.meta
    assert not [e for e in entries(private.ledger) if e["what"].get("kind") == "metrics"]


def test_the_servers_best_round_must_be_an_earlier_round(site):
    task = site(_spec(rounds=3))
    task("join", 0)
    task("train", 1, participants=SITES)
    for bad in ([1, 2], 2, 0, True, "1"):
        reply = task("train", 2, participants=SITES, best_round=bad)
        assert "the server's best round must be an earlier round" in reply.meta["error"], bad
