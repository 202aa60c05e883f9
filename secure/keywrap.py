"""Wrap a secret for one peer site: only that site can open it, and it can prove which site sent it.

This is how the network's CKKS secret context travels between hospitals without the server or the
coordinator ever holding it (key custody): the site that made the key wraps it once per peer, and the
wrapped blobs may pass through anyone (the server's job store, an e-mail) because nobody but the named
recipient can open one, and nobody can forge one.

A wrapped blob is one JSON object (ASCII)::

    {"format": "medsilo-keywrap/1",
     "project": ..., "key_version": ..., "purpose": "ckks-secret-context",   what the secret is, for which network
     "sender": "hospital-1", "sender_certificate": PEM,                      who wrapped it (CA-issued certificate)
     "recipient": "hospital-2", "recipient_fingerprint": sha256(cert DER),   the one site that can open it
     "wrapped_key": b64(RSA-OAEP-SHA256(k)),                                 k: a fresh 256-bit AES key
     "nonce": b64(12 bytes), "ciphertext": b64(AES-256-GCM_k(secret, aad=header)),
     "signature": b64(sign(sender key, canonical JSON of every field above))}

``header`` is the canonical JSON of the first seven fields, so the ciphertext cannot be moved to another
project, key version, purpose, sender or recipient without the tag failing; the sender's signature (Ed25519
or RSA-PSS, :func:`medsilo.secure.pki.sign`) covers the wrapped key and the ciphertext too, so nobody else can
produce a blob that opens as the sender's. Opening checks, in this order and failing closed: the format and
field types, the recipient is this site and its certificate, the sender's certificate was issued by the
project's root CA and names the sender, the signature, the project, purpose and key version expected, then
decrypts.

The recipient key must be RSA (NVFlare's provisioned site keys are RSA 2048): Ed25519 keys sign but cannot
receive encrypted data. This module needs only ``cryptography``.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from medsilo.errors import MedsiloError
from medsilo.secure import pki

FORMAT = "medsilo-keywrap/1"
HEADER_FIELDS = ("format", "project", "key_version", "purpose", "sender", "sender_certificate", "recipient",
                 "recipient_fingerprint")  # fmt: skip
"""The fields bound into the AES-GCM tag (the additional authenticated data)."""
FIELDS = (*HEADER_FIELDS, "wrapped_key", "nonce", "ciphertext", "signature")
MAX_SECRET_BYTES = 512 * 1024 * 1024
"""The largest secret :func:`wrap` accepts (a CKKS secret context with Galois keys is tens of MiB)."""
_OAEP = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)


class KeyWrapError(MedsiloError):
    """A wrapped secret that cannot be made or opened; the message says which check failed."""


def wrap(
    secret: bytes,
    *,
    project: str,
    key_version: int,
    purpose: str,
    sender: str,
    sender_key: pki.PrivateKey,
    sender_certificate: x509.Certificate,
    recipient_certificate: x509.Certificate,
) -> bytes:
    """Wrap ``secret`` so that only the holder of ``recipient_certificate``'s private key can open it.

    Args:
        secret: the bytes to protect (e.g. a serialised CKKS secret context).
        project: the network's project name; :func:`unwrap` expects the same.
        key_version: the key set's version (≥ 1); :func:`unwrap` expects the same.
        purpose: what the secret is (e.g. ``ckks-secret-context``); :func:`unwrap` expects the same.
        sender: this site's name (the CN of ``sender_certificate``).
        sender_key: this site's private key, the one ``sender_certificate`` certifies.
        sender_certificate: this site's certificate.
        recipient_certificate: the peer's certificate (its key must be RSA).

    Returns:
        The wrapped blob (JSON bytes).

    Raises:
        KeyWrapError: an empty or oversized secret, a recipient key that cannot receive (not RSA), a sender
            key that does not match its certificate, or a certificate that does not name the sender.
    """
    if not secret or len(secret) > MAX_SECRET_BYTES:
        raise KeyWrapError(f"the secret to wrap must hold 1 to {MAX_SECRET_BYTES} bytes (got {len(secret)})")
    if isinstance(key_version, bool) or not isinstance(key_version, int) or key_version < 1:
        raise KeyWrapError(f"key_version: must be an integer ≥ 1 (got {key_version!r})")
    if pki.common_name_of(sender_certificate) != sender:
        raise KeyWrapError(f"the sender certificate names '{pki.common_name_of(sender_certificate)}', not '{sender}'")
    if pki.key_id(sender_key.public_key()) != pki.key_id(pki.certificate_public_key(sender_certificate)):
        raise KeyWrapError(f"{sender}: the private key does not belong to its certificate")
    recipient_key = recipient_certificate.public_key()
    recipient = pki.common_name_of(recipient_certificate)
    if not isinstance(recipient_key, rsa.RSAPublicKey):
        raise KeyWrapError(f"{recipient}: its certificate's key is {type(recipient_key).__name__}; a wrapped key "
                           "needs an RSA recipient key (NVFlare's provisioned site keys are RSA)")  # fmt: skip
    body: dict[str, Any] = {
        "format": FORMAT, "project": project, "key_version": key_version, "purpose": purpose, "sender": sender,
        "sender_certificate": pki.certificate_pem(sender_certificate), "recipient": recipient,
        "recipient_fingerprint": pki.certificate_fingerprint(recipient_certificate),
    }  # fmt: skip
    aes_key, nonce = AESGCM.generate_key(bit_length=256), os.urandom(12)
    body["wrapped_key"] = _b64(recipient_key.encrypt(aes_key, _OAEP))
    body["nonce"] = _b64(nonce)
    body["ciphertext"] = _b64(AESGCM(aes_key).encrypt(nonce, secret, _canonical(body, HEADER_FIELDS)))
    body["signature"] = _b64(pki.sign(sender_key, _canonical(body, FIELDS[:-1])))
    return _canonical(body, FIELDS)


def unwrap(
    blob: bytes,
    *,
    project: str,
    key_version: int,
    purpose: str,
    recipient_key: pki.PrivateKey,
    recipient_certificate: x509.Certificate,
    root_ca: x509.Certificate,
    sender: str | None = None,
) -> tuple[bytes, str]:
    """Open a blob made by :func:`wrap` for this site.

    Args:
        blob: the wrapped blob.
        project, key_version, purpose: what this site expects (a blob for another network, key set or use is
            refused even though it would decrypt).
        recipient_key: this site's private key (RSA).
        recipient_certificate: this site's certificate.
        root_ca: the project's root CA certificate; the sender's certificate must be issued by it.
        sender: the site this blob must come from (``None``: any site the root CA certified).

    Returns:
        ``(secret, sender)``.

    Raises:
        KeyWrapError: the first check that fails, named (never the secret).
    """
    body = _parse(blob)
    me = pki.common_name_of(recipient_certificate)
    if body["recipient"] != me or body["recipient_fingerprint"] != pki.certificate_fingerprint(recipient_certificate):
        raise KeyWrapError(f"this wrapped key is for '{body['recipient']}' (certificate "
                           f"{body['recipient_fingerprint'][:12]}…), not for {me}")  # fmt: skip
    try:
        sender_cert = pki.certificate_from_pem(body["sender_certificate"], "sender certificate")
        pki.verify_certificate(sender_cert, root_ca)
    except pki.PKIError as exc:
        raise KeyWrapError(f"wrapped key from '{body['sender']}': {exc}") from None
    if pki.common_name_of(sender_cert) != body["sender"]:
        raise KeyWrapError(f"wrapped key: the sender certificate names '{pki.common_name_of(sender_cert)}', not "
                           f"'{body['sender']}'")  # fmt: skip
    if sender is not None and body["sender"] != sender:
        raise KeyWrapError(f"wrapped key from '{body['sender']}'; this site expects it from '{sender}'")
    if not pki.verify_signature(pki.certificate_public_key(sender_cert), _unb64(body, "signature"),
                                _canonical(body, FIELDS[:-1])):  # fmt: skip
        raise KeyWrapError(f"wrapped key from '{body['sender']}': the signature does not verify (altered in transit)")
    for field, want in (("project", project), ("key_version", key_version), ("purpose", purpose)):
        if body[field] != want:
            raise KeyWrapError(f"wrapped key from '{body['sender']}' is for {field} {body[field]!r}; this site "
                               f"expects {want!r}")  # fmt: skip
    if not isinstance(recipient_key, rsa.RSAPrivateKey):
        raise KeyWrapError(f"{me}: a wrapped key opens only with an RSA private key")
    try:
        aes_key = recipient_key.decrypt(_unb64(body, "wrapped_key"), _OAEP)
        return AESGCM(aes_key).decrypt(_unb64(body, "nonce"), _unb64(body, "ciphertext"),
                                       _canonical(body, HEADER_FIELDS)), body["sender"]  # fmt: skip
    except (ValueError, InvalidTag):
        raise KeyWrapError(f"wrapped key from '{body['sender']}' does not open with {me}'s private key "
                           "(a different key, or altered in transit)") from None  # fmt: skip


def describe(blob: bytes) -> dict[str, Any]:
    """The blob's public facts (project, key version, purpose, sender, recipient), nothing decrypted; for
    listings and ``site check``. Raises :class:`KeyWrapError` for a malformed blob."""
    body = _parse(blob)
    return {k: body[k] for k in ("project", "key_version", "purpose", "sender", "recipient")}


def _parse(blob: bytes) -> dict[str, Any]:
    if not isinstance(blob, bytes | bytearray) or len(blob) > 2 * MAX_SECRET_BYTES:
        raise KeyWrapError("wrapped key: not a blob of the expected size")
    try:
        body = json.loads(blob)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise KeyWrapError("wrapped key: not JSON (truncated or not a medsilo wrapped key)") from None
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        raise KeyWrapError(f"wrapped key: format is not {FORMAT}")
    if set(body) != set(FIELDS):
        raise KeyWrapError(f"wrapped key: fields {sorted(set(body) ^ set(FIELDS))} missing or unexpected")
    for field in FIELDS:
        want = int if field == "key_version" else str
        if not isinstance(body[field], want) or isinstance(body[field], bool):
            raise KeyWrapError(f"wrapped key: field '{field}' must be a {want.__name__}")
    return body


def _canonical(body: dict[str, Any], fields: tuple[str, ...]) -> bytes:
    return json.dumps({k: body[k] for k in fields}, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(body: dict[str, Any], field: str) -> bytes:
    try:
        return base64.b64decode(body[field], validate=True)
    except (binascii.Error, ValueError):
        raise KeyWrapError(f"wrapped key: field '{field}' is not base64") from None
