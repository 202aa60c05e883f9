"""The stand-in for ``python`` that NVFlare's simulator starts for each simulated site (see :mod:`.simworkers`).

This file is run as a script by ``python -I -S`` (no site-packages, no environment-driven imports), so it imports
only the standard library and starts in a few milliseconds. :func:`medsilo.jobs.simworkers.write_shim` copies it
behind a ``#!`` line naming the real interpreter. It reads three variables from its environment, which the
launcher set before NVFlare's simulator copied its environment into each child:

* ``MEDSILO_FORKSERVER``: the fork server's Unix socket;
* ``MEDSILO_REAL_PYTHON``: the interpreter to run instead when the request is not a simulator worker, or when
  the fork server cannot be reached (then the worker starts cold, as NVFlare would start it);
* ``MEDSILO_WORKER_MODULE``: the one module the fork server runs.

For a worker it sends the fork server its arguments, environment, working folder and its own stdin, stdout and
stderr (as file descriptors), then stays as the worker's proxy: a signal it receives is passed to the worker,
and it exits with the worker's exit status, so NVFlare's ``Popen.poll()``, ``terminate()`` and ``kill()``
behave as with a worker it started itself. If this proxy dies, the fork server stops the worker.
"""

import json
import os
import signal
import socket
import sys

REQUEST_LIMIT = 1 << 20


def _run_elsewhere(argv: list[str], why: str | None) -> None:
    real = os.environ["MEDSILO_REAL_PYTHON"]
    if why:
        print(f"medsilo worker shim: {why}; starting a fresh interpreter instead", file=sys.stderr, flush=True)
    os.execv(real, [real, *argv])


def main() -> None:
    argv = sys.argv[1:]
    server = os.environ.get("MEDSILO_FORKSERVER")
    if not server or argv[:2] != ["-m", os.environ.get("MEDSILO_WORKER_MODULE")]:
        _run_elsewhere(argv, None)
    request = json.dumps({"argv": argv[2:], "env": dict(os.environ), "cwd": os.getcwd()}).encode()
    if len(request) > REQUEST_LIMIT:
        _run_elsewhere(argv, "request too large for the fork server")
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        conn.connect(server)
        socket.send_fds(conn, [request], [0, 1, 2])
        reply = json.loads(conn.recv(4096) or b"{}")
    except (OSError, ValueError) as exc:
        conn.close()
        _run_elsewhere(argv, f"fork server at {server} unavailable ({exc})")
    if "pid" not in reply:
        conn.close()
        _run_elsewhere(argv, f"fork server refused the worker ({reply.get('error', 'no reply')})")
    pid = int(reply["pid"])

    def relay(signum, _frame):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(signum, relay)
    try:
        status = json.loads(conn.recv(4096) or b"{}")
    except (OSError, ValueError):
        status = {}
    os._exit(int(status.get("exit", 1)))


if __name__ == "__main__":
    main()
