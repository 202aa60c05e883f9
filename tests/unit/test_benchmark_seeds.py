"""A multi-seed benchmark keeps finished seeds and adds missing runs to a seed's file instead of replacing it."""

from __future__ import annotations

import argparse
import json

import pytest

from benchmarks.runner import seed_result

IGNORE = ("algorithms",)


def _args(tmp_path, **kw):
    return argparse.Namespace(out=tmp_path, seed=0, rounds=3, algorithms=["a"], **kw)


def _runner(args, hospitals="h0"):
    calls = []

    def run(name, labels):
        calls.append(sorted(labels))
        result = {"benchmark": name, "settings": {k: v for k, v in vars(args).items() if k != "out"},
                  "synthetic_data": {"hospitals": hospitals},
                  "rows": [{"label": label, "score": len(label)} for label in sorted(labels)],
                  "per_site": {label: {"site-1": 0.5} for label in labels}}  # fmt: skip
        (args.out / f"{name}.json").write_text(json.dumps(result))
        return result

    return run, calls


def test_missing_labels_are_added_and_finished_ones_kept(tmp_path):
    args = _args(tmp_path)
    run, calls = _runner(args)
    first = seed_result(args, "bench_seed0", {"a"}, IGNORE, run)
    assert [row["label"] for row in first["rows"]] == ["a"]

    args.algorithms = ["a", "b", "c"]
    merged = seed_result(args, "bench_seed0", {"a", "b", "c"}, IGNORE, run)
    assert calls == [["a"], ["b", "c"]]  # "a" did not run again
    assert sorted(row["label"] for row in merged["rows"]) == ["a", "b", "c"]
    assert set(merged["per_site"]) == {"a", "b", "c"}
    on_disk = json.loads((tmp_path / "bench_seed0.json").read_text())
    assert on_disk["rows"] == merged["rows"] and on_disk["added"][0]["labels"] == ["b", "c"]
    assert not (tmp_path / "bench_seed0_adding.json").exists()

    again = seed_result(args, "bench_seed0", {"b"}, IGNORE, run)  # all present: kept, nothing runs
    assert calls == [["a"], ["b", "c"]] and again == on_disk


def test_other_settings_are_not_merged(tmp_path):
    args = _args(tmp_path)
    run, calls = _runner(args)
    seed_result(args, "bench_seed0", {"a"}, IGNORE, run)
    args.rounds = 5  # a setting that is not ignored: the old file is not these settings' seed, so it is rerun whole
    result = seed_result(args, "bench_seed0", {"a", "b"}, IGNORE, run)
    assert calls == [["a"], ["a", "b"]] and "added" not in result


def test_added_runs_on_other_hospitals_stop_and_keep_both_files(tmp_path):
    args = _args(tmp_path)
    run, _ = _runner(args)
    seed_result(args, "bench_seed0", {"a"}, IGNORE, run)
    before = (tmp_path / "bench_seed0.json").read_text()
    other, _ = _runner(args, hospitals="h1")
    with pytest.raises(SystemExit, match="other hospitals"):
        seed_result(args, "bench_seed0", {"a", "b"}, IGNORE, other)
    assert (tmp_path / "bench_seed0.json").read_text() == before
    assert (tmp_path / "bench_seed0_adding.json").is_file()
