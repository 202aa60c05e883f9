"""Aggregate release: a site decrypts only sums over enough distinct, validly signed sites."""

from __future__ import annotations

import dataclasses

import pytest
import tenseal as ts
import torch
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from medsilo.secure import ckks, release as rel
from medsilo.secure.release import Contribution, ReleaseRefused

SITES = ["h1", "h2", "h3"]


@pytest.fixture(scope="module")
def ctx() -> ts.Context:
    return ckks.make_context()


@pytest.fixture(scope="module")
def keys() -> dict[str, object]:
    return {s: rel.generate_signing_key() for s in SITES}


@pytest.fixture(scope="module")
def public_keys(keys) -> dict[str, object]:
    return {s: k.public_key() for s, k in keys.items()}


def _upload(i: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(i)
    return {
        "protos": torch.randn(3, 4, generator=g),
        "counts": torch.tensor([i, 2 * i, 1]),
        "n": torch.tensor(5.0),
    }


@pytest.fixture(scope="module")
def contributions(ctx, keys) -> list[Contribution]:
    return [
        rel.sign_contribution(s, ckks.encrypt(ctx, _upload(i)), keys[s], tag="job/round-1")
        for i, s in enumerate(SITES)
    ]


def test_three_signed_contributions_release_the_plaintext_sum(ctx, contributions, public_keys):
    # Execute
    aggregate, record = rel.release(contributions, public_keys, ctx, min_contributors=3, tag="job/round-1")
    # Assert: the sum, not any single site's upload
    expected = {k: sum(_upload(i)[k] for i in range(3)) for k in ("protos", "counts", "n")}
    assert torch.allclose(aggregate["protos"], expected["protos"], atol=1e-5)
    assert torch.equal(aggregate["counts"], expected["counts"])
    assert aggregate["n"].item() == pytest.approx(15.0, abs=1e-6)
    assert record["event"] == "aggregate_release" and record["sites"] == SITES
    assert record["digests"] == {c.site: c.upload.digest() for c in contributions}
    assert (
        record["min_contributors"] == 3
        and record["tag"] == "job/round-1"
        and record["time"].endswith("+00:00")
    )
    assert record["ckks"]["fingerprint"] == ckks.fingerprint(ctx)


def test_two_contributors_with_min_three_is_refused(ctx, contributions, public_keys):
    with pytest.raises(ReleaseRefused, match=r"^2 contributors, need ≥ 3$"):
        rel.release(contributions[:2], public_keys, ctx, min_contributors=3)


def test_signature_over_another_digest_is_refused_naming_the_site(ctx, contributions, public_keys):
    swapped = dataclasses.replace(contributions[1], signature=contributions[2].signature)
    with pytest.raises(ReleaseRefused, match=r"site h2: signature does not match its encrypted upload"):
        rel.release([contributions[0], swapped, contributions[2]], public_keys, ctx, min_contributors=3)


def test_ciphertext_modified_after_signing_is_refused_naming_the_site(ctx, contributions, public_keys):
    up = contributions[2].upload
    other = ckks.encrypt(ctx, _upload(7)).ciphertexts  # the server substitutes another ciphertext
    tampered = dataclasses.replace(contributions[2], upload=dataclasses.replace(up, ciphertexts=other))
    with pytest.raises(ReleaseRefused, match=r"site h3: signature does not match"):
        rel.release([*contributions[:2], tampered], public_keys, ctx, min_contributors=3)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda cs: [*cs, cs[0]], r"site h1 contributes twice"),
        (lambda cs: [*cs[:2], dataclasses.replace(cs[2], site="h9")], r"site h9 is unknown: no public key for it \(known: h1, h2, h3\)"),
        (lambda cs: [*cs[:2], dataclasses.replace(cs[2], upload=cs[0].upload)], r"sites h1 and h3 present the same ciphertext"),
        (lambda cs: [*cs[:2], dataclasses.replace(cs[2], tag="job/round-2")], r"site h3: contribution is tagged 'job/round-2'"),
    ],
)  # fmt: skip
def test_bad_contribution_sets_are_refused(ctx, contributions, public_keys, mutate, match):
    with pytest.raises(ReleaseRefused, match=match):
        rel.release(mutate(contributions), public_keys, ctx, min_contributors=2)


def test_min_contributors_must_be_positive(ctx, contributions, public_keys):
    with pytest.raises(ReleaseRefused, match=r"min_contributors must be an integer ≥ 1, got 0"):
        rel.release(contributions, public_keys, ctx, min_contributors=0)


def test_server_context_cannot_release(ctx, contributions, public_keys):
    server = ts.context_from(ckks.public_copy(ctx))
    with pytest.raises(ReleaseRefused, match=r"holds no secret key"):
        rel.release(contributions, public_keys, server, min_contributors=3)


def test_layout_mismatch_is_refused_naming_the_site(ctx, keys, contributions, public_keys):
    odd = rel.sign_contribution(
        "h3", ckks.encrypt(ctx, {"protos": torch.zeros(2, 4)}), keys["h3"], tag="job/round-1"
    )
    with pytest.raises(ReleaseRefused, match=r"site h3: its layout differs from site h1's"):
        rel.release([*contributions[:2], odd], public_keys, ctx, min_contributors=3)


def test_rsa_keys_from_pem_files_work(ctx, keys, tmp_path):
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    rel.save_private_key(rsa_key, tmp_path / "h3.key")
    rel.save_public_key(rsa_key.public_key(), tmp_path / "h3.pub")
    assert (tmp_path / "h3.key").stat().st_mode & 0o777 == 0o600
    signer = rel.load_private_key(tmp_path / "h3.key")
    cs = [rel.sign_contribution(s, ckks.encrypt(ctx, _upload(i)), keys[s]) for i, s in enumerate(SITES[:2])]
    cs.append(rel.sign_contribution("h3", ckks.encrypt(ctx, _upload(2)), signer))
    public = {
        "h1": keys["h1"].public_key(),
        "h2": keys["h2"].public_key(),
        "h3": rel.load_public_key(tmp_path / "h3.pub"),
    }
    aggregate, _ = rel.release(cs, public, ctx, min_contributors=3)
    assert aggregate["n"].item() == pytest.approx(15.0, abs=1e-6)


def test_contribution_wire_round_trip(contributions):
    wire = contributions[0].to_bytes()
    assert Contribution.from_bytes(wire) == contributions[0]
    with pytest.raises(ckks.CKKSError, match=r"corrupt or truncated"):
        Contribution.from_bytes(wire[:-1])


def test_key_file_errors_name_the_file(tmp_path):
    (tmp_path / "junk.pem").write_text("not a key")
    ec_key = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "ec.key").write_bytes(
        ec_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    with pytest.raises(ckks.CKKSError, match=r"missing\.key: private key file not found"):
        rel.load_private_key(tmp_path / "missing.key")
    with pytest.raises(ckks.CKKSError, match=r"junk\.pem: not a readable PEM private key"):
        rel.load_private_key(tmp_path / "junk.pem")
    with pytest.raises(ckks.CKKSError, match=r"junk\.pem: not a PEM public key or X\.509 certificate"):
        rel.load_public_key(tmp_path / "junk.pem")
    with pytest.raises(
        ckks.CKKSError, match=r"ec\.key: \w+ keys are not supported for signing; use Ed25519 or RSA"
    ):
        rel.load_private_key(tmp_path / "ec.key")
