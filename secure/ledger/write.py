"""Writing a party's ledger: :class:`Ledger` appends signed, chained entries; :func:`repair` moves a torn line aside.

**Writing** (:class:`Ledger`): one ``write`` of the whole line plus ``\\n``, then ``fsync``, in append mode,
under an exclusive ``fcntl.flock`` on the file, so several processes of one party (e.g. two NVFlare jobs at one
site) can append safely: each append re-reads the tail under the lock. Before every append the tail is checked
(last line complete and intact, linked to the line before, same party); a torn last line (a crash mid-write)
makes the ledger refuse to append, naming file and line. :func:`repair` moves a torn last line to
``<file>.torn-<UTC time>`` and is never called automatically. The line format is :mod:`.format`'s.
"""

from __future__ import annotations

import base64
import fcntl
import math
import os
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509

from medsilo import __version__
from medsilo.errors import did_you_mean
from medsilo.secure import pki
from medsilo.secure.ledger.format import (
    EVENTS,
    GENESIS,
    MAX_NUMBERS,
    LedgerError,
    canonical,
    decode_sig,
    encode_line,
    line_hash,
    parse_line,
)
from medsilo.secure.ledger.verify import verified_entries


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
            what: JSON-plain description of what left or was seen (:mod:`.format`); never values.
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
        entry, reason = parse_line(last)
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
            before, _ = parse_line(lines[0])
            if before is None or before["seq"] + 1 != entry["seq"] or line_hash(lines[0]) != entry["prev"]:
                bad = "the last line does not link to the line before it"
        elif entry["seq"] != 0 or entry["prev"] != GENESIS:
            bad = "the only line is not a first entry (seq 0, genesis prev)"
        if bad is None and entry["signer"] == self.signer:
            body = {k: v for k, v in entry.items() if k != "sig"}
            if not pki.verify_signature(
                self._key.public_key(), decode_sig(entry["sig"]) or b"", canonical(body)
            ):
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
            if parse_line(data[cut:-1])[0] is not None:
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
