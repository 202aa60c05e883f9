"""The HTML report: headline numbers at the selected round, bad inputs named."""

from __future__ import annotations

import json

import pytest

from medsilo.cli import main
from medsilo.components.results import RunRecorder
from medsilo.errors import MedsiloError
from medsilo.report import gains_vs_local, load_results, summary_row, write_report


def _run(algorithm: str, accs: list[float], sites=("a", "b")) -> dict:
    rec = RunRecorder("j", algorithm, {"mode": "none"}, list(sites), {s: "cnn" for s in sites})
    for rnd, acc in enumerate(accs, start=1):
        rec.add_training(rnd, seconds=2.0, bytes_up=4096, bytes_down=2048 * (rnd > 1), train_loss={s: 0.5 for s in sites})
        for i, s in enumerate(sites):
            rec.add_evaluation(rnd, s, {"acc": acc, "auroc": 0.7, "correct": 1, "n": 2},
                               {"acc": acc - 0.1 * i, "auroc": 0.8, "correct": 1, "n": 2})  # fmt: skip
    return rec.results()


def test_summary_row_reads_the_selected_round():
    row = summary_row(_run("fedavg", [0.6, 0.9, 0.7]))
    assert row["selected_round"] == 2 and row["rounds"] == 3
    assert row["mean_acc"] == pytest.approx(0.85) and row["worst_acc"] == pytest.approx(0.8)
    assert row["mean_auroc"] == pytest.approx(0.8) and row["seconds"] == pytest.approx(6.0)
    assert row["up_per_site_round"] == pytest.approx(2048)


def test_report_via_cli(tmp_path, capsys):
    for name, accs in (("fedavg", [0.6, 0.9]), ("local", [0.7, 0.75])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(_run(name, accs)))
    out = tmp_path / "r" / "report.html"
    assert main(["report", str(tmp_path / "fedavg"), str(tmp_path / "local" / "results.json"), "--out", str(out)]) == 0
    page = out.read_text()
    assert "<td>fedavg</td><td>0.850</td><td>0.800</td>" in page
    assert "<td>local</td>" in page and "data:image/png;base64," in page
    assert not list(out.parent.glob("*.tmp"))


def test_bad_inputs_are_named(tmp_path):
    with pytest.raises(MedsiloError, match="no results.json here"):
        load_results(tmp_path)
    bad = tmp_path / "results.json"
    bad.write_text("{not json")
    with pytest.raises(MedsiloError, match="not valid JSON"):
        load_results(bad)
    bad.write_text(json.dumps({"job": "j"}))
    with pytest.raises(MedsiloError, match="field 'algorithm' is missing"):
        load_results(bad)
    with pytest.raises(MedsiloError, match="must share their sites"):
        write_report([_run("a", [0.5]), _run("b", [0.5], sites=("x", "y"))], tmp_path / "r.html")


def test_report_shows_a_failed_site_and_leaves_its_numbers_empty(tmp_path):
    rec = RunRecorder("j", "fedavg", {"mode": "none"}, ["a", "b"], {"a": "cnn", "b": "cnn"})
    rec.add_training(1, seconds=1.0, bytes_up=10, bytes_down=0, train_loss={"a": 0.5})
    rec.add_evaluation(1, "a", {"acc": 0.8, "auroc": 0.7, "correct": 1, "n": 2},
                       {"acc": 0.75, "auroc": 0.8, "correct": 3, "n": 4})  # fmt: skip
    rec.set_failures([{"site": "b", "round": 1, "task": "train", "reason": "site b: no dataset"},
                      {"site": "b", "round": 2, "task": "evaluate", "reason": "site b: no dataset"}])  # fmt: skip
    page = write_report([rec.results()], tmp_path / "r.html").read_text()
    assert "round 2 (evaluate) continued without b: site b: no dataset" in page
    assert "<td>b</td><td>n/a / n/a</td>" in page  # no number made up for the failed site


def test_report_flags_a_site_that_predicts_one_class(tmp_path):
    rec = RunRecorder("j", "fedavg", {"mode": "none"}, ["a", "b"], {"a": "cnn", "b": "cnn"}, select_on="val_balanced_acc")
    rec.add_training(1, seconds=1.0, bytes_up=0, bytes_down=0, train_loss={"a": 0.5, "b": 0.5})
    for site, (acc, balanced, k) in {"a": (0.9, 0.5, 1), "b": (0.8, 0.75, 2)}.items():
        ev = {"acc": acc, "balanced_acc": balanced, "auroc": 0.6, "correct": 9, "n": 10, "predicted_classes": k}
        rec.add_evaluation(1, site, ev, ev)
    out = write_report([rec.results()], tmp_path / "r.html")
    page = out.read_text()
    assert "j · a: predicts one class for every test image" in page and "j · b: predicts" not in page
    assert "<td>0.625</td>" in page  # mean balanced accuracy (0.5 + 0.75) / 2
    assert "chosen on the sites' mean <em>validation</em>\nbalanced accuracy" in page


def _scored(algorithm: str, accs: dict[str, float], n: int) -> dict:
    """One round; each site's test accuracy from ``accs`` on ``n`` test images."""
    rec = RunRecorder("j", algorithm, {"mode": "none"}, list(accs), {s: "cnn" for s in accs})
    rec.add_training(1, seconds=1.0, bytes_up=0, bytes_down=0, train_loss={s: 0.5 for s in accs})
    for site, acc in accs.items():
        rec.add_evaluation(1, site, {"acc": acc, "balanced_acc": acc, "auroc": 0.7, "correct": 1, "n": n},
                           {"acc": acc, "balanced_acc": acc, "auroc": 0.7, "correct": round(acc * n), "n": n})  # fmt: skip
    return rec.results()


def test_gain_over_local_has_an_interval_per_site_and_names_a_site_that_loses(tmp_path):
    local = _scored("local", {"a": 0.60, "b": 0.90, "c": 0.70}, n=200)
    fedper = _scored("fedper", {"a": 0.85, "b": 0.70, "c": 0.71}, n=200)
    gains = gains_vs_local(fedper, local)
    a, b, c = (gains["per_site"][s] for s in "abc")
    assert a.value == pytest.approx(0.25) and a.low > 0  # 170 vs 120 of 200: a clear gain
    assert b.value == pytest.approx(-0.20) and b.high < 0  # 140 vs 180: a clear loss
    assert c.low < 0 < c.high  # one point on 200 images: no claim either way
    assert gains["loses"] == ["b"]
    assert gains["mean"].value == pytest.approx((0.25 - 0.20 + 0.01) / 3)
    page = write_report([local, fedper], tmp_path / "r.html").read_text()
    assert "Gain over training alone (Local)" in page and 'class="bad">-0.200' in page
    assert "Loses to Local (interval wholly below 0): fedper · b." in page
    # the same accuracies on 10 test images a site prove nothing: no site is said to lose
    small = gains_vs_local(_scored("fedper", {"a": 0.9, "b": 0.7, "c": 0.7}, n=10),
                           _scored("local", {"a": 0.6, "b": 0.9, "c": 0.7}, n=10))  # fmt: skip
    assert small["loses"] == [] and all(g.low < 0 < g.high for g in small["per_site"].values())


def test_no_gain_table_without_exactly_one_local_run(tmp_path):
    one = _scored("fedavg", {"a": 0.8, "b": 0.7}, n=20)
    two = _scored("fedper", {"a": 0.8, "b": 0.7}, n=20)
    assert "Gain over training alone" not in write_report([one, two], tmp_path / "r.html").read_text()
