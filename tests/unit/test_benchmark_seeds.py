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


def test_a_finished_run_is_kept_only_for_the_same_spec_and_hospitals(tmp_path):
    from benchmarks.runner import finished_run
    from medsilo.config import JobSpec
    from medsilo.jobs.builder import export_job

    spec = JobSpec(name="bench-fedavg", modality="cxr", classes=["normal", "pneumonia"], dataset="cxr",
                   algorithm={"name": "fedavg"}, training={"rounds": 3})  # fmt: skip
    run_dir, sites = tmp_path / "fedavg", tmp_path / "sites.yml"
    export_job(spec, run_dir / "job")
    (run_dir / "medsilo-run.json").write_text(json.dumps({"job": spec.name, "sites_file": str(sites)}))
    assert finished_run(spec, sites, run_dir) is None  # stopped before its results were written
    (run_dir / "results.json").write_text(json.dumps({"selection_score": 0.7}))
    kept = finished_run(spec, sites, run_dir)
    assert kept["selection_score"] == 0.7 and kept["wall_seconds"] >= 0
    other = JobSpec(**{**spec.model_dump(), "training": {**spec.training.model_dump(), "lr": 0.03}})
    assert finished_run(other, sites, run_dir) is None  # another recipe: run it
    assert finished_run(spec, tmp_path / "other.yml", run_dir) is None  # other hospitals: run it
