"""`medsilo demo` end to end, shortened to one round (the full demo is the README's first command)."""

from __future__ import annotations

import json

from medsilo.cli import main


def test_demo_one_round(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--rounds", "1", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "fedper" in printed and "local" in printed and "worst site" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["algorithm"] == "fedper" and len(results["sites"]) == 4
    assert [r["round"] for r in results["rounds"]] == [1]
    local = json.loads((out / "runs" / "cxr-demo-local" / "results.json").read_text())
    assert local["algorithm"] == "local" and local["rounds"][0]["bytes_up"] == 0
    page = (out / "report.html").read_text()
    assert "medsilo demo: fedper vs local" in page and "<td>local</td>" in page
    assert (out / "hospitals" / "sites.yml").is_file()
