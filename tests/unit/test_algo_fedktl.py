"""FedKTL: ETF geometry, angular margin, prototype uploads, MMD, server rounds in both forms, transfer loss."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from medsilo.components.algorithms import fedktl
from medsilo.components.algorithms.base import mmd2
from tests.helpers import aggregate, tiny_setup

FAST = {"server_epochs": 5, "latent_dim": 8, "image_size": 8}
"""A small server (5 alignment epochs, L = 8, 8×8 images): same code paths, a fraction of the time."""


def batch(setup, split="test"):
    data = setup.data.split(split)
    return torch.stack([data[i][0] for i in range(len(data))])


# ---- ETF and margin -------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [2, 3, 5])
def test_etf_anchors_are_unit_and_equiangular(k):
    anchors = fedktl.etf_anchors(k, seed=7)
    torch.testing.assert_close(anchors.norm(dim=1), torch.ones(k))
    gram = anchors @ anchors.T
    off_diagonal = gram[~torch.eye(k, dtype=torch.bool)]
    torch.testing.assert_close(off_diagonal, torch.full_like(off_diagonal, -1 / (k - 1)), atol=1e-6, rtol=0)
    # M has unit columns already: M^T M = K/(K-1) (I - 11^T/K)
    m = fedktl.etf_matrix(k, seed=7).double()
    expected = k / (k - 1) * (torch.eye(k, dtype=torch.float64) - 1 / k)
    torch.testing.assert_close(m.T @ m, expected, atol=1e-6, rtol=0)


def test_sites_and_server_build_the_same_etf_from_the_config_seed():
    config = fedktl.Config(seed=3, **FAST)
    a = fedktl.Client(tiny_setup("a", seed=1, model_seed=1), config)
    b = fedktl.Client(tiny_setup("b", seed=2, model_seed=2), config)  # another site, other initial weights
    server = fedktl.Server(config, 3, ["a", "b"])
    torch.testing.assert_close(a.anchors, b.anchors, rtol=0, atol=0)
    torch.testing.assert_close(a.anchors, server.anchors, rtol=0, atol=0)
    assert not torch.allclose(a.anchors, fedktl.etf_anchors(3, seed=4))


def test_angular_margin_by_hand_and_only_on_the_true_class():
    cosine = torch.tensor([[0.5, -0.2, 0.1]])
    labels = torch.tensor([0])
    plain = fedktl.margin_logits(cosine, labels, margin=0.0, scale=2.0)
    torch.testing.assert_close(plain, 2.0 * cosine)
    logits = fedktl.margin_logits(cosine, labels, margin=0.5, scale=2.0)
    assert float(logits[0, 0]) == pytest.approx(2.0 * math.cos(math.pi / 3 + 0.5), rel=1e-5)
    assert float(logits[0, 0]) < float(plain[0, 0])  # the margin makes the true class harder
    torch.testing.assert_close(logits[0, 1:], plain[0, 1:])


def test_margin_gradients_stay_finite_when_the_projection_sits_on_an_anchor():
    anchors = fedktl.etf_anchors(3, seed=0)
    projection = torch.stack([anchors[0], -anchors[1]]).clone().requires_grad_(True)  # cos = +1 and -1
    cosine = fedktl.etf_cosine(projection, anchors)
    assert float(cosine[0, 0].detach()) == pytest.approx(1.0, abs=1e-6)
    assert float(cosine[1, 1].detach()) == pytest.approx(-1.0, abs=1e-6)
    logits = fedktl.margin_logits(cosine, torch.tensor([0, 1]), margin=0.5, scale=64.0)
    nn.functional.cross_entropy(logits, torch.tensor([0, 1])).backward()
    assert torch.isfinite(projection.grad).all()


# ---- client: prototypes and uploads ---------------------------------------------------------------


def test_class_prototypes_leave_absent_classes_zero_without_nan():
    sums = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 2.0]])
    protos = fedktl.class_prototypes(sums, torch.tensor([2.0, 0.0, 1.0]))
    torch.testing.assert_close(protos, torch.tensor([[0.6, 0.8, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 1.0]]))


def test_upload_for_a_site_without_class_one():
    client = fedktl.Client(tiny_setup(labels=[0, 2], n=8), fedktl.Config(**FAST))
    up = client.train(1)

    assert set(up.sums) == {"proto_sum", "proto_count"}
    s, c = up.sums["proto_sum"], up.sums["proto_count"]
    assert s.shape == (3, 3) and s.dtype == torch.float32 and c.shape == (3,) and c.dtype == torch.float32
    assert torch.isfinite(s).all()
    torch.testing.assert_close(c, torch.tensor([1.0, 0.0, 1.0]))
    torch.testing.assert_close(s[1], torch.zeros(3))
    torch.testing.assert_close(s[[0, 2]].norm(dim=1), torch.ones(2))
    # by hand: eval mode, mean of the unit outputs per class, re-normalised
    client.model.eval()
    x, y = batch(client.setup, "train"), client.setup.data.train.labels
    with torch.no_grad():
        unit = nn.functional.normalize(client.model(x), dim=1)
    for k in (0, 2):
        torch.testing.assert_close(s[k], nn.functional.normalize(unit[y == k].mean(0), dim=0))
    assert up.train_loss > 0


def test_scores_are_the_softmax_of_the_etf_cosines():
    client = fedktl.Client(tiny_setup(), fedktl.Config(**FAST))
    x = batch(client.setup)
    probs = client.scores(x)
    with torch.no_grad():
        cosine = fedktl.etf_cosine(client.model(x), client.anchors)
    torch.testing.assert_close(probs, torch.softmax(cosine, dim=1))
    torch.testing.assert_close(probs.sum(1), torch.ones(len(x)))
    assert torch.equal(probs.argmax(1), cosine.argmax(1))


def test_gradient_norm_is_clipped_per_group_before_each_step():
    client = fedktl.Client(tiny_setup(lr=0.05), fedktl.Config(max_grad_norm=2.0))
    big, small = nn.Parameter(torch.zeros(4)), nn.Parameter(torch.zeros(4))
    opt = client.optimizer([{"params": [big]}, {"params": [small]}])
    big.grad, small.grad = torch.full((4,), 100.0), torch.full((4,), 0.1)
    opt.step()  # plain SGD (momentum 0): p = -lr * clipped grad
    assert float(big.detach().norm()) == pytest.approx(0.05 * 2.0, rel=1e-5)  # clipped to norm 2
    torch.testing.assert_close(small.detach(), torch.full((4,), -0.05 * 0.1))  # under the limit: untouched


# ---- MMD ------------------------------------------------------------------------------------------


def test_mmd_is_zero_for_identical_samples_and_grows_with_a_shift():
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    assert abs(float(mmd2(x, x.clone()))) < 1e-5
    near, far = mmd2(x, x + 1.0), mmd2(x, x + 5.0)
    assert 0 < float(near) < float(far)


def test_mmd_by_hand_for_single_points():
    d = 3.0  # one point each, distance 3: k(x,x) = k(y,y) = 4 (four bandwidths), k(x,y) = Σ exp(-9/(2σ))
    expected = 8 - 2 * sum(math.exp(-d * d / (2 * s)) for s in (10, 15, 20, 50))
    assert float(mmd2(torch.zeros(1, 2), torch.tensor([[d, 0.0]]))) == pytest.approx(
        expected, rel=1e-5
    )


def test_mmd_gradient_is_finite_for_coincident_points():
    x = torch.zeros(3, 2, requires_grad=True)
    mmd2(x, torch.zeros(3, 2)).backward()
    assert torch.isfinite(x.grad).all()


# ---- server ---------------------------------------------------------------------------------------


def upload(rows: dict[int, list[float]], k: int = 3) -> dict[str, torch.Tensor]:
    """A site's upload with unit prototypes for the classes in ``rows``."""
    s, c = torch.zeros(k, k), torch.zeros(k)
    for cls, row in rows.items():
        s[cls] = nn.functional.normalize(torch.tensor(row), dim=0)
        c[cls] = 1.0
    return {"proto_sum": s, "proto_count": c}


UPLOADS = {
    "a": upload({0: [1.0, 0.2, 0.0], 1: [0.0, 1.0, 0.1]}),
    "b": upload({0: [0.9, 0.0, 0.3]}),
    "c": upload({1: [0.2, 0.8, -0.1]}),
}
"""Three sites; nobody has class 2."""


def test_published_round_produces_images_and_latents_from_per_site_prototypes():
    server = fedktl.Server(fedktl.Config(**FAST), 3, list(UPLOADS))
    assert server.form == "per-site" and server.needs_plaintext_aggregate

    payload = server.update_from_sites(UPLOADS, 1)

    images, latents = payload["images"], payload["latents"]
    assert images.shape == (3, 3, 8, 8) and images.dtype == torch.float32
    assert float(images.min()) >= 0 and float(images.max()) <= 1
    assert latents.shape == (3, 8) and latents.dtype == torch.float32 and torch.isfinite(latents).all()
    assert math.isfinite(server.last_loss)
    torch.testing.assert_close(images, server.generator(latents))
    # classes 0 and 1: the mean of F over that class's per-site prototypes; class 2 (nobody): F(a_2)
    protos = torch.stack([UPLOADS["a"]["proto_sum"][0], UPLOADS["b"]["proto_sum"][0],
                          UPLOADS["a"]["proto_sum"][1], UPLOADS["c"]["proto_sum"][1]])  # fmt: skip
    server.transformer.eval()
    with torch.no_grad():
        q = server.transformer(protos)
        torch.testing.assert_close(latents[0], q[:2].mean(0))
        torch.testing.assert_close(latents[1], q[2:].mean(0))
        torch.testing.assert_close(latents[2], server.transformer(server.anchors[2:]).squeeze(0))


def test_alignment_moves_the_transformer_and_is_reproducible():
    config = fedktl.Config(**FAST)
    one, two = fedktl.Server(config, 3, list(UPLOADS)), fedktl.Server(config, 3, list(UPLOADS))
    before = [p.detach().clone() for p in one.transformer.parameters()]
    first, second = one.update_from_sites(UPLOADS, 1), two.update_from_sites(UPLOADS, 1)
    assert any(not torch.equal(b, p) for b, p in zip(before, one.transformer.parameters()))
    torch.testing.assert_close(first["latents"], second["latents"], rtol=0, atol=0)


def _whitened(server: fedktl.Server, latents: torch.Tensor) -> torch.Tensor:
    """Latents in the prior's whitened coordinates ``S⁻¹(w − m)``."""
    mean, chol, _ = fedktl.latent_moments(server.generator, server.num_classes, server.config.seed)
    return torch.linalg.solve_triangular(chol, (latents.double() - mean).T, upper=False).T


def test_aggregate_form_maps_the_class_means_to_latents_with_the_priors_moments():
    config = fedktl.Config(form="aggregate", **FAST)
    server = fedktl.Server(config, 3, list(UPLOADS))
    assert server.form == "sums" and server.needs_plaintext_aggregate

    payload = server.update(aggregate(list(UPLOADS.values())), 1)

    latents = payload["latents"]
    assert latents.shape == (3, 8) and torch.isfinite(latents).all()
    torch.testing.assert_close(payload["images"], server.generator(latents).clamp(0, 1))
    # whitened, every class latent has the norm √L of a typical draw of W_rand …
    z = _whitened(server, latents)
    torch.testing.assert_close(z.norm(dim=1), torch.full((3,), math.sqrt(8), dtype=torch.float64), rtol=1e-4, atol=1e-4)
    # … and the latents are as far apart as the unit class means (class 2, at no site: its ETF anchor)
    mean0 = nn.functional.normalize(UPLOADS["a"]["proto_sum"][0] + UPLOADS["b"]["proto_sum"][0], dim=0)
    mean1 = nn.functional.normalize(UPLOADS["a"]["proto_sum"][1] + UPLOADS["c"]["proto_sum"][1], dim=0)
    p = torch.stack([mean0, mean1, server.anchors[2]]).double()
    torch.testing.assert_close(nn.functional.normalize(z, dim=1) @ nn.functional.normalize(z, dim=1).T, p @ p.T,
                               rtol=1e-4, atol=1e-4)  # fmt: skip
    # nothing is trained on the K points, and the same aggregate gives the same payload, also via update_from_sites
    again = fedktl.Server(config, 3, list(UPLOADS)).update_from_sites(UPLOADS, 1)
    torch.testing.assert_close(again["latents"], latents, rtol=0, atol=0)
    published = fedktl.Server(fedktl.Config(**FAST), 3, list(UPLOADS)).update_from_sites(UPLOADS, 1)
    assert not torch.allclose(published["latents"][:2], latents[:2])


def test_aggregate_latents_follow_the_class_means_not_the_round():
    server = fedktl.Server(fedktl.Config(form="aggregate", **FAST), 3, list(UPLOADS))
    one = server.update(aggregate(list(UPLOADS.values())), 1)["latents"]
    two = server.update(aggregate(list(UPLOADS.values())), 7)["latents"]
    torch.testing.assert_close(one, two, rtol=0, atol=0)
    moved = dict(UPLOADS, b=upload({0: [0.0, 0.3, 0.9]}))
    three = server.update(aggregate(list(moved.values())), 2)["latents"]
    assert not torch.allclose(three[0], one[0]) and torch.allclose(three[1:], one[1:])


def test_under_ckks_a_class_no_site_has_stays_absent_on_the_server():
    """Class 2 is at no site: after encrypt → add → decrypt its count is ±1e-8, not 0. ``count > 0`` made it a
    prototype of amplified noise; the one presence rule (count ≥ 0.5) keeps it absent, as in plaintext."""
    from medsilo.secure.ckks import add, decrypt, encrypt, make_context

    ctx = make_context(8192)
    total = add(ctx, [encrypt(ctx, u) for u in UPLOADS.values()], labels=list(UPLOADS))
    decrypted = decrypt(ctx, total)
    plain = aggregate(list(UPLOADS.values()))
    error = float((decrypted["proto_sum"] - plain["proto_sum"]).abs().max())
    assert 0 < error < 1e-5  # CKKS is approximate: zeros come back as tiny non-zeros
    decrypted["proto_count"][2] = 3 * error  # the sign of that error is chance; here it is positive
    server = fedktl.Server(fedktl.Config(form="aggregate", **FAST), 3, list(UPLOADS))
    payload = server.update(decrypted, 1)
    expected = server.update(plain, 1)  # class 2 absent: its latent comes from its ETF anchor, as in plaintext
    torch.testing.assert_close(payload["latents"], expected["latents"], rtol=1e-4, atol=1e-4)


def test_a_single_prototype_does_not_crash_batchnorm():
    server = fedktl.Server(fedktl.Config(**FAST), 3, ["a"])
    payload = server.update_from_sites({"a": upload({1: [0.0, 1.0, 0.0]})}, 1)
    assert math.isnan(server.last_loss)  # a batch of one is never trained on
    assert payload["images"].shape == (3, 3, 8, 8) and torch.isfinite(payload["latents"]).all()


def test_nothing_uploaded_gives_an_empty_payload_and_bad_shapes_are_named():
    server = fedktl.Server(fedktl.Config(**FAST), 3, ["a"])
    assert server.update({}, 1) == {} and server.update_from_sites({"a": {}}, 1) == {}
    with pytest.raises(ValueError, match=r"site a: 'proto_sum' must have shape \(3, 3\)"):
        server.update_from_sites({"a": {"proto_sum": torch.zeros(3, 4), "proto_count": torch.ones(3)}}, 1)


# ---- client: transfer loss ------------------------------------------------------------------------


def test_received_images_become_this_sites_normalised_inputs():
    client = fedktl.Client(tiny_setup(), fedktl.Config(**FAST))  # 1-channel 16×16 site
    images = torch.full((3, 3, 32, 32), 0.75)
    client.receive({"images": images, "latents": torch.zeros(3, 8)}, 2)
    assert client.pair_images.shape == (3, 1, 16, 16)
    torch.testing.assert_close(client.pair_images, torch.full((3, 1, 16, 16), (0.75 - 0.5) / 0.25))
    rgb = fedktl.site_inputs(torch.rand(2, 3, 8, 8), channels=3, size=(12, 12))
    assert rgb.shape == (2, 3, 12, 12)


def test_transfer_loss_is_used_only_once_pairs_exist_and_leaves_batchnorm_statistics_alone():
    client = fedktl.Client(tiny_setup(), fedktl.Config(mu=2.0, **FAST))
    x, y = next(iter(client.train_loader(1)))
    client.model.train()
    _, extra = client.forward(x, y)
    assert client.proj is None and float(extra) == 0.0

    images = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    latents = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    client.receive({"images": images, "latents": latents}, 2)
    running = {k: v.clone() for k, v in client.model.named_buffers() if "running" in k}
    loss = client.transfer_loss().detach()  # batch 4 ≥ K = 3: all three pairs
    for k, v in client.model.named_buffers():
        if "running" in k:
            torch.testing.assert_close(v, running[k], rtol=0, atol=0)
    with torch.no_grad():
        expected = 2.0 * nn.functional.mse_loss(
            client.proj(client.model.features(client.pair_images)), latents
        )
    assert float(loss) == pytest.approx(float(expected), rel=1e-5) and float(loss) > 0


def test_pairs_are_taken_in_cycling_batches_of_at_least_two():
    client = fedktl.Client(tiny_setup(batch_size=2), fedktl.Config(**FAST))
    client.receive({"images": torch.rand(3, 3, 8, 8), "latents": torch.randn(3, 8)}, 2)
    cursors = []
    for _ in range(3):
        client.transfer_loss()
        cursors.append(client._cursor)
    assert cursors == [2, 1, 0]  # pairs (0, 1), (2, 0), (1, 2)


def test_projection_is_persistent_across_rounds():
    client = fedktl.Client(tiny_setup(), fedktl.Config(**FAST))
    payload = {"images": torch.rand(3, 3, 8, 8), "latents": torch.randn(3, 8)}
    client.receive(payload, 2)
    proj, initial = client.proj, client.proj.weight.detach().clone()
    client.train(2)
    trained = proj.weight.detach().clone()
    assert not torch.equal(trained, initial)  # L_M trains the projection

    client.receive(payload, 3)  # the reference would reset it here

    assert client.proj is proj
    torch.testing.assert_close(client.proj.weight, trained, rtol=0, atol=0)
    with pytest.raises(ValueError, match="latent dimension changed from 8 to 5"):
        client.receive({"images": torch.rand(3, 3, 8, 8), "latents": torch.randn(3, 5)}, 4)


def test_two_backbones_train_exchange_and_score():
    config = fedktl.Config(**FAST)
    sites = {
        "cnn": fedktl.Client(tiny_setup("cnn", n=8, num_classes=2, seed=1, backbone="cnn"), config),
        "resnet": fedktl.Client(
            tiny_setup("resnet", n=8, num_classes=2, seed=2, backbone="resnet18"), config
        ),
    }
    server = fedktl.Server(config, 2, list(sites))
    payload = None
    for rnd in (1, 2):
        uploads = {}
        for name, client in sites.items():
            client.receive(payload, rnd)
            uploads[name] = client.train(rnd).sums
        payload = server.update_from_sites(uploads, rnd)
        assert payload["images"].shape == (2, 3, 8, 8) and payload["latents"].shape == (2, 8)
    for client in sites.values():
        client.receive(payload, 3)
        assert client.proj is not None and client.pair_images.shape == (2, 1, 16, 16)
        probs = client.scores(batch(client.setup))
        assert probs.shape == (6, 2) and torch.isfinite(probs).all()
        torch.testing.assert_close(probs.sum(1), torch.ones(6))


def test_config_defaults_and_bad_values():
    c = fedktl.Config()
    assert (c.margin, c.scale, c.mu, c.lam, c.server_lr, c.server_epochs) == (0.5, 64.0, 50.0, 1.0, 0.01, 100)
    assert (c.form, c.generator, c.server_batch_size, c.max_grad_norm) == ("published", "offline", 100, 100.0)
    with pytest.raises(ValidationError, match="margin"):
        fedktl.Config(margin=2.0)
    with pytest.raises(ValidationError, match="form"):
        fedktl.Config(form="secure")
    with pytest.raises(ValidationError, match="did you mean 'offline'"):
        fedktl.Config(generator="ofline")
    assert (
        fedktl.Config(generator="/srv/stylegan.pt").generator == "/srv/stylegan.pt"
    )  # checked at the server
