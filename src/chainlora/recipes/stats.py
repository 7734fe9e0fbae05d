"""The statistics of a report: mean ± sample sd, and the paired comparison of two methods on the same seeds."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof=1; None for a single value)."""
    if not values:
        raise ValueError("mean_std of no values")
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


@dataclass(frozen=True)
class PairedDifference:
    """``a − b`` over pairs of runs on the same seeds: the mean difference, its confidence interval (Student's t
    with n − 1 degrees of freedom), the paired t-test's two-sided p-value (``scipy.stats.ttest_rel``), wins /
    losses / ties of ``a``, and the exact two-sided sign test of the wins among the untied pairs
    (``scipy.stats.binomtest(wins, wins + losses)``)."""

    n: int
    mean: float
    low: float | None  # None with fewer than 2 pairs
    high: float | None
    pvalue: float | None  # None with fewer than 2 pairs or identical differences
    wins: int
    losses: int
    ties: int
    sd: float | None  # standard deviation of the differences
    sign_pvalue: float | None = None  # None when every pair is tied


def paired_difference(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> PairedDifference:
    """The paired comparison of ``a`` against ``b`` (element i of each from the same seed)."""
    from scipy import stats

    if len(a) != len(b):
        raise ValueError("paired samples must have the same length")
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    if not diffs:
        raise ValueError("paired_difference of no pairs")
    n, mean = len(diffs), statistics.fmean(diffs)
    wins, losses = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    counts = (wins, losses, n - wins - losses)
    sign = float(stats.binomtest(wins, wins + losses, 0.5).pvalue) if wins + losses else None
    if n < 2:
        return PairedDifference(n, mean, None, None, None, *counts, None, sign)
    sd = statistics.stdev(diffs)
    if sd == 0:
        return PairedDifference(n, mean, mean, mean, None, *counts, 0.0, sign)
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    pvalue = float(stats.ttest_rel(a, b).pvalue)
    return PairedDifference(n, mean, mean - half, mean + half, pvalue, *counts, sd, sign)


def seeds_for_power(
    effect: float, sd_diff: float, *, power: float = 0.8, alpha: float = 0.05, limit: int = 100_000
) -> int | None:
    """The fewest pairs with which a two-sided paired t-test at level ``alpha`` detects a true mean difference
    ``effect`` with probability ``power``, when the paired differences have standard deviation ``sd_diff``
    (exact, from the noncentral t distribution). None when ``effect`` is 0 or ``limit`` pairs do not suffice."""
    from scipy import stats

    if effect == 0 or not math.isfinite(effect):
        return None
    if sd_diff <= 0:
        return 2

    def achieved(n: int) -> float:
        df, nc = n - 1, abs(effect) / (sd_diff / math.sqrt(n))
        critical = stats.t.ppf(1 - alpha / 2, df)
        return float(stats.nct.sf(critical, df, nc) + stats.nct.cdf(-critical, df, nc))

    low, high = 2, 2
    while achieved(high) < power:
        low, high = high + 1, high * 2
        if high > limit:
            return None
    while low < high:
        middle = (low + high) // 2
        if achieved(middle) >= power:
            high = middle
        else:
            low = middle + 1
    return high
