"""``medsilo poc``: a real NVFlare deployment on one machine — provisioned kits, one process per party.

``up`` provisions a network for the sites of a ``sites.yml`` (a free port, a project admin, an auditor, the
CKKS key set) — by default the distributed way, every party's steps run here each in its own folder (each
makes its own key; hospital-1 makes the CKKS secret and wraps it for the others), or with ``custody="central"``
in one trusting run — writes each site's ``local/medsilo_site.yml`` from its ``sites.yml`` entry, starts the server
and every site with their kit's ``startup/sub_start.sh --once`` (NVFlare's own launcher, without the
restart watchdog), and waits until every site has connected. :func:`admin_session` opens NVFlare's admin
API with one of the provisioned identities; ``medsilo poc submit`` uses it to submit a job
(:func:`medsilo.jobs.deploy.run_deployed`). ``down`` shuts the system down through the admin API, stops
what is left, and checks that no process of the workspace survives.

Workspace layout (``W`` is ``--workspace``)::

    W/poc.json                     # what is running: kits, port, process ids (written by up, removed by down)
    W/coordinator/                 # --custody sites (default): the coordinator's root CA, certificates, CKKS relay
    W/parties/<party>/             #   each party's own private key and request (medsilo.provisioning.distributed)
    W/kits/<party>/                #   each party's kit, assembled by the party; it runs inside it
    W/kits/project.yml             # --custody central: provisioning output (medsilo.provisioning.provision)
    W/kits/<project>/prod_00/...   #   the kits
    W/logs/<party>.console.log     # each process's console
    W/jobs/<job>-<time>/           # exported job folders as submitted (medsilo poc submit)
    W/runs/<job name>/             # results.json, report.html, the downloaded server job workspace
    W/home, W/tmp                  # HOME and TMPDIR of every process (NVFlare writes under both)

The processes run as the current user; like the simulator, one machine gives no isolation between
parties. Every process carries ``MEDSILO_POC_WORKSPACE=W`` in its environment, which is how ``down``
finds job processes that NVFlare starts in their own sessions.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from nvflare.fuel.flare_api.flare_api import new_secure_session
from tqdm import tqdm

from medsilo.config import load_sites_file
from medsilo.errors import MedsiloError
from medsilo.fs import write_atomic
from medsilo.provisioning.distributed import provision_here
from medsilo.provisioning.network import NetworkSpec
from medsilo.provisioning.provision import Kits, provision

STATE_FILE = "poc.json"
CUSTODY = ("sites", "central")
"""``--custody``: ``sites`` (default) runs every party's distributed-provisioning steps here, each in its own
folder; ``central`` provisions every kit in one run (the trusting mode)."""
MARKER_ENV = "MEDSILO_POC_WORKSPACE"
ADMIN, AUDITOR = "admin@medsilo.poc", "auditor@medsilo.poc"
PROJECT = "medsilo-poc"
SITE_OUTCOME_WAIT = 15
"""Seconds the server waits, after a job's last task, for each site to report how the job ended there
(``NVFLARE_CLIENT_OUTCOME_WAIT_TIMEOUT``; NVFlare's default, 900 s, keeps a job whose site died in status
RUNNING for 15 minutes after its last round)."""
SIMULATION_ENV = ("MEDSILO_SITES_FILE", "MEDSILO_HE_DIR", "MEDSILO_LEDGER_DIR", "MEDSILO_SITE_THREADS")
"""Simulator-only variables; a deployed site must read its own kit, never these."""


class PocError(MedsiloError):
    """The one-machine deployment could not start, run a job, or stop cleanly."""


# ---- up ------------------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port nobody listens on right now (NVFlare prints "started" even when its port is taken)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _network(sites: dict[str, Any], port: int):
    return NetworkSpec.model_validate({
        "project": PROJECT,
        "server": {"host": "localhost", "port": port, "org": "coordinator"},
        "hospitals": {name: {"org": name.replace("-", "_").replace(".", "_"), "require": cfg.privacy.required_mode} for name, cfg in sites.items()},
        "admins": [{"name": ADMIN, "org": "coordinator", "role": "project_admin"}],
        "auditors": [{"name": AUDITOR, "org": "coordinator"}],
        "min_contributors": min(2, len(sites)),
    })  # fmt: skip


def _env(workspace: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SIMULATION_ENV}
    env.update({
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",  # sub_start.sh runs python3
        "HOME": str(workspace / "home"),
        "TMPDIR": str(workspace / "tmp"),
        "PYTHONUNBUFFERED": "1",
        "NVFLARE_CLIENT_OUTCOME_WAIT_TIMEOUT": str(SITE_OUTCOME_WAIT),
        MARKER_ENV: str(workspace),
    })  # fmt: skip
    return env


def _start(kit: Path, workspace: Path, name: str) -> subprocess.Popen:
    with (workspace / "logs" / f"{name}.console.log").open("w") as log:  # the child keeps its own descriptor
        return subprocess.Popen(["bash", str(kit / "startup" / "sub_start.sh"), "--once"], cwd=kit,
                                env=_env(workspace), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


@contextlib.contextmanager
def admin_session(workspace: Path, user: str | None = None, timeout: float = 30.0):
    """An NVFlare admin ``Session`` for ``user`` (default: the project admin), always closed on exit."""
    state = load_state(workspace)
    user = user or state["admin"]
    kit = Path(state["kits"]) / user
    if not kit.is_dir():
        raise PocError(f"{kit}: no admin kit for '{user}' (known: {state['admin']}, {state['auditor']})")
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # NVFlare prints "Connecting to FLARE ..." on every try
            sess = new_secure_session(user, str(kit), timeout=timeout)
    except Exception as exc:  # NVFlare raises bare exceptions when the server does not answer
        raise PocError(f"cannot reach the server at localhost:{state['port']} as {user}: {exc}; is it up?") from exc
    try:
        yield sess
    finally:
        sess.close()  # an unclosed Session keeps the interpreter alive


def load_state(workspace: str | Path) -> dict[str, Any]:
    path = Path(workspace) / STATE_FILE
    if not path.is_file():
        raise PocError(f"{path}: no running POC here; start one with 'medsilo poc up'")
    return json.loads(path.read_text())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def up(sites_file: str | Path, workspace: str | Path, n_sites: int | None = None, *, progress: bool = True,
       timeout: float = 120.0, custody: str = "sites") -> dict[str, Any]:  # fmt: skip
    """Provision and start server and sites; returns the state written to ``W/poc.json``.

    Args:
        sites_file: ``sites.yml`` naming each site's dataset (its first ``n_sites`` entries are used).
        workspace: the POC workspace (created; must not hold a running POC).
        n_sites: how many sites (default: all of ``sites_file``).
        progress: show a bar while sites connect.
        timeout: seconds to wait for the server and every site.
        custody: ``sites`` (distributed provisioning, the default) or ``central`` (see :data:`CUSTODY`).

    Raises:
        PocError: a POC already runs here, the server or a site exited or did not connect in time
            (with the last lines of its console log). What was started is stopped again.
    """
    workspace = Path(workspace).resolve()
    if custody not in CUSTODY:
        raise PocError(f"--custody: one of {', '.join(CUSTODY)}, got {custody!r}")
    if (workspace / STATE_FILE).is_file():
        state = json.loads((workspace / STATE_FILE).read_text())
        if any(_alive(p) for p in state.get("pids", {}).values()):
            raise PocError(f"{workspace}: a POC is already running here; 'medsilo poc down --workspace {workspace}'")
    configs = load_sites_file(sites_file).site_configs()
    names = list(configs)
    if n_sites is not None:
        if not 1 <= n_sites <= len(names):
            raise PocError(f"--sites: {sites_file} has {len(names)} sites, asked for {n_sites}")
        names = names[:n_sites]
    if workspace.exists():
        for sub in ("kits", "logs", "tmp", "home", "coordinator", "parties"):
            shutil.rmtree(workspace / sub, ignore_errors=True)
    for sub in ("logs", "tmp", "home"):
        (workspace / sub).mkdir(parents=True, exist_ok=True)

    port = free_port()
    network = _network({n: configs[n] for n in names}, port)
    if custody == "sites":
        kits = Kits(network, provision_here(network, workspace))
    else:
        kits = provision(network, workspace / "kits")
    threads = max(1, (os.cpu_count() or 1) // len(names))
    for name in names:
        cfg = configs[name].model_copy(update={"compute": configs[name].compute.model_copy(update={"threads": threads})})
        (kits.site(name) / "local" / "medsilo_site.yml").write_text(
            "# written by 'medsilo poc up' from " + str(Path(sites_file).resolve()) + "\n"
            + yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
        )
    state: dict[str, Any] = {
        "workspace": str(workspace), "kits": str(kits.prod_dir), "port": port, "sites": names,
        "admin": ADMIN, "auditor": AUDITOR, "root_ca": str(kits.root_ca), "pids": {}, "custody": custody,
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
    }  # fmt: skip
    procs = {"server": _start(kits.server, workspace, "server")}
    state["pids"]["server"] = procs["server"].pid
    _write_state(workspace, state)
    try:
        _wait_server(workspace, procs["server"], timeout)
        for name in names:
            procs[name] = _start(kits.site(name), workspace, name)
            state["pids"][name] = procs[name].pid
        _write_state(workspace, state)
        with tqdm(total=len(names), desc="sites connected", unit="site", disable=not progress) as bar:
            _wait_sites(workspace, procs, names, timeout, bar)
    except BaseException:
        down(workspace)
        raise
    return state


def _write_state(workspace: Path, state: dict) -> None:
    write_atomic(workspace / STATE_FILE, json.dumps(state, indent=2) + "\n")


def _console_tail(workspace: Path, name: str, lines: int = 5) -> str:
    path = workspace / "logs" / f"{name}.console.log"
    text = path.read_text(errors="replace").splitlines() if path.is_file() else []
    return f"{path}: " + " | ".join(line.strip() for line in text[-lines:])


def _wait_server(workspace: Path, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    log = workspace / "logs" / "server.console.log"
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.is_file() else ""
        if "Address already in use" in text or "Failed to add port" in text:
            raise PocError(f"server: its port is taken ({_console_tail(workspace, 'server')})")
        if proc.poll() is not None:
            raise PocError(f"server exited with status {proc.returncode} ({_console_tail(workspace, 'server')})")
        try:
            with admin_session(workspace, timeout=5.0):
                return
        except PocError:
            time.sleep(0.5)
    raise PocError(f"server did not answer within {timeout:.0f} s ({_console_tail(workspace, 'server')})")


def _wait_sites(workspace: Path, procs: dict, names: list[str], timeout: float, bar) -> None:
    deadline = time.monotonic() + timeout
    with admin_session(workspace) as sess:
        while time.monotonic() < deadline:
            for name in names:
                if procs[name].poll() is not None:
                    raise PocError(f"site {name} exited with status {procs[name].returncode} "
                                   f"({_console_tail(workspace, name)})")  # fmt: skip
            connected = {c.name for c in sess.get_system_info().client_info}
            bar.n = len(connected & set(names))
            bar.refresh()
            if set(names) <= connected:
                return
            time.sleep(0.5)
    missing = sorted(set(names) - connected)
    raise PocError(f"sites {', '.join(missing)} did not connect within {timeout:.0f} s "
                   f"({'; '.join(_console_tail(workspace, m) for m in missing)})")  # fmt: skip


# ---- down ----------------------------------------------------------------------------------------


def workspace_processes(workspace: str | Path) -> list[int]:
    """Ids of live processes started for ``workspace`` (by environment marker or command line)."""
    marker = str(Path(workspace).resolve())
    tagged = f"{MARKER_ENV}={marker}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            cmdline = (entry / "cmdline").read_bytes()
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if stat.rsplit(")", 1)[-1].split()[0] == "Z":
            continue  # a zombie: already dead, waiting for its parent
        if tagged in environ.split(b"\0") or marker.encode() in cmdline:
            found.append(int(entry.name))
    return found


def down(workspace: str | Path, grace: float = 15.0) -> list[int]:
    """Stop the POC of ``workspace``; returns the ids of processes still alive afterwards (empty = clean).

    Order: NVFlare's own ``shutdown all`` through the admin API, a wait of up to ``grace`` seconds, then
    SIGTERM and SIGKILL to whatever of the workspace is left (job processes included).
    """
    workspace = Path(workspace).resolve()
    state_path = workspace / STATE_FILE
    if state_path.is_file():
        try:
            with admin_session(workspace, timeout=5.0) as sess:
                sess.shutdown("all", wait=False)
        except Exception:  # already down, or never came up: the signals below do the rest
            pass
    deadline = time.monotonic() + grace
    while workspace_processes(workspace) and time.monotonic() < deadline:
        time.sleep(0.5)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        left = workspace_processes(workspace)
        for pid in left:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        end = time.monotonic() + 5
        while workspace_processes(workspace) and time.monotonic() < end:
            time.sleep(0.2)
    left = workspace_processes(workspace)
    if not left:
        state_path.unlink(missing_ok=True)
    return left
