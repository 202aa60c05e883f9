"""CKKS encryption of upload *sums*: contexts, packing, server-side addition, a versioned wire format.

Every algorithm uploads named sums (DESIGN §3): ``{name: tensor}`` with any shapes, e.g. parameters × n,
per-class feature sums ``(K, d)``, per-class counts ``(K,)`` and a 0-d ``n``. Under ``ckks`` the server adds
those uploads across sites without being able to read them (DESIGN §5).

**Who holds which key.** Every site holds the same *secret* context (secret key + public key: one key set
per network, provisioned once, as NVFlare provisions HE). The server holds only
:func:`public_copy`: the encryption parameters and the public key, no secret key, no relinearization and
no Galois keys. Element-wise addition of ciphertexts needs no evaluation keys at all: relinearization
keys are only for ciphertext × ciphertext products and Galois keys only for slot rotations, and neither is
ever used here, so neither is written to any file. Consequences: the server can add (:func:`add`) but
cannot decrypt (:class:`CKKSError`). With the public key it could encrypt values of its own, but not pass
them off as a site's upload where it matters: sites sign their uploads (:mod:`medsilo.secure.release`). One
shared secret key means encryption protects uploads from the
server, not from a site colluding with it (DESIGN §5's aggregate release limits what the server can get
decrypted). Contexts must be public-key (asymmetric) ones: a symmetric context such as NVFlare's HEBuilder
writes has no public key, hence nothing public that stably identifies its key set, and is refused.

**Packing.** :class:`Layout` lists the upload's tensors *sorted by name* with shape and dtype; all values
are flattened in that order (row-major), concatenated into one float64 vector and cut into chunks of
``slots = poly_modulus_degree / 2`` values, one CKKS ciphertext per chunk (the last one shorter). Nothing of
the upload stays in plaintext except the layout (names, shapes, dtypes): per-class counts and ``n`` are
encrypted like everything else. Each ciphertext is serialized once, at encryption. A CKKS ciphertext costs
the same bytes however few slots it fills, so one packed vector is what keeps uploads small: see
``shared/reference/data_and_he.md`` §4 (one ciphertext per tensor costs up to 19× the plaintext bytes).

**Parameters and precision** (:data:`DEFAULT_PARAMETERS`; all within the HomomorphicEncryption.org
128-bit bounds of :data:`MAX_COEFF_MODULUS_BITS`). Public-key (asymmetric) encryption, scale 2^40:

============  ===============  =====  ================  ====================  =============================
degree N      coeff bits       slots  bytes / ct        |sum| decodes up to   measured max abs error
============  ===============  =====  ================  ====================  =============================
4096          [40, 29, 40]     2048   ≈ 86 KB           2^27 ≈ 1.3e8          ≈ 1e-8 (10 sites)
8192 default  [60, 40, 40]     4096   ≈ 235 KB          2^58 ≈ 2.9e17         3e-8 (10 sites × |x| ≤ 1e3)
16384         [60, 40, 40]     8192   ≈ 460 KB          2^58                  ≈ 5e-8 (10 sites)
============  ===============  =====  ================  ====================  =============================

The last prime is SEAL's special (key-switching) prime; the others carry data. Because nothing is ever
multiplied, no level is spent on rescaling: the TenSEAL tutorial's ``[60, 40, 40, 60]`` would add a data
prime nobody uses and 41 % more bytes and time per ciphertext (measured 331 KB vs 235 KB), so the default
is NVFlare HEBuilder's ``[60, 40, 40]``. The error of a sum is absolute (about 1e-8 per summand, independent
of the values' magnitude) and is far below float32 resolution: decrypting to float32 rounds more than CKKS
does. ``tests/unit/test_ckks.py`` measures it. A sum whose magnitude exceeds the decodable bound would wrap
around silently, so :func:`encrypt` refuses any value above ``value_bound(ctx) / MAX_SUMMANDS`` and
:func:`add` refuses more than :data:`MAX_SUMMANDS` uploads; for the default parameters that limit (2^48 per
value) never binds.

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
canonical public context (:func:`fingerprint`): a ciphertext made under another key set is refused before
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
import os
import struct
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tenseal as ts
import torch

from medsilo.errors import MedsiloError
from medsilo.secure.files import write_atomic

DEFAULT_PARAMETERS: dict[int, tuple[tuple[int, ...], int]] = {
    4096: ((40, 29, 40), 40),
    8192: ((60, 40, 40), 40),
    16384: ((60, 40, 40), 40),
}
"""Poly modulus degree → (coefficient modulus bit sizes, log2 of the global scale) used by :func:`make_context`."""

MAX_COEFF_MODULUS_BITS: dict[int, int] = {4096: 109, 8192: 218, 16384: 438}
"""Largest total coefficient modulus (bits) per degree for 128-bit security (HomomorphicEncryption.org standard)."""

MAX_SUMMANDS = 1024
"""Most uploads one :func:`add` sums; :func:`encrypt` bounds each value so that this many cannot overflow."""

WIRE_MAGIC = b"MSCKKS"
WIRE_VERSION = 1
_PREFIX = struct.Struct(">6sHI")  # magic, version, header length
_BLOB_LEN = struct.Struct(">Q")
_SHA_LEN = 32
_DIGEST_DOMAIN = b"medsilo/ckks-upload/v1\n"

_DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, name)
    for name in ("float16", "bfloat16", "float32", "float64", "uint8", "int8", "int16", "int32", "int64")
}
"""Tensor dtypes an upload may hold; integers are rounded back after decryption."""


class CKKSError(MedsiloError):
    """An encryption context, ciphertext or encrypted upload that cannot be used; nothing was decrypted or sent."""


# ---- contexts ---------------------------------------------------------------------------------------


def make_context(
    poly_modulus_degree: int = 8192,
    coeff_mod_bit_sizes: Sequence[int] | None = None,
    global_scale_bits: int | None = None,
) -> ts.Context:
    """Generate a fresh CKKS key set (what provisioning or the simulator does once per network).

    Args:
        poly_modulus_degree: N, one of :data:`DEFAULT_PARAMETERS` (default 8192: 4096 values per ciphertext).
        coeff_mod_bit_sizes: coefficient modulus primes in bits, last one the special prime
            (default: :data:`DEFAULT_PARAMETERS`). Their sum must respect :data:`MAX_COEFF_MODULUS_BITS`.
        global_scale_bits: log2 of the encoding scale (default 40). It bounds precision (≈ N / 2^bits per
            value) and, with the data primes, the largest decodable sum.

    Returns:
        An asymmetric TenSEAL context holding the secret key and the public key. TenSEAL also creates
        relinearization keys in memory; they are never serialized here (additions do not use them), and no
        Galois keys are generated (no rotations).

    Raises:
        CKKSError: unsupported degree, insecure or invalid modulus, or a scale that leaves no headroom.
    """
    if poly_modulus_degree not in DEFAULT_PARAMETERS:
        raise CKKSError(
            f"poly_modulus_degree {poly_modulus_degree} is not supported; use one of {sorted(DEFAULT_PARAMETERS)}"
        )
    default_bits, default_scale = DEFAULT_PARAMETERS[poly_modulus_degree]
    bits = list(coeff_mod_bit_sizes) if coeff_mod_bit_sizes is not None else list(default_bits)
    scale_bits = default_scale if global_scale_bits is None else global_scale_bits
    limit = MAX_COEFF_MODULUS_BITS[poly_modulus_degree]
    if len(bits) < 2 or any(not isinstance(b, int) or not 20 <= b <= 60 for b in bits):
        raise CKKSError(
            f"coeff_mod_bit_sizes {bits}: need at least two primes (data primes + special prime) of 20–60 bits"
        )
    if sum(bits) > limit:
        raise CKKSError(
            f"coeff_mod_bit_sizes {bits} total {sum(bits)} bits, above the {limit}-bit bound for 128-bit security "
            f"at poly_modulus_degree {poly_modulus_degree}; use fewer or smaller primes"
        )
    data_bits = sum(bits[:-1])
    if not isinstance(scale_bits, int) or not 20 <= scale_bits <= data_bits - 2:
        raise CKKSError(
            f"global_scale_bits {scale_bits}: must be an integer from 20 to {data_bits - 2} "
            f"(the data primes {bits[:-1]} hold {data_bits} bits)"
        )
    try:
        ctx = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree, coeff_mod_bit_sizes=bits)
    except ValueError as e:
        raise CKKSError(f"TenSEAL refused CKKS parameters N={poly_modulus_degree}, {bits}: {e}") from e
    ctx.global_scale = 2.0**scale_bits
    return ctx


def public_copy(ctx: ts.Context | bytes) -> bytes:
    """The serialized context the server holds: parameters and public key, no secret key.

    Deterministic for a key set (also after a save/load round trip of the secret context), so
    :func:`fingerprint` (its SHA-256) is the same at every site and at the server. Relinearization and
    Galois keys are left out: nothing here multiplies or rotates.

    Args:
        ctx: a context or its serialized bytes (secret or public).

    Returns:
        TenSEAL context bytes; ``ts.context_from`` of them gives ``is_private() == False``.

    Raises:
        CKKSError: unparsable bytes, or a symmetric context (no public key: its key set has no stable
            public fingerprint, so it is refused).
    """
    if isinstance(ctx, bytes | bytearray | memoryview):
        ctx = _parse_context(bytes(ctx), "context bytes")
    _require_public_key(ctx, "this context")
    return ctx.serialize(
        save_public_key=True, save_secret_key=False, save_galois_keys=False, save_relin_keys=False
    )


_FINGERPRINTS: weakref.WeakKeyDictionary[ts.Context, str] = weakref.WeakKeyDictionary()


def fingerprint(ctx: ts.Context | bytes) -> str:
    """SHA-256 (hex) of :func:`public_copy`: names the key set a ciphertext was made under.

    Cached per context object (serializing the public key costs milliseconds).
    """
    if not isinstance(ctx, ts.Context):
        return hashlib.sha256(public_copy(ctx)).hexdigest()
    cached = _FINGERPRINTS.get(ctx)
    if cached is None:
        cached = _FINGERPRINTS[ctx] = hashlib.sha256(public_copy(ctx)).hexdigest()
    return cached


def slot_count(ctx: ts.Context | int) -> int:
    """Values per ciphertext: ``poly_modulus_degree / 2`` (``ctx`` may be the degree itself)."""
    return _degree(ctx) // 2


def ciphertext_count(num_values: int, ctx: ts.Context | int) -> int:
    """Ciphertexts an upload of ``num_values`` values packs into (``ctx`` may be the poly modulus degree)."""
    if num_values < 0:
        raise CKKSError(f"num_values must be ≥ 0, got {num_values}")
    return math.ceil(num_values / slot_count(ctx))


def value_bound(ctx: ts.Context) -> float:
    """Largest |sum| that decrypts correctly: 2^(data bits − scale bits − 2) (a factor 2 below wrap-around)."""
    data = ctx.seal_context().data.first_context_data()
    return 2.0 ** (data.total_coeff_modulus_bit_count() - _scale_bits(ctx) - 2)


def parameters(ctx: ts.Context) -> dict:
    """JSON-plain description for ledger entries: scheme, degree, modulus bits, scale, fingerprint."""
    seal = ctx.seal_context().data
    return {
        "scheme": "CKKS",
        "poly_modulus_degree": _degree(ctx),
        "coeff_modulus_bits": seal.key_context_data().total_coeff_modulus_bit_count(),
        "data_modulus_bits": seal.first_context_data().total_coeff_modulus_bit_count(),
        "global_scale_bits": _scale_bits(ctx),
        "encryption": "public key",
        "fingerprint": fingerprint(ctx),
    }


def save_context(ctx: ts.Context, path: str | os.PathLike, secret: bool) -> Path:
    """Write ``ctx`` to ``path`` atomically (temporary file in the same folder, then rename).

    Args:
        ctx: the context.
        path: destination file; its folder must exist.
        secret: True for a site's file (secret + public key, mode 0600); False for the server's file
            (:func:`public_copy`, mode 0644).

    Returns:
        The path written. The bytes are plain TenSEAL serialization (no relinearization or Galois keys),
        readable by NVFlare's ``load_tenseal_context_from_workspace`` too.

    Raises:
        CKKSError: ``secret=True`` for a context without secret key, a symmetric context, or the file
            cannot be written.
    """
    path = Path(path)
    if secret:
        if not ctx.is_private():
            raise CKKSError(
                f"{path}: cannot save a secret context from a context without secret key (a public/server copy)"
            )
        _require_public_key(ctx, str(path))
        data = ctx.serialize(
            save_public_key=True, save_secret_key=True, save_galois_keys=False, save_relin_keys=False
        )
    else:
        data = public_copy(ctx)
    write_atomic(path, data, 0o600 if secret else 0o644, "CKKS context", error=CKKSError)
    return path


def load_context(path: str | os.PathLike, secret: bool | None = None) -> ts.Context:
    """Read a CKKS context file written by :func:`save_context` (or NVFlare's HE builder).

    Args:
        path: the file.
        secret: True where the secret key is required (a site that decrypts); False where it must be
            absent (the server: fail closed if a site's file was deployed there); None to accept either.

    Raises:
        CKKSError: naming the file: missing, unreadable, not a TenSEAL CKKS context, symmetric (no public
            key), no global scale, or secret key present/absent against ``secret``.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError as e:
        raise CKKSError(
            f"{path}: CKKS context file not found; check the site's startup kit or provisioning"
        ) from e
    except OSError as e:
        raise CKKSError(f"{path}: cannot read CKKS context file ({e.strerror or e})") from e
    ctx = _parse_context(data, str(path))
    try:
        _scale_bits(ctx)
    except CKKSError as e:
        raise CKKSError(f"{path}: CKKS context has no global scale; regenerate it with make_context") from e
    if secret is True and not ctx.is_private():
        raise CKKSError(
            f"{path}: context holds no secret key (it is a public/server copy); a site needs the secret "
            "context from its own startup kit to decrypt"
        )
    if secret is False and ctx.is_private():
        raise CKKSError(
            f"{path}: context holds the SECRET key, but this role must only have the public copy; "
            "replace it with the server context (save_context(..., secret=False)) and treat the key as exposed"
        )
    return ctx


# ---- layout and encrypted uploads -------------------------------------------------------------------


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
            if dtype not in _DTYPES:
                raise CKKSError(
                    f"upload tensor '{name}': dtype {dtype} cannot be encrypted; use one of {', '.join(_DTYPES)}"
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
                and item[2] in _DTYPES
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


# ---- encrypt, add, decrypt --------------------------------------------------------------------------


def encrypt(ctx: ts.Context, tensors: Mapping[str, torch.Tensor]) -> EncryptedUpload:
    """Pack and encrypt one site's upload.

    Privacy: after this, only the layout (names, shapes, dtypes) and sizes are readable without the secret
    key; counts and ``n`` are encrypted too. No ledger entry is written here (the filter that sends it does).

    Args:
        ctx: a context that can encrypt (a site's secret context; an asymmetric public copy also can).
        tensors: ``{name: tensor}`` of any shapes and a dtype of the layout's list, on any device.

    Returns:
        The encrypted upload; ciphertexts are serialized once, here.

    Raises:
        CKKSError: bad upload (names the tensor), non-finite values (names the tensor), values too large to
            sum safely (names the tensor and the bound), or a context that cannot encrypt.
    """
    layout = Layout.from_tensors(tensors)
    if layout.num_values == 0:
        raise CKKSError("nothing to encrypt: every tensor of the upload is empty")
    limit = value_bound(ctx) / MAX_SUMMANDS
    parts = []
    for spec in layout:
        flat = tensors[spec.name].detach().reshape(-1).to(device="cpu", dtype=torch.float64).numpy()
        if not np.all(np.isfinite(flat)):
            raise CKKSError(
                f"upload tensor '{spec.name}' holds NaN or infinite values; refusing to encrypt it"
            )
        if flat.size and np.max(np.abs(flat)) > limit:
            raise CKKSError(
                f"upload tensor '{spec.name}' holds values beyond ±{limit:.3g}, the most these CKKS parameters "
                f"can sum over {MAX_SUMMANDS} sites without wrapping around; rescale it or use larger data primes"
            )
        parts.append(flat)
    values = np.concatenate(parts)
    fp = fingerprint(ctx)
    slots = slot_count(ctx)
    try:
        blobs = tuple(
            ts.ckks_vector(ctx, values[i : i + slots].tolist()).serialize()
            for i in range(0, values.size, slots)
        )
    except ValueError as e:
        raise CKKSError(f"cannot encrypt with this context: {e}") from e
    return EncryptedUpload(layout, blobs, fp)


def add(
    public_ctx: ts.Context, uploads: Sequence[EncryptedUpload], labels: Sequence[str] | None = None
) -> EncryptedUpload:
    """Element-wise sum of encrypted uploads: what the server computes, with no secret key.

    Args:
        public_ctx: the server's public context (a secret one works too: a releasing site re-adds).
        uploads: encrypted uploads, all under ``public_ctx``'s key set and with the same layout.
        labels: names for messages, e.g. the sites (default ``upload #i``).

    Returns:
        An :class:`EncryptedUpload` holding Σ uploads, same layout and fingerprint.

    Raises:
        CKKSError: fail closed, naming the upload: a different key set (fingerprint), a different layout,
            a wrong ciphertext count or size, unparsable ciphertexts, no uploads or too many.
    """
    uploads = list(uploads)
    labels = list(labels) if labels is not None else [f"upload #{i}" for i in range(len(uploads))]
    if not uploads:
        raise CKKSError("nothing to add: no encrypted uploads were given")
    if len(labels) != len(uploads):
        raise CKKSError(f"{len(labels)} labels for {len(uploads)} uploads")
    if len(uploads) > MAX_SUMMANDS:
        raise CKKSError(
            f"{len(uploads)} uploads exceed MAX_SUMMANDS={MAX_SUMMANDS}: their sum could overflow"
        )
    ref = uploads[0]
    for label, up in zip(labels, uploads):
        _check_usable(public_ctx, up, label)
        if up.layout != ref.layout:
            raise CKKSError(
                f"{label}: its layout differs from {labels[0]}'s ({ref.layout.difference(up.layout)}); all sites "
                "must upload the same tensors (same algorithm, model and classes)"
            )
    total = []
    for j, size in enumerate(_chunk_sizes(ref.layout.num_values, public_ctx)):
        acc = _load_vector(public_ctx, ref.ciphertexts[j], labels[0], j, size)
        for label, up in zip(labels[1:], uploads[1:]):
            vec = _load_vector(public_ctx, up.ciphertexts[j], label, j, size)
            try:
                acc += vec
            except (ValueError, RuntimeError) as e:
                raise CKKSError(f"{label}: ciphertext {j + 1} cannot be added ({e})") from e
        total.append(acc.serialize())
    return EncryptedUpload(ref.layout, tuple(total), ref.fingerprint)


def decrypt(secret_ctx: ts.Context, enc: EncryptedUpload) -> dict[str, torch.Tensor]:
    """Decrypt an (aggregated) upload back to ``{name: tensor}`` with the layout's shapes and dtypes.

    Privacy: whoever calls this sees the plaintext sum; sites call it on aggregates (DESIGN §3) and the
    release protocol (:mod:`medsilo.secure.release`) guards server-side learning. Integer tensors are
    rounded to the nearest integer; floats carry the CKKS error (≈1e-8 per summand, module docstring).

    Raises:
        CKKSError: the context has no secret key (the server's), the upload was encrypted under a different
            key set, or its ciphertexts do not match its layout.
    """
    if not secret_ctx.is_private():
        raise CKKSError(
            "cannot decrypt: this context holds no secret key (it is the server's public copy); "
            "only sites hold the secret key, and the server never decrypts"
        )
    _check_usable(secret_ctx, enc, "the encrypted upload")
    values = np.empty(enc.layout.num_values, dtype=np.float64)
    slots = slot_count(secret_ctx)
    for j, size in enumerate(_chunk_sizes(enc.layout.num_values, secret_ctx)):
        vec = _load_vector(secret_ctx, enc.ciphertexts[j], "the encrypted upload", j, size)
        try:
            values[j * slots : j * slots + size] = vec.decrypt()
        except (ValueError, RuntimeError) as e:
            raise CKKSError(f"cannot decrypt ciphertext {j + 1}: {e}") from e
    out, pos = {}, 0
    for spec in enc.layout:
        chunk = values[pos : pos + spec.numel].reshape(spec.shape)
        pos += spec.numel
        dtype = _DTYPES[spec.dtype]
        if dtype.is_floating_point:
            fits = bool(np.all(np.abs(chunk) <= torch.finfo(dtype).max))
        else:
            chunk = np.rint(chunk)
            fits = bool(np.all((chunk >= torch.iinfo(dtype).min) & (chunk <= torch.iinfo(dtype).max)))
        if not fits:
            raise CKKSError(
                f"decrypted tensor '{spec.name}' does not fit its dtype {spec.dtype}; upload it as float32/int64"
            )
        out[spec.name] = torch.from_numpy(chunk.copy()).to(dtype)
    return out


# ---- helpers ----------------------------------------------------------------------------------------


def _check_usable(ctx: ts.Context, up: EncryptedUpload, label: str) -> None:
    """Type, key set and ciphertext count of ``up`` against ``ctx``, before any TenSEAL parsing."""
    if not isinstance(up, EncryptedUpload):
        raise CKKSError(f"{label}: expected an EncryptedUpload, got {type(up).__name__}")
    fp = fingerprint(ctx)
    if up.fingerprint != fp:
        raise CKKSError(
            f"{label} was encrypted under a different key set (context fingerprint {up.fingerprint[:12]}…, "
            f"this context {fp[:12]}…); it was rejected unused: every site and the server must use the "
            "contexts of the same provisioning"
        )
    expected = ciphertext_count(up.layout.num_values, ctx)
    if len(up.ciphertexts) != expected:
        raise CKKSError(
            f"{label} carries {len(up.ciphertexts)} ciphertexts, but its layout of {up.layout.num_values} values "
            f"needs {expected} at {slot_count(ctx)} slots each"
        )


def _load_vector(ctx: ts.Context, blob: bytes, label: str, index: int, size: int) -> ts.CKKSVector:
    try:
        vec = ts.ckks_vector_from(ctx, blob)
    except (ValueError, RuntimeError, TypeError) as e:
        raise CKKSError(f"{label}: ciphertext {index + 1} cannot be parsed under this context ({e})") from e
    if vec.size() != size:
        raise CKKSError(f"{label}: ciphertext {index + 1} holds {vec.size()} values, its layout says {size}")
    return vec


def _chunk_sizes(num_values: int, ctx: ts.Context) -> list[int]:
    slots = slot_count(ctx)
    return [min(slots, num_values - i) for i in range(0, num_values, slots)]


def _degree(ctx: ts.Context | int) -> int:
    if isinstance(ctx, int):
        if ctx <= 0 or ctx & (ctx - 1):
            raise CKKSError(f"poly_modulus_degree must be a power of two, got {ctx}")
        return ctx
    return ctx.seal_context().data.first_context_data().parms().poly_modulus_degree()


def _scale_bits(ctx: ts.Context) -> int:
    try:
        return round(math.log2(ctx.global_scale))
    except ValueError as e:
        raise CKKSError("CKKS context has no global scale; create it with make_context") from e


def _require_public_key(ctx: ts.Context, what: str) -> None:
    """Refuse symmetric contexts (NVFlare HEBuilder's): without a public key nothing public identifies the
    key set (their relinearization keys re-serialize differently after a load), so a foreign ciphertext
    could not be rejected and would decrypt to garbage."""
    try:
        ctx.has_public_key()
    except ValueError as e:  # TenSEAL: "has_public_key is not supported for symmetric encryption"
        raise CKKSError(
            f"{what}: a symmetric CKKS context (as NVFlare's HEBuilder makes) has no public key, so its key set "
            "cannot be fingerprinted and ciphertexts from another key set could not be rejected; provision "
            "contexts with medsilo.secure.ckks.make_context"
        ) from e


def _parse_context(data: bytes, what: str) -> ts.Context:
    try:
        ctx = ts.context_from(data)
    except (ValueError, RuntimeError, TypeError) as e:
        raise CKKSError(
            f"{what}: not a TenSEAL context (corrupt or truncated: {e}); copy it again from provisioning"
        ) from e
    scheme = ctx.seal_context().data.first_context_data().parms().scheme()
    if scheme.name != "CKKS":
        raise CKKSError(f"{what}: a {scheme.name} context, not CKKS")
    _require_public_key(ctx, what)
    return ctx


def _canonical_json(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")
