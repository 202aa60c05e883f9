"""A secret wrapped for one site (the network's CKKS secret context): the server, the coordinator or another
site that holds the blob cannot open it, alter it, re-address it or forge one (secure/keywrap.py)."""

from __future__ import annotations

import base64
import json

import pytest

from medsilo.secure import keywrap, pki
from medsilo.secure.keywrap import KeyWrapError, unwrap, wrap

TERMS = {"project": "medsilo-net", "key_version": 1, "purpose": "ckks-secret-context"}
SECRET = b"\x00secret-context\xff" * 97


@pytest.fixture(scope="module")
def net():
    ca_key, ca = pki.make_local_ca(None, key_type="rsa")
    parties = {name: pki.issue_certificate(ca_key, ca, name, None, key_type="rsa")
               for name in ("hospital-1", "hospital-2", "hospital-3", "server")}  # fmt: skip
    other_ca_key, other_ca = pki.make_local_ca(None, key_type="rsa")
    parties["rogue-hospital-1"] = pki.issue_certificate(other_ca_key, other_ca, "hospital-1", None, key_type="rsa")
    return ca, parties


def _wrap(net, sender="hospital-1", recipient="hospital-2", **terms):
    ca, parties = net
    key, cert = parties[sender]
    return wrap(SECRET, **{**TERMS, **terms}, sender=pki.common_name_of(cert), sender_key=key,
                sender_certificate=cert, recipient_certificate=parties[recipient][1])  # fmt: skip


def _open(net, blob, me="hospital-2", **terms):
    ca, parties = net
    key, cert = parties[me]
    return unwrap(blob, **{**TERMS, **terms}, recipient_key=key, recipient_certificate=cert, root_ca=ca)


def test_only_the_named_site_opens_it_and_learns_the_sender(net):
    blob = _wrap(net)
    assert _open(net, blob) == (SECRET, "hospital-1")
    assert SECRET not in blob and base64.b64encode(SECRET[:48]) not in blob  # not readable in transit
    assert keywrap.describe(blob) == {**TERMS, "sender": "hospital-1", "recipient": "hospital-2"}
    for holder in ("hospital-3", "server"):  # a third site, or the server relaying it
        with pytest.raises(KeyWrapError, match="is for 'hospital-2'"):
            _open(net, blob, me=holder)
    # two wraps of one secret share nothing (fresh AES key and nonce)
    again = json.loads(_wrap(net))
    assert again["ciphertext"] != json.loads(blob)["ciphertext"] and again["wrapped_key"] != json.loads(blob)["wrapped_key"]


def test_a_relay_cannot_readdress_alter_or_forge_it(net):
    ca, parties = net
    body = json.loads(_wrap(net))
    # re-addressed to hospital-3 (the server swaps the recipient fields): the signature no longer verifies
    readdressed = {**body, "recipient": "hospital-3",
                   "recipient_fingerprint": pki.certificate_fingerprint(parties["hospital-3"][1])}  # fmt: skip
    with pytest.raises(KeyWrapError, match="signature does not verify"):
        _open(net, json.dumps(readdressed).encode(), me="hospital-3")
    # one bit of the ciphertext flipped
    raw = bytearray(base64.b64decode(body["ciphertext"]))
    raw[5] ^= 1
    with pytest.raises(KeyWrapError, match="signature does not verify"):
        _open(net, json.dumps({**body, "ciphertext": base64.b64encode(bytes(raw)).decode()}).encode())
    # the server wraps its own "secret" for hospital-2 in hospital-1's name: its certificate names the server
    server_key, server_cert = parties["server"]
    forged = wrap(b"server-chosen key", **TERMS, sender="server", sender_key=server_key,
                  sender_certificate=server_cert, recipient_certificate=parties["hospital-2"][1])  # fmt: skip
    with pytest.raises(KeyWrapError, match="expects it from 'hospital-1'"):
        ca_, (key, cert) = ca, parties["hospital-2"]
        unwrap(forged, **TERMS, recipient_key=key, recipient_certificate=cert, root_ca=ca_, sender="hospital-1")
    # ... or with a certificate for "hospital-1" from a CA of its own
    with pytest.raises(KeyWrapError, match="hospital-1"):
        _open(net, _wrap(net, sender="rogue-hospital-1"))
    # ... or by swapping the sender certificate of a real blob for the rogue one
    rogue = {**body, "sender_certificate": pki.certificate_pem(parties["rogue-hospital-1"][1])}
    with pytest.raises(KeyWrapError, match="hospital-1"):
        _open(net, json.dumps(rogue).encode())


def test_a_blob_for_another_network_key_version_or_use_is_refused(net):
    blob = _wrap(net, key_version=1)
    with pytest.raises(KeyWrapError, match="key_version 1; this site expects 2"):
        _open(net, blob, key_version=2)  # a retired key set offered again
    with pytest.raises(KeyWrapError, match="project 'medsilo-net'"):
        _open(net, blob, project="another-net")
    with pytest.raises(KeyWrapError, match="purpose"):
        _open(net, blob, purpose="something-else")


@pytest.mark.parametrize(("damage", "message"), [
    (lambda b: b[: len(b) // 2], "not JSON"),
    (lambda b: json.dumps({**json.loads(b), "format": "medsilo-keywrap/0"}).encode(), "format is not"),
    (lambda b: json.dumps({k: v for k, v in json.loads(b).items() if k != "nonce"}).encode(), "missing or unexpected"),
    (lambda b: json.dumps({**json.loads(b), "key_version": "1"}).encode(), "'key_version' must be a int"),
    (lambda b: json.dumps({**json.loads(b), "signature": "***"}).encode(), "'signature' is not base64"),
])  # fmt: skip
def test_a_damaged_blob_is_named_not_opened(net, damage, message):
    with pytest.raises(KeyWrapError, match=message):
        _open(net, damage(_wrap(net)))


def test_wrapping_needs_an_rsa_recipient_and_the_senders_own_key(net):
    ca, parties = net
    ca_key_ed, ca_ed = pki.make_local_ca(None)
    ed_key, ed_cert = pki.issue_certificate(ca_key_ed, ca_ed, "hospital-9", None)  # Ed25519 signs, cannot receive
    key, cert = parties["hospital-1"]
    with pytest.raises(KeyWrapError, match="needs an RSA recipient key"):
        wrap(SECRET, **TERMS, sender="hospital-1", sender_key=key, sender_certificate=cert,
             recipient_certificate=ed_cert)  # fmt: skip
    with pytest.raises(KeyWrapError, match="does not belong to its certificate"):
        wrap(SECRET, **TERMS, sender="hospital-1", sender_key=parties["hospital-3"][0], sender_certificate=cert,
             recipient_certificate=parties["hospital-2"][1])  # fmt: skip
    with pytest.raises(KeyWrapError, match="key_version"):
        wrap(SECRET, **{**TERMS, "key_version": 0}, sender="hospital-1", sender_key=key, sender_certificate=cert,
             recipient_certificate=parties["hospital-2"][1])  # fmt: skip
