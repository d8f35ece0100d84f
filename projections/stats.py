"""Exact figures from stored duration samples: no sketch, no sampling, no interpolation.

Durations are stored as integer microseconds. Percentiles use the nearest-rank method, so
each one is a duration that was actually observed; the mean and the (population) variance
are computed in exact integer arithmetic and only then turned into seconds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

US = 1_000_000


@dataclass(frozen=True)
class Durations:
    """Duration figures of a set of samples, in seconds (variance in seconds squared)."""

    count: int
    mean: float | None
    variance: float | None
    p50: float | None
    p95: float | None
    p99: float | None
    min: float | None
    max: float | None


def nearest_rank(ordered: Sequence[int], percent: float) -> int:
    """The p-th percentile of sorted samples: the smallest sample with at least p% of the
    samples at or below it."""
    if not ordered:
        raise ValueError("no samples")
    rank = max(1, math.ceil(Fraction(str(percent)) / 100 * len(ordered)))
    return ordered[rank - 1]


def durations(samples_us: Sequence[int]) -> Durations:
    """Figures of duration samples given in microseconds (in any order)."""
    ordered = sorted(samples_us)
    n = len(ordered)
    if n == 0:
        return Durations(0, None, None, None, None, None, None, None)
    total = sum(ordered)
    squares = sum(x * x for x in ordered)
    mean = Fraction(total, n)
    variance = Fraction(squares, n) - mean * mean
    return Durations(
        count=n,
        mean=float(mean / US),
        variance=float(variance / (US * US)),
        p50=nearest_rank(ordered, 50) / US,
        p95=nearest_rank(ordered, 95) / US,
        p99=nearest_rank(ordered, 99) / US,
        min=ordered[0] / US,
        max=ordered[-1] / US,
    )


def ratio(part: int, whole: int) -> float | None:
    """part / whole, or None when there is nothing to divide."""
    return part / whole if whole else None
