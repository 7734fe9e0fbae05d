"""The statistics of a report: mean ± sample sd, and the paired comparison of two methods on the same seeds."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof=1; None for a single value)."""
    if not values:
        raise ValueError("mean_std of no values")
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


@dataclass
class PairedTest:
    """COLA minus LoRA on the same seeds: mean difference, wins/losses/ties, paired t-test and sign test."""

    n: int
    mean_diff: float | None
    wins: int
    losses: int
    ties: int
    t_stat: float | None
    t_pvalue: float | None
    sign_pvalue: float | None


def paired_test(a: Sequence[float], b: Sequence[float]) -> PairedTest:
    """Paired comparison of ``a`` (e.g. COLA) against ``b`` (LoRA), element i of each from the same seed.

    t-test: ``scipy.stats.ttest_rel(a, b)`` (two-sided; needs n ≥ 2 and non-constant differences).
    Sign test: exact two-sided binomial test of wins among non-tied pairs, ``binomtest(wins, wins+losses)``.
    """
    from scipy import stats

    if len(a) != len(b):
        raise ValueError("paired samples must have the same length")
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    wins = sum(d > 0 for d in diffs)
    losses = sum(d < 0 for d in diffs)
    ties = len(diffs) - wins - losses
    t_stat = t_p = None
    if len(diffs) >= 2 and len(set(diffs)) > 1:
        res = stats.ttest_rel(a, b)
        t_stat, t_p = float(res.statistic), float(res.pvalue)
    sign_p = float(stats.binomtest(wins, wins + losses, 0.5).pvalue) if wins + losses else None
    return PairedTest(
        n=len(diffs),
        mean_diff=statistics.fmean(diffs) if diffs else None,
        wins=wins,
        losses=losses,
        ties=ties,
        t_stat=t_stat,
        t_pvalue=t_p,
        sign_pvalue=sign_p,
    )
