"""PCEvolve's encoders load offline and only what they should: the pinned pretrained weights (refused when
altered, never unpickled); a federated model only when the site's own ledger records exporting it, and
never in a DP selection (it was fitted on the images the selection reads)."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

from medsilo.components.algorithms import algorithm_module
from medsilo.components.export import ExportFacts, bundle_encoder, export_model
from medsilo.errors import MedsiloError
from medsilo.medical.models import pretrained
from medsilo.medical.synth.pcevolve.evolve import PCEvolveConfig, encoder, evolve
from medsilo.medical.synth.pcevolve.generators import procedural
from tests.helpers import tiny_setup


def test_pretrained_weights_come_from_the_pinned_wheel_and_name_a_cat_a_cat():
    from skimage import data  # scikit-image ships this photograph (test extra)

    net = pretrained.efficientnet_lite0()
    photo = torch.tensor(data.chelsea()).permute(2, 0, 1)[None].float() / 255
    photo = torch.nn.functional.interpolate(photo, size=(224, 224), mode="bilinear", align_corners=False)
    top = net.logits(photo).topk(3).indices[0].tolist()
    assert set(top) <= set(range(281, 286))  # ImageNet's domestic cats (tabby, tiger, Persian, Siamese, Egyptian)
    feats = net(torch.rand(3, 1, 32, 32))  # a one-channel image is repeated to RGB
    assert feats.shape == (3, 1280) and torch.isfinite(feats).all()


def test_altered_pretrained_weights_are_refused_before_they_are_unpickled(tmp_path, monkeypatch):
    altered = tmp_path / "w.pth"
    raw = bytearray(pretrained.weights_file().read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    altered.write_bytes(bytes(raw))

    def never(*args, **kwargs):
        raise AssertionError("torch.load was reached")

    monkeypatch.setattr(torch, "load", never)
    with pytest.raises(MedsiloError, match=r"w.pth: SHA-256 .* is not the pinned EfficientNet-Lite0 weights"):
        pretrained.load_state(altered)
    with pytest.raises(MedsiloError, match="cannot read the pretrained weights"):
        pretrained.load_state(tmp_path / "missing.pth")


def test_every_offline_encoder_embeds_and_federated_needs_a_model():
    x = torch.rand(4, 1, 16, 16)
    for kind in ("pretrained", "random-cnn", "pixels"):
        z = encoder(kind, 1, seed=0)(x)
        assert z.shape[0] == 4 and torch.isfinite(z).all()
    with pytest.raises(MedsiloError, match="needs an exported model of this site"):
        encoder("federated", 1, seed=0)


def _facts() -> ExportFacts:
    return ExportFacts(site="a", job_id="run-1", spec_digest="d" * 64, job_name="j", algorithm="fedavg",
                       modality="cxr", classes=("0", "1", "2"), image_size=16, round=1, privacy_mode="none",
                       epsilon=None, delta=None, augmentation=[], medsilo_version="0")  # fmt: skip


def test_the_federated_encoder_is_the_sites_own_exported_feature_extractor(tmp_path):
    from medsilo.secure import pki
    from medsilo.secure.ledger import Ledger, entry_hash

    ca = pki.make_local_ca(None)
    ledger = Ledger(tmp_path / "ledger.jsonl", "a", *pki.issue_certificate(*ca, "a", None))
    (tmp_path / "ca.pem").write_text(pki.certificate_pem(ca[1]))
    module = algorithm_module("fedavg")
    client = module.Client(tiny_setup(n=8), module.Config())
    client.train(1)
    export_model(tmp_path / "m", client, client.setup.data, _facts(),
                 lambda what: entry_hash(ledger.append("model_export", job="run-1", round=1, privacy=None, what=what)))
    embed, facts = bundle_encoder(tmp_path / "m", 1, tmp_path / "ledger.jsonl", tmp_path / "ca.pem")
    x = torch.rand(5, 1, 32, 32)  # PCEvolve's image size need not be the model's: resized to its 16
    model = client.model.eval()
    with torch.no_grad():
        want = model.features(torch.nn.functional.interpolate((x - 0.5) / 0.25, size=(16, 16), mode="area"))
    torch.testing.assert_close(embed(x), want, atol=1e-5, rtol=1e-4)
    meta = json.loads((tmp_path / "m" / "configs" / "metadata.json").read_text())["medsilo"]
    assert facts == {"encoder": "federated", "encoder_sha256": meta["model_sha256"], "encoder_job": "run-1",
                     "encoder_algorithm": "fedavg"}  # fmt: skip
    # PCEvolve runs with it
    images, labels = torch.rand(6, 1, 16, 16), torch.tensor([0, 1, 2, 0, 1, 2])
    config = PCEvolveConfig(epsilon=math.inf, iterations=1, candidates=2, per_class=2, picks=1, encoder="federated")
    result = evolve(images, labels, ["normal", "pneumonia", "effusion"], procedural("cxr", ["normal", "pneumonia", "effusion"], 16), config,
                    charge=lambda e, i: None, embed=embed)  # fmt: skip
    assert len(result.synthetic) == 6
    # wrong channel count, or another model in the folder: refused by name
    with pytest.raises(MedsiloError, match="takes 1-channel images, this dataset has 3"):
        bundle_encoder(tmp_path / "m", 3, tmp_path / "ledger.jsonl", tmp_path / "ca.pem")
    other = module.Client(tiny_setup(n=8, model_seed=7), module.Config())
    export_model(tmp_path / "x", other, other.setup.data, _facts(), lambda what: "h" * 64)
    shutil.rmtree(tmp_path / "m")
    shutil.copytree(tmp_path / "x", tmp_path / "m")
    with pytest.raises(MedsiloError, match="no verified model_export entry of site a"):
        bundle_encoder(tmp_path / "m", 1, tmp_path / "ledger.jsonl", tmp_path / "ca.pem")
    assert np.isfinite(result.diversity)


def test_an_encoder_fitted_on_the_sites_images_is_refused_for_a_dp_selection():
    """One private image moves such an encoder's every distance: the votes' sensitivity is no longer 1."""
    from pydantic import ValidationError

    from medsilo.config import JobSpec

    with pytest.raises(ValidationError, match="encoder: federated is fitted on this site's own images"):
        PCEvolveConfig(epsilon=8.0, encoder="federated")
    with pytest.raises(ValidationError, match="augmentation.pcevolve.encoder"):
        JobSpec(name="j", modality="cxr", classes=["normal", "pneumonia"], dataset="cxr", algorithm={"name": "fedavg"},
                augmentation={"pcevolve": {"sites": ["h1"], "epsilon": 8, "encoder": "federated"}})  # fmt: skip
