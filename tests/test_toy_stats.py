"""The demo's statistics: paired differences with t-intervals, and the AUC of a ranking."""

from __future__ import annotations

import itertools
import random

import pytest

from pkd.toy.stats import auc, mean_ci, mean_of, paired_difference, t_quantile


def test_t_interval_matches_the_textbook_example() -> None:
    # Five values, mean 10, s = √2.5: half-width t_{0.975,4} · s / √5 = 2.776 · 0.7071.
    out = mean_ci([8.0, 9.0, 10.0, 11.0, 12.0])
    assert out["mean"] == 10.0 and out["ci95"] == pytest.approx(2.776 * 0.70711, rel=1e-4)
    assert t_quantile(1) == 12.706 and t_quantile(200) == 1.96
    with pytest.raises(ValueError):
        t_quantile(0)


def test_pairing_removes_what_the_seeds_share() -> None:
    # A seed effect of ±10 shared by both variants: unpaired the gap of 1 is lost in it, paired it
    # is exact.
    a = {"0": 51.0, "1": 41.0, "2": 61.0, "3": 46.0}
    b = {s: v - 1.0 for s, v in a.items()}
    d = paired_difference(a, b)
    assert d["values"] == [1.0] * 4 and d["sign"] == 1
    noisy = paired_difference(a, {"0": 40.0, "1": 60.0, "2": 45.0, "3": 50.0})
    assert noisy["sign"] == 0  # the interval covers 0
    assert paired_difference({"0": 1.0, "1": 2.0}, {"0": 5.0, "1": 5.5})["sign"] == -1
    assert paired_difference({"0": 1.0}, {"0": 0.0})["sign"] == 0  # one seed: no claim
    with pytest.raises(ValueError, match="unpaired"):
        paired_difference({"0": 1.0}, {"1": 1.0})


def test_auc_is_the_share_of_correctly_ordered_pairs() -> None:
    rng = random.Random(0)
    pos = [rng.gauss(1, 1) for _ in range(40)] + [0.5]
    neg = [rng.gauss(0, 1) for _ in range(30)] + [0.5]
    brute = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    assert auc(pos, neg) == pytest.approx(brute / (len(pos) * len(neg)))
    assert auc([2, 3], [0, 1]) == 1.0 and auc([0, 1], [2, 3]) == 0.0 and auc([1], [1]) == 0.5
    assert auc([1.0], []) is None


def test_mean_of_averages_nested_reports_and_keeps_none() -> None:
    a = {"weights": {"auc": 0.8, "mean_wrong": None}, "agreement": {"all": {"agreement": 0.9, "tokens": 10}}}
    b = {"weights": {"auc": 0.6, "mean_wrong": 0.4}, "agreement": {"all": {"agreement": 0.7, "tokens": 10}}}
    m = mean_of([a, b])
    assert m["weights"]["auc"] == pytest.approx(0.7) and m["weights"]["mean_wrong"] is None
    assert m["agreement"]["all"] == {"agreement": pytest.approx(0.8), "tokens": 10}
