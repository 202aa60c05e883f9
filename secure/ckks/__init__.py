"""CKKS encryption of upload *sums*: contexts, a versioned wire format, encryption and server-side addition.

Every algorithm uploads named sums (DESIGN §3): ``{name: tensor}`` with any shapes, e.g. parameters × n,
per-class feature sums ``(K, d)``, per-class counts ``(K,)`` and a 0-d ``n``. Under ``ckks`` the server adds
those uploads across sites without being able to read them (DESIGN §5).

**Who holds which key.** Every site holds the same *secret* context (secret key + public key: one key set
per network, provisioned once, as NVFlare provisions HE). The server holds only
:func:`~.context.public_copy`: the encryption parameters and the public key, no secret key, no relinearization and
no Galois keys. Element-wise addition of ciphertexts needs no evaluation keys at all: relinearization
keys are only for ciphertext × ciphertext products and Galois keys only for slot rotations, and neither is
ever used here, so neither is written to any file. Consequences: the server can add (:func:`~.ops.add`) but
cannot decrypt (:class:`CKKSError`). With the public key it could encrypt values of its own, but not pass
them off as a site's upload where it matters: sites sign their uploads (:mod:`medsilo.secure.release`). One
shared secret key means encryption protects uploads from the
server, not from a site colluding with it (DESIGN §5's aggregate release limits what the server can get
decrypted). Contexts must be public-key (asymmetric) ones: a symmetric context such as NVFlare's HEBuilder
writes has no public key, hence nothing public that stably identifies its key set, and is refused.

Which module holds what (import from here: every name below is re-exported):

* :mod:`.context` — key sets: :func:`make_context`, :func:`public_copy` (what the server holds),
  :func:`fingerprint`, :func:`parameters` (for ledger entries), :func:`save_context`/:func:`load_context`,
  :func:`slot_count`, :func:`ciphertext_count`, :func:`value_bound`, :class:`CKKSError`; its docstring gives the
  parameters and the precision measured.
* :mod:`.wire` — the bytes that travel: :class:`TensorSpec`, :class:`Layout` (names, shapes, dtypes: the only
  readable part), :class:`EncryptedUpload` (``to_bytes``/``from_bytes``, ``digest`` that sites sign),
  :data:`WIRE_MAGIC`, :data:`WIRE_VERSION`; its docstring gives the format byte by byte and what the server
  still sees. No TenSEAL call is made there.
* :mod:`.ops` — :func:`encrypt` (packing; its docstring says how), :func:`add` (the server's sum, no secret key)
  and :func:`decrypt` (sites only), bounded by :data:`MAX_SUMMANDS`.

Imports point one way: ``ops`` → ``wire``, ``context``; ``wire`` → ``context`` (for :class:`CKKSError` only).
"""

from medsilo.secure.ckks.context import (
    DEFAULT_PARAMETERS,
    MAX_COEFF_MODULUS_BITS,
    CKKSError,
    ciphertext_count,
    fingerprint,
    load_context,
    make_context,
    parameters,
    public_copy,
    save_context,
    slot_count,
    value_bound,
)
from medsilo.secure.ckks.ops import MAX_SUMMANDS, add, decrypt, encrypt
from medsilo.secure.ckks.wire import WIRE_MAGIC, WIRE_VERSION, EncryptedUpload, Layout, TensorSpec

__all__ = [
    "DEFAULT_PARAMETERS",
    "MAX_COEFF_MODULUS_BITS",
    "MAX_SUMMANDS",
    "WIRE_MAGIC",
    "WIRE_VERSION",
    "CKKSError",
    "EncryptedUpload",
    "Layout",
    "TensorSpec",
    "add",
    "ciphertext_count",
    "decrypt",
    "encrypt",
    "fingerprint",
    "load_context",
    "make_context",
    "parameters",
    "public_copy",
    "save_context",
    "slot_count",
    "value_bound",
]
