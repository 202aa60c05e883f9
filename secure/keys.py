"""Where each party finds its keys, certificates, CKKS context and privacy ledger — simulated or deployed.

Who holds what (``docs/threat-model.md``):

* the **server**: the *public* CKKS context only (no secret key: it adds ciphertexts, never decrypts), its own
  signing key, and every site's certificate (to check who signed an upload before recording it);
* every **site**: the secret CKKS context (one key set per federation, shared by its sites, as in NVFlare's HE
  model), its own signing key, and every site's certificate (to check who contributed to an aggregate before
  releasing it).

One signing identity per party signs both its uploads (:mod:`medsilo.secure.upload`) and its ledger entries
(:mod:`medsilo.secure.ledger`). Certificates of peers are accepted only when issued by the party's root CA and
only for the common name they are filed under; ``server`` is never a peer.

**Deployment** (startup kits), relative to the party's workspace::

    privacy_ledger.jsonl                     the party's ledger
    startup/rootCA.pem                       the project's root CA
    startup/client.key, client.crt           a site's key and certificate (server.key, server.crt: the server)
    startup/peers/<site>.crt                 every site's certificate (site and server kits)
    startup/client_context.tenseal           a site's secret CKKS context (0600)
    startup/server_context.tenseal           the server's public CKKS context
    local/ckks_keys.json                     a site's CKKS key versions (distributed provisioning; no secret):
                                             {"current": n, "fingerprints": {"1": sha256, ...}}

**Simulation** (``medsilo sim`` sets :data:`LEDGER_DIR_ENV` to ``ledgers/`` beside ``sites.yml``, so ledgers and
budgets persist across runs as a site's workspace would, and :data:`HE_DIR_ENV` to the run's key folder)::

    LEDGER_DIR/<party>/privacy_ledger.jsonl  each party's ledger
    LEDGER_DIR/pki/rootCA.pem, rootCA.key    a local root CA, made once (:func:`ensure_simulation_pki`)
    LEDGER_DIR/pki/<party>.key, <party>.crt  each party's key and certificate (CN = party)
    HE_DIR/server/server_context.tenseal     public context (0644)
    HE_DIR/<site>/client_context.tenseal     secret context (0600)

**Key versions.** A site provisioned the distributed way records every CKKS key set it held
(:func:`record_key_version`; ``medsilo keys rotate`` adds version n+1). Its secret context must be the current
version (:meth:`Party.he_context`), and ciphertexts made under a retired version are refused
(:meth:`Party.check_key_version`). Simulations and centrally provisioned kits have no record and skip both.

In the simulator every party runs as the same OS user on one machine, so these files model the layout, not a
security boundary.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from medsilo.secure import pki
from medsilo.secure.files import write_atomic
from medsilo.secure.ledger import LEDGER_FILE, Ledger

HE_DIR_ENV = "MEDSILO_HE_DIR"
"""Simulation only: folder of the run's CKKS contexts (layout in the module docstring)."""
LEDGER_DIR_ENV = "MEDSILO_LEDGER_DIR"
"""Simulation only: folder of every party's ledger and the local PKI (module docstring)."""
SERVER = "server"
"""The server's party name in ledgers and certificates."""
SERVER_CONTEXT, CLIENT_CONTEXT = "server_context.tenseal", "client_context.tenseal"
KEY_VERSIONS = Path("local") / "ckks_keys.json"
"""A site's record of its CKKS key versions, relative to its kit (module docstring)."""


class KeyMaterialError(pki.PKIError):
    """A key, certificate or context a party needs is missing or not trusted; the message names the file."""


class RetiredKeyError(KeyMaterialError):
    """Ciphertexts or a context under a CKKS key version the site no longer uses."""


def read_key_versions(kit: str | Path) -> dict | None:
    """``{"current": n, "fingerprints": {version: sha256}}`` from ``<kit>/local/ckks_keys.json`` (versions as
    ints), or ``None`` when the kit has no record (simulation, central provisioning).

    Raises:
        KeyMaterialError: the file exists but is not a valid record (named).
    """
    path = Path(kit) / KEY_VERSIONS
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        record = {"current": int(data["current"]), "fingerprints": {int(v): str(f) for v, f in data["fingerprints"].items()}}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise KeyMaterialError(f"{path}: not a CKKS key-version record ({type(exc).__name__}); re-import the "
                               "current key ('medsilo provision import-key')") from None  # fmt: skip
    if record["current"] not in record["fingerprints"]:
        raise KeyMaterialError(f"{path}: current key version {record['current']} has no fingerprint")
    return record


def record_key_version(kit: str | Path, version: int, fingerprint: str) -> dict:
    """Make ``version`` (CKKS key set ``fingerprint``) the kit's current key version; older ones stay listed as
    retired. Refuses to go back to an older version or to change a version's fingerprint."""
    record = read_key_versions(kit) or {"current": 0, "fingerprints": {}}
    known = record["fingerprints"].get(version)
    if known is not None and known != fingerprint:
        raise KeyMaterialError(f"{Path(kit) / KEY_VERSIONS}: key version {version} is already another key set "
                               f"({known[:12]}…); a version is never reused")  # fmt: skip
    if version < record["current"]:
        raise RetiredKeyError(f"{Path(kit) / KEY_VERSIONS}: key version {version} is retired (current: "
                              f"{record['current']}); a site never goes back to a retired key")  # fmt: skip
    record["fingerprints"][version] = fingerprint
    record["current"] = version
    path = Path(kit) / KEY_VERSIONS
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"current": version, "fingerprints": {str(v): f for v, f in sorted(record["fingerprints"].items())}}
    write_atomic(path, json.dumps(data, indent=2) + "\n", 0o644, "CKKS key-version record", error=KeyMaterialError)
    return record


def ensure_simulation_pki(folder: str | Path, parties: Iterable[str]) -> Path:
    """Create ``folder/pki`` (a local root CA, one certificate per site and one for the server) unless they
    exist; returns it."""
    out = Path(folder) / "pki"
    out.mkdir(parents=True, exist_ok=True)
    if (out / pki.ROOT_CA_CERT).is_file():
        ca_key, ca_cert = (
            pki.load_private_key(out / pki.ROOT_CA_KEY),
            pki.load_certificate(out / pki.ROOT_CA_CERT),
        )
    else:
        ca_key, ca_cert = pki.make_local_ca(out)
    for party in [*parties, SERVER]:
        if not (out / f"{party}.crt").is_file():
            pki.issue_certificate(ca_key, ca_cert, party, out)
    return out


def generate_simulation_contexts(
    out: str | Path, sites: Iterable[str], poly_modulus_degree: int = 8192
) -> Path:
    """Write a fresh CKKS key set under ``out``: the server's public context, each site's secret one."""
    # Lazy on purpose: medsilo.secure.anchors imports this module (for SERVER) on an auditor's
    # `medsilo audit verify` path, which must not load TenSEAL or torch; only a party that makes or loads a
    # CKKS context pays for them.
    from medsilo.secure.ckks import make_context, save_context

    out = Path(out)
    sites = list(sites)
    for folder in (SERVER, *sites):
        (out / folder).mkdir(parents=True, exist_ok=True)
    ctx = make_context(poly_modulus_degree)
    save_context(ctx, out / SERVER / SERVER_CONTEXT, secret=False)
    for site in sites:
        save_context(ctx, out / site / CLIENT_CONTEXT, secret=True)
    return out


@dataclass
class Party:
    """One party's key material and ledger, resolved for simulation or deployment (module docstring).

    Args:
        name: the site's name, or :data:`SERVER`.
        workspace: its NVFlare workspace root (deployment locations).
    """

    name: str
    workspace: Path
    _peers: dict | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.workspace = Path(self.workspace)
        value = os.environ.get(LEDGER_DIR_ENV)
        self._sim = Path(value) if value else None

    @property
    def is_server(self) -> bool:
        return self.name == SERVER

    @property
    def _startup(self) -> Path:
        return self.workspace / "startup"

    @property
    def root_ca(self) -> Path:
        """The root CA every certificate this party trusts must chain to."""
        return self._sim / "pki" / pki.ROOT_CA_CERT if self._sim else self._startup / pki.ROOT_CA_CERT

    @property
    def ledger_path(self) -> Path:
        return self._sim / self.name / LEDGER_FILE if self._sim else self.workspace / LEDGER_FILE

    def _key_files(self) -> tuple[Path, Path]:
        if self._sim:
            return self._sim / "pki" / f"{self.name}.key", self._sim / "pki" / f"{self.name}.crt"
        role = "server" if self.is_server else "client"
        return self._startup / f"{role}.key", self._startup / f"{role}.crt"

    def ledger(self) -> Ledger:
        """This party's ledger, signed with its key (the folder is created in simulation)."""
        path = self.ledger_path
        if self._sim:
            path.parent.mkdir(parents=True, exist_ok=True)
        key, cert = self._key_files()
        return Ledger(path, self.name, key, cert)

    def signing_key(self) -> pki.PrivateKey:
        return pki.load_private_key(self._key_files()[0])

    def public_key(self) -> pki.PublicKey:
        """This party's own signature public key (from its certificate)."""
        return pki.load_public_key(self._key_files()[1])

    def peers(self) -> dict[str, pki.PublicKey]:
        """Every site's signature public key, from certificates issued by :attr:`root_ca` whose CN is the site.

        Raises:
            PKIError: no peer folder or no certificates in it, an unreadable certificate, one issued by another
                CA, or one whose CN is not the name it is filed under.
        """
        if self._peers is None:
            folder = self._sim / "pki" if self._sim else self._startup / "peers"
            if not folder.is_dir():
                raise KeyMaterialError(f"{folder}: no folder of site certificates; the {self.name} cannot check who signed "
                                "an upload (re-provision the kit)")  # fmt: skip
            ca = pki.load_certificate(self.root_ca)
            peers = {}
            for path in sorted(folder.glob("*.crt")):
                if path.stem == SERVER:
                    continue
                cert = pki.load_certificate(path)
                pki.verify_certificate(cert, ca)
                if pki.common_name_of(cert) != path.stem:
                    raise KeyMaterialError(
                        f"{path}: certificate is for CN={pki.common_name_of(cert)!r}, not {path.stem!r}"
                    )
                peers[path.stem] = pki.certificate_public_key(cert, str(path))
            if not peers:
                raise KeyMaterialError(f"{folder}: holds no site certificates (*.crt)")
            self._peers = peers
        return self._peers

    def he_context(self):
        """The site's secret CKKS context, or the server's public one (a secret one there is refused)."""
        from medsilo.secure.ckks import load_context  # lazy: TenSEAL and torch off the audit path (see above)

        he = os.environ.get(HE_DIR_ENV)
        name = SERVER_CONTEXT if self.is_server else CLIENT_CONTEXT
        path = Path(he) / self.name / name if he else self._startup / name
        ctx = load_context(path, secret=not self.is_server)
        record = self.key_versions()
        if record is not None:
            from medsilo.secure.ckks import fingerprint  # lazy, as above

            fp, current = fingerprint(ctx), record["current"]
            if fp != record["fingerprints"][current]:
                retired = [v for v, f in record["fingerprints"].items() if f == fp]
                what = f"retired key version {retired[0]}" if retired else "a key set this site never recorded"
                raise (RetiredKeyError if retired else KeyMaterialError)(
                    f"{path}: holds {what}, but {self.workspace / KEY_VERSIONS} says the current CKKS key version "
                    f"is {current}; import the current key ('medsilo provision import-key') before running a job")
        return ctx

    def key_versions(self) -> dict | None:
        """The site's CKKS key-version record (:func:`read_key_versions`); ``None`` in simulation or a kit
        without one."""
        return None if self._sim or os.environ.get(HE_DIR_ENV) else read_key_versions(self.workspace)

    def check_key_version(self, fingerprints: Iterable[str]) -> None:
        """Refuse ciphertexts made under a retired CKKS key version of this site (no record: no check).

        Raises:
            RetiredKeyError: naming the retired version and the current one.
        """
        record = self.key_versions()
        if record is None:
            return
        by_fp = {f: v for v, f in record["fingerprints"].items()}
        for fp in fingerprints:
            version = by_fp.get(fp)
            if version is not None and version != record["current"]:
                raise RetiredKeyError(f"{self.name}: ciphertexts under retired CKKS key version {version} (this site's "
                                      f"current key version is {record['current']}, {self.workspace / KEY_VERSIONS}); "
                                      "a job under a retired key is refused — re-run it under the current key")  # fmt: skip
