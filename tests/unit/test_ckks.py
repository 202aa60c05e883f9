"""CKKS packing: round trips, encrypted sums ≈ plaintext sums, and every refusal the server or a site relies on."""

from __future__ import annotations

import hashlib
import json
import os
import struct

import numpy as np
import pytest
import tenseal as ts
import torch

from medsilo.secure import ckks
from medsilo.secure.ckks import CKKSError, EncryptedUpload, Layout


@pytest.fixture(scope="module")
def ctx() -> ts.Context:
    return ckks.make_context()


@pytest.fixture(scope="module")
def server_ctx(ctx) -> ts.Context:
    return ts.context_from(ckks.public_copy(ctx))


def _upload(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(3, 4, generator=g),
        "n": torch.tensor(float(10 + seed)),
        "counts": torch.randint(0, 50, (5,), generator=g),
    }


def test_mixed_upload_round_trips_with_shapes_dtypes_and_small_error(ctx):
    # Prepare
    up = _upload(0)
    # Execute
    enc = ckks.encrypt(ctx, up)
    out = ckks.decrypt(ctx, enc)
    # Assert
    assert [s.name for s in enc.layout] == ["counts", "n", "w"]  # packed sorted by name
    assert len(enc.ciphertexts) == 1
    assert {k: (tuple(v.shape), v.dtype) for k, v in out.items()} == {
        "w": ((3, 4), torch.float32),
        "n": ((), torch.float32),
        "counts": ((5,), torch.int64),
    }
    assert torch.equal(out["counts"], up["counts"])
    assert (out["w"] - up["w"]).abs().max() < 1e-6
    assert abs(out["n"].item() - 10.0) < 1e-6


def test_a_zero_dimensional_integer_round_trips(ctx):
    up = {"n": torch.tensor(7, dtype=torch.int64), "m": torch.tensor(-3, dtype=torch.int32)}
    out = ckks.decrypt(ctx, ckks.encrypt(ctx, up))
    assert {k: (tuple(v.shape), v.dtype, v.item()) for k, v in out.items()} == {
        "n": ((), torch.int64, 7), "m": ((), torch.int32, -3)}  # fmt: skip


def test_sum_of_three_sites_matches_plaintext_sum(ctx, server_ctx):
    uploads = [_upload(s) for s in range(3)]
    encrypted = [ckks.encrypt(ctx, u) for u in uploads]
    total = ckks.add(server_ctx, encrypted, labels=["h1", "h2", "h3"])
    out = ckks.decrypt(ctx, total)
    for name in ("w", "n", "counts"):
        expected = sum(u[name] for u in uploads)
        assert out[name].dtype == uploads[0][name].dtype
        assert torch.allclose(out[name].double(), expected.double(), atol=1e-5), name
    assert total.fingerprint == encrypted[0].fingerprint and total.layout == encrypted[0].layout


def test_precision_ten_sites_magnitude_1e3(ctx, server_ctx):
    """Documented in the module docstring: 10 sites × |x| ≤ 1e3 gives a max abs error well below 1e-6."""
    rng = np.random.default_rng(0)
    xs = [torch.from_numpy(rng.uniform(-1e3, 1e3, 4096)) for _ in range(10)]  # float64, one full ciphertext
    total = ckks.add(server_ctx, [ckks.encrypt(ctx, {"x": x}) for x in xs])
    err = (ckks.decrypt(ctx, total)["x"] - torch.stack(xs).sum(0)).abs().max().item()
    assert err < 1e-6  # measured ≈ 3e-8


def test_upload_larger_than_one_ciphertext_spans_several(ctx, server_ctx):
    slots = ckks.slot_count(ctx)
    up = {
        "big": torch.arange(2 * slots + 5, dtype=torch.float32).reshape(-1, 1) / 100,
        "n": torch.tensor(1.0),
    }
    enc = ckks.encrypt(ctx, up)
    assert len(enc.ciphertexts) == 3 == ckks.ciphertext_count(2 * slots + 6, ctx)
    out = ckks.decrypt(ctx, ckks.add(server_ctx, [enc, enc]))
    assert out["big"].shape == (2 * slots + 5, 1)
    assert (out["big"] - 2 * up["big"]).abs().max() < 1e-4


def test_cost_helpers():
    assert ckks.slot_count(8192) == 4096
    assert ckks.ciphertext_count(100_000, 8192) == 25
    assert ckks.ciphertext_count(4096, 8192) == 1 and ckks.ciphertext_count(4097, 8192) == 2


def test_server_context_cannot_decrypt_and_holds_no_secret_key(ctx, server_ctx):
    assert ctx.is_private() and not server_ctx.is_private()
    enc = ckks.encrypt(ctx, _upload(0))
    with pytest.raises(CKKSError, match=r"holds no secret key \(it is the server's public copy\)"):
        ckks.decrypt(server_ctx, enc)
    assert ckks.fingerprint(server_ctx) == ckks.fingerprint(ctx)  # same key set, seen from both sides


def test_foreign_key_set_is_rejected_by_add_and_decrypt(ctx, server_ctx):
    other = ckks.make_context()
    foreign = ckks.encrypt(other, _upload(1))
    mine = ckks.encrypt(ctx, _upload(0))
    with pytest.raises(CKKSError, match=r"site h2 was encrypted under a different key set"):
        ckks.add(server_ctx, [mine, foreign], labels=["site h1", "site h2"])
    with pytest.raises(CKKSError, match=r"encrypted under a different key set"):
        ckks.decrypt(ctx, foreign)


def test_layout_mismatch_names_the_site(ctx, server_ctx):
    a = ckks.encrypt(ctx, _upload(0))
    b = ckks.encrypt(ctx, {**_upload(1), "w": torch.zeros(4, 3)})
    c = ckks.encrypt(ctx, {**_upload(2), "extra": torch.zeros(2)})
    with pytest.raises(
        CKKSError, match=r"h2: its layout differs from h1's \(tensor 'w' \(4, 3\) float32 where 'w' \(3, 4\)"
    ):
        ckks.add(server_ctx, [a, b], labels=["h1", "h2"])
    with pytest.raises(CKKSError, match=r"upload #1: .*unexpected: \['extra'\]"):
        ckks.add(server_ctx, [a, c])


def test_wire_format_round_trip_bytes_and_uint8_array(ctx):
    enc = ckks.encrypt(ctx, _upload(0))
    wire = enc.to_bytes()
    assert wire.startswith(b"MSCKKS") and len(wire) == enc.nbytes > enc.ciphertext_bytes
    assert EncryptedUpload.from_bytes(wire) == enc
    assert EncryptedUpload.from_bytes(enc.to_array()) == enc
    assert EncryptedUpload.from_bytes(wire).digest() == enc.digest()


def _rehash(body: bytes) -> bytes:
    return body + hashlib.sha256(body).digest()


def _bad_wires(wire: bytes) -> dict[str, bytes]:
    body = wire[:-32]
    header_len = struct.unpack_from(">I", wire, 8)[0]
    header = json.loads(wire[12 : 12 + header_len])
    header["ciphertexts"] = 2
    forged = json.dumps(header).encode()
    return {
        "flipped ciphertext byte": wire[:500] + bytes([wire[500] ^ 1]) + wire[501:],
        "flipped header byte": wire[:20] + bytes([wire[20] ^ 1]) + wire[21:],
        "truncated": wire[: len(wire) // 2],
        "empty": b"",
        "not ours": os.urandom(100),
        "other version": _rehash(wire[:6] + struct.pack(">H", 2) + body[8:]),
        "count mismatch, rehashed": _rehash(
            body[:8] + struct.pack(">I", len(forged)) + forged + body[12 + header_len :]
        ),
        "trailing bytes, rehashed": _rehash(body + b"xx"),
    }


@pytest.mark.parametrize(
    "case, match",
    [
        ("flipped ciphertext byte", r"corrupt or truncated .*SHA-256 mismatch"),
        ("flipped header byte", r"corrupt or truncated"),
        ("truncated", r"corrupt or truncated"),
        ("empty", r"not a medsilo encrypted upload"),
        ("not ours", r"not a medsilo encrypted upload"),
        ("other version", r"wire format version 2; this medsilo reads 1"),
        ("count mismatch, rehashed", r"ends before ciphertext 2 of 2"),
        ("trailing bytes, rehashed", r"2 unexpected bytes"),
    ],
)
def test_tampered_or_truncated_wire_bytes_are_rejected(ctx, case, match):
    wire = ckks.encrypt(ctx, _upload(0)).to_bytes()
    with pytest.raises(CKKSError, match=match):
        EncryptedUpload.from_bytes(_bad_wires(wire)[case])


def test_garbage_ciphertext_with_valid_framing_becomes_ckks_error(ctx, server_ctx):
    enc = ckks.encrypt(ctx, _upload(0))
    bad = EncryptedUpload(enc.layout, (enc.ciphertexts[0][:1000],), enc.fingerprint)
    bad = EncryptedUpload.from_bytes(bad.to_bytes())  # framing and checksum are fine: TenSEAL must refuse
    with pytest.raises(CKKSError, match=r"upload #1: ciphertext 1 cannot be parsed"):
        ckks.add(server_ctx, [enc, bad])
    wrong_count = EncryptedUpload(enc.layout, enc.ciphertexts * 2, enc.fingerprint)
    with pytest.raises(CKKSError, match=r"carries 2 ciphertexts, but its layout of 18 values needs 1"):
        ckks.decrypt(ctx, wrong_count)


@pytest.mark.parametrize(
    "tensors, match",
    [
        ({}, r"nothing to encrypt"),
        ({"x": torch.tensor([1.0, float("nan")])}, r"'x' holds NaN or infinite values"),
        ({"x": torch.tensor([True])}, r"'x': dtype bool cannot be encrypted"),
        ({"x": np.zeros(3)}, r"'x': expected a torch.Tensor, got ndarray"),
        ({"x": torch.zeros(0)}, r"every tensor of the upload is empty"),
        ({"x": torch.tensor([1e18])}, r"'x' holds values beyond"),
    ],
)
def test_bad_uploads_are_refused(ctx, tensors, match):
    with pytest.raises(CKKSError, match=match):
        ckks.encrypt(ctx, tensors)


def test_public_copy_has_no_secret_key_and_no_evaluation_keys(ctx):
    public = ts.context_from(ckks.public_copy(ctx))
    assert not public.is_private()
    assert not public.has_relin_keys() and not public.has_galois_keys()
    assert ckks.public_copy(ckks.public_copy(ctx)) == ckks.public_copy(ctx)  # deterministic, canonical


def test_save_and_load_contexts(ctx, tmp_path):
    site = ckks.save_context(ctx, tmp_path / "site.tenseal", secret=True)
    server = ckks.save_context(ctx, tmp_path / "server.tenseal", secret=False)
    assert site.stat().st_mode & 0o777 == 0o600
    assert not list(tmp_path.glob(".*.tmp"))  # atomic: no temporary file left behind
    loaded_site = ckks.load_context(site, secret=True)
    loaded_server = ckks.load_context(server, secret=False)
    assert loaded_site.is_private() and not loaded_server.is_private()
    assert ckks.fingerprint(loaded_site) == ckks.fingerprint(loaded_server) == ckks.fingerprint(ctx)
    enc = ckks.encrypt(loaded_site, {"x": torch.ones(3)})
    assert torch.allclose(ckks.decrypt(ctx, ckks.add(loaded_server, [enc, enc]))["x"], torch.full((3,), 2.0))


def test_context_file_errors_name_the_file(ctx, tmp_path):
    site = ckks.save_context(ctx, tmp_path / "site.tenseal", secret=True)
    server = ckks.save_context(ctx, tmp_path / "server.tenseal", secret=False)
    corrupt = tmp_path / "corrupt.tenseal"
    corrupt.write_bytes(site.read_bytes()[:1000])
    with pytest.raises(CKKSError, match=r"missing\.tenseal: CKKS context file not found"):
        ckks.load_context(tmp_path / "missing.tenseal")
    with pytest.raises(CKKSError, match=r"corrupt\.tenseal: not a TenSEAL context"):
        ckks.load_context(corrupt)
    with pytest.raises(CKKSError, match=r"server\.tenseal: context holds no secret key"):
        ckks.load_context(server, secret=True)
    with pytest.raises(CKKSError, match=r"site\.tenseal: context holds the SECRET key"):
        ckks.load_context(site, secret=False)
    with pytest.raises(CKKSError, match=r"cannot save a secret context from a context without secret key"):
        ckks.save_context(ckks.load_context(server), tmp_path / "x.tenseal", secret=True)
    with pytest.raises(CKKSError, match=r"folder .*nowhere does not exist"):
        ckks.save_context(ctx, tmp_path / "nowhere" / "x.tenseal", secret=False)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"poly_modulus_degree": 2048}, r"poly_modulus_degree 2048 is not supported"),
        ({"coeff_mod_bit_sizes": [60, 60, 60, 60]}, r"above the 218-bit bound for 128-bit security"),
        ({"coeff_mod_bit_sizes": [60]}, r"need at least two primes"),
        ({"global_scale_bits": 99}, r"global_scale_bits 99: must be an integer from 20 to 98"),
    ],
)
def test_make_context_refuses_bad_parameters(kwargs, match):
    with pytest.raises(CKKSError, match=match):
        ckks.make_context(**kwargs)


def test_layout_json_round_trip_and_validation():
    layout = Layout.from_tensors(_upload(0))
    assert Layout.from_json(layout.to_json()) == layout and layout.num_values == 18
    with pytest.raises(CKKSError, match=r"unique and sorted"):
        Layout.from_json(list(reversed(layout.to_json())))
    with pytest.raises(CKKSError, match=r"layout entry"):
        Layout.from_json([["x", [-1], "float32"]])


def test_symmetric_contexts_are_refused(tmp_path):
    """NVFlare HEBuilder-style contexts have no public key, hence no stable fingerprint: fail closed."""
    sym = ts.context(
        ts.SCHEME_TYPE.CKKS,
        8192,
        coeff_mod_bit_sizes=[60, 40, 40],
        encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC,
    )
    sym.global_scale = 2.0**40
    with pytest.raises(CKKSError, match=r"symmetric CKKS context .* has no public key"):
        ckks.encrypt(sym, {"x": torch.ones(2)})
    path = tmp_path / "hebuilder.tenseal"
    path.write_bytes(sym.serialize(save_secret_key=True))
    with pytest.raises(CKKSError, match=r"hebuilder\.tenseal: a symmetric CKKS context"):
        ckks.load_context(path)


def test_sum_that_overflows_a_small_dtype_is_refused(ctx, server_ctx):
    enc = ckks.encrypt(ctx, {"counts": torch.tensor([100, 1], dtype=torch.int8)})
    with pytest.raises(CKKSError, match=r"decrypted tensor 'counts' does not fit its dtype int8"):
        ckks.decrypt(ctx, ckks.add(server_ctx, [enc, enc]))
