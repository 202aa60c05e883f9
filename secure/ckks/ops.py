"""Encrypt a site's upload, add uploads on the server (no secret key), decrypt a sum at a site.

**Packing.** :class:`Layout` lists the upload's tensors *sorted by name* with shape and dtype; all values
are flattened in that order (row-major), concatenated into one float64 vector and cut into chunks of
``slots = poly_modulus_degree / 2`` values, one CKKS ciphertext per chunk (the last one shorter). Nothing of
the upload stays in plaintext except the layout (names, shapes, dtypes): per-class counts and ``n`` are
encrypted like everything else. Each ciphertext is serialized once, at encryption. A CKKS ciphertext costs
the same bytes however few slots it fills, so one packed vector is what keeps uploads small: see
``shared/reference/data_and_he.md`` §4 (one ciphertext per tensor costs up to 19× the plaintext bytes).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import tenseal as ts
import torch

from medsilo.secure.ckks.context import CKKSError, ciphertext_count, fingerprint, slot_count, value_bound
from medsilo.secure.ckks.wire import DTYPES, EncryptedUpload, Layout

MAX_SUMMANDS = 1024
"""Most uploads one :func:`add` sums; :func:`encrypt` bounds each value so that this many cannot overflow."""


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
    rounded to the nearest integer; floats carry the CKKS error (≈1e-8 per summand, :mod:`.context`).

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
        dtype = DTYPES[spec.dtype]
        if dtype.is_floating_point:
            fits = bool(np.all(np.abs(chunk) <= torch.finfo(dtype).max))
        else:
            chunk = np.asarray(np.rint(chunk))  # a 0-d array: np.rint returns a scalar
            fits = bool(np.all((chunk >= torch.iinfo(dtype).min) & (chunk <= torch.iinfo(dtype).max)))
        if not fits:
            raise CKKSError(
                f"decrypted tensor '{spec.name}' does not fit its dtype {spec.dtype}; upload it as float32/int64"
            )
        out[spec.name] = torch.from_numpy(chunk.copy()).to(dtype)
    return out


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
