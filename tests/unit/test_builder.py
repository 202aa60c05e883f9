"""Job build: a standard NVFlare job folder referencing pre-installed medsilo classes, no custom code."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medsilo.cli import main
from medsilo.config import load_job_spec
from medsilo.config.job import decode_job
from medsilo.secure.pipeline.base import PipelineRefusal, sum_uploads

SPEC = Path(__file__).resolve().parents[2] / "jobs" / "cxr_fedavg.yml"


def test_job_build_writes_a_standard_folder(tmp_path, capsys):
    assert main(["job", "build", str(SPEC), "--out", str(tmp_path), "--min-sites", "3"]) == 0
    job = tmp_path / "cxr-fedavg"
    assert f"wrote {job}" in capsys.readouterr().out
    assert not list(job.rglob("custom"))
    meta = json.loads((job / "meta.json").read_text())
    assert meta["min_clients"] == 3
    server = json.loads((job / "app/config/config_fed_server.json").read_text())
    client = json.loads((job / "app/config/config_fed_client.json").read_text())
    controller = server["workflows"][0]
    assert controller["path"] == "medsilo.components.controller.RoundController"
    # the spec travels encoded (NVFlare would expand {$ENV} references in plain strings), the same at both ends
    assert decode_job(controller["args"]["job"]) == load_job_spec(SPEC).model_dump(mode="json")
    assert client["executors"][0]["executor"]["args"]["job"] == controller["args"]["job"]
    assert "{" not in controller["args"]["job"]
    assert server["server"]["task_request_interval"] == 0.2
    executor = client["executors"][0]
    assert executor["executor"]["path"] == "medsilo.components.executor.SiteExecutor"
    assert sorted(executor["tasks"]) == ["evaluate", "export", "join", "release", "train"]
    assert not client.get("task_result_filters") and not client.get("task_data_filters")
    text = (job / "app/config/config_fed_client.json").read_text()
    assert "manifest" not in text and "/" not in json.dumps(executor["executor"]["args"])  # no data paths


def test_a_ckks_job_is_the_same_two_classes_with_the_mode_in_the_spec(tmp_path):
    # the executor's privacy pipeline applies the mode: the job carries no filter a job author could drop
    spec = tmp_path / "ckks.yml"
    spec.write_text(SPEC.read_text().replace("mode: none", "mode: ckks"))
    assert main(["job", "build", str(spec), "--out", str(tmp_path / "out")]) == 0
    client = json.loads((tmp_path / "out" / "cxr-fedavg" / "app/config/config_fed_client.json").read_text())
    assert not client.get("task_result_filters") and not client.get("task_data_filters")
    assert decode_job(client["executors"][0]["executor"]["args"]["job"])["privacy"]["mode"] == "ckks"


def test_rebuild_replaces_the_folder(tmp_path):
    main(["job", "build", str(SPEC), "--out", str(tmp_path)])
    stale = tmp_path / "cxr-fedavg" / "stale.txt"
    stale.write_text("old")
    main(["job", "build", str(SPEC), "--out", str(tmp_path)])
    assert not stale.exists()


def test_bad_spec_fails_before_anything_is_written(tmp_path, capsys):
    bad = tmp_path / "bad.yml"
    bad.write_text(SPEC.read_text().replace("model: cnn", "model: resnet-18"))
    assert main(["job", "build", str(bad), "--out", str(tmp_path / "out")]) == 2
    assert "model: unknown backbone; did you mean 'resnet18'?" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_sum_uploads_adds_per_name_and_refuses_mismatches():
    a = {"w": np.array([1.0, 2.0], np.float32), "n": np.array(2.0, np.float32)}
    b = {"w": np.array([3.0, 4.0], np.float32), "n": np.array(1.0, np.float32)}
    total = sum_uploads({"a": a, "b": b})
    np.testing.assert_allclose(total["w"], [4.0, 6.0])
    assert float(total["n"]) == 3.0
    with pytest.raises(PipelineRefusal, match="sites a and b uploaded different tensors"):
        sum_uploads({"a": a, "b": {"w": b["w"]}})
    with pytest.raises(PipelineRefusal, match="site b uploaded 'w' with shape \\(3,\\)"):
        sum_uploads({"a": a, "b": {"w": np.zeros(3, np.float32), "n": b["n"]}})


def test_job_show_prints_the_spec_a_folder_carries(tmp_path, capsys):
    main(["job", "build", str(SPEC), "--out", str(tmp_path)])
    capsys.readouterr()
    assert main(["job", "show", str(tmp_path / "cxr-fedavg")]) == 0
    shown = capsys.readouterr().out
    assert "name: cxr-fedavg" in shown and "algorithm:" in shown
    assert main(["job", "show", str(tmp_path)]) == 2
    assert "not a medsilo job folder" in capsys.readouterr().err
