"""Revoking a party: an X.509 certificate revocation list (CRL) signed with the project's root CA key.

Removing a site from a network (it left, or its key was compromised) is the coordinator's act, and it must reach
two readers: every party that checks contributors' signatures (the server accepting uploads, a site releasing or
decrypting an aggregate), and the auditor reading ledgers afterwards. Both already trust the root CA, so the
removal is a standard CRL (RFC 5280) the root CA signs — no new trust anchor, and ``openssl crl`` reads it::

    openssl crl -in crl.pem -noout -text                     # the revoked serials and their times
    openssl verify -crl_check -CAfile rootCA.pem -CRLfile crl.pem signer.crt    # "certificate revoked"

Each entry is a certificate's serial number, the revocation time and a reason (``cessationOfOperation`` for a
site that left, ``keyCompromise`` …). :func:`revoke` adds entries to the list (keeping earlier ones, with an
increasing CRL number) and writes :data:`CRL_FILE`; :func:`load_crl` reads one and refuses it unless the root CA
signed it. Where it lives (:func:`find_crl`): beside the root CA (``LEDGER_DIR/pki/crl.pem`` in a simulation,
``crl.pem`` beside an auditor's ``rootCA.pem``), or in a kit's ``local/crl.pem`` — not under ``startup/``,
whose files NVFlare signed at provisioning (a new file there makes NVFlare refuse to start). The coordinator
sends the new list to every party after a revocation; since the root CA signs it, how it travels does not matter.

**What it changes.**

* Signatures (:func:`trusted_peers`): a party's peer keys leave out every site whose certificate the list
  revokes (at or before now), and :func:`medsilo.secure.upload.open_wire` refuses such a signer with a line
  naming the site, the serial and the revocation time — so a revoked site's upload is not accepted by the
  server, and a site releases or decrypts no aggregate it contributed to. A site dropped from the peers folder
  is refused the same way (unknown signer).
* Ledgers (``medsilo audit verify --crl``): entries signed by a revoked certificate *after* its revocation time
  are flagged; entries signed before it stay valid (the key was trusted when it signed them).

A party that deletes its copy of the list trusts the revoked site again — that is its own decision about its
own checks; the auditor checks ledgers against the list independently (``docs/threat-model.md``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from medsilo.secure import pki
from medsilo.secure.files import write_atomic

CRL_FILE = "crl.pem"
"""The list's file name, beside the root CA or in a kit's ``local/`` (module docstring)."""
REASONS = {"left": x509.ReasonFlags.cessation_of_operation, "compromised": x509.ReasonFlags.key_compromise,
           "superseded": x509.ReasonFlags.superseded}  # fmt: skip
"""Reasons :func:`revoke` accepts, by the word the coordinator uses."""
VALIDITY_DAYS = 3650
"""The list's ``nextUpdate``: medsilo reads the latest list it holds, so a long validity keeps it usable."""


class RevocationError(pki.PKIError):
    """A revocation list that cannot be read or was not signed by the root CA; the message names the file."""


@dataclass(frozen=True)
class Revoked:
    """One revoked certificate: its serial, when it was revoked, and the reason (``None`` when not stated)."""

    serial: int
    time: datetime
    reason: str | None
    """RFC 5280's name of the reason (``cessationOfOperation``, ``keyCompromise``, ``superseded``)."""

    def describe(self) -> str:
        """``certificate (serial …) was revoked at T (reason)`` — the phrase every refusal and flag uses."""
        why = f" ({self.reason})" if self.reason else ""
        return f"certificate (serial {self.serial:x}) was revoked at {self.time.isoformat()}{why}"


class RevocationList:
    """A CRL that verified against the root CA (:func:`load_crl`).

    Attributes:
        crl: the parsed list; path: where it was read from (``None`` when built in memory).
    """

    def __init__(self, crl: x509.CertificateRevocationList, path: Path | None = None):
        self.crl, self.path = crl, path
        self._by_serial: dict[int, Revoked] = {}
        for entry in crl:
            try:
                reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason.value
            except x509.ExtensionNotFound:
                reason = None
            serial = entry.serial_number
            self._by_serial[serial] = Revoked(serial, entry.revocation_date_utc, reason)

    def __len__(self) -> int:
        return len(self._by_serial)

    @property
    def entries(self) -> list[Revoked]:
        """Every revoked certificate, by serial."""
        return [self._by_serial[s] for s in sorted(self._by_serial)]

    def revoked(self, cert: x509.Certificate, at: datetime | None = None) -> Revoked | None:
        """The entry revoking ``cert`` when it was revoked at or before ``at`` (default: now), else ``None``.

        Only a certificate this list's issuer issued can be revoked by it (serials are unique per issuer)."""
        entry = self._by_serial.get(cert.serial_number)
        if entry is None or cert.issuer != self.crl.issuer:
            return None
        return entry if entry.time <= (at or datetime.now(UTC)) else None

    @property
    def number(self) -> int:
        """The list's CRL number (0 when it carries none); :func:`revoke` increases it."""
        try:
            return self.crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
        except x509.ExtensionNotFound:
            return 0


def load_crl(path: str | os.PathLike, root_ca: x509.Certificate) -> RevocationList:
    """Read a PEM (or DER) CRL and check that ``root_ca`` issued and signed it.

    Raises:
        RevocationError: naming the file: missing, unreadable, not a CRL, another issuer, or a bad signature.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise RevocationError(f"{path}: cannot read the revocation list ({e.strerror or e})") from None
    try:
        crl = (x509.load_pem_x509_crl if data.lstrip().startswith(b"-----") else x509.load_der_x509_crl)(data)
    except ValueError as e:
        raise RevocationError(f"{path}: not an X.509 revocation list ({e})") from None
    if crl.issuer != root_ca.subject:
        raise RevocationError(f"{path}: issued by {crl.issuer.rfc4514_string()}, not by the root CA "
                              f"{root_ca.subject.rfc4514_string()}; ask the coordinator for the project's list")  # fmt: skip
    if not crl.is_signature_valid(root_ca.public_key()):
        raise RevocationError(f"{path}: its signature does not verify with the root CA's key (altered, or signed "
                              "by another key); ask the coordinator for the project's list")  # fmt: skip
    return RevocationList(crl, path)


def find_crl(root_ca: str | os.PathLike, workspace: str | os.PathLike | None = None) -> Path | None:
    """The revocation list beside ``root_ca``, else in ``workspace/local/`` (a kit); ``None`` when there is none."""
    candidates = [Path(root_ca).parent / CRL_FILE]
    if workspace is not None:
        candidates.append(Path(workspace) / "local" / CRL_FILE)
    return next((p for p in candidates if p.is_file()), None)


def revoke(
    ca_key: pki.PrivateKey,
    ca_cert: x509.Certificate,
    certificates: Sequence[x509.Certificate],
    out: str | os.PathLike | None,
    *,
    reason: str = "left",
    at: datetime | None = None,
    previous: RevocationList | None = None,
) -> RevocationList:
    """Revoke ``certificates`` (the coordinator, with the root CA key): a new list = ``previous`` + these.

    Args:
        ca_key, ca_cert: the root CA (:func:`medsilo.secure.pki.make_local_ca`, or the provisioning root CA).
        certificates: the certificates to revoke; each must have been issued by ``ca_cert``.
        out: file to write the PEM list to (0644), or ``None`` (tests).
        reason: a key of :data:`REASONS`.
        at: the revocation time (default now); entries an auditor sees signed after it are flagged. A CRL
            stores whole seconds, so it is rounded down (fail closed: at most a second early).
        previous: the list in force, whose entries are kept (a certificate already on it keeps its time).

    Raises:
        RevocationError: an unknown reason, a certificate from another CA, or a CA key that is not the CA's.
    """
    if reason not in REASONS:
        raise RevocationError(f"reason: must be one of {', '.join(REASONS)}, got {reason!r}")
    if ca_key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) \
            != ca_cert.public_key().public_bytes(serialization.Encoding.DER,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo):  # fmt: skip
        raise RevocationError("the CA key does not match the root CA certificate; the root CA signs the list")
    now = datetime.now(UTC)
    at = (at or now).astimezone(UTC).replace(microsecond=0)
    builder = (x509.CertificateRevocationListBuilder().issuer_name(ca_cert.subject).last_update(now)
               .next_update(now + timedelta(days=VALIDITY_DAYS))
               .add_extension(x509.CRLNumber((previous.number if previous else 0) + 1), critical=False))  # fmt: skip
    seen: set[int] = set()
    for entry in previous.crl if previous else []:
        builder, _ = builder.add_revoked_certificate(entry), seen.add(entry.serial_number)
    for cert in certificates:
        if cert.issuer != ca_cert.subject:
            raise RevocationError(f"certificate CN={pki.common_name_of(cert)} was issued by "
                                  f"{cert.issuer.rfc4514_string()}, not by this root CA; it cannot be revoked here")  # fmt: skip
        if cert.serial_number in seen:
            continue
        seen.add(cert.serial_number)
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(cert.serial_number).revocation_date(at)
            .add_extension(x509.CRLReason(REASONS[reason]), critical=False).build())  # fmt: skip
    crl = builder.sign(ca_key, None if isinstance(ca_key, ed25519.Ed25519PrivateKey) else hashes.SHA256())
    path = None
    if out is not None:
        path = write_atomic(Path(out), crl.public_bytes(serialization.Encoding.PEM), 0o644, "revocation list",
                            error=RevocationError)  # fmt: skip
    return RevocationList(crl, path)


class Peers(dict):
    """Site name → signature public key, for the sites a party trusts, plus :attr:`revoked`: site name → the
    line saying why a site that has a certificate is *not* trusted (its certificate was revoked).

    :func:`medsilo.secure.upload.open_wire` names the revocation when such a site signed a wire."""

    def __init__(self, keys: Mapping[str, pki.PublicKey] = (), revoked: Mapping[str, str] | None = None):
        super().__init__(keys)
        self.revoked: dict[str, str] = dict(revoked or {})


def trusted_peers(
    keys: Mapping[str, pki.PublicKey],
    certificates: Mapping[str, x509.Certificate],
    crl: RevocationList | None,
    at: datetime | None = None,
) -> Peers:
    """``keys`` without the sites whose certificate ``crl`` revokes at ``at`` (default now) (module docstring).

    Args:
        keys: site → public key, from certificates checked against the root CA
            (:meth:`medsilo.secure.keys.Party.peers`).
        certificates: site → the certificate each key came from; a key without its certificate cannot be
            checked against the list and is left out (fail closed) when a list is given.
        crl: the list in force, or ``None`` (then ``keys`` are all trusted).
    """
    if crl is None:
        return Peers(keys)
    trusted, revoked = {}, {}
    for site, key in keys.items():
        cert = certificates.get(site)
        if cert is None or pki.key_id(pki.certificate_public_key(cert)) != pki.key_id(key):
            revoked[site] = f"site {site}: no certificate to check against the revocation list {crl.path}"
            continue
        entry = crl.revoked(cert, at)
        if entry is not None:
            revoked[site] = (
                f"site {site}: its {entry.describe()}; revocation list {crl.path or '(in memory)'}"
            )
        else:
            trusted[site] = key
    return Peers(trusted, revoked)


def peer_certificates(folder: str | os.PathLike, names: Sequence[str]) -> dict[str, x509.Certificate]:
    """``folder/<name>.crt`` for each name that has one (``startup/peers/`` in a kit, ``pki/`` in a simulation)."""
    folder = Path(folder)
    return {n: pki.load_certificate(folder / f"{n}.crt") for n in names if (folder / f"{n}.crt").is_file()}
