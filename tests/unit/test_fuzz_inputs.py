"""Property-based tests of the input boundaries: job specs, site configs, sites.yml and manifests.

Whatever a person writes into those files, reading them gives either a valid object or a
:class:`~medsilo.errors.MedsiloError` whose message names the file — never another exception (a
traceback). Inputs are valid files with one or more fields damaged (dropped, retyped, renamed,
out of range), and arbitrary text. Derandomized, so CI sees the same examples on every run.
"""

from __future__ import annotations

import string
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

from medsilo.config import JobSpec
from medsilo.config.job import load_job_spec
from medsilo.config.manifest import read_manifest
from medsilo.config.site import load_site_config, load_sites_file
from medsilo.errors import MedsiloError

FUZZ = settings(max_examples=120, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])  # fmt: skip

JOB = {"name": "fuzz-job", "modality": "cxr", "classes": ["normal", "pneumonia"], "dataset": "cxr", "image_size": 32,
       "model": "cnn", "feature_dim": 16, "algorithm": {"name": "fedproto", "params": {"lam": 1.0}},
       "training": {"rounds": 2, "local_epochs": 1, "batch_size": 8, "lr": 0.01},
       "privacy": {"mode": "dp", "dp": {"noise_multiplier": 1.0, "clip": 1.0}},
       "augmentation": {"pcevolve": {"sites": ["hospital-1"], "epsilon": 4.0}}}  # fmt: skip
SITE = {"site": "hospital-1", "datasets": {"cxr": {"manifest": "m.csv", "modality": "cxr"}},
        "privacy": {"required_mode": "ckks", "min_contributors": 3, "budget": {"epsilon": 8.0, "delta": 1e-5},
                    "pcevolve_generators": ["procedural"]},
        "data": {"max_unreadable_fraction": 0.05}, "compute": {"threads": 2}}  # fmt: skip
SITES = {"sites": {"hospital-1": {"dataset": "cxr", "manifest": "h1/manifest.csv", "modality": "cxr",
                                  "privacy": {"budget": {"epsilon": 4.0, "delta": 1e-5}}}}}  # fmt: skip

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=12), st.just(""), st.just("../../etc/passwd"))  # fmt: skip
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                            max_size=3), max_leaves=6)  # fmt: skip


def _paths(data, prefix=()):
    """Every (path of keys) inside nested dicts."""
    for key, value in data.items():
        yield (*prefix, key)
        if isinstance(value, dict):
            yield from _paths(value, (*prefix, key))


@st.composite
def damaged(draw, base: dict):
    """``base`` with 1–3 fields dropped, replaced by junk, or joined by an unknown field."""
    data = yaml.safe_load(yaml.safe_dump(base))  # deep copy
    for _ in range(draw(st.integers(1, 3))):
        paths = list(_paths(data))
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = data
        for key in path[:-1]:
            parent = parent[key]
        if not isinstance(parent, dict) or path[-1] not in parent:
            continue
        action = draw(st.sampled_from(["drop", "junk", "extra"]))
        if action == "drop":
            del parent[path[-1]]
        elif action == "junk":
            parent[path[-1]] = draw(values)
        else:
            parent[draw(st.text(string.ascii_lowercase, min_size=1, max_size=8))] = draw(values)
    return data


def _only_clean_errors(load, path: Path) -> None:
    try:
        load(path)
    except MedsiloError as exc:
        assert str(path) in str(exc) or path.name in str(exc), f"error does not name the file: {exc}"


def _write(tmp_path_factory, name: str, data) -> Path:
    path = tmp_path_factory.mktemp("fuzz") / name
    try:
        path.write_text(yaml.safe_dump(data, allow_unicode=True))
    except yaml.YAMLError:  # a value yaml cannot represent: write it as text instead
        path.write_text(repr(data))
    return path


def test_the_unmodified_files_are_valid(tmp_path_factory):
    assert isinstance(load_job_spec(_write(tmp_path_factory, "job.yml", JOB)), JobSpec)
    load_site_config(_write(tmp_path_factory, "medsilo_site.yml", SITE))
    load_sites_file(_write(tmp_path_factory, "sites.yml", SITES))


@FUZZ
@given(data=damaged(JOB))
def test_damaged_job_specs_load_or_name_the_file(tmp_path_factory, data):
    path = _write(tmp_path_factory, "job.yml", data)
    try:
        spec = load_job_spec(path)
    except MedsiloError as exc:
        assert path.name in str(exc)
        return
    spec.algorithm.config()  # the algorithm's own parameters are validated at the boundary too


@FUZZ
@given(data=damaged(SITE))
def test_damaged_site_configs_load_or_name_the_file(tmp_path_factory, data):
    _only_clean_errors(load_site_config, _write(tmp_path_factory, "medsilo_site.yml", data))


@FUZZ
@given(data=damaged(SITES))
def test_damaged_sites_files_load_or_name_the_file(tmp_path_factory, data):
    _only_clean_errors(load_sites_file, _write(tmp_path_factory, "sites.yml", data))


@FUZZ
@given(text=st.text(max_size=200))
def test_arbitrary_text_as_a_job_spec(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("fuzz") / "job.yml"
    path.write_text(text)
    _only_clean_errors(load_job_spec, path)


MANIFEST_CELLS = st.one_of(st.sampled_from(["normal", "pneumonia", "train", "val", "test", "P1", "P2", "x.dcm",
                                            "images/0.dcm", "", " ", "pcevolve"]), st.text(max_size=8))  # fmt: skip


@FUZZ
@given(header=st.lists(st.sampled_from(["path", "label", "patient_id", "split", "source", "other", ""]), max_size=6),
       rows=st.lists(st.lists(MANIFEST_CELLS, max_size=6), max_size=6))  # fmt: skip
def test_damaged_manifests_read_or_name_the_file(tmp_path_factory, header, rows):
    path = tmp_path_factory.mktemp("fuzz") / "manifest.csv"
    path.write_text("\n".join(",".join(cells) for cells in [header, *rows]) + "\n")
    try:
        manifest = read_manifest(path, ["normal", "pneumonia"])
    except MedsiloError as exc:
        assert str(path) in str(exc) or path.name in str(exc), f"error does not name the file: {exc}"
        return
    assert all(0 <= r.label < 2 and r.split in ("train", "val", "test") for r in manifest.rows)
