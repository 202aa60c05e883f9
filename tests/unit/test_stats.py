"""Intervals for comparisons: means over seeds, paired gains, two accuracies (checked against published values)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medsilo.stats import accuracy_gain, mean_interval, paired_interval, wilson


def test_newcombe_interval_matches_the_published_example():
    # Newcombe (1998), Statist. Med. 17:873, Table II example (56/70 vs 48/80), method 10: 0.0524 to 0.3339
    gain = accuracy_gain(56 / 70, 70, 48 / 80, 80)
    assert gain.value == pytest.approx(0.2)
    assert (gain.low, gain.high) == pytest.approx((0.0524, 0.3339), abs=1e-4)
    assert gain.excludes_zero()


def test_wilson_stays_inside_0_1_and_refuses_impossible_counts():
    low, high = wilson(0, 10)
    assert low == 0.0 and 0 < high < 0.35
    assert wilson(10, 10)[1] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="0 ≤ correct ≤ n"):
        wilson(11, 10)


def test_mean_interval_is_the_t_interval_and_covers_the_mean_at_its_level():
    assert mean_interval([1.0, 2.0, 3.0]).half_width == pytest.approx(2.484, abs=1e-3)  # t(0.975, 2) · 1/√3
    single = mean_interval([0.7])  # one seed: a mean, but no interval, so no claim that it is above 0
    assert single.value == 0.7 and (single.low, single.high) == (-math.inf, math.inf) and not single.excludes_zero()
    assert not paired_interval([0.9], [0.1]).excludes_zero()
    rng = np.random.default_rng(0)
    draws = [list(rng.normal(0.3, 1.0, 5)) for _ in range(2000)]
    covered = sum(mean_interval(d).low <= 0.3 <= mean_interval(d).high for d in draws)
    assert 0.93 <= covered / len(draws) <= 0.97
    with pytest.raises(ValueError, match="no values"):
        mean_interval([])


def test_pairing_removes_what_the_seed_does_to_both():
    seed_effect = [0.60, 0.80, 0.70, 0.90, 0.65]
    a = [s + 0.03 for s in seed_effect]  # A is 3 points better on every seed
    assert paired_interval(a, seed_effect).low > 0.0299
    assert mean_interval(a).low < mean_interval(seed_effect).high  # unpaired, the two means overlap
    with pytest.raises(ValueError, match="same seeds"):
        paired_interval(a, seed_effect[:4])
