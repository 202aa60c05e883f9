"""``medsilo provision --network``: NETWORK.yml → NVFlare ``project.yml`` → startup kits, with NVFlare's own provisioner.

This is the **trusting mode** (demos, POC): this machine makes every party's private key and the CKKS secret,
so whoever runs it could sign as any site and, with the server, decrypt uploads. Each kit records that in
``local/custody.json``. A real network uses :mod:`medsilo.provisioning.distributed` instead.

Output layout (``OUT`` is ``--out``)::

    OUT/project.yml                      # the NVFlare project written from NETWORK.yml (re-runnable by hand:
                                         #   nvflare provision -p OUT/project.yml -w OUT)
    OUT/<project>/state/cert.json        # the root CA and its PRIVATE key: keep it with the coordinator, never ship it
    OUT/<project>/prod_NN/server/        # one ordinary NVFlare startup kit per participant
    OUT/<project>/prod_NN/<hospital>/
    OUT/<project>/prod_NN/<admin or auditor>/

Re-provisioning the same ``OUT`` writes ``prod_NN+1`` with the same root CA (NVFlare keeps ``state/``), so
certificates, and the privacy ledgers signed with them, keep verifying against one ``rootCA.pem``.

Private keys are readable by their owner only. ``state/`` holds the root CA's private key and every
participant's (NVFlare's ``cert.json``, written with the default umask): it is made 0700 before NVFlare
writes into it, and every file in it 0600 afterwards. In the kits, every ``*.key`` and the sites' secret
CKKS contexts are made 0600, in every ``prod_NN`` of ``OUT`` — also when provisioning fails half way.
"""

from __future__ import annotations

import contextlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

import yaml
from nvflare.lighter.constants import CtxKey, WorkDir
from nvflare.lighter.prov_utils import prepare_builders, prepare_packager
from nvflare.lighter.provision import prepare_project
from nvflare.lighter.provisioner import Provisioner

from medsilo.errors import MedsiloError
from medsilo.provisioning.network import SERVER_NAME, NetworkSpec, load_network, project_dict
from medsilo.secure.custody import Custody, write_custody

SECRET_FILES = ("*.key", "client_context.tenseal")
"""File patterns, anywhere in a kit, that only the kit's owner may read."""
STATE_DIR = "state"
"""NVFlare's folder of provisioning state in ``OUT/<project>/``: the root CA and every private key."""


@dataclass(frozen=True)
class Kits:
    """Where ``provision`` put the kits of one run."""

    network: NetworkSpec
    prod_dir: Path

    @property
    def server(self) -> Path:
        return self.prod_dir / SERVER_NAME

    def site(self, name: str) -> Path:
        return self.prod_dir / name

    def admin(self, name: str | None = None) -> Path:
        """An admin kit (default: the network's first submitter)."""
        return self.prod_dir / (name or self.network.submitter().name)

    @property
    def root_ca(self) -> Path:
        return self.server / "startup" / "rootCA.pem"


def provision(network: NetworkSpec | str | Path, out: str | Path, *, quiet: bool = True) -> Kits:
    """Write ``OUT/project.yml`` for ``network`` and run NVFlare provisioning into ``OUT``.

    Args:
        network: the parsed network, or the path of a ``NETWORK.yml``.
        out: output folder (created).
        quiet: keep NVFlare's provisioning chatter off the console (it is still returned in errors).

    Raises:
        MedsiloError: the network file is invalid, or NVFlare's provisioning failed (with its messages).
    """
    if not isinstance(network, NetworkSpec):
        network = load_network(network)
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    project = project_dict(network)
    (out / "project.yml").write_text(yaml.safe_dump(project, sort_keys=False))
    project["gen_scripts"] = False
    workspace = out / network.project
    (workspace / STATE_DIR).mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(workspace / STATE_DIR, 0o700)  # also when it exists: closed before NVFlare writes cert.json
    chatter = io.StringIO()
    try:
        with contextlib.redirect_stdout(chatter) if quiet else contextlib.nullcontext():
            prov = Provisioner(str(out), prepare_builders(project), prepare_packager(project))
            ctx = prov.provision(prepare_project(project))
    except (ValueError, RuntimeError) as exc:
        raise MedsiloError(f"{out / 'project.yml'}: NVFlare provisioning refused the project: {exc}") from exc
    finally:
        _restrict_secrets(workspace)
    if ctx.get(CtxKey.BUILD_ERROR) or not ctx.get(WorkDir.CURRENT_PROD_DIR):
        errors = "; ".join(ctx.get(CtxKey.ERRORS, [])) or chatter.getvalue().strip()[-500:]
        raise MedsiloError(f"{out / 'project.yml'}: NVFlare provisioning failed: {errors}")
    kits = Kits(network, Path(ctx[WorkDir.CURRENT_PROD_DIR]))
    for party in [SERVER_NAME, *(a.name for a in network.admins), *(a.name for a in network.auditors)]:
        write_custody(kits.admin(party), Custody("central", "central"))
    for site in network.hospitals:
        write_custody(kits.site(site), Custody("central", "central", "central", None, 1))
    return kits


def _restrict_secrets(workspace: Path) -> None:
    """Make every private key under ``workspace`` (``OUT/<project>``) readable by its owner only.

    ``state/`` becomes 0700 and each file in it 0600; every kit file matching :data:`SECRET_FILES`, in
    every ``prod_NN``, becomes 0600. Symbolic links are left alone (``chmod`` would change their target).
    """
    state = workspace / STATE_DIR
    secrets = []
    if state.is_dir():
        os.chmod(state, 0o700)
        secrets += list(state.rglob("*"))
    for pattern in SECRET_FILES:
        secrets += workspace.glob(f"prod_*/*/**/{pattern}")
    for path in secrets:
        if path.is_file() and not path.is_symlink():
            os.chmod(path, 0o600)
