"""DP mechanisms and the site accountant (``medsilo.secure.dp``): calibration, sampling, ε from dp_accounting."""

from __future__ import annotations

import json
import math

import dp_accounting as dpa
import numpy as np
import pytest
import torch
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant

from medsilo.config.site import Budget
from medsilo.errors import MedsiloError
from medsilo.secure import dp
from medsilo.secure.dp import BudgetExceeded, DPError, ExponentialEvent, GaussianEvent, PrivacyAccountant

FAST_PLD = 1e-3  # coarser PLD grid keeps the PLD tests fast; both sides of a comparison use it


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _hand_clip(x: torch.Tensor, c: float) -> torch.Tensor:
    rows = []
    for row in x.double():
        n = float(row.norm())
        rows.append(row * min(1.0, c / n) if n > 0 else row)
    return torch.stack(rows)


# ---- clipping ---------------------------------------------------------------------------------------------


def test_clip_rows_bounds_long_rows_and_keeps_short_ones_exactly():
    x = torch.randn(200, 7, generator=_gen()) * torch.logspace(-2, 2, 200).unsqueeze(1)
    c = 1.3
    y = dp.clip_rows(x, c)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert bool((y.double().norm(dim=1) <= c).all())
    short = x.double().norm(dim=1) <= c
    assert short.any() and (~short).any()
    assert torch.equal(y[short], x[short])  # bit for bit
    torch.testing.assert_close(y[~short].double(), _hand_clip(x[~short], c), rtol=1e-6, atol=1e-7)


def test_clip_rows_at_float32_rounding_edge_never_exceeds_bound():
    # rows whose clipped norm would round just above C in float32
    x = torch.randn(5000, 33, generator=_gen(1)) * 1e3
    for c in (0.1, 1.0, 3.7):
        assert bool((dp.clip_rows(x, c).double().norm(dim=1) <= c).all())


def test_clip_rows_zero_row_and_bad_input():
    assert torch.equal(dp.clip_rows(torch.zeros(2, 3), 1.0), torch.zeros(2, 3))
    with pytest.raises(DPError, match="clip must be a finite number > 0, got 0"):
        dp.clip_rows(torch.ones(2, 3), 0.0)
    with pytest.raises(DPError, match="NaN or inf"):
        dp.clip_rows(torch.tensor([[1.0, float("nan")]]), 1.0)
    with pytest.raises(DPError, match="2 dimension"):
        dp.clip_rows(torch.ones(3), 1.0)


# ---- gaussian_sum ----------------------------------------------------------------------------------------


def test_gaussian_sum_noise_free_part_is_the_sum_of_clipped_rows():
    # Prepare
    x = torch.randn(40, 6, generator=_gen()) * 2
    y = torch.randint(0, 4, (40,), generator=_gen(1))
    y[y == 3] = 2  # class 3 absent: still a (noised) row
    c = 1.5
    # Execute: σ so small the noise is far below float32 resolution of the sums
    sums, counts = dp.gaussian_sum(x, y, 4, c, 1e-12, _gen(2))
    # Assert
    clipped = _hand_clip(x, c)
    expected = torch.stack([clipped[y == k].sum(0) for k in range(4)]).float()
    torch.testing.assert_close(sums, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(counts, torch.bincount(y, minlength=4).float())
    assert sums.shape == (4, 6) and counts.shape == (4,) and sums.dtype == torch.float32


def test_gaussian_sum_noise_is_exactly_calibrated_from_the_seed():
    x = torch.randn(30, 5, generator=_gen()) * 3
    y = torch.randint(0, 3, (30,), generator=_gen(1))
    c, sigma = 0.8, 1.7
    sums, counts = dp.gaussian_sum(x, y, 3, c, sigma, _gen(7))
    clean_s, clean_n = dp.gaussian_sum(x, y, 3, c, 1e-12, _gen(7))
    # documented draw order: (K, d) sum noise, then (K,) count noise, standard normal float64
    g = _gen(7)
    z_s = torch.randn(3, 5, generator=g, dtype=torch.float64)
    z_n = torch.randn(3, generator=g, dtype=torch.float64)
    std = math.sqrt(2) * sigma * c
    torch.testing.assert_close((sums - clean_s).double(), std * z_s, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close((counts - clean_n).double(), std / c * z_n, rtol=1e-5, atol=1e-5)


def test_gaussian_sum_empirical_noise_std():
    c, sigma = 2.0, 0.7
    k = 4000  # many classes: one call gives 4000 count-noise and 4000·d sum-noise samples
    x = torch.randn(10, 3, generator=_gen())
    y = torch.arange(10)
    sums, counts = dp.gaussian_sum(x, y, k, c, sigma, _gen(3))
    clean_s, clean_n = dp.gaussian_sum(x, y, k, c, 1e-12, _gen(3))
    sum_noise, count_noise = (sums - clean_s).double(), (counts - clean_n).double()
    assert float(sum_noise.std()) == pytest.approx(math.sqrt(2) * sigma * c, rel=0.03)
    assert float(count_noise.std()) == pytest.approx(math.sqrt(2) * sigma, rel=0.05)
    assert abs(float(sum_noise.mean())) < 0.05 and abs(float(count_noise.mean())) < 0.05


def test_gaussian_sum_sensitivity_is_sqrt2_clip_for_add_remove_one():
    # the released vector [S, C·n] moves by exactly √2·C when a record of norm ≥ C is added
    c = 1.0
    x = torch.randn(20, 4, generator=_gen()) * 5
    y = torch.randint(0, 3, (20,), generator=_gen(1))
    s1, n1 = dp.gaussian_sum(x[:-1], y[:-1], 3, c, 1e-12, _gen())
    s2, n2 = dp.gaussian_sum(x, y, 3, c, 1e-12, _gen())
    moved = torch.cat([(s2 - s1).flatten(), c * (n2 - n1)]).double().norm()
    assert float(moved) == pytest.approx(dp.sum_sensitivity(c), rel=1e-5)
    assert dp.sum_sensitivity(c) == pytest.approx(math.sqrt(2) * c)


def test_gaussian_sum_is_deterministic_per_seed_and_accepts_numpy_generators():
    x, y = torch.randn(8, 3, generator=_gen()), torch.tensor([0, 1, 1, 0, 2, 2, 2, 0])
    a = dp.gaussian_sum(x, y, 3, 1.0, 1.0, _gen(5))
    b = dp.gaussian_sum(x, y, 3, 1.0, 1.0, _gen(5))
    other = dp.gaussian_sum(x, y, 3, 1.0, 1.0, _gen(6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], other[0])
    n1 = dp.gaussian_sum(x, y, 3, 1.0, 1.0, np.random.default_rng(5))
    n2 = dp.gaussian_sum(x, y, 3, 1.0, 1.0, np.random.default_rng(5))
    assert torch.equal(n1[0], n2[0]) and n1[0].dtype == torch.float32


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"noise_multiplier": 0.0}, "noise_multiplier must be a finite number > 0, got 0.0"),
        ({"noise_multiplier": float("nan")}, "noise_multiplier must be a finite number > 0"),
        ({"clip": -1.0}, "clip must be a finite number > 0, got -1.0"),
        ({"clip": float("inf")}, "clip must be a finite number > 0, got inf"),
        ({"num_classes": 0}, "num_classes must be an integer ≥ 1, got 0"),
        ({"labels": torch.tensor([0, 3])}, r"labels must lie in \[0, 3\)"),
        ({"labels": torch.tensor([0.0, 1.0])}, "labels must be a 1-D integer tensor"),
        ({"labels": torch.tensor([0])}, "labels has 1 entries but values has 2 rows"),
        ({"values": torch.tensor([[1.0], [float("inf")]])}, "values contains NaN or inf"),
        ({"generator": None}, "generator must be a torch.Generator or numpy.random.Generator"),
    ],
)
def test_gaussian_sum_refuses_bad_input(kwargs, message):
    args = {
        "values": torch.ones(2, 1),
        "labels": torch.tensor([0, 1]),
        "num_classes": 3,
        "clip": 1.0,
        "noise_multiplier": 1.0,
        "generator": _gen(),
    } | kwargs
    with pytest.raises(DPError, match=message):
        dp.gaussian_sum(**args)


# ---- weight updates ------------------------------------------------------------------------------------


def _update(scale: float, seed: int = 0) -> dict[str, torch.Tensor]:
    g = _gen(seed)
    return {"layer_a": torch.randn(4, generator=g) * scale, "layer_b": torch.randn(2, 2, generator=g) * scale}


def _global_norm(d: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in d.values()))


def test_clip_update_global_norm_is_exact_and_direction_kept():
    delta = _update(10.0)
    norm = _global_norm(delta)
    clipped, pre = dp.clip_update(delta, 2.0)
    assert pre == pytest.approx(norm)
    assert _global_norm(clipped) == pytest.approx(2.0, rel=1e-6) and _global_norm(clipped) <= 2.0
    for name in delta:  # one factor for all tensors (global, not per-tensor, clipping)
        torch.testing.assert_close(clipped[name], delta[name] * (2.0 / norm))
    small = _update(0.01)
    same, _ = dp.clip_update(small, 2.0)
    assert all(torch.equal(same[n], small[n]) for n in small)


def test_gaussian_update_noise_std_is_two_sigma_clip_and_shapes_kept():
    delta = {"w": torch.zeros(300, 100), "b": torch.zeros(100, dtype=torch.float64)}
    c, sigma = 0.5, 1.2
    noisy = dp.gaussian_update(delta, c, sigma, _gen(11))
    assert noisy["w"].shape == (300, 100) and noisy["w"].dtype == torch.float32
    assert noisy["b"].dtype == torch.float64
    assert float(noisy["w"].double().std()) == pytest.approx(2 * sigma * c, rel=0.02)
    assert dp.update_sensitivity(c) == 2 * c
    again = dp.gaussian_update(delta, c, sigma, _gen(11))
    assert torch.equal(noisy["w"], again["w"]) and torch.equal(noisy["b"], again["b"])


def test_gaussian_update_sensitivity_bound_holds_for_any_two_updates():
    a, _ = dp.clip_update(_update(50.0, seed=1), 1.0)
    b, _ = dp.clip_update({k: -v for k, v in _update(50.0, seed=1).items()}, 1.0)  # worst case: opposite
    diff = {k: a[k] - b[k] for k in a}
    assert _global_norm(diff) <= dp.update_sensitivity(1.0) + 1e-6
    assert _global_norm(diff) == pytest.approx(2.0, rel=1e-5)


def test_gaussian_update_refuses_nan_and_empty():
    with pytest.raises(DPError, match=r"delta\['w'\] contains NaN or inf"):
        dp.gaussian_update({"w": torch.tensor([1.0, float("nan")])}, 1.0, 1.0, _gen())
    with pytest.raises(DPError, match="non-empty dict"):
        dp.clip_update({}, 1.0)


# ---- exponential mechanism ------------------------------------------------------------------------------


def _softmax(v: np.ndarray) -> np.ndarray:
    e = np.exp(v - v.max())
    return e / e.sum()


def test_exponential_mechanism_frequencies_match_softmax():
    scores = np.array([0.0, 0.3, 1.0, 0.7])
    eps, sens, draws = 4.0, 1.0, 8000
    g = _gen(0)
    picks = np.array([int(dp.exponential_mechanism(scores, eps, sens, g).indices[0]) for _ in range(draws)])
    freq = np.bincount(picks, minlength=4) / draws
    expected = _softmax(eps * scores / (2 * sens))
    np.testing.assert_allclose(freq, expected, atol=0.02)
    np.testing.assert_allclose(dp.exponential_probabilities(scores, eps, sens).numpy(), expected, rtol=1e-12)


def test_exponential_mechanism_k_draws_are_distinct_and_first_draw_uses_eps_over_k():
    scores = np.array([0.0, 1.0, 0.5])
    eps, k, draws = 6.0, 2, 6000
    g = _gen(1)
    sels = [dp.exponential_mechanism(scores, eps, 1.0, g, k=k) for _ in range(draws)]
    assert all(len(set(s.indices.tolist())) == k for s in sels)
    first = np.bincount([int(s.indices[0]) for s in sels], minlength=3) / draws
    np.testing.assert_allclose(first, _softmax((eps / k) * scores / 2), atol=0.02)
    sel = sels[0]
    assert sel.epsilon == eps and sel.count == k and sel.indices.dtype == torch.int64
    assert sel.event == ExponentialEvent(epsilon=eps / k, count=k)


def test_exponential_mechanism_is_eps_dp_on_neighbouring_scores():
    # every score moves by at most Δ between neighbours: probabilities change by ≤ e^ε
    eps, sens = 1.5, 1.0
    s = np.array([0.2, 0.9, 0.4, 0.0])
    s_neighbour = s + np.array([1.0, -1.0, 0.5, -0.3]) * sens
    p = dp.exponential_probabilities(s, eps, sens).numpy()
    q = dp.exponential_probabilities(s_neighbour, eps, sens).numpy()
    assert np.max(np.abs(np.log(p / q))) <= eps + 1e-12


def test_exponential_mechanism_seeded_and_validated():
    a = dp.exponential_mechanism([0.1, 0.5, 0.2], 1.0, 1.0, _gen(9), k=2).indices
    b = dp.exponential_mechanism([0.1, 0.5, 0.2], 1.0, 1.0, _gen(9), k=2).indices
    assert torch.equal(a, b)
    with pytest.raises(DPError, match="scores contains NaN or inf"):
        dp.exponential_mechanism([0.1, float("nan")], 1.0, 1.0, _gen())
    with pytest.raises(DPError, match=r"k=3 exceeds the number of candidates \(2\)"):
        dp.exponential_mechanism([0.1, 0.2], 1.0, 1.0, _gen(), k=3)
    with pytest.raises(DPError, match="epsilon must be a finite number > 0, got -1.0"):
        dp.exponential_mechanism([0.1, 0.2], -1.0, 1.0, _gen())
    with pytest.raises(DPError, match="sensitivity must be a finite number > 0"):
        dp.exponential_mechanism([0.1, 0.2], 1.0, 0, _gen())


# ---- ε from dp_accounting --------------------------------------------------------------------------------


def test_gaussian_epsilon_equals_dp_accounting_rdp_and_pld():
    sigma, steps, delta = 1.1, 20, 1e-5
    rdp = (
        RdpAccountant().compose(dpa.SelfComposedDpEvent(dpa.GaussianDpEvent(sigma), steps)).get_epsilon(delta)
    )
    pld = (
        PLDAccountant(value_discretization_interval=FAST_PLD)
        .compose(dpa.SelfComposedDpEvent(dpa.GaussianDpEvent(sigma), steps))
        .get_epsilon(delta)
    )
    assert dp.gaussian_epsilon(sigma, steps, delta) == rdp
    assert dp.gaussian_epsilon(
        sigma, steps, delta, accountant="pld", pld_discretization=FAST_PLD
    ) == pytest.approx(pld, rel=1e-9)
    assert pld < rdp  # PLD is the tighter accountant


def test_gaussian_epsilon_poisson_sampled_equals_dp_accounting():
    event = dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(0.05, dpa.GaussianDpEvent(1.0)), 100)
    expected = RdpAccountant().compose(event).get_epsilon(1e-5)
    assert dp.gaussian_epsilon(1.0, 100, 1e-5, sampling_rate=0.05) == pytest.approx(expected, rel=1e-12)


def test_gaussian_epsilon_is_monotone():
    base = dp.gaussian_epsilon(1.0, 20, 1e-5)
    assert dp.gaussian_epsilon(1.0, 40, 1e-5) > base  # more steps, more ε
    assert dp.gaussian_epsilon(2.0, 20, 1e-5) < base  # more noise, less ε
    assert dp.gaussian_epsilon(1.0, 20, 1e-3) < base  # larger δ, less ε
    assert dp.gaussian_epsilon(1.0, 20, 1e-5, sampling_rate=0.1) < base  # subsampling amplifies


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"delta": 0.0}, "delta must be a finite number > 0, got 0.0"),
        ({"delta": 1.0}, r"delta must be in \(0, 1\), got 1.0"),
        ({"steps": 0}, "steps must be an integer ≥ 1, got 0"),
        ({"steps": True}, "steps must be an integer ≥ 1, got True"),
        ({"sampling_rate": 1.5}, r"sampling_rate must be in \(0, 1\], got 1.5"),
        ({"accountant": "rpd"}, "accountant 'rpd' is unknown; did you mean 'rdp'"),
    ],
)
def test_gaussian_epsilon_validates(kwargs, message):
    with pytest.raises(DPError, match=message):
        dp.gaussian_epsilon(**({"noise_multiplier": 1.0, "steps": 1, "delta": 1e-5} | kwargs))


def test_exponential_epsilon_pure_and_composed():
    assert dp.exponential_epsilon(0.5, count=4) == 2.0  # pure, δ = 0
    assert dp.exponential_epsilon(0.5, count=1, delta=1e-5) == 0.5  # few draws: basic composition is best
    many = dp.exponential_epsilon(0.05, count=400, delta=1e-5)  # 400 small draws: zCDP composition wins
    zcdp = RdpAccountant().compose(dpa.ZCDpEvent(rho=0.05**2 / 2), 400).get_epsilon(1e-5)
    assert many == pytest.approx(zcdp) and many < 20.0
    assert dp.exponential_epsilon(0.05, 400, 1e-5, accountant="pld", pld_discretization=FAST_PLD) < 20.0


# ---- the site accountant --------------------------------------------------------------------------------

MIXED = [
    {"mechanism": "gaussian", "noise_multiplier": 3.0, "steps": 1, "sampling_rate": 1.0},
    {"mechanism": "exponential", "epsilon": 0.2},
    {"mechanism": "gaussian", "noise_multiplier": 2.5, "steps": 2, "sampling_rate": 0.5},
    {"mechanism": "exponential", "epsilon": 0.2, "count": 3},
    {"mechanism": "gaussian", "noise_multiplier": 3.0, "steps": 1, "sampling_rate": 1.0},
]


@pytest.mark.parametrize("kind", ["rdp", "pld"])
def test_accountant_replay_equals_incremental_spending(kind):
    live = PrivacyAccountant(site="h1", delta=1e-5, accountant=kind, pld_discretization=FAST_PLD)
    spent = [live.spend(e["mechanism"], **{k: v for k, v in e.items() if k != "mechanism"}) for e in MIXED]
    totals = [t for _, t in spent]
    assert totals == sorted(totals) and totals[0] > 0  # ε never decreases
    assert math.fsum(c for c, _ in spent) == pytest.approx(totals[-1])  # ε_this is the increase
    ledger = json.loads(json.dumps(live.events_json()))  # through JSON, as the ledger stores them
    replayed = PrivacyAccountant.from_events(ledger, 1e-5, accountant=kind, pld_discretization=FAST_PLD)
    assert replayed.epsilon == live.epsilon == totals[-1]
    shuffled = PrivacyAccountant.from_events(ledger[::-1], 1e-5, accountant=kind, pld_discretization=FAST_PLD)
    assert shuffled.epsilon == pytest.approx(live.epsilon, rel=1e-12)
    assert replayed.events == live.events


def test_accountant_total_equals_composed_gaussian_epsilon():
    acc = PrivacyAccountant(delta=1e-5)
    for _ in range(20):
        acc.spend("gaussian", noise_multiplier=1.1)
    assert acc.epsilon == pytest.approx(dp.gaussian_epsilon(1.1, 20, 1e-5), rel=1e-12)


def test_accountant_pure_events_report_their_sum_when_that_is_tighter():
    acc = PrivacyAccountant(delta=1e-5)
    assert acc.spend("exponential", epsilon=0.5) == (0.5, 0.5)
    eps_this, total = acc.spend(ExponentialEvent(epsilon=0.25, count=2))
    assert total == pytest.approx(1.0) and eps_this == pytest.approx(0.5)
    # a Gaussian on top: basic composition bounds the total by ε_gauss + Σ ε_pure
    _, total = acc.spend(GaussianEvent(noise_multiplier=2.0))
    assert total <= dp.gaussian_epsilon(2.0, 1, 1e-5) + 1.0 + 1e-12


def test_would_exceed_and_budget_exceeded_refuse_before_recording():
    acc = PrivacyAccountant(site="hospital-a", scope="network", delta=1e-5, cap_epsilon=4.0)
    planned = [GaussianEvent(noise_multiplier=2.0)]
    first = dp.gaussian_epsilon(2.0, 1, 1e-5)
    two = dp.gaussian_epsilon(2.0, 2, 1e-5)
    assert first < 4.0 < two + first  # one release fits, the budget cannot take many more
    assert not acc.would_exceed(4.0, 1e-5, planned)
    acc.spend("gaussian", noise_multiplier=2.0)
    assert acc.would_exceed(two - 1e-6, 1e-5, planned) and not acc.would_exceed(two + 1e-6, 1e-5, planned)
    assert acc.would_exceed(4.0, 1e-9, planned * 3)  # a smaller δ costs more ε
    before = (acc.epsilon, acc.events)
    acc.spend("gaussian", noise_multiplier=2.0)  # the second one still fits (two < 4)
    with pytest.raises(BudgetExceeded) as info:
        acc.spend("gaussian", noise_multiplier=2.0)
    assert acc.epsilon == pytest.approx(two) and len(acc.events) == len(before[1]) + 1  # nothing recorded
    err = info.value
    assert isinstance(err, MedsiloError)
    assert err.site == "hospital-a" and err.scope == "network" and err.cap_epsilon == 4.0
    assert err.spent == pytest.approx(two) and err.total > 4.0 and err.cost == pytest.approx(err.total - two)
    msg = str(err)
    for part in (
        "hospital-a",
        "'network'",
        "cap ε=4",
        f"ε={two:.4g} already spent",
        "gaussian σ=2",
        "nothing was sent",
    ):
        assert part in msg, part
    assert "privacy.budget.epsilon" in msg and "noise_multiplier" in msg  # what to do


def test_accountant_for_site_budget_and_check():
    budget = Budget(epsilon=1.0, delta=1e-6, scope="network")
    acc = PrivacyAccountant.for_budget("h2", budget)
    assert (acc.delta, acc.cap_epsilon, acc.scope) == (1e-6, 1.0, "network")
    eps_this, total = acc.check({"mechanism": "exponential", "epsilon": 0.6})
    assert eps_this == total == 0.6 and acc.events == ()  # check records nothing
    acc.spend({"mechanism": "exponential", "epsilon": 0.6})
    with pytest.raises(BudgetExceeded, match="site h2: release \\(exponential ε=0.5 × 1 draw\\) refused"):
        acc.check(ExponentialEvent(epsilon=0.5))


@pytest.mark.parametrize(
    ("descriptor", "message"),
    [
        ({"mechanism": "gausian", "noise_multiplier": 1.0}, "'gausian' is unknown; did you mean 'gaussian'"),
        ({"mechanism": "gaussian", "noise_multiplier": 1.0, "sigma": 2}, r"unknown field\(s\) sigma"),
        ({"mechanism": "gaussian"}, "missing a field"),
        ({"mechanism": "gaussian", "noise_multiplier": -1.0}, "noise_multiplier must be a finite number > 0"),
        ({"mechanism": "exponential", "epsilon": 0.5, "count": 1.5}, "count must be an integer ≥ 1, got 1.5"),
        ({"epsilon": 0.5}, "must be a dict with a 'mechanism' field"),
    ],
)
def test_replay_refuses_malformed_events(descriptor, message):
    with pytest.raises(DPError, match=message):
        PrivacyAccountant.from_events([descriptor], 1e-5)


def test_event_json_round_trip():
    for event in (
        GaussianEvent(1.1),
        GaussianEvent(0.9, steps=5, sampling_rate=0.01),
        ExponentialEvent(0.5, 3),
    ):
        assert dp.event_from_json(json.loads(json.dumps(event.to_json()))) == event
    assert GaussianEvent(1.1).to_json() == {
        "mechanism": "gaussian",
        "noise_multiplier": 1.1,
        "steps": 1,
        "sampling_rate": 1.0,
    }
    assert dp.event_from_json({"mechanism": "exponential", "epsilon": 0.5}) == ExponentialEvent(0.5, 1)


@pytest.mark.parametrize("epsilon, steps", [(1.0, 10), (8.0, 3)])
def test_noise_for_epsilon_gives_the_target_and_no_less_noise(epsilon, steps):
    sigma = dp.noise_for_epsilon(epsilon, steps, 1e-5)
    assert dp.gaussian_epsilon(sigma, steps, 1e-5) <= epsilon * (1 + 1e-6)
    assert dp.gaussian_epsilon(sigma * 0.99, steps, 1e-5) > epsilon  # 1 % less noise overspends


# ---- DP-SGD pieces -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n, batch, epochs, expected",
    [(360, 32, 1, (12, 32 / 360)), (12, 4, 2, (6, 1 / 3)), (10, 32, 3, (3, 1.0)), (10, 3, 1, (4, 0.3))],
)
def test_poisson_schedule_by_hand(n, batch, epochs, expected):
    steps, rate = dp.poisson_schedule(n, batch, epochs)
    assert (steps, rate) == (expected[0], pytest.approx(expected[1]))


def test_poisson_sample_includes_each_record_independently_with_rate_q():
    g = _gen(3)
    masks = torch.zeros(4000, 10)
    for step in range(4000):
        idx = dp.poisson_sample(10, 0.3, g)
        assert idx.dtype == torch.int64 and bool((idx[1:] > idx[:-1]).all())
        masks[step, idx] = 1.0
    # every record at rate q; pairs independent (joint rate q²); batch sizes vary (binomial, not fixed)
    torch.testing.assert_close(masks.mean(0), torch.full((10,), 0.3), atol=0.03, rtol=0)
    assert float((masks[:, 0] * masks[:, 1]).mean()) == pytest.approx(0.09, abs=0.015)
    sizes = masks.sum(1)
    assert float(sizes.var()) == pytest.approx(10 * 0.3 * 0.7, rel=0.1) and float(sizes.min()) == 0
    assert dp.poisson_sample(5, 1.0, _gen()).tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: dp.poisson_sample(10, 0.0, _gen()), r"sampling_rate must be a finite number > 0, got 0\.0"),
        (lambda: dp.poisson_sample(10, 1.5, _gen()), r"sampling_rate must be in \(0, 1\], got 1\.5"),
        (lambda: dp.poisson_sample(10, 0.5, np.random.default_rng(0)), "generator must be a torch.Generator"),
        (lambda: dp.poisson_schedule(0, 4, 1), r"n must be an integer ≥ 1, got 0"),
        (lambda: dp.poisson_schedule(10, 4, 0), r"epochs must be an integer ≥ 1, got 0"),
    ],
)
def test_poisson_sampling_refuses_bad_parameters(call, message):
    with pytest.raises(DPError, match=message):
        call()


def test_clipped_gradient_sum_clips_each_record_jointly_over_all_tensors_by_hand():
    # Prepare: record 0 has joint norm 5 (3-4-0 over two tensors), record 1 norm 0.5, record 2 zero
    per_sample = {
        "w": torch.tensor([[[3.0, 0.0]], [[0.3, 0.0]], [[0.0, 0.0]]]),  # (3, 1, 2)
        "b": torch.tensor([[4.0], [0.4], [0.0]]),  # (3, 1)
    }
    # Execute
    out = dp.clipped_gradient_sum(per_sample, 1.0)
    # Assert: record 0 scaled by 1/5 (both tensors together), record 1 kept, zero record adds nothing
    assert out["w"].dtype == torch.float64 and out["w"].shape == (1, 2) and out["b"].shape == (1,)
    torch.testing.assert_close(out["w"], torch.tensor([[0.6 + 0.3, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(out["b"], torch.tensor([0.8 + 0.4], dtype=torch.float64))
    empty = dp.clipped_gradient_sum({"w": torch.zeros(0, 2, 3)}, 1.0)
    assert torch.equal(empty["w"], torch.zeros(2, 3, dtype=torch.float64))


def test_clipped_gradient_sum_moves_by_at_most_the_clip_when_a_record_is_removed():
    grads = {"w": torch.randn(16, 5, 3, generator=_gen()) * 10, "b": torch.randn(16, 7, generator=_gen(1))}
    full = dp.clipped_gradient_sum(grads, 0.7)
    for i in range(16):
        rest = dp.clipped_gradient_sum({k: torch.cat([v[:i], v[i + 1 :]]) for k, v in grads.items()}, 0.7)
        moved = _global_norm({k: full[k] - rest[k] for k in full})
        assert moved <= dp.gradient_sensitivity(0.7) * (1 + 1e-12)
        assert moved == pytest.approx(0.7, rel=1e-9)  # every record here is longer than the clip


@pytest.mark.parametrize(
    "grads, message",
    [
        ({"w": torch.tensor([[float("nan")]])}, r"per_sample\['w'\] contains NaN or inf"),
        ({"w": torch.zeros(3, 2), "b": torch.zeros(2, 2)}, "must share their first"),
        ({}, "non-empty dict"),
    ],
)
def test_clipped_gradient_sum_refuses_bad_input(grads, message):
    with pytest.raises(DPError, match=message):
        dp.clipped_gradient_sum(grads, 1.0)


def test_gaussian_gradient_noise_is_sigma_times_grad_clip_exactly_from_the_seed():
    grad_sum = {"w": torch.ones(300, 200, dtype=torch.float64), "b": torch.zeros(5)}
    noisy = dp.gaussian_gradient(grad_sum, 0.5, 3.0, _gen(4))
    g = _gen(4)
    expected_w = 1.0 + 1.5 * torch.randn(300, 200, generator=g, dtype=torch.float64)
    expected_b = 1.5 * torch.randn(5, generator=g, dtype=torch.float64)
    torch.testing.assert_close(noisy["w"], expected_w)
    torch.testing.assert_close(noisy["b"], expected_b)
    assert float((noisy["w"] - 1).std()) == pytest.approx(3.0 * 0.5, rel=0.02)
    assert dp.gradient_sensitivity(0.5) == 0.5
    with pytest.raises(DPError, match=r"grad_sum\['w'\] contains NaN"):
        dp.gaussian_gradient({"w": torch.tensor([float("inf")])}, 0.5, 3.0, _gen())


def test_dp_release_validates_and_refuses_dp_sgd_without_its_settings():
    from medsilo.config.job import DPSpec

    release = dp.DPRelease.from_spec(DPSpec(noise_multiplier=2.0, clip=0.5), _gen())
    assert (release.clip, release.noise_multiplier) == (0.5, 2.0)
    assert release.sgd() == (1.0, 2.0)  # grad_clip default 1.0; σ_sgd defaults to σ
    custom = dp.DPRelease.from_spec(
        DPSpec(noise_multiplier=2.0, clip=0.5, grad_clip=0.1, sgd_noise_multiplier=1.2), _gen()
    )
    assert custom.sgd() == (0.1, 1.2)
    with pytest.raises(DPError, match="carry no grad_clip / sgd_noise_multiplier"):
        dp.DPRelease(clip=1.0, noise_multiplier=1.0, generator=_gen()).sgd()
    with pytest.raises(DPError, match="grad_clip and sgd_noise_multiplier go together"):
        dp.DPRelease(clip=1.0, noise_multiplier=1.0, generator=_gen(), grad_clip=1.0)
    with pytest.raises(DPError, match=r"sgd_noise_multiplier must be a finite number > 0, got -1"):
        dp.DPRelease(clip=1.0, noise_multiplier=1.0, generator=_gen(), grad_clip=1.0, sgd_noise_multiplier=-1)
    with pytest.raises(DPError, match="generator must be a torch.Generator"):
        dp.DPRelease(clip=1.0, noise_multiplier=1.0, generator=np.random.default_rng(0))


def test_dpsgd_round_events_are_the_sampled_training_and_the_release():
    sgd, release = dp.dpsgd_round_events(3.0, 1.5, n=360, batch_size=32, epochs=2)
    assert sgd == GaussianEvent(noise_multiplier=1.5, steps=24, sampling_rate=32 / 360)
    assert release == GaussianEvent(noise_multiplier=3.0)


@pytest.mark.parametrize("epsilon", [1.0, 8.0])
def test_dpsgd_noise_for_epsilon_common_sigma_meets_the_target_with_no_less_noise(epsilon):
    # Prepare
    shape = dict(n=360, batch_size=32, epochs=1)

    def total(sigma: float) -> float:
        events = dp.dpsgd_round_events(sigma, sigma, **shape) * 10
        return PrivacyAccountant(delta=1e-5).cost(*events)[1]

    # Execute
    sigma = dp.dpsgd_noise_for_epsilon(epsilon, 10, 1e-5, **shape)
    # Assert: the site's own accountant lands on the target; 1 % less noise overspends; more than the
    # release alone would need (the training costs something)
    assert total(sigma) <= epsilon * (1 + 1e-6)
    assert total(sigma * 0.99) > epsilon
    assert sigma > dp.noise_for_epsilon(epsilon, 10, 1e-5)


def test_dpsgd_noise_for_epsilon_with_a_fixed_sgd_sigma():
    shape = dict(n=360, batch_size=32, epochs=1)
    sigma = dp.dpsgd_noise_for_epsilon(4.0, 10, 1e-5, sgd_noise_multiplier=2.0, **shape)
    events = dp.dpsgd_round_events(sigma, 2.0, **shape) * 10
    assert PrivacyAccountant(delta=1e-5).cost(*events)[1] == pytest.approx(4.0, rel=1e-5)
    with pytest.raises(
        DPError, match=r"DP-SGD at sgd_noise_multiplier=0\.5 alone costs ε=.* ≥ 4 over 10 rounds"
    ):
        dp.dpsgd_noise_for_epsilon(4.0, 10, 1e-5, sgd_noise_multiplier=0.5, **shape)


def test_dpsgd_noise_for_epsilon_of_training_alone_needs_less_noise_than_with_a_release():
    shape = dict(n=240, batch_size=32, epochs=1)
    sigma = dp.dpsgd_noise_for_epsilon(8.0, 50, 1e-5, release=False, **shape)
    events = dp.dpsgd_round_events(99.0, sigma, release=False, **shape)
    assert len(events) == 1 and events[0].steps == 8  # no release event, whatever σ the release would have
    spent = PrivacyAccountant(delta=1e-5).cost(*events * 50)[1]
    assert spent <= 8.0 * (1 + 1e-6) and PrivacyAccountant(delta=1e-5).cost(
        *dp.dpsgd_round_events(1.0, sigma * 0.99, release=False, **shape) * 50)[1] > 8.0
    assert sigma < dp.dpsgd_noise_for_epsilon(8.0, 50, 1e-5, **shape)
    with pytest.raises(DPError, match="without a release"):
        dp.dpsgd_noise_for_epsilon(8.0, 50, 1e-5, release=False, sgd_noise_multiplier=2.0, **shape)
