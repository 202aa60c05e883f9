"""The ledger's line format, shared by the writer (:mod:`.write`) and the verifier (:mod:`.verify`) (DESIGN §6).

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
plain text tools (``sed -E 's/,"sig":"[^"]*"}$/}/'``); the verifier refuses any line not in this exact form
(:func:`parse_line`). Signatures are Ed25519, or RSA-PSS (MGF1-SHA-256, SHA-256, 32-byte salt) for NVFlare's
RSA kit keys (:mod:`medsilo.secure.pki`). The signed bytes start with ``{`` and so can never be confused with
an upload statement (:mod:`medsilo.secure.upload`, domain-prefixed) signed with the same key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from medsilo.errors import MedsiloError

LEDGER_FILE = "privacy_ledger.jsonl"
"""Default ledger file name inside a party's workspace."""
EVENTS = (
    "release",
    "refusal",
    "decrypt",
    "aggregate_release",
    "synthetic_release",
    "policy_loaded",
    "received",
    "model_export",
)
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


_TYPES: dict[str, tuple[type, ...]] = {
    "code_version": (str,), "event": (str,), "job": (str, type(None)), "party": (str,), "prev": (str,),
    "privacy": (dict, type(None)), "reason": (str, type(None)), "round": (int, type(None)), "seq": (int,),
    "sig": (str,), "signer": (str,), "time": (str,), "what": (dict,), "certificate": (str,), "public_key": (str,),
}  # fmt: skip


def parse_line(raw: bytes) -> tuple[dict | None, str | None]:
    """``(entry, None)`` for a well-formed canonical line (without its newline), else ``(None, reason)``.

    Checks the form only (fields, types, event, ``prev``, ``time``, canonical bytes), not the chain or the
    signature (:mod:`.verify` does).
    """
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


def decode_sig(text: str) -> bytes | None:
    """The signature bytes of a ``sig`` field, or ``None`` when it is not strict base64."""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
