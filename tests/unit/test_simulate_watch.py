"""The simulator runner stops a job whose site workers never started, instead of waiting for them forever."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from medsilo.config import JobSpec
from medsilo.errors import MedsiloError
from medsilo.jobs import simulate

# what NVFlare 2.9's simulator wrote on a 2-core machine running four jobs side by side
NVFLARE_LINE = ("2026-12-06 21:12:00,678 - SimulatorClientRunner - ERROR - run_client_thread error: RuntimeError: "
                "Failed to create connection to the child process in SimulatorClientRunner, timeout: 60.0")  # fmt: skip


def _spec(task_timeout: int = 0) -> JobSpec:
    return JobSpec(name="t-watch", modality="cxr", classes=["normal", "pneumonia"], dataset="cxr", image_size=16,
                   model="cnn", feature_dim=8, algorithm={"name": "fedavg"}, training={"rounds": 2},
                   reliability={"task_timeout": task_timeout})  # fmt: skip


@pytest.fixture
def simulator():
    """A real process standing for the simulator: it would run for a minute unless stopped."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    proc.kill()
    proc.wait()


def test_a_worker_that_never_started_stops_the_job(tmp_path, simulator):
    error_log = tmp_path / "workspace" / "server" / "error_log.txt"
    error_log.parent.mkdir(parents=True)
    error_log.write_text("")
    t0 = time.monotonic()
    # an empty error log: the runner keeps waiting (here, until the process is stopped from outside)
    subprocess.Popen([sys.executable, "-c", f"import time, os; time.sleep(1.5); os.kill({simulator.pid}, 9)"])
    simulate._follow(simulator, tmp_path / "progress.jsonl", _spec(), "t", False, error_log=error_log)
    assert time.monotonic() - t0 >= 1.4

    again = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        error_log.write_text(NVFLARE_LINE + "\n" + NVFLARE_LINE + "\n")
        with pytest.raises(MedsiloError, match=r"could not start 2 site worker\(s\) \(run_client_thread error: .*"
                                               r"timeout: 60.0\).*task_timeout = 0.*fewer jobs side by side"):  # fmt: skip
            simulate._follow(again, tmp_path / "progress.jsonl", _spec(), "t", False, error_log=error_log)
        assert time.monotonic() - t0 < 30  # stopped at once, not after the simulator's minute
    finally:
        again.kill()
        again.wait()


def test_with_a_task_timeout_the_server_decides(tmp_path, simulator):
    # the controller drops (or stops on) a site that does not answer within reliability.task_timeout itself
    error_log = tmp_path / "error_log.txt"
    error_log.write_text(NVFLARE_LINE + "\n")
    subprocess.Popen([sys.executable, "-c", f"import time, os; time.sleep(1.5); os.kill({simulator.pid}, 9)"])
    simulate._follow(simulator, tmp_path / "progress.jsonl", _spec(task_timeout=30), "t", False, error_log=error_log)
    assert simulate._unstarted_workers(error_log) == [NVFLARE_LINE.split(" - ERROR - ")[1]]
    assert simulate._unstarted_workers(tmp_path / "missing.txt") == []
