"""Duration percentiles over time: the bucket width from the ladder, each bucket's counts and
nearest-rank percentiles, and the series read from the performance view per version."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from projection_histories import ORDERS, STORES, Store, at, complete, opened

from flowledger.domain.errors import InputInvalid, WorkflowNotFound
from flowledger.domain.states import ExecutionStatus
from flowledger.projections.performance_samples import ExecutionSample
from flowledger.projections.performance_series import (
    LADDER,
    MAX_BUCKETS,
    DurationSeries,
    SeriesPoint,
    bucket_width,
    duration_series,
)
from flowledger.projections.stats import US

# 2024-01-01 00:00 UTC, a Monday: a whole number of every width of the ladder past the origin.
MONDAY = datetime(2024, 1, 1, tzinfo=UTC).timestamp()
ENDED = ("completed", "failed", "timed_out", "cancelled")


def sample(
    start: float, duration: float | None = 1.0, status: str = "completed"
) -> ExecutionSample:
    return ExecutionSample(f"e-{start}-{duration}", status, MONDAY + start, duration)


def seconds(point: SeriesPoint) -> float:
    return datetime.fromisoformat(point.start).timestamp()


# -- the width ---------------------------------------------------------------------------


def test_the_width_is_the_smallest_rung_that_keeps_to_the_buckets() -> None:
    assert bucket_width(MONDAY, MONDAY + 29 * 60 + 59, 30) == 60  # 30 minutes: 30 buckets
    assert bucket_width(MONDAY, MONDAY + 30 * 60, 30) == 300  # 31 minutes would be 31
    assert bucket_width(MONDAY, MONDAY + 2 * 3600, 30) == 300
    assert bucket_width(MONDAY, MONDAY + 3 * 86_400, 30) == 21_600
    assert bucket_width(MONDAY, MONDAY, 1) == 60
    assert bucket_width(MONDAY, MONDAY + 59, 1) == 60
    assert bucket_width(MONDAY + 59, MONDAY + 61, 1) == 300  # a minute boundary between
    # Past the widest rung there is no narrower choice: the widest it is.
    assert bucket_width(MONDAY, MONDAY + 400 * 86_400, 30) == 604_800


def test_buckets_start_on_round_times_weeks_on_a_monday() -> None:
    weeks = duration_series("wf", None, [sample(3 * 86_400 + 5), sample(200 * 86_400)], 30)
    hours = duration_series("wf", "1", [sample(3600 * 5 + 17), sample(3600 * 30)], 30)

    assert weeks.bucket_seconds == 604_800
    assert [p.start for p in weeks.points] == [
        "2024-01-01T00:00:00+00:00",  # a Monday
        "2024-07-15T00:00:00+00:00",  # a Monday too
    ]
    assert hours.bucket_seconds == 3600
    assert [p.start for p in hours.points] == [
        "2024-01-01T05:00:00+00:00",
        "2024-01-02T06:00:00+00:00",
    ]


# -- the points --------------------------------------------------------------------------


def test_each_bucket_counts_its_executions_and_percentiles_of_the_completed() -> None:
    samples = [sample(60 + i / 2, float(i)) for i in range(1, 101)]  # 1 s .. 100 s, minute 1
    samples += [sample(130, 500.0, "failed"), sample(140, None, "timed_out")]  # minute 2
    samples += [sample(125, 7.0, "cancelled"), sample(179, 3.0)]  # minute 2

    series = duration_series("orders", "1", samples)

    assert series == DurationSeries(
        "orders",
        "1",
        60,
        [
            SeriesPoint("2024-01-01T00:01:00+00:00", 100, 100, 0, 50.0, 95.0, 99.0),
            SeriesPoint("2024-01-01T00:02:00+00:00", 4, 1, 3, 3.0, 3.0, 3.0),
        ],
    )


def test_a_bucket_with_nothing_completed_has_no_percentiles() -> None:
    series = duration_series(
        "orders", None, [sample(0, 9.0, "failed"), sample(1, None, "cancelled")]
    )

    assert series.points == [SeriesPoint("2024-01-01T00:00:00+00:00", 2, 0, 2, None, None, None)]


def test_no_samples_make_no_points() -> None:
    assert duration_series("orders", None, []) == DurationSeries("orders", None, 60, [])


@pytest.mark.parametrize("buckets", [0, -1, MAX_BUCKETS + 1])
def test_the_number_of_buckets_is_bounded(buckets: int) -> None:
    with pytest.raises(InputInvalid, match="buckets must be 1 to 200"):
        duration_series("orders", None, [sample(0)], buckets)


samples_strategy = st.lists(
    st.builds(
        lambda start_us, duration_us, status: ExecutionSample(
            "e", status, MONDAY + start_us / US, None if duration_us is None else duration_us / US
        ),
        st.integers(min_value=-(10**13), max_value=10**14),  # about -4 months to +3 years
        st.none() | st.integers(min_value=0, max_value=10**11),
        st.sampled_from(ENDED),
    ),
    max_size=60,
)


@given(samples_strategy, st.integers(min_value=1, max_value=MAX_BUCKETS))
def test_every_sample_lands_in_exactly_one_bucket(
    samples: list[ExecutionSample], buckets: int
) -> None:
    series = duration_series("wf", None, samples, buckets)
    width = series.bucket_seconds
    starts = [seconds(p) for p in series.points]

    assert width in LADDER
    assert starts == sorted(set(starts))
    assert all((start - MONDAY) % width == 0 for start in starts)
    for s in samples:
        homes = [p for p in series.points if seconds(p) <= s.started_at < seconds(p) + width]
        assert len(homes) == 1
    assert sum(p.count for p in series.points) == len(samples)
    assert sum(p.completed for p in series.points) == sum(s.status == "completed" for s in samples)
    assert all(p.count == p.completed + p.failed for p in series.points)
    assert all(p.count > 0 for p in series.points)
    if samples:
        first = min(s.started_at for s in samples)
        last = max(s.started_at for s in samples)
        span = (seconds(series.points[-1]) - seconds(series.points[0])) // width + 1
        assert span <= buckets or width == LADDER[-1]
        if width != LADDER[0]:  # the rung below would have needed more buckets
            narrower = LADDER[LADDER.index(width) - 1]
            assert bucket_width(first, last, buckets) == width
            assert (last - MONDAY) // narrower - (first - MONDAY) // narrower + 1 > buckets


@given(samples_strategy)
def test_percentiles_lie_within_the_completed_durations_of_their_bucket(
    samples: list[ExecutionSample],
) -> None:
    series = duration_series("wf", None, samples, 10)
    width = series.bucket_seconds

    for p in series.points:
        inside = [s for s in samples if seconds(p) <= s.started_at < seconds(p) + width]
        done = [s.duration for s in inside if s.status == "completed" and s.duration is not None]
        if not done:
            assert (p.p50, p.p95, p.p99) == (None, None, None)
            continue
        assert None not in (p.p50, p.p95, p.p99)
        assert min(done) <= p.p50 <= p.p95 <= p.p99 <= max(done)  # type: ignore[operator]
        assert {p.p50, p.p95, p.p99} <= set(done)  # nearest rank: observed durations


# -- read from the performance view ------------------------------------------------------


@pytest.fixture(params=sorted(STORES))
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    with opened(request.param, tmp_path) as found:
        yield found


def test_the_series_covers_one_version_or_every_version(store: Store) -> None:
    store.register({**ORDERS, "version": "2"})
    for start, version, length in ((0, "1", 10), (30, "1", 20), (90, "2", 40), (100, "2", 0)):
        ex = store.begin(start, version=version)
        if length:
            complete(ex, start + length)
        else:
            ex.finish(ExecutionStatus.FAILED, "it broke", at(start + 1))
        store.save(ex)
    store.save(store.begin(110))  # still running: not in the series

    every = store.queries.duration_series("orders", None, 30)
    v1 = store.queries.duration_series("orders", "1", 30)
    v2 = store.queries.duration_series("orders", "2", 1)

    assert (every.version, every.bucket_seconds) == (None, 60)
    assert every.points == [
        SeriesPoint("2024-01-01T00:00:00+00:00", 2, 2, 0, 10.0, 20.0, 20.0),
        SeriesPoint("2024-01-01T00:01:00+00:00", 2, 1, 1, 40.0, 40.0, 40.0),
    ]
    assert v1.points == every.points[:1]
    assert (v2.version, v2.bucket_seconds) == ("2", 60)
    assert v2.points == every.points[1:]
    with pytest.raises(WorkflowNotFound, match="no workflow 'nothing'"):
        store.queries.duration_series("nothing", None, 30)
    with pytest.raises(WorkflowNotFound, match="no version '3'"):
        store.queries.duration_series("orders", "3", 30)
    with pytest.raises(InputInvalid, match="buckets"):
        store.queries.duration_series("orders", None, 0)
