"""Distributed provisioning: every party makes its own private key; the coordinator only certifies it.

The normal mode for a real network (``medsilo provision init|request|approve|assemble``). Central
provisioning (:mod:`medsilo.provisioning.provision`) is the trusting mode: the coordinator makes every key.

Steps, and who runs them::

    coordinator   init      NETWORK.yml → COORD/ca/rootCA.pem (public) + rootCA.key (never leaves)
    each party    request   its own RSA key (PARTY/<name>.key, 0600, never leaves) + PARTY/<name>.csr
    coordinator   approve   <name>.csr → COORD/certs/<name>.crt (checked against NETWORK.yml: name, org, role)
    each party    assemble  its kit, at the party: NVFlare's provisioner with the certificate it received
                            (NVFlare's ``PrebuiltCertBuilder`` in place of ``CertBuilder``) and medsilo's
                            builders (privacy.json, allow-lists, auditor role, medsilo_site.yml, peers)
    hospitals     CKKS      the key holder (NETWORK.yml ``ckks_key_holder``, default the first hospital) makes
                            the secret context at assemble, wraps it to each peer's certificate
                            (:mod:`medsilo.secure.keywrap`) into COORD/relay/v<n>/<peer>.wrapped and writes the
                            public context COORD/relay/v<n>/server_context.tenseal; each peer imports its blob
                            (at assemble, or ``medsilo provision import-key`` later); the server installs only
                            the public context. ``medsilo keys rotate`` makes version n+1 the same way.

The relay folder may pass through the coordinator and the server: a blob opens only with its recipient's
private key and carries the sender's signature, and the public context decrypts nothing. A site takes a blob
only from the certificate it pinned for the sender (``startup/peers``), and ``peers`` never swaps a pinned
site's key silently: the root CA's holder could otherwise certify a key of its own under a site's name and
wrap a secret it keeps. A failed ``assemble`` leaves no kit and no half-written key version. Each kit records
where its secrets came from in ``local/custody.json`` (:mod:`medsilo.secure.custody`) and its CKKS key
versions in ``local/ckks_keys.json`` (:mod:`medsilo.secure.keys`).

Why NVFlare's library and not its ``nvflare cert approve`` / ``nvflare package`` commands: NVFlare 2.9 names
the server's certificate after its host and admits only ``org_admin``, ``lead`` and ``member`` requests, while
medsilo's ledgers identify the server as ``server`` (its certificate's CN) and its networks have a
``project_admin`` and ``auditor`` roles. The steps are NVFlare's (a CSR signed by the party's key, a
certificate made with ``nvflare.lighter.utils.generate_cert`` as ``CertBuilder`` makes it, a kit assembled by
NVFlare's ``Provisioner`` with ``PrebuiltCertBuilder``), so kits are the same as NVFlare's, without
``signature.json`` (as ``nvflare package`` kits: the certificates are the trust anchor).

Folder layouts::

    COORD/network.yml                 the network every party agreed on (send it to every party)
    COORD/ca/rootCA.pem, rootCA.key   root CA: the certificate goes to every party with its fingerprint; the key
                                      never leaves (0600)
    COORD/certs/<name>.crt            every approved certificate (public; the sites' are the peers bundle)
    COORD/crl.pem                     the revocation list (`revoke`): send it to every party as local/crl.pem
    COORD/relay/v<n>/                 CKKS key set n: server_context.tenseal + <site>.wrapped (useless to COORD)
    PARTY/<name>.key                  the party's private key (0600, never leaves)
    PARTY/<name>.csr, request.json    the request (send the .csr to the coordinator)
    OUT/<name>/                       the party's assembled kit (its NVFlare workspace)
"""

from __future__ import annotations

import contextlib
import datetime
import io
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID
from nvflare.lighter.constants import CtxKey, WorkDir
from nvflare.lighter.entity import Project
from nvflare.lighter.impl.static_file import StaticFileBuilder
from nvflare.lighter.impl.workspace import WorkspaceBuilder
from nvflare.lighter.provisioner import Provisioner
from nvflare.lighter.utils import (
    Identity,
    generate_cert,
    generate_keys,
    serialize_cert,
    serialize_pri_key,
    x509_name,
)
from nvflare.tool.package.package_commands import PrebuiltCertBuilder

from medsilo.errors import MedsiloError
from medsilo.fs import write_atomic
from medsilo.provisioning.builders import PeerCertsBuilder, SitePolicyBuilder, write_peers
from medsilo.provisioning.network import SERVER_NAME, NetworkSpec, load_network
from medsilo.secure import keywrap, pki
from medsilo.secure.ckks import CKKSError, fingerprint, load_context, make_context, public_copy, save_context
from medsilo.secure.custody import Custody, read_custody, write_custody
from medsilo.secure.keys import CLIENT_CONTEXT, SERVER_CONTEXT, read_key_versions, record_key_version
from medsilo.secure.revocation import CRL_FILE, load_crl, revoke

PURPOSE = "ckks-secret-context"
"""The :mod:`~medsilo.secure.keywrap` purpose of a wrapped CKKS secret context."""
CA_DIR, CERTS_DIR, RELAY_DIR = "ca", "certs", "relay"
CERT_DAYS = 1095
MAX_CSR_BYTES = 64 * 1024
"""The largest request ``approve`` reads (a PEM CSR for an RSA-2048 key is about 1 KiB)."""


class ProvisionError(MedsiloError):
    """A distributed-provisioning step that cannot go on; the message names the file and what to do."""


@dataclass(frozen=True)
class Request:
    """What ``request`` wrote for one party."""

    name: str
    key: Path
    csr: Path


# ---- coordinator ---------------------------------------------------------------------------------


def init(network: NetworkSpec | str | Path, coord: str | Path) -> str:
    """Create the root CA in ``COORD/ca`` and keep the agreed network as ``COORD/network.yml``.

    Returns:
        The root CA certificate's SHA-256 fingerprint (parties check it out of band at ``assemble``).

    Raises:
        ProvisionError: ``COORD/ca`` already holds a root CA (a second one would split the network).
    """
    net = network if isinstance(network, NetworkSpec) else load_network(network)
    coord = Path(coord).resolve()
    ca = coord / CA_DIR
    if (ca / pki.ROOT_CA_KEY).exists():
        raise ProvisionError(f"{ca / pki.ROOT_CA_KEY}: a root CA exists already; keep it (re-running init would "
                             "make every issued certificate useless) or use another folder")  # fmt: skip
    ca.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(ca, 0o700)
    key, pub = generate_keys()  # NVFlare's RSA-2048 keys, as 'nvflare cert init'
    ca_id = _identity(net.project, net.server.org)  # subject and issuer alike: a self-signed CA
    cert = generate_cert(ca_id, ca_id, key, pub, valid_days=3650, ca=True)
    write_atomic(ca / pki.ROOT_CA_KEY, serialize_pri_key(key), 0o600, "root CA key", error=ProvisionError)
    write_atomic(ca / pki.ROOT_CA_CERT, serialize_cert(cert), 0o644, "root CA certificate", error=ProvisionError)
    (coord / CERTS_DIR).mkdir(exist_ok=True)
    (coord / RELAY_DIR).mkdir(exist_ok=True)
    write_atomic(coord / "network.yml", yaml.safe_dump(net.model_dump(mode="json", exclude_none=True), sort_keys=False),
                 0o644, "network file", error=ProvisionError)  # fmt: skip
    return pki.certificate_fingerprint(cert)


def approve(coord: str | Path, csr_path: str | Path, *, days: int = CERT_DAYS) -> Path:
    """Certify a party's request with the root CA; the coordinator never sees the party's private key.

    The CSR must be signed by the key it names (proof of possession), for a participant ``COORD/network.yml``
    lists, with that participant's organisation and role; anything else is refused. The certificate is the
    same as NVFlare's ``CertBuilder`` makes (admins carry their role; the server's names its host).

    Returns:
        ``COORD/certs/<name>.crt`` (send it and ``COORD/ca/rootCA.pem`` back to the party).
    """
    coord = Path(coord).resolve()
    net = load_network(coord / "network.yml")
    try:
        info = os.stat(csr_path)  # before reading: a FIFO would block, a huge file would fill memory
        if not stat.S_ISREG(info.st_mode):
            raise ProvisionError(f"{csr_path}: not a regular file; ask the party for the .csr 'medsilo provision "
                                 "request' wrote")  # fmt: skip
        if info.st_size > MAX_CSR_BYTES:
            raise ProvisionError(f"{csr_path}: {info.st_size} bytes, too large for a certificate request (at most "
                                 f"{MAX_CSR_BYTES}); refused")  # fmt: skip
        csr = x509.load_pem_x509_csr(Path(csr_path).read_bytes())
    except (OSError, ValueError) as exc:
        raise ProvisionError(f"{csr_path}: not a readable certificate request ({type(exc).__name__}); ask the "
                             "party for the .csr 'medsilo provision request' wrote") from None  # fmt: skip
    if not csr.is_signature_valid:
        raise ProvisionError(f"{csr_path}: the request's signature does not verify; it was altered, refuse it")
    name, org, role = _subject(csr.subject)
    try:
        kind, want_org, want_role = net.role_of(name)
    except KeyError:
        raise ProvisionError(f"{csr_path}: '{name}' is not a participant of {coord / 'network.yml'}; add it "
                             "there first (and tell every party)") from None  # fmt: skip
    if org != want_org or role != want_role:
        raise ProvisionError(f"{csr_path}: '{name}' asks for org {org!r}, role {role!r}; the network says org "
                             f"{want_org!r}, role {want_role!r} — refused")  # fmt: skip
    out = coord / CERTS_DIR / f"{name}.crt"
    if out.exists():
        raise ProvisionError(f"{out}: '{name}' is certified already; remove the file first to certify a new key "
                             "(and revoke the old one)")  # fmt: skip
    ca_key = pki.load_private_key(coord / CA_DIR / pki.ROOT_CA_KEY)
    ca_cert = pki.load_certificate(coord / CA_DIR / pki.ROOT_CA_CERT)
    now = datetime.datetime.now(datetime.UTC)
    cert = generate_cert(_identity(name, org, role), _identity(*_subject(ca_cert.subject)[:2]), ca_key, csr.public_key(),
                         not_valid_before=now, not_valid_after=min(now + datetime.timedelta(days=days),
                                                                   ca_cert.not_valid_after_utc),
                         server_default_host=net.server.host if kind == "server" else None)  # fmt: skip
    out.parent.mkdir(exist_ok=True)
    write_atomic(out, serialize_cert(cert), 0o644, "certificate", error=ProvisionError)
    return out


# ---- each party ----------------------------------------------------------------------------------


def revoke_party(coord: str | Path, names: Sequence[str], *, reason: str = "left") -> Path:
    """The coordinator removes parties: their approved certificates go on the project's revocation list
    (``COORD/crl.pem``, a real X.509 CRL signed with the root CA: :func:`medsilo.secure.revocation.revoke`),
    keeping every earlier entry. Send the file to every party as ``<kit>/local/crl.pem``.

    Raises:
        ProvisionError: a name the coordinator never certified (nothing written).
        RevocationError: an unknown reason, or a list in force that the root CA did not sign.
    """
    coord = Path(coord).resolve()
    ca_key = pki.load_private_key(coord / CA_DIR / pki.ROOT_CA_KEY)
    ca_cert = pki.load_certificate(coord / CA_DIR / pki.ROOT_CA_CERT)
    certs = []
    for name in names:
        path = coord / CERTS_DIR / f"{name}.crt"
        if "/" in name or name in (".", "..") or not path.is_file():
            raise ProvisionError(f"{coord / CERTS_DIR}: no certificate for '{name}' was approved here; nothing to "
                                 "revoke (names: the .crt files there)")  # fmt: skip
        certs.append(pki.load_certificate(path))
    out = coord / CRL_FILE
    previous = load_crl(out, ca_cert) if out.is_file() else None
    revoke(ca_key, ca_cert, certs, out, reason=reason, previous=previous)
    return out


def request(network: NetworkSpec | str | Path, name: str, party_dir: str | Path) -> Request:
    """Make ``name``'s private key (here, 0600) and a certificate request for the coordinator.

    Raises:
        ProvisionError: ``name`` is not in the network, or a key exists already in ``party_dir``.
    """
    net = network if isinstance(network, NetworkSpec) else load_network(network)
    try:
        kind, org, role = net.role_of(name)
    except KeyError:
        raise ProvisionError(f"--name: '{name}' is not a participant of the network ({', '.join(_names(net))})") from None
    party = Path(party_dir).resolve()
    party.mkdir(parents=True, exist_ok=True, mode=0o700)
    key_path, csr_path = party / f"{name}.key", party / f"{name}.csr"
    if key_path.exists():
        raise ProvisionError(f"{key_path}: a private key exists already; keep using it (its request is "
                             f"{csr_path}) or move it away first")  # fmt: skip
    key, _ = generate_keys()
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509_name(name, org, role)).sign(key, hashes.SHA256())
    write_atomic(key_path, serialize_pri_key(key), 0o600, "private key", error=ProvisionError)
    write_atomic(csr_path, csr.public_bytes(serialization.Encoding.PEM), 0o644, "request", error=ProvisionError)
    write_atomic(party / "request.json", json.dumps({"project": net.project, "name": name, "kind": kind, "org": org,
                                                     "role": role}, indent=2) + "\n", 0o644, "request record",
                 error=ProvisionError)  # fmt: skip
    return Request(name, key_path, csr_path)


def assemble(network: NetworkSpec | str | Path, party_dir: str | Path, cert: str | Path, root_ca: str | Path,
             out: str | Path, *, peers: str | Path | None = None, relay: str | Path | None = None,
             root_ca_fingerprint: str | None = None, quiet: bool = True) -> Path:  # fmt: skip
    """Assemble this party's kit at ``OUT/<name>`` from its own key and the certificate the coordinator returned.

    Args:
        network: the agreed network.
        party_dir: the folder ``request`` wrote (holds the private key).
        cert: the certificate ``approve`` returned.
        root_ca: the root CA certificate the coordinator sent.
        out: where the kit folder goes.
        peers: folder of the sites' certificates (the coordinator's ``certs/``) — site and server kits.
        relay: the CKKS relay folder (the coordinator's ``relay/``): the key holder writes the key set into it;
            another site imports its wrapped key from it; the server takes the public context.
        root_ca_fingerprint: the fingerprint ``init`` printed, checked when given (strongly recommended).

    Raises:
        ProvisionError: a certificate not issued by the root CA, not for this party or not matching its key,
            a root CA with another fingerprint, or an existing kit.
    """
    net = network if isinstance(network, NetworkSpec) else load_network(network)
    party = Path(party_dir).resolve()
    meta = _read_request(party)
    name = meta["name"]
    kind, org, role = net.role_of(name)
    key_path = party / f"{name}.key"
    ca_cert = pki.load_certificate(root_ca)
    if root_ca_fingerprint and pki.certificate_fingerprint(ca_cert) != root_ca_fingerprint.lower().replace(":", ""):
        raise ProvisionError(f"{root_ca}: fingerprint {pki.certificate_fingerprint(ca_cert)} is not the one the "
                             "coordinator announced; do not use this root CA")  # fmt: skip
    my_cert = pki.load_certificate(cert)
    try:
        pki.verify_certificate(my_cert, ca_cert)
    except pki.PKIError as exc:
        raise ProvisionError(f"{cert}: {exc}") from None
    if pki.common_name_of(my_cert) != name:
        raise ProvisionError(f"{cert}: certificate is for '{pki.common_name_of(my_cert)}', not '{name}'")
    if pki.key_id(pki.load_private_key(key_path).public_key()) != pki.key_id(my_cert.public_key()):
        raise ProvisionError(f"{cert}: certificate does not certify the key in {key_path}; ask the coordinator to "
                             f"approve {party / (name + '.csr')}")  # fmt: skip
    out = Path(out).resolve()
    kit = out / name
    if kit.exists():
        raise ProvisionError(f"{kit}: a kit exists already; move it away to assemble again")
    out.mkdir(parents=True, exist_ok=True)
    _build_kit(net, name, kind, org, role, key_path, Path(cert), Path(root_ca), kit, peers, quiet)
    try:  # a step that fails leaves no kit behind that looks complete
        write_custody(kit, Custody("sites", "made-here"))
        if kind == "site" and relay is not None:
            if name == net.key_holder and not _versions(Path(relay)):
                make_key_set(kit, net, Path(peers) if peers else None, Path(relay))
            elif _versions(Path(relay)):
                # not shared yet: 'medsilo provision import-key' later
                with contextlib.suppress(FileNotFoundError):
                    import_key(kit, net, Path(relay))
        elif kind == "server" and relay is not None and _versions(Path(relay)):
            install_public_context(kit, Path(relay))
    except BaseException:
        shutil.rmtree(kit, ignore_errors=True)
        raise
    return kit


def _build_kit(net: NetworkSpec, name: str, kind: str, org: str, role: str | None, key: Path, cert: Path,
               root_ca: Path, kit: Path, peers, quiet: bool) -> None:  # fmt: skip
    """One kit through NVFlare's Provisioner: NVFlare's workspace, static files and prebuilt certificate, and
    medsilo's policy and peer builders (the same as central provisioning's)."""
    project = Project(name=net.project, description="medsilo network (distributed provisioning)")
    project.set_server(SERVER_NAME, net.server.org, {"fed_learn_port": net.server.port,
                                                     "default_host": net.server.host})  # fmt: skip
    if kind == "site":
        project.add_client(name, org, {})
    elif kind == "admin":
        project.add_admin(name, org, {"role": role})
    builders = [
        WorkspaceBuilder(),
        StaticFileBuilder(config_folder="config", scheme="grpc"),
        SitePolicyBuilder({n: h.require for n, h in net.hospitals.items()}, net.min_contributors,
                          server_storage=net.server.storage or str(kit / "storage")),
        PrebuiltCertBuilder(cert_path=str(cert), key_path=str(key), rootca_path=str(root_ca), target_name=name),
    ]  # fmt: skip
    if kind in ("site", "server") and peers is not None:
        builders.append(PeerCertsBuilder(certs_dir=str(peers), sites=list(net.hospitals)))
    with tempfile.TemporaryDirectory(dir=kit.parent, prefix=f".assemble-{name}-") as tmp:
        chatter = io.StringIO()
        try:
            with contextlib.redirect_stdout(chatter) if quiet else contextlib.nullcontext():
                ctx = Provisioner(tmp, builders).provision(project)
        except (ValueError, RuntimeError, OSError) as exc:
            raise ProvisionError(f"{kit}: NVFlare could not assemble the kit: {exc}") from exc
        if ctx.get(CtxKey.BUILD_ERROR) or not ctx.get(WorkDir.CURRENT_PROD_DIR):
            errors = "; ".join(ctx.get(CtxKey.ERRORS, [])) or chatter.getvalue().strip()[-500:]
            raise ProvisionError(f"{kit}: NVFlare could not assemble the kit: {errors}")
        shutil.move(str(Path(ctx[WorkDir.CURRENT_PROD_DIR]) / name), kit)  # only this party's kit leaves tmp
    for secret in kit.rglob("*.key"):
        os.chmod(secret, 0o600)


def update_peers(kit: str | Path, certs: str | Path) -> list[str]:
    """Refresh ``<kit>/startup/peers/`` from the coordinator's ``certs/`` (a site joined); returns the sites
    now known. Only certificates issued by the kit's root CA for a hospital of the network are taken."""
    kit, certs = Path(kit), Path(certs)
    ca = pki.load_certificate(kit / "startup" / pki.ROOT_CA_CERT)
    found = {}
    for path in sorted(certs.glob("*.crt")):
        cert = pki.load_certificate(path)
        try:
            pki.verify_certificate(cert, ca)
        except pki.PKIError as exc:
            raise ProvisionError(f"{path}: {exc}") from None
        if pki.common_name_of(cert) == path.stem and _is_site_cert(cert):
            pinned = kit / "startup" / "peers" / path.name
            if pinned.is_file() and pki.key_id(pki.load_public_key(pinned)) != pki.key_id(cert.public_key()):
                raise ProvisionError(f"{path}: certifies another key for '{path.stem}' than {pinned} (re-issued by the "
                                     "root CA holder); confirm the new certificate's fingerprint with the site out of "
                                     f"band, then remove {pinned} and run this again")  # fmt: skip
            found[path.stem] = path.read_bytes()
    write_peers(kit / "startup" / "peers", found)
    return sorted(found)


# ---- the CKKS key set: made by one site, shared only among sites -----------------------------------


def make_key_set(kit: str | Path, network: NetworkSpec, peers: Path | None, relay: Path) -> int:
    """At the site whose kit is ``kit``: make CKKS key version n+1 (1 for a new network), keep the secret context
    in its kit (0600), write the public context and one wrapped blob per peer site into ``relay/v<n+1>/``.

    The site's previous secret context is replaced (a retired key decrypts nothing more here); its fingerprint
    stays in ``local/ckks_keys.json`` so ciphertexts under it are refused by name.

    Returns:
        The new key version.
    """
    kit = Path(kit)
    record = read_key_versions(kit)
    version = max([record["current"] if record else 0, *_versions(relay)]) + 1
    folder = relay / f"v{version}"
    folder.mkdir(parents=True, exist_ok=False)
    try:  # a half-written version would look shared to the peers: remove it on failure
        ctx = make_context(network.he.poly_modulus_degree)
        save_context(ctx, kit / "startup" / CLIENT_CONTEXT, secret=True)
        save_context(ctx, folder / SERVER_CONTEXT, secret=False)
        record_key_version(kit, version, fingerprint(ctx))
        write_custody(kit, Custody("sites", "made-here", "made-here", None, version))
        share_key(kit, network, peers or kit / "startup" / "peers", relay)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return version


def share_key(kit: str | Path, network: NetworkSpec, peers: Path, relay: Path) -> list[str]:
    """Wrap this site's current secret context for every peer site in ``peers`` that has no blob yet in
    ``relay/v<current>/`` (also how a site that joined later gets the key); returns the sites wrapped for."""
    kit = Path(kit)
    name = _kit_name(kit)
    record = read_key_versions(kit)
    if record is None:
        raise ProvisionError(f"{kit}: holds no CKKS key set to share; import one first")
    version = record["current"]
    folder = relay / f"v{version}"
    folder.mkdir(parents=True, exist_ok=True)
    secret = (kit / "startup" / CLIENT_CONTEXT).read_bytes()
    key = pki.load_private_key(kit / "startup" / "client.key")
    me = pki.load_certificate(kit / "startup" / "client.crt")
    ca = pki.load_certificate(kit / "startup" / pki.ROOT_CA_CERT)
    done = []
    for path in sorted(Path(peers).glob("*.crt")):
        site = path.stem
        if site == name or site not in network.hospitals or (folder / f"{site}.wrapped").exists():
            continue
        cert = pki.load_certificate(path)
        try:
            pki.verify_certificate(cert, ca)
        except pki.PKIError as exc:
            raise ProvisionError(f"{path}: {exc}; not wrapping the key for it") from None
        blob = keywrap.wrap(secret, project=network.project, key_version=version, purpose=PURPOSE, sender=name,
                            sender_key=key, sender_certificate=me, recipient_certificate=cert)  # fmt: skip
        write_atomic(folder / f"{site}.wrapped", blob, 0o644, "wrapped key", error=ProvisionError)
        done.append(site)
    return done


def import_key(kit: str | Path, network: NetworkSpec, relay: Path, version: int | None = None,
               blob: Path | None = None) -> int:  # fmt: skip
    """Open this site's wrapped secret context (default: the newest version in ``relay``), check it against the
    public context of that version, and make it the kit's current key (0600).

    Raises:
        FileNotFoundError: no blob for this site in that version yet (the key holder has not shared it).
        ProvisionError: a blob for another site or network, tampered with, not from a certified site, a secret
            that does not match the public context, or a version older than the site's current one.
    """
    kit = Path(kit)
    name = _kit_name(kit)
    version = version or max(_versions(relay), default=0)
    folder = relay / f"v{version}"
    blob = blob or folder / f"{name}.wrapped"
    if not blob.is_file():
        raise FileNotFoundError(f"{blob}: no wrapped key for {name} in key version {version} yet")
    try:
        secret, sender = keywrap.unwrap(blob.read_bytes(), project=network.project, key_version=version, purpose=PURPOSE,
                                        recipient_key=pki.load_private_key(kit / "startup" / "client.key"),
                                        recipient_certificate=pki.load_certificate(kit / "startup" / "client.crt"),
                                        root_ca=pki.load_certificate(kit / "startup" / pki.ROOT_CA_CERT))  # fmt: skip
    except keywrap.KeyWrapError as exc:
        raise ProvisionError(f"{blob}: {exc}") from None
    if sender not in network.hospitals:
        raise ProvisionError(f"{blob}: wrapped by '{sender}', which is not a hospital of the network; refused")
    _check_pinned_sender(kit, blob, sender)
    public = folder / SERVER_CONTEXT
    try:
        expected = fingerprint(public.read_bytes())
    except (OSError, CKKSError) as exc:
        raise ProvisionError(f"{public}: the public context of key version {version} is missing or unreadable "
                             f"({exc}); it must come with the wrapped key") from None  # fmt: skip
    target = kit / "startup" / CLIENT_CONTEXT
    staged = target.with_name(f".{CLIENT_CONTEXT}.import")
    write_atomic(staged, secret, 0o600, "CKKS secret context", error=ProvisionError)
    try:
        try:
            ctx = load_context(staged, secret=True)
        except CKKSError as exc:
            raise ProvisionError(f"{blob}: the unwrapped secret is not a usable CKKS context ({exc})") from None  # fmt: skip
        if fingerprint(ctx) != expected:
            raise ProvisionError(f"{blob}: the secret context does not belong to {public} (fingerprint "
                                 f"{fingerprint(ctx)[:12]}… ≠ {expected[:12]}…); refused")  # fmt: skip
        record_key_version(kit, version, expected)
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    os.replace(staged, target)
    write_custody(kit, Custody("sites", "made-here", "wrapped", sender, version))
    return version


def install_public_context(kit: str | Path, relay: Path, version: int | None = None) -> int:
    """At the server: install key version ``version`` (default the newest) public context from ``relay``; a
    context holding a secret key is refused (and so never installed)."""
    version = version or max(_versions(relay), default=0)
    src = relay / f"v{version}" / SERVER_CONTEXT
    try:
        data = public_copy(load_context(src, secret=False))
    except CKKSError as exc:
        raise ProvisionError(str(exc)) from None
    write_atomic(Path(kit) / "startup" / SERVER_CONTEXT, data, 0o644, "CKKS public context", error=ProvisionError)
    return version


# ---- every party on one machine (POC, tests) -----------------------------------------------------


def provision_here(network: NetworkSpec, root: str | Path) -> Path:
    """Run every party's steps on this machine, each in its own folder, in the order a real network would.

    Layout: ``ROOT/coordinator/`` (root CA, certificates, relay), ``ROOT/parties/<name>/`` (each party's key and
    request), ``ROOT/kits/<name>/`` (each party's kit). The key holder assembles first, so it wraps the CKKS key
    for every peer; then the other sites (importing theirs), the server (public context only), admins and
    auditors. Returns ``ROOT/kits``.
    """
    root = Path(root).resolve()
    coord, kits = root / "coordinator", root / "kits"
    fp = init(network, coord)
    names = _names(network)
    for name in names:
        approve(coord, request(network, name, root / "parties" / name).csr)
    order = [network.key_holder, *(n for n in names if n != network.key_holder)]
    for name in order:
        assemble(network, root / "parties" / name, coord / CERTS_DIR / f"{name}.crt", coord / CA_DIR / pki.ROOT_CA_CERT,
                 kits, peers=coord / CERTS_DIR, relay=coord / RELAY_DIR, root_ca_fingerprint=fp)  # fmt: skip
    return kits


# ---- helpers -------------------------------------------------------------------------------------


def _identity(name: str, org: str | None = None, role: str | None = None) -> Identity:
    return Identity(name, org, role)


def _subject(subject: x509.Name) -> tuple[str, str | None, str | None]:
    def one(oid):
        values = subject.get_attributes_for_oid(oid)
        return values[0].value if values else None

    return one(NameOID.COMMON_NAME), one(NameOID.ORGANIZATION_NAME), one(NameOID.UNSTRUCTURED_NAME)


def _is_site_cert(cert: x509.Certificate) -> bool:
    return not cert.subject.get_attributes_for_oid(NameOID.UNSTRUCTURED_NAME) and pki.common_name_of(cert) != SERVER_NAME


def _names(net: NetworkSpec) -> list[str]:
    return [SERVER_NAME, *net.hospitals, *(a.name for a in net.admins), *(a.name for a in net.auditors)]


def _read_request(party: Path) -> dict:
    path = party / "request.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        raise ProvisionError(f"{path}: missing or unreadable; point --request-dir at the folder "
                             "'medsilo provision request' wrote") from None  # fmt: skip


def _kit_name(kit: Path) -> str:
    try:
        return pki.common_name_of(pki.load_certificate(kit / "startup" / "client.crt"))
    except pki.PKIError as exc:
        raise ProvisionError(f"{kit}: not a site kit ({exc})") from None


def _check_pinned_sender(kit: Path, blob: Path, sender: str) -> None:
    """A wrapped key is taken only from the certificate this kit pinned for its sender (``startup/peers``): the
    root CA's holder can certify a key of its own under a site's name, and wrap a secret it keeps."""
    pinned = kit / "startup" / "peers" / f"{sender}.crt"
    if not pinned.is_file():
        raise ProvisionError(f"{blob}: wrapped by '{sender}', whose certificate this kit has not pinned ({pinned}); "
                             "run 'medsilo provision peers' first")  # fmt: skip
    try:
        used = pki.certificate_from_pem(json.loads(blob.read_bytes())["sender_certificate"], "sender cert")
    except (OSError, ValueError, KeyError, TypeError, pki.PKIError) as exc:
        raise ProvisionError(f"{blob}: unreadable sender certificate ({type(exc).__name__})") from None
    if pki.key_id(used.public_key()) != pki.key_id(pki.load_public_key(pinned)):
        raise ProvisionError(f"{blob}: signed with a certificate for '{sender}' that is not the certificate this kit "
                             f"pinned ({pinned}): a re-issued certificate; refused — ask {sender} out of band")  # fmt: skip


def _versions(relay: Path) -> list[int]:
    if not relay.is_dir():
        return []
    return sorted(int(p.name[1:]) for p in relay.iterdir() if p.is_dir() and p.name[1:].isdigit() and p.name[0] == "v")


def custody_summary(kit: str | Path) -> str:
    """One line on where the kit's secrets came from (for the CLI)."""
    custody = read_custody(kit)
    return custody.describe() if custody else "no custody record (a kit from before custody was recorded)"
