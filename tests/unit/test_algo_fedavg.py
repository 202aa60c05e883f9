"""FedAvg and Local: uploads are parameter×n sums; sites recover the weighted mean; BN stats stay local."""

from __future__ import annotations

import pytest
import torch

from medsilo.components.algorithms import fedavg, local
from medsilo.components.algorithms.base import load_mean, weighted_params
from tests.helpers import aggregate, tiny_setup


def test_upload_is_parameters_times_n():
    setup = tiny_setup(n=12)
    client = fedavg.Client(setup, fedavg.Config())
    up = client.train(1)
    params = dict(setup.model.named_parameters())
    assert set(up.sums) == {f"w.{k}" for k in params} | {"n"}
    assert float(up.sums["n"]) == 12.0
    torch.testing.assert_close(up.sums["w.head.weight"], params["head.weight"].detach() * 12)
    assert not any("running" in k for k in up.sums)  # BatchNorm statistics never leave the site
    assert up.train_loss > 0


def test_sites_recover_the_weighted_mean_and_keep_their_bn_statistics():
    a = fedavg.Client(tiny_setup("a", n=12, seed=1), fedavg.Config())
    b = fedavg.Client(tiny_setup("b", n=4, seed=2), fedavg.Config())
    ua, ub = a.train(1), b.train(1)
    head_a = a.model.head.weight.detach().clone()
    head_b = b.model.head.weight.detach().clone()
    buffers_a = {k: v.clone() for k, v in a.model.named_buffers()}

    payload = fedavg.Server(fedavg.Config(), 3, ["a", "b"]).update(aggregate([ua.sums, ub.sums]), 1)
    a.receive(payload, 2)
    b.receive(payload, 2)

    expected = (12 * head_a + 4 * head_b) / 16  # written out: n-weighted mean
    torch.testing.assert_close(a.model.head.weight, expected)
    torch.testing.assert_close(b.model.head.weight, expected)
    for k, v in a.model.named_buffers():  # running statistics untouched by aggregation
        torch.testing.assert_close(v, buffers_a[k])


def test_first_round_keeps_the_shared_initialisation():
    a = fedavg.Client(tiny_setup("a", seed=1), fedavg.Config())
    b = fedavg.Client(tiny_setup("b", seed=2), fedavg.Config())
    a.receive(None, 1)
    b.receive(None, 1)
    for (_, pa), (_, pb) in zip(a.model.named_parameters(), b.model.named_parameters()):
        torch.testing.assert_close(pa, pb)


def test_load_mean_names_a_missing_parameter():
    setup = tiny_setup()
    payload = {**weighted_params(setup.model, 2, "w."), "n": torch.tensor(2.0)}
    del payload["w.head.bias"]
    try:
        load_mean(setup.model, payload, "w.")
    except KeyError as exc:
        assert "w.head.bias" in str(exc)
    else:
        raise AssertionError("missing parameter not reported")


def test_local_uploads_nothing_and_still_learns():
    setup = tiny_setup(n=24, local_epochs=3)
    client = local.Client(setup, local.Config())
    first = client.train(1)
    later = client.train(2)
    assert first.sums == {} and later.train_loss < first.train_loss
    assert local.Server(local.Config(), 3, ["a"]).update({}, 1) == {}


def test_data_order_is_seeded_per_site_and_round():
    client = fedavg.Client(tiny_setup(seed=3), fedavg.Config())
    order = lambda rnd: torch.cat([y for _, y in client.train_loader(rnd)]).tolist()  # noqa: E731
    first_batch = lambda rnd: next(iter(client.train_loader(rnd)))[0]  # noqa: E731
    torch.testing.assert_close(first_batch(1), first_batch(1))
    assert sorted(order(1)) == sorted(order(2))
    assert not torch.equal(first_batch(1), first_batch(2))


def test_private_upload_is_the_start_plus_the_clipped_update_with_equal_site_weight():
    from medsilo.secure.dp import DPRelease

    setup = tiny_setup(n=12)
    client = fedavg.Client(setup, fedavg.Config())
    start = {k: p.detach().clone() for k, p in setup.model.named_parameters()}
    clip = 1e-3  # far below the update's norm, so the clipping shows
    up = client.train_private(1, DPRelease(clip=clip, noise_multiplier=1e-6, generator=torch.Generator().manual_seed(0)))
    assert float(up.sums["n"]) == 1.0  # the dataset size does not leave unnoised
    trained = dict(setup.model.named_parameters())
    update = {k: up.sums[f"w.{k}"] - start[k] for k in start}
    norm = torch.sqrt(sum((u.double() ** 2).sum() for u in update.values()))
    full = torch.sqrt(sum(((trained[k].detach() - start[k]).double() ** 2).sum() for k in start))
    assert float(full) > 10 * clip and float(norm) == pytest.approx(clip, rel=1e-2)
    # the update keeps its direction: parallel to what local training did
    cos = sum((update[k].double() * (trained[k].detach() - start[k]).double()).sum() for k in start) / (norm * full)
    assert float(cos) > 0.999


def test_a_private_round_costs_one_release_event():
    from medsilo.config.job import DPSpec
    from medsilo.secure.dp import GaussianEvent

    client = fedavg.Client(tiny_setup(n=12), fedavg.Config())
    spec = DPSpec(noise_multiplier=1.7, clip=1.0, grad_clip=0.5, sgd_noise_multiplier=0.9)
    assert client.dp_events(spec) == [GaussianEvent(noise_multiplier=1.7)]  # no DP-SGD in the update form


def _dp(**kwargs):
    from medsilo.secure.dp import DPRelease

    return DPRelease(clip=1.0, noise_multiplier=1.0, generator=torch.Generator().manual_seed(0), **kwargs)


def test_dp_sgd_form_uploads_the_dp_trained_weights_from_the_global_model():
    setup = tiny_setup(n=12)
    client = fedavg.Client(setup, fedavg.Config(dp_form="dp-sgd"))
    start = {k: p.detach().clone() for k, p in setup.model.named_parameters()}
    with torch.no_grad():  # whatever the model holds now (e.g. earlier local work) is not where a round starts
        setup.model.head.weight.add_(5.0)
    up = client.train_private(1, _dp(grad_clip=1.0, sgd_noise_multiplier=1e-6))
    assert float(up.sums["n"]) == 1.0
    trained = dict(setup.model.named_parameters())
    for k in start:  # the upload is the trained model itself, unweighted and not noised again
        torch.testing.assert_close(up.sums[f"w.{k}"], trained[k].detach())
    moved = torch.sqrt(sum(((trained[k].detach() - start[k]) ** 2).sum() for k in start))
    assert 0 < float(moved) < 1.0  # trained from the global start (+5 on the head would be far away)
    # BatchNorm ran in eval mode: its statistics are still the initial ones, nothing of the data was tracked
    assert all(int(m.num_batches_tracked) == 0 for m in setup.model.modules() if hasattr(m, "num_batches_tracked"))


def test_dp_sgd_noise_is_what_moves_the_weights_at_a_large_multiplier():
    quiet, loud = (fedavg.Client(tiny_setup(n=12), fedavg.Config(dp_form="dp-sgd")) for _ in range(2))
    start = {k: p.detach().clone() for k, p in quiet.model.named_parameters()}
    small = quiet.train_private(1, _dp(grad_clip=0.1, sgd_noise_multiplier=1e-6)).sums
    large = loud.train_private(1, _dp(grad_clip=0.1, sgd_noise_multiplier=100.0)).sums

    def shift(sums):
        return float(torch.sqrt(sum(((sums[f"w.{k}"] - start[k]) ** 2).sum() for k in start)))

    assert shift(large) > 20 * shift(small)


def test_dp_sgd_form_refuses_a_round_without_dp_sgd_settings_before_training():
    from medsilo.secure.dp import DPError

    setup = tiny_setup(n=12)
    client = fedavg.Client(setup, fedavg.Config(dp_form="dp-sgd"))
    before = {k: p.detach().clone() for k, p in setup.model.named_parameters()}
    with pytest.raises(DPError, match="DP-SGD"):
        client.train_private(1, _dp())
    for k, p in setup.model.named_parameters():
        assert torch.equal(p.detach(), before[k])


def test_a_dp_sgd_round_costs_the_dp_sgd_steps_alone():
    from medsilo.config.job import DPSpec
    from medsilo.secure.dp import GaussianEvent, poisson_schedule

    client = fedavg.Client(tiny_setup(n=12), fedavg.Config(dp_form="dp-sgd"))
    spec = DPSpec(noise_multiplier=1.7, clip=1.0, grad_clip=0.5, sgd_noise_multiplier=0.9)
    steps, rate = poisson_schedule(12, client.setup.batch_size, client.setup.training.local_epochs)
    assert client.dp_events(spec) == [GaussianEvent(noise_multiplier=0.9, steps=steps, sampling_rate=rate)]
    assert steps >= 1 and 0 < rate <= 1
