"""Exact duration figures: nearest-rank percentiles, exact mean and variance."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flowledger.projections.stats import durations, nearest_rank, ratio


def test_nearest_rank_picks_an_observed_sample() -> None:
    hundred = list(range(1, 101))
    assert [nearest_rank(hundred, p) for p in (50, 95, 99, 100)] == [50, 95, 99, 100]
    assert [nearest_rank([7], p) for p in (50, 95, 99)] == [7, 7, 7]
    assert [nearest_rank([1, 2], p) for p in (50, 51, 95)] == [1, 2, 2]
    with pytest.raises(ValueError, match="no samples"):
        nearest_rank([], 50)


def test_figures_of_no_samples_are_empty() -> None:
    empty = durations([])
    assert empty.count == 0
    assert (empty.mean, empty.variance, empty.p50, empty.max) == (None, None, None, None)
    assert ratio(1, 0) is None


def test_figures_are_in_seconds_from_microseconds_in_any_order() -> None:
    d = durations([3_000_000, 1_000_000, 2_000_000, 4_000_000])
    assert (d.count, d.p50, d.p95, d.p99, d.min, d.max) == (4, 2.0, 4.0, 4.0, 1.0, 4.0)
    assert (d.mean, d.variance) == (2.5, 1.25)


@given(st.lists(st.integers(min_value=0, max_value=10**13), min_size=1, max_size=200))
def test_mean_and_variance_are_exact(samples: list[int]) -> None:
    d = durations(samples)
    n = len(samples)
    mean = Fraction(sum(samples), n)
    variance = sum((Fraction(x) - mean) ** 2 for x in samples) / n
    assert d.mean == float(mean / 10**6)
    assert d.variance == float(variance / 10**12)
    ordered = sorted(samples)
    assert d.p50 == ordered[math.ceil(n / 2) - 1] / 10**6  # the median's rank, observed
    assert (d.min, d.max) == (ordered[0] / 10**6, ordered[-1] / 10**6)
