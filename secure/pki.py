"""Certificates for ledger signers: a local CA for simulations, issuing, loading and checking X.509 certificates.

In a deployment every party's certificate comes from NVFlare provisioning: the startup kit holds
``startup/rootCA.pem`` (the project's root CA), ``startup/client.crt`` + ``client.key`` for a site
(``CN=<site name>``) or ``server.crt`` + ``server.key`` for the server (``CN=server``); those keys are RSA and
the certificates are signed by the root CA. Simulations have no kits, so :func:`make_local_ca` and
:func:`issue_certificate` build the same shape locally (Ed25519 by default; RSA on request)::

    OUT/rootCA.pem, OUT/rootCA.key           the local root CA (certificate 0644, key 0600)
    OUT/<common name>.crt, .key              one party's certificate (CN = party name) and key

The privacy ledger (:mod:`medsilo.secure.ledger`) embeds each signer's certificate in the ledger itself, so
an auditor needs only the ledger files and the root CA. :func:`verify_certificate` is the check the auditor
runs: issued by the root CA (issuer name and the CA's signature over the certificate), the CA is a CA, and
both are valid at the time that matters (the ledger entry's time, not today: an expired certificate does
not invalidate entries signed while it was valid).

Signatures (:func:`sign`, :func:`verify_signature`): Ed25519, or RSA-PSS with MGF1-SHA-256, SHA-256 and a
32-byte salt (any salt length accepted when verifying).

Key files: :func:`save_private_key` (PKCS#8 PEM, mode 0600), :func:`save_public_key`, :func:`load_private_key`
and :func:`load_public_key` (a PEM public key or a certificate). This module needs only ``cryptography``.
"""

from __future__ import annotations

import hashlib
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from cryptography.x509.oid import NameOID

from medsilo.errors import MedsiloError
from medsilo.secure.files import write_atomic

PrivateKey = ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey
PublicKey = ed25519.Ed25519PublicKey | rsa.RSAPublicKey
KEY_TYPES = ("ed25519", "rsa")
ROOT_CA_CERT, ROOT_CA_KEY = "rootCA.pem", "rootCA.key"
"""File names :func:`make_local_ca` writes (the certificate's name is NVFlare's, ``startup/rootCA.pem``)."""


class PKIError(MedsiloError):
    """A certificate or key that cannot be used; the message names the file or certificate and why."""


def make_local_ca(
    out_dir: str | os.PathLike | None,
    common_name: str = "medsilo local root CA",
    key_type: str = "ed25519",
    days: int = 3650,
) -> tuple[PrivateKey, x509.Certificate]:
    """Create a self-signed root CA for a simulation and write ``rootCA.pem`` + ``rootCA.key`` under ``out_dir``.

    Args:
        out_dir: folder to write into (created if missing); ``None`` writes nothing (tests).
        common_name: the CA's subject CN.
        key_type: ``"ed25519"`` (default) or ``"rsa"`` (2048-bit, as NVFlare provisions).
        days: validity from now.

    Returns:
        ``(ca_key, ca_cert)``.

    Raises:
        PKIError: unknown ``key_type``, or ``days`` < 1; CKKSError (a :class:`MedsiloError`) if a file
            cannot be written.
    """
    key = _new_key(key_type)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.now(UTC)
    cert = (
        _builder(name, name, key.public_key(), now, days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )  # fmt: skip
        .sign(key, _cert_hash(key))
    )
    _save(out_dir, ROOT_CA_KEY, ROOT_CA_CERT, key, cert)
    return key, cert


def issue_certificate(
    ca_key: PrivateKey,
    ca_cert: x509.Certificate,
    common_name: str,
    out_dir: str | os.PathLike | None,
    key_type: str = "ed25519",
    days: int = 365,
) -> tuple[PrivateKey, x509.Certificate]:
    """Issue a party certificate (``CN=common_name``, e.g. a site name or ``server``) signed by the CA.

    Writes ``out_dir/<common_name>.crt`` (0644) and ``out_dir/<common_name>.key`` (0600).

    Args:
        ca_key: the CA's private key (from :func:`make_local_ca`).
        ca_cert: the CA's certificate.
        common_name: the party's name; it is what the ledger checks against each entry's ``party``.
        out_dir: folder to write into (created if missing); ``None`` writes nothing (tests).
        key_type: ``"ed25519"`` (default) or ``"rsa"``.
        days: validity from now.

    Returns:
        ``(key, cert)``.

    Raises:
        PKIError: an empty name or one with a path separator, unknown ``key_type``, ``days`` < 1, or a CA key
            that does not match ``ca_cert``.
    """
    if (
        not isinstance(common_name, str)
        or not common_name
        or "/" in common_name
        or common_name in (".", "..")
    ):
        raise PKIError(f"common_name: must be a non-empty name without '/', got {common_name!r}")
    if _public_der(ca_key.public_key()) != _public_der(ca_cert.public_key()):
        raise PKIError(f"CA key does not match the CA certificate ({common_name_of(ca_cert)})")
    key = _new_key(key_type)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (
        _builder(subject, ca_cert.subject, key.public_key(), datetime.now(UTC), days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, _cert_hash(ca_key))
    )
    _save(out_dir, f"{common_name}.key", f"{common_name}.crt", key, cert)
    return key, cert


def load_certificate(path: str | os.PathLike) -> x509.Certificate:
    """Load a PEM X.509 certificate (e.g. a kit's ``startup/rootCA.pem`` or ``client.crt``).

    Raises:
        PKIError: naming the file: missing, unreadable, or not a PEM certificate.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise PKIError(f"{path}: certificate file not found") from None
    except OSError as e:
        raise PKIError(f"{path}: cannot read certificate file ({e.strerror or e})") from None
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as e:
        raise PKIError(f"{path}: not a PEM X.509 certificate ({e})") from None


def certificate_from_pem(pem: str, what: str = "certificate") -> x509.Certificate:
    """Parse a PEM certificate given as text (as embedded in a ledger entry).

    Raises:
        PKIError: ``what`` is not a PEM certificate.
    """
    try:
        return x509.load_pem_x509_certificate(pem.encode("ascii"))
    except (ValueError, UnicodeEncodeError) as e:
        raise PKIError(f"{what}: not a PEM X.509 certificate ({e})") from None


def public_key_from_pem(pem: str, what: str = "public key") -> PublicKey:
    """Parse a PEM SubjectPublicKeyInfo public key given as text (Ed25519 or RSA).

    Raises:
        PKIError: not a PEM public key, or an unsupported key type.
    """
    try:
        key = serialization.load_pem_public_key(pem.encode("ascii"))
    except (ValueError, UnicodeEncodeError, UnsupportedAlgorithm) as e:
        raise PKIError(f"{what}: not a PEM public key ({e})") from None
    return _check_key_type(key, what)


def certificate_pem(cert: x509.Certificate) -> str:
    """``cert`` as PEM text."""
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def public_key_pem(public_key: PublicKey) -> str:
    """``public_key`` as SubjectPublicKeyInfo PEM text."""
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")


def certificate_fingerprint(cert: x509.Certificate) -> str:
    """Lowercase hex SHA-256 of the certificate's DER bytes (``openssl x509 -noout -fingerprint -sha256``,
    without the colons)."""
    return cert.fingerprint(hashes.SHA256()).hex()


def key_id(public_key: PublicKey) -> str:
    """Lowercase hex SHA-256 of the public key's DER SubjectPublicKeyInfo (identifies a bare public key)."""
    return hashlib.sha256(_public_der(public_key)).hexdigest()


def common_name_of(cert: x509.Certificate) -> str:
    """The certificate subject's CN (``""`` when it has none)."""
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""


def certificate_public_key(cert: x509.Certificate, what: str = "certificate") -> PublicKey:
    """The certificate's public key, refusing key types other than Ed25519 and RSA."""
    return _check_key_type(cert.public_key(), what)


def verify_certificate(cert: x509.Certificate, ca_cert: x509.Certificate, at: datetime | None = None) -> None:
    """Check that ``cert`` was issued by ``ca_cert`` and that both were valid at ``at`` (default: now).

    Checks: the CA certificate is a CA (basic constraints); ``cert``'s issuer is the CA's subject and its
    signature verifies with the CA's public key; ``at`` lies inside both validity periods.

    Raises:
        PKIError: which check failed, naming the certificate by CN.
    """
    at = at or datetime.now(UTC)
    cn = common_name_of(cert) or "(no CN)"
    try:
        constraints = ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise PKIError(
            f"root CA {common_name_of(ca_cert)!r} is not a CA certificate (basic constraints CA=false)"
        )
    try:
        cert.verify_directly_issued_by(ca_cert)
    except ValueError:
        raise PKIError(
            f"certificate CN={cn} was issued by {cert.issuer.rfc4514_string()}, "
            f"not by the root CA {ca_cert.subject.rfc4514_string()}"
        ) from None
    except (InvalidSignature, TypeError, UnsupportedAlgorithm):
        raise PKIError(f"certificate CN={cn}: its signature does not verify with the root CA's key") from None
    for what, c in (("certificate CN=" + cn, cert), ("root CA", ca_cert)):
        if not c.not_valid_before_utc <= at <= c.not_valid_after_utc:
            raise PKIError(
                f"{what} is not valid at {at.isoformat()} (valid {c.not_valid_before_utc.isoformat()} to "
                f"{c.not_valid_after_utc.isoformat()})"
            )


def sign(private_key: PrivateKey, data: bytes) -> bytes:
    """Sign ``data``: Ed25519, or RSA-PSS (MGF1-SHA-256, SHA-256, 32-byte salt).

    Raises:
        PKIError: an unsupported key type.
    """
    if isinstance(private_key, ed25519.Ed25519PrivateKey):
        return private_key.sign(data)
    if isinstance(private_key, rsa.RSAPrivateKey):
        return private_key.sign(data, _pss(padding.PSS.DIGEST_LENGTH), hashes.SHA256())
    raise PKIError(f"signing key type {type(private_key).__name__} is not supported; use Ed25519 or RSA")


def verify_signature(public_key: PublicKey, signature: bytes, data: bytes) -> bool:
    """Whether ``signature`` over ``data`` verifies with ``public_key`` (RSA: PSS, any salt length)."""
    try:
        if isinstance(public_key, ed25519.Ed25519PublicKey):
            public_key.verify(signature, data)
        elif isinstance(public_key, rsa.RSAPublicKey):
            public_key.verify(signature, data, _pss(padding.PSS.AUTO), hashes.SHA256())
        else:
            return False
    except InvalidSignature:
        return False
    return True


def _check_key_type(key: object, what: str) -> PublicKey:
    if not isinstance(key, ed25519.Ed25519PublicKey | rsa.RSAPublicKey):
        raise PKIError(
            f"{what}: {type(key).__name__} keys are not supported for signatures; use Ed25519 or RSA"
        )
    return key


def _new_key(key_type: str) -> PrivateKey:
    if key_type == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise PKIError(f"key_type: must be one of {', '.join(KEY_TYPES)}, got {key_type!r}")


def _builder(
    subject: x509.Name, issuer: x509.Name, public_key: PublicKey, now: datetime, days: int
) -> x509.CertificateBuilder:
    if isinstance(days, bool) or not isinstance(days, int) or days < 1:
        raise PKIError(f"days: must be an integer ≥ 1, got {days!r}")
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=days))
    )


def _cert_hash(key: PrivateKey) -> hashes.HashAlgorithm | None:
    return None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()


def _public_der(public_key: PublicKey) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _pss(salt_length: int) -> padding.PSS:
    return padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=salt_length)


def _save(
    out_dir: str | os.PathLike | None, key_name: str, cert_name: str, key: PrivateKey, cert: x509.Certificate
) -> None:
    if out_dir is None:
        return
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_private_key(key, out / key_name)
    write_atomic(out / cert_name, cert.public_bytes(serialization.Encoding.PEM), 0o644, "certificate", error=PKIError)


# ---- key files ---------------------------------------------------------------------------------------


def save_private_key(private_key: PrivateKey, path: str | os.PathLike) -> Path:
    """Write ``private_key`` as unencrypted PKCS#8 PEM, atomically, mode 0600."""
    data = private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return write_atomic(path, data, 0o600, "private key", error=PKIError)


def save_public_key(public_key: PublicKey, path: str | os.PathLike) -> Path:
    """Write ``public_key`` as SubjectPublicKeyInfo PEM, atomically, mode 0644."""
    data = public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return write_atomic(path, data, 0o644, "public key", error=PKIError)


def load_private_key(path: str | os.PathLike, password: bytes | None = None) -> PrivateKey:
    """Load a PEM private key (Ed25519 or RSA, e.g. a kit's ``startup/client.key``).

    Raises:
        PKIError: naming the file: missing, unreadable, not a PEM key, wrong or missing password, or an
            unsupported key type.
    """
    path = Path(path)
    data = _read_key_file(path, "private key")
    try:
        key = serialization.load_pem_private_key(data, password=password)
    except TypeError as e:  # encrypted without password, or password for an unencrypted key
        raise PKIError(f"{path}: {e}") from e
    except (ValueError, UnsupportedAlgorithm) as e:
        raise PKIError(f"{path}: not a readable PEM private key ({e}); check the file and its password") from e
    if not isinstance(key, ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey):
        raise PKIError(f"{path}: {type(key).__name__} keys are not supported for signing; use Ed25519 or RSA")
    return key


def load_public_key(path: str | os.PathLike) -> PublicKey:
    """Load a public key from a PEM public key or a PEM X.509 certificate (a kit's ``client.crt``).

    The certificate is not checked against a root CA here (:func:`verify_certificate` does that).

    Raises:
        PKIError: naming the file: missing, unreadable, neither a PEM public key nor a certificate, or an
            unsupported key type.
    """
    path = Path(path)
    data = _read_key_file(path, "public key")
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            key = x509.load_pem_x509_certificate(data).public_key()
        else:
            key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as e:
        raise PKIError(f"{path}: not a PEM public key or X.509 certificate ({e})") from e
    return _check_key_type(key, str(path))


def _read_key_file(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as e:
        raise PKIError(f"{path}: {what} file not found") from e
    except OSError as e:
        raise PKIError(f"{path}: cannot read {what} file ({e.strerror or e})") from e
