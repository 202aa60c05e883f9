"""FedProto: fixed-shape prototype sums, the linear server mean by hand, the prototype loss and the
nearest-prototype classifier; a round across two different backbones."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from medsilo.components.algorithms import fedproto
from medsilo.config.job import DPSpec
from medsilo.medical.data import ImageSet
from medsilo.secure.dp import DPError, DPRelease, GaussianEvent, clip_rows
from tests.helpers import aggregate, tiny_setup


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


def _dp(sigma: float, clip: float, seed: int = 0, *, sgd_sigma: float = 1e-6, grad_clip: float = 1.0):
    return DPRelease(clip=clip, noise_multiplier=sigma, generator=torch.Generator().manual_seed(seed),
                     grad_clip=grad_clip, sgd_noise_multiplier=sgd_sigma)  # fmt: skip


def test_private_upload_is_the_noised_class_sum_of_clipped_eval_features():
    client = fedproto.Client(tiny_setup(n=12, num_classes=3), fedproto.Config())
    up = client.train_private(1, _dp(sigma=1e-6, clip=0.08))
    features, labels = client.train_features()  # the trained model, eval mode, each image once
    sums, counts = fedproto.class_sums(clip_rows(features, 0.08), labels, 3)
    torch.testing.assert_close(up.sums["proto_sum"], sums, atol=1e-4, rtol=0)
    torch.testing.assert_close(up.sums["proto_count"], counts, atol=1e-4, rtol=0)
    assert float(features.norm(dim=1).max()) > 0.08  # the bound really clipped something
    # with real release noise (same DP-SGD draws, so the same trained model) the release differs by σ·√2·C
    noisy_client = fedproto.Client(tiny_setup(n=12, num_classes=3), fedproto.Config())
    noisy = noisy_client.train_private(1, _dp(4.0, 0.08))
    spread = float((noisy.sums["proto_sum"] - sums).std())
    assert 4.0 * math.sqrt(2) * 0.08 / 3 < spread < 4.0 * math.sqrt(2) * 0.08 * 3


def test_private_training_refuses_a_release_without_dp_sgd_settings_and_changes_nothing():
    client = fedproto.Client(tiny_setup(n=12), fedproto.Config())
    before = {k: v.clone() for k, v in client.model.state_dict().items()}
    release_only = DPRelease(clip=1.0, noise_multiplier=1.0, generator=torch.Generator().manual_seed(0))
    with pytest.raises(DPError, match="trains with DP-SGD, but its DP settings carry no grad_clip"):
        client.train_private(1, release_only)
    for k, v in client.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert client.clip is None


class _Recording(ImageSet):
    """The training split, recording which records DP-SGD reads."""

    def __init__(self, split: ImageSet):
        super().__init__(split.images, split.labels, split.augment)
        self.read: list[int] = []

    def __getitem__(self, index: int):
        self.read.append(int(index))
        return super().__getitem__(index)


def test_dp_events_describe_what_train_private_does_steps_and_sampling_rate():
    # Prepare: N = 12, B = 4, 25 local epochs -> T = 75 steps at q = 1/3
    client = fedproto.Client(tiny_setup(n=12, batch_size=4, local_epochs=25, lr=1e-3), fedproto.Config())
    client.setup.data.train = _Recording(client.setup.data.train)
    batches: list[list[int]] = []
    make_optimizer = client.optimizer

    def recording_optimizer(params, rnd=None):
        opt = make_optimizer(params, rnd)
        step = opt.step

        def counted_step(*args, **kwargs):
            read = client.setup.data.train.read
            batches.append(read[sum(map(len, batches)) :])
            return step(*args, **kwargs)

        opt.step = counted_step
        return opt

    client.optimizer = recording_optimizer
    spec = DPSpec(noise_multiplier=3.0, clip=1.0, grad_clip=0.5, sgd_noise_multiplier=2.0)
    # Execute
    sgd_event, release_event = client.dp_events(spec)
    client.train_private(1, DPRelease.from_spec(spec, torch.Generator().manual_seed(0)))
    # Assert: the declared events, and training took exactly T Poisson-sampled steps at rate q
    assert sgd_event == GaussianEvent(noise_multiplier=2.0, steps=75, sampling_rate=4 / 12)
    assert release_event == GaussianEvent(noise_multiplier=3.0)
    assert len(batches) == sgd_event.steps
    assert all(len(set(b)) == len(b) for b in batches)  # a record at most once per step
    sizes = [len(b) for b in batches]
    expected, std = 75 * 12 / 3, math.sqrt(75 * 12 * (1 / 3) * (2 / 3))
    assert abs(sum(sizes) - expected) < 4 * std  # q = 1/3: 300 ± 14 reads
    assert len(set(sizes)) > 3 and min(sizes) < 4 < max(sizes)  # Poisson batches, not fixed-size ones


def test_dp_sgd_noise_std_is_sgd_sigma_times_grad_clip_over_the_expected_batch():
    # Prepare: N = B = 4 -> q = 1, one step; a tiny grad_clip so the update is (almost) all noise
    client = fedproto.Client(tiny_setup(n=4, batch_size=4, lr=1.0), fedproto.Config())
    start = torch.cat([p.detach().flatten().clone() for p in client.model.parameters()])
    spec = DPSpec(noise_multiplier=1.0, clip=1.0, grad_clip=1e-3, sgd_noise_multiplier=2.0)
    assert client.dp_events(spec)[0] == GaussianEvent(2.0, steps=1, sampling_rate=1.0)
    # Execute
    client.train_private(1, DPRelease.from_spec(spec, torch.Generator().manual_seed(0)))
    # Assert: SGD with lr 1 moved each coordinate by (clipped sum + N(0, (σ·G)²)) / 4
    moved = torch.cat([p.detach().flatten() for p in client.model.parameters()]) - start
    assert moved.numel() > 50_000
    assert float(moved.std()) == pytest.approx(2.0 * 1e-3 / 4, rel=0.03)


@pytest.mark.parametrize("backbone", ["cnn", "resnet10-lite"])
def test_private_training_keeps_batchnorm_statistics_and_trains_the_weights(backbone):
    client = fedproto.Client(tiny_setup(n=12, backbone=backbone), fedproto.Config())
    stats = {k: v.clone() for k, v in client.model.state_dict().items() if "running" in k or "num_batches" in k}  # fmt: skip
    weights = {k: p.detach().clone() for k, p in client.model.named_parameters()}
    assert stats
    for rnd in (1, 2):
        up = client.train_private(rnd, _dp(sigma=1.0, clip=1.0, seed=rnd, sgd_sigma=1.0))
        client.receive(up.sums, rnd + 1)  # round 2 trains with the prototype loss
    buffers = client.model.state_dict()
    for k, v in stats.items():
        assert torch.equal(buffers[k], v), k
    assert all(not torch.equal(p.detach(), weights[k]) for k, p in client.model.named_parameters())


def test_prototype_loss_reaches_the_features_under_dp():
    # Under DP the loss compares clipped features; its gradient must still flow into the features.
    client = fedproto.Client(tiny_setup(num_classes=3, feature_dim=2), fedproto.Config(lam=1.0))
    client.clip = 1.0
    client.receive({"proto_sum": torch.tensor([[0.0, 0.5], [0.5, 0.0], [0.0, 0.0]]),
                    "proto_count": torch.tensor([1.0, 1.0, 0.0])}, 2)  # fmt: skip
    features = torch.tensor([[3.0, 4.0], [0.3, 0.4]], requires_grad=True)
    client.prototype_loss()(features, None, torch.tensor([0, 1])).backward()
    assert features.grad is not None and float(features.grad.abs().sum()) > 0
    # the clipped row [0.6, 0.8] is compared with [0, 0.5]; the short row [0.3, 0.4] as it is with [0.5, 0]
    clipped = fedproto.clip_features(features.detach(), 1.0)
    torch.testing.assert_close(clipped, torch.tensor([[0.6, 0.8], [0.3, 0.4]]))


def test_under_dp_prototypes_are_compared_with_clipped_features():
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


def test_rms_normalize_puts_every_row_at_norm_sqrt_d_and_keeps_zero_rows():
    z = torch.tensor([[3.0, 4.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0]])
    out = fedproto.rms_normalize(z)
    torch.testing.assert_close(out.norm(dim=1), torch.tensor([2.0, 0.0, 2.0]))  # √4
    torch.testing.assert_close(out[0], torch.tensor([1.2, 1.6, 0.0, 0.0]))


def test_normalize_makes_a_site_with_large_features_count_no_more_than_a_site_with_small_ones():
    # Prepare: two sites with the same data and initial model, but site b's features are 50× larger
    # (a backbone with another scale); both hold every class
    def site(name: str, scale: float, normalize: bool) -> fedproto.Client:
        client = fedproto.Client(tiny_setup(name, n=6, seed=1), fedproto.Config(normalize=normalize))
        client.model.base.register_forward_hook(lambda module, inputs, out: out * scale)
        return client

    for normalize in (False, True):
        a, b = site("a", 1.0, normalize), site("b", 50.0, normalize)
        ua, ub = a.train(1), b.train(1)
        norm_a = ua.sums["proto_sum"].norm(dim=1)
        norm_b = ub.sums["proto_sum"].norm(dim=1)
        # Assert: raw, b's prototypes are ~50× longer and would dominate the mean; normalised, both sites'
        # prototypes are means of rows of norm √d = 2 (so at most 2), on one scale
        if normalize:
            assert (norm_a <= 2.0 + 1e-5).all() and (norm_b <= 2.0 + 1e-5).all()
            assert (norm_b / norm_a).max() < 2.0
        else:
            assert (norm_b / norm_a).min() > 10.0


def test_normalized_scores_ignore_the_feature_scale():
    client = fedproto.Client(tiny_setup(n=6), fedproto.Config(normalize=True))
    client.receive({"proto_sum": fedproto.rms_normalize(torch.randn(3, 4)), "proto_count": torch.ones(3)}, 1)
    x = _inputs(client.setup.data.test)
    before = client.scores(x)
    client.model.base.register_forward_hook(lambda module, inputs, out: out * 30.0)
    torch.testing.assert_close(client.scores(x), before)
