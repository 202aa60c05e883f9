"""``medsilo audit verify|report``: exit codes, FILE:LINE messages, report contents, unverified ledgers refused."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from medsilo.cli import main
from medsilo.secure import pki
from medsilo.secure.ledger import Ledger, entries


@pytest.fixture(scope="module")
def ca():
    return pki.make_local_ca(None)


@pytest.fixture
def workspace(tmp_path, ca):
    """Two site workspaces with a ledger each, an NVFlare audit.log at hospital-1, and an unrelated .jsonl."""
    for site, releases in (("hospital-1", 3), ("hospital-2", 1)):
        folder = tmp_path / "ws" / site
        folder.mkdir(parents=True)
        ledger = Ledger(folder / "privacy_ledger.jsonl", site, *pki.issue_certificate(*ca, site, None))
        privacy = {
            "mechanism": "gaussian",
            "epsilon": 1.0,
            "delta": 1e-6,
            "scope": "site",
            "epsilon_cap": 4.0,
        }
        ledger.append("policy_loaded", job=None, round=None, what={"kind": "site_policy"},
                      privacy={"scope": "site", "epsilon_cap": 4.0})  # fmt: skip
        for rnd in range(releases):
            ledger.append("release", job="job-1", round=rnd, privacy=privacy,
                          what={"kind": "weights", "bytes": 1000, "encrypted": rnd % 2 == 0, "sha256": "ab" * 32})  # fmt: skip
        ledger.append("release", job="job-10", round=0, privacy=None,
                      what={"kind": "prototypes", "bytes": 5000, "encrypted": True})  # fmt: skip
        ledger.append("aggregate_release", job="job-1", round=releases, privacy=None,
                      what={"kind": "prototypes", "bytes": 64, "encrypted": False, "contributors": 3})  # fmt: skip
        ledger.append("refusal", job="job-1", round=releases + 1, privacy=privacy, what={"kind": "weights"},
                      reason="ε budget: 4.0 of 4.0 spent")  # fmt: skip
    (tmp_path / "ws" / "hospital-1" / "audit.log").write_text(
        "[E:a1][T:2025-01-01 10:00:00][U:admin@coord.org][A:train.deploy job-1]\n"
        "[E:a2][T:2025-01-01 10:00:01][J:job-10][A:train#t1]received task from server\n"
        "[E:a3][T:2025-01-01 10:00:02][J:job-1][A:train#t2]submit result OK\n"
    )
    (tmp_path / "ws" / "hospital-1" / "metrics.jsonl").write_text("{}\n")  # not a ledger: not picked up
    return tmp_path / "ws"


def _tamper(path: Path, line: int, old: bytes, new: bytes) -> None:
    lines = path.read_bytes().split(b"\n")
    assert old in lines[line - 1]
    lines[line - 1] = lines[line - 1].replace(old, new)
    path.write_bytes(b"\n".join(lines))


def _ca_file(tmp_path: Path, cert) -> Path:
    path = tmp_path / "rootCA.pem"
    path.write_text(pki.certificate_pem(cert))
    return path


def test_verify_ok_exits_0(workspace, tmp_path, ca, capsys):
    assert main(["audit", "verify", str(workspace), "--root-ca", str(_ca_file(tmp_path, ca[1]))]) == 0
    out = capsys.readouterr().out
    assert f"{workspace / 'hospital-1' / 'privacy_ledger.jsonl'}: OK, 7 entries (party hospital-1)" in out
    assert f"{workspace / 'hospital-2' / 'privacy_ledger.jsonl'}: OK, 5 entries (party hospital-2)" in out
    assert "2 ledger(s), 0 with problems" in out and "metrics.jsonl" not in out


def test_verify_reports_file_and_line_and_exits_1(workspace, capsys):
    bad = workspace / "hospital-2" / "privacy_ledger.jsonl"
    _tamper(bad, 3, b'"bytes":5000', b'"bytes":50')
    assert main(["audit", "verify", str(workspace)]) == 1
    out = capsys.readouterr().out
    assert f"{bad}:3: signature does not verify" in out
    assert "hospital-1/privacy_ledger.jsonl: OK" in out and "2 ledger(s), 1 with problems" in out
    assert "not checked against a root CA" in out


def test_verify_with_foreign_root_ca_exits_1(workspace, tmp_path, capsys):
    rogue = pki.make_local_ca(None, common_name="rogue CA")[1]
    ledger = workspace / "hospital-1" / "privacy_ledger.jsonl"
    assert main(["audit", "verify", str(ledger), "--root-ca", str(_ca_file(tmp_path, rogue))]) == 1
    assert f"{ledger}:1: signer certificate rejected" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["verify", "{tmp}/missing.jsonl"], "missing.jsonl: no such ledger file or folder"),
        (["verify", "{tmp}/empty"], r"empty: no ledgers \(\*ledger\*.jsonl\)"),
        (["verify", "{ws}", "--root-ca", "{tmp}/nope.pem"], "nope.pem: certificate file not found"),
        (["report", "{ws}", "--out", "{tmp}/r.txt"], "must end in .html or .json"),
    ],
)
def test_bad_input_exits_2(workspace, tmp_path, capsys, args, message):
    (tmp_path / "empty").mkdir()
    argv = ["audit"] + [a.format(tmp=tmp_path, ws=workspace) for a in args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("medsilo: error: ")
    assert re.search(message, err)


def test_report_json(workspace, tmp_path):
    out = tmp_path / "audit.json"
    assert main(["audit", "report", str(workspace), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["verified"] is True
    site = {lg["party"]: lg for lg in report["ledgers"]}["hospital-1"]
    assert site["verified"] and site["entries"] == 7
    budget = site["budgets"]["site"]
    assert (
        budget["epsilon"] == pytest.approx(3.0) and budget["epsilon_cap"] == 4.0
    )  # the refusal is not spent
    assert [p["cumulative_epsilon"] for p in budget["series"]] == pytest.approx([1.0, 2.0, 3.0])
    jobs = {j["job"]: j for j in site["jobs"]}
    job = jobs["job-1"]
    assert job["events"] == {"release": 3, "aggregate_release": 1, "refusal": 1}
    assert job["released"]["count"] == 4 and job["released"]["bytes"] == 3064
    assert job["released"]["encrypted_bytes"] == 2000 and job["released"]["plaintext_bytes"] == 1064
    assert job["released"]["kinds"]["weights"] == {"count": 3, "bytes": 3000, "encrypted": 2}
    assert job["refusals"][0]["reason"] == "ε budget: 4.0 of 4.0 spent" and job["refusals"][0]["round"] == 4
    assert job["aggregate_releases"][0]["what"]["contributors"] == 3
    assert job["nvflare_audit"]["lines"] == 2  # job-1 lines only, not job-10's
    assert all("job-10" not in line for line in job["nvflare_audit"]["sample"])
    assert jobs["job-10"]["nvflare_audit"]["lines"] == 1
    assert jobs[None]["events"] == {"policy_loaded": 1}


def test_report_html(workspace, tmp_path, capsys):
    out = tmp_path / "r" / "audit.html"
    assert main(["audit", "report", str(workspace), "--out", str(out)]) == 0
    page = out.read_text()
    assert page.startswith("<!doctype html>") and "UNVERIFIED" not in page
    assert "<h2>hospital-1 <small>(verified, 7 entries)</small></h2>" in page
    assert page.count('src="data:image/png;base64,') == 2  # one budget plot per party
    assert "ε budget: 4.0 of 4.0 spent" in page and "submit result OK" in page
    assert f"wrote {out}" in capsys.readouterr().out


def test_report_opens_with_one_row_per_party(workspace, tmp_path):
    out = tmp_path / "audit.json"
    assert main(["audit", "report", str(workspace), "--out", str(out)]) == 0
    rows = {lg["party"]: lg["overview"] for lg in json.loads(out.read_text())["ledgers"]}
    one = rows["hospital-1"]
    # 3 weights releases (rounds 0 and 2 encrypted), job-10's encrypted prototypes, the plaintext aggregate
    assert one["releases"] == {"plaintext": 2, "encrypted": 3}
    assert (one["verified"], one["custody"], one["entries"], one["jobs"], one["refusals"]) == (
        True,
        "unknown",
        7,
        2,
        1,
    )
    assert one["epsilon"] == {"site": {"spent": pytest.approx(3.0), "cap": 4.0}}
    assert rows["hospital-2"]["releases"] == {"plaintext": 1, "encrypted": 2}
    assert rows["hospital-2"]["epsilon"]["site"]["spent"] == pytest.approx(1.0)
    assert one["last_time"] == entries(workspace / "hospital-1" / "privacy_ledger.jsonl")[-1]["time"]


def test_report_html_overview_comes_first_and_marks_problems(workspace, tmp_path):
    out = tmp_path / "audit.html"
    bad = workspace / "hospital-2" / "privacy_ledger.jsonl"
    _tamper(bad, 3, b'"bytes":5000', b'"bytes":50')
    assert main(["audit", "report", str(workspace), "--out", str(out), "--allow-unverified"]) == 0
    page = out.read_text()
    overview = page.index('<table class="overview">')
    assert page.index("<h2>Overview</h2>") < overview < page.index("<h2>hospital-1 ")
    table = page[overview : page.index("</table>", overview)]
    rows = re.findall(r"<tr>(.*?)</tr>", table)
    assert len(rows) == 3 and "<th>key custody</th>" in rows[0] and "<th>ε spent / cap</th>" in rows[0]
    assert '<td class="good">yes</td>' in rows[1] and '<td class="warn">not recorded</td>' in rows[1]
    assert "<td>3 / 4</td>" in rows[1]
    assert "<td>hospital-2</td>" in rows[2] and '<td class="bad">NO</td>' in rows[2]
    assert "<strong>Key custody:</strong> not recorded" in page


def test_report_refuses_unverified_unless_allowed(workspace, tmp_path, capsys):
    bad = workspace / "hospital-1" / "privacy_ledger.jsonl"
    lines = bad.read_bytes().split(b"\n")
    bad.write_bytes(b"\n".join(lines[:2] + lines[3:]))  # a release deleted
    out = tmp_path / "audit.html"
    assert main(["audit", "report", str(workspace), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"{bad}:3: seq 3 where 2 was expected" in err and "refusing to report" in err
    assert not out.exists()
    assert main(["audit", "report", str(workspace), "--out", str(out), "--allow-unverified"]) == 0
    page = out.read_text()
    assert '<div class="alarm"><strong>UNVERIFIED' in page and f"{bad}:3: seq 3" in page
    assert "(UNVERIFIED, 6 entries)" in page
    assert "UNVERIFIED" in capsys.readouterr().out


def test_kit_files_from_the_local_ca(tmp_path, capsys):
    """The simulation PKI writes kit-like files; a ledger opened from those paths verifies against rootCA.pem."""
    kit = tmp_path / "pki"
    pki.make_local_ca(kit)
    ca_key = kit / pki.ROOT_CA_KEY
    ca_key_obj, ca_cert = _load_ca(ca_key, kit / pki.ROOT_CA_CERT)
    pki.issue_certificate(ca_key_obj, ca_cert, "server", kit, key_type="rsa")
    assert oct((kit / "server.key").stat().st_mode & 0o777) == "0o600"
    ledger = Ledger(tmp_path / "privacy_ledger.jsonl", "server", kit / "server.key", kit / "server.crt")
    ledger.append("aggregate_release", job="job-1", round=0, what={"kind": "prototypes"}, privacy=None)
    assert main(["audit", "verify", str(ledger.path), "--root-ca", str(kit / "rootCA.pem")]) == 0
    assert "OK, 1 entries (party server)" in capsys.readouterr().out


def _load_ca(key_path: Path, cert_path: Path):
    return pki.load_private_key(key_path), pki.load_certificate(cert_path)


def test_report_recomposes_gaussian_events_and_flags_an_under_reported_total(tmp_path, ca):
    from medsilo.secure.dp import gaussian_epsilon

    folder = tmp_path / "ws" / "hospital-1"
    folder.mkdir(parents=True)
    ledger = Ledger(
        folder / "privacy_ledger.jsonl", "hospital-1", *pki.issue_certificate(*ca, "hospital-1", None)
    )
    event = {"mechanism": "gaussian", "noise_multiplier": 2.0, "steps": 1, "sampling_rate": 1.0}
    recorded = [gaussian_epsilon(2.0, 1, 1e-5), 1.0]  # the second entry under-reports the running total
    for rnd, cumulative in enumerate(recorded, 1):
        ledger.append("release", job="job-1", round=rnd, what={"kind": "upload"},
                      privacy={"scope": "network", "event": event, "epsilon": 1.0, "delta": 1e-5,
                               "cumulative_epsilon": cumulative})  # fmt: skip
    out = tmp_path / "audit.json"
    assert main(["audit", "report", str(tmp_path / "ws"), "--out", str(out)]) == 0
    budget = json.loads(out.read_text())["ledgers"][0]["budgets"]["network"]
    # RDP composition of two σ = 2 releases at δ = 1e-5, not Σ ε = 2 nor Σ δ
    assert budget["epsilon"] == pytest.approx(gaussian_epsilon(2.0, 2, 1e-5)) and budget["delta"] == 1e-5
    assert budget["mismatch"] is True and budget["epsilon_recorded"] == 1.0
    html_out = tmp_path / "audit.html"
    assert main(["audit", "report", str(tmp_path / "ws"), "--out", str(html_out)]) == 0
    assert "compose to ε = 3.189" in html_out.read_text()


def test_an_auditor_needs_neither_torch_nor_tenseal(workspace, tmp_path):
    """``medsilo audit verify`` and ``report`` (budgets replayed with the site's accountant) run in a fresh
    interpreter that never imports torch, TenSEAL, MONAI or NVFlare: an auditor's machine needs none of them.
    Neither verify nor a JSON report draws, so neither loads matplotlib; the summary module alone loads none
    of them either."""
    import subprocess
    import sys

    heavy = "('torch', 'tenseal', 'monai', 'nvflare', 'matplotlib')"
    probes = [
        "import sys, medsilo.secure.audit",
        f"import sys; from medsilo.cli import main; assert main(['audit', 'verify', {str(workspace)!r}]) == 0",
        f"import sys; from medsilo.cli import main; "
        f"assert main(['audit', 'report', {str(workspace)!r}, '--out', {str(tmp_path / 'a.json')!r}]) == 0",
    ]
    for probe in probes:
        probe += f"; loaded = [m for m in {heavy} if m in sys.modules]; assert not loaded, loaded"
        run = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True)
        assert run.returncode == 0, f"{probe}\n{run.stderr[-2000:]}"
    assert json.loads((tmp_path / "a.json").read_text())["verified"] is True
