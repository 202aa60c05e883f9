"""The encrypted upload on the wire: its layout (names, shapes, dtypes) and a versioned byte format.

**Wire format** (:meth:`EncryptedUpload.to_bytes`, version 1; never a pickle of TenSEAL objects)::

    b"MSCKKS"                    6 bytes  magic
    version                      uint16 big-endian (1)
    header length H              uint32 big-endian
    header                       H bytes of UTF-8 JSON: {"ciphertexts": count, "fingerprint": hex,
                                 "layout": [[name, [dims...], dtype], ...]}
    count × (length L, blob)     uint64 big-endian + L bytes of TenSEAL-serialized CKKSVector
    sha256                       32 bytes over everything above

The trailing SHA-256 detects corrupted or truncated messages before TenSEAL parses anything; it is not a
signature (anyone can recompute it): integrity against an adversary comes from the sites' signatures over
:meth:`EncryptedUpload.digest` in :mod:`medsilo.secure.release`. The ``fingerprint`` is the SHA-256 of the
canonical public context (:func:`.context.fingerprint`): a ciphertext made under another key set is refused before
use, because decrypting it would silently yield garbage. NVFlare filters can carry the bytes as they are
or as a 1-d ``numpy.uint8`` array (:meth:`EncryptedUpload.to_array`); the public context travels once, at
provisioning, not with every tensor as NVFlare's own ``CKKSVectorDecomposer`` does (~0.66 MB per tensor).

**What the server still sees** (metadata CKKS does not hide): the layout (tensor names, shapes, dtypes,
hence the algorithm and model size), the number and size of ciphertexts, which sites uploaded and when,
and how long each site took (training time hints at dataset size). Values, counts and ``n`` are hidden.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from medsilo.secure.ckks.context import CKKSError

WIRE_MAGIC = b"MSCKKS"
WIRE_VERSION = 1
_PREFIX = struct.Struct(">6sHI")  # magic, version, header length
_BLOB_LEN = struct.Struct(">Q")
_SHA_LEN = 32
_DIGEST_DOMAIN = b"medsilo/ckks-upload/v1\n"

DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, name)
    for name in ("float16", "bfloat16", "float32", "float64", "uint8", "int8", "int16", "int32", "int64")
}
"""Tensor dtypes an upload may hold; integers are rounded back after decryption."""


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a layout: its name, shape and dtype name (``"float32"``, ``"int64"`` …)."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        """Number of values (1 for a 0-d tensor)."""
        return math.prod(self.shape)

    def describe(self) -> str:
        """``name (3, 4) float32``."""
        return f"'{self.name}' {self.shape} {self.dtype}"


@dataclass(frozen=True)
class Layout:
    """Ordered (name, shape, dtype) of an upload's tensors, sorted by name: how values are packed.

    The only part of an encrypted upload the server can read.
    """

    entries: tuple[TensorSpec, ...]

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor]) -> Layout:
        """Layout of an upload ``{name: tensor of any shape}``.

        Raises:
            CKKSError: empty upload, a non-string name, a non-tensor value or an unsupported dtype
                (bool, complex); the message names the tensor.
        """
        if not isinstance(tensors, Mapping) or not tensors:
            raise CKKSError("nothing to encrypt: the upload must be a non-empty dict of name → torch.Tensor")
        entries = []
        for name in sorted(tensors, key=str):
            value = tensors[name]
            if not isinstance(name, str) or not name:
                raise CKKSError(f"upload key {name!r}: tensor names must be non-empty strings")
            if not isinstance(value, torch.Tensor):
                raise CKKSError(
                    f"upload tensor '{name}': expected a torch.Tensor, got {type(value).__name__}"
                )
            dtype = str(value.dtype).removeprefix("torch.")
            if dtype not in DTYPES:
                raise CKKSError(
                    f"upload tensor '{name}': dtype {dtype} cannot be encrypted; use one of {', '.join(DTYPES)}"
                )
            entries.append(TensorSpec(name, tuple(int(s) for s in value.shape), dtype))
        return cls(tuple(entries))

    @property
    def num_values(self) -> int:
        """Total values packed (the length of the flattened vector)."""
        return sum(e.numel for e in self.entries)

    def __iter__(self) -> Iterator[TensorSpec]:
        return iter(self.entries)

    def to_json(self) -> list:
        """``[[name, [dims...], dtype], ...]``."""
        return [[e.name, list(e.shape), e.dtype] for e in self.entries]

    @classmethod
    def from_json(cls, value: object) -> Layout:
        """Inverse of :meth:`to_json`; raises :class:`CKKSError` on anything malformed."""
        if not isinstance(value, list) or not value:
            raise CKKSError("layout must be a non-empty list of [name, shape, dtype]")
        entries = []
        for item in value:
            ok = (
                isinstance(item, list)
                and len(item) == 3
                and isinstance(item[0], str)
                and item[0]
                and isinstance(item[1], list)
                and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in item[1])
                and item[2] in DTYPES
            )
            if not ok:
                raise CKKSError(f"layout entry {item!r}: expected [name, [non-negative dims], known dtype]")
            entries.append(TensorSpec(item[0], tuple(item[1]), item[2]))
        names = [e.name for e in entries]
        if names != sorted(set(names)):
            raise CKKSError("layout names must be unique and sorted")
        return cls(tuple(entries))

    def difference(self, other: Layout) -> str:
        """What differs from ``other``, in words (empty when equal)."""
        mine, theirs = {e.name: e for e in self}, {e.name: e for e in other}
        missing, extra = sorted(set(mine) - set(theirs)), sorted(set(theirs) - set(mine))
        if missing or extra:
            return f"tensors missing: {missing or 'none'}, unexpected: {extra or 'none'}"
        for name, spec in mine.items():
            if theirs[name] != spec:
                return f"tensor {theirs[name].describe()} where {spec.describe()} was expected"
        return ""


@dataclass(frozen=True)
class EncryptedUpload:
    """One site's upload (or a sum of uploads) under CKKS: layout + serialized ciphertexts + key-set fingerprint.

    Attributes:
        layout: tensor names, shapes and dtypes (plaintext: the server sees it).
        ciphertexts: TenSEAL-serialized CKKSVectors, ``ciphertext_count(layout.num_values, ctx)`` of them.
        fingerprint: :func:`fingerprint` of the context they were encrypted under.
    """

    layout: Layout
    ciphertexts: tuple[bytes, ...]
    fingerprint: str

    def digest(self) -> str:
        """SHA-256 (hex) over layout, fingerprint and every ciphertext (length-prefixed): what sites sign."""
        h = hashlib.sha256(_DIGEST_DOMAIN)
        h.update(_canonical_json({"fingerprint": self.fingerprint, "layout": self.layout.to_json()}))
        for blob in self.ciphertexts:
            h.update(_BLOB_LEN.pack(len(blob)))
            h.update(blob)
        return h.hexdigest()

    @property
    def ciphertext_bytes(self) -> int:
        """Bytes of the serialized ciphertexts alone."""
        return sum(len(b) for b in self.ciphertexts)

    @property
    def nbytes(self) -> int:
        """Bytes of :meth:`to_bytes` (what travels), computed without building it."""
        blobs = sum(_BLOB_LEN.size + len(b) for b in self.ciphertexts)
        return _PREFIX.size + len(self._header()) + blobs + _SHA_LEN

    def _header(self) -> bytes:
        return _canonical_json(
            {
                "ciphertexts": len(self.ciphertexts),
                "fingerprint": self.fingerprint,
                "layout": self.layout.to_json(),
            }
        )

    def to_bytes(self) -> bytes:
        """The version-1 wire format (module docstring): header, length-prefixed blobs, trailing SHA-256."""
        header = self._header()
        parts = [_PREFIX.pack(WIRE_MAGIC, WIRE_VERSION, len(header)), header]
        for blob in self.ciphertexts:
            parts += [_BLOB_LEN.pack(len(blob)), blob]
        body = b"".join(parts)
        return body + hashlib.sha256(body).digest()

    def to_array(self) -> np.ndarray:
        """:meth:`to_bytes` as a 1-d ``numpy.uint8`` array (for NVFlare DXO data)."""
        return np.frombuffer(self.to_bytes(), dtype=np.uint8)

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview | np.ndarray) -> EncryptedUpload:
        """Parse :meth:`to_bytes` output (bytes or a uint8 array), verifying magic, version and SHA-256.

        Raises:
            CKKSError: not this format, unsupported version, truncated, modified (checksum mismatch) or a
                malformed header. Nothing is handed to TenSEAL here.
        """
        if isinstance(data, np.ndarray):
            if data.dtype != np.uint8 or data.ndim != 1:
                raise CKKSError(f"encrypted upload array must be 1-d uint8, got {data.ndim}-d {data.dtype}")
            data = data.tobytes()
        data = bytes(data)
        if len(data) < _PREFIX.size + _SHA_LEN or not data.startswith(WIRE_MAGIC):
            raise CKKSError(
                f"not a medsilo encrypted upload ({len(data)} bytes, no {WIRE_MAGIC.decode()} header); "
                "the sender did not encrypt with medsilo.secure.ckks or the message was cut"
            )
        _, version, header_len = _PREFIX.unpack_from(data)
        if version != WIRE_VERSION:
            raise CKKSError(
                f"encrypted upload has wire format version {version}; this medsilo reads {WIRE_VERSION}"
            )
        body, checksum = data[:-_SHA_LEN], data[-_SHA_LEN:]
        if hashlib.sha256(body).digest() != checksum:
            raise CKKSError(
                f"encrypted upload is corrupt or truncated ({len(data)} bytes, SHA-256 mismatch); it was refused"
            )
        pos = _PREFIX.size + header_len
        if pos > len(body):
            raise CKKSError(f"encrypted upload header claims {header_len} bytes but the message is shorter")
        try:
            header = json.loads(body[_PREFIX.size : pos].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CKKSError(f"encrypted upload header is not valid JSON: {e}") from e
        if not isinstance(header, dict) or set(header) != {"ciphertexts", "fingerprint", "layout"}:
            raise CKKSError(
                "encrypted upload header must hold exactly 'ciphertexts', 'fingerprint', 'layout'"
            )
        count, fp = header["ciphertexts"], header["fingerprint"]
        if not isinstance(count, int) or count < 1 or not isinstance(fp, str) or len(fp) != 64:
            raise CKKSError(
                "encrypted upload header: 'ciphertexts' must be a positive count, 'fingerprint' a sha256"
            )
        layout = Layout.from_json(header["layout"])
        blobs = []
        for i in range(count):
            if pos + _BLOB_LEN.size > len(body):
                raise CKKSError(f"encrypted upload ends before ciphertext {i + 1} of {count}")
            (size,) = _BLOB_LEN.unpack_from(body, pos)
            pos += _BLOB_LEN.size
            if pos + size > len(body):
                raise CKKSError(f"encrypted upload ciphertext {i + 1} of {count} is truncated")
            blobs.append(body[pos : pos + size])
            pos += size
        if pos != len(body):
            raise CKKSError(
                f"encrypted upload has {len(body) - pos} unexpected bytes after its {count} ciphertexts"
            )
        return cls(layout, tuple(blobs), fp)


def _canonical_json(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")
