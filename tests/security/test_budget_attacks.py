"""Overspending a site's DP budget: two jobs racing for it, and a ``ckks+dp`` job at a site with no filters."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import yaml

from medsilo.secure.dp import GaussianEvent, PrivacyAccountant
from medsilo.secure.ledger import entries, verify

RACER = r"""
import json, sys, time
from pathlib import Path
import numpy as np
from medsilo.config.job import DPSpec
from medsilo.config.site import Budget, PrivacyPolicy
from medsilo.secure.dp import BudgetExceeded, GaussianEvent
from medsilo.secure.keys import Party
from medsilo.secure.pipeline import pipeline_module
from medsilo.secure.pipeline.base import JobTerms

root, job, go = sys.argv[1:4]
terms = JobTerms(job=job, mode="dp", rounds=3, min_contributors=1, dp=DPSpec(noise_multiplier=2.0, clip=1.0),
                 releases=False)
site = pipeline_module("dp").Site(Party("hospital-1", root), terms,
                                  PrivacyPolicy(budget=Budget(epsilon=4.5, delta=1e-5)))
upload = {"proto_sum": np.ones((3, 4), np.float32), "proto_count": np.ones(3, np.float32)}
while not Path(go).exists():
    time.sleep(0.001)
out = []
for rnd in (1, 2, 3):
    try:
        site.protect(rnd, ["hospital-1"], upload, [GaussianEvent(noise_multiplier=2.0)])
        out.append("sent")
    except BudgetExceeded:
        out.append("refused")
print(json.dumps(out))
"""


def test_two_jobs_racing_for_one_budget_in_two_processes_never_overspend_it(federation):
    # cap ε = 4.5 at δ = 1e-5: σ = 2 costs ε ≈ 3.19, 4.01, 4.73 after 2, 3, 4 releases, so 3 fit in all
    go = federation.root / "go"
    env = {**os.environ}
    racers = [subprocess.Popen([sys.executable, "-c", RACER, str(federation.root), f"job-{i}", str(go)],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for i in (1, 2)]  # fmt: skip
    time.sleep(1.0)  # both processes import and open the ledger, then start together
    go.touch()
    outcomes = []
    for racer in racers:
        out, err = racer.communicate(timeout=300)
        assert racer.returncode == 0, err
        outcomes += json.loads(out)
    ledger = federation.ledger("hospital-1")
    releases = [e for e in entries(ledger) if e["event"] == "release"]
    assert outcomes.count("sent") == len(releases) == 3
    assert outcomes.count("refused") == 3
    assert all(e["privacy"]["cumulative_epsilon"] <= 4.5 for e in releases)
    events = [GaussianEvent(**{k: v for k, v in d.items() if k != "mechanism"})
              for e in releases for d in e["privacy"]["events"]]  # fmt: skip
    assert PrivacyAccountant.from_events(events, 1e-5).epsilon <= 4.5
    assert sum(e["event"] == "refusal" for e in entries(ledger)) == 3  # each refusal recorded, nothing sent
    assert verify([ledger], root_ca=federation.root_ca) == []


def test_a_ckks_dp_job_at_a_site_without_any_privacy_filter_is_charged_encrypted_and_ledgered(tmp_path):
    """The job author's job has no filters and the simulated sites have no ``privacy.json`` scope at all: the
    executor's pipeline still noises, charges, encrypts and ledgers every upload, and the site's budget cap
    refuses the job that would overspend it."""
    from medsilo.config import JobSpec
    from medsilo.jobs.simulate import run_simulation
    from medsilo.medical.synth import SynthRequest, synthesize

    data = synthesize(tmp_path / "cxr", SynthRequest("cxr", sites=3, images_per_site=24, seed=4), workers=1,
                      progress=False)  # fmt: skip
    sites = yaml.safe_load(data.read_text())
    for name in sites["sites"]:
        sites["sites"][name]["privacy"] = {"budget": {"epsilon": 8.0, "delta": 1e-5}}
    data.write_text(yaml.safe_dump(sites))
    spec = JobSpec(name="ckks-dp", modality="cxr", classes=["normal", "pneumonia"], dataset="cxr", image_size=16,
                   model="cnn", feature_dim=8, algorithm={"name": "fedavg"},
                   training={"rounds": 2, "local_epochs": 1, "batch_size": 8},
                   privacy={"mode": "ckks+dp", "dp": {"noise_multiplier": 1.0, "clip": 1.0}})  # fmt: skip
    job = tmp_path / "run" / "job" / spec.name / "app" / "config" / "config_fed_client.json"
    results = run_simulation(spec, data, tmp_path / "run", progress=False)
    client = json.loads(job.read_text())
    assert client["task_result_filters"] == [] and client["task_data_filters"] == []
    assert not list((tmp_path / "run" / "workspace").rglob("privacy.json"))
    ledgers = data.parent / "ledgers"
    for site in sites["sites"]:
        mine = [e for e in entries(ledgers / site / "privacy_ledger.jsonl") if e["job"] == results["job_id"]]
        sent = [e for e in mine if e["event"] == "release" and e["what"]["kind"] == "upload"]
        assert [e["round"] for e in sent] == [1, 2]
        assert all(e["what"]["encrypted"] and e["privacy"]["epsilon"] > 0 for e in sent)
        assert results["privacy_spent"][site]["epsilon"] == pytest.approx(sent[-1]["privacy"]["job_epsilon"])
    # σ = 1 costs ε ≈ 6.4 over two rounds; a second such job would take every site past ε = 8: refused
    from medsilo.errors import MedsiloError

    with pytest.raises(MedsiloError, match="ε"):
        run_simulation(spec, data, tmp_path / "again", progress=False)
    for site in sites["sites"]:
        assert entries(ledgers / site / "privacy_ledger.jsonl")[-1]["event"] == "refusal"


def test_a_resumed_jobs_model_costs_the_rounds_of_the_job_it_continues(federation):
    """The model a resumed job exports was trained by the interrupted job's rounds too: its ε (model card,
    ``model_export``) composes both jobs' releases, never the resumed job's alone."""
    from dataclasses import replace

    from medsilo.config.job import DPSpec

    from .conftest import upload

    a = replace(federation.terms("dp", job="job-A", rounds=3, min_contributors=1,
                                 dp=DPSpec(noise_multiplier=2.0, clip=1.0)), spec_digest="e" * 64)  # fmt: skip
    first = federation.site("hospital-1", a)
    first.start(None)
    for rnd in (1, 2):
        first.protect(rnd, ["hospital-1"], upload(rnd), [GaussianEvent(noise_multiplier=2.0)])
    second = federation.site("hospital-1", replace(a, job="job-B"))
    second.start(None, {"job": "job-A", "round": 2})
    second.protect(3, ["hospital-1"], upload(3), [GaussianEvent(noise_multiplier=2.0)])
    cost = second.model_privacy()
    three = PrivacyAccountant.from_events([GaussianEvent(noise_multiplier=2.0)] * 3, 1e-5).epsilon
    assert cost["jobs"] == ["job-A", "job-B"]
    assert cost["epsilon"] == pytest.approx(three) and cost["epsilon"] > second.book.job_epsilon(
        entries(federation.ledger("hospital-1")), "job-B")  # fmt: skip


def test_a_job_author_who_asks_dp_sgd_for_almost_no_noise_is_charged_its_true_cost_and_refused(federation):
    """FedAvg's ``dp-sgd`` form uploads the DP-trained weights without a second mechanism. A job author who sets
    ``sgd_noise_multiplier`` near 0 (nearly raw weights) cannot get them out cheaply: the site's own client
    declares the DP-SGD steps at that σ_sgd, the pipeline charges them, and a capped site refuses before anything
    leaves."""
    import torch

    from medsilo.components.algorithms import fedavg
    from medsilo.config.job import DPSpec
    from medsilo.config.site import Budget, PrivacyPolicy
    from medsilo.secure.dp import BudgetExceeded, DPRelease
    from tests.helpers import tiny_setup

    spec = DPSpec(noise_multiplier=100.0, clip=1.0, sgd_noise_multiplier=0.05)  # a big σ where it is not used
    client = fedavg.Client(tiny_setup(n=12), fedavg.Config(dp_form="dp-sgd"))
    events = client.dp_events(spec)
    assert [e.noise_multiplier for e in events] == [0.05]  # the σ that trains, not the release's unused 100
    upload = client.train_private(1, DPRelease.from_spec(spec, torch.Generator().manual_seed(0))).sums
    site = federation.site("hospital-1", federation.terms("dp", dp=spec),
                           PrivacyPolicy(budget=Budget(epsilon=8.0, delta=1e-5)))  # fmt: skip
    with pytest.raises(BudgetExceeded, match="ε"):
        site.protect(1, ["hospital-1", "hospital-2"], {k: v.numpy() for k, v in upload.items()}, events)
    ledger = entries(federation.ledger("hospital-1"))
    assert ledger[-1]["event"] == "refusal" and not any(e["event"] == "release" for e in ledger)


def test_a_job_author_who_asks_for_near_exact_class_counts_is_charged_their_true_cost_and_refused(federation):
    """``loss: logit-adjusted`` under DP-SGD makes the site read its class counts. A job author who sets
    ``count_noise_multiplier`` near 0 (the true counts, nearly) cannot have them read for free: the site's own
    client declares the draw at that σ with the round's events, the pipeline charges it, and a capped site refuses
    before anything leaves."""
    import torch

    from medsilo.components.algorithms import fedavg
    from medsilo.config.job import DPSpec
    from medsilo.config.site import Budget, PrivacyPolicy
    from medsilo.secure.dp import BudgetExceeded, DPRelease
    from tests.helpers import tiny_setup

    spec = DPSpec(noise_multiplier=1.0, clip=1.0, sgd_noise_multiplier=50.0, count_noise_multiplier=1e-3)
    client = fedavg.Client(tiny_setup(n=12, loss="logit-adjusted"), fedavg.Config(dp_form="dp-sgd"))
    events = [*client.once_dp_events(spec), *client.dp_events(spec)]
    assert events[0] == GaussianEvent(noise_multiplier=1e-3)  # the draw, at the σ that draws it
    upload = client.train_private(1, DPRelease.from_spec(spec, torch.Generator().manual_seed(0))).sums
    assert client.released_counts is not None
    site = federation.site("hospital-1", federation.terms("dp", dp=spec),
                           PrivacyPolicy(budget=Budget(epsilon=8.0, delta=1e-5)))  # fmt: skip
    with pytest.raises(BudgetExceeded, match="ε"):
        site.protect(1, ["hospital-1", "hospital-2"], {k: v.numpy() for k, v in upload.items()}, events)
    # the DP-SGD steps alone (σ_sgd = 50) would fit: it is the count draw that is refused
    assert PrivacyAccountant.from_events(events[1:], 1e-5).epsilon < 1.0
    ledger = entries(federation.ledger("hospital-1"))
    assert ledger[-1]["event"] == "refusal" and not any(e["event"] == "release" for e in ledger)


def test_a_logit_adjusted_dp_sgd_job_charges_the_count_draw_with_round_one_only(tmp_path):
    """A real simulated job (FedAvg's ``dp-sgd`` form, the instance-normalised ``cnn-in``): each site's round-1
    upload entry carries the class-count draw and the DP-SGD steps, round 2's the steps alone, and the ε the site
    reports composes both."""
    from medsilo.config import JobSpec
    from medsilo.jobs.simulate import run_simulation
    from medsilo.medical.synth import SynthRequest, synthesize
    from medsilo.secure.dp import event_from_json

    data = synthesize(tmp_path / "cxr", SynthRequest("cxr", sites=2, images_per_site=24, seed=5), workers=1,
                      progress=False)  # fmt: skip
    dp = {"noise_multiplier": 1.0, "clip": 1.0, "grad_clip": 1.0, "sgd_noise_multiplier": 1.5,
          "count_noise_multiplier": 4.0}  # fmt: skip
    spec = JobSpec(name="la-dp", modality="cxr", classes=["normal", "pneumonia"], dataset="cxr", image_size=16,
                   model="cnn-in", feature_dim=8, algorithm={"name": "fedavg", "params": {"dp_form": "dp-sgd"}},
                   training={"rounds": 2, "local_epochs": 1, "batch_size": 8, "loss": "logit-adjusted"},
                   privacy={"mode": "dp", "dp": dp})  # fmt: skip
    results = run_simulation(spec, data, tmp_path / "run", progress=False)
    ledgers = data.parent / "ledgers"
    sites = yaml.safe_load(data.read_text())["sites"]
    for site in sites:
        mine = [e for e in entries(ledgers / site / "privacy_ledger.jsonl") if e["job"] == results["job_id"]]
        sent = [e for e in mine if e["event"] == "release" and e["what"]["kind"] == "upload"]
        assert [e["round"] for e in sent] == [1, 2]
        charged = [[event_from_json(d) for d in e["privacy"]["events"]] for e in sent]
        assert charged[0][0] == GaussianEvent(noise_multiplier=4.0)
        assert [e.noise_multiplier for e in charged[0][1:]] == [1.5] and charged[1] == charged[0][1:]
        both = PrivacyAccountant.from_events(charged[0] + charged[1], 1e-5).epsilon
        assert results["privacy_spent"][site]["epsilon"] == pytest.approx(both)
        assert both > PrivacyAccountant.from_events(charged[0][1:] * 2, 1e-5).epsilon
