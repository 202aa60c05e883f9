"""A chest X-ray job may keep only some views (``views: [PA, AP]``): validated in the spec, applied when a site
loads its data, and every dropped image is counted, never silently."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from medsilo.config import JobSpec, read_manifest
from medsilo.config.loading import ConfigError, validate
from medsilo.errors import DataError
from medsilo.medical.data import load_site_data
from tests.helpers import write_dicom

SPEC = {"name": "views", "modality": "cxr", "classes": ["normal", "pneumonia"], "dataset": "cxr",
        "algorithm": {"name": "fedavg"}}  # fmt: skip
VIEWS = ("PA", "AP", "LL", "PA", "AP", "PA", "", "PA", "AP", "PA", "PA", "RL")
"""View Position of each image; splits train ×4, val ×4, test ×4 (images 6 and 11: UNKNOWN and LATERAL)."""


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    folder = tmp_path_factory.mktemp("views")
    rows = []
    for i, view in enumerate(VIEWS):
        write_dicom(folder / f"{i}.dcm", np.full((8, 8), 100 * i, np.uint16), ViewPosition=view)
        rows.append(f"{i}.dcm,{('normal', 'pneumonia')[i % 2]},P{i},{('train', 'val', 'test')[i // 4]}\n")
    (folder / "manifest.csv").write_text("path,label,patient_id,split\n" + "".join(rows))
    return read_manifest(folder / "manifest.csv")


def test_a_job_lists_known_views_case_ignored():
    assert validate({**SPEC, "views": ["pa", "Ap", "UNKNOWN"]}, JobSpec, "jobs/v.yml").views == ["PA", "AP", "UNKNOWN"]
    assert validate(SPEC, JobSpec, "jobs/v.yml").views is None  # default: every view


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"views": ["PA", "lateal"]}, r"jobs/v.yml: views: unknown view 'lateal'; did you mean 'LATERAL'\? choose from "
                                      r"PA, AP, LATERAL, LL, UNKNOWN"),
        ({"views": []}, r"views: list at least one view"),
        ({"views": ["PA", "pa"]}, r"views: view PA is listed twice"),
        ({"modality": "pathology", "views": ["PA"]}, r"views: only chest X-rays \(modality cxr\) have a view; a "
                                                     r"pathology job cannot restrict views, remove 'views'"),
    ],
)  # fmt: skip
def test_bad_views_are_refused(change, message):
    with pytest.raises(ConfigError, match=message):
        validate({**SPEC, **change}, JobSpec, "jobs/v.yml")


def test_other_views_are_dropped_at_load_and_counted(manifest, caplog):
    with caplog.at_level(logging.WARNING, logger="medsilo.medical.data.dataset"):
        data = load_site_data(manifest, modality="cxr", image_size=8, views=("PA", "AP"))
    assert (len(data.train), len(data.val), len(data.test)) == (3, 3, 3)
    assert data.dropped_views == {"LL": 1, "UNKNOWN": 1, "LATERAL": 1}
    assert data.failures == []  # a dropped view is not an unreadable file
    assert "dropped 3 image(s) of views the job does not keep (PA, AP): LATERAL 1, LL 1, UNKNOWN 1" in caplog.text
    every = load_site_data(manifest, modality="cxr", image_size=8)
    assert (len(every.train), len(every.val), len(every.test)) == (4, 4, 4) and every.dropped_views == {}


def test_a_split_emptied_by_the_views_fails_naming_them(manifest):
    with pytest.raises(DataError, match=r"no usable image in split\(s\) val, test; every split needs images "
                                        r"\(the job keeps views LL; dropped AP 3, LATERAL 1, PA 6, UNKNOWN 1\)"):  # fmt: skip
        load_site_data(manifest, modality="cxr", image_size=8, views=("LL",))


def test_views_at_a_pathology_dataset_are_refused(manifest):
    with pytest.raises(DataError, match=r"the job keeps only views PA, but pathology images have no view; only "
                                        r"chest X-ray \(cxr\) jobs may set views"):  # fmt: skip
        load_site_data(manifest, modality="pathology", image_size=8, views=("PA",))
