"""A planted file where a checkpoint is expected never runs code, and no foreign checkpoint is restored.

The threat (issue 14 item 2): whoever can make something write a file into a site's workspace (a job
author's component, say) plants it where the site looks for its resume checkpoint. Unpickling it would run
code as the site's user. Every refusal below must name the file and leave the client half as it was.
"""

from __future__ import annotations

import io
import os
import pickle
import pickletools
import shlex
import struct
import zipfile
from pathlib import Path

import pytest
import torch

from medsilo.components import checkpoint
from medsilo.components.algorithms import algorithm_module
from medsilo.components.results import RunRecorder
from medsilo.config.job import spec_digest
from tests.helpers import tiny_setup

JOB_ID = "job-1"
DIGEST = spec_digest({"name": "t"})


class Planted:
    """Unpickling this runs ``touch <marker>`` through ``os.system``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def _ditto(site: str = "a"):
    """A freshly built ditto client half (two models: ``model`` then ``personal``)."""
    ditto = algorithm_module("ditto")
    return ditto.Client(tiny_setup(site, seed=1), ditto.Config())


def _trained(tmp_path: Path):
    """Site ``a``'s ditto half after rounds 1 and 2, its round-2 checkpoint written."""
    client = _ditto()
    for rnd in (1, 2):
        torch.manual_seed(rnd)
        client.train(rnd)
    checkpoint.save_site(tmp_path, "a", 2, client, job_id=JOB_ID, spec_digest=DIGEST)
    return client


def _snapshot(client) -> dict[str, torch.Tensor]:
    """Copies of both models' state dicts."""
    state = {f"model.{k}": v.clone() for k, v in client.model.state_dict().items()}
    return state | {f"personal.{k}": v.clone() for k, v in client.personal.state_dict().items()}


def _unchanged(client, before: dict[str, torch.Tensor]) -> bool:
    """True when ``client``'s models still hold exactly ``before``."""
    after = _snapshot(client)
    return after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_the_planted_payload_is_live(tmp_path):
    marker = tmp_path / "owned"
    pickle.loads(pickle.dumps(Planted(marker)))  # plain unpickling runs it: the tests below test something
    assert marker.exists()


@pytest.mark.parametrize(("name", "match"), [
    ("round-1.pkl", r"round-1\.pkl: a pickle checkpoint .*pickles are never loaded"),
    ("round-1.pt", r"round-1\.pt: not a medsilo checkpoint \(not a torch zip archive"),
])  # fmt: skip
def test_a_pickle_where_a_site_checkpoint_is_expected_is_refused_unopened(name, match, tmp_path):
    marker = tmp_path / "owned"
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / name).write_bytes(pickle.dumps(Planted(marker)))
    client = _ditto()
    before = _snapshot(client)
    with pytest.raises(checkpoint.CheckpointError, match=match):
        checkpoint.load_site(tmp_path, "a", 1, client, job_id=JOB_ID, spec_digest=DIGEST)
    assert not marker.exists()
    assert _unchanged(client, before)


def test_a_pickle_with_a_genuine_archive_appended_is_refused(tmp_path):
    marker = tmp_path / "owned"
    _trained(tmp_path)
    path = tmp_path / "a" / "round-2.pt"
    path.write_bytes(pickle.dumps(Planted(marker)) + path.read_bytes())  # zip readers accept a prefix
    assert zipfile.is_zipfile(path)
    refused = r"round-2\.pt: not a medsilo checkpoint \(not a torch zip archive"
    with pytest.raises(checkpoint.CheckpointError, match=refused):
        checkpoint.load_site(tmp_path, "a", 2, _ditto(), job_id=JOB_ID, spec_digest=DIGEST)
    assert not marker.exists()


@pytest.mark.parametrize("wrapped", [False, True])
def test_a_code_running_object_inside_a_torch_archive_is_refused(wrapped, tmp_path):
    marker = tmp_path / "owned"
    planted = Planted(marker)
    (tmp_path / "a").mkdir()
    path = tmp_path / "a" / "round-1.pt"
    torch.save({"format": checkpoint.FORMAT, "state": planted} if wrapped else planted, path)
    assert zipfile.is_zipfile(path)  # it passes the archive checks; weights_only loading stops it
    client = _ditto()
    before = _snapshot(client)
    refused = r"round-1\.pt: refused: it holds objects other than tensors and plain values \(.*posix.system"
    with pytest.raises(checkpoint.CheckpointError, match=refused):
        checkpoint.load_site(tmp_path, "a", 1, client, job_id=JOB_ID, spec_digest=DIGEST)
    assert not marker.exists()
    assert _unchanged(client, before)


@pytest.mark.parametrize(("as_archive", "match"), [
    (False, r"server\.pt: not a medsilo checkpoint \(not a torch zip archive"),
    (True, r"server\.pt: refused: it holds objects other than tensors and plain values"),
])  # fmt: skip
def test_a_planted_server_checkpoint_is_refused(as_archive, match, tmp_path):
    marker = tmp_path / "owned"
    if as_archive:
        torch.save(Planted(marker), tmp_path / checkpoint.SERVER_FILE)
    else:
        (tmp_path / checkpoint.SERVER_FILE).write_bytes(pickle.dumps(Planted(marker)))
    with pytest.raises(checkpoint.CheckpointError, match=match):
        checkpoint.load_server(tmp_path, spec_digest=DIGEST)
    (tmp_path / checkpoint.SERVER_FILE).unlink()
    (tmp_path / "server.pkl").write_bytes(pickle.dumps(Planted(marker)))  # an earlier version's file
    with pytest.raises(checkpoint.CheckpointError, match=r"server\.pkl: a pickle checkpoint"):
        checkpoint.load_server(tmp_path, spec_digest=DIGEST)
    assert not marker.exists()


def _rewrite(path: Path, change) -> None:
    """Load a genuine checkpoint, let ``change`` edit its record, and write it back (as an attacker could)."""
    record = torch.load(path, weights_only=True)
    change(record)
    torch.save(record, path)


@pytest.mark.parametrize(("change", "load", "match"), [
    (None, {"job_id": "job-2"}, "written by job 'job-1', not job 'job-2'"),
    (None, {"spec_digest": spec_digest({"name": "u"})}, "another version of the job spec"),
    (lambda r: r.update(version=2), {}, "format version 2, this medsilo reads version 1"),
    (lambda r: r.update(party="b"), {}, "written by 'b', not 'a'"),
    (lambda r: r.update(party=torch.tensor([1])), {}, r"written by tensor\(\[1\]\), not 'a'"),
    (lambda r: r.update(round=True), {}, "holds round True, expected 2"),
    (lambda r: r.update(round=1), {}, "holds round 1, expected 2"),
    (lambda r: r.update(kind="server"), {}, "a 'server' checkpoint where a 'site' one is expected"),
    (lambda r: r.update(half="medsilo.components.algorithms.fedavg.Client"), {}, "holds the algorithm half"),
    (lambda r: r["state"].pop("personal"), {}, r"attributes differ \(missing \['personal'\]"),
    (lambda r: r["state"]["personal"]["state"].update({"head.weight": torch.zeros(3, 5)}), {},
     r"Client.personal.head.weight: shape \(3, 5\) in the checkpoint, \(3, 4\) here"),
    (lambda r: r["state"]["personal"]["state"].update({"head.weight": torch.zeros(3, 4).double()}), {},
     "Client.personal.head.weight: dtype torch.float64 in the checkpoint, torch.float32 here"),
    (lambda r: r["state"].update(model={"kind": "tensor", "value": torch.zeros(1)}), {},
     "Client.model: holds a tensor, this object a module"),
])  # fmt: skip
def test_a_checkpoint_of_another_job_or_that_does_not_fit_is_refused_and_restores_nothing(
    change, load, match, tmp_path
):
    _trained(tmp_path)
    path = tmp_path / "a" / "round-2.pt"
    if change is not None:
        _rewrite(path, change)
    client = _ditto()
    before = _snapshot(client)
    args = {"job_id": JOB_ID, "spec_digest": DIGEST} | load
    with pytest.raises(checkpoint.CheckpointError, match=match) as refused:
        checkpoint.load_site(tmp_path, "a", 2, client, **args)
    assert str(path) in str(refused.value)
    assert _unchanged(client, before)  # "model" comes before "personal": it was not restored either


def test_a_checkpoint_copied_to_another_site_or_round_is_refused(tmp_path):
    _trained(tmp_path)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "round-2.pt").write_bytes((tmp_path / "a" / "round-2.pt").read_bytes())
    (tmp_path / "a" / "round-1.pt").write_bytes((tmp_path / "a" / "round-2.pt").read_bytes())
    with pytest.raises(checkpoint.CheckpointError, match=r"b/round-2\.pt: written by 'a', not 'b'"):
        checkpoint.load_site(tmp_path, "b", 2, _ditto("b"), job_id=JOB_ID, spec_digest=DIGEST)
    with pytest.raises(checkpoint.CheckpointError, match=r"a/round-1\.pt: holds round 2, expected 1"):
        checkpoint.load_site(tmp_path, "a", 1, _ditto(), job_id=JOB_ID, spec_digest=DIGEST)


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.999])
def test_a_truncated_checkpoint_is_refused(keep, tmp_path):
    _trained(tmp_path)
    path = tmp_path / "a" / "round-2.pt"
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    client = _ditto()
    before = _snapshot(client)
    with pytest.raises(checkpoint.CheckpointError, match=r"round-2\.pt: not a medsilo checkpoint"):
        checkpoint.load_site(tmp_path, "a", 2, client, job_id=JOB_ID, spec_digest=DIGEST)
    assert _unchanged(client, before)


@pytest.mark.parametrize("member", ["data.pkl", "data/0"])
def test_a_damaged_archive_member_is_refused(member, tmp_path):
    _trained(tmp_path)
    path = tmp_path / "a" / "round-2.pt"
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(f"/{member}"))
    data = bytearray(path.read_bytes())
    header = info.header_offset  # the local file header: 30 bytes, then the name and the extra field
    name_len, extra_len = struct.unpack("<HH", data[header + 26 : header + 30])
    data[header + 30 + name_len + extra_len + 7] ^= 0xFF  # one byte of the member's content
    path.write_bytes(bytes(data))
    client = _ditto()
    before = _snapshot(client)
    damaged = rf"round-2\.pt: corrupt checkpoint: archive member .*{member}' fails its CRC-32 check"
    with pytest.raises(checkpoint.CheckpointError, match=damaged):
        checkpoint.load_site(tmp_path, "a", 2, client, job_id=JOB_ID, spec_digest=DIGEST)
    assert _unchanged(client, before)


def test_a_torch_file_that_is_not_a_checkpoint_is_refused(tmp_path):
    (tmp_path / "a").mkdir()
    torch.save({"weights": torch.zeros(3)}, tmp_path / "a" / "round-2.pt")
    with pytest.raises(checkpoint.CheckpointError, match=r"not a medsilo checkpoint \(fields \['weights'\]"):
        checkpoint.load_site(tmp_path, "a", 2, _ditto(), job_id=JOB_ID, spec_digest=DIGEST)


def test_a_server_state_that_does_not_fit_restores_nothing(tmp_path):
    fedktl = algorithm_module("fedktl")
    config = fedktl.Config(server_epochs=1, latent_dim=8, image_size=8)
    server = fedktl.Server(config, 3, ["a", "b"])
    recorder = RunRecorder("t", "fedktl", {"mode": "none"}, ["a", "b"], {"a": "cnn", "b": "cnn"})
    checkpoint.save_server(tmp_path, round=1, job_id=JOB_ID, spec_digest=DIGEST, payload={}, server=server,
                           recorder=recorder, sites=["a", "b"], failures=[])  # fmt: skip
    wrong = torch.ones(3, 9)  # centroids are (K, L) = (3, 8)
    _rewrite(tmp_path / checkpoint.SERVER_FILE, lambda r: r["state"]["centroids"].update(value=wrong))
    saved = checkpoint.load_server(tmp_path, spec_digest=DIGEST)
    fresh = fedktl.Server(config, 3, ["a", "b"])
    fresh.transformer.mlp[0].weight.data.fill_(0.25)  # differs from the checkpoint: must stay as it is
    before = {k: v.clone() for k, v in fresh.transformer.state_dict().items()}
    with pytest.raises(checkpoint.CheckpointError, match=r"Server.centroids: shape \(3, 9\) in the"):
        saved.restore_server(fresh)
    assert all(torch.equal(v, before[k]) for k, v in fresh.transformer.state_dict().items())
    assert torch.equal(fresh.centroids.detach(), torch.zeros(3, 8))


def test_a_checkpoint_imports_nothing_but_tensor_rebuilders(tmp_path):
    _trained(tmp_path)
    with zipfile.ZipFile(tmp_path / "a" / "round-2.pt") as archive:
        record = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    ops = [(op.name, arg) for op, arg, _ in pickletools.genops(io.BytesIO(record))]
    assert "STACK_GLOBAL" not in {name for name, _ in ops}  # torch writes protocol 2: imports are GLOBALs
    imported = {arg for name, arg in ops if name == "GLOBAL"}
    assert imported <= {"torch._utils _rebuild_tensor_v2", "collections OrderedDict", "torch FloatStorage",
                        "torch LongStorage", "torch BoolStorage"}  # fmt: skip
