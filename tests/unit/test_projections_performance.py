"""Performance history, folded from histories with known times: every figure is checked
against what the events say, on the in-memory store and on SQLite."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta
from fractions import Fraction
from pathlib import Path

import pytest
from projection_histories import (
    STORES,
    Store,
    at,
    complete,
    completed_at_110,
    error,
    failed_at_6,
    opened,
    parallel_completed_at_14,
    parallel_failed_at_3,
    parallel_retried_at_10,
    retried_at_100,
    run_step,
)

from flowledger.domain.errors import WorkflowNotFound
from flowledger.domain.states import ExecutionStatus
from flowledger.projections.performance import Performance, StepFigures


@pytest.fixture(params=sorted(STORES))
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    with opened(request.param, tmp_path) as found:
        yield found


def figures(store: Store, since: datetime | None = None, version: str | None = None) -> Performance:
    return store.caught_up().performance.view.performance("orders", version, since)


def step(perf: Performance, step_id: str) -> StepFigures:
    return next(s for s in perf.steps if s.step_id == step_id)


def reserve_history(store: Store) -> None:
    """`reserve` takes i seconds in execution i (1..10), the 3rd and 7th after a failed
    first attempt of 0.5 s; in execution 11 it fails for good after 20 s."""
    for i in range(1, 12):
        start = i * 100.0
        ex = store.begin(start)
        if i in (3, 7):
            ex.start_step("reserve", "reserve", "", {}, at(start))
            ex.schedule_retry("reserve", error(), 0.5, at(start + 1), at(start + 0.5))
            ex.fire_timer("reserve#retry1", at(start + 1))
            ex.start_step("reserve", "reserve", "", {}, at(start + 1))
            ex.succeed_step("reserve", {}, {}, at(start + i))
        elif i == 11:
            ex.start_step("reserve", "reserve", "", {}, at(start))
            ex.fail_step("reserve", error("ValueError"), at(start + 20))
        else:
            run_step(ex, "reserve", start, start + i)
        store.save(ex)


def test_step_figures_are_counted_from_the_events(store: Store) -> None:
    reserve_history(store)

    reserve = step(figures(store), "reserve")

    assert (reserve.type, reserve.runs, reserve.succeeded, reserve.failed) == ("action", 11, 10, 1)
    assert (reserve.attempts, reserve.retries) == (13, 2)
    assert reserve.success_rate == 10 / 11
    assert reserve.retry_rate == 2 / 11
    d = reserve.duration
    # Samples 1..10 and 20 s; nearest rank: p50 is the 6th of 11, p95 and p99 the 11th.
    assert (d.count, d.p50, d.p95, d.p99, d.min, d.max) == (11, 6.0, 20.0, 20.0, 1.0, 20.0)
    assert d.mean == float(Fraction(75, 11))
    assert d.variance == float(Fraction(785, 11) - Fraction(75, 11) ** 2)


def test_agent_figures_count_attempts(store: Store) -> None:
    reserve_history(store)
    # One attempt lost with its worker, and one run by a remote agent the event names.
    lost = store.begin(2000)
    lost.start_step("reserve", "reserve", "", {}, at(2000))
    lost.schedule_retry("reserve", error("WorkerLost"), 0.0, at(2050), at(2050))
    store.save(lost)
    remote = store.begin(3000)
    remote.start_step("reserve", "reserve", "", {}, at(3000))
    remote.succeed_step("reserve", {}, {}, at(3004))
    events = remote.collect_events()
    events[1].__dict__["agent"] = "gpu-1"
    store.app.save_events(events)

    gpu, local = figures(store).agents  # by name

    assert (local.agent, local.attempts, local.succeeded, local.failed) == ("local", 14, 10, 4)
    assert (local.retried, local.lost, local.cancelled) == (3, 1, 0)
    assert local.success_rate == 10 / 14
    assert local.retry_rate == 3 / 14
    # The lost attempt ended at an unknown time: no duration. The others: 1..10 s for the
    # succeeded attempts of the steps without a retry, 2 s and 6 s for the two second
    # attempts, 0.5 s twice for the failed first attempts, 20 s for the final failure.
    samples = [1, 2, 4, 5, 6, 8, 9, 10, 2, 6, 0.5, 0.5, 20]
    assert local.duration.count == len(samples)
    assert local.duration.mean == float(sum(Fraction(str(s)) for s in samples) / len(samples))
    assert (gpu.agent, gpu.attempts, gpu.succeeded, gpu.duration.p50) == ("gpu-1", 1, 1, 4.0)


def test_steps_on_no_agent_have_no_agent_figures(store: Store) -> None:
    ex = store.begin(0)
    ex.wait_step("approve", "approve", "", {}, "human_deadline", None, at(1), assignee="alice")
    ex.complete_human_task("approve", {"ok": True}, {}, at(31))
    ex.select_branch("route", "route", "", 1, ["ship"], [("express", "express")], {}, {}, at(31))
    store.save(ex)

    perf = figures(store)

    assert perf.agents == []
    approve, route, express = step(perf, "approve"), step(perf, "route"), step(perf, "express")
    assert (approve.type, approve.runs, approve.duration.p50) == ("human_task", 1, 30.0)
    assert (route.runs, route.succeeded, route.duration.p50) == (1, 1, 0.0)
    assert (express.runs, express.skipped, express.success_rate) == (0, 1, None)
    assert [s.step_id for s in perf.steps] == ["approve", "route", "express"]  # definition order


def test_execution_figures_and_sla_compliance(store: Store) -> None:
    # Completed in 5, 10, 15 and 30 s; one failed, one timed out, one cancelled, one running.
    for i, seconds in enumerate((5, 10, 15, 30)):
        ex = store.begin(i * 100)
        complete(ex, i * 100 + seconds)
        store.save(ex)
    for i, status in enumerate((ExecutionStatus.FAILED, ExecutionStatus.TIMED_OUT), start=4):
        ex = store.begin(i * 100)
        ex.finish(status, "no", at(i * 100 + 1))
        store.save(ex)
    cancelled, running = store.begin(600), store.begin(700)
    cancelled.finish(ExecutionStatus.CANCELLED, "by request", at(601))
    store.save(cancelled, running)

    perf = figures(store)

    x = perf.executions
    assert (x.ended, x.completed, x.failed, x.timed_out, x.cancelled, x.in_progress) == (
        7,
        4,
        1,
        1,
        1,
        1,
    )
    assert x.success_rate == 4 / 6  # cancellations are not judged
    assert (x.duration.count, x.duration.p50, x.duration.p95, x.duration.mean) == (
        4,
        10.0,
        30.0,
        15.0,
    )
    (version,) = perf.versions
    assert {c.target: (c.goal, c.actual, c.met) for c in version.sla} == {
        "duration_p50": (10.0, 10.0, True),
        "duration_p95": (12.0, 30.0, False),
        "success_rate": (0.9, 4 / 6, False),
    }


def test_a_version_is_judged_against_its_own_targets(store: Store) -> None:
    store.register(
        {
            "workflow_id": "orders",
            "version": "2",
            "sla_targets": {"duration_p99": 1},
            "steps": [{"step_id": "reserve", "type": "action", "action": "shop.reserve"}],
        }
    )
    store.save(store.begin(0))  # version 1, still running

    perf = figures(store)

    assert [(v.version, [c.target for c in v.sla]) for v in perf.versions] == [
        ("1", ["duration_p50", "duration_p95", "success_rate"]),
        ("2", ["duration_p99"]),
    ]
    assert all(c.met is None and c.actual is None for v in perf.versions for c in v.sla)
    only = figures(store, version="2")
    assert [v.version for v in only.versions] == ["2"]
    assert only.executions.in_progress == 0


def test_a_window_keeps_what_ended_at_or_after_its_start(store: Store) -> None:
    reserve_history(store)  # reserve ends at 101, 202, ..., 1010 s, and fails at 1120 s

    assert step(figures(store, since=at(505)), "reserve").runs == 7  # 505, 606, ... 1010, 1120
    assert step(figures(store, since=at(506)), "reserve").runs == 6
    assert figures(store, since=at(2000)).steps == []

    store.clock.moment = at(1120) + timedelta(hours=1)
    queries = store.queries
    assert queries.performance("orders", window=timedelta(hours=1)).steps[0].runs == 1
    assert queries.performance("orders", window=None).steps[0].runs == 11
    with pytest.raises(WorkflowNotFound):
        queries.performance("refunds")
    with pytest.raises(WorkflowNotFound):
        queries.performance("orders", "9")


def test_repeated_inputs_are_counted_with_whether_their_outputs_matched(store: Store) -> None:
    def run(start: float, key: str, data: dict[str, int], result: dict[str, int]) -> None:
        ex = store.begin(start)
        ex.start_step(key, key, "", data, at(start))
        ex.succeed_step(key, result, {}, at(start + 1))
        store.save(ex)

    run(0, "reserve", {"sku": 1}, {"r": 1})
    run(10, "reserve", {"sku": 1}, {"r": 1})  # same input, same output
    run(20, "reserve", {"sku": 1}, {"r": 1})
    run(30, "reserve", {"sku": 2}, {"r": 2})
    run(40, "reserve", {"sku": 2}, {"r": 3})  # same input, another output
    run(50, "reserve", {"sku": 3}, {"r": 3})  # seen once
    run(60, "ship", {"sku": 1}, {"r": 1})  # another step: counted apart

    reserve = step(figures(store), "reserve").repeated

    assert (reserve.distinct_inputs, reserve.repeated_inputs, reserve.repeated_runs) == (3, 2, 5)
    assert (reserve.outputs_matched, reserve.outputs_differed) == (1, 1)
    assert step(figures(store), "ship").repeated.repeated_inputs == 0


def test_a_rebuild_counts_every_figure_again_the_same(store: Store) -> None:
    reserve_history(store)
    view = store.caught_up().performance.view
    built, perf = view.dump(), figures(store)

    store.runner.rebuild()

    assert view.dump() == built
    assert figures(store) == perf


def test_a_retried_execution_is_counted_once_at_its_final_end(store: Store) -> None:
    ex = failed_at_6(store)
    failed = figures(store)
    assert (failed.executions.ended, failed.executions.failed) == (1, 1)
    assert (step(failed, "notify").runs, step(failed, "notify").failed) == (1, 1)

    retried_at_100(store, ex)
    running = figures(store)
    assert (running.executions.ended, running.executions.in_progress) == (0, 1)
    assert [s.step_id for s in running.steps if s.runs or s.cancelled or s.skipped] == ["reserve"]

    completed_at_110(store, ex)
    perf = figures(store)

    x = perf.executions
    assert (x.ended, x.completed, x.failed, x.in_progress, x.success_rate) == (1, 1, 0, 0, 1.0)
    assert x.duration.p50 == 110.0  # from the first start to the final end
    notify = step(perf, "notify")
    # One run, with every attempt: two before the retry, one after.
    assert (notify.runs, notify.succeeded, notify.failed, notify.cancelled) == (1, 1, 0, 0)
    assert (notify.attempts, notify.retries, notify.retry_rate) == (3, 2, 1.0)
    assert notify.duration.p50 == 101.0
    approve, route = step(perf, "approve"), step(perf, "route")
    assert (approve.runs, approve.cancelled, approve.succeeded) == (1, 0, 1)
    assert (route.runs, route.succeeded, route.attempts) == (1, 1, 2)
    assert (step(perf, "express").runs, step(perf, "express").skipped) == (0, 1)
    (local,) = perf.agents
    # notify's three attempts (the one that failed for good was followed by the retry's),
    # reserve's and ship's.
    assert (local.attempts, local.succeeded, local.failed, local.retried) == (5, 3, 2, 2)


def test_a_rebuild_counts_a_retried_execution_the_same(store: Store) -> None:
    ex = failed_at_6(store)
    retried_at_100(store, ex)
    completed_at_110(store, ex)
    view = store.caught_up().performance.view
    before = view.dump()

    store.runner.rebuild(["performance"])

    assert view.dump() == before


def test_a_resumed_container_is_one_run_that_ends_with_the_container(store: Store) -> None:
    ex = parallel_failed_at_3(store)
    parallel_retried_at_10(store, ex)
    parallel_completed_at_14(store, ex)

    view = store.caught_up().performance.view
    perf = view.performance("fanout")

    both, right = step(perf, "both"), step(perf, "right")
    assert (both.runs, both.succeeded, both.failed, both.attempts) == (1, 1, 0, 1)
    assert both.duration.p50 == 14.0
    assert (right.runs, right.succeeded, right.attempts, right.retries) == (1, 1, 2, 1)
    assert (perf.executions.completed, perf.executions.failed) == (1, 0)
    rows = view.query(
        "SELECT key, attempt, outcome, retried FROM perf_attempts WHERE execution_id = :eid "
        "ORDER BY key, attempt",
        eid=str(ex.id),
    )
    # The container's one attempt went on after the retry; right's first counts as retried.
    assert [(r["key"], r["attempt"], r["outcome"], r["retried"]) for r in rows] == [
        ("both", 1, "succeeded", 0),
        ("left", 1, "succeeded", 0),
        ("right", 1, "failed", 1),
        ("right", 2, "succeeded", 0),
    ]
