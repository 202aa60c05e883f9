"""results.json assembly: the reported round is chosen on validation, never on test."""

from __future__ import annotations

import math

import pytest

from medsilo.components.results import RunRecorder


def _ev(acc: float, correct: int, n: int, auroc: float = 0.5) -> dict:
    return {"acc": acc, "auroc": auroc, "correct": correct, "n": n}


def _recorder() -> RunRecorder:
    rec = RunRecorder("j", "fedavg", {"mode": "none"}, ["a", "b"], {"a": "cnn", "b": "cnn"})
    # round 1: high test, low val; round 2: high val, lower test -> round 2 must be chosen
    rec.add_training(1, seconds=1.5, bytes_up=800, bytes_down=0, train_loss={"a": 0.9, "b": 0.8})
    rec.add_evaluation(1, "a", _ev(0.50, 5, 10), _ev(0.90, 9, 10))
    rec.add_evaluation(1, "b", _ev(0.60, 6, 10), _ev(0.95, 19, 20))
    rec.add_training(2, seconds=1.0, bytes_up=800, bytes_down=800, train_loss={"a": 0.5, "b": 0.4})
    rec.add_evaluation(2, "a", _ev(0.80, 8, 10), _ev(0.70, 7, 10, auroc=math.nan))
    rec.add_evaluation(2, "b", _ev(0.90, 9, 10), _ev(0.60, 12, 20, auroc=0.8))
    return rec


def test_selected_round_uses_validation_and_final_numbers_follow_it():
    res = _recorder().results()
    assert res["selected_round"] == 2
    assert res["selection_score"] == pytest.approx((0.80 + 0.90) / 2)  # round 2's mean validation accuracy
    assert res["final"]["mean_acc"] == pytest.approx(0.65)
    assert res["final"]["worst_acc"] == pytest.approx(0.60)
    assert res["final"]["pooled_acc"] == pytest.approx((7 + 12) / 30)
    assert res["final"]["per_site"]["a"] == {"test_acc": 0.70, "test_auroc": None,  # NaN -> null
                                             "test_balanced_acc": None, "constant_predictor": False}  # fmt: skip


def test_schema_is_the_design_contract():
    res = _recorder().results()
    # DESIGN §12, plus algorithm_form (which server form of the algorithm ran: sums or per-site)
    # refused (sites that declined the job at round 1, with their reasons), synthetic (PCEvolve images
    # a site added to its training split), failures (tasks sites failed under reliability.min_sites) and
    # job_id (the run's id, which the parties' ledgers name), selection_score (the validation figure the round
    # was selected on: what a recipe sweep compares)
    assert set(res) == {"job", "job_id", "algorithm", "algorithm_form", "privacy", "sites", "models", "rounds",
                        "selected_round", "selected_on", "selection_score", "final", "privacy_spent", "refused", "synthetic",
                        "failures"}  # fmt: skip
    assert res["algorithm_form"] == "sums"
    r = res["rounds"][1]
    assert set(r) == {"round", "seconds", "bytes_up", "bytes_down", "metrics", "mean_val_acc", "mean_test_acc",
                      "pooled_val_acc", "pooled_test_acc"}  # fmt: skip
    assert set(r["metrics"]["a"]) == {"val_acc", "test_acc", "test_auroc", "train_loss", "n_val", "n_test",
                                      "val_balanced_acc", "test_balanced_acc", "constant_predictor"}  # fmt: skip
    assert set(res["final"]) == {"per_site", "pooled_acc", "mean_acc", "worst_acc", "mean_balanced_acc",
                                 "worst_balanced_acc", "constant_predictors"}  # fmt: skip
    assert (r["round"], r["bytes_down"], r["metrics"]["b"]["train_loss"]) == (2, 800, 0.4)


def _bal(acc: float, balanced: float, predicted_classes: int = 2) -> dict:
    return {"acc": acc, "balanced_acc": balanced, "auroc": 0.5, "correct": round(acc * 10), "n": 10,
            "predicted_classes": predicted_classes}  # fmt: skip


def test_rounds_are_selected_on_balanced_accuracy_and_a_constant_predictor_is_flagged():
    # site a holds 90 % of one class: in round 1 it predicts that class for everything (acc 0.9, balanced 0.5);
    # in round 2 it learnt both (acc 0.8, balanced 0.8). Accuracy prefers round 1; balanced accuracy round 2.
    runs = {}
    for select_on in ("val_acc", "val_balanced_acc"):
        rec = RunRecorder("j", "fedavg", {"mode": "none"}, ["a"], {"a": "cnn"}, select_on=select_on)
        for rnd, (acc, bal, k) in {1: (0.9, 0.5, 1), 2: (0.8, 0.8, 2)}.items():
            rec.add_training(rnd, seconds=1, bytes_up=0, bytes_down=0, train_loss={"a": 1.0})
            rec.add_evaluation(rnd, "a", _bal(acc, bal, k), _bal(acc, bal, k))
        runs[select_on] = rec.results()
    assert (runs["val_acc"]["selected_round"], runs["val_balanced_acc"]["selected_round"]) == (1, 2)
    assert runs["val_acc"]["final"]["constant_predictors"] == ["a"]  # the report can say so
    assert runs["val_acc"]["final"]["per_site"]["a"]["test_balanced_acc"] == 0.5
    assert runs["val_balanced_acc"]["final"]["constant_predictors"] == []
    assert runs["val_balanced_acc"]["selected_on"] == "val_balanced_acc"
    with pytest.raises(ValueError, match="select_on"):
        RunRecorder("j", "fedavg", {"mode": "none"}, ["a"], {"a": "cnn"}, select_on="test_acc")


def test_each_round_carries_site_counts_and_both_means():
    r = _recorder().results()["rounds"][0]  # round 1: a 9/10 and b 19/20 on test
    assert (r["metrics"]["a"]["n_test"], r["metrics"]["b"]["n_test"], r["metrics"]["b"]["n_val"]) == (10, 20, 10)
    assert r["mean_test_acc"] == pytest.approx((0.90 + 0.95) / 2)  # every hospital counts the same
    assert r["pooled_test_acc"] == pytest.approx((9 + 19) / 30)  # every image counts the same
    assert r["mean_val_acc"] == pytest.approx(0.55) and r["pooled_val_acc"] == pytest.approx(11 / 20)


def test_ties_go_to_the_earlier_round_and_incomplete_rounds_are_ignored():
    rec = RunRecorder("j", "local", {"mode": "none"}, ["a"], {"a": "cnn"})
    for rnd in (1, 2):
        rec.add_training(rnd, seconds=1, bytes_up=0, bytes_down=0, train_loss={"a": 1.0})
        rec.add_evaluation(rnd, "a", _ev(0.7, 7, 10), _ev(0.7, 7, 10))
    rec.add_training(3, seconds=1, bytes_up=0, bytes_down=0, train_loss={"a": 1.0})  # no evaluation yet
    assert rec.complete_rounds() == [1, 2]
    assert rec.selected_round() == 1


def test_no_complete_round_is_an_error():
    rec = RunRecorder("j", "local", {"mode": "none"}, ["a"], {"a": "cnn"})
    with pytest.raises(ValueError, match="no round has an evaluation from every site"):
        rec.results()


def test_a_round_a_site_failed_is_complete_without_it_and_its_metrics_are_left_out():
    rec = RunRecorder("j", "fedavg", {"mode": "none"}, ["a", "b", "c"], {s: "cnn" for s in "abc"})
    for rnd, (va, vb, vc) in {1: (0.5, 0.5, 0.5), 2: (0.6, 0.9, None), 3: (0.7, 0.7, 0.7)}.items():
        rec.add_training(rnd, seconds=1.0, bytes_up=10, bytes_down=10, train_loss={"a": 0.5, "b": 0.5})
        for site, val in zip("abc", (va, vb, vc)):
            if val is not None:
                rec.add_evaluation(rnd, site, _ev(val, 1, 2), _ev(val, 1, 2))
    # without a recorded failure, round 2 lacks c's evaluation and cannot be chosen
    assert rec.complete_rounds() == [1, 3]
    # c failed the train task of round 3, which would have carried its evaluation of round 2
    rec.set_failures([{"site": "c", "round": 3, "task": "train", "reason": "site c: disk full"}])
    assert rec.complete_rounds() == [1, 2, 3]
    res = rec.results()
    assert res["selected_round"] == 2  # mean val over a and b: 0.75 > 0.7
    assert set(res["rounds"][1]["metrics"]) == {"a", "b"}  # nothing filled in for c
    assert res["final"]["per_site"]["c"] == {"test_acc": None, "test_auroc": None}
    assert res["final"]["mean_acc"] == pytest.approx(0.75) and res["final"]["worst_acc"] == pytest.approx(0.6)
    assert res["failures"] == [{"site": "c", "round": 3, "task": "train", "reason": "site c: disk full"}]
