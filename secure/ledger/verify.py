"""Reading and verifying ledgers: what ``medsilo audit verify`` and a site's budget rely on.

**Verification** (:func:`verify_file`, :func:`verify`) reports the *first* bad line of each file:
not ASCII, bad JSON, a missing/unknown/mistyped field, not canonical, a torn last line (no newline at the
end), another party's entry, a ``seq`` gap or repeat (deleted, inserted or moved lines), a ``prev`` that does
not match the line before, an embedded certificate that does not match ``signer`` or whose CN is not the
party, an unknown signer, a signature that does not verify (an edited field), and, with a root CA, a signer
certificate not issued by it or not valid at the entry's time. Without a root CA the certificate on line 1 is
trusted on first use and a signer change later in the file is reported (a key rotation can only be accepted
against the root CA). :func:`verified_entries`, :func:`costs` and :func:`cumulative` read only a ledger that
verifies; :func:`entries` parses without checking chain or signatures.

**Limits.** Removing lines from the *end* leaves a valid shorter ledger: the file alone cannot show it, nor a
whole ledger copied into another party's folder. :mod:`medsilo.secure.anchors` closes both across ledgers: every
upload a site signs carries its ledger head, the server's ledger records each statement it received
(``received``), and ``medsilo audit verify`` reports a site ledger shorter than, or different from, what the
server recorded, and a ledger in another party's place. Whoever holds the party's private key can still rewrite
the history the server never saw; the ledger proves what the key holder wrote, in order, and that nobody else
changed it.

**Check one entry with openssl** (no medsilo needed; line 5 of ``privacy_ledger.jsonl``; tested with OpenSSL 3.0)::

    # the signer's certificate: embedded on line 1 (after a key rotation, on the line where the signer first appears)
    sed -n 1p privacy_ledger.jsonl | python3 -c 'import json,sys; sys.stdout.write(json.load(sys.stdin)["certificate"])' > signer.crt
    openssl verify -CAfile rootCA.pem signer.crt                        # issued by the provisioned root CA
    openssl x509 -in signer.crt -noout -subject -fingerprint -sha256    # CN = party; fingerprint = "signer"
    openssl x509 -in signer.crt -noout -pubkey > signer.pub
    # the signed bytes (the line without its "sig" field) and the signature
    sed -n 5p privacy_ledger.jsonl | sed -E 's/,"sig":"[^"]*"}$/}/' | tr -d '\\n' > entry.bin
    sed -n 5p privacy_ledger.jsonl | sed -E 's/.*,"sig":"([^"]*)"}$/\\1/' | base64 -d > entry.sig
    openssl pkeyutl -verify -pubin -inkey signer.pub -rawin -in entry.bin -sigfile entry.sig       # Ed25519
    openssl dgst -sha256 -sigopt rsa_padding_mode:pss -sigopt rsa_pss_saltlen:-2 \\
        -verify signer.pub -signature entry.sig entry.bin                                          # RSA kit keys
    sed -n 4p privacy_ledger.jsonl | tr -d '\\n' | sha256sum      # equals line 5's "prev"

(``jq -j .certificate`` extracts the certificate as well as the ``python3`` one-liner.)
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from cryptography import x509

from medsilo.secure import pki
from medsilo.secure.ledger.format import (
    GENESIS,
    SIGNER_FIELDS,
    SPENDING_EVENTS,
    LedgerError,
    canonical,
    decode_sig,
    line_hash,
    parse_line,
)


@dataclass(frozen=True)
class Problem:
    """The first bad line of a ledger file: ``file:line: reason`` (lines count from 1)."""

    file: Path
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}"


@dataclass
class FileCheck:
    """Result of :func:`verify_file`: the entries that verified (up to the first problem) and the problem."""

    file: Path
    entries: list[dict] = field(default_factory=list)
    problem: Problem | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None


def verify_file(
    path: str | os.PathLike, root_ca: x509.Certificate | str | os.PathLike | None = None
) -> FileCheck:
    """Verify one ledger file: every line's form, chain link and signature (this module's docstring lists the checks).

    Args:
        path: the ledger file.
        root_ca: the provisioned root CA (certificate or PEM file, e.g. a kit's ``startup/rootCA.pem``); when
            given, every signer certificate must be issued by it, valid at the entry's time, with CN = party.

    Returns:
        The entries up to the first bad line and that line's :class:`Problem` (``None`` when all hold).

    Raises:
        LedgerError: the file is missing or unreadable; PKIError: the root CA file cannot be loaded.
    """
    path = Path(path)
    ca = pki.load_certificate(root_ca) if isinstance(root_ca, str | os.PathLike) else root_ca
    data = _read(path)
    check = FileCheck(path)
    if not data:
        return check
    raw_lines = data.split(b"\n")
    torn = raw_lines.pop()  # b"" when the file ends with a newline
    state = _ChainState()
    for number, raw in enumerate(raw_lines, start=1):
        entry, reason = parse_line(raw)
        if entry is not None:
            reason = state.check(entry, number, ca)
        if reason:
            check.problem = Problem(path, number, reason)
            return check
        state.prev = line_hash(raw)
        check.entries.append(entry)
    if torn:
        check.problem = Problem(
            path, len(raw_lines) + 1, "torn last line (no newline at the end: a crash while appending?)"
        )
    return check


def verify(
    paths: str | os.PathLike | Iterable[str | os.PathLike],
    root_ca: x509.Certificate | str | os.PathLike | None = None,
) -> list[Problem]:
    """Verify ledger files; returns the first :class:`Problem` of each bad file (empty when all hold).

    Raises:
        LedgerError: a file is missing or unreadable; PKIError: the root CA cannot be loaded.
    """
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    ca = pki.load_certificate(root_ca) if isinstance(root_ca, str | os.PathLike) else root_ca
    return [c.problem for c in (verify_file(p, ca) for p in paths) if c.problem]


def entries(path: str | os.PathLike) -> list[dict]:
    """Parse a ledger's entries *without* checking chain or signatures (use :func:`verified_entries` for that).

    Raises:
        LedgerError: missing/unreadable file, or a line that is not a well-formed entry (``file:line: reason``).
    """
    path = Path(path)
    data = _read(path)
    lines = data.split(b"\n")
    if lines[-1]:
        raise LedgerError(f"{path}:{len(lines)}: torn last line (no newline at the end)")
    result = []
    for number, raw in enumerate(lines[:-1], start=1):
        entry, reason = parse_line(raw)
        if entry is None:
            raise LedgerError(f"{path}:{number}: {reason}")
        result.append(entry)
    return result


def verified_entries(
    path: str | os.PathLike, root_ca: x509.Certificate | str | os.PathLike | None = None
) -> list[dict]:
    """All entries of a ledger that passes :func:`verify_file`.

    Raises:
        LedgerError: ``file:line: reason`` of the first bad line (nothing is returned from a bad ledger).
    """
    check = verify_file(path, root_ca)
    if check.problem:
        raise LedgerError(f"{check.problem} (refusing to use a ledger that fails verification)")
    return check.entries


def costs(
    path: str | os.PathLike, scope: str, root_ca: x509.Certificate | str | os.PathLike | None = None
) -> list[dict]:
    """The ``privacy`` dicts of the spending entries (:data:`SPENDING_EVENTS`) in budget ``scope``, oldest first.

    For accountants that compose tighter than :func:`cumulative` (RDP/PLD from the recorded mechanism
    parameters). Raises :class:`LedgerError` when the ledger fails verification.
    """
    return [
        e["privacy"]
        for e in verified_entries(path, root_ca)
        if e["event"] in SPENDING_EVENTS and e["privacy"] is not None and e["privacy"].get("scope") == scope
    ]


def cumulative(
    path: str | os.PathLike, scope: str, root_ca: x509.Certificate | str | os.PathLike | None = None
) -> tuple[float, float]:
    """``(Σ epsilon, Σ delta)`` over the spending entries of budget ``scope`` in a verified ledger.

    Basic (additive) composition: a valid upper bound on what was spent. Refusals never count (nothing left).

    Raises:
        LedgerError: the ledger is missing or fails verification (no total is computed from it).
    """
    spent = costs(path, scope, root_ca)
    return float(sum(p.get("epsilon", 0.0) for p in spent)), float(sum(p.get("delta", 0.0) for p in spent))


@dataclass
class _ChainState:
    party: str | None = None
    seq: int = 0
    prev: str = GENESIS
    signers: dict[str, tuple[pki.PublicKey, x509.Certificate | None]] = field(default_factory=dict)

    def check(self, entry: dict, number: int, ca: x509.Certificate | None) -> str | None:
        """The reason ``entry`` (line ``number``) is bad, or ``None``; records the signer it introduces."""
        party, signer = entry["party"], entry["signer"]
        if self.party is None:
            self.party = party
        elif party != self.party:
            return f"entry of party {party!r} in the ledger of {self.party!r} (line 1)"
        if entry["seq"] != self.seq:
            return f"seq {entry['seq']} where {self.seq} was expected: a line was deleted, inserted or moved"
        if entry["prev"] != self.prev:
            which = "the genesis value" if number == 1 else f"the hash of line {number - 1}"
            return f"prev does not match {which}: a line before was changed, deleted, inserted or moved"
        reason = self._introduce(entry, number, ca)
        if reason:
            return reason
        if signer not in self.signers:
            return f"unknown signer {signer}: no certificate for it on this or an earlier line (another party's key?)"
        public_key, cert = self.signers[signer]
        if ca is not None:
            if cert is None:
                return "signed with a bare public key; checking against a root CA needs a certificate"
            try:
                pki.verify_certificate(cert, ca, at=datetime.fromisoformat(entry["time"]))
            except pki.PKIError as e:
                return f"signer certificate rejected: {e}"
        body = {k: v for k, v in entry.items() if k != "sig"}
        signature = decode_sig(entry["sig"])
        if signature is None:
            return "sig is not base64"
        if not pki.verify_signature(public_key, signature, canonical(body)):
            return "signature does not verify: the line was changed after signing, or signed by another key"
        self.seq += 1
        return None

    def _introduce(self, entry: dict, number: int, ca: x509.Certificate | None) -> str | None:
        fields = [f for f in SIGNER_FIELDS if f in entry]
        if not fields:
            return None
        if len(fields) > 1:
            return "both certificate and public_key given; an entry introduces one signer"
        try:
            if "certificate" in entry:
                cert = pki.certificate_from_pem(entry["certificate"], "embedded certificate")
                public_key = pki.certificate_public_key(cert, "embedded certificate")
                signer_id = "cert-sha256:" + pki.certificate_fingerprint(cert)
            else:
                cert = None
                public_key = pki.public_key_from_pem(entry["public_key"], "embedded public key")
                signer_id = "key-sha256:" + pki.key_id(public_key)
        except pki.PKIError as e:
            return str(e)
        if signer_id != entry["signer"]:
            return f"signer {entry['signer']} does not match the embedded {fields[0].replace('_', ' ')} ({signer_id})"
        if cert is not None and pki.common_name_of(cert) != entry["party"]:
            return (
                f"signer certificate is for CN={pki.common_name_of(cert)!r}, not party {entry['party']!r} "
                "(signed with another party's key?)"
            )
        if number > 1 and ca is None and signer_id not in self.signers:
            return (
                "a new signer appears here (key rotation?); without a root CA only the signer of line 1 is "
                "trusted: verify with --root-ca"
            )
        self.signers[signer_id] = (public_key, cert)
        return None


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise LedgerError(f"{path}: ledger file not found") from None
    except IsADirectoryError:
        raise LedgerError(f"{path}: is a folder, not a ledger file") from None
    except OSError as e:
        raise LedgerError(f"{path}: cannot read the ledger ({e.strerror or e})") from None
