"""A site removed from the network (its certificate revoked by the root CA's list, or its certificate dropped from
the peers) gets no signature accepted any more, and the auditor flags ledger entries it signed after the revocation.

Real certificates from the local root CA (:mod:`medsilo.secure.pki`), a real X.509 CRL, the real pipelines."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest

from medsilo.cli import main
from medsilo.secure import pki
from medsilo.secure.keys import Party
from medsilo.secure.ledger import Ledger, entries
from medsilo.secure.pipeline.base import PipelineRefusal
from medsilo.secure.release import ReleaseRefused, release
from medsilo.secure.revocation import CRL_FILE, Peers, RevocationError, load_crl, revoke
from medsilo.secure.upload import WIRE_PARAM, WireError, open_wire

from .conftest import SITES, upload


def _ca(federation):
    pki_dir = federation.root_ca.parent
    return pki.load_private_key(pki_dir / pki.ROOT_CA_KEY), pki.load_certificate(pki_dir / pki.ROOT_CA_CERT)


def _revoke(federation, site: str, reason: str = "left"):
    """The coordinator revokes ``site`` and distributes the list beside every party's root CA."""
    ca_key, ca_cert = _ca(federation)
    cert = pki.load_certificate(federation.root_ca.parent / f"{site}.crt")
    return revoke(ca_key, ca_cert, [cert], federation.root_ca.parent / CRL_FILE, reason=reason)


def _round(federation, terms, rnd: int = 1):
    sites = {s: federation.site(s, terms) for s in SITES}
    return sites, {s: sites[s].protect(rnd, list(SITES), upload(i))[0] for i, s in enumerate(SITES)}


def test_the_server_refuses_a_revoked_sites_upload_and_names_the_revocation(federation):
    terms = federation.terms("none")
    _, wires = _round(federation, terms)
    server = federation.server(terms)
    crl = _revoke(federation, "hospital-3")
    with pytest.raises(PipelineRefusal) as refused:
        server.accept(1, list(SITES), {s: {WIRE_PARAM: w} for s, w in wires.items()})
    (entry,) = crl.entries
    message = str(refused.value)
    assert f"site hospital-3: its certificate (serial {entry.serial:x}) was revoked at" in message
    assert "(cessationOfOperation)" in message and "its signatures are refused" in message
    assert "hospital-1" not in message  # the others still count


def test_an_aggregate_release_refuses_a_revoked_contributor(federation):
    terms = federation.terms("ckks")
    sites, wires = _round(federation, terms)
    releaser = sites["hospital-1"]
    own = releaser.own_upload(releaser.ledger.read(federation.root_ca), 1)["what"]["body_sha256"]
    kwargs = {"job": terms.job, "rnd": 1, "mode": "ckks", "releaser": "hospital-1", "own_digest": own,
              "min_contributors": 2}  # fmt: skip
    # before the revocation the same request is released
    aggregate, _ = release(list(wires.values()), releaser.peers(), releaser.context(), **kwargs)
    assert set(aggregate) == {"proto_sum", "proto_count"}
    _revoke(federation, "hospital-2", reason="compromised")
    with pytest.raises(ReleaseRefused, match=r"site hospital-2: its certificate \(serial [0-9a-f]+\) was revoked at "
                                              r".*\(keyCompromise\).*its signatures are refused"):  # fmt: skip
        release(list(wires.values()), releaser.peers(), releaser.context(), **kwargs)


def test_a_site_dropped_from_the_peers_is_an_unknown_signer(federation):
    terms = federation.terms("none")
    _, wires = _round(federation, terms)
    peers = dict(Party("server", federation.root).peers())
    del peers["hospital-4"]
    with pytest.raises(WireError, match="site hospital-4: unknown signer: no certificate for it among this party's "
                                        "peers"):  # fmt: skip
        open_wire(wires["hospital-4"], Peers(peers))
    assert open_wire(wires["hospital-1"], Peers(peers)).statement.site == "hospital-1"


def test_a_list_not_signed_by_the_root_ca_is_refused_not_ignored(federation, tmp_path):
    other_key, other_cert = pki.make_local_ca(
        None, common_name="medsilo local root CA"
    )  # same name, other key
    forged = revoke(other_key, other_cert, [], federation.root_ca.parent / CRL_FILE)
    assert len(forged) == 0
    with pytest.raises(
        RevocationError, match=r"crl\.pem: its signature does not verify with the root CA's key"
    ):
        load_crl(forged.path, _ca(federation)[1])
    # and a party with that file beside its root CA refuses to check signatures rather than trust everyone
    with pytest.raises(RevocationError):
        federation.server(federation.terms("none")).peers()
    stranger_key, stranger_cert = pki.make_local_ca(None, common_name="another project's CA")
    with pytest.raises(RevocationError, match="was issued by CN=another project's CA, not by this root CA"):
        revoke(
            *_ca(federation),
            [pki.issue_certificate(stranger_key, stranger_cert, "hospital-9", None)[1]],
            None,
        )


def test_revoke_keeps_earlier_entries_and_counts_up(federation):
    first = _revoke(federation, "hospital-1")
    ca_key, ca_cert = _ca(federation)
    later = revoke(ca_key, ca_cert, [pki.load_certificate(federation.root_ca.parent / "hospital-2.crt")], None,
                   previous=first)  # fmt: skip
    assert (len(later), later.number) == (2, first.number + 1)
    assert later.entries[0].time == first.entries[0].time or later.entries[1].time == first.entries[0].time


# ---- the auditor --------------------------------------------------------------------------------------------


@pytest.fixture
def revoked_ledger(tmp_path):
    """hospital-1's ledger: two entries, then its certificate is revoked, then one more entry it signed."""
    ca_key, ca_cert = pki.make_local_ca(tmp_path / "ca")
    key, cert = pki.issue_certificate(ca_key, ca_cert, "hospital-1", None)
    (tmp_path / "ws" / "hospital-1").mkdir(parents=True)
    ledger = Ledger(tmp_path / "ws" / "hospital-1" / "privacy_ledger.jsonl", "hospital-1", key, cert)
    for rnd in (1, 2):
        ledger.append("release", job="job-1", round=rnd, privacy=None, what={"kind": "weights", "bytes": 10})
    time.sleep(1.05 - time.time() % 1)  # a CRL holds whole seconds: revoke in the next second
    at = datetime.now(UTC)
    ledger.append("release", job="job-1", round=3, privacy=None, what={"kind": "weights", "bytes": 10})
    return tmp_path, ca_key, ca_cert, cert, at


def test_audit_verify_flags_entries_signed_after_the_revocation(revoked_ledger, capsys):
    root, ca_key, ca_cert, cert, at = revoked_ledger
    crl = revoke(ca_key, ca_cert, [cert], root / "ca" / CRL_FILE, reason="compromised", at=at)
    ledger = root / "ws" / "hospital-1" / "privacy_ledger.jsonl"
    # the list beside the root CA is found by itself
    assert main(["audit", "verify", str(root / "ws"), "--root-ca", str(root / "ca" / "rootCA.pem")]) == 1
    out = capsys.readouterr().out
    assert f"{ledger}:3: signed at " in out
    assert (
        f"after the signer's certificate (serial {crl.entries[0].serial:x}) was revoked at {at.replace(microsecond=0).isoformat()}"
        in out
    )
    assert "the earlier ones stay valid" in out and f"revocation list: {root / 'ca' / CRL_FILE}" in out


def test_entries_before_the_revocation_stay_valid(revoked_ledger, tmp_path, capsys):
    root, ca_key, ca_cert, cert, _ = revoked_ledger
    crl = tmp_path / "elsewhere.pem"
    revoke(ca_key, ca_cert, [cert], crl, at=datetime.now(UTC) + timedelta(seconds=5))
    args = [
        "audit",
        "verify",
        str(root / "ws"),
        "--root-ca",
        str(root / "ca" / "rootCA.pem"),
        "--crl",
        str(crl),
    ]
    assert main(args) == 0
    assert "OK, 3 entries (party hospital-1)" in capsys.readouterr().out


def test_a_revocation_list_needs_the_root_ca(revoked_ledger, capsys):
    root, ca_key, ca_cert, cert, at = revoked_ledger
    revoke(ca_key, ca_cert, [cert], root / CRL_FILE, at=at)
    assert main(["audit", "verify", str(root / "ws"), "--crl", str(root / CRL_FILE)]) == 2
    assert (
        "a revocation list is checked against the root CA that signed it; pass --root-ca too"
        in capsys.readouterr().err
    )


def test_the_report_refuses_a_ledger_signed_after_its_revocation(revoked_ledger, tmp_path, capsys):
    root, ca_key, ca_cert, cert, at = revoked_ledger
    revoke(ca_key, ca_cert, [cert], root / "ca" / CRL_FILE, at=at)
    out = tmp_path / "report.json"
    assert main(["audit", "report", str(root / "ws"), "--root-ca", str(root / "ca" / "rootCA.pem"),
                 "--out", str(out)]) == 1  # fmt: skip
    assert "was revoked at" in capsys.readouterr().err and not out.exists()


def test_a_sites_release_task_refuses_a_revoked_contributor(federation):
    # the server asks hospital-1's pipeline (the release task, not the library call) to release a round that
    # includes a site revoked since: refused and ledgered, nothing released
    terms = federation.terms("ckks")
    sites, wires = _round(federation, terms)
    _revoke(federation, "hospital-2", reason="compromised")
    with pytest.raises(ReleaseRefused, match=r"site hospital-2: its certificate .* was revoked at"):
        sites["hospital-1"].release(1, dict(wires))
    events = [e["event"] for e in entries(federation.ledger("hospital-1"))]
    assert "aggregate_release" not in events and events[-1] == "refusal"
