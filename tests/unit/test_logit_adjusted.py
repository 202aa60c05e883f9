"""``training.loss: logit-adjusted``: the loss, the log prior, where the prior comes from (true counts, or counts
drawn once under DP in a DP-SGD job), what that draw costs and that a resumed job does not draw it again."""

from __future__ import annotations

import math

import pytest
import torch

from medsilo.components import checkpoint
from medsilo.components.algorithms import fedavg, fedproto
from medsilo.components.training import log_prior, per_record_gradients, task_loss
from medsilo.config.job import DPSpec, Training
from medsilo.secure.dp import (
    DPError,
    DPRelease,
    GaussianEvent,
    PrivacyAccountant,
    dpsgd_noise_for_epsilon,
    gaussian_counts,
)
from tests.helpers import tiny_setup

SKEW = [0, 0, 0, 1]  # training labels cycle over these: 9 of class 0, 3 of class 1, none of class 2 (n = 12)
SPEC = DPSpec(noise_multiplier=1.0, clip=1.0, grad_clip=1.0, sgd_noise_multiplier=1.0, count_noise_multiplier=2.0)


def _dp(spec: DPSpec = SPEC, seed: int = 0) -> DPRelease:
    return DPRelease.from_spec(spec, torch.Generator().manual_seed(seed))


def test_the_loss_is_cross_entropy_of_the_shifted_logits_and_the_prior_counts_an_empty_class_as_one():
    logits, labels = torch.randn(5, 3), torch.tensor([0, 1, 2, 0, 0])
    prior = log_prior(torch.tensor([9.0, 3.0, 0.0]))
    assert torch.allclose(prior.exp(), torch.tensor([9.0, 3.0, 1.0]) / 13)
    shifted = task_loss(logits, labels, logit_shift=prior)
    assert torch.allclose(shifted, torch.nn.functional.cross_entropy(logits + prior, labels))
    assert not torch.allclose(shifted, task_loss(logits, labels))
    # a noisy count below 1 (even negative) is read as one, never as the log of a non-positive number
    assert torch.isfinite(log_prior(torch.tensor([-3.2, 0.4, 7.0], dtype=torch.float64))).all()


def test_per_record_gradients_see_the_shift():
    setup = tiny_setup(n=6, labels=SKEW)
    x, y = torch.stack([setup.data.train[i][0] for i in range(3)]), setup.data.train.labels[:3]
    prior = log_prior(torch.tensor([9.0, 3.0, 0.0]))
    grads, losses = per_record_gradients(setup.model, x, y, logit_shift=prior)
    model = setup.model.eval()
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(x[:1]) + prior, y[:1]).backward()
    assert torch.allclose(grads["head.bias"][0], model.head.bias.grad, atol=1e-6)
    plain, _ = per_record_gradients(setup.model, x, y)
    assert not torch.allclose(plain["head.bias"], grads["head.bias"])
    assert losses.shape == (3,)


def test_the_option_is_validated_at_the_boundary():
    with pytest.raises(ValueError, match="count twice"):
        Training(loss="logit-adjusted", class_weights="balanced")
    with pytest.raises(ValueError, match="loss"):
        Training(loss="focal")
    with pytest.raises(ValueError, match="count_noise_multiplier"):
        DPSpec(noise_multiplier=1.0, clip=1.0, count_noise_multiplier=0.0)
    assert DPSpec(noise_multiplier=1.0, clip=1.0).count_noise_multiplier == 5.0


def test_a_multilabel_job_refuses_it():
    from medsilo.config import JobSpec

    with pytest.raises(ValueError, match="training.loss"):
        JobSpec(name="m", modality="cxr", task="multilabel", labels=["a", "b"], dataset="d", model="cnn",
                algorithm={"name": "fedavg"}, training={"loss": "logit-adjusted"})  # fmt: skip


def test_ordinary_training_reads_the_true_counts_and_draws_nothing():
    client = fedavg.Client(tiny_setup(n=12, labels=SKEW, loss="logit-adjusted"), fedavg.Config())
    assert torch.allclose(client.logit_shift(), log_prior(torch.tensor([9.0, 3.0, 0.0])))
    assert client.once_dp_events(SPEC) == []  # FedAvg's update form: its release covers the whole dataset
    client.train(1)
    assert client.released_counts is None
    assert fedavg.Client(tiny_setup(n=12, labels=SKEW), fedavg.Config()).logit_shift() is None


def test_a_dp_sgd_job_draws_noisy_counts_once_and_declares_that_draw_once():
    client = fedavg.Client(tiny_setup(n=12, labels=SKEW, loss="logit-adjusted"), fedavg.Config(dp_form="dp-sgd"))
    assert client.once_dp_events(SPEC) == [GaussianEvent(noise_multiplier=2.0)]
    client.train_private(1, _dp(seed=5))
    drawn = client.released_counts
    expected = torch.tensor([9.0, 3.0, 0.0], dtype=torch.float64) + 2.0 * torch.randn(
        3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)  # fmt: skip
    assert torch.allclose(drawn, expected)  # the first draws of the round's generator, σ = 2, sensitivity 1
    assert client.once_dp_events(SPEC) == []  # charged with round 1's upload: never again
    client.train_private(2, _dp(seed=6))
    assert torch.equal(client.released_counts, drawn)
    assert torch.allclose(client.logit_shift(_dp()), log_prior(drawn))


def test_a_dp_sgd_round_without_a_count_multiplier_refuses_rather_than_read_the_true_counts():
    client = fedproto.Client(tiny_setup(n=12, labels=SKEW, loss="logit-adjusted"), fedproto.Config())
    bare = DPRelease(clip=1.0, noise_multiplier=1.0, generator=torch.Generator(), grad_clip=1.0,
                     sgd_noise_multiplier=1.0)  # fmt: skip
    with pytest.raises(DPError, match="count_noise_multiplier"):
        client.logit_shift(bare)
    assert client.released_counts is None


def test_a_resumed_client_keeps_the_drawn_counts_and_owes_nothing_for_them(tmp_path):
    def fresh() -> fedavg.Client:
        return fedavg.Client(tiny_setup(n=12, labels=SKEW, loss="logit-adjusted"), fedavg.Config(dp_form="dp-sgd"))

    client = fresh()
    client.train_private(1, _dp(seed=1))
    checkpoint.save_site(tmp_path, "a", 1, client, job_id="job-1", spec_digest="d" * 64)
    resumed = fresh()
    assert resumed.once_dp_events(SPEC) == [GaussianEvent(noise_multiplier=2.0)]
    checkpoint.load_site(tmp_path, "a", 1, resumed, job_id="job-1", spec_digest="d" * 64)
    assert torch.equal(resumed.released_counts, client.released_counts)
    assert resumed.once_dp_events(SPEC) == []


def test_a_round_undone_after_the_draw_draws_and_declares_it_again():
    """A round whose upload is refused restores the client as it was before training (the executor's snapshot):
    the counts drawn in it never reached a release, so the next round draws and declares them afresh."""
    client = fedavg.Client(tiny_setup(n=12, labels=SKEW, loss="logit-adjusted"), fedavg.Config(dp_form="dp-sgd"))
    before = checkpoint.snapshot(client)
    client.train_private(1, _dp())
    checkpoint.restore_snapshot(client, before)
    assert client.released_counts is None
    assert client.once_dp_events(SPEC) == [GaussianEvent(noise_multiplier=2.0)]


def test_gaussian_counts_has_the_stated_noise_and_refuses_bad_input():
    labels = torch.tensor([0] * 50 + [2] * 10)
    draws = torch.stack([gaussian_counts(labels, 3, 4.0, torch.Generator().manual_seed(s)) for s in range(400)])
    assert torch.allclose(draws.mean(0), torch.tensor([50.0, 0.0, 10.0], dtype=torch.float64), atol=0.8)
    assert draws.std(0).sub(4.0).abs().max() < 0.5
    with pytest.raises(DPError, match="labels must lie"):
        gaussian_counts(torch.tensor([0, 3]), 3, 1.0, torch.Generator())
    with pytest.raises(DPError, match="integer tensor"):
        gaussian_counts(torch.tensor([0.0, 1.0]), 3, 1.0, torch.Generator())
    with pytest.raises(DPError, match="noise_multiplier"):
        gaussian_counts(labels, 3, 0.0, torch.Generator())


def test_calibration_composes_the_once_charged_draw_into_the_target():
    kwargs = dict(n=238, batch_size=32, epochs=1, release=False)
    alone = dpsgd_noise_for_epsilon(8.0, 50, 1e-5, **kwargs)
    once = [GaussianEvent(noise_multiplier=5.0)]
    sigma = dpsgd_noise_for_epsilon(8.0, 50, 1e-5, once=once, **kwargs)
    assert sigma > alone
    steps, rate = math.ceil(238 / 32), 32 / 238
    events = [GaussianEvent(noise_multiplier=sigma, steps=steps, sampling_rate=rate)] * 50 + once
    assert PrivacyAccountant(delta=1e-5).cost(*events)[1] == pytest.approx(8.0, abs=1e-3)
    with pytest.raises(DPError, match="once-charged"):
        dpsgd_noise_for_epsilon(0.5, 50, 1e-5, once=[GaussianEvent(noise_multiplier=0.5)], **kwargs)


def test_counts_restored_malformed_or_drawn_by_an_undeclared_dp_sgd_path_are_refused():
    from medsilo.components.algorithms import local

    client = fedavg.Client(tiny_setup(n=12, labels=SKEW, loss="logit-adjusted"), fedavg.Config(dp_form="dp-sgd"))
    for bad in (torch.full((3,), float("nan"), dtype=torch.float64), torch.ones(3, 2, dtype=torch.float64),
                torch.ones(3, dtype=torch.int64)):  # fmt: skip
        client.released_counts = bad  # e.g. from a damaged checkpoint
        with pytest.raises(DPError, match="malformed"):
            client.logit_shift(_dp())
    # an algorithm whose private round would train with DP-SGD without declaring it: the draw is refused
    undeclared = local.Client(tiny_setup(n=12, labels=SKEW, loss="logit-adjusted"), local.Config())
    with pytest.raises(DPError, match="does not declare"):
        undeclared.logit_shift(_dp())
    assert undeclared.released_counts is None


def test_an_upload_that_fails_for_any_reason_takes_the_rounds_count_draw_with_it():
    """Round 1 draws the counts, then sealing the upload fails with an error no pipeline check raises (memory
    exhausted by a large CKKS body, say): nothing was charged, so the client must not keep the draw — the next
    round draws and declares it again. The pipeline is the real check-then-charge order with the failure injected."""
    from types import SimpleNamespace

    from medsilo.components.executor import SiteExecutor, _SiteState

    class SealFails:
        noised = True

        def __init__(self):
            self.checked: list = []

        def noise(self, rnd, events):
            self.checked.append(list(events))
            return _dp()

        def protect(self, rnd, participants, arrays, events):
            raise MemoryError("sealing ran out of memory")

    client = fedavg.Client(tiny_setup(n=12, labels=SKEW, loss="logit-adjusted"), fedavg.Config(dp_form="dp-sgd"))
    executor = SiteExecutor.__new__(SiteExecutor)  # only _train runs: no NVFlare context needed before protect
    executor._spec = SimpleNamespace(privacy=SimpleNamespace(dp=SPEC))
    pipeline = SealFails()
    state = _SiteState(client=client, data=client.setup.data, batch_size=4, pipeline=pipeline,
                       events=client.dp_events(SPEC), seed=0)  # fmt: skip
    with pytest.raises(MemoryError):
        executor._train("a", 1, ["a"], state, None)
    assert pipeline.checked[0][0] == GaussianEvent(noise_multiplier=2.0)  # the draw was declared and checked
    assert client.released_counts is None  # and, never charged, not kept
    assert client.once_dp_events(SPEC) == [GaussianEvent(noise_multiplier=2.0)]
