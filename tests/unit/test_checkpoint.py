"""Checkpoints for resume: a site's client half without its images, the server's state bound to its job spec."""

from __future__ import annotations

import pytest
import torch

from medsilo.components import checkpoint
from medsilo.components.algorithms import algorithm_module
from medsilo.config import JobSpec
from medsilo.tests.helpers import tiny_setup


def _client():
    spec = JobSpec(name="t", modality="cxr", classes=["a", "b", "c"], dataset="cxr", image_size=16, model="cnn",
                   feature_dim=4, algorithm={"name": "ditto"})  # fmt: skip
    setup = tiny_setup()
    return algorithm_module("ditto").Client(setup, spec.algorithm.config()), setup.data


def test_a_site_checkpoint_restores_the_client_without_storing_images(tmp_path):
    client, data = _client()
    for rnd in (1, 2, 3):
        client.train(rnd)
        checkpoint.save_site(tmp_path, "site-a", rnd, client, data)
    kept = sorted(p.name for p in (tmp_path / "site-a").iterdir())
    assert kept == ["round-2.pkl", "round-3.pkl"]  # the last two rounds
    restored = checkpoint.load_site(tmp_path, "site-a", 3, data)
    assert restored.setup.data is data  # the site's own dataset is attached again, not a copy
    for a, b in zip(client.model.state_dict().values(), restored.model.state_dict().values()):
        assert torch.equal(a, b)
    # the next round from the restored client uploads exactly what the original uploads
    torch.manual_seed(4)
    expected = client.train(4).sums
    torch.manual_seed(4)
    got = restored.train(4).sums
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    images = data.train.images.numel() * 4
    assert (tmp_path / "site-a" / "round-3.pkl").stat().st_size < images + 600_000  # models only
    with pytest.raises(checkpoint.CheckpointError, match="cannot resume from round 1"):
        checkpoint.load_site(tmp_path, "site-a", 1, data)


def test_the_server_checkpoint_resumes_only_its_own_job(tmp_path):
    job = {"name": "t", "training": {"rounds": 3}}
    assert checkpoint.load_server(tmp_path, job) is None
    checkpoint.save_server(tmp_path, {"round": 2, "spec": checkpoint.spec_digest(job), "payload": {}})
    assert checkpoint.load_server(tmp_path, job)["round"] == 2
    with pytest.raises(checkpoint.CheckpointError, match="another version of job 't'"):
        checkpoint.load_server(tmp_path, {**job, "training": {"rounds": 4}})
    (tmp_path / checkpoint.SERVER_FILE).write_bytes(b"not a pickle")
    with pytest.raises(checkpoint.CheckpointError, match="unreadable checkpoint"):
        checkpoint.load_server(tmp_path, job)
