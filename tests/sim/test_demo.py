"""`medsilo demo` end to end, shortened to one round (the full demo is the README's first command)."""

from __future__ import annotations

import json

from medsilo.cli import main
from medsilo.secure.ledger import LEDGER_FILE, entries


def test_demo_one_round(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--rounds", "1", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "fedavg" in printed and "local" in printed and "worst site" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["algorithm"] == "fedavg" and len(results["sites"]) == 8
    assert [r["round"] for r in results["rounds"]] == [1]
    local = json.loads((out / "runs" / "cxr-demo-local" / "results.json").read_text())
    assert local["algorithm"] == "local"
    # Local shares no tensor: each site's round-1 wire is a signed statement about an empty upload
    ledgers = out / "hospitals" / "ledgers"
    uploads = [e for site in local["sites"] for e in entries(ledgers / site / LEDGER_FILE)
               if e["event"] == "release" and e["job"] == local["job_id"] and e["what"]["kind"] == "upload"]  # fmt: skip
    assert len(uploads) == 8 and all(e["what"]["tensors"] == [] for e in uploads)
    assert local["rounds"][0]["bytes_up"] == sum(e["what"]["bytes"] for e in uploads) < 8 * 1024
    page = (out / "report.html").read_text()
    assert "medsilo demo: fedavg vs local" in page and "<td>local</td>" in page
    assert "Models kept at the sites" in page
    assert (out / "hospitals" / "sites.yml").is_file()
    # the demo says where each hospital's model is, and the command it prints works as printed
    command = next(line.strip() for line in printed.splitlines() if line.strip().startswith("medsilo predict"))
    assert str(out / "runs" / "cxr-demo" / "models") in printed
    assert main(command.split()[1:]) == 0
    scored = capsys.readouterr().out
    site = command.split("--model ")[1].split()[0].rsplit("/", 1)[1]
    assert f"accuracy {results['final']['per_site'][site]['test_acc']:.4f}" in scored
