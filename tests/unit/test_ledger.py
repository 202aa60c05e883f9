"""The privacy ledger: durable signed chain; edits, deletions, swaps, foreign signers and torn tails found by line."""

from __future__ import annotations

import base64
import hashlib
import json
import multiprocessing
import os
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from medsilo.secure import ledger as L, pki
from medsilo.secure.ledger import GENESIS, Ledger, LedgerError, canonical, encode_line


@pytest.fixture(scope="module")
def ca():
    return pki.make_local_ca(None)


@pytest.fixture(scope="module")
def site1(ca):
    return pki.issue_certificate(*ca, "hospital-1", None)


@pytest.fixture(scope="module")
def site2(ca):
    return pki.issue_certificate(*ca, "hospital-2", None)


def _release(rnd: int, scope: str = "site", eps: float = 0.5, encrypted: bool = True) -> dict:
    return dict(
        job="job-1",
        round=rnd,
        what={"kind": "weights", "tensors": ["fc.weight"], "shapes": [[3, 4]], "dtype": "float32",
              "bytes": 48, "sha256": hashlib.sha256(b"%d" % rnd).hexdigest(), "encrypted": encrypted},
        privacy={"mechanism": "gaussian", "epsilon": eps, "delta": 1e-6, "scope": scope, "epsilon_cap": 8.0},
    )  # fmt: skip


def _write(path: Path, key, cert, releases: int = 4) -> Ledger:
    """policy_loaded, ``releases`` releases, one refusal: ``releases + 2`` lines."""
    ledger = Ledger(path, "hospital-1", key, cert)
    ledger.append("policy_loaded", job=None, round=None, what={"kind": "site_policy"}, privacy=None)
    for rnd in range(releases):
        ledger.append("release", **_release(rnd))
    ledger.append("refusal", **_release(releases), reason="budget cap 8.0 would be exceeded")
    return ledger


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines()


def _store(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(line + b"\n" for line in lines))


def _resign(entry: dict, key) -> bytes:
    """A well-formed line for ``entry`` (its ``sig`` replaced by ``key``'s signature)."""
    body = {k: v for k, v in entry.items() if k != "sig"}
    return encode_line(body, base64.b64encode(pki.sign(key, canonical(body))).decode())


def _only_problem(path: Path, root_ca=None) -> L.Problem:
    problems = L.verify(path, root_ca)
    assert len(problems) == 1, problems
    return problems[0]


def test_round_trip_is_chained_signed_and_fsynced(tmp_path, monkeypatch, ca, site1):
    synced = []  # (inode, size) of every regular file fsync'd
    real_fsync = os.fsync

    def fsync(fd):
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode):
            synced.append((st.st_ino, st.st_size))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    path = tmp_path / "privacy_ledger.jsonl"
    ledger = Ledger(path, "hospital-1", *site1)
    first = ledger.append("policy_loaded", job=None, round=None, what={"kind": "site_policy"}, privacy=None)
    size_1 = path.stat().st_size
    second = ledger.append("release", **_release(0))
    inode = path.stat().st_ino
    assert synced == [(inode, size_1), (inode, path.stat().st_size)]  # each append fsync'd after its write
    raw = path.read_bytes()
    assert raw.endswith(b"\n") and raw.count(b"\n") == 2
    lines = _lines(path)
    assert L.entries(path) == [first, second]
    assert [first["seq"], second["seq"]] == [0, 1]
    assert first["prev"] == GENESIS and second["prev"] == hashlib.sha256(lines[0]).hexdigest()
    assert first["certificate"].startswith("-----BEGIN CERTIFICATE-----") and "certificate" not in second
    assert first["signer"] == "cert-sha256:" + pki.certificate_fingerprint(site1[1])
    # the signature covers the line minus its "sig" field, recoverable with text tools
    signed = lines[1].replace(b',"sig":"' + second["sig"].encode() + b'"}', b"}")
    assert signed == canonical({k: v for k, v in second.items() if k != "sig"})
    assert pki.verify_signature(site1[1].public_key(), base64.b64decode(second["sig"]), signed)
    assert L.verify(path) == [] and L.verify(path, root_ca=ca[1]) == []
    # a restarted writer continues the chain
    third = Ledger(path, "hospital-1", *site1).append(
        "decrypt", job="job-1", round=0, what={"kind": "aggregate"}, privacy=None
    )
    assert third["seq"] == 2 and third["prev"] == hashlib.sha256(lines[1]).hexdigest()
    assert L.verify(path, root_ca=ca[1]) == []


def test_rsa_keys_as_in_nvflare_kits(tmp_path, ca):
    key, cert = pki.issue_certificate(*ca, "server", None, key_type="rsa")
    path = tmp_path / "server.ledger.jsonl"
    ledger = Ledger(path, "server", key, cert)
    ledger.append(
        "aggregate_release",
        job="job-1",
        round=2,
        what={"kind": "prototypes", "contributors": 3},
        privacy=None,
    )
    ledger.append(
        "aggregate_release",
        job="job-1",
        round=3,
        what={"kind": "prototypes", "contributors": 3},
        privacy=None,
    )
    assert L.verify(path, root_ca=ca[1]) == []
    lines = _lines(path)
    _store(path, [lines[0], lines[1].replace(b'"round":3', b'"round":4')])
    assert _only_problem(path).line == 2


EDITS = {
    "what": (lambda e: e["what"].update(bytes=4), "signature does not verify"),
    "privacy": (lambda e: e["privacy"].update(epsilon=0.01), "signature does not verify"),
    "time": (lambda e: e.update(time="2020-01-01T00:00:00.000+00:00"), "signature does not verify"),
    "round": (lambda e: e.update(round=7), "signature does not verify"),
    "job": (lambda e: e.update(job="job-2"), "signature does not verify"),
    "event": (lambda e: e.update(event="decrypt"), "signature does not verify"),
    "code_version": (lambda e: e.update(code_version="9.9"), "signature does not verify"),
    "sig": (lambda e: e.update(sig=base64.b64encode(b"\0" * 64).decode()), "signature does not verify"),
    "seq": (lambda e: e.update(seq=9), "seq 9 where 2 was expected"),
    "prev": (lambda e: e.update(prev="ab" * 32), "prev does not match the hash of line 2"),
    "party": (lambda e: e.update(party="hospital-2"), "party 'hospital-2' in the ledger of 'hospital-1'"),
    "signer": (lambda e: e.update(signer="cert-sha256:" + "cd" * 32), "unknown signer"),
}


@pytest.mark.parametrize("field", sorted(EDITS))
def test_edited_field_is_reported_at_its_line(tmp_path, site1, field):
    path = tmp_path / "privacy_ledger.jsonl"
    _write(path, *site1)
    lines = _lines(path)
    entry = json.loads(lines[2])
    edit, reason = EDITS[field]
    edit(entry)
    lines[2] = encode_line(
        {k: v for k, v in entry.items() if k != "sig"}, entry["sig"]
    )  # re-encoded canonically
    _store(path, lines)
    problem = _only_problem(path)
    assert (problem.file, problem.line) == (path, 3)
    assert reason in problem.reason
    assert str(problem).startswith(f"{path}:3: ")


def test_non_canonical_rewrite_and_bad_json(tmp_path, site1):
    path = tmp_path / "privacy_ledger.jsonl"
    _write(path, *site1)
    lines = _lines(path)
    _store(path, lines[:3] + [lines[3].replace(b'"round":', b'"round": ')] + lines[4:])
    assert "not in canonical form" in _only_problem(path).reason and _only_problem(path).line == 4
    _store(path, lines[:1] + [b'{"seq": 1,'] + lines[2:])
    problem = _only_problem(path)
    assert problem.line == 2 and "not valid JSON" in problem.reason


def test_deleted_line(tmp_path, site1):
    path = tmp_path / "privacy_ledger.jsonl"
    _write(path, *site1)
    lines = _lines(path)
    _store(path, lines[:2] + lines[3:])
    problem = _only_problem(path)
    assert problem.line == 3 and "seq 3 where 2 was expected" in problem.reason


def test_swapped_lines(tmp_path, site1):
    path = tmp_path / "privacy_ledger.jsonl"
    _write(path, *site1)
    lines = _lines(path)
    lines[3], lines[4] = lines[4], lines[3]
    _store(path, lines)
    problem = _only_problem(path)
    assert problem.line == 4 and "seq 4 where 3 was expected" in problem.reason


@pytest.mark.parametrize(
    "variant, reason",
    [
        ("with_certificate", "certificate is for CN='hospital-2', not party 'hospital-1'"),
        ("without_certificate", "unknown signer"),
        ("as_other_party", "party 'hospital-2' in the ledger of 'hospital-1'"),
    ],
)
def test_inserted_line_signed_by_another_site(tmp_path, site1, site2, variant, reason):
    path = tmp_path / "privacy_ledger.jsonl"
    _write(path, *site1)
    lines = _lines(path)
    key2, cert2 = site2
    forged = {
        "code_version": "0.1.0", "event": "release", "job": "job-1", "party": "hospital-1",
        "prev": hashlib.sha256(lines[1]).hexdigest(), "privacy": None, "reason": None, "round": 0, "seq": 2,
        "signer": "cert-sha256:" + pki.certificate_fingerprint(cert2), "time": datetime.now(UTC).isoformat(),
        "what": {"kind": "weights", "bytes": 1, "encrypted": False},
    }  # fmt: skip
    if variant == "with_certificate":
        forged["certificate"] = pki.certificate_pem(cert2)
    if variant == "as_other_party":
        forged["party"] = "hospital-2"
    _store(path, lines[:2] + [_resign(forged, key2)] + lines[2:])
    problem = _only_problem(path)
    assert problem.line == 3 and reason in problem.reason


def test_torn_last_line_is_detected_append_refused_and_repaired(tmp_path, site1):
    path = tmp_path / "privacy_ledger.jsonl"
    _write(path, *site1, releases=2)  # 4 lines
    whole = path.read_bytes()
    with open(path, "ab") as f:  # a crash half-way through writing line 5
        f.write(_lines(path)[1][:40])
    problem = _only_problem(path)
    assert problem.line == 5 and "torn last line" in problem.reason
    with pytest.raises(LedgerError, match=rf"{path}:5: the last line is torn .*repair"):
        Ledger(path, "hospital-1", *site1)
    assert path.read_bytes().startswith(whole)  # nothing truncated silently
    moved = L.repair(path)
    assert moved.name.startswith("privacy_ledger.jsonl.torn-") and moved.read_bytes() == _lines(moved)[0]
    assert path.read_bytes() == whole and L.verify(path) == []
    Ledger(path, "hospital-1", *site1).append("release", **_release(5))
    assert L.verify(path) == [] and len(L.entries(path)) == 5
    with pytest.raises(LedgerError, match="intact entry; nothing to repair"):
        L.repair(path)


def test_unreadable_last_line_refuses_append(tmp_path, site1):
    path = tmp_path / "privacy_ledger.jsonl"
    _write(path, *site1, releases=1)
    with open(path, "ab") as f:
        f.write(b"\0\0\0garbage\n")
    with pytest.raises(LedgerError, match=rf"{path}:4: the last line is unreadable"):
        Ledger(path, "hospital-1", *site1)
    L.repair(path)
    assert L.verify(path) == []


def test_root_ca_rejects_certificate_from_another_ca(tmp_path, ca):
    other_ca = pki.make_local_ca(None, common_name="rogue CA")
    key, cert = pki.issue_certificate(*other_ca, "hospital-1", None)
    path = tmp_path / "privacy_ledger.jsonl"
    _write(path, key, cert, releases=1)
    assert L.verify(path) == []  # consistent on its own (trusted on first use) ...
    problem = _only_problem(path, root_ca=ca[1])  # ... but not issued by the provisioned root CA
    assert problem.line == 1 and "not by the root CA" in problem.reason
    with pytest.raises(pki.PKIError, match="not by the root CA"):
        pki.verify_certificate(cert, ca[1])


def test_root_ca_checks_validity_at_entry_time(tmp_path, ca, site1):
    path = tmp_path / "privacy_ledger.jsonl"
    _write(path, *site1, releases=1)
    lines = _lines(path)
    entry = json.loads(lines[1])
    entry["time"] = (datetime.now(UTC) + timedelta(days=400)).isoformat()  # after the certificate expired
    _store(path, [lines[0], _resign(entry, site1[0])] + lines[2:3])
    assert _only_problem(path, root_ca=ca[1]).line == 2
    assert "is not valid at" in _only_problem(path, root_ca=ca[1]).reason


def test_bare_public_key_and_key_rotation(tmp_path, ca, site1):
    path = tmp_path / "privacy_ledger.jsonl"
    key = site1[0]
    Ledger(path, "hospital-1", key, key.public_key()).append("release", **_release(0))
    assert L.verify(path) == []
    assert "bare public key" in _only_problem(path, root_ca=ca[1]).reason
    rotated = tmp_path / "rotated.jsonl"
    _write(rotated, *site1, releases=1)
    new_key, new_cert = pki.issue_certificate(*ca, "hospital-1", None)
    entry = Ledger(rotated, "hospital-1", new_key, new_cert).append("release", **_release(1))
    assert "certificate" in entry  # the new signer is introduced in the ledger itself
    assert L.verify(rotated, root_ca=ca[1]) == []
    problem = _only_problem(rotated)
    assert problem.line == 4 and "new signer" in problem.reason


def test_cumulative_per_scope_from_a_verified_ledger(tmp_path, site1):
    path = tmp_path / "privacy_ledger.jsonl"
    ledger = _write(path, *site1, releases=3)  # 3 × 0.5 in "site"; the refusal does not count
    ledger.append("synthetic_release", **_release(0, scope="pcevolve", eps=2.0))
    assert L.cumulative(path, "site") == (pytest.approx(1.5), pytest.approx(3e-6))
    assert L.cumulative(path, "pcevolve") == (pytest.approx(2.0), pytest.approx(1e-6))
    assert L.cumulative(path, "other") == (0.0, 0.0)
    assert [p["epsilon"] for p in L.costs(path, "site")] == [0.5, 0.5, 0.5]
    lines = _lines(path)
    _store(path, lines[:1] + lines[2:])
    with pytest.raises(LedgerError, match=rf"{path}:2: seq 2 where 1 .*refusing to use"):
        L.cumulative(path, "site")
    with pytest.raises(LedgerError, match="ledger file not found"):
        L.cumulative(tmp_path / "missing.jsonl", "site")


def _append_many(path: str, key, cert, count: int) -> None:
    ledger = Ledger(path, "hospital-1", key, cert)
    for i in range(count):
        ledger.append("release", **_release(i))


def test_concurrent_appends_from_two_processes_stay_one_chain(tmp_path, site1):
    path = tmp_path / "privacy_ledger.jsonl"
    Ledger(path, "hospital-1", *site1)
    ctx = multiprocessing.get_context("fork")
    workers = [ctx.Process(target=_append_many, args=(str(path), *site1, 25)) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=60)
    assert [w.exitcode for w in workers] == [0, 0]
    assert L.verify(path) == []
    assert [e["seq"] for e in L.entries(path)] == list(range(50))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"event": "relase"}, "did you mean 'release'"),
        ({"event": "refusal"}, "a refusal needs a reason"),
        ({"what": {"x": float("nan")}}, r"what\.x: nan is not allowed"),
        ({"what": {"values": list(range(100))}}, "looks like data values"),
        ({"what": {"n": np.int64(3)}}, r"what\.n: int64 is not JSON-plain"),
        ({"privacy": {"epsilon": 1.0}}, r"privacy\.scope: the budget scope's name is required"),
        ({"privacy": {"scope": "site", "epsilon": -1}}, r"privacy\.epsilon: must be a number ≥ 0"),
        ({"round": -1}, "round must be an integer ≥ 0"),
    ],
)
def test_bad_append_arguments_are_refused(tmp_path, site1, kwargs, match):
    path = tmp_path / "privacy_ledger.jsonl"
    ledger = Ledger(path, "hospital-1", *site1)
    args = {"event": "release", **_release(0), **kwargs}
    with pytest.raises(LedgerError, match=match):
        ledger.append(args.pop("event"), **args)
    assert path.read_bytes() == b""  # nothing written


def test_bad_signer_setup(tmp_path, site1, site2):
    path = tmp_path / "privacy_ledger.jsonl"
    with pytest.raises(LedgerError, match="CN='hospital-1' does not match party 'hospital-2'"):
        Ledger(path, "hospital-2", *site1)
    with pytest.raises(LedgerError, match="private key does not match"):
        Ledger(path, "hospital-1", site2[0], site1[1])
    with pytest.raises(LedgerError, match="does not exist"):
        Ledger(tmp_path / "nope" / "l.jsonl", "hospital-1", *site1)
    _write(path, *site1, releases=0)
    with pytest.raises(LedgerError, match="belongs to 'hospital-1', not 'hospital-2'"):
        Ledger(path, "hospital-2", *site2)


def test_pki_errors_name_the_file(tmp_path):
    with pytest.raises(pki.PKIError, match=f"{tmp_path / 'x.pem'}: certificate file not found"):
        pki.load_certificate(tmp_path / "x.pem")
    (tmp_path / "bad.pem").write_text("hello")
    with pytest.raises(pki.PKIError, match=f"{tmp_path / 'bad.pem'}: not a PEM X.509 certificate"):
        pki.load_certificate(tmp_path / "bad.pem")
    with pytest.raises(pki.PKIError, match="key_type: must be one of ed25519, rsa"):
        pki.make_local_ca(None, key_type="dsa")
