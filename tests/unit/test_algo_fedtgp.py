"""FedTGP: eval-pass prototype uploads, the clamped distance, the adaptive margin by hand, server TGP
training in both forms, and a round across two different backbones."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from medsilo.components.algorithms import fedproto, fedtgp
from tests.helpers import aggregate, tiny_setup


def _inputs(split) -> torch.Tensor:
    """Every image of a split as the model sees it (normalised), ``(N, C, H, W)``."""
    return torch.stack([split[i][0] for i in range(len(split))])


def _upload(protos: list[list[float]], counts: list[float]) -> dict[str, torch.Tensor]:
    return {"proto_sum": torch.tensor(protos), "proto_count": torch.tensor(counts)}


# Three sites, K = 3, d = 2; in "sites" weighting a row is the site's class mean, the count 0/1.
UPLOADS = {
    "a": _upload([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]], [1.0, 1.0, 0.0]),
    "b": _upload([[3.0, 0.0], [0.0, 0.0], [0.0, 0.0]], [1.0, 0.0, 0.0]),
    "c": _upload([[0.0, 0.0], [0.0, 3.0], [0.0, 0.0]], [0.0, 1.0, 0.0]),
}


@pytest.mark.parametrize("weighting", ["sites", "samples"])
def test_upload_is_an_eval_mode_pass_after_training_with_a_zero_row_for_an_absent_class(weighting):
    # Prepare: a site that never saw class 1
    client = fedtgp.Client(tiny_setup(n=8, labels=[0, 2]), fedtgp.Config(weighting=weighting))
    # Execute
    up = client.train(1)
    # Assert: features of the *trained* model in eval mode over every training image
    train = client.setup.data.train
    client.model.eval()
    with torch.no_grad():
        z = client.model.features(_inputs(train))
    sums = torch.stack([z[train.labels == k].sum(0) for k in range(3)])
    counts = torch.tensor([4.0, 0.0, 4.0])
    if weighting == "sites":
        sums, counts = sums / counts.clamp_min(1)[:, None], (counts > 0).float()
    assert set(up.sums) == {"proto_sum", "proto_count"}
    assert up.sums["proto_sum"].shape == (3, 4) and up.sums["proto_sum"].dtype == torch.float32
    torch.testing.assert_close(up.sums["proto_sum"], sums)
    torch.testing.assert_close(up.sums["proto_count"], counts)
    assert torch.equal(up.sums["proto_sum"][1], torch.zeros(4))


def test_euclidean_distances_by_hand():
    a = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    b = torch.tensor([[3.0, 4.0], [0.0, 0.0], [6.0, 8.0]])
    expected = torch.tensor([[5.0, 0.0, 10.0], [0.0, 5.0, 5.0]])
    torch.testing.assert_close(fedtgp.euclidean_distances(a, b), expected, atol=2e-4, rtol=1e-6)


def test_clamped_distance_stays_finite_where_the_expanded_square_rounds_below_zero():
    # Prepare: float32 rounds ‖a‖² + ‖b‖² − 2ab to −4 here (true value 0.25): the reference's sqrt is NaN
    a, b = torch.tensor([[4097.0]]), torch.tensor([[4097.5]])
    naive = a.pow(2).sum(1, keepdim=True) + b.pow(2).sum(1)[None] - 2 * a @ b.T
    assert float(naive) < 0 and torch.isnan(naive.sqrt()).all()
    # Execute / Assert
    assert torch.isfinite(fedtgp.euclidean_distances(a, b)).all()


def test_gradient_is_finite_when_a_prototype_equals_its_tgp():
    # Prepare: the expanded square is exactly 0, where d sqrt/dx is infinite without ε
    proto = torch.tensor([[1.0, 2.0]])
    tgps = torch.tensor([[1.0, 2.0], [4.0, 6.0]], requires_grad=True)
    naive_tgps = tgps.detach().clone().requires_grad_(True)
    naive = naive_tgps.pow(2).sum(1)[None] + proto.pow(2).sum(1, keepdim=True) - 2 * proto @ naive_tgps.T
    naive.sqrt().sum().backward()
    assert torch.isnan(naive_tgps.grad).any()
    # Execute
    fedtgp.margin_loss(proto, torch.tensor([0]), tgps, margin=1.0).backward()
    # Assert
    assert torch.isfinite(tgps.grad).all()
    assert tgps.grad[1].abs().sum() > 0  # the negative TGP is still pushed away


def test_adaptive_margin_by_hand_with_the_tau_cap():
    # Prepare: centres A = (0, 0), B = (3, 4), C = (0, 10): |AB| = 5, |AC| = 10, |BC| = √45
    centres = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 10.0]])
    # nearest-neighbour gaps: A 5, B 5, C √45 ≈ 6.708; δ = min(max gap, τ)
    assert fedtgp.adaptive_margin(centres, tau=100.0) == pytest.approx(math.sqrt(45))
    assert fedtgp.adaptive_margin(centres, tau=6.0) == 6.0
    assert fedtgp.adaptive_margin(centres[:2], tau=100.0) == pytest.approx(5.0)
    assert fedtgp.adaptive_margin(centres[:1], tau=100.0) == 0.0  # no neighbour anywhere: no gap


def test_margin_loss_by_hand():
    # Prototype at the origin, class 0; TGPs at the origin and at (3, 4); δ = 1
    loss = fedtgp.margin_loss(
        torch.zeros(1, 2), torch.tensor([0]), torch.tensor([[0.0, 0.0], [3.0, 4.0]]), 1.0
    )
    # CE(−[0 + 1, 5], 0) = log(1 + e^{1 − 5}), up to √ε = 1e-4 in the distances
    assert float(loss) == pytest.approx(math.log(1 + math.exp(-4)), abs=1e-3)


def test_server_training_lowers_the_loss_and_separates_the_classes():
    # Prepare
    server = fedtgp.Server(fedtgp.Config(server_lr=0.1), 3, list(UPLOADS))  # 100 epochs of 4 pairs
    # Execute
    payload = server.update_from_sites(UPLOADS, 1)
    # Assert: class centres (2, 0) and (0, 2) → δ = √8; class 2 (no site) still gets a TGP
    assert server.margin == pytest.approx(math.sqrt(8))
    assert len(server.losses) == 100 and server.losses[-1] < 0.5 * server.losses[0]
    tgps = payload["global_protos"]
    assert tgps.shape == (3, 2) and tgps.dtype == torch.float32 and torch.isfinite(tgps).all()
    pairs = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 1.0], [0.0, 3.0]])
    nearest = fedtgp.euclidean_distances(pairs, tgps).argmin(1)
    assert nearest.tolist() == [0, 0, 1, 1]


def _manual(pairs: torch.Tensor, labels: torch.Tensor, margin: float, epochs: int, rnd: int) -> torch.Tensor:
    """Independent replay of one server round: fresh seed-0 TGP net, seeded batch order, TGPs out."""
    tgp = fedtgp.build_tgp(3, 2, 2, seed=0)
    g = torch.Generator().manual_seed(rnd)  # server_seed 0 · 100003 + rnd
    fedtgp.train_tgp(tgp, pairs, labels, margin, epochs=epochs, lr=0.01, batch_size=10, generator=g)
    with torch.no_grad():
        return tgp()


def test_published_form_trains_on_every_site_prototype_and_aggregate_on_class_means():
    # Prepare
    published = fedtgp.Server(fedtgp.Config(server_epochs=3), 3, list(UPLOADS))
    summed = fedtgp.Server(fedtgp.Config(server_epochs=3, form="aggregate"), 3, list(UPLOADS))
    # Execute
    per_site = published.update_from_sites(UPLOADS, 1)["global_protos"]
    from_sums = summed.update(aggregate(list(UPLOADS.values())), 1)["global_protos"]
    # Assert: published = four (site, class) pairs in site order; aggregate = one pair per class
    assert published.form == "per-site" and summed.form == "sums"
    assert fedtgp.Server.needs_plaintext_aggregate
    four = torch.tensor([[1.0, 0.0], [0.0, 1.0], [3.0, 0.0], [0.0, 3.0]])
    torch.testing.assert_close(per_site, _manual(four, torch.tensor([0, 1, 0, 1]), math.sqrt(8), 3, 1))
    two = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    torch.testing.assert_close(from_sums, _manual(two, torch.tensor([0, 1]), math.sqrt(8), 3, 1))
    assert not torch.allclose(per_site, from_sums)


def test_form_and_method_mismatch():
    published = fedtgp.Server(fedtgp.Config(server_epochs=2), 3, list(UPLOADS))
    with pytest.raises(ValueError, match="update_from_sites"):
        published.update(aggregate(list(UPLOADS.values())), 1)
    # the aggregate form reached per site sums the uploads first
    a1 = fedtgp.Server(fedtgp.Config(server_epochs=2, form="aggregate"), 3, list(UPLOADS))
    a2 = fedtgp.Server(fedtgp.Config(server_epochs=2, form="aggregate"), 3, list(UPLOADS))
    torch.testing.assert_close(
        a1.update_from_sites(UPLOADS, 1)["global_protos"],
        a2.update(aggregate(list(UPLOADS.values())), 1)["global_protos"],
    )


def test_tgp_network_is_seeded_and_persists_across_rounds():
    first = fedtgp.Server(fedtgp.Config(server_epochs=2), 3, list(UPLOADS))
    second = fedtgp.Server(fedtgp.Config(server_epochs=2), 3, list(UPLOADS))
    round1 = first.update_from_sites(UPLOADS, 1)["global_protos"]
    torch.testing.assert_close(round1, second.update_from_sites(UPLOADS, 1)["global_protos"], rtol=0, atol=0)
    net = first.tgp
    round2 = first.update_from_sites(UPLOADS, 2)["global_protos"]
    assert first.tgp is net  # the same network keeps training
    fresh = fedtgp.Server(fedtgp.Config(server_epochs=2), 3, list(UPLOADS)).update_from_sites(UPLOADS, 2)
    assert not torch.allclose(round2, fresh["global_protos"])


def test_a_round_without_any_prototype_sends_nothing():
    empty = {s: _upload([[0.0, 0.0]] * 3, [0.0, 0.0, 0.0]) for s in ("a", "b")}
    server = fedtgp.Server(fedtgp.Config(server_epochs=2), 3, ["a", "b"])
    assert server.update_from_sites(empty, 1) == {}
    assert server.tgp is None


def test_client_takes_every_tgp_and_scores_by_the_nearest_one():
    client = fedtgp.Client(tiny_setup(n=8), fedtgp.Config())
    x = _inputs(client.setup.data.test)
    client.model.eval()
    with torch.no_grad():
        z = client.model.features(x)
        head = torch.softmax(client.model.head(z), dim=1)
    torch.testing.assert_close(client.scores(x), head)  # before any TGP: the site's own head
    tgps = z[:3].clone()  # test images 0, 1, 2 are the TGPs of classes 0, 1, 2
    client.receive({"global_protos": tgps}, 2)
    assert client.has_proto.all()
    p = client.scores(x)
    torch.testing.assert_close(p.sum(1), torch.ones(6))
    assert p[:3].argmax(1).tolist() == [0, 1, 2]
    torch.testing.assert_close(p, fedproto.nearest_prototype_scores(z, tgps, torch.ones(3, dtype=torch.bool)))
    # and the local loss now pulls towards the TGPs: λ · MSE
    labels = torch.tensor([0, 1, 2])
    expected = 10 * (z[3:6] - tgps).pow(2).mean()
    torch.testing.assert_close(client.prototype_loss()(z[3:6], None, labels), expected)


def test_two_backbone_round_in_both_server_forms():
    # Prepare: a cnn site with every class, a resnet18 site that never saw class 1
    a = fedtgp.Client(tiny_setup("a", n=6, seed=1, backbone="cnn"), fedtgp.Config())
    b = fedtgp.Client(tiny_setup("b", n=4, seed=2, backbone="resnet18", labels=[0, 2]), fedtgp.Config())
    uploads = {"a": a.train(1).sums, "b": b.train(1).sums}
    # Execute
    published = fedtgp.Server(fedtgp.Config(server_epochs=5), 3, ["a", "b"]).update_from_sites(uploads, 1)
    summed = fedtgp.Server(fedtgp.Config(server_epochs=5, form="aggregate"), 3, ["a", "b"])
    from_sums = summed.update(aggregate(list(uploads.values())), 1)
    # Assert
    for payload in (published, from_sums):
        assert payload["global_protos"].shape == (3, 4) and torch.isfinite(payload["global_protos"]).all()
    for client in (a, b):
        client.receive(published, 2)
        p = client.scores(_inputs(client.setup.data.test))
        assert p.shape == (6, 3) and torch.isfinite(p).all()
        torch.testing.assert_close(p.sum(1), torch.ones(6))
    assert math.isfinite(b.train(2).train_loss)


def test_config_defaults_and_bad_values_are_refused():
    c = fedtgp.Config()
    assert (c.lam, c.tau, c.server_epochs, c.server_lr, c.server_batch_size) == (10.0, 100.0, 100, 0.01, 10)
    assert c.form == "published" and c.weighting == "sites" and c.hidden_dim is None
    with pytest.raises(ValidationError, match="form"):
        fedtgp.Config(form="sums")
    with pytest.raises(ValidationError, match="server_epochs"):
        fedtgp.Config(server_epochs=0)
    with pytest.raises(ValidationError, match="margin_threthold"):
        fedtgp.Config(margin_threthold=1.0)


def test_a_server_round_at_the_default_settings_on_four_sites_and_four_classes():
    # 4 sites × 4 classes, d = 64, 100 epochs (about 0.1 s on one CPU core; no timing assert)
    uploads = {s: _upload(torch.randn(4, 64, generator=torch.Generator().manual_seed(i)).tolist(), [1.0] * 4)
               for i, s in enumerate("abcd")}  # fmt: skip
    server = fedtgp.Server(fedtgp.Config(), 4, list(uploads))
    payload = server.update_from_sites(uploads, 1)
    assert payload["global_protos"].shape == (4, 64) and len(server.losses) == 100
    assert server.losses[-1] < server.losses[0]


def test_private_round_is_fedprotos_dp_sgd_and_release_towards_the_tgps():
    # Prepare: the aggregate form (the one the dp modes allow), TGPs received from a server round
    from medsilo.config.job import DPSpec
    from medsilo.secure.dp import DPRelease, GaussianEvent, clip_rows

    config = fedtgp.Config(form="aggregate")
    client = fedtgp.Client(tiny_setup(n=12, batch_size=4), config)
    server = fedtgp.Server(config, 3, ["a"])
    client.receive(server.update(_upload([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]],
                                         [1.0, 1.0, 1.0]), 1), 2)  # fmt: skip
    stats = {
        k: v.clone() for k, v in client.model.state_dict().items() if "running" in k or "num_batches" in k
    }
    spec = DPSpec(noise_multiplier=1e-6, clip=0.08, grad_clip=1.0, sgd_noise_multiplier=1.0)
    # Execute
    events = client.dp_events(spec)
    up = client.train_private(2, DPRelease.from_spec(spec, torch.Generator().manual_seed(0)))
    # Assert: FedProto's two events (this site: N = 12, B = 4); the release is the (almost noise-free)
    # class sum of the DP-trained model's clipped eval-mode features; BatchNorm statistics untouched
    assert events == [GaussianEvent(1.0, steps=3, sampling_rate=1 / 3), GaussianEvent(1e-6)]
    features, labels = client.train_features()
    sums, counts = fedproto.class_sums(clip_rows(features, 0.08), labels, 3)
    torch.testing.assert_close(up.sums["proto_sum"], sums, atol=1e-4, rtol=0)
    torch.testing.assert_close(up.sums["proto_count"], counts, atol=1e-4, rtol=0)
    for k, v in client.model.state_dict().items():
        if k in stats:
            assert torch.equal(v, stats[k]), k


def test_normalize_uploads_prototypes_of_features_at_norm_sqrt_d():
    raw = fedtgp.Client(tiny_setup(n=6), fedtgp.Config())
    raw.model.base.register_forward_hook(lambda module, inputs, out: out * 40.0)
    normed = fedtgp.Client(tiny_setup(n=6), fedtgp.Config(normalize=True))
    normed.model.base.register_forward_hook(lambda module, inputs, out: out * 40.0)
    up_raw, up_normed = raw.train(1), normed.train(1)
    assert (up_normed.sums["proto_sum"].norm(dim=1) <= 2.0 + 1e-5).all()  # d = 4: √d = 2
    assert up_raw.sums["proto_sum"].norm(dim=1).max() > 4.0
