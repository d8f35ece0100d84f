"""End-to-end duration percentiles over time: a workflow's ended executions in buckets of
start time, for a chart.

The bucket width comes from a fixed ladder (a minute up to a week): the smallest that
keeps the buckets between the first start and the last at most the number asked for.
Buckets are aligned on Monday 1970-01-05 00:00 UTC, so an hour starts on the hour and a
week on a Monday. Each non-empty bucket counts its executions, completed and failed (any
other end), and gives the nearest-rank p50/p95/p99 of the completed ones' durations
(`stats.py`), None when none completed. `duration_series` is pure; `series_samples` reads
what it needs from the performance view.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from flowledger.domain.errors import InputInvalid
from flowledger.projections.performance import PerformanceView
from flowledger.projections.performance_samples import MAX_EXECUTIONS, ExecutionSample
from flowledger.projections.stats import US, durations

# Bucket widths, in seconds: 1 min, 5 min, 15 min, 1 h, 6 h, 1 day, 1 week.
LADDER: Final = (60, 300, 900, 3600, 21_600, 86_400, 604_800)
DEFAULT_BUCKETS: Final = 30
MAX_BUCKETS: Final = 200
# A Monday at midnight UTC, a whole number of every width: where buckets are counted from.
_ORIGIN: Final = 4 * 86_400
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class SeriesPoint:
    """One bucket of start times holding at least one ended execution."""

    start: str  # ISO 8601, UTC
    count: int
    completed: int
    failed: int  # ended otherwise: failed, timed out, cancelled
    p50: float | None  # seconds, of the completed executions' durations
    p95: float | None
    p99: float | None


@dataclass(frozen=True)
class DurationSeries:
    """A workflow's end-to-end durations over time (one version, or all when None)."""

    workflow_id: str
    version: str | None
    bucket_seconds: int
    points: list[SeriesPoint]


def check_buckets(buckets: int) -> None:
    """Raise InputInvalid unless 1 <= buckets <= MAX_BUCKETS."""
    if not 1 <= buckets <= MAX_BUCKETS:
        raise InputInvalid(f"buckets must be 1 to {MAX_BUCKETS} (not {buckets})")


def bucket_width(first: float, last: float, buckets: int) -> int:
    """The smallest width of the ladder giving at most `buckets` buckets from `first` to
    `last` (seconds since the epoch); the widest when none does."""
    for width in LADDER:
        if _index(last, width) - _index(first, width) + 1 <= buckets:
            return width
    return LADDER[-1]


def duration_series(
    workflow_id: str,
    version: str | None,
    samples: Iterable[ExecutionSample],
    buckets: int = DEFAULT_BUCKETS,
) -> DurationSeries:
    """The samples' duration percentiles per bucket of start time, oldest bucket first."""
    check_buckets(buckets)
    ordered = sorted(samples, key=lambda s: s.started_at)
    if not ordered:
        return DurationSeries(workflow_id, version, LADDER[0], [])
    width = bucket_width(ordered[0].started_at, ordered[-1].started_at, buckets)
    grouped: dict[int, list[ExecutionSample]] = {}
    for sample in ordered:
        grouped.setdefault(_index(sample.started_at, width), []).append(sample)
    points = [_point(index * width + _ORIGIN, found) for index, found in grouped.items()]
    return DurationSeries(workflow_id, version, width, points)


def _index(moment: float, width: int) -> int:
    return int((moment - _ORIGIN) // width)


def _point(start: int, found: list[ExecutionSample]) -> SeriesPoint:
    completed = [s for s in found if s.status == "completed"]
    figures = durations([round(s.duration * US) for s in completed if s.duration is not None])
    return SeriesPoint(
        start=(_EPOCH + timedelta(seconds=start)).isoformat(),
        count=len(found),
        completed=len(completed),
        failed=len(found) - len(completed),
        p50=figures.p50,
        p95=figures.p95,
        p99=figures.p99,
    )


def series_samples(
    view: PerformanceView, workflow_id: str, version: str | None, limit: int = MAX_EXECUTIONS
) -> list[ExecutionSample]:
    """The `limit` executions of a workflow (one version, or all) that ended last, in the
    order they ended, without their steps (`performance_samples.execution_samples` reads
    those too, for one version)."""
    where = "workflow_id = :wf AND finished_us IS NOT NULL"
    params: dict[str, Any] = {"wf": workflow_id, "limit": limit}
    if version is not None:
        where += " AND version = :v"
        params["v"] = version
    rows = view.query(
        "SELECT execution_id, status, started_us, duration_us FROM perf_executions "
        f"WHERE {where} ORDER BY finished_us DESC LIMIT :limit",
        **params,
    )
    return [
        ExecutionSample(
            execution_id=r["execution_id"],
            status=r["status"],
            started_at=int(r["started_us"]) / US,
            duration=None if r["duration_us"] is None else int(r["duration_us"]) / US,
        )
        for r in reversed(rows)
    ]
