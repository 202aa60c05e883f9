"""The sensitivity claims behind every DP form, checked numerically: remove one record, and the quantity
the Gaussian noise is calibrated for moves by at most the stated bound (:mod:`medsilo.secure.dp`).

* class sums (FedProto/FedTGP release) with a fixed φ: ≤ √2·C;
* one DP-SGD step's clipped gradient sum, real zoo models with FedProto's extra loss: ≤ grad_clip;
* FedAvg's update form, any two datasets of the site: ≤ 2·C;

and why the prototype release needs DP-SGD: with φ trained (non-privately) on the records, removing one
record moves the release beyond √2·C.
"""

from __future__ import annotations

import math

import pytest
import torch

from medsilo.components.algorithms import fedavg, fedproto
from medsilo.components.training import per_record_gradients
from medsilo.secure import dp
from tests.helpers import tiny_setup


def _images(split) -> tuple[torch.Tensor, torch.Tensor]:
    """A split as the model sees it: images ``(N, C, H, W)`` and labels ``(N,)``."""
    return torch.stack([split[i][0] for i in range(len(split))]), split.labels


def _norm(tensors) -> float:
    return math.sqrt(math.fsum(float(t.double().pow(2).sum()) for t in tensors))


def _release_vector(sums: torch.Tensor, counts: torch.Tensor, clip: float) -> torch.Tensor:
    """``[S, C·n]``, the vector whose sensitivity is √2·C."""
    return torch.cat([sums.flatten(), clip * counts]).double()


@pytest.mark.parametrize("backbone", ["cnn", "densenet-lite"])
def test_class_sums_with_a_fixed_model_move_by_at_most_sqrt2_clip(backbone):
    # Prepare: one fixed φ (eval mode), a site's 12 images; C below the feature norms, so every row clips
    setup = tiny_setup(n=12, backbone=backbone)
    model = setup.model.eval()
    x, y = _images(setup.data.train)
    clip = 0.01
    with torch.no_grad():
        features = model.features(x).double()
    assert float(features.norm(dim=1).min()) > clip
    full = _release_vector(
        *dp.gaussian_sum(features, y, 3, clip, 0.5, torch.Generator().manual_seed(1)), clip
    )
    for i in range(12):
        keep = torch.arange(12) != i
        with torch.no_grad():
            rest_features = model.features(x[keep]).double()  # computed without record i
        # Execute: the same noise draws, so the outputs differ by exactly the pre-noise difference
        rest = dp.gaussian_sum(rest_features, y[keep], 3, clip, 0.5, torch.Generator().manual_seed(1))
        moved = float((full - _release_vector(*rest, clip)).norm())
        # Assert
        assert moved <= dp.sum_sensitivity(clip) * (1 + 1e-9)
        assert moved == pytest.approx(math.sqrt(2) * clip, rel=1e-6)  # tight: the record was clipped to C


def test_class_sums_of_a_model_trained_on_the_records_move_beyond_sqrt2_clip():
    # The old claim: φ trained *without* DP on the same records, then "sensitivity √2·C". Removing a
    # record changes φ, so every row moves: the bound fails for every record here.
    clip = 0.01

    def release(keep: torch.Tensor) -> torch.Tensor:
        setup = tiny_setup(n=12, local_epochs=5, lr=0.5)
        train = setup.data.train
        setup.data.train = type(train)(train.images[keep], train.labels[keep], train.augment)
        client = fedproto.Client(setup, fedproto.Config())
        client.train(1)
        features, labels = client.train_features()
        sums, counts = dp.gaussian_sum(
            features.double(), labels, 3, clip, 0.5, torch.Generator().manual_seed(1)
        )
        return _release_vector(sums, counts, clip)

    full = release(torch.arange(12) >= 0)
    moved = [float((full - release(torch.arange(12) != i)).norm()) for i in range(12)]
    assert min(moved) > dp.sum_sensitivity(clip)
    assert max(moved) > 2 * dp.sum_sensitivity(clip)


@pytest.mark.parametrize("backbone", ["cnn", "resnet10-lite", "densenet-lite"])
def test_dp_sgd_clipped_gradient_sum_moves_by_at_most_grad_clip(backbone):
    # Prepare: a zoo model and FedProto's per-record extra loss (λ·MSE to global prototypes, clipped space)
    client = fedproto.Client(tiny_setup(n=8, backbone=backbone), fedproto.Config(lam=10.0))
    client.receive({"proto_sum": torch.randn(3, 4, generator=torch.Generator().manual_seed(0)),
                    "proto_count": torch.ones(3)}, 2)  # fmt: skip
    client.clip = 0.5
    extra = client.prototype_loss()
    x, y = _images(client.setup.data.train)
    grad_clip = 1e-3
    grads, _ = per_record_gradients(client.model, x, y, extra_loss=extra)
    assert all(_norm(g[i] for g in grads.values()) > grad_clip for i in range(8))
    full = dp.gaussian_gradient(dp.clipped_gradient_sum(grads, grad_clip), grad_clip, 2.0,
                                torch.Generator().manual_seed(3))  # fmt: skip
    for i in range(8):
        keep = torch.arange(8) != i
        # Execute: gradients recomputed without record i (no other record's gradient may change)
        rest_grads, _ = per_record_gradients(client.model, x[keep], y[keep], extra_loss=extra)
        rest = dp.gaussian_gradient(dp.clipped_gradient_sum(rest_grads, grad_clip), grad_clip, 2.0,
                                    torch.Generator().manual_seed(3))  # fmt: skip
        moved = _norm(full[k] - rest[k] for k in full)
        # Assert
        assert moved <= dp.gradient_sensitivity(grad_clip) * (1 + 1e-6)
        assert moved == pytest.approx(grad_clip, rel=1e-4)


def test_fedavg_update_form_moves_by_at_most_two_clip_between_any_two_datasets():
    # Prepare: two unrelated datasets of one site (different images and label sets), one global start
    clip = 1e-2
    datasets = [dict(seed=1), dict(seed=2, labels=[0]), dict(seed=3, n=4, labels=[1, 2])]
    uploads = []
    for kwargs in datasets:
        client = fedavg.Client(tiny_setup(**{"n": 12, **kwargs}), fedavg.Config())
        release = dp.DPRelease(clip=clip, noise_multiplier=1e-3, generator=torch.Generator().manual_seed(5))
        # Execute: the real private upload, with the same noise draws for every dataset
        uploads.append(client.train_private(1, release).sums)
    # Assert: any two uploads differ by at most 2·C (and n is the constant 1)
    for a in range(3):
        for b in range(a + 1, 3):
            moved = _norm(uploads[a][k] - uploads[b][k] for k in uploads[a] if k.startswith("w."))
            assert moved <= dp.update_sensitivity(clip) * (1 + 1e-4)
            assert moved > 0.1 * clip
            assert float(uploads[a]["n"]) == float(uploads[b]["n"]) == 1.0
