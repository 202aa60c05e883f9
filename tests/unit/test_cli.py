"""The command line, run in-process through ``main([...])``."""

from __future__ import annotations

import re

import pytest

from medsilo.cli import COMMANDS, main
from medsilo.config import load_sites_file, read_manifest


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


@pytest.mark.parametrize("command", [["synth"], ["job", "check"]])
def test_each_command_has_help(capsys, command):
    with pytest.raises(SystemExit) as info:
        main([*command, "--help"])
    assert info.value.code == 0
    assert "usage: medsilo" in capsys.readouterr().out


@pytest.mark.parametrize("modality, ext", [("cxr", "dcm"), ("pathology", "png")])
def test_synth_both_modalities(tmp_path, capsys, modality, ext):
    out = tmp_path / modality
    code = main(["synth", "--out", str(out), "--modality", modality, "--sites", "2", "--images-per-site", "12",
                 "--seed", "1", "--scarce", "hospital-2=4", "--workers", "1", "--quiet", "--patch-size", "32"])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "hospital-2" in printed and f"wrote {out / 'sites.yml'}" in printed
    sites = load_sites_file(out / "sites.yml")
    assert {e.modality for e in sites.sites.values()} == {modality}
    rows = read_manifest(sites.sites["hospital-2"].manifest).rows
    assert sum(r.split == "train" for r in rows) == 4
    assert all(r.path.suffix == f".{ext}" and r.path.is_file() for r in rows)


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--scarce", "hospital-2"], "expected SITE=COUNT"),
        (["--sites", "0"], "medsilo: error: --sites: must be between 1 and 64, got 0"),
        (["--scarce", "hospital-7=3"], "medsilo: error: --scarce: unknown site 'hospital-7'"),
        (["--classes", "normal"], "expected 2\\+ comma-separated class names"),
    ],
)
def test_synth_bad_options_exit_2_with_one_line(tmp_path, capsys, argv, match):
    base = ["synth", "--out", str(tmp_path / "o"), "--modality", "cxr", "--quiet"]
    try:
        code = main(base + argv)
    except SystemExit as exc:  # argparse rejects malformed values itself, also with status 2
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    assert re.search(match, err)
    assert "Traceback" not in err


def test_job_check(tmp_path, capsys):
    from pathlib import Path

    spec = Path(__file__).resolve().parents[2] / "jobs" / "cxr_fedavg.yml"
    assert main(["job", "check", str(spec)]) == 0
    assert "algorithm fedavg" in capsys.readouterr().out
    bad = tmp_path / "bad.yml"
    bad.write_text(spec.read_text().replace("rounds: 10", "rounds: 0"))
    assert main(["job", "check", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"medsilo: error: {bad}: training.rounds: must be greater than or equal to 1, got 0"


def test_the_terminal_summary_leads_with_balanced_accuracy_and_names_constant_predictors(capsys):
    from medsilo.cli.summary import print_summary

    def run(name, per_site, constant):
        return {"algorithm": name, "sites": ["a", "b"], "selected_round": 3, "selected_on": "val_balanced_acc",
                "final": {"per_site": per_site, "mean_acc": 0.75, "worst_acc": 0.7, "pooled_acc": 0.76,
                          "mean_balanced_acc": 0.5, "worst_balanced_acc": 0.5, "constant_predictors": constant}}  # fmt: skip

    majority = {"test_acc": 0.8, "test_balanced_acc": 0.5, "test_auroc": 0.5}
    print_summary([run("fedavg", {"a": majority, "b": majority}, ["a", "b"]), run("local", {"a": majority}, [])])
    out = capsys.readouterr().out
    assert out.splitlines()[1].split()[:3] == ["bal", "acc", "acc"]  # balanced accuracy first, then accuracy
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[2:4]}
    assert rows["a"] == ["0.500", "0.800", "0.500", "|", "0.500", "0.800", "0.500"]
    assert rows["b"] == ["0.500", "0.800", "0.500", "|", "n/a", "n/a", "n/a"]  # a site Local never scored
    assert "on val bal acc" in out
    assert "fedavg: a, b predict one class for every test image" in out and "local:" not in out
