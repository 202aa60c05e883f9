"""``NETWORK.yml``: the short description of a federation that ``medsilo provision`` turns into startup kits.

Example::

    project: pneumonia-net
    server: {host: fl.coordinator.example.org, port: 8002, org: coordinator}
    hospitals:
      hospital-1: {org: st_mary, require: ckks}     # this site's privacy.json enforces encryption
      hospital-2: {org: city_general}
      hospital-3: {org: north_clinic, require: ckks+dp}
    admins:
      - {name: admin@coordinator.org, org: coordinator, role: project_admin}
      - {name: lead@st-mary.org, org: st_mary, role: lead}
    auditors:
      - {name: auditor@coordinator.org, org: coordinator}
    he: {poly_modulus_degree: 8192}
    min_contributors: 2
    ckks_key_holder: hospital-1   # the site that makes the CKKS secret (default: the first hospital)

``require`` is the least protection a hospital accepts (``none``, ``dp``, ``ckks``, ``ckks+dp``): it becomes
``privacy.required_mode`` in the site's ``local/medsilo_site.yml`` and, when it includes ``ckks``, a
``local/privacy.json`` scope whose filters encrypt every upload whatever a job configures.

Roles are NVFlare's (``project_admin``, ``org_admin``, ``lead``, ``member``) plus ``auditor``; what each may do
is written into every kit's ``local/authorization.json`` (:mod:`medsilo.provisioning.builders`). The server
listens on one port for sites and admins (NVFlare's single-port mode).

``ckks_key_holder`` matters for distributed provisioning (:mod:`medsilo.provisioning.distributed`): that
hospital generates the network's CKKS secret context when it assembles its kit and wraps it for each peer
site; nobody else ever makes or sees it. Default: the first hospital listed. Central provisioning
(``medsilo provision --network``, the trusting mode) ignores it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, StringConstraints, model_validator

from medsilo.config.common import PrivacyMode, Strict
from medsilo.config.loading import load_yaml

# NVFlare's own name rules (nvflare.apis.utils.format_check), checked here so errors name NETWORK.yml's field
Name = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")]
Org = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_]{1,64}$")]
Person = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}$")]
Host = Annotated[str, StringConstraints(
    pattern=r"^(([a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])\.)*([A-Za-z0-9]|[A-Za-z0-9][A-Za-z0-9-]*[A-Za-z0-9])$"
)]

SERVER_NAME = "server"
"""The server participant's name (its kit folder and certificate CN); its host comes from ``server.host``."""


class ServerSpec(Strict):
    """Where sites and admins reach the server.

    Attributes:
        host: DNS name (or ``localhost``) sites and admins connect to; it goes into the server certificate.
        port: the one TCP port for site and admin traffic.
        org: the organisation running the server.
        storage: absolute folder where the server keeps submitted jobs and snapshots. Default: ``storage/``
            inside the server kit as provisioned; set it when the server kit will run from another folder.
    """

    host: Host = "localhost"
    port: int = Field(default=8002, ge=1, le=65535)
    org: Org = "coordinator"
    storage: str | None = Field(default=None, pattern=r"^/")


class HospitalSpec(Strict):
    """One hospital site.

    Attributes:
        org: the hospital's organisation (its certificate's O; ``o:site`` rights match on it).
        require: the least protection this site accepts (see module docstring).
    """

    org: Org
    require: PrivacyMode = "none"


class AdminSpec(Strict):
    """A person with an admin-console identity.

    Attributes:
        name: login, an e-mail-like name (certificate CN).
        org: their organisation.
        role: ``project_admin`` (runs the network), ``org_admin``, ``lead`` (submits jobs) or ``member`` (views).
    """

    name: Person
    org: Org
    role: Literal["project_admin", "org_admin", "lead", "member"]


class AuditorSpec(Strict):
    """An auditor: may view and list jobs, never submit, download, or operate."""

    name: Person
    org: Org


class HESpec(Strict):
    """CKKS parameters of the network's key set (one per network, as in NVFlare's HE model).

    Attributes:
        poly_modulus_degree: N; 8192 packs 4096 values per ciphertext.
    """

    poly_modulus_degree: Literal[4096, 8192, 16384] = 8192


class NetworkSpec(Strict):
    """A whole ``NETWORK.yml``."""

    project: Name
    server: ServerSpec = ServerSpec()
    hospitals: dict[Name, HospitalSpec] = Field(min_length=1)
    admins: list[AdminSpec] = Field(min_length=1)
    auditors: list[AuditorSpec] = Field(default_factory=list)
    he: HESpec = HESpec()
    min_contributors: int = Field(default=2, ge=1)
    ckks_key_holder: Name | None = None

    @model_validator(mode="after")
    def _consistent(self) -> NetworkSpec:
        people = [a.name for a in self.admins] + [a.name for a in self.auditors]
        repeated = sorted({p for p in people if people.count(p) > 1})
        if repeated:
            raise ValueError(f"admins/auditors: each identity must appear once, repeated: {', '.join(repeated)}")
        if SERVER_NAME in self.hospitals:
            raise ValueError(f"hospitals: '{SERVER_NAME}' is the server's name; rename the hospital")
        if not any(a.role in ("project_admin", "lead") for a in self.admins):
            raise ValueError("admins: at least one project_admin or lead is needed to submit jobs")
        if self.ckks_key_holder is not None and self.ckks_key_holder not in self.hospitals:
            raise ValueError(f"ckks_key_holder: '{self.ckks_key_holder}' is not one of the hospitals "
                             f"({', '.join(self.hospitals)})")  # fmt: skip
        if self.min_contributors > len(self.hospitals):
            raise ValueError(
                f"min_contributors: {self.min_contributors} is more than the {len(self.hospitals)} hospitals; "
                "no aggregate could ever be released"
            )
        return self

    @property
    def key_holder(self) -> str:
        """The hospital that makes the CKKS secret context (``ckks_key_holder``, default the first hospital)."""
        return self.ckks_key_holder or next(iter(self.hospitals))

    def role_of(self, name: str) -> tuple[str, str, str | None]:
        """``(kind, org, role)`` of participant ``name``: kind ``server``, ``site`` or ``admin`` (role: the admin's
        NVFlare role, or ``auditor``). Raises ``KeyError`` for a name the network does not list."""
        if name == SERVER_NAME:
            return "server", self.server.org, None
        if name in self.hospitals:
            return "site", self.hospitals[name].org, None
        for a in self.admins:
            if a.name == name:
                return "admin", a.org, a.role
        for a in self.auditors:
            if a.name == name:
                return "admin", a.org, "auditor"
        raise KeyError(name)

    def submitter(self) -> AdminSpec:
        """The first identity that may submit jobs (``project_admin`` preferred)."""
        return sorted(
            (a for a in self.admins if a.role in ("project_admin", "lead")), key=lambda a: a.role != "project_admin"
        )[0]


def load_network(path: str | Path) -> NetworkSpec:
    """Read and validate a ``NETWORK.yml`` (errors name the file and field)."""
    return load_yaml(path, NetworkSpec)


def project_dict(network: NetworkSpec) -> dict:
    """The NVFlare ``project.yml`` (api_version 3) for ``network``, with medsilo's builders.

    Builder order matters: the HE contexts and medsilo's site files are written before the certificates,
    the peer certificates after them, and ``SignatureBuilder`` signs ``startup/`` (contexts and peers
    included) last, so a kit whose startup files were changed refuses to start.
    """
    participants: list[dict] = [
        {"name": SERVER_NAME, "type": "server", "org": network.server.org,
         "fed_learn_port": network.server.port, "default_host": network.server.host},
    ]  # fmt: skip
    participants += [{"name": name, "type": "client", "org": h.org} for name, h in network.hospitals.items()]
    participants += [{"name": a.name, "type": "admin", "org": a.org, "role": a.role} for a in network.admins]
    participants += [{"name": a.name, "type": "admin", "org": a.org, "role": "auditor"} for a in network.auditors]
    builders = "medsilo.provisioning.builders"
    return {
        "api_version": 3,
        "name": network.project,
        "description": "medsilo network (written by 'medsilo provision'; edit NETWORK.yml and re-run instead)",
        "participants": participants,
        "builders": [
            {"path": "nvflare.lighter.impl.workspace.WorkspaceBuilder"},
            {"path": "nvflare.lighter.impl.static_file.StaticFileBuilder",
             "args": {"config_folder": "config", "scheme": "grpc"}},
            {"path": f"{builders}.MedsiloHEBuilder", "args": {"poly_modulus_degree": network.he.poly_modulus_degree}},
            {"path": f"{builders}.SitePolicyBuilder",
             "args": {"required_modes": {n: h.require for n, h in network.hospitals.items()},
                      "min_contributors": network.min_contributors, "server_storage": network.server.storage}},
            {"path": "nvflare.lighter.impl.cert.CertBuilder"},
            {"path": f"{builders}.PeerCertsBuilder"},
            {"path": "nvflare.lighter.impl.signature.SignatureBuilder"},
        ],
    }  # fmt: skip
