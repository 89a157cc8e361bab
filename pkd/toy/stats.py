"""Paired statistics for the demo's comparison: a seed fixes a student's data order for every
variant, so variants are compared seed by seed (the difference per seed) and summarised by the
mean difference with a 95% t-interval over seeds, and two rankings by the AUC.

The t quantiles are tabulated rather than taken from scipy, which the project does not otherwise
need; they are the standard two-sided 95% values, t_{0.975, df}.
"""

from __future__ import annotations

import bisect
import math
import statistics
from collections.abc import Sequence
from typing import Any

T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086}  # fmt: skip


def t_quantile(df: int) -> float:
    """t_{0.975, df}; beyond the table the normal 1.96 is within 2.5% of it."""
    if df < 1:
        raise ValueError(f"a t-interval needs at least 2 values (df = {df})")
    return T_975.get(df, 1.96)


def mean_ci(values: Sequence[float]) -> dict[str, Any]:
    """Mean and 95% t-interval half-width (None for one value, where no interval exists)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return {"mean": mean, "ci95": None, "values": list(values)}
    half = t_quantile(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return {"mean": mean, "ci95": half, "values": list(values)}


def paired_difference(a: dict[str, float], b: dict[str, float]) -> dict[str, Any]:
    """a − b seed by seed (dicts keyed by seed, same keys), with the mean difference's 95%
    t-interval and whether it excludes 0 (`sign`: +1, −1, or 0 when the interval covers 0)."""
    if set(a) != set(b):
        raise ValueError(f"unpaired seeds: {sorted(a)} vs {sorted(b)}")
    seeds = sorted(a, key=int)
    out = mean_ci([a[s] - b[s] for s in seeds])
    lo = hi = out["mean"]
    if out["ci95"] is not None:
        lo, hi = out["mean"] - out["ci95"], out["mean"] + out["ci95"]
    out["sign"] = 0 if out["ci95"] is None or lo <= 0 <= hi else (1 if lo > 0 else -1)
    out["seeds"] = seeds
    return out


def auc(positive: Sequence[float], negative: Sequence[float]) -> float | None:
    """P(a random positive scores above a random negative), ties counting half (the Mann-Whitney
    U / (n_pos · n_neg)); None when either group is empty."""
    if not positive or not negative:
        return None
    neg = sorted(negative)
    wins = 0.0
    for p in positive:
        below, upto = bisect.bisect_left(neg, p), bisect.bisect_right(neg, p)
        wins += below + 0.5 * (upto - below)
    return wins / (len(positive) * len(negative))


def mean_of(reports: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Field-by-field mean of reports of one shape (nested dicts of numbers), e.g. one cache
    diagnosis per seed; a field that is None in any report (an AUC with an empty group) is None."""

    def mean(values: list[Any]) -> Any:
        if isinstance(values[0], dict):
            return {k: mean([v[k] for v in values]) for k in values[0] if all(k in v for v in values)}
        if any(v is None for v in values):
            return None
        return statistics.fmean(values)

    return mean(list(reports))
