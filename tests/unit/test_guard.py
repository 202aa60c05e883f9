"""The site's privacy guard: budget admission from the ledger, release entries, the policy in force."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from medsilo.config import JobSpec
from medsilo.config.site import Budget, PrivacyPolicy
from medsilo.secure.dp import BudgetExceeded, gaussian_epsilon
from medsilo.secure.guard import LEDGER_DIR_ENV, SiteGuard, commit_encrypted_upload, ensure_simulation_pki
from medsilo.secure.ledger import LEDGER_FILE, entries, verify

SITE = "hospital-1"
UPLOAD = {"proto_sum": np.ones((2, 4), np.float32), "proto_count": np.array([3.0, 5.0], np.float32)}


@pytest.fixture
def ledgers(tmp_path, monkeypatch):
    ensure_simulation_pki(tmp_path, [SITE])
    monkeypatch.setenv(LEDGER_DIR_ENV, str(tmp_path))
    return tmp_path


def _spec(mode: str, rounds: int = 2) -> JobSpec:
    dp = {"dp": {"noise_multiplier": 2.0, "clip": 1.0}} if "dp" in mode else {}
    return JobSpec(name="t", modality="cxr", classes=["a", "b"], dataset="cxr", image_size=16, model="cnn",
                   algorithm={"name": "fedproto"}, training={"rounds": rounds}, privacy={"mode": mode, **dp})  # fmt: skip


def _policy(epsilon: float, scope: str = "network") -> PrivacyPolicy:
    return PrivacyPolicy(budget=Budget(epsilon=epsilon, delta=1e-5, scope=scope))


def test_dp_releases_are_charged_and_the_next_job_that_does_not_fit_is_refused(ledgers):
    guard = SiteGuard(SITE, ".", "job-1", _spec("dp"), _policy(4.0))
    guard.record_policy(_policy(4.0))
    guard.admit_job()
    spent = [guard.record_upload(rnd, UPLOAD) for rnd in (1, 2)]
    # the site reports the job's ε so far, as dp_accounting composes σ = 2 over 1 and 2 rounds
    assert [s["epsilon"] for s in spent] == [pytest.approx(gaussian_epsilon(2.0, n, 1e-5)) for n in (1, 2)]
    ledger = ledgers / SITE / LEDGER_FILE
    policy, *releases = entries(ledger)
    assert policy["event"] == "policy_loaded" and policy["what"]["policy"]["budget"]["epsilon"] == 4.0
    assert [r["privacy"]["cumulative_epsilon"] for r in releases] == [s["epsilon"] for s in spent]
    # a new process (another job) re-derives the total from the ledger: 4 rounds of σ = 2 exceed ε = 4
    later = SiteGuard(SITE, ".", "job-2", _spec("dp"), _policy(4.0))
    with pytest.raises(BudgetExceeded, match="ε"):
        later.admit_job()
    refusal = entries(ledger)[-1]
    assert refusal["event"] == "refusal" and refusal["job"] == "job-2" and refusal["what"]["sent"] is False
    # the same job under another budget scope starts from zero
    SiteGuard(SITE, ".", "job-3", _spec("dp"), _policy(4.0, scope="study-b")).admit_job()
    assert verify([ledger], root_ca=ledgers / "pki" / "rootCA.pem") == []


def test_a_round_is_refused_when_another_job_spent_the_budget_meanwhile(ledgers):
    # cap ε = 4.5: σ = 2 costs ε ≈ 3.19, 4.01, 4.73 after 2, 3, 4 rounds
    first, second = (SiteGuard(SITE, ".", f"job-{i}", _spec("dp"), _policy(4.5)) for i in (1, 2))
    first.admit_job()
    second.admit_job()  # both fit alone
    first.record_upload(1, UPLOAD)
    first.record_upload(2, UPLOAD)
    second.dp_round(1)  # a third round in all still fits
    second.record_upload(1, UPLOAD)
    with pytest.raises(BudgetExceeded):
        second.dp_round(2)
    assert entries(ledgers / SITE / LEDGER_FILE)[-1]["event"] == "refusal"


def test_encrypted_uploads_are_written_with_the_digest_of_the_bytes_that_leave(ledgers):
    guard = SiteGuard(SITE, ".", "job-1", _spec("ckks+dp"), PrivacyPolicy())
    spent = guard.record_upload(1, UPLOAD)
    ledger = ledgers / SITE / LEDGER_FILE
    assert not ledger.exists() or entries(ledger) == []  # held until the encrypt filter sends
    sent = b"signed ciphertext bytes"
    commit_encrypted_upload(SITE, "job-1", 1, sent, ciphertexts=1)
    (entry,) = entries(ledger)
    assert entry["what"]["sha256"] == hashlib.sha256(sent).hexdigest() and entry["what"]["bytes"] == len(sent)
    assert entry["what"]["plaintext_bytes"] == 40 and entry["what"]["encrypted"] is True
    assert entry["privacy"]["job_epsilon"] == spent["epsilon"]
    with pytest.raises(Exception, match="no privacy-ledger entry was prepared"):
        commit_encrypted_upload(SITE, "job-1", 1, sent, ciphertexts=1)  # once only


def test_plaintext_jobs_record_uploads_without_privacy_cost(ledgers):
    guard = SiteGuard(SITE, ".", "job-1", _spec("none"), _policy(1.0))
    guard.admit_job()  # no DP: nothing to charge, nothing refused
    assert guard.record_upload(1, UPLOAD) is None
    (entry,) = entries(ledgers / SITE / LEDGER_FILE)
    assert entry["privacy"] is None and entry["what"]["encrypted"] is False
    assert [t["name"] for t in entry["what"]["tensors"]] == ["proto_count", "proto_sum"]
