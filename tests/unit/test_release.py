"""Aggregate release (the pure check): a site decrypts only the sum over the exact announced participant set of
validly signed uploads; wires and plaintext bodies read back exactly; key files fail naming the file."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import tenseal as ts
import torch
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from medsilo.secure import ckks, pki
from medsilo.secure.release import ReleaseRefused, release
from medsilo.secure.upload import Wire, WireError, open_wire, pack_arrays, seal, unpack_arrays

SITES = ["h1", "h2", "h3"]


@pytest.fixture(scope="module")
def ctx() -> ts.Context:
    return ckks.make_context()


@pytest.fixture(scope="module")
def keys() -> dict[str, object]:
    return {s: ed25519.Ed25519PrivateKey.generate() for s in SITES}


@pytest.fixture(scope="module")
def public_keys(keys) -> dict[str, object]:
    return {s: k.public_key() for s, k in keys.items()}


def _upload(i: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(i)
    return {"protos": torch.randn(3, 4, generator=g), "counts": torch.tensor([i, 2 * i, 1]), "n": torch.tensor(5.0)}


def _statement(site: str, **change) -> dict:
    return {"kind": "upload", "site": site, "job": "job", "round": 1, "mode": "ckks", "participants": SITES,
            "min_contributors": 2, "body": "ckks", "ledger_seq": -1, "ledger_hash": "0" * 64, **change}  # fmt: skip


@pytest.fixture(scope="module")
def wires(ctx, keys) -> dict[str, bytes]:
    return {s: seal(_statement(s), ckks.encrypt(ctx, _upload(i)).to_bytes(), keys[s]).to_bytes()
            for i, s in enumerate(SITES)}  # fmt: skip


def _release(ctx, public_keys, wires, releaser="h1", **kw):
    own = Wire.from_bytes(wires[releaser]).statement.digest if releaser in wires else None
    args = {"job": "job", "rnd": 1, "mode": "ckks", "releaser": releaser, "own_digest": own, "min_contributors": 2}
    return release(list(wires.values()), public_keys, ctx, **{**args, **kw})


def test_the_announced_signed_set_releases_the_plaintext_sum(ctx, public_keys, wires):
    aggregate, record = _release(ctx, public_keys, wires, min_contributors=3)
    expected = {k: sum(_upload(i)[k] for i in range(3)) for k in ("protos", "counts", "n")}
    assert torch.allclose(aggregate["protos"], expected["protos"], atol=1e-5)
    assert torch.equal(aggregate["counts"], expected["counts"])
    assert aggregate["n"].item() == pytest.approx(15.0, abs=1e-6)
    assert record["participants"] == SITES and record["contributors"] == 3 and record["min_contributors"] == 3
    assert record["digests"] == {s: Wire.from_bytes(w).statement.digest for s, w in wires.items()}


def _resigned(ctx, keys, site, i=0, **change):
    return seal(_statement(site, **change), ckks.encrypt(ctx, _upload(i)).to_bytes(), keys[site]).to_bytes()


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda w, c, k: {**w, "x": w["h1"]}, r"site h1 contributes twice"),
        (lambda w, c, k: {"h1": w["h1"], "h2": w["h2"]}, r"missing h3"),
        (lambda w, c, k: {**w, "h3": _resigned(c, k, "h3", 2, round=2)}, r"site h3: its upload says round 2"),
        (lambda w, c, k: {**w, "h3": _resigned(c, k, "h3", 2, mode="ckks+dp")}, r"says mode 'ckks\+dp'"),
        (lambda w, c, k: {**w, "h3": _resigned(c, k, "h3", 2, participants=["h2", "h3"])}, r"different participant sets"),
        (lambda w, c, k: {**w, "h3": _resigned(c, k, "h3", 2, body="arrays")}, r"says body 'arrays'"),
        (lambda w, c, k: {**w, "h3": _resigned(c, k, "h3", 2, min_contributors=4)}, r"3 contributors, need ≥ 4"),
    ],
)  # fmt: skip
def test_bad_contribution_sets_are_refused(ctx, keys, public_keys, wires, mutate, match):
    with pytest.raises(ReleaseRefused, match=match):
        _release(ctx, public_keys, mutate(dict(wires), ctx, keys))


def test_the_same_ciphertext_under_two_sites_is_refused(ctx, keys, public_keys, wires):
    body = Wire.from_bytes(wires["h1"]).body
    copied = seal(_statement("h2"), body, keys["h2"]).to_bytes()
    with pytest.raises(ReleaseRefused, match=r"sites h1 and h2 present the same ciphertext"):
        _release(ctx, public_keys, {**wires, "h2": copied})


def test_the_releaser_must_be_a_participant_with_its_own_upload(ctx, public_keys, wires):
    with pytest.raises(ReleaseRefused, match=r"h9 is not a participant"):
        _release(ctx, public_keys, wires, releaser="h9")
    with pytest.raises(ReleaseRefused, match=r"not the one its ledger records"):
        _release(ctx, public_keys, wires, own_digest="0" * 64)


def test_min_contributors_must_be_positive_and_the_server_context_cannot_release(ctx, public_keys, wires):
    with pytest.raises(ReleaseRefused, match=r"min_contributors must be an integer ≥ 1, got 0"):
        _release(ctx, public_keys, wires, min_contributors=0)
    with pytest.raises(ReleaseRefused, match=r"holds no secret key"):
        _release(ts.context_from(ckks.public_copy(ctx)), public_keys, wires)


def test_a_layout_mismatch_is_refused_naming_the_site(ctx, keys, public_keys, wires):
    odd = seal(_statement("h3"), ckks.encrypt(ctx, {"protos": torch.zeros(2, 4)}).to_bytes(), keys["h3"]).to_bytes()
    with pytest.raises(ReleaseRefused, match=r"site h3: its layout differs from site h1's"):
        _release(ctx, public_keys, {**wires, "h3": odd})


def test_rsa_kit_keys_from_pem_files_sign_and_verify(ctx, keys, public_keys, wires, tmp_path):
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pki.save_private_key(rsa_key, tmp_path / "h3.key")
    pki.save_public_key(rsa_key.public_key(), tmp_path / "h3.pub")
    assert (tmp_path / "h3.key").stat().st_mode & 0o777 == 0o600
    signed = seal(_statement("h3"), ckks.encrypt(ctx, _upload(2)).to_bytes(), pki.load_private_key(tmp_path / "h3.key"))
    public = {**public_keys, "h3": pki.load_public_key(tmp_path / "h3.pub")}
    aggregate, _ = _release(ctx, public, {**wires, "h3": signed.to_bytes()})
    assert aggregate["n"].item() == pytest.approx(15.0, abs=1e-6)


def test_wires_round_trip_and_fail_closed(keys, public_keys):
    arrays = {"b": np.arange(6, dtype=np.float32).reshape(2, 3), "a": np.array(7, dtype=np.int64)}
    body = pack_arrays(arrays)
    back = unpack_arrays(body)
    assert sorted(back) == ["a", "b"] and all(np.array_equal(back[k], v) for k, v in arrays.items())
    assert back["b"].flags.writeable
    wire = seal(_statement("h1", body="arrays"), body, keys["h1"])
    raw = wire.to_bytes()
    assert Wire.from_bytes(raw) == wire and wire.statement.digest == hashlib.sha256(body).hexdigest()
    assert open_wire(raw, public_keys, sender="h1") == wire
    with pytest.raises(WireError, match="corrupt or truncated"):
        Wire.from_bytes(raw[:-1])
    with pytest.raises(WireError, match="signed as 'h1'"):
        open_wire(raw, public_keys, sender="h2")
    forged = Wire(wire.statement, keys["h2"].sign(wire.statement.message()), body).to_bytes()
    with pytest.raises(WireError, match="site h1: signature does not verify"):
        open_wire(forged, public_keys)
    with pytest.raises(WireError, match="dtype float64 cannot travel"):
        pack_arrays({"x": np.zeros(2)})
    with pytest.raises(WireError, match="truncated"):
        unpack_arrays(body[:-4])


def test_key_file_errors_name_the_file(tmp_path):
    (tmp_path / "junk.pem").write_text("not a key")
    ec_key = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "ec.key").write_bytes(
        ec_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())  # fmt: skip
    )
    with pytest.raises(pki.PKIError, match=r"missing\.key: private key file not found"):
        pki.load_private_key(tmp_path / "missing.key")
    with pytest.raises(pki.PKIError, match=r"junk\.pem: not a readable PEM private key"):
        pki.load_private_key(tmp_path / "junk.pem")
    with pytest.raises(pki.PKIError, match=r"junk\.pem: not a PEM public key or X\.509 certificate"):
        pki.load_public_key(tmp_path / "junk.pem")
    with pytest.raises(pki.PKIError, match=r"ec\.key: \w+ keys are not supported for signing; use Ed25519 or RSA"):
        pki.load_private_key(tmp_path / "ec.key")
