"""NVFlare's simulator with pre-imported site workers: what ``medsilo sim`` runs as its child process.

    python -m medsilo.jobs.simworkers [--workers fork|fresh] JOB_FOLDER -w WORKSPACE -c SITES -t THREADS

**Why.** NVFlare's simulator starts every simulated site as a new interpreter
(``python -m nvflare.private.fed.app.simulator.simulator_worker …``), which then imports torch, MONAI, NVFlare
and medsilo on its own: ≈ 3 s of CPU and ≈ 0.4 GiB of private memory per site, paid again by every site of
every job (on 2 cores, 4 sites wait ≈ 6 s for their imports; 20 sites ≈ 60 s).

**How** (``--workers fork``, the default). This process

1. forks the *fork server* before any thread of its own starts; the fork server imports what a site worker
   imports (:data:`PRELOAD`) — while this process goes on starting the simulator — and freezes the garbage
   collector's view of those objects, so forked children do not dirty the shared pages by collecting them. It
   listens on a Unix socket in a private (0700) folder under ``TMPDIR`` and accepts only peers running as the
   same user;
2. writes the *worker shim* (:mod:`.worker_shim`), a standard-library-only script, checks that it runs, and
   points ``sys.executable`` at it, so that NVFlare's simulator, which starts its workers as
   ``sys.executable -m nvflare.private.fed.app.simulator.simulator_worker …``, starts the shim instead (where
   the shim cannot run, e.g. a ``noexec`` ``/tmp``, the workers start fresh and a line says so);
3. runs NVFlare's simulator (``run_simulator`` of ``nvflare.private.fed.app.simulator.simulator``, the
   module NVFlare's Job API and its ``SimEnv`` run; the ``nvflare simulator`` command is deprecated).

The shim hands its arguments, environment, working folder and stdio to the fork server; the fork server
forks a child that takes them over, resets what a fresh interpreter would not have inherited (signal
handlers, the environment, RNG states, process title; it closes the server's socket and event loop) and runs
the worker module as ``__main__``. The shim relays signals and returns the worker's exit status (128 + N for
a worker ended by signal N). Each site is still its own process: models, data, RNG streams and ledgers are
not shared (``tests/unit/test_simworkers.py``); what is shared, copy-on-write, are the pages of the imported
libraries, and the string-hash secret. The fork server runs exactly :data:`WORKER_MODULE` and nothing else; a
request for anything else — or any command the simulator might start through ``sys.executable`` — runs the
real interpreter, as before. A malformed request is answered with an error and the server goes on; a worker
whose shim dies is stopped, and every worker dies with the server.

``--workers fresh`` runs NVFlare's simulator unchanged (every worker a new interpreter); the start-up and
scale benchmarks compare the two.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import importlib
import importlib.util
import json
import logging
import multiprocessing
import os
import random
import runpy
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import setproctitle

WORKER_MODULE = "nvflare.private.fed.app.simulator.simulator_worker"
"""The only module the fork server runs: NVFlare's simulator worker (one per simulated site)."""

PRELOAD = (
    WORKER_MODULE,
    "medsilo.components.executor",  # the site executor: torch, MONAI, pydicom, the algorithms, the privacy pipelines
    "medsilo.medical.models.zoo",
    "medsilo.secure.ckks",  # TenSEAL, for encrypted jobs
    "torch._dynamo",  # torch.optim imports it (and SymPy) when a site builds its first optimizer: ~0.9 s
    "nvflare.fuel.f3.drivers.aio_http_driver",  # what a worker's cell loads when it connects (aiohttp)
    "nvflare.fuel.f3.drivers.tcp_driver",
    "nvflare.app_common.executors.client_api_executor",
    "nvflare.app_common.widgets.convert_to_fed_event",
)
"""Modules imported once, before the fork server starts, and shared by every site worker."""

SOCKET_ENV, REAL_PYTHON_ENV, MODULE_ENV = "MEDSILO_FORKSERVER", "MEDSILO_REAL_PYTHON", "MEDSILO_WORKER_MODULE"
REQUEST_LIMIT = 1 << 20
STOP_GRACE_S = 5.0


# --- the fork server -------------------------------------------------------------------------------------


def _same_user(conn: socket.socket) -> bool:
    pid, uid, gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return uid == os.getuid()


def _reseed() -> None:
    """Give a forked worker the RNG state of a freshly started interpreter.

    A new interpreter seeds Python's, NumPy's and (since torch 2.x) torch's global generators from the OS; a
    forked child would otherwise continue its parent's streams, identical in every site. So do the
    module-level generators the preload creates: MONAI's ``Randomizable.R`` (what a ``Rand*`` transform draws
    from until ``set_random_state``) and SymPy's. The string-hash secret cannot be changed after start-up and
    stays shared (docs/threat-model.md).
    """
    random.seed()
    np = sys.modules.get("numpy")
    if np is not None:
        np.random.seed()
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.seed()
    monai_transform = sys.modules.get("monai.transforms.transform")
    if monai_transform is not None and np is not None:
        monai_transform.Randomizable.R = np.random.RandomState()
    sympy_random = sys.modules.get("sympy.core.random")
    if sympy_random is not None:
        sympy_random.seed()


def _clear_environment() -> None:
    """Empty the process environment at the C level too (``os.environ.clear`` misses what was ``putenv``-ed)."""
    os.environ.clear()
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).clearenv()


def _die_with_server() -> None:
    """Have the kernel SIGKILL this worker if the fork server dies first (``prctl(PR_SET_PDEATHSIG)``)."""
    server = os.getppid()
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != server:  # it died between the fork and the prctl
        os._exit(1)


def _become_worker(module: str, request: dict, fds: list[int], listener: socket.socket,
                   conns: list[socket.socket], selector: selectors.BaseSelector) -> None:
    """In the forked child: take over the shim's stdio, environment and folder, run the worker; never returns."""
    code = 1
    try:
        for signum in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # KeyboardInterrupt, as in a new interpreter
        _die_with_server()
        selector.close()  # its epoll descriptor would let the worker steer the server's loop
        listener.close()
        for conn in conns:
            conn.close()
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        # the standard streams on the shim's descriptors, as a new interpreter's are on its own
        sys.stdin = sys.__stdin__ = open(0, closefd=False)  # noqa: SIM115
        sys.stdout = sys.__stdout__ = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
        sys.stderr = sys.__stderr__ = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
        os.setsid()  # as NVFlare starts its workers (preexec_fn=os.setsid)
        os.chdir(request["cwd"])
        _clear_environment()
        # the fork server's coordinates are the simulator's business, not a site's
        os.environ.update({k: v for k, v in request["env"].items() if k not in (SOCKET_ENV, MODULE_ENV)})
        for entry in reversed(os.environ.get("PYTHONPATH", "").split(os.pathsep)):
            if entry and entry not in sys.path:  # what a new interpreter would put on its path
                sys.path.insert(1, entry)
        sys.argv = [importlib.util.find_spec(module).origin, *request["argv"]]
        # what `ps` shows, and what a fresh worker's command line would be
        setproctitle.setproctitle(" ".join([os.environ.get(REAL_PYTHON_ENV, "python"), "-m", module, *request["argv"]]))
        _reseed()
        sys.modules.pop(module, None)  # imported by the preload; run afresh as __main__ (its imports stay loaded)
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if exc.code is not None and not isinstance(exc.code, int):
            print(exc.code, file=sys.stderr)  # as the interpreter prints sys.exit("message")
    except BaseException:  # noqa: BLE001 — a worker's failure must end the worker, never return to the server loop
        import traceback

        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _valid(request, fds: list[int]) -> bool:
    return (len(fds) == 3 and isinstance(request, dict) and isinstance(request.get("cwd"), str)
            and isinstance(request.get("argv"), list) and all(isinstance(a, str) for a in request["argv"])
            and isinstance(request.get("env"), dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in request["env"].items()))  # fmt: skip


def _accept(module: str, listener: socket.socket, conns: list[socket.socket],
            selector: selectors.BaseSelector) -> tuple[socket.socket, int] | None:
    """Read one request and fork its worker; returns (connection, worker pid), or None when refused.

    Nothing a request holds may stop the server: any failure (a malformed or deeply nested request, a
    failed fork) is answered with an error and the loop goes on.
    """
    try:
        conn, _ = listener.accept()
    except (BlockingIOError, InterruptedError):  # another process took it, or nothing is there after all
        return None
    fds: list[int] = []
    try:
        if not _same_user(conn):
            conn.close()
            return None
        conn.settimeout(0.5)  # a shim sends its request as soon as it connects
        data, fds, _, _ = socket.recv_fds(conn, REQUEST_LIMIT, 3)
        request = json.loads(data)
        if not _valid(request, fds):
            raise ValueError("a request carries argv (strings), env (strings), cwd and three file descriptors")
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
    except Exception as exc:  # noqa: BLE001 — refuse this request, keep serving the others
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        with contextlib.suppress(OSError):
            conn.send(json.dumps({"error": f"{type(exc).__name__}: {exc}"[:500]}).encode())
        conn.close()
        return None
    if pid == 0:
        _become_worker(module, request, fds, listener, [*conns, conn], selector)
    for fd in fds:
        os.close(fd)
    try:
        conn.send(json.dumps({"pid": pid}).encode())
    except OSError:  # the shim is gone already: its worker has no one to report to
        _stop(pid)
    return conn, pid


def _stop(pid: int, signum: int = signal.SIGTERM) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def _exit_code(status: int) -> int:
    return os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)


def serve(listener: socket.socket, parent: int, module: str = WORKER_MODULE) -> None:
    """The fork server's loop: until ``parent`` ends (or SIGTERM), fork a worker per request and report each exit.

    A worker whose shim is gone (killed, so it can no longer relay signals) gets SIGTERM, then SIGKILL after
    :data:`STOP_GRACE_S`; when the loop ends, every worker still running is stopped the same way.
    """
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    workers: dict[int, socket.socket] = {}
    by_conn: dict[socket.socket, int] = {}
    kill_at: dict[int, float] = {}
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)

    def stop(pid: int) -> None:
        if pid not in kill_at:
            _stop(pid)
            kill_at[pid] = time.monotonic() + STOP_GRACE_S

    def forget(conn: socket.socket) -> None:
        with contextlib.suppress(KeyError, ValueError):
            selector.unregister(conn)
        by_conn.pop(conn, None)
        conn.close()

    try:
        while not stopping and os.getppid() == parent:
            for key, _ in selector.select(timeout=0.05):
                if key.fileobj is listener:
                    accepted = _accept(module, listener, list(by_conn), selector)
                    if accepted is not None:
                        conn, pid = accepted
                        workers[pid], by_conn[conn] = conn, pid
                        selector.register(conn, selectors.EVENT_READ)
                else:  # a shim sends nothing after its request: readable means it is gone
                    stop(by_conn[key.fileobj])
                    with contextlib.suppress(KeyError, ValueError):
                        selector.unregister(key.fileobj)
            _reap(workers, kill_at, forget)
            now = time.monotonic()
            for pid, deadline in list(kill_at.items()):
                if pid in workers and now > deadline:
                    _stop(pid, signal.SIGKILL)
    finally:
        for pid in workers:  # the simulator is gone (or this loop failed): so are its sites
            stop(pid)
        deadline = time.monotonic() + STOP_GRACE_S
        while workers and time.monotonic() < deadline:
            _reap(workers, kill_at, forget)
            time.sleep(0.05)
        for pid in workers:
            _stop(pid, signal.SIGKILL)


def _reap(workers: dict[int, socket.socket], kill_at: dict[int, float], forget) -> None:
    """Collect every ended worker and send its exit status to its shim."""
    while workers:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        kill_at.pop(pid, None)
        conn = workers.pop(pid, None)
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.send(json.dumps({"exit": _exit_code(status)}).encode())
            forget(conn)


@contextlib.contextmanager
def fork_server(preload: tuple[str, ...] = PRELOAD, module: str = WORKER_MODULE) -> Iterator[Path]:
    """Start the fork server and point ``sys.executable`` at the worker shim for the duration of the block.

    The fork server is forked first and imports ``preload`` itself, while this process goes on starting the
    simulator (on two cores the two start-ups overlap); a worker requested before it is ready waits in the
    socket's backlog. Only ``module`` is ever run (tests use a small stand-in). Yields the private folder holding the socket and the shim. On exit the real interpreter
    is restored and the fork server stopped (it also stops by itself when this process ends).
    """
    # setproctitle locates this process's command line on first use, by walking back from the environment
    # block; that only works before anything has set an environment variable (the workers replace theirs)
    setproctitle.getproctitle()
    # under TMPDIR, which `medsilo sim` points at a short folder of its own that it removes whatever happens
    # (even when every process of the run was killed); a long TMPDIR would overflow a socket path (107 bytes)
    root = Path(tempfile.gettempdir())
    if len(str(root)) > 60 and Path("/tmp").is_dir():
        root = Path("/tmp")
    folder = Path(tempfile.mkdtemp(prefix="medsilo-fs-", dir=root))
    path = folder / "fork.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(str(path))
    listener.listen(128)
    listener.setblocking(False)  # the loop accepts only when select says a shim is waiting
    parent = os.getpid()
    sys.stdout.flush()
    sys.stderr.flush()
    server = os.fork()
    if server == 0:
        try:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the simulator; it stops the workers
            for name in preload:
                importlib.import_module(name)
            gc.collect()
            gc.freeze()  # the imported objects stay out of the workers' collections: their pages stay shared
            serve(listener, parent, module)
        except BaseException:  # noqa: BLE001 — say why; the shims then start fresh interpreters instead
            import traceback

            print("medsilo fork server stopped:", file=sys.stderr)
            traceback.print_exc()
        finally:
            if os.getppid() != parent:  # the launcher was killed: nobody else removes the socket and the shim
                shutil.rmtree(folder, ignore_errors=True)
            os._exit(0)
    listener.close()
    real = sys.executable
    shim = write_shim(folder, real)
    saved = {k: os.environ.get(k) for k in (SOCKET_ENV, REAL_PYTHON_ENV, MODULE_ENV)}
    os.environ.update({SOCKET_ENV: str(path), REAL_PYTHON_ENV: real, MODULE_ENV: module})
    problem = _probe(shim)
    if problem is None:
        sys.executable = str(shim)
    else:  # e.g. /tmp mounted noexec: NVFlare starts its workers itself, as without the fork server
        print(f"medsilo: site workers start fresh (the worker shim {shim} cannot run: {problem})", file=sys.stderr)
    try:
        yield folder
    finally:
        sys.executable = real
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        _stop(server)
        deadline = time.monotonic() + 2 * STOP_GRACE_S
        while time.monotonic() < deadline and os.waitpid(server, os.WNOHANG)[0] == 0:
            time.sleep(0.02)
        with contextlib.suppress(ChildProcessError, ProcessLookupError):
            if os.waitpid(server, os.WNOHANG)[0] == 0:
                os.kill(server, signal.SIGKILL)
                os.waitpid(server, 0)
        shutil.rmtree(folder, ignore_errors=True)


def _probe(shim: Path) -> str | None:
    """Run the shim once (it hands ``-c pass`` to the real interpreter); returns what went wrong, or None."""
    try:
        subprocess.run([str(shim), "-c", "pass"], check=True, capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        return str(exc)
    return None


def write_shim(folder: Path, real_python: str) -> Path:
    """Write the executable worker shim into ``folder``; returns its path.

    Its ``#!`` line names ``folder/py``, a link to ``real_python``: a short path without spaces, whatever the
    interpreter's own path is (Linux reads at most ~255 bytes of a ``#!`` line and splits it at spaces).
    """
    (folder / "py").symlink_to(real_python)
    source = (Path(__file__).with_name("worker_shim.py")).read_text()
    shim = folder / "python"
    shim.write_text(f"#!{folder / 'py'} -IS\n{source}")
    shim.chmod(0o700)
    return shim


# --- the launcher ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Run NVFlare's simulator on the given arguments, with forked (default) or fresh site workers."""
    from nvflare.private.fed.app.simulator.simulator import define_simulator_parser, run_simulator
    from nvflare.private.fed.app.utils import version_check

    ours = argparse.ArgumentParser(add_help=False)
    ours.add_argument("--workers", choices=("fork", "fresh"), default="fork")
    known, rest = ours.parse_known_args(argv)
    parser = argparse.ArgumentParser(prog="python -m medsilo.jobs.simworkers", parents=[ours])
    define_simulator_parser(parser)
    args = parser.parse_args(rest)
    version_check()
    if known.workers == "fresh":
        return run_simulator(args)
    with fork_server():
        return run_simulator(args)


if __name__ == "__main__":
    status = main()
    # NVFlare's own processes end the same way (MainProcessMonitor.run ends in os._exit): tearing down the
    # interpreter with torch, MONAI and NVFlare loaded takes ~1.5 s and has nothing left to save
    for child in multiprocessing.active_children():  # the simulator's multiprocessing Manager
        child.terminate()
        child.join(STOP_GRACE_S)
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(status if isinstance(status, int) else 1)
