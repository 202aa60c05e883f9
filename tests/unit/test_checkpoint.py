"""Checkpoints for resume: every algorithm's halves round-trip as state dicts, bound to their job."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from medsilo.components import checkpoint
from medsilo.components.algorithms import ALGORITHMS, algorithm_module
from medsilo.components.results import RunRecorder
from medsilo.config import JobSpec
from medsilo.config.job import spec_digest
from tests.helpers import aggregate, tiny_setup

JOB = {"name": "t", "training": {"rounds": 3}}
DIGEST = spec_digest(JOB)
JOB_ID = "0b1c2d3e-job"
SITES = ("a", "b")

FAST: dict[str, dict] = {
    "fedtgp": {"server_epochs": 3},
    "fedktl": {"server_epochs": 2, "latent_dim": 8, "image_size": 8},
    "fedrep": {"head_epochs": 2},
}
"""Small server and head settings: the same code paths, a fraction of the time."""


def _setup(site: str):
    """Site ``a``: 12 training images; site ``b``: 8 of classes 0 and 1 only (a site that lacks a class)."""
    if site == "a":
        return tiny_setup("a", n=12, seed=1)
    return tiny_setup("b", n=8, seed=2, labels=[0, 1])


def _next_payload(server, uploads: dict[str, dict], rnd: int) -> dict:
    """What the controller does with round ``rnd``'s plaintext uploads."""
    if server.form == "per-site":
        return server.update_from_sites(uploads, rnd)
    return server.update(aggregate(list(uploads.values())), rnd)


def _federation(name: str, rounds: int = 2):
    """Both sites and the server of ``name`` after ``rounds`` rounds (as the executor saves them: after
    ``train``), and the payload for the next round."""
    module = algorithm_module(name)
    config = module.Config(**FAST.get(name, {}))
    clients = {s: module.Client(_setup(s), config) for s in SITES}
    server = module.Server(config, 3, list(SITES))
    payload = None
    for rnd in range(1, rounds + 1):
        uploads = {}
        for site, client in clients.items():
            client.receive(payload, rnd)
            torch.manual_seed(rnd)
            uploads[site] = client.train(rnd).sums
        payload = _next_payload(server, uploads, rnd)
    return module, config, clients, server, payload


def _flat(obj, skip: set[str]) -> dict:
    """Every piece of ``obj``'s state by a dotted name: module state-dict entries, tensors, plain values."""
    out = {}

    def add(key, value):
        if isinstance(value, nn.Module):
            out.update({f"{key}.{k}": v for k, v in value.state_dict().items()})
        elif isinstance(value, (list, tuple)):
            out[f"{key}:len"] = (type(value).__name__, len(value))
            for i, item in enumerate(value):
                add(f"{key}[{i}]", item)
        else:
            out[key] = value

    rebuilt = skip | set(getattr(type(obj), "checkpoint_rebuilt", ()))
    for name, value in vars(obj).items():
        if name not in rebuilt:
            add(name, value)
    return out


def _same(a, b) -> bool:
    """Equal values of the same type; tensors equal element-wise with the same dtype; NaN equals NaN."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and type(a) is type(b) and torch.equal(a, b))  # fmt: skip
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def _assert_same_state(original, restored, skip: set[str]) -> None:
    """Every tensor equal (same dtype), every other value equal, between two halves."""
    want, got = _flat(original, skip), _flat(restored, skip)
    assert want.keys() == got.keys()
    differ = [k for k in want if not _same(want[k], got[k])]
    assert differ == []


def _batch(setup) -> torch.Tensor:
    """The site's test images ``(B, C, H, W)``."""
    test = setup.data.test
    return torch.stack([test[i][0] for i in range(len(test))])


CLIENT_SKIP = {"setup", "config"}
SERVER_SKIP = {"config", "num_classes", "sites"}


@pytest.mark.parametrize("name", ALGORITHMS)
def test_every_client_half_round_trips_and_the_next_round_matches(name, tmp_path):
    module, config, clients, server, payload = _federation(name)
    fresh = module.Client(_setup("b"), config)
    trained, initial = _flat(clients["b"], CLIENT_SKIP), _flat(fresh, CLIENT_SKIP)
    assert any(k not in trained or not _same(v, trained[k]) for k, v in initial.items())  # training changed

    checkpoint.save_site(tmp_path, "b", 2, clients["b"], job_id=JOB_ID, spec_digest=DIGEST)
    checkpoint.load_site(tmp_path, "b", 2, fresh, job_id=JOB_ID, spec_digest=DIGEST)

    _assert_same_state(clients["b"], fresh, CLIENT_SKIP)
    assert fresh.model is fresh.setup.model  # restored in place: the executor's model is the one restored
    x = _batch(fresh.setup)
    assert torch.equal(clients["b"].scores(x), fresh.scores(x))
    # round 3 from the restored half uploads exactly what the original uploads
    uploads = []
    for client in (clients["b"], fresh):
        client.receive(payload, 3)
        torch.manual_seed(3)
        uploads.append(client.train(3).sums)
    assert uploads[0].keys() == uploads[1].keys()
    assert all(torch.equal(uploads[0][k], uploads[1][k]) for k in uploads[0])


@pytest.mark.parametrize("name", ALGORITHMS)
def test_every_server_half_round_trips_and_the_next_update_matches(name, tmp_path):
    module, config, clients, server, payload = _federation(name)
    recorder = RunRecorder("t", name, {"mode": "none"}, list(SITES), {s: "cnn" for s in SITES})
    arrays = {k: v.numpy() for k, v in payload.items()}
    checkpoint.save_server(tmp_path, round=2, job_id=JOB_ID, spec_digest=DIGEST, payload=arrays,
                           server=server, recorder=recorder, sites=list(SITES), failures=[])  # fmt: skip
    saved = checkpoint.load_server(tmp_path, spec_digest=DIGEST)
    fresh = module.Server(config, 3, saved.sites)
    saved.restore_server(fresh)

    _assert_same_state(server, fresh, SERVER_SKIP)
    assert saved.payload.keys() == arrays.keys()
    assert all(np.array_equal(saved.payload[k], arrays[k]) for k in arrays)
    uploads = {}
    for site, client in clients.items():
        client.receive(payload, 3)
        torch.manual_seed(3)
        uploads[site] = client.train(3).sums
    want, got = _next_payload(server, uploads, 3), _next_payload(fresh, uploads, 3)
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_lazily_built_modules_are_rebuilt_from_their_saved_shapes(tmp_path):
    _, config, clients, _, _ = _federation("fedktl")
    fresh = algorithm_module("fedktl").Client(_setup("a"), config)
    assert fresh.proj is None and clients["a"].proj is not None  # built when the first latents arrived
    checkpoint.save_site(tmp_path, "a", 2, clients["a"], job_id=JOB_ID, spec_digest=DIGEST)
    checkpoint.load_site(tmp_path, "a", 2, fresh, job_id=JOB_ID, spec_digest=DIGEST)
    assert isinstance(fresh.proj, nn.Linear) and torch.equal(fresh.proj.weight, clients["a"].proj.weight)

    tgp = algorithm_module("fedtgp")
    _, config, _, server, _ = _federation("fedtgp", rounds=1)
    recorder = RunRecorder("t", "fedtgp", {"mode": "none"}, list(SITES), {s: "cnn" for s in SITES})
    checkpoint.save_server(tmp_path, round=1, job_id=JOB_ID, spec_digest=DIGEST, payload={},
                           server=server, recorder=recorder, sites=list(SITES), failures=[])  # fmt: skip
    restored = tgp.Server(config, 3, list(SITES))
    assert restored.tgp is None
    checkpoint.load_server(tmp_path, spec_digest=DIGEST).restore_server(restored)
    assert torch.equal(restored.tgp().detach(), server.tgp().detach())


def test_a_site_keeps_two_rounds_without_images_and_names_a_missing_round(tmp_path):
    spec = JobSpec(name="t", modality="cxr", classes=["a", "b", "c"], dataset="cxr", image_size=16,
                   model="cnn", feature_dim=4, algorithm={"name": "ditto"})  # fmt: skip
    setup = tiny_setup(n=48)
    client = algorithm_module("ditto").Client(setup, spec.algorithm.config())
    for rnd in (1, 2, 3):
        client.train(rnd)
        checkpoint.save_site(tmp_path, "site-a", rnd, client, job_id=JOB_ID, spec_digest=DIGEST)
    kept = sorted(p.name for p in (tmp_path / "site-a").iterdir())
    assert kept == ["round-2.pt", "round-3.pt"]  # the last two rounds, no temporary file left
    tensors = [*client.model.state_dict().values(), *client.personal.state_dict().values()]
    weights = sum(t.numel() * t.element_size() for t in tensors)
    size = (tmp_path / "site-a" / "round-3.pt").stat().st_size
    assert weights < size < weights + 20_000  # the two models and a header
    assert setup.data.train.images.numel() * 4 > 20_000  # so the images are not in it
    fresh = algorithm_module("ditto").Client(tiny_setup(n=48), spec.algorithm.config())
    missing = r"site site-a: cannot resume from round 1: .*round-1\.pt is missing"
    with pytest.raises(checkpoint.CheckpointError, match=missing):
        checkpoint.load_site(tmp_path, "site-a", 1, fresh, job_id=JOB_ID, spec_digest=DIGEST)


def test_the_server_checkpoint_carries_its_job_recorder_and_payload(tmp_path):
    assert checkpoint.load_server(tmp_path, spec_digest=DIGEST) is None  # nothing to resume: a fresh start
    recorder = RunRecorder("t", "fedavg", {"mode": "none"}, ["a", "b"], {"a": "cnn", "b": "cnn"})
    recorder.add_training(1, seconds=1.5, bytes_up=800, bytes_down=0, train_loss={"b": 0.8, "a": 0.9})
    recorder.add_evaluation(1, "a", {"acc": 0.5, "auroc": math.nan, "correct": 5, "n": 10},
                            {"acc": 0.6, "auroc": 0.7, "correct": 6, "n": 10})  # fmt: skip
    recorder.add_evaluation(1, "b", {"acc": 0.4, "auroc": 0.5, "correct": 4, "n": 10},
                            {"acc": 0.3, "auroc": 0.2, "correct": 3, "n": 10})  # fmt: skip
    failures = [{"site": "b", "round": 2, "task": "train", "reason": "site b: disk full"}]
    payload = {"w.x": np.arange(6, dtype=np.float32).reshape(2, 3), "ckks": np.arange(5, dtype=np.uint8)}
    server = algorithm_module("fedavg").Server(algorithm_module("fedavg").Config(), 3, ["a", "b"])
    checkpoint.save_server(tmp_path, round=2, job_id=JOB_ID, spec_digest=DIGEST, payload=payload,
                           server=server, recorder=recorder, sites=["a", "b"], failures=failures)  # fmt: skip

    saved = checkpoint.load_server(tmp_path, spec_digest=DIGEST)
    assert (saved.round, saved.job_id, saved.sites, saved.failures) == (2, JOB_ID, ["a", "b"], failures)
    assert {k: (v.dtype, v.tolist()) for k, v in saved.payload.items()} == \
        {k: (v.dtype, v.tolist()) for k, v in payload.items()}  # fmt: skip
    assert saved.recorder.to_json() == recorder.to_json()  # NaN included: it comes back as NaN
    assert saved.recorder.results() == recorder.results()
    longer = spec_digest({**JOB, "training": {"rounds": 4}})
    with pytest.raises(checkpoint.CheckpointError, match="another version of the job spec"):
        checkpoint.load_server(tmp_path, spec_digest=longer)
    other = algorithm_module("ditto").Server(algorithm_module("ditto").Config(), 3, ["a", "b"])
    with pytest.raises(checkpoint.CheckpointError, match=r"holds the server half .*fedavg\.Server, this job"):
        saved.restore_server(other)


@pytest.mark.parametrize(("text", "match"), [
    ("not json", "not JSON"),
    ("[]", "top level: must be dict"),
    ('{"job": "t"}', "missing fields"),
])  # fmt: skip
def test_a_malformed_recorder_is_refused_naming_the_field(text, match):
    with pytest.raises(ValueError, match=match):
        RunRecorder.from_json(text)


def test_a_recorder_field_of_the_wrong_type_is_named():
    state = RunRecorder("t", "fedavg", {"mode": "none"}, ["a"], {"a": "cnn"})
    state.add_training(1, seconds=1.0, bytes_up=1, bytes_down=1, train_loss={"a": 0.5})
    text = state.to_json().replace('"bytes_up": 1', '"bytes_up": "1"')
    with pytest.raises(ValueError, match=r"rounds\[0\].bytes_up: must be int, got str"):
        RunRecorder.from_json(text)


def test_an_attribute_a_checkpoint_cannot_hold_is_named_when_saving(tmp_path):
    client = algorithm_module("fedavg").Client(tiny_setup(), algorithm_module("fedavg").Config())
    client.stream = torch.Generator()
    with pytest.raises(checkpoint.CheckpointError, match=r"cannot checkpoint Client.stream: a Generator"):
        checkpoint.save_site(tmp_path, "a", 1, client, job_id=JOB_ID, spec_digest=DIGEST)
    assert not (tmp_path / "a" / "round-1.pt").exists()


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"job_id": ""}, "job_id: must be a non-empty string"),
    ({"spec_digest": "abc"}, "spec_digest: must be a SHA-256 hex digest"),
    ({"rnd": 0}, "round: must be an int ≥ 1"),
    ({"site": "../b"}, "cannot be a checkpoint folder"),
])  # fmt: skip
def test_a_site_checkpoint_needs_a_valid_binding(kwargs, match, tmp_path):
    client = algorithm_module("local").Client(tiny_setup(), algorithm_module("local").Config())
    args = {"site": "a", "rnd": 1, "job_id": JOB_ID, "spec_digest": DIGEST, **kwargs}
    with pytest.raises(checkpoint.CheckpointError, match=match):
        checkpoint.save_site(tmp_path, args["site"], args["rnd"], client, job_id=args["job_id"],
                             spec_digest=args["spec_digest"])  # fmt: skip
    assert list(tmp_path.iterdir()) == []
