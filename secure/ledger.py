"""The privacy ledger: an append-only, hash-chained, signed JSON-lines record of what left a party (DESIGN §6).

One file per party (a site, or ``server``), normally ``<workspace>/privacy_ledger.jsonl`` (:data:`LEDGER_FILE`).
Each line is one entry::

    {"code_version": "0.1.0", "event": "release", "job": "job-7", "party": "hospital-1",
     "prev": "<sha256 hex of the previous line>", "privacy": {...} | null, "reason": null | "...",
     "round": 3, "seq": 12, "signer": "cert-sha256:<hex>", "time": "2025-01-31T12:00:00.123+00:00",
     "what": {...}, "sig": "<base64>"}

* ``seq`` counts 0, 1, 2, … with no gaps; ``time`` is UTC ISO 8601; ``event`` is one of :data:`EVENTS`.
* ``what``: caller-provided description of what left or was seen (kind, tensor names, shapes, dtype, bytes,
  ``sha256`` of the exact bytes sent, ``encrypted``, scheme and parameters). It must be JSON-plain (str, int,
  finite float, bool, null, lists, string-keyed objects); a list of more than :data:`MAX_NUMBERS` numbers is
  refused because it looks like data values. The ledger records names, shapes and digests, never patient data.
* ``privacy``: ``null``, or an object with ``scope`` (the budget scope's name, required) and, by convention,
  ``mechanism``, ``epsilon``, ``delta`` (this entry's cost), ``cumulative_epsilon`` (the running total the
  accountant computed) and ``epsilon_cap``/``delta_cap`` (the site policy's cap, read by the audit report).
* ``reason``: why, for a ``refusal`` (required there), otherwise usually ``null``.
* ``prev``: SHA-256 (hex) of the previous line's exact bytes without its newline; :data:`GENESIS` on line 1.
* ``signer``: ``cert-sha256:<hex>`` (SHA-256 of the signer certificate's DER, as
  ``openssl x509 -noout -fingerprint -sha256`` prints it, without colons) or ``key-sha256:<hex>`` (SHA-256 of
  a bare public key's DER SubjectPublicKeyInfo, when no certificate is available).
* ``certificate`` (or ``public_key``): the signer's PEM certificate (or public key). It is written on the
  first line of the file and again whenever the signer changes (key rotation), so a ledger can be verified
  from the file alone plus the root CA; no sidecar files.
* ``sig``: base64 signature with the party's key over the **signed bytes**: the canonical JSON of the
  entry without ``sig``.

**Canonical form.** JSON with keys sorted, no spaces (``separators=(",", ":")``), ASCII only (``\\uXXXX``
escapes), no NaN/Infinity. A line is exactly the signed bytes with ``,"sig":"<base64>"`` inserted before the
final ``}``, then ``\\n``: so ``sig`` is the last key, and the signed bytes are recovered from the line with
plain text tools (``sed -E 's/,"sig":"[^"]*"}$/}/'``); the verifier refuses any line not in this exact form.
Signatures are Ed25519, or RSA-PSS (MGF1-SHA-256, SHA-256, 32-byte salt) for NVFlare's RSA kit keys
(:mod:`medsilo.secure.pki`). The signed bytes start with ``{`` and so can never be confused with an upload
statement (:mod:`medsilo.secure.upload`, domain-prefixed) signed with the same key.

**Verification** (:func:`verify`, ``medsilo audit verify``) reports the *first* bad line of each file:
not ASCII, bad JSON, a missing/unknown/mistyped field, not canonical, a torn last line (no newline at the
end), another party's entry, a ``seq`` gap or repeat (deleted, inserted or moved lines), a ``prev`` that does
not match the line before, an embedded certificate that does not match ``signer`` or whose CN is not the
party, an unknown signer, a signature that does not verify (an edited field), and, with a root CA, a signer
certificate not issued by it or not valid at the entry's time. Without a root CA the certificate on line 1 is
trusted on first use and a signer change later in the file is reported (a key rotation can only be accepted
against the root CA).

**Limits.** Removing lines from the *end* leaves a valid shorter ledger: the file alone cannot show it, nor a
whole ledger copied into another party's folder. :mod:`medsilo.secure.anchors` closes both across ledgers: every
upload a site signs carries its ledger head, the server's ledger records each statement it received
(``received``), and ``medsilo audit verify`` reports a site ledger shorter than, or different from, what the
server recorded, and a ledger in another party's place. Whoever holds the party's private key can still rewrite
the history the server never saw; the ledger proves what the key holder wrote, in order, and that nobody else
changed it.

**Writing** (:class:`Ledger`): one ``write`` of the whole line plus ``\\n``, then ``fsync``, in append mode,
under an exclusive ``fcntl.flock`` on the file, so several processes of one party (e.g. two NVFlare jobs at one
site) can append safely: each append re-reads the tail under the lock. Before every append the tail is checked
(last line complete and intact, linked to the line before, same party); a torn last line (a crash mid-write)
makes the ledger refuse to append, naming file and line. :func:`repair` moves a torn last line to
``<file>.torn-<UTC time>`` and is never called automatically.

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

import base64
import binascii
import fcntl
import hashlib
import json
import math
import os
import re
import threading
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509

from medsilo import __version__
from medsilo.errors import MedsiloError, did_you_mean
from medsilo.secure import pki

LEDGER_FILE = "privacy_ledger.jsonl"
"""Default ledger file name inside a party's workspace."""
EVENTS = ("release", "refusal", "decrypt", "aggregate_release", "synthetic_release", "policy_loaded", "received",
          "model_export")
"""``received`` is the server's: an upload it accepted, with the sender's signed statement (the site's ledger
head), against which ``medsilo audit verify`` checks that the site's ledger was not cut short. ``model_export``
is a site's: the model it keeps at the end of a job (digests; nothing leaves the site)."""
SPENDING_EVENTS = ("release", "aggregate_release", "synthetic_release")
"""Events whose ``privacy`` cost counts towards a budget (something left the party); refusals never count."""
GENESIS = "0" * 64
"""``prev`` of the first line."""
MAX_NUMBERS = 64
"""Most numbers one list in ``what``/``privacy`` may hold (more looks like data values, which never belong here)."""
REQUIRED_FIELDS = (
    "code_version", "event", "job", "party", "prev", "privacy", "reason", "round", "seq", "sig", "signer",
    "time", "what",
)  # fmt: skip
SIGNER_FIELDS = ("certificate", "public_key")
_HEX64 = re.compile(r"[0-9a-f]{64}")


class LedgerError(MedsiloError):
    """A ledger that cannot be written or read as asked; the message names the file (and line)."""


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


def canonical(entry: Mapping[str, Any]) -> bytes:
    """Canonical JSON bytes: keys sorted, no spaces, ASCII, no NaN/Infinity (the signed bytes of an entry)."""
    return json.dumps(
        entry, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


def encode_line(body: Mapping[str, Any], sig: str) -> bytes:
    """The ledger line (without newline) for an entry ``body`` (everything but ``sig``) and its signature."""
    return canonical(body)[:-1] + b',"sig":"' + sig.encode("ascii") + b'"}'


def line_hash(line: bytes) -> str:
    """SHA-256 hex of one line's bytes without its newline (the next entry's ``prev``)."""
    return hashlib.sha256(line).hexdigest()


def entry_hash(entry: Mapping[str, Any]) -> str:
    """:func:`line_hash` of a parsed entry (its canonical line)."""
    return line_hash(encode_line({k: v for k, v in entry.items() if k != "sig"}, entry["sig"]))


class Ledger:
    """Appends signed, chained entries to one party's ledger file.

    Args:
        path: the ledger file (e.g. ``<workspace>/privacy_ledger.jsonl``); its folder must exist. Created empty
            if missing.
        party: the site name, or ``"server"``; must equal the certificate's CN.
        private_key: the party's Ed25519 or RSA private key, or a PEM file (a kit's ``startup/client.key``).
        certificate_or_public_key: the matching X.509 certificate (preferred: auditors check it against the root
            CA), a bare public key, or a PEM file of either (a kit's ``startup/client.crt``).

    Raises:
        LedgerError: a bad party, a key that does not match the certificate, a certificate for another CN, a
            missing folder, or a ledger whose tail is torn, corrupt or another party's.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        party: str,
        private_key: pki.PrivateKey | str | os.PathLike,
        certificate_or_public_key: x509.Certificate | pki.PublicKey | str | os.PathLike,
    ):
        self.path = Path(path)
        if not isinstance(party, str) or not party.strip():
            raise LedgerError(f"{self.path}: party must be a non-empty name, got {party!r}")
        self.party = party
        self._key = _load_private_key(private_key)
        cert, public_key = _load_signer(certificate_or_public_key)
        if pki.key_id(public_key) != pki.key_id(self._key.public_key()):
            raise LedgerError(f"{self.path}: the private key does not match the certificate/public key given")
        if cert is not None:
            if pki.common_name_of(cert) != party:
                raise LedgerError(
                    f"{self.path}: certificate CN={pki.common_name_of(cert)!r} does not match party {party!r}"
                )
            self.signer = "cert-sha256:" + pki.certificate_fingerprint(cert)
            self._introduce = {"certificate": pki.certificate_pem(cert)}
        else:
            self.signer = "key-sha256:" + pki.key_id(public_key)
            self._introduce = {"public_key": pki.public_key_pem(public_key)}
        if not self.path.parent.is_dir():
            raise LedgerError(f"{self.path}: folder {self.path.parent} does not exist")
        self._thread_lock = threading.RLock()
        self._fd: int | None = None
        self._depth = 0
        with self.locked():
            self._tail()

    @contextmanager
    def locked(self) -> Iterator[Ledger]:
        """Hold the ledger's exclusive lock across several calls, e.g. read the budget and append atomically::

            with ledger.locked():
                spent, _ = cumulative(ledger.path, scope)
                ledger.append("release" if spent + eps <= cap else "refusal", ...)

        Other processes (and threads) wait for the lock; :meth:`append` inside the block reuses it.
        """
        with self._thread_lock:
            if self._depth == 0:
                try:
                    fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
                except OSError as e:
                    raise LedgerError(f"{self.path}: cannot open the ledger ({e.strerror or e})") from None
                fcntl.flock(fd, fcntl.LOCK_EX)
                self._fd = fd
            self._depth += 1
            try:
                yield self
            finally:
                self._depth -= 1
                if self._depth == 0:
                    fd, self._fd = self._fd, None
                    fcntl.flock(fd, fcntl.LOCK_UN)
                    os.close(fd)

    def head(self) -> tuple[int, str]:
        """``(seq, line hash)`` of the last entry, or ``(-1, GENESIS)`` for an empty ledger.

        Call it inside :meth:`locked` when the head must still be the head at the next :meth:`append` (a
        signed upload carries the head its own ledger entry follows).
        """
        with self.locked():
            seq, prev, _ = self._tail()
        return seq - 1, prev

    def read(self, root_ca: x509.Certificate | str | os.PathLike | None = None) -> list[dict]:
        """Every entry, verified (chain, signatures, and with ``root_ca`` the signer certificates), all of
        this ledger's party. Call it inside :meth:`locked` to read, check and append atomically.

        Raises:
            LedgerError: the first bad line (``file:line: reason``), or an entry of another party (a ledger
                copied in from another site's folder).
        """
        with self.locked():
            if os.fstat(self._fd).st_size == 0:
                return []
            found = verified_entries(self.path, root_ca)
        if found and found[0]["party"] != self.party:
            raise LedgerError(
                f"{self.path}:1: this ledger belongs to {found[0]['party']!r}, not {self.party!r} (copied in from "
                "another site's folder?); refusing to use it"
            )
        return found

    def append(
        self,
        event: str,
        *,
        job: str | None,
        round: int | None,
        what: Mapping[str, Any],
        privacy: Mapping[str, Any] | None,
        reason: str | None = None,
    ) -> dict:
        """Sign and durably append one entry (written, flushed and ``fsync``'d before returning).

        Args:
            event: one of :data:`EVENTS`.
            job: the job id (``None`` for events outside a job, e.g. ``policy_loaded`` at start-up).
            round: the round (≥ 0), or ``None``.
            what: JSON-plain description of what left or was seen (module docstring); never values.
            privacy: ``None`` or a JSON-plain dict with ``scope`` (str) and optional ``epsilon``/``delta`` ≥ 0.
            reason: why, for a ``refusal`` (required there).

        Returns:
            The entry as written, ``sig`` included.

        Raises:
            LedgerError: an invalid argument (named), a torn or corrupt tail, or a failed write (the partial
                line is removed again).
        """
        body = {
            "code_version": __version__,
            "event": event,
            "job": job,
            "party": self.party,
            "privacy": None if privacy is None else dict(privacy),
            "reason": reason,
            "round": round,
            "what": dict(what) if isinstance(what, Mapping) else what,
        }
        self._validate(body)
        with self.locked():
            seq, prev, last_signer = self._tail()
            body.update(
                seq=seq,
                prev=prev,
                signer=self.signer,
                time=datetime.now(UTC).isoformat(timespec="milliseconds"),
            )
            if last_signer != self.signer:
                body.update(self._introduce)
            signed = canonical(body)
            sig = base64.b64encode(pki.sign(self._key, signed)).decode("ascii")
            self._write(encode_line(body, sig) + b"\n", new_file=seq == 0)
        return {**body, "sig": sig}

    def _validate(self, body: dict) -> None:
        where = f"{self.path}: append"
        event = body["event"]
        if event not in EVENTS:
            raise LedgerError(
                f"{where}: event {event!r} is unknown; {did_you_mean(event, EVENTS)}use one of {', '.join(EVENTS)}"
            )
        for name in ("job", "reason"):
            if body[name] is not None and not isinstance(body[name], str):
                raise LedgerError(
                    f"{where}: {name} must be a string or None, got {type(body[name]).__name__}"
                )
        if event == "refusal" and not body["reason"]:
            raise LedgerError(f"{where}: a refusal needs a reason")
        rnd = body["round"]
        if rnd is not None and (isinstance(rnd, bool) or not isinstance(rnd, int) or rnd < 0):
            raise LedgerError(f"{where}: round must be an integer ≥ 0 or None, got {rnd!r}")
        if not isinstance(body["what"], dict):
            raise LedgerError(f"{where}: what must be a dict, got {type(body['what']).__name__}")
        _check_plain(body["what"], f"{where}: what")
        if body["privacy"] is not None:
            _check_plain(body["privacy"], f"{where}: privacy")
            problem = _privacy_problem(body["privacy"])
            if problem:
                raise LedgerError(f"{where}: privacy.{problem}")

    def _tail(self) -> tuple[int, str, str | None]:
        """``(next seq, prev hash, last signer)`` from the file's last two lines; raises if the tail is bad."""
        fd = self._fd
        size = os.fstat(fd).st_size
        if size == 0:
            return 0, GENESIS, None
        lines = _last_lines(fd, size)
        if lines is None:
            line_no = _count_lines(fd, size) + 1
            raise LedgerError(
                f"{self.path}:{line_no}: the last line is torn (no newline at the end: a crash while appending?); "
                f"refusing to append. Inspect it, then move it aside with medsilo.secure.ledger.repair('{self.path}')"
            )
        last = lines[-1]
        entry, reason = _parse(last)
        if entry is None:
            line_no = _count_lines(fd, size)
            raise LedgerError(
                f"{self.path}:{line_no}: the last line is unreadable ({reason}); refusing to append. Check the "
                f"ledger with 'medsilo audit verify {self.path}'; a torn line can be moved aside with "
                f"medsilo.secure.ledger.repair('{self.path}')"
            )
        line_no = entry["seq"] + 1
        bad = None
        if entry["party"] != self.party:
            bad = f"the ledger belongs to {entry['party']!r}, not {self.party!r}"
        elif len(lines) == 2:
            before, _ = _parse(lines[0])
            if before is None or before["seq"] + 1 != entry["seq"] or line_hash(lines[0]) != entry["prev"]:
                bad = "the last line does not link to the line before it"
        elif entry["seq"] != 0 or entry["prev"] != GENESIS:
            bad = "the only line is not a first entry (seq 0, genesis prev)"
        if bad is None and entry["signer"] == self.signer:
            body = {k: v for k, v in entry.items() if k != "sig"}
            if not pki.verify_signature(self._key.public_key(), _b64(entry["sig"]) or b"", canonical(body)):
                bad = "the last line's signature does not verify (edited after signing?)"
        if bad:
            raise LedgerError(
                f"{self.path}:{line_no}: {bad}; refusing to append (run 'medsilo audit verify {self.path}')"
            )
        return entry["seq"] + 1, line_hash(last), entry["signer"]

    def _write(self, data: bytes, new_file: bool) -> None:
        fd = self._fd
        size = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        except OSError as e:
            os.ftruncate(fd, size)  # take back a partial line (we hold the lock; nobody else wrote since)
            raise LedgerError(f"{self.path}: cannot append to the ledger ({e.strerror or e})") from None
        if new_file:
            dir_fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)


def verify_file(
    path: str | os.PathLike, root_ca: x509.Certificate | str | os.PathLike | None = None
) -> FileCheck:
    """Verify one ledger file: every line's form, chain link and signature (module docstring lists the checks).

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
        entry, reason = _parse(raw)
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
        entry, reason = _parse(raw)
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


def repair(path: str | os.PathLike) -> Path | None:
    """Move a torn last line (no trailing newline, or not a readable entry) to ``<file>.torn-<UTC time>``.

    Only the last line is ever moved, and only when it is torn; the file is truncated after the last good
    line and ``fsync``'d, under the ledger lock. Never called automatically: a person decides.

    Returns:
        The file holding the moved bytes, or ``None`` when the ledger is empty.

    Raises:
        LedgerError: the file is missing, or its last line is an intact entry (nothing to repair).
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError as e:
        raise LedgerError(f"{path}: cannot open the ledger ({e.strerror or e})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        data = os.pread(fd, size, 0)
        if not data:
            return None
        if data.endswith(b"\n"):
            cut = data.rfind(b"\n", 0, len(data) - 1) + 1
            if _parse(data[cut:-1])[0] is not None:
                raise LedgerError(f"{path}: the last line is an intact entry; nothing to repair")
        else:
            cut = data.rfind(b"\n") + 1
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        torn = path.with_name(f"{path.name}.torn-{stamp}")
        with open(torn, "xb") as f:
            f.write(data[cut:])
            f.flush()
            os.fsync(f.fileno())
        os.ftruncate(fd, cut)
        os.fsync(fd)
        return torn
    finally:
        os.close(fd)


# ---- parsing and checking -----------------------------------------------------------------------------


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
        signature = _b64(entry["sig"])
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


_TYPES: dict[str, tuple[type, ...]] = {
    "code_version": (str,), "event": (str,), "job": (str, type(None)), "party": (str,), "prev": (str,),
    "privacy": (dict, type(None)), "reason": (str, type(None)), "round": (int, type(None)), "seq": (int,),
    "sig": (str,), "signer": (str,), "time": (str,), "what": (dict,), "certificate": (str,), "public_key": (str,),
}  # fmt: skip


def _parse(raw: bytes) -> tuple[dict | None, str | None]:
    """``(entry, None)`` for a well-formed canonical line, else ``(None, reason)``."""
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        return None, "not ASCII (ledger lines are ASCII JSON)"
    try:
        entry = json.loads(text)
    except RecursionError:
        return None, "nested too deeply to be a ledger entry"
    except json.JSONDecodeError as e:
        return None, f"not valid JSON ({e.msg} at column {e.colno})"
    if not isinstance(entry, dict):
        return None, "not a JSON object"
    missing = [f for f in REQUIRED_FIELDS if f not in entry]
    if missing:
        return None, f"missing field(s): {', '.join(missing)}"
    unknown = sorted(set(entry) - set(REQUIRED_FIELDS) - set(SIGNER_FIELDS))
    if unknown:
        return None, f"unknown field(s): {', '.join(unknown)}"
    for name, value in entry.items():
        if not isinstance(value, _TYPES[name]) or (isinstance(value, bool) and bool not in _TYPES[name]):
            return None, f"field {name}: {type(value).__name__} is not allowed here"
    if entry["event"] not in EVENTS:
        return None, f"event {entry['event']!r} is not one of {', '.join(EVENTS)}"
    if not _HEX64.fullmatch(entry["prev"]):
        return None, "prev is not a SHA-256 hex digest"
    try:
        when = datetime.fromisoformat(entry["time"])
    except ValueError:
        when = None
    if when is None or when.utcoffset() is None:
        return None, f"time {entry['time']!r} is not an ISO 8601 time with a UTC offset"
    body = {k: v for k, v in entry.items() if k != "sig"}
    try:
        canonical_line = encode_line(body, entry["sig"])
    except (ValueError, UnicodeEncodeError):
        canonical_line = None
    if canonical_line != raw:
        return (
            None,
            'not in canonical form (sorted keys, no spaces, ASCII, "sig" last): the line was rewritten',
        )
    return entry, None


def _check_plain(value: object, where: str) -> None:
    if value is None or isinstance(value, str | bool | int):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise LedgerError(f"{where}: {value} is not allowed (finite numbers only)")
        return
    if isinstance(value, list | tuple):
        numbers = sum(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
        if numbers > MAX_NUMBERS:
            raise LedgerError(
                f"{where}: a list of {numbers} numbers looks like data values; the ledger records names, "
                f"shapes and digests, never values (at most {MAX_NUMBERS} numbers per list)"
            )
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise LedgerError(f"{where}: key {k!r} is not a string")
            _check_plain(v, f"{where}.{k}")
        return
    raise LedgerError(
        f"{where}: {type(value).__name__} is not JSON-plain (use str, int, float, bool, None, list or dict; "
        "convert numpy/torch values with int()/float()/tolist())"
    )


def _privacy_problem(privacy: dict) -> str | None:
    scope = privacy.get("scope")
    if not isinstance(scope, str) or not scope:
        return f"scope: the budget scope's name is required (a non-empty string), got {scope!r}"
    for name in ("epsilon", "delta"):
        value = privacy.get(name)
        if value is None and name not in privacy:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            return f"{name}: must be a number ≥ 0, got {value!r}"
    if privacy.get("delta", 0) > 1:
        return f"delta: must be ≤ 1, got {privacy['delta']!r}"
    return None


def _b64(text: str) -> bytes | None:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
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


def _last_lines(fd: int, size: int) -> list[bytes] | None:
    """The last (up to two) complete lines without their newlines; ``None`` when the last line is torn."""
    if os.pread(fd, 1, size - 1) != b"\n":
        return None
    n = 8192
    while True:
        start = max(0, size - n)
        body = os.pread(fd, size - start, start)[:-1]
        if start == 0 or body.count(b"\n") >= 2:
            break
        n *= 4
    parts = body.split(b"\n")
    if start > 0:
        parts = parts[1:]
    return parts[-2:]


def _count_lines(fd: int, size: int) -> int:
    count, offset = 0, 0
    while offset < size:
        chunk = os.pread(fd, min(1 << 20, size - offset), offset)
        count += chunk.count(b"\n")
        offset += len(chunk)
    return count


def _load_private_key(key: object) -> pki.PrivateKey:
    if isinstance(key, str | os.PathLike):
        return pki.load_private_key(key)
    if not isinstance(key, pki.PrivateKey):
        raise LedgerError(
            f"private_key: expected an Ed25519/RSA private key or a PEM file, got {type(key).__name__}"
        )
    return key


def _load_signer(value: object) -> tuple[x509.Certificate | None, pki.PublicKey]:
    if isinstance(value, str | os.PathLike):
        path = Path(value)
        try:
            is_cert = b"-----BEGIN CERTIFICATE-----" in path.read_bytes()
        except OSError as e:
            raise LedgerError(f"{path}: cannot read the certificate/public key ({e.strerror or e})") from None
        if is_cert:
            value = pki.load_certificate(path)
        else:
            return None, pki.load_public_key(path)
    if isinstance(value, x509.Certificate):
        return value, pki.certificate_public_key(value, "signer certificate")
    if isinstance(value, pki.PublicKey):
        return None, value
    raise LedgerError(
        f"certificate_or_public_key: expected an X.509 certificate, an Ed25519/RSA public key or a PEM file, "
        f"got {type(value).__name__}"
    )
