"""Aggregate release: a site decrypts a sum of encrypted uploads only when enough signed sites are in it.

For server-side learning under ``ckks`` (FedTGP, FedKTL: DESIGN §3, §5) the server needs a *plaintext*
aggregate, but it holds no secret key. It asks one site to release the aggregate and sends it the
individual :class:`~medsilo.secure.ckks.EncryptedUpload` of every contributor, each with the contributor's
signature over the upload's digest (:meth:`~medsilo.secure.ckks.EncryptedUpload.digest`). The releasing site
(:func:`release`):

1. refuses a site named twice, a site it has no public key for, the same ciphertext presented under two
   names, and fewer than ``min_contributors`` distinct sites ("2 contributors, need ≥ 3");
2. recomputes every digest from the ciphertexts it received and verifies each signature (a signature
   over another digest, or a ciphertext modified after signing, is refused naming the site);
3. checks that all uploads share one key set and one layout, **re-adds the ciphertexts itself** (it never
   decrypts anything the server summed), decrypts the sum and returns only that plaintext aggregate plus a
   release record for its ledger (event ``aggregate_release``: sites, digests, time, ``min_contributors``,
   layout, CKKS parameters; never values).

Any failure raises :class:`ReleaseRefused` before anything is decrypted; the caller ledgers the refusal
(event ``refusal``) and sends nothing. The server thus never obtains a decryption of a single site's
ciphertext.

**Keys.** Each site signs with its own private key: Ed25519 by default (:func:`generate_signing_key` for
simulations); RSA keys are accepted too, because NVFlare startup kits carry an RSA key and certificate per
site (``startup/client.key``, ``client.crt``). RSA signatures use PSS with MGF1-SHA-256 and SHA-256 (the
maximum salt length when signing, any salt length accepted when verifying, as NVFlare signs). Public keys
load from a PEM public key or an X.509 certificate (:func:`load_public_key`). The signed message is
domain-separated (``medsilo/ckks-contribution/v1``) and binds site name, tag and digest, so a contribution
signature can never be mistaken for a ledger-entry signature made with the same key.

**Wire format.** :meth:`Contribution.to_bytes` (version 1): ``b"MSCKKC"``, uint16 version, uint32 header
length, JSON header ``{"signature": hex, "site", "tag"}``, the upload's own wire bytes
(:meth:`~medsilo.secure.ckks.EncryptedUpload.to_bytes`), SHA-256 of everything before (corruption only;
the signature is what the releasing site trusts).

**What is seen.** The server sees which sites contributed, the layouts, sizes and digests, and the
released plaintext aggregate; the releasing site sees the same aggregate (it decrypts it) and nothing finer.

**Limits** (what signatures cannot guarantee): ``tag`` (e.g. ``"<job id>/round-3"``) binds a contribution to
one round; :func:`release` is stateless, so refusing a *second* release of the same tag — which would let the
server difference two overlapping aggregates — is the ledger's job. A releasing site that is itself a
contributor learns the sum of the others (aggregate minus its own upload); with ``min_contributors = 2`` that
is one other site's upload, so policies should ask for ≥ 3. Sites colluding with the server can sign anything
(e.g. encryptions of zero) and shrink the effective crowd: the guarantee holds against the server alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import tenseal as ts
import torch
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

from medsilo.secure.ckks import CKKSError, EncryptedUpload, add, decrypt, parameters, write_atomic

CONTRIBUTION_MAGIC = b"MSCKKC"
CONTRIBUTION_VERSION = 1
_PREFIX = struct.Struct(">6sHI")  # magic, version, header length
SIGNING_DOMAIN = b"medsilo/ckks-contribution/v1\x00"
"""Prefix of every contribution signature's message (domain separation)."""

PrivateKey = ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey
PublicKey = ed25519.Ed25519PublicKey | rsa.RSAPublicKey


class ReleaseRefused(CKKSError):
    """The releasing site refused to decrypt an aggregate; the message says why (and names the site)."""


@dataclass(frozen=True)
class Contribution:
    """One site's encrypted upload as the server forwards it for a release.

    Attributes:
        site: the contributing site's name (as in ``public_keys``).
        upload: its encrypted upload, exactly as the site sent it.
        signature: the site's signature over :func:`signed_message` of (site, tag, upload digest).
        tag: what the contribution is for, e.g. ``"<job id>/round-3"``; bound into the signature.
    """

    site: str
    upload: EncryptedUpload
    signature: bytes
    tag: str = field(default="")

    def to_bytes(self) -> bytes:
        """Wire format v1: ``b"MSCKKC"``, uint16 version, uint32 header length, JSON header
        ``{"signature": hex, "site", "tag"}``, the upload's own wire bytes, SHA-256 of everything before."""
        header = json.dumps(
            {"signature": self.signature.hex(), "site": self.site, "tag": self.tag}, sort_keys=True
        ).encode("utf-8")
        body = (
            _PREFIX.pack(CONTRIBUTION_MAGIC, CONTRIBUTION_VERSION, len(header))
            + header
            + self.upload.to_bytes()
        )
        return body + hashlib.sha256(body).digest()

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> Contribution:
        """Parse :meth:`to_bytes`; the signature is *not* verified here (:func:`release` does).

        Raises:
            CKKSError: not this format, another version, corrupt/truncated (SHA-256) or a malformed header.
        """
        data = bytes(data)
        if len(data) < _PREFIX.size + 32 or not data.startswith(CONTRIBUTION_MAGIC):
            raise CKKSError(
                f"not a medsilo contribution ({len(data)} bytes, no {CONTRIBUTION_MAGIC.decode()} header)"
            )
        _, version, header_len = _PREFIX.unpack_from(data)
        if version != CONTRIBUTION_VERSION:
            raise CKKSError(
                f"contribution has wire format version {version}; this medsilo reads {CONTRIBUTION_VERSION}"
            )
        body = data[:-32]
        if hashlib.sha256(body).digest() != data[-32:]:
            raise CKKSError(f"contribution is corrupt or truncated ({len(data)} bytes, SHA-256 mismatch)")
        end = _PREFIX.size + header_len
        if end > len(body):
            raise CKKSError(f"contribution header claims {header_len} bytes but the message is shorter")
        try:
            header = json.loads(body[_PREFIX.size : end].decode("utf-8"))
            site, tag, signature = header["site"], header["tag"], bytes.fromhex(header["signature"])
        except (UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
            raise CKKSError(f"contribution header is malformed ({e})") from e
        if not isinstance(site, str) or not isinstance(tag, str):
            raise CKKSError("contribution header: 'site' and 'tag' must be strings")
        return cls(site, EncryptedUpload.from_bytes(body[end:]), signature, tag)


def signed_message(site: str, tag: str, digest: str) -> bytes:
    """The exact bytes a contribution signature covers: domain prefix + canonical JSON of site, tag, digest."""
    body = json.dumps({"digest": digest, "site": site, "tag": tag}, sort_keys=True, separators=(",", ":"))
    return SIGNING_DOMAIN + body.encode("utf-8")


def sign_contribution(
    site: str, upload: EncryptedUpload, private_key: PrivateKey, tag: str = ""
) -> Contribution:
    """Sign ``upload``'s digest as ``site`` (done at the site, right after encrypting).

    Args:
        site: this site's name.
        upload: the encrypted upload about to be sent.
        private_key: the site's Ed25519 or RSA private key.
        tag: round binding, e.g. ``"<job id>/round-3"`` (default empty).

    Raises:
        CKKSError: an unsupported key type or a non-string site/tag.
    """
    if not isinstance(site, str) or not site or not isinstance(tag, str):
        raise CKKSError(f"site must be a non-empty string and tag a string, got {site!r}, {tag!r}")
    message = signed_message(site, tag, upload.digest())
    if isinstance(private_key, ed25519.Ed25519PrivateKey):
        signature = private_key.sign(message)
    elif isinstance(private_key, rsa.RSAPrivateKey):
        signature = private_key.sign(message, _pss(padding.PSS.MAX_LENGTH), hashes.SHA256())
    else:
        raise CKKSError(
            f"site {site}: signing key type {type(private_key).__name__} is not supported; use Ed25519 or RSA"
        )
    return Contribution(site, upload, signature, tag)


def verify_contribution(contribution: Contribution, public_key: PublicKey) -> None:
    """Check ``contribution.signature`` over the digest recomputed from its ciphertexts.

    Raises:
        ReleaseRefused: the signature does not verify (names the site) or the key type is unsupported.
    """
    site = contribution.site
    message = signed_message(site, contribution.tag, contribution.upload.digest())
    try:
        if isinstance(public_key, ed25519.Ed25519PublicKey):
            public_key.verify(contribution.signature, message)
        elif isinstance(public_key, rsa.RSAPublicKey):
            public_key.verify(contribution.signature, message, _pss(padding.PSS.AUTO), hashes.SHA256())
        else:
            raise ReleaseRefused(
                f"site {site}: public key type {type(public_key).__name__} is not supported; use Ed25519 or RSA"
            )
    except InvalidSignature as e:
        raise ReleaseRefused(
            f"site {site}: signature does not match its encrypted upload (digest "
            f"{contribution.upload.digest()[:12]}…); the ciphertext was modified or signed by another key"
        ) from e


def release(
    contributions: Sequence[Contribution],
    public_keys: Mapping[str, PublicKey],
    secret_ctx: ts.Context,
    min_contributors: int,
    tag: str | None = None,
) -> tuple[dict[str, torch.Tensor], dict]:
    """Check, re-add and decrypt an aggregate of signed encrypted contributions (the site side of DESIGN §5).

    Privacy: what leaves the site is the returned plaintext **sum** over ≥ ``min_contributors`` distinct sites,
    never a single site's upload; the caller writes ``record`` to the site's ledger (event
    ``aggregate_release``) and sends the aggregate, or ledgers the :class:`ReleaseRefused` and sends nothing.

    Args:
        contributions: the contributions the server forwarded.
        public_keys: site name → that site's signature public key (from the provisioned kits).
        secret_ctx: this site's secret CKKS context.
        min_contributors: distinct validly signed sites required (the site policy's ``min_contributors``, ≥ 1).
        tag: when given, every contribution must carry exactly this tag (e.g. the round being released);
            otherwise all contributions must share one tag.

    Returns:
        ``(aggregate, record)``: ``{name: tensor}`` with the upload layout's shapes and dtypes, and a
        JSON-plain record ``{"event", "time", "tag", "sites", "digests", "contributors", "min_contributors",
        "aggregate_digest", "layout", "ckks"}``.

    Raises:
        ReleaseRefused: with the reason: bad ``min_contributors``, a duplicated or unknown site, the same
            ciphertext under two sites, too few contributors, a tag mismatch, an invalid signature, a key set
            or layout mismatch, or a context without secret key.
    """
    if isinstance(min_contributors, bool) or not isinstance(min_contributors, int) or min_contributors < 1:
        raise ReleaseRefused(f"min_contributors must be an integer ≥ 1, got {min_contributors!r}")
    contributions = list(contributions)
    seen: dict[str, Contribution] = {}
    by_digest: dict[str, str] = {}
    for c in contributions:
        if not isinstance(c, Contribution):
            raise ReleaseRefused(f"expected Contribution objects, got {type(c).__name__}")
        if c.site in seen:
            raise ReleaseRefused(f"site {c.site} contributes twice; each site may appear once in a release")
        if c.site not in public_keys:
            raise ReleaseRefused(
                f"site {c.site} is unknown: no public key for it (known: {', '.join(sorted(public_keys)) or 'none'})"
            )
        digest = c.upload.digest()
        if digest in by_digest:
            raise ReleaseRefused(
                f"sites {by_digest[digest]} and {c.site} present the same ciphertext (digest {digest[:12]}…); "
                "a replayed contribution does not count as another site"
            )
        seen[c.site], by_digest[digest] = c, c.site
    if len(seen) < min_contributors:
        raise ReleaseRefused(f"{len(seen)} contributors, need ≥ {min_contributors}")
    expected_tag = tag if tag is not None else contributions[0].tag
    for c in contributions:
        if c.tag != expected_tag:
            raise ReleaseRefused(
                f"site {c.site}: contribution is tagged {c.tag!r}, this release is for {expected_tag!r}"
            )
    for c in contributions:
        verify_contribution(c, public_keys[c.site])
    if not secret_ctx.is_private():
        raise ReleaseRefused(
            "cannot release: this context holds no secret key (only sites release aggregates)"
        )
    sites = [c.site for c in contributions]
    try:
        total = add(secret_ctx, [c.upload for c in contributions], labels=[f"site {s}" for s in sites])
        aggregate = decrypt(secret_ctx, total)
    except ReleaseRefused:
        raise
    except CKKSError as e:
        raise ReleaseRefused(str(e)) from e
    record = {
        "event": "aggregate_release",
        "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "tag": expected_tag,
        "sites": sorted(sites),
        "digests": {c.site: c.upload.digest() for c in sorted(contributions, key=lambda c: c.site)},
        "contributors": len(sites),
        "min_contributors": min_contributors,
        "aggregate_digest": total.digest(),
        "layout": total.layout.to_json(),
        "ckks": parameters(secret_ctx),
    }
    return aggregate, record


# ---- keys -------------------------------------------------------------------------------------------


def generate_signing_key() -> ed25519.Ed25519PrivateKey:
    """A fresh Ed25519 signing key (simulations; real sites use their startup-kit key)."""
    return ed25519.Ed25519PrivateKey.generate()


def save_private_key(private_key: PrivateKey, path: str | os.PathLike) -> Path:
    """Write ``private_key`` as unencrypted PKCS#8 PEM, atomically, mode 0600 (simulation workspaces)."""
    data = private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return write_atomic(path, data, 0o600, "private key")


def save_public_key(public_key: PublicKey, path: str | os.PathLike) -> Path:
    """Write ``public_key`` as SubjectPublicKeyInfo PEM, atomically, mode 0644."""
    data = public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return write_atomic(path, data, 0o644, "public key")


def load_private_key(path: str | os.PathLike, password: bytes | None = None) -> PrivateKey:
    """Load a PEM private key (Ed25519 or RSA, e.g. a kit's ``startup/client.key``).

    Raises:
        CKKSError: naming the file: missing, unreadable, not a PEM key, wrong or missing password, or an
            unsupported key type.
    """
    path = Path(path)
    data = _read(path, "private key")
    try:
        key = serialization.load_pem_private_key(data, password=password)
    except TypeError as e:  # encrypted without password, or password for an unencrypted key
        raise CKKSError(f"{path}: {e}") from e
    except (ValueError, UnsupportedAlgorithm) as e:
        raise CKKSError(
            f"{path}: not a readable PEM private key ({e}); check the file and its password"
        ) from e
    if not isinstance(key, ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey):
        raise CKKSError(
            f"{path}: {type(key).__name__} keys are not supported for signing; use Ed25519 or RSA"
        )
    return key


def load_public_key(path: str | os.PathLike) -> PublicKey:
    """Load a site's public key from a PEM public key or a PEM X.509 certificate (a kit's ``client.crt``).

    The certificate is not validated against the root CA here; provisioning decides which keys are trusted.

    Raises:
        CKKSError: naming the file: missing, unreadable, neither a PEM public key nor a certificate, or an
            unsupported key type.
    """
    path = Path(path)
    data = _read(path, "public key")
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            key = x509.load_pem_x509_certificate(data).public_key()
        else:
            key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as e:
        raise CKKSError(f"{path}: not a PEM public key or X.509 certificate ({e})") from e
    if not isinstance(key, ed25519.Ed25519PublicKey | rsa.RSAPublicKey):
        raise CKKSError(
            f"{path}: {type(key).__name__} keys are not supported for signatures; use Ed25519 or RSA"
        )
    return key


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as e:
        raise CKKSError(f"{path}: {what} file not found") from e
    except OSError as e:
        raise CKKSError(f"{path}: cannot read {what} file ({e.strerror or e})") from e


def _pss(salt_length: int) -> padding.PSS:
    return padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=salt_length)
