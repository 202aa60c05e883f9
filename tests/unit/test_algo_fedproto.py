"""FedProto: fixed-shape prototype sums, the linear server mean by hand, the prototype loss and the
nearest-prototype classifier; a round across two different backbones."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from medsilo.components.algorithms import fedproto
from medsilo.tests.helpers import aggregate, tiny_setup


def _inputs(split) -> torch.Tensor:
    """Every image of a split as the model sees it (normalised), ``(N, C, H, W)``."""
    return torch.stack([split[i][0] for i in range(len(split))])


def _features_seen_in_training(client: fedproto.Client, rnd: int, epochs: int):
    """Run ``client.train(rnd)`` while recording every feature batch; return (upload, features, labels)."""
    seen = []
    hook = client.model.base.register_forward_hook(
        lambda module, inputs, out: seen.append(out.detach().clone())
    )
    try:
        up = client.train(rnd)
    finally:
        hook.remove()
    loader = client.train_loader(rnd)  # same seeded order as the training loop
    labels = torch.cat([y for _ in range(epochs) for _, y in loader])
    return up, torch.cat(seen), labels


def test_class_sums_and_both_weightings_by_hand():
    # Prepare: class 0 twice, class 2 once, class 1 absent
    features = torch.tensor([[1.0, 2.0], [3.0, 4.0], [10.0, -2.0]])
    labels = torch.tensor([0, 0, 2])
    # Execute
    sums, counts = fedproto.class_sums(features, labels, 3)
    sites = fedproto.prototype_upload(sums, counts, "sites")
    samples = fedproto.prototype_upload(sums, counts, "samples")
    # Assert
    torch.testing.assert_close(sums, torch.tensor([[4.0, 6.0], [0.0, 0.0], [10.0, -2.0]]))
    torch.testing.assert_close(counts, torch.tensor([2.0, 0.0, 1.0]))
    torch.testing.assert_close(sites["proto_sum"], torch.tensor([[2.0, 3.0], [0.0, 0.0], [10.0, -2.0]]))
    torch.testing.assert_close(sites["proto_count"], torch.tensor([1.0, 0.0, 1.0]))
    torch.testing.assert_close(samples["proto_sum"], sums)
    torch.testing.assert_close(samples["proto_count"], counts)
    for up in (sites, samples):
        assert up["proto_sum"].dtype == torch.float32 and up["proto_count"].dtype == torch.float32


def test_upload_is_the_mean_of_every_feature_seen_during_training():
    # Prepare: 2 local epochs, so every image is seen twice (from a moving model)
    client = fedproto.Client(tiny_setup(n=8, local_epochs=2), fedproto.Config(weighting="samples"))
    # Execute
    up, features, labels = _features_seen_in_training(client, 1, epochs=2)
    # Assert: sums and counts over both epochs, collected during training (no extra pass)
    assert features.shape == (16, 4) and len(labels) == 16
    assert set(up.sums) == {"proto_sum", "proto_count"}
    expected = torch.stack([features[labels == k].sum(0) for k in range(3)])
    torch.testing.assert_close(up.sums["proto_sum"], expected)
    torch.testing.assert_close(
        up.sums["proto_count"], torch.tensor([6.0, 6.0, 4.0])
    )  # labels 0,1,2,0,1,2,0,1
    assert up.train_loss > 0


def test_sites_weighting_uploads_the_site_means_and_presence():
    client = fedproto.Client(tiny_setup(n=8), fedproto.Config())
    up, features, labels = _features_seen_in_training(client, 1, epochs=1)
    expected = torch.stack([features[labels == k].mean(0) for k in range(3)])
    torch.testing.assert_close(up.sums["proto_sum"], expected)
    torch.testing.assert_close(up.sums["proto_count"], torch.ones(3))


@pytest.mark.parametrize("weighting", ["sites", "samples"])
def test_a_site_without_a_class_uploads_a_zero_row_and_count_zero(weighting):
    client = fedproto.Client(tiny_setup(n=8, labels=[0, 2]), fedproto.Config(weighting=weighting))
    up = client.train(1)
    assert up.sums["proto_sum"].shape == (3, 4) and up.sums["proto_count"].shape == (3,)
    assert torch.isfinite(up.sums["proto_sum"]).all()
    assert torch.equal(up.sums["proto_sum"][1], torch.zeros(4))
    assert float(up.sums["proto_count"][1]) == 0.0
    assert (up.sums["proto_count"][[0, 2]] > 0).all()
    assert up.sums["proto_sum"][[0, 2]].abs().sum() > 0


@pytest.mark.parametrize(
    ("weighting", "expected_class0"),
    [("sites", [2.0, 2.0]), ("samples", [1.5, 1.5])],  # (a + b) / 2 vs (3a + 1b) / 4
)
def test_server_sum_then_site_division_gives_the_unweighted_or_weighted_mean(weighting, expected_class0):
    # Prepare: site a has class 0 three times at [1, 1] and class 1 once at [2, 0]; site b class 0 once at [3, 3]
    a = fedproto.prototype_upload(*fedproto.class_sums(
        torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [2.0, 0.0]]), torch.tensor([0, 0, 0, 1]), 3), weighting)  # fmt: skip
    b = fedproto.prototype_upload(
        *fedproto.class_sums(torch.tensor([[3.0, 3.0]]), torch.tensor([0]), 3), weighting
    )
    client = fedproto.Client(tiny_setup(num_classes=3, feature_dim=2), fedproto.Config(weighting=weighting))
    # Execute
    payload = fedproto.Server(fedproto.Config(weighting=weighting), 3, ["a", "b"]).update(
        aggregate([a, b]), 1
    )
    client.receive(payload, 2)
    # Assert: linear server; class 1 only from site a; class 2 from nobody (no prototype, no NaN)
    assert set(payload) == {"proto_sum", "proto_count"}
    torch.testing.assert_close(client.global_protos[0], torch.tensor(expected_class0))
    torch.testing.assert_close(client.global_protos[1], torch.tensor([2.0, 0.0]))
    torch.testing.assert_close(client.global_protos[2], torch.zeros(2))
    assert client.has_proto.tolist() == [True, True, False]


def test_mean_prototypes_tolerates_ckks_noise_around_a_zero_count():
    protos, present = fedproto.mean_prototypes(
        torch.tensor([[4.0, 2.0], [1e-7, -1e-7]]), torch.tensor([2.0, 3e-7])
    )
    torch.testing.assert_close(protos, torch.tensor([[2.0, 1.0], [0.0, 0.0]]))
    assert present.tolist() == [True, False]


def test_prototype_mse_by_hand_and_classes_without_a_prototype_add_zero():
    # Prepare: prototypes for classes 0 and 1 only
    features = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], requires_grad=True)
    labels = torch.tensor([0, 1, 2])
    protos = torch.tensor([[0.0, 0.0], [3.0, 2.0], [0.0, 0.0]])
    present = torch.tensor([True, True, False])
    # Execute
    loss = fedproto.prototype_mse(features, labels, protos, present)
    loss.backward()
    # Assert: (1 + 4 + 0 + 4 + 0 + 0) / (3 · 2); gradient 2 (z − P) / 6 pulls z to P, nothing on row 2
    assert float(loss.detach()) == pytest.approx(1.5)
    torch.testing.assert_close(features.grad, torch.tensor([[1.0, 2.0], [0.0, 2.0], [0.0, 0.0]]) / 3)


def test_prototype_loss_is_zero_before_round_one_and_lambda_mse_after():
    client = fedproto.Client(tiny_setup(num_classes=3, feature_dim=2), fedproto.Config(lam=10.0))
    features, labels = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([0, 1])
    assert float(client.prototype_loss()(features, None, labels)) == 0.0
    client.receive({"proto_sum": torch.tensor([[0.0, 0.0], [3.0, 2.0], [0.0, 0.0]]),
                    "proto_count": torch.tensor([1.0, 1.0, 0.0])}, 2)  # fmt: skip
    assert float(client.prototype_loss()(features, None, labels)) == pytest.approx(10 * (1 + 4 + 0 + 4) / 4)


def test_training_pulls_features_toward_the_global_prototypes():
    # Prepare: two identical sites, both told that every prototype is the all-ones vector; only λ differs
    payload = {"proto_sum": torch.ones(3, 4), "proto_count": torch.ones(3)}
    clients = {}
    for lam in (0.0, 10.0):
        clients[lam] = fedproto.Client(tiny_setup(n=12, local_epochs=2), fedproto.Config(lam=lam))
        clients[lam].receive(payload, 2)
    x = _inputs(clients[0.0].setup.data.train)

    def distance(client: fedproto.Client) -> float:  # in train mode, the BatchNorm the loss sees
        client.model.train()
        with torch.no_grad():
            return float((client.model.features(x) - 1).pow(2).mean())

    before = distance(clients[0.0])
    # Execute
    for client in clients.values():
        client.train(2)
    # Assert: with the MSE term the features end much closer to their prototype
    assert distance(clients[10.0]) < 0.5 * before
    assert distance(clients[10.0]) < 0.25 * distance(clients[0.0])


def test_nearest_prototype_scores_by_hand():
    # Prepare: prototypes at [0, 0] and [2, 0]; class 2 has none (and would be nearest)
    protos = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.5, 0.0]])
    present = torch.tensor([True, True, False])
    features = torch.tensor([[0.5, 0.0], [1.0, 0.0], [1.9, 0.0]])
    # Execute
    p = fedproto.nearest_prototype_scores(features, protos, present)
    # Assert: MSE distances [0.125, 1.125] → softmax(−D); a tie at [1, 0]; class 2 exactly 0
    first = 1 / (1 + math.exp(-1.0))
    torch.testing.assert_close(p[0], torch.tensor([first, 1 - first, 0.0]))
    torch.testing.assert_close(p[1], torch.tensor([0.5, 0.5, 0.0]))
    torch.testing.assert_close(p.sum(1), torch.ones(3))
    assert p[:, 2].eq(0).all() and int(p[2].argmax()) == 1


def test_scores_use_the_own_head_before_any_prototype_then_the_nearest_prototype():
    client = fedproto.Client(tiny_setup(n=8), fedproto.Config())
    x = _inputs(client.setup.data.test)
    client.receive(None, 1)
    with torch.no_grad():
        client.model.eval()
        z = client.model.features(x)
        head = torch.softmax(client.model.head(z), dim=1)
    torch.testing.assert_close(client.scores(x), head)
    protos = torch.stack([z[0], z[1], z[2]])  # test images 0, 1, 2 are the prototypes themselves
    client.receive({"proto_sum": protos * 2, "proto_count": torch.full((3,), 2.0)}, 2)
    p = client.scores(x)
    assert p.shape == (6, 3)
    torch.testing.assert_close(p.sum(1), torch.ones(6))
    assert p[:3].argmax(1).tolist() == [0, 1, 2]
    torch.testing.assert_close(
        p, fedproto.nearest_prototype_scores(z, protos, torch.ones(3, dtype=torch.bool))
    )


def test_two_backbone_round_trains_aggregates_and_scores():
    # Prepare: a cnn site with every class, a resnet18 site that never saw class 1
    a = fedproto.Client(tiny_setup("a", n=6, seed=1, backbone="cnn"), fedproto.Config())
    b = fedproto.Client(tiny_setup("b", n=4, seed=2, backbone="resnet18", labels=[0, 2]), fedproto.Config())
    server = fedproto.Server(fedproto.Config(), 3, ["a", "b"])
    # Execute
    ua, ub = a.train(1), b.train(1)
    payload = server.update(aggregate([ua.sums, ub.sums]), 1)
    for client in (a, b):
        client.receive(payload, 2)
    # Assert: class 1 only from site a (count 1); both sites classify by the same prototypes
    torch.testing.assert_close(payload["proto_count"], torch.tensor([2.0, 1.0, 2.0]))
    torch.testing.assert_close(a.global_protos[1], ua.sums["proto_sum"][1])
    torch.testing.assert_close(b.global_protos, a.global_protos)
    for client in (a, b):
        p = client.scores(_inputs(client.setup.data.test))
        assert p.shape == (6, 3) and torch.isfinite(p).all()
        torch.testing.assert_close(p.sum(1), torch.ones(6))
    assert math.isfinite(b.train(2).train_loss)


def test_config_defaults_and_bad_values_are_refused():
    assert fedproto.Config().lam == 10.0 and fedproto.Config().weighting == "sites"
    with pytest.raises(ValidationError, match="lam"):
        fedproto.Config(lam=-1.0)
    with pytest.raises(ValidationError, match="weighting"):
        fedproto.Config(weighting="clients")


def _dp(sigma: float, clip: float, seed: int = 0):
    from medsilo.components.algorithms.base import DPRelease

    return DPRelease(clip=clip, noise_multiplier=sigma, generator=torch.Generator().manual_seed(seed))


def test_private_upload_is_the_noised_class_sum_of_clipped_eval_features():
    from medsilo.secure.dp import clip_rows

    client = fedproto.Client(tiny_setup(n=12, num_classes=3), fedproto.Config())
    up = client.train_private(1, _dp(sigma=1e-6, clip=0.15))
    features, labels = client.train_features()  # the trained model, eval mode, each image once
    sums, counts = fedproto.class_sums(clip_rows(features, 0.15), labels, 3)
    torch.testing.assert_close(up.sums["proto_sum"], sums, atol=1e-4, rtol=0)
    torch.testing.assert_close(up.sums["proto_count"], counts, atol=1e-4, rtol=0)
    assert float(features.norm(dim=1).max()) > 0.15  # the bound really clipped something
    # with real noise the release differs, by about σ·√2·C per entry
    noisy = fedproto.Client(tiny_setup(n=12, num_classes=3), fedproto.Config()).train_private(1, _dp(4.0, 0.15))
    spread = float((noisy.sums["proto_sum"] - sums).std())
    assert 4.0 * math.sqrt(2) * 0.15 / 3 < spread < 4.0 * math.sqrt(2) * 0.15 * 3


def test_under_dp_prototypes_are_compared_with_clipped_features():
    from medsilo.secure.dp import clip_rows

    client = fedproto.Client(tiny_setup(n=12, num_classes=3), fedproto.Config())
    client.train_private(1, _dp(sigma=1e-6, clip=0.15))
    protos = torch.tensor([[0.1, 0.0], [0.0, 0.1], [-0.1, 0.0]]).repeat(1, 4)[:, : client.model.head.in_features]
    client.receive({"proto_sum": protos, "proto_count": torch.ones(3)}, 2)
    x = _inputs(client.setup.data.test)
    with torch.no_grad():
        client.model.eval()
        z = client.model.features(x)
    present = torch.ones(3, dtype=torch.bool)
    torch.testing.assert_close(client.scores(x), fedproto.nearest_prototype_scores(clip_rows(z, 0.15), protos, present))
