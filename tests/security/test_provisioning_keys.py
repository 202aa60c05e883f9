"""After ``medsilo provision`` no private key under the provisioning folder is readable by anyone else.

The threat: the coordinator provisions on a shared machine. NVFlare writes ``state/cert.json`` — the root
CA's private key and every participant's — with the default umask, i.e. world-readable. Any local user
could copy it and issue certificates for any hospital, admin or auditor, or sign ledger entries in a
site's name. Every file holding a private key must be 0600, whatever the umask, and on every run.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import yaml

from medsilo.cli import main

NETWORK = {
    "project": "key-net",
    "server": {"host": "localhost", "port": 18111},
    "hospitals": {"hospital-1": {"org": "hosp_one", "require": "ckks"}, "hospital-2": {"org": "hosp_two"}},
    "admins": [{"name": "admin@coord.org", "org": "coord", "role": "project_admin"}],
    "auditors": [{"name": "auditor@coord.org", "org": "coord"}],
}
PARTIES = {"server": "server.key", "hospital-1": "client.key", "hospital-2": "client.key",
           "admin@coord.org": "client.key", "auditor@coord.org": "client.key"}  # fmt: skip


@pytest.fixture
def usual_umask():
    """Run with the common 022 umask, so a 0600 file is medsilo's doing and not the test runner's."""
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def _provision(tmp_path: Path) -> Path:
    network = tmp_path / "network.yml"
    network.write_text(yaml.safe_dump(NETWORK))
    assert main(["provision", "--network", str(network), "--out", str(tmp_path / "out")]) == 0
    return tmp_path / "out" / NETWORK["project"]


def _holds_a_secret(path: Path) -> bool:
    """A PEM private key anywhere in the file (``cert.json`` embeds them), or a site's secret CKKS context."""
    return b"PRIVATE KEY" in path.read_bytes() or path.name == "client_context.tenseal"


def _secret_modes(workspace: Path) -> dict[str, int]:
    """Every secret-holding file under the provisioning folder, by relative path, with its permission bits."""
    return {p.relative_to(workspace).as_posix(): stat.S_IMODE(p.stat().st_mode)
            for p in workspace.rglob("*") if p.is_file() and _holds_a_secret(p)}  # fmt: skip


def _expected(prods: list[str]) -> set[str]:
    kits = {f"{prod}/{party}/startup/{key}" for prod in prods for party, key in PARTIES.items()}
    sites = NETWORK["hospitals"]
    contexts = {f"{prod}/{site}/startup/client_context.tenseal" for prod in prods for site in sites}
    return {"state/cert.json"} | kits | contexts


def test_every_private_key_is_readable_by_its_owner_only(tmp_path, usual_umask):
    workspace = _provision(tmp_path)
    modes = _secret_modes(workspace)
    assert set(modes) == _expected(["prod_00"])  # the scan finds exactly the secrets we know of
    assert {name: oct(mode) for name, mode in modes.items() if mode != 0o600} == {}
    assert stat.S_IMODE((workspace / "state").stat().st_mode) == 0o700


def test_reprovisioning_closes_what_an_older_run_left_open(tmp_path, usual_umask):
    """A folder provisioned before this fix (cert.json 0644, state/ 0755) is closed by the next run."""
    workspace = _provision(tmp_path)
    (workspace / "state").chmod(0o755)
    (workspace / "state" / "cert.json").chmod(0o644)
    (workspace / "prod_00" / "server" / "startup" / "server.key").chmod(0o644)
    _provision(tmp_path)
    modes = _secret_modes(workspace)
    assert set(modes) == _expected(["prod_00", "prod_01"])
    assert {name: oct(mode) for name, mode in modes.items() if mode != 0o600} == {}
    assert stat.S_IMODE((workspace / "state").stat().st_mode) == 0o700
