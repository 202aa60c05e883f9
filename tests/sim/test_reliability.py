"""Sites that fail or straggle: the job stops by default, and goes on without them under min_sites."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from medsilo.components import checkpoint
from medsilo.config import JobSpec
from medsilo.config.job import spec_digest
from medsilo.errors import MedsiloError
from medsilo.jobs.simulate import run_simulation
from medsilo.medical.synth import SynthRequest, synthesize
from medsilo.secure.ledger import LEDGER_FILE, entries


@pytest.fixture(scope="module")
def sites_yml(tmp_path_factory):
    out = tmp_path_factory.mktemp("hospitals") / "cxr"
    sites = synthesize(out, SynthRequest("cxr", sites=3, images_per_site=24, seed=6), workers=1, progress=False)
    for image in (out / "hospital-3" / "images").iterdir():  # hospital-3's disk is garbage: every task fails there
        image.write_bytes(b"not a dicom")
    return sites


def _spec(**reliability) -> JobSpec:
    return JobSpec(name="t-reliability", modality="cxr", classes=["normal", "pneumonia"], dataset="cxr", image_size=16,
                   model="cnn", feature_dim=8, algorithm={"name": "fedavg"},
                   training={"rounds": 2, "local_epochs": 1, "batch_size": 8, "lr": 0.01}, reliability=reliability)  # fmt: skip


def test_a_failing_site_stops_the_job_unless_min_sites_allows_going_on(sites_yml, tmp_path):
    with pytest.raises(MedsiloError, match=r"site hospital-3: .*could not be used"):
        run_simulation(_spec(), sites_yml, tmp_path / "strict", progress=False)
    assert not (tmp_path / "strict" / "results.json").exists()

    # a site that cannot join is no participant of the job (its participant set is fixed at join)
    results = run_simulation(_spec(min_sites=2), sites_yml, tmp_path / "tolerant", progress=False)
    assert [(f["site"], f["round"], f["task"]) for f in results["failures"]] == [("hospital-3", 0, "join")]
    # the server learns the kind of problem, not the site's file names (they stay in the site's log)
    reason = results["failures"][0]["reason"]
    assert "images (100%) could not be used" in reason and ".dcm" not in reason and "hospital-3/" not in reason
    assert results["sites"] == ["hospital-1", "hospital-2"]
    assert [r["round"] for r in results["rounds"]] == [1, 2]
    assert all(set(r["metrics"]) == {"hospital-1", "hospital-2"} for r in results["rounds"])  # nothing made up
    assert 0 <= results["final"]["mean_acc"] <= 1
    # hospital-3's ledger claims no upload: nothing ever left it
    ledger = sites_yml.parent / "ledgers" / "hospital-3" / LEDGER_FILE
    assert not any(e["event"] == "release" for e in (entries(ledger) if ledger.exists() else []))
    # below min_sites the job stops, naming the rule
    with pytest.raises(MedsiloError, match=r"only 2 site\(s\) answered task 'join' of round 0, the job needs "
                                           r"reliability.min_sites = 3"):  # fmt: skip
        run_simulation(_spec(min_sites=3), sites_yml, tmp_path / "few", progress=False)


@pytest.fixture(scope="module")
def healthy_sites(tmp_path_factory):
    out = tmp_path_factory.mktemp("healthy") / "cxr"
    return synthesize(out, SynthRequest("cxr", sites=3, images_per_site=24, seed=7), workers=1, progress=False)


def _worker_of(site: str) -> int | None:
    """The NVFlare simulator worker process running ``site`` (one per site).

    With forked workers (medsilo.jobs.simworkers) the worker shows the command line a fresh worker would have;
    the shim standing in for it (``python -IS /tmp/medsilo-fs-…/python -m …``) only relays, so it is skipped.
    """
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ")  # a forked worker's is one string
            except OSError:
                continue
            if (b"nvflare.private.fed.app.simulator.simulator_worker" in cmd and f" --client {site} ".encode() in cmd
                    and b"medsilo-fs-" not in cmd):  # fmt: skip
                return int(entry.name)
    return None


def _progress_lines(run_dir: Path) -> int:
    path = run_dir / "workspace" / "server" / "simulate_job" / "progress.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def test_a_straggling_site_times_out_and_the_round_goes_on(healthy_sites, tmp_path):
    # hospital-3's process is frozen (SIGSTOP, as a machine that stalls) once round 2 is done (the first
    # progress line) and thawed once the server has finished round 3 without it: a real straggler, not a
    # simulated one. The timeout leaves room for round 1, which includes starting the site processes.
    run_dir = tmp_path / "straggler"
    spec = _spec(min_sites=2, task_timeout=30)
    spec = spec.model_copy(update={"training": spec.training.model_copy(update={"rounds": 3})})
    done, frozen = threading.Event(), []

    def freeze_hospital_3():
        # the worker is found first and the progress file then polled every 10 ms: round 3's task must reach a
        # frozen process, and a tiny round can finish within a slower poll plus a /proc scan (a flake seen in CI)
        pid = None
        while pid is None and not done.is_set():
            pid = _worker_of("hospital-3")
            time.sleep(0.05)
        while _progress_lines(run_dir) < 1 and not done.is_set():
            time.sleep(0.01)
        if pid is None or done.is_set():
            return
        os.kill(pid, signal.SIGSTOP)
        frozen.append(pid)
        try:
            while _progress_lines(run_dir) < 2 and not done.is_set():
                time.sleep(0.2)
        finally:
            os.kill(pid, signal.SIGCONT)

    freezer = threading.Thread(target=freeze_hospital_3)
    freezer.start()
    try:
        results = run_simulation(spec, healthy_sites, run_dir, progress=False)
    finally:
        done.set()
        freezer.join()
    assert frozen, "hospital-3's simulator worker was not found"
    assert [r["round"] for r in results["rounds"]] == [1, 2, 3]
    assert [(f["site"], f["round"], f["task"]) for f in results["failures"]] == [("hospital-3", 3, "train")]
    assert "within the task timeout" in results["failures"][0]["reason"]
    # round 2's evaluation at hospital-3 travelled with its (late) round-3 reply: left empty, never made up
    assert set(results["rounds"][1]["metrics"]) == {"hospital-1", "hospital-2"}
    assert set(results["rounds"][2]["metrics"]) == {"hospital-1", "hospital-2", "hospital-3"}  # thawed in time


def _simulator_processes(run_dir: Path) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if str(run_dir).encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def test_a_job_killed_after_round_2_resumes_to_the_uninterrupted_result(healthy_sites, tmp_path):
    spec = JobSpec(name="t-resume", modality="cxr", classes=["normal", "pneumonia"], dataset="cxr", image_size=16,
                   model="cnn", feature_dim=8, algorithm={"name": "ditto"}, seed=3,
                   training={"rounds": 4, "local_epochs": 1, "batch_size": 8, "lr": 0.05})  # fmt: skip
    whole = run_simulation(spec, healthy_sites, tmp_path / "whole", progress=False)

    run_dir = tmp_path / "killed"
    checkpoints = run_dir / "checkpoints"
    done = threading.Event()

    def completed_rounds() -> int:
        try:
            state = checkpoint.load_server(checkpoints, spec_digest=spec_digest(spec.model_dump(mode="json")))
        except checkpoint.CheckpointError:  # being replaced right now
            return 0
        return state.round if state is not None else 0

    def kill_the_simulator_after_round_2():
        while not done.is_set():
            if completed_rounds() >= 2:
                for pid in _simulator_processes(run_dir):
                    os.kill(pid, signal.SIGKILL)
                return
            time.sleep(0.1)

    killer = threading.Thread(target=kill_the_simulator_after_round_2)
    killer.start()
    try:
        with pytest.raises(MedsiloError, match="ended without results"):
            run_simulation(spec, healthy_sites, run_dir, progress=False)
    finally:
        done.set()
        killer.join()
    assert not (run_dir / "results.json").exists()
    with pytest.raises(MedsiloError, match="nothing to resume"):
        run_simulation(spec, healthy_sites, tmp_path / "never-ran", progress=False, resume=True)

    killed_id = json.loads((run_dir / "medsilo-run.json").read_text())["run_id"]
    resumed = run_simulation(spec, healthy_sites, run_dir, progress=False, resume=True)
    assert [r["round"] for r in resumed["rounds"]] == [1, 2, 3, 4]
    for a, b in zip(whole["rounds"], resumed["rounds"]):
        assert a["metrics"] == b["metrics"] or all(  # the same predictions and losses, round by round
            a["metrics"][s][k] == pytest.approx(b["metrics"][s][k], abs=1e-6) for s in a["metrics"] for k in a["metrics"][s])
    assert resumed["final"] == whole["final"] and resumed["selected_round"] == whole["selected_round"]
    # a resumed run is a run of its own (its own id in ledgers and signatures), restored from the killed one's
    # checkpoints, which are bound to the killed run's id
    assert resumed["job_id"] not in (killed_id, whole["job_id"])
