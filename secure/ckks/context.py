"""CKKS key sets: make, copy for the server, fingerprint, describe, save and load; slot counts and bounds.

A site holds the secret context, the server only :func:`public_copy` (:mod:`medsilo.secure.ckks` says why).

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
around silently, so :func:`.ops.encrypt` refuses any value above ``value_bound(ctx) / MAX_SUMMANDS`` and
:func:`.ops.add` refuses more than :data:`.ops.MAX_SUMMANDS` uploads; for the default parameters that limit (2^48 per
value) never binds.
"""

from __future__ import annotations

import hashlib
import math
import os
import weakref
from collections.abc import Sequence
from pathlib import Path

import tenseal as ts

from medsilo.errors import MedsiloError
from medsilo.fs import write_atomic

DEFAULT_PARAMETERS: dict[int, tuple[tuple[int, ...], int]] = {
    4096: ((40, 29, 40), 40),
    8192: ((60, 40, 40), 40),
    16384: ((60, 40, 40), 40),
}
"""Poly modulus degree → (coefficient modulus bit sizes, log2 of the global scale) used by :func:`make_context`."""

MAX_COEFF_MODULUS_BITS: dict[int, int] = {4096: 109, 8192: 218, 16384: 438}
"""Largest total coefficient modulus (bits) per degree for 128-bit security (HomomorphicEncryption.org standard)."""


class CKKSError(MedsiloError):
    """An encryption context, ciphertext or encrypted upload that cannot be used; nothing was decrypted or sent."""


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
