"""What leaves a party, in every privacy mode: a signed statement and the payload body (the *wire*).

A site's upload — and a releasing site's plaintext aggregate — travels as one byte string in one NVFlare
task-result entry, :data:`WIRE_PARAM`::

    b"MSWIRE" | uint16 version | uint32 header length | header JSON | body | SHA-256 of everything before

The header is ``{"signature": <hex>, "statement": {...}}``. The **statement** (:class:`Statement`) is what the
sender signs, in canonical JSON behind the domain prefix :data:`SIGNING_DOMAIN` (so it is never confused with a
ledger line, which starts with ``{``)::

    kind              "upload" (a site's round upload) or "aggregate" (a released aggregate)
    site              the sender
    job, round        the NVFlare job id (``medsilo sim``: the run id) and the round it belongs to
    mode              the privacy mode it was protected under (none, dp, ckks, ckks+dp)
    participants      the round's participant set the server announced, sorted
    min_contributors  the sender's own minimum: fewer participants, and its upload may not be decrypted
    body              "arrays" (plaintext tensors, :func:`pack_arrays`) or "ckks" (an
                      :class:`~medsilo.secure.ckks.EncryptedUpload`)
    digest            SHA-256 of the body bytes
    ledger_seq/hash   the sender's ledger head before this wire's own ledger entry: the anchor that makes a
                      cut-off ledger detectable (the server's ledger records it)

Signatures are the party's startup-kit key (RSA-PSS) or, in simulation, its local-CA key (Ed25519), through
:func:`medsilo.secure.pki.sign`. :func:`open_wire` checks format, checksum, the body digest and the signature;
what the statement must say (this job, this round, this participant set …) is the receiver's check.

The plaintext body format (:func:`pack_arrays`) carries names, dtypes (float32 or int64), shapes and the raw
little-endian bytes — no pickle, nothing executable, sizes checked before anything is read.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from medsilo.errors import MedsiloError
from medsilo.secure import pki
from medsilo.secure.revocation import Peers

WIRE_PARAM = "__medsilo__"
"""The single task-result entry of a protected upload or a released aggregate (uint8 bytes of a wire)."""
SIGNING_DOMAIN = b"medsilo/statement/v1\x00"
KINDS = ("upload", "aggregate")
BODIES = ("arrays", "ckks")
_WIRE_MAGIC, _WIRE_VERSION = b"MSWIRE", 1
_ARRAYS_MAGIC, _ARRAYS_VERSION = b"MSARRS", 1
_PREFIX = struct.Struct(">6sHI")  # magic, version, header length
_SHA = 32
_DTYPES = {"float32": np.dtype("<f4"), "int64": np.dtype("<i8")}
_HEX64 = frozenset("0123456789abcdef")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
"""What a site name or job id in a statement may be (messages may name them, so they are bounded)."""
MAX_PARTICIPANTS = 1024
_COUNT = struct.Struct(">I")
_LENGTH = struct.Struct(">Q")


class WireError(MedsiloError):
    """A wire or array body that cannot be read or whose signature does not hold; the message says why."""


@dataclass(frozen=True)
class Statement:
    """What a party signs for one wire (module docstring lists the fields)."""

    kind: str
    site: str
    job: str
    round: int
    mode: str
    participants: tuple[str, ...]
    min_contributors: int
    body: str
    digest: str
    ledger_seq: int
    ledger_hash: str

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "site": self.site, "job": self.job, "round": self.round, "mode": self.mode,
                "participants": list(self.participants), "min_contributors": self.min_contributors,
                "body": self.body, "digest": self.digest, "ledger_seq": self.ledger_seq,
                "ledger_hash": self.ledger_hash}  # fmt: skip

    @classmethod
    def from_json(cls, value: object) -> Statement:
        """Parse and type-check a statement (exact fields; raises :class:`WireError` naming the field)."""
        fields = ("kind", "site", "job", "round", "mode", "participants", "min_contributors", "body", "digest",
                  "ledger_seq", "ledger_hash")  # fmt: skip
        if not isinstance(value, dict) or set(value) != set(fields):
            got = sorted(value) if isinstance(value, dict) else type(value).__name__
            raise WireError(f"statement must hold exactly {', '.join(fields)}; got {got}")
        for name in ("kind", "site", "job", "mode", "body", "digest", "ledger_hash"):
            if not isinstance(value[name], str) or not value[name]:
                raise WireError(f"statement.{name}: must be a non-empty string")
        if not NAME.fullmatch(value["site"]) or not NAME.fullmatch(value["job"]):
            raise WireError("statement: site and job must be plain names (letters, digits, '.', '_', '-'; ≤ 128)")
        for name, low in (("round", 0), ("min_contributors", 1), ("ledger_seq", -1)):
            if isinstance(value[name], bool) or not isinstance(value[name], int) or value[name] < low:
                raise WireError(f"statement.{name}: must be an integer ≥ {low}")
        people = value["participants"]
        if not isinstance(people, list) or len(people) > MAX_PARTICIPANTS or \
                not all(isinstance(p, str) and NAME.fullmatch(p) for p in people):  # fmt: skip
            raise WireError(f"statement.participants: must be a list of at most {MAX_PARTICIPANTS} site names")
        if people != sorted(set(people)):
            raise WireError("statement.participants: must be sorted and without repeats")
        if value["kind"] not in KINDS or value["body"] not in BODIES:
            raise WireError(f"statement: kind must be one of {KINDS} and body one of {BODIES}")
        for name in ("digest", "ledger_hash"):
            if len(value[name]) != 64 or not set(value[name]) <= _HEX64:
                raise WireError(f"statement.{name}: must be a SHA-256 hex digest")
        return cls(**{**value, "participants": tuple(people)})

    def message(self) -> bytes:
        """The exact bytes the signature covers: :data:`SIGNING_DOMAIN` + canonical JSON."""
        return SIGNING_DOMAIN + _canonical(self.to_json())


@dataclass(frozen=True)
class Wire:
    """A signed statement and the body it describes (module docstring).

    Attributes:
        statement: what the sender signed.
        signature: its signature over :meth:`Statement.message`.
        body: the body bytes (``statement.digest`` is their SHA-256).
    """

    statement: Statement
    signature: bytes
    body: bytes

    def to_bytes(self) -> bytes:
        header = _canonical({"signature": self.signature.hex(), "statement": self.statement.to_json()})
        data = _PREFIX.pack(_WIRE_MAGIC, _WIRE_VERSION, len(header)) + header + self.body
        return data + hashlib.sha256(data).digest()

    def to_array(self) -> np.ndarray:
        """:meth:`to_bytes` as a 1-d uint8 array (an NVFlare task-result entry)."""
        return np.frombuffer(self.to_bytes(), dtype=np.uint8)

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview | np.ndarray) -> Wire:
        """Parse a wire; checks magic, version, the trailing SHA-256 and the statement's form, *not* the
        signature (:func:`open_wire` does).

        Raises:
            WireError: not a wire, another version, corrupt or truncated, a malformed header.
        """
        data = _as_bytes(data, "wire")
        if len(data) < _PREFIX.size + _SHA or not data.startswith(_WIRE_MAGIC):
            raise WireError(f"not a medsilo wire ({len(data)} bytes, no {_WIRE_MAGIC.decode()} header): the "
                            "sender did not protect it with medsilo's privacy pipeline")  # fmt: skip
        _, version, header_len = _PREFIX.unpack_from(data)
        if version != _WIRE_VERSION:
            raise WireError(f"wire format version {version}; this medsilo reads {_WIRE_VERSION}")
        payload, checksum = data[:-_SHA], data[-_SHA:]
        if hashlib.sha256(payload).digest() != checksum:
            raise WireError(f"wire is corrupt or truncated ({len(data)} bytes, SHA-256 mismatch)")
        end = _PREFIX.size + header_len
        if end > len(payload):
            raise WireError(f"wire header claims {header_len} bytes but the message is shorter")
        try:
            header = json.loads(payload[_PREFIX.size : end].decode("utf-8"))
            signature = bytes.fromhex(header["signature"])
            statement = Statement.from_json(header["statement"])
        except (UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
            raise WireError(f"wire header is malformed ({e})") from e
        return cls(statement, signature, payload[end:])


def seal(statement_fields: Mapping[str, Any], body: bytes, private_key: pki.PrivateKey) -> Wire:
    """Sign a statement about ``body`` (its ``digest`` is computed here) and return the wire.

    Args:
        statement_fields: every :class:`Statement` field but ``digest``.
        body: the body bytes (:func:`pack_arrays` output or an encrypted upload's bytes).
        private_key: the sender's signing key.
    """
    statement = Statement.from_json({**statement_fields, "digest": hashlib.sha256(body).hexdigest()})
    return Wire(statement, pki.sign(private_key, statement.message()), body)


def open_wire(data: bytes | np.ndarray, public_keys: Mapping[str, pki.PublicKey], sender: str | None = None) -> Wire:
    """Parse a wire and check that its sender signed exactly this statement about exactly this body.

    Args:
        data: the wire bytes.
        public_keys: site name → signature public key (from certificates checked against the root CA); a
            :class:`medsilo.secure.revocation.Peers` also names the sites whose certificate was revoked.
        sender: the NVFlare identity it came from; the statement must name the same site.

    Raises:
        WireError: a malformed wire, an unknown or revoked signer, a statement naming another site than the
            sender, a body that does not match the signed digest, or a signature that does not verify.
    """
    wire = Wire.from_bytes(data)
    site = wire.statement.site
    if sender is not None and site != sender:
        raise WireError(f"a wire from {sender} is signed as {site!r}; refusing an upload presented as another site's")
    # from here on ``site`` is a bounded plain name (Statement.from_json), safe to name in messages
    if site not in public_keys:
        if isinstance(public_keys, Peers) and site in public_keys.revoked:
            raise WireError(f"{public_keys.revoked[site]}; its signatures are refused")
        raise WireError(f"site {site}: unknown signer: no certificate for it among this party's peers (removed from "
                        f"the network, or never in it; known: {', '.join(sorted(public_keys)) or 'none'})")
    if hashlib.sha256(wire.body).hexdigest() != wire.statement.digest:
        raise WireError(f"site {site}: the body does not match the digest it signed (modified after signing)")
    if not pki.verify_signature(public_keys[site], wire.signature, wire.statement.message()):
        raise WireError(f"site {site}: signature does not verify (the statement was changed, or another key signed)")
    return wire


def wire_digest(data: bytes | np.ndarray) -> str:
    """SHA-256 (hex) of a wire's bytes exactly as they travel (what ledgers record as ``sha256``)."""
    return hashlib.sha256(_as_bytes(data, "wire")).hexdigest()


# ---- several wires in one payload entry ---------------------------------------------------------------


def pack_wires(wires: list[bytes]) -> bytes:
    """Wires → one byte string: uint32 count, then each wire as uint64 length + bytes."""
    return _COUNT.pack(len(wires)) + b"".join(_LENGTH.pack(len(w)) + bytes(w) for w in wires)


def unpack_wires(data: bytes | np.ndarray, limit: int = MAX_PARTICIPANTS) -> list[bytes]:
    """:func:`pack_wires` bytes back into wires (each still to be opened with :func:`open_wire`).

    Raises:
        WireError: malformed, truncated, trailing bytes, or more than ``limit`` wires.
    """
    data = _as_bytes(data, "wire list")
    if len(data) < _COUNT.size:
        raise WireError("wire list is truncated")
    (count,) = _COUNT.unpack_from(data)
    if count > limit:
        raise WireError(f"wire list holds {count} wires, more than {limit}")
    pos, out = _COUNT.size, []
    for _ in range(count):
        if pos + _LENGTH.size > len(data):
            raise WireError("wire list is truncated")
        (size,) = _LENGTH.unpack_from(data, pos)
        pos += _LENGTH.size
        if pos + size > len(data):
            raise WireError("wire list is truncated")
        out.append(data[pos : pos + size])
        pos += size
    if pos != len(data):
        raise WireError("wire list has bytes after its wires")
    return out


# ---- plaintext bodies ------------------------------------------------------------------------------


def pack_arrays(arrays: Mapping[str, Any]) -> bytes:
    """Named float32/int64 arrays → bytes: ``b"MSARRS"``, version, header length, header JSON
    ``[{"name", "dtype", "shape"}]`` in name order, then each array's little-endian C-order bytes."""
    names = sorted(arrays)
    blobs, header = [], []
    for name in names:
        arr = np.asarray(arrays[name])
        dtype = next((k for k, v in _DTYPES.items() if arr.dtype == v.newbyteorder("=")), None)
        if dtype is None:
            raise WireError(f"array '{name}': dtype {arr.dtype} cannot travel; convert to float32 or int64")
        header.append({"name": name, "dtype": dtype, "shape": list(arr.shape)})
        blobs.append(np.ascontiguousarray(arr, dtype=_DTYPES[dtype]).tobytes())
    text = _canonical(header)
    return _PREFIX.pack(_ARRAYS_MAGIC, _ARRAYS_VERSION, len(text)) + text + b"".join(blobs)


def unpack_arrays(data: bytes | memoryview) -> dict[str, np.ndarray]:
    """Read :func:`pack_arrays` bytes back into writable arrays.

    Raises:
        WireError: not this format, a malformed header, or sizes that do not add up to the data.
    """
    data = bytes(data)
    if len(data) < _PREFIX.size or not data.startswith(_ARRAYS_MAGIC):
        raise WireError("not a medsilo array body")
    _, version, header_len = _PREFIX.unpack_from(data)
    if version != _ARRAYS_VERSION:
        raise WireError(f"array body version {version}; this medsilo reads {_ARRAYS_VERSION}")
    pos = _PREFIX.size + header_len
    try:
        header = json.loads(data[_PREFIX.size : pos].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WireError(f"array body header is not JSON ({e})") from e
    if not isinstance(header, list):
        raise WireError("array body header must be a list")
    out: dict[str, np.ndarray] = {}
    for item in header:
        try:
            name, dtype, shape = item["name"], _DTYPES[item["dtype"]], tuple(item["shape"])
        except (KeyError, TypeError) as e:
            raise WireError(f"array body header entry is malformed: {item!r}") from e
        if not isinstance(name, str) or name in out or not all(isinstance(n, int) and n >= 0 for n in shape):
            raise WireError(f"array body header entry is malformed: {item!r}")
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if pos + size > len(data):
            raise WireError(f"array '{name}' is truncated")
        out[name] = np.frombuffer(data, dtype=dtype, count=size // dtype.itemsize, offset=pos).reshape(shape).copy()
        pos += size
    if pos != len(data):
        raise WireError(f"array body has {len(data) - pos} bytes after its arrays")
    return out


def _canonical(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def _as_bytes(data: bytes | bytearray | memoryview | np.ndarray, what: str) -> bytes:
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8 or data.ndim != 1:
            raise WireError(f"{what} must be a 1-d uint8 array, got {data.ndim}-d {data.dtype}")
        return data.tobytes()
    if not isinstance(data, bytes | bytearray | memoryview):
        raise WireError(f"{what} must be bytes, got {type(data).__name__}")
    return bytes(data)
