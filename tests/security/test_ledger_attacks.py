"""A site's own staff cut or swap its privacy ledger — to reset its spent ε or hide what left.

Each attack edits real ledgers written by real pipelines (sites upload, the server records what it received);
the auditor's ``medsilo audit verify`` and the site itself, at its next job, must notice.
"""

from __future__ import annotations

import json
import shutil

import pytest

from medsilo.cli import main
from medsilo.config.site import Budget, PrivacyPolicy
from medsilo.secure.dp import GaussianEvent
from medsilo.secure.ledger import LedgerError, entries, verify
from medsilo.secure.pipeline.base import PipelineRefusal
from medsilo.secure.upload import WIRE_PARAM

from .conftest import SITES, upload

DP = {"noise_multiplier": 2.0, "clip": 1.0, "delta": 1e-5}
EVENT = GaussianEvent(noise_multiplier=2.0)


def _job(federation, job: str, rounds: int = 2, mode: str = "dp") -> None:
    """``rounds`` rounds of a plaintext-aggregate job: every site uploads, the server accepts and records."""
    from medsilo.components.algorithms import fedproto
    from medsilo.config.job import DPSpec

    dp = DPSpec(**DP) if mode == "dp" else None
    terms = federation.terms(mode, job=job, releases=False, rounds=rounds, dp=dp)
    policy = PrivacyPolicy(budget=Budget(epsilon=12.0, delta=1e-5))
    server = federation.server(terms)
    sites = {s: federation.site(s, terms, policy) for s in SITES}
    anchors = server.anchors(SITES)
    for s in SITES:
        sites[s].start(anchors.get(s))
    algorithm = fedproto.Server(fedproto.Config(), 3, list(SITES))
    for rnd in range(1, rounds + 1):
        replies = {s: {WIRE_PARAM: sites[s].protect(rnd, list(SITES), upload(i), [EVENT] if dp else [])[0]}
                   for i, s in enumerate(SITES)}  # fmt: skip
        server.combine(rnd, list(SITES), replies, algorithm, None)


def _verify(capsys, federation) -> tuple[int, str]:
    code = main(["audit", "verify", str(federation.root / "ledgers"), "--root-ca", str(federation.root_ca)])
    return code, capsys.readouterr().out


def test_cutting_the_tail_off_a_site_ledger_is_caught_by_the_audit_and_by_the_site(federation, capsys):
    _job(federation, "job-1")
    _job(federation, "job-2")
    code, out = _verify(capsys, federation)
    assert code == 0 and "5 ledger(s), 0 with problems" in out
    ledger = federation.ledger("hospital-2")
    lines = ledger.read_bytes().splitlines(keepends=True)
    spent = entries(ledger)[-1]["privacy"]["cumulative_epsilon"]
    # the attack: drop job-2's entries (its policy_loaded and two releases); the rest still verifies alone,
    # and the ε it shows spent falls back to job-1's
    ledger.write_bytes(b"".join(lines[:-3]))
    assert verify([ledger], root_ca=federation.root_ca) == []
    assert entries(ledger)[-1]["privacy"]["cumulative_epsilon"] < spent - 1
    code, out = _verify(capsys, federation)
    assert code == 1
    assert f"{ledger}:4: ledger ends after 3 entries, but the server received this site's signed upload" in out
    assert "the ledger was cut short" in out and "1 with problems" in out
    # the auditor's report runs the same checks: it refuses, and with --allow-unverified marks the cut ledger
    report = federation.root / "report.json"
    args = ["audit", "report", str(federation.root / "ledgers"), "--root-ca", str(federation.root_ca), "--out", str(report)]
    assert main(args) == 1 and "the server received this site's signed upload" in capsys.readouterr().err
    assert main([*args, "--allow-unverified"]) == 0
    marked = {lg["party"]: lg for lg in json.loads(report.read_text())["ledgers"]}
    assert marked["hospital-2"]["verified"] is False and "cut short" in marked["hospital-2"]["problem"]
    assert marked["hospital-1"]["verified"] is True
    # the site, at its next job, is shown the server's record of it and refuses to run on the cut ledger
    terms = federation.terms("dp", job="job-3", releases=False)
    site = federation.site("hospital-2", terms, PrivacyPolicy(budget=Budget(epsilon=12.0, delta=1e-5)))
    anchor = federation.server(terms).anchors(SITES)["hospital-2"]
    with pytest.raises(PipelineRefusal, match=r"has 3 entries, but the server holds this site's signed upload .* cut "
                                               r"short or replaced"):  # fmt: skip
        site.start(anchor)
    after = entries(ledger)  # nothing ran on the reset budget: only the refusal, with its reason, was appended
    assert len(after) == 4 and after[-1]["event"] == "refusal" and "cut short" in after[-1]["reason"]


def test_rewriting_a_site_ledger_under_its_own_key_is_caught_by_the_anchor(federation, capsys):
    _job(federation, "job-1", rounds=1)
    ledger = federation.ledger("hospital-3")
    kept = entries(ledger)[:1]  # keep policy_loaded, then re-sign a different history with the site's own key
    ledger.unlink()
    site = federation.site("hospital-3", federation.terms("none", job="job-1", releases=False))
    site.ledger.append("policy_loaded", job="job-1", round=0, what=kept[0]["what"], privacy=None)
    site.ledger.append("refusal", job="job-1", round=1, what={"kind": "upload", "sent": False}, privacy=None,
                       reason="nothing was ever sent")  # fmt: skip
    code, out = _verify(capsys, federation)
    # the rewritten first entry has another time, so another hash than the head hospital-3 signed
    assert code == 1 and f"{ledger}:1: entry 1 is not the one this site's signed upload followed" in out


def test_a_ledger_copied_into_another_sites_folder_is_refused(federation, capsys):
    _job(federation, "job-1", rounds=1)
    theirs, ours = federation.ledger("hospital-2"), federation.ledger("hospital-1")
    shutil.copyfile(theirs, ours)  # hospital-1 borrows hospital-2's (less spent) ledger
    code, out = _verify(capsys, federation)
    assert code == 1 and f"{ours}:1: ledger of party 'hospital-2' in the place of 'hospital-1'" in out
    # an auditor handed the single file, wherever it lies, names the party it must be
    alone = federation.root / "handed-over.jsonl"
    shutil.copyfile(theirs, alone)
    assert main(["audit", "verify", str(alone), "--party", "hospital-1"]) == 1
    assert "ledger of party 'hospital-2' in the place of 'hospital-1'" in capsys.readouterr().out
    with pytest.raises(LedgerError, match="belongs to 'hospital-2', not 'hospital-1'"):
        federation.site("hospital-1", federation.terms("none", job="job-2", releases=False))


def test_a_server_cannot_frame_a_site_with_a_statement_it_never_signed(federation, capsys):
    _job(federation, "job-1", rounds=1)
    server = federation.ledger("server")
    from medsilo.secure.keys import Party

    record = next(e for e in entries(server) if e["event"] == "received")
    ledger = Party("server", federation.root).ledger()
    what = {**record["what"], "statement": {**record["what"]["statement"], "ledger_seq": 40}}
    ledger.append("received", job="job-1", round=1, what=what, privacy=None)
    code, out = _verify(capsys, federation)
    site = record["what"]["site"]
    assert code == 1 and "holds a statement this site's key did not sign" in out
    assert f"{federation.ledger(site)}:1:" in out


def test_a_ledger_line_nested_too_deeply_is_reported_by_line_not_a_traceback(federation, capsys):
    _job(federation, "job-1", rounds=1, mode="none")
    ledger = federation.ledger("hospital-4")
    with ledger.open("ab") as fh:
        fh.write(b"[" * 100_000 + b"]" * 100_000 + b"\n")
    code, out = _verify(capsys, federation)
    assert code == 1 and f"{ledger}:3: nested too deeply to be a ledger entry" in out


def test_an_emptied_or_deleted_site_ledger_is_caught_by_the_audit(federation, capsys):
    _job(federation, "job-1", rounds=1, mode="none")
    ledger = federation.ledger("hospital-2")
    ledger.write_bytes(b"")  # emptied: a 0-byte file verifies on its own
    code, out = _verify(capsys, federation)
    assert code == 1 and f"{ledger}:1: ledger is empty, but the server received this site's signed upload" in out
    ledger.unlink()  # deleted: the server's ledger says whose is missing
    code, out = _verify(capsys, federation)
    server = federation.ledger("server")
    assert code == 1 and f"{server}:" in out and "received uploads from hospital-2, whose ledger is not among" in out
    # the server's ledger on its own is checked on its own
    assert main(["audit", "verify", str(server), "--root-ca", str(federation.root_ca)]) == 0
