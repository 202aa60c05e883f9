"""The simulator's fork server (medsilo.jobs.simworkers): forked site workers behave like fresh ones.

A small stand-in worker module replaces NVFlare's simulator worker: it reports what it sees (pid, parent,
arguments, folder, environment, RNG draws) and exits with the code it is told to. Each test goes through the
real shim, as NVFlare's simulator does: ``subprocess.Popen([sys.executable, "-m", module, ...])`` while the
fork server has ``sys.executable`` pointing at the shim.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medsilo.jobs import simworkers

WORKER = "medsilo_fake_worker"
WORKER_SOURCE = '''
import json, os, random, sys, time
import numpy, torch
from monai.transforms import Randomizable
fds = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd") if os.path.exists(f"/proc/self/fd/{fd}")]
out = {"monai": float(Randomizable.R.rand()), "fds": fds, "medsilo_env": sorted(k for k in os.environ if k.startswith("MEDSILO")),
       "pid": os.getpid(), "ppid": os.getppid(), "sid": os.getsid(0), "argv": sys.argv[1:], "cwd": os.getcwd(),
       "marker": os.environ.get("FAKE_MARKER"), "random": random.random(), "numpy": float(numpy.random.rand()),
       "torch": float(torch.rand(1)), "torch_seed": torch.initial_seed(), "name": __name__}
print(json.dumps(out), flush=True)
if "--sleep" in sys.argv:
    time.sleep(float(sys.argv[sys.argv.index("--sleep") + 1]))
sys.exit(int(sys.argv[sys.argv.index("--exit") + 1]) if "--exit" in sys.argv else 0)
'''


@pytest.fixture
def server(tmp_path, monkeypatch):
    """A fork server for the stand-in worker (found through PYTHONPATH, as a job's custom folder would be)."""
    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / f"{WORKER}.py").write_text(WORKER_SOURCE)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "mods"))
    with simworkers.fork_server(preload=("numpy", "torch", "monai.transforms"), module=WORKER) as folder:
        yield folder


def _start(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", WORKER, *args], stdout=subprocess.PIPE, text=True, cwd=cwd,
                            env=env, preexec_fn=os.setsid)  # fmt: skip


def _report(proc: subprocess.Popen) -> dict:
    return json.loads(proc.stdout.readline())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] if Path(f"/proc/{pid}/stat").exists() else "X"
    return state not in ("Z", "X")


def test_a_worker_is_forked_with_the_requested_arguments_folder_and_environment(server, tmp_path):
    shim = Path(sys.executable)
    assert shim.parent == server and shim.read_text().startswith("#!")  # NVFlare would start this file
    env = {**os.environ, "FAKE_MARKER": "site-a"}
    proc = _start("--client", "hospital-1", "--exit", "3", cwd=tmp_path, env=env)
    seen = _report(proc)
    assert proc.wait(timeout=30) == 3  # the worker's exit code, through the shim
    assert seen["argv"] == ["--client", "hospital-1", "--exit", "3"]
    assert seen["cwd"] == str(tmp_path) and seen["marker"] == "site-a"
    assert seen["name"] == "__main__"
    assert seen["pid"] != proc.pid and seen["ppid"] != proc.pid  # forked by the server, not run by the shim
    assert seen["sid"] == seen["pid"]  # its own session, as NVFlare starts workers (setsid)
    # nothing of the fork server reaches the worker: not its coordinates, not its event loop
    assert seen["medsilo_env"] == [simworkers.REAL_PYTHON_ENV]
    assert not any("eventpoll" in fd or "fork.sock" in fd for fd in seen["fds"])


def test_two_workers_are_separate_processes_with_fresh_random_states(server):
    procs = [_start("--sleep", "1") for _ in range(2)]
    a, b = (_report(p) for p in procs)
    assert a["pid"] != b["pid"] and a["ppid"] == b["ppid"]  # siblings under the fork server
    # a new interpreter seeds Python's, NumPy's and torch's global generators from the OS: different per site
    assert a["random"] != b["random"] and a["numpy"] != b["numpy"]
    assert a["torch_seed"] != b["torch_seed"] and a["torch"] != b["torch"]
    assert a["monai"] != b["monai"]  # MONAI's shared generator (Rand* transforms without set_random_state)
    assert all(p.wait(timeout=30) == 0 for p in procs)


def test_the_worker_shows_its_own_command_line(tmp_path):
    # run as the launcher is (`python -m medsilo.jobs.simworkers …` in a new process): setproctitle finds the
    # command line only while the environment block is untouched, which it no longer is inside pytest
    (tmp_path / f"{WORKER}.py").write_text(WORKER_SOURCE)
    (tmp_path / "launch_fake.py").write_text(f"""
import json, subprocess, sys
from medsilo.jobs import simworkers
with simworkers.fork_server(preload=(), module={WORKER!r}):
    proc = subprocess.Popen([sys.executable, "-m", {WORKER!r}, "--client", "hospital-7", "--sleep", "5"],
                            stdout=subprocess.PIPE, text=True)
    pid = json.loads(proc.stdout.readline())["pid"]
    print(open(f"/proc/{{pid}}/cmdline", "rb").read().replace(bytes(1), b" ").decode())
    proc.terminate()
    proc.wait()
""")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")} | {"PYTHONPATH": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "launch_fake", "job", "-w", "ws"], capture_output=True, text=True,
                         env=env, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert f"-m {WORKER} --client hospital-7 --sleep 5" in out.stdout


def test_terminating_the_shim_terminates_the_worker(server):
    proc = _start("--sleep", "60")
    worker = _report(proc)["pid"]
    proc.terminate()  # what NVFlare's simulator does to a worker it gives up on
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    deadline = time.monotonic() + 10
    while _alive(worker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(worker)


def test_a_killed_shim_leaves_no_worker_behind(server):
    proc = _start("--sleep", "60")
    worker = _report(proc)["pid"]
    proc.kill()  # SIGKILL: the shim cannot relay it; the fork server notices the shim is gone
    proc.wait(timeout=30)
    deadline = time.monotonic() + 15
    while _alive(worker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(worker)


def test_anything_but_the_worker_module_runs_the_real_interpreter(server):
    out = subprocess.run([sys.executable, "-c", "import os, sys; print(sys.executable, os.getppid())"],
                         capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
    assert out[0] == os.environ[simworkers.REAL_PYTHON_ENV]
    assert int(out[1]) == os.getpid()  # exec'd in place of the shim: a plain child of ours


@pytest.mark.parametrize("request_body", [b'{"argv": ["x"]}', b'{"argv": 5, "env": {}, "cwd": "/"}', b"[" * 100_000,
                                          b"not json", b""])  # fmt: skip
def test_a_malformed_request_is_refused_and_the_server_keeps_serving(server, request_body):
    # no environment or descriptors; argv not a list; nesting that overflows the parser's recursion; garbage
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    conn.connect(os.environ[simworkers.SOCKET_ENV])
    socket.send_fds(conn, [request_body], [0, 1, 2]) if request_body.startswith(b'{"argv": 5') else conn.send(request_body)
    assert "error" in json.loads(conn.recv(4096) or b'{"error": "closed"}')
    conn.close()
    proc = _start("--exit", "0")
    assert _report(proc)["argv"] == ["--exit", "0"]
    assert proc.wait(timeout=30) == 0


def test_the_server_folder_is_private_and_removed_afterwards(tmp_path, monkeypatch):
    (tmp_path / f"{WORKER}.py").write_text(WORKER_SOURCE)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    real = sys.executable
    with simworkers.fork_server(preload=(), module=WORKER) as folder:
        assert oct(folder.stat().st_mode & 0o777) == "0o700"
        proc = _start("--sleep", "60")
        worker = _report(proc)["pid"]
    # leaving the block stops the server, and with it a worker still running
    assert sys.executable == real and simworkers.SOCKET_ENV not in os.environ
    assert not folder.exists()
    deadline = time.monotonic() + 15
    while _alive(worker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(worker)
    proc.wait(timeout=30)


def test_without_a_fork_server_the_worker_starts_fresh(tmp_path, monkeypatch):
    # a preload that fails ends the fork server (it says why); NVFlare's workers then start as new interpreters
    (tmp_path / f"{WORKER}.py").write_text(WORKER_SOURCE)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    with simworkers.fork_server(preload=("medsilo_no_such_module",), module=WORKER):
        time.sleep(0.5)
        proc = subprocess.Popen([sys.executable, "-m", WORKER, "--exit", "4"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)  # fmt: skip
        seen = _report(proc)
        assert proc.wait(timeout=60) == 4
    assert seen["pid"] == proc.pid  # the shim became the worker (exec), no fork
    assert "fork server" in proc.stderr.read() and seen["argv"] == ["--exit", "4"]


def test_an_interpreter_path_with_spaces_works(tmp_path, monkeypatch):
    # the shim's #! line names a short link in the private folder, not the interpreter's own path
    (tmp_path / f"{WORKER}.py").write_text(WORKER_SOURCE)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    odd = tmp_path / "my venv" / ("x" * 200) / "python"
    odd.parent.mkdir(parents=True)
    odd.symlink_to(sys.executable)
    monkeypatch.setattr(sys, "executable", str(odd))
    with simworkers.fork_server(preload=(), module=WORKER) as folder:
        assert sys.executable == str(folder / "python")  # the probe passed: workers are forked
        proc = _start("--exit", "0")
        seen = _report(proc)
        assert proc.wait(timeout=30) == 0 and seen["pid"] != proc.pid


def test_a_shim_that_cannot_run_leaves_the_workers_fresh(tmp_path, monkeypatch, capsys):
    # as on a machine whose /tmp is mounted noexec: the probe fails, NVFlare starts its workers itself
    (tmp_path / f"{WORKER}.py").write_text(WORKER_SOURCE)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    real_write = simworkers.write_shim

    def unrunnable(folder, real_python):
        shim = real_write(folder, real_python)
        shim.chmod(0o600)
        return shim

    monkeypatch.setattr(simworkers, "write_shim", unrunnable)
    real = sys.executable
    with simworkers.fork_server(preload=(), module=WORKER):
        assert sys.executable == real
        proc = _start("--exit", "0")
        seen = _report(proc)
        assert proc.wait(timeout=60) == 0 and seen["pid"] == proc.pid  # a new interpreter, not a fork
    assert "site workers start fresh" in capsys.readouterr().err
