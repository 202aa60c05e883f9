"""Who could have signed a ledger: a site records its key custody in the signed ``policy_loaded`` entry, and the
auditor reads it from there (never from a file beside the ledger, which anyone could write)."""

from __future__ import annotations

from medsilo.cli import main
from medsilo.secure import pki
from medsilo.secure.audit import ledger_custody, summarize, verify_ledgers
from medsilo.secure.custody import Custody
from medsilo.secure.ledger import Ledger, entries

from .conftest import SITES


def test_a_simulated_site_records_central_custody_honestly(federation, capsys):
    for mode, ckks in (("none", {"source": "none", "from": None, "key_version": 0}),
                       ("ckks", {"source": "central", "from": None, "key_version": 1})):  # fmt: skip
        federation.site("hospital-1", federation.terms(mode, job=f"job-{mode}")).start(None)
        (joined,) = [e for e in entries(federation.ledger("hospital-1")) if e["job"] == f"job-{mode}"]
        custody = joined["what"]["custody"]
        assert (custody["provisioning"], custody["private_key"], custody["ckks"]) == (
            "central",
            "central",
            ckks,
        )
        assert "simulation" in joined["what"]["custody_note"]
    assert (
        main(["audit", "verify", str(federation.ledger("hospital-1")), "--root-ca", str(federation.root_ca)])
        == 0
    )
    out = capsys.readouterr().out
    assert (
        "OK, 2 entries (party hospital-1); key provisioned centrally: the coordinator could have signed"
        in out
    )


def test_a_job_that_released_nothing_has_no_release_entries(federation):
    site = federation.site("hospital-2", federation.terms("ckks"))
    site.start(None)
    (verdict,) = verify_ledgers([federation.ledger("hospital-2")], federation.root_ca)
    (ledger,) = summarize([verdict])["ledgers"]
    assert [e["event"] for e in verdict.check.entries] == ["policy_loaded"]
    assert ledger["overview"]["releases"] == {"plaintext": 0, "encrypted": 0}
    assert ledger["jobs"][0]["released"]["count"] == 0


def _ledger(tmp_path, ca, site: str, custodies: list[dict | None]) -> Ledger:
    (tmp_path / site).mkdir(parents=True, exist_ok=True)
    ledger = Ledger(tmp_path / site / "privacy_ledger.jsonl", site, *pki.issue_certificate(*ca, site, None))
    for i, custody in enumerate(custodies):
        ledger.append("policy_loaded", job=f"job-{i}", round=0, privacy=None,
                      what={"kind": "policy", "custody": custody, "custody_note": None})  # fmt: skip
    return ledger


def test_site_generated_custody_only_when_every_record_says_so(tmp_path):
    ca = pki.make_local_ca(None)
    sites = Custody("sites", "made-here", "wrapped", "hospital-1", 2).to_json()
    central = Custody("central", "central", "central", None, 1).to_json()
    cases = {SITES[0]: ([sites, sites], "site-generated", False), SITES[1]: ([central, sites], "central", True),
             SITES[2]: ([None], "central", True), SITES[3]: ([], "unknown", None)}  # fmt: skip
    for site, (records, word, could) in cases.items():
        found = ledger_custody(entries(_ledger(tmp_path, ca, site, records).path))
        assert (found["custody"], found["coordinator_could_sign"]) == (word, could), site
    assert "received wrapped from hospital-1 (key version 2)" in ledger_custody(
        entries(tmp_path / SITES[0] / "privacy_ledger.jsonl"))["detail"]  # fmt: skip
    assert "an earlier entry records central provisioning" in ledger_custody(
        entries(tmp_path / SITES[1] / "privacy_ledger.jsonl"))["detail"]  # fmt: skip
