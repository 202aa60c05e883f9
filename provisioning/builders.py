"""medsilo's NVFlare provisioning builders: what each startup kit carries beyond NVFlare's defaults.

They run inside NVFlare's own provisioner (``nvflare provision`` or ``medsilo provision``), in the order
:func:`medsilo.provisioning.network.project_dict` lists them:

* :class:`MedsiloHEBuilder` — NVFlare's ``HEBuilder`` with one change: the key set is medsilo's public-key
  CKKS context (:func:`medsilo.secure.ckks.make_context`), so sites can *encrypt* with a public key that
  the server file also holds and a foreign key set is detectable. The server kit gets
  ``startup/server_context.tenseal`` (public: no secret key), every site kit
  ``startup/client_context.tenseal`` (secret, mode 0600). Same file names as NVFlare's, so
  ``SignatureBuilder`` signs them and a changed context makes the kit refuse to start.
* :class:`SitePolicyBuilder` — into every kit's ``local/``: ``authorization.json`` (roles → rights; the
  ``auditor`` role may only view; custom code (BYOC) is refused for every role), ``resources.json``
  (a class allow-list that names exactly the classes a medsilo job uses — the site executor and the privacy
  filter at a site, the round controller at the server; NVFlare's default list is dropped, nothing is allowed
  by package prefix — enforced; at a site, NVFlare's live log streaming to the server switched off, so job
  logs stay at the site; on the server, job and snapshot storage inside the workspace instead of
  ``/tmp/nvflare``); into each site kit ``privacy.json`` (the site-enforced scope: a filter that lets out only
  uploads protected under at least the site's required mode) and a ``medsilo_site.yml`` template for hospital
  IT to fill in.
* :class:`PeerCertsBuilder` — into every site kit and the server kit ``startup/peers/<site>.crt``: every site's
  certificate, with which a site checks who signed the contributions of an aggregate before releasing it and
  the server checks who signed each upload before recording it.

Both provisioning modes use them: the central one inside one NVFlare run for every kit, the distributed one
(:mod:`medsilo.provisioning.distributed`) when each party assembles its own kit — there, at the site, with
NVFlare's ``PrebuiltCertBuilder`` in place of ``CertBuilder`` (the key was made at the site) and the CKKS key
set made by one site and wrapped to its peers instead of :class:`MedsiloHEBuilder`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from nvflare.lighter.constants import CtxKey, ProvFileName
from nvflare.lighter.impl.he import HEBuilder
from nvflare.lighter.spec import Builder, Project, ProvisionContext

from medsilo.config.common import SERVER_COMPONENTS, SITE_COMPONENTS
from medsilo.secure.ckks import make_context, save_context

PRIVACY_SCOPE = "medsilo"
"""Name of the privacy scope written into each site's ``privacy.json`` (its default scope)."""
SITE_TEMPLATE = "medsilo_site.yml"

_NO_BYOC = {"byoc": "none", "server-predeployed-flwr": "none"}
AUTHORIZATION = {
    "format_version": "1.0",
    "permissions": {
        # every role is an explicit dict: NVFlare's "any" would also grant byoc
        "project_admin": {"submit_job": "any", "clone_job": "any", "manage_job": "any", "download_job": "any",
                          "view": "any", "operate": "any", "shell_commands": "any", **_NO_BYOC},
        "org_admin": {"submit_job": "none", "clone_job": "none", "manage_job": "o:submitter",
                      "download_job": "o:submitter", "view": "any", "operate": "o:site", "shell_commands": "o:site",
                      **_NO_BYOC},
        "lead": {"submit_job": "any", "clone_job": "n:submitter", "manage_job": "n:submitter",
                 "download_job": "n:submitter", "view": "any", "operate": "o:site", "shell_commands": "o:site",
                 **_NO_BYOC},
        "member": {"submit_job": "none", "clone_job": "none", "manage_job": "none", "download_job": "none",
                   "view": "any", "operate": "none", "shell_commands": "none", **_NO_BYOC},
        "auditor": {"submit_job": "none", "clone_job": "none", "manage_job": "none", "download_job": "none",
                    "view": "any", "operate": "none", "shell_commands": "none", **_NO_BYOC},
    },
}  # fmt: skip
"""Rights per role, the same in every kit (each party enforces its own copy)."""


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


class MedsiloHEBuilder(HEBuilder):
    """NVFlare's HE builder writing medsilo's public-key CKKS contexts (module docstring).

    Args:
        poly_modulus_degree: N of the key set (4096, 8192 or 16384).
    """

    def __init__(self, poly_modulus_degree: int = 8192):
        super().__init__(poly_modulus_degree=poly_modulus_degree)

    def initialize(self, project: Project, ctx: ProvisionContext):
        self._context = make_context(self.poly_modulus_degree)

    def build(self, project: Project, ctx: ProvisionContext):
        server = project.get_server()
        if server:
            save_context(self._context, Path(ctx.get_kit_dir(server)) / ProvFileName.SERVER_CONTEXT_TENSEAL,
                         secret=False)  # fmt: skip
        for client in project.get_clients():
            save_context(self._context, Path(ctx.get_kit_dir(client)) / ProvFileName.CLIENT_CONTEXT_TENSEAL,
                         secret=True)  # fmt: skip


class SitePolicyBuilder(Builder):
    """Authorization, allow-list, storage, privacy scope and site config template (module docstring).

    Args:
        required_modes: hospital name → least privacy mode it accepts (``none``, ``dp``, ``ckks``, ``ckks+dp``).
        min_contributors: written into each site config template (``privacy.min_contributors``).
        server_storage: absolute folder for the server's job and snapshot storage (NVFlare requires absolute
            paths). Default: ``storage/`` inside the server kit where this provisioning run writes it
            (``prod_NN/server/storage``); set it when the kit will run from another place.
    """

    def __init__(self, required_modes: dict | None = None, min_contributors: int = 2,
                 server_storage: str | None = None):
        self.required_modes = dict(required_modes or {})
        self.min_contributors = min_contributors
        self.server_storage = server_storage

    def build(self, project: Project, ctx: ProvisionContext):
        server = project.get_server()
        if server:
            # the kit's final place: WorkspaceBuilder moves the work folder to prod_<last + 1> at the end
            stage = f"prod_{ctx[CtxKey.LAST_PROD_STAGE] + 1:02d}"
            storage = self.server_storage or os.path.join(ctx.get_workspace(), stage, server.name, "storage")
            self._common(Path(ctx.get_local_dir(server)), SERVER_COMPONENTS, storage=storage)
        for client in project.get_clients():
            local = Path(ctx.get_local_dir(client))
            self._common(local, SITE_COMPONENTS, log_streaming=False)
            mode = self.required_modes.get(client.name, "none")
            _write_json(local / "privacy.json", privacy_scope(mode))
            (local / SITE_TEMPLATE).write_text(site_template(client.name, project.name, mode, self.min_contributors))

    @staticmethod
    def _common(local: Path, allowed: tuple[str, ...], storage: str | None = None, log_streaming: bool = True) -> None:
        _write_json(local / "authorization.json", AUTHORIZATION)
        resources = json.loads((local / "resources.json.default").read_text())
        resources["class_allow_list"] = list(allowed)
        # A site's job logs stay at the site: NVFlare would stream them to the server (and inject its
        # JobLogStreamer into every job), which is data leaving the site outside its privacy ledger.
        resources["allow_log_streaming"] = log_streaming
        resources["class_list_enforcement_mode"] = "enforce"
        if storage:  # the server: jobs and snapshots off the host-wide /tmp/nvflare default
            resources["snapshot_persistor"]["args"]["storage"]["args"]["root_dir"] = f"{storage}/snapshots"
            for comp in resources["components"]:
                if comp["id"] == "job_manager":
                    comp["args"]["uri_root"] = f"{storage}/jobs"
        _write_json(local / "resources.json", resources)


def privacy_scope(required_mode: str) -> dict:
    """The site's ``privacy.json``: one default scope whose result filter lets out only uploads the privacy
    pipeline protected under at least ``required_mode`` (:class:`medsilo.secure.filters.ProtectedOnly`).

    The protection itself is the executor's privacy pipeline, chosen from the job's mode after the site's
    policy refused anything weaker; this filter is the site's own check at NVFlare's boundary, which a job
    cannot remove.
    """
    scope = {"name": PRIVACY_SCOPE, "properties": {"required_mode": required_mode},
             "task_result_filters": [{"path": "medsilo.secure.filters.ProtectedOnly",
                                      "args": {"required_mode": required_mode}}]}  # fmt: skip
    return {"scopes": [scope], "default_scope": PRIVACY_SCOPE}


def site_template(site: str, project: str, required_mode: str, min_contributors: int) -> str:
    """The ``local/medsilo_site.yml`` a site kit starts with: valid YAML whose dataset path is to be filled in."""
    return f"""\
# medsilo site config for {site} (network {project}); read by medsilo at this site only.
# Hospital IT: point each dataset at its manifest on this machine (CSV path,label[,patient_id,split];
# relative paths resolve against this folder), then run:  medsilo site check --kit <this kit folder>
site: {site}
datasets:
  cxr: {{manifest: /path/to/cxr/manifest.csv, modality: cxr}}   # FILL IN
privacy:
  required_mode: {required_mode}        # least protection accepted (set by the network; may be raised)
  min_contributors: {min_contributors}  # signed sites an aggregate needs before this site releases it
  # allowed_algorithms: [fedavg, fedproto]
  {"" if "dp" in required_mode else "# "}budget: {{epsilon: 8.0, delta: 1.0e-5}}   # differential-privacy cap across jobs{"; required with dp" if "dp" in required_mode else ""}
data:
  max_unreadable_fraction: 0.05
  allow_identifiable_dicom: false
  allow_paths_outside_manifest: false   # true if manifests name images outside their own folder
compute: {{threads: 2, device: cpu}}
"""


class PeerCertsBuilder(Builder):
    """Every site's certificate into each site kit's and the server kit's ``startup/peers/``.

    Central provisioning (no arguments) takes the certificates ``CertBuilder`` just made, so it must come
    after it. Distributed provisioning (:mod:`medsilo.provisioning.distributed`) assembles one kit at a time
    and passes the coordinator's folder of approved certificates instead.

    Args:
        certs_dir: folder of ``<site>.crt`` files (distributed); ``None``: the kits of this run (central).
        sites: the network's hospitals, whose certificates are taken from ``certs_dir``.
    """

    def __init__(self, certs_dir: str | None = None, sites: list[str] | None = None):
        self.certs_dir = certs_dir
        self.sites = list(sites or [])

    def build(self, project: Project, ctx: ProvisionContext):
        clients = project.get_clients()
        if self.certs_dir is not None:
            certs = {name: (Path(self.certs_dir) / f"{name}.crt").read_bytes() for name in self.sites
                     if (Path(self.certs_dir) / f"{name}.crt").is_file()}  # fmt: skip
        else:
            certs = {}
            for client in clients:
                cert = Path(ctx.get_kit_dir(client)) / "client.crt"
                if not cert.is_file():
                    raise RuntimeError(f"{cert}: missing; PeerCertsBuilder must come after CertBuilder")
                certs[client.name] = cert.read_bytes()
        server = project.get_server()
        for party in [*clients, *([server] if server else [])]:
            write_peers(Path(ctx.get_kit_dir(party)) / "peers", certs)


def write_peers(folder: Path, certs: dict[str, bytes]) -> None:
    """Write ``certs`` (site name → PEM certificate) as ``folder/<site>.crt`` (0644; certificates are public)."""
    folder.mkdir(exist_ok=True)
    for name, data in certs.items():
        (folder / f"{name}.crt").write_bytes(data)
