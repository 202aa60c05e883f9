"""Intervals for the numbers a data scientist compares: means over seeds, paired gains, two accuracies.

Three questions come up whenever two runs are compared, and each has its own interval:

* *How sure is a mean over seeds?* :func:`mean_interval`: the two-sided Student-t interval of the mean.
* *Does method A beat method B on the same seeds and splits?* :func:`paired_interval`: the t-interval of
  the per-seed differences ``a_s − b_s``. Pairing removes what the seed does to both (which hospitals were
  drawn, which images landed in test), so it is far narrower than comparing two unpaired means.
* *Does run A beat run B at one site, from one run each?* :func:`accuracy_gain`: Newcombe's hybrid score
  interval for the difference of two proportions (Newcombe 1998, method 10), built from the two Wilson
  score intervals. It treats the two accuracies as independent; when both runs scored the same test images
  the true paired interval is narrower, so this one errs wide (it never claims a gain the data do not show).

Everything is plain Python over floats (SciPy only for the t quantile), so the report and the benchmarks
share it.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from scipy.stats import norm, t


@dataclass(frozen=True)
class Interval:
    """A point estimate and its two-sided interval.

    Attributes:
        value: the estimate (a mean, a mean difference, a difference of accuracies).
        low: lower end.
        high: upper end.
        n: observations behind it (seeds, or test images of the smaller run).
    """

    value: float
    low: float
    high: float
    n: int

    @property
    def half_width(self) -> float:
        """Half the interval's width (symmetric intervals: ``value ± half_width``)."""
        return (self.high - self.low) / 2

    def excludes_zero(self) -> bool:
        """Whether 0 lies outside the interval (the sign of ``value`` is supported by the data)."""
        return self.low > 0 or self.high < 0

    def __str__(self) -> str:
        return f"{self.value:+.3f} [{self.low:+.3f}, {self.high:+.3f}]"


def mean_interval(values: Sequence[float], level: float = 0.95) -> Interval:
    """Mean of ``values`` with its Student-t interval.

    One value has no spread to estimate, so its interval is unbounded (−∞, +∞): it never excludes 0, and a
    one-seed table cannot mark a gain as supported or a site as losing.

    Raises:
        ValueError: ``values`` is empty or ``level`` not in (0, 1).
    """
    if not values:
        raise ValueError("mean_interval: no values")
    if not 0 < level < 1:
        raise ValueError(f"mean_interval: level must be in (0, 1), got {level}")
    mean = statistics.fmean(values)
    if len(values) < 2:
        return Interval(mean, -math.inf, math.inf, len(values))
    half = float(t.ppf(0.5 + level / 2, len(values) - 1)) * statistics.stdev(values) / math.sqrt(len(values))
    return Interval(mean, mean - half, mean + half, len(values))


def paired_interval(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> Interval:
    """Mean of ``a_i − b_i`` with its t-interval: ``a`` and ``b`` measured on the same seeds, in the same order.

    Raises:
        ValueError: the sequences differ in length or are empty.
    """
    if len(a) != len(b):
        raise ValueError(f"paired_interval: {len(a)} values against {len(b)}; pairs need the same seeds")
    return mean_interval([x - y for x, y in zip(a, b, strict=True)], level)


def wilson(correct: float, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval ``(low, high)`` of a proportion ``correct / n``.

    Raises:
        ValueError: ``n`` < 1 or ``correct`` outside ``[0, n]``.
    """
    if n < 1 or not 0 <= correct <= n:
        raise ValueError(f"wilson: need 0 ≤ correct ≤ n and n ≥ 1, got {correct} of {n}")
    z = float(norm.ppf(0.5 + level / 2))
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def accuracy_gain(acc_a: float, n_a: int, acc_b: float, n_b: int, level: float = 0.95) -> Interval:
    """``acc_a − acc_b`` with Newcombe's hybrid score interval (independent proportions; see the module).

    Args:
        acc_a: accuracy of run A on ``n_a`` test images.
        n_a: A's test images (≥ 1).
        acc_b: accuracy of run B on ``n_b`` test images.
        n_b: B's test images (≥ 1).
        level: confidence level.
    """
    la, ua = wilson(acc_a * n_a, n_a, level)
    lb, ub = wilson(acc_b * n_b, n_b, level)
    d = acc_a - acc_b
    low = d - math.sqrt((acc_a - la) ** 2 + (ub - acc_b) ** 2)
    high = d + math.sqrt((ua - acc_a) ** 2 + (acc_b - lb) ** 2)
    return Interval(d, low, high, min(n_a, n_b))
