"""The run views, folded from histories written with the aggregate's commands at known times,
on the in-memory store and on SQLite."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from eventsourcing.persistence import IntegrityError, Tracking
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

from flowledger.domain.errors import InputInvalid
from flowledger.domain.states import ExecutionStatus
from flowledger.projections.runs import ExecutionFilter, RunsView
from flowledger.services.documents import execution_document
from flowledger.services.queries import Queries


@pytest.fixture(params=sorted(STORES))
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    with opened(request.param, tmp_path) as found:
        yield found


def runs(store: Store) -> RunsView:
    return store.caught_up().runs.view


def ids(store: Store, **where: Any) -> list[str]:
    page = runs(store).executions(ExecutionFilter(**where), limit=1000)
    return [e.execution_id for e in page.executions]


# -- the list ------------------------------------------------------------------------------


def test_an_execution_is_listed_with_the_fields_of_its_document(store: Store) -> None:
    ex = store.begin(0, order="o-1")
    run_step(ex, "reserve", 1, 3.25)
    complete(ex, 4.5)
    store.save(ex)

    (row,) = runs(store).executions(ExecutionFilter()).executions

    doc = execution_document(store.app.execution(ex.id))
    assert row.as_row() == {k: doc[k] for k in row.as_row()}
    assert row.duration_seconds == 4.5
    assert row.status == "completed"


def test_executions_are_filtered_by_workflow_version_status_tag_and_start(store: Store) -> None:
    store.register(
        {
            "workflow_id": "orders",
            "version": "2",
            "tags": ["shop"],
            "steps": [{"step_id": "reserve", "type": "action", "action": "shop.reserve"}],
        }
    )
    store.register(
        {
            "workflow_id": "refunds",
            "version": "1",
            "steps": [{"step_id": "pay", "type": "action", "action": "bank.pay"}],
        }
    )
    first = store.begin(0)
    second = store.begin(100, version="2")
    third = store.begin(200, workflow_id="refunds")
    complete(second, 150)
    store.save(first, second, third)
    a, b, c = (str(x.id) for x in (first, second, third))

    assert ids(store) == [c, b, a]  # newest first
    assert ids(store, newest_first=False) == [a, b, c]
    assert ids(store, workflow_id="orders") == [b, a]
    assert ids(store, workflow_id="orders", version="1") == [a]
    assert ids(store, status="completed") == [b]
    assert ids(store, status="running") == [c, a]
    assert ids(store, tag="shop") == [b, a]
    assert ids(store, tag="eu") == [a]  # only version 1 is tagged eu
    assert ids(store, tag="none") == []
    assert ids(store, since=at(100)) == [c, b]  # since: inclusive
    assert ids(store, until=at(200)) == [b, a]  # until: exclusive
    assert ids(store, since=at(50), until=at(150)) == [b]


@pytest.mark.parametrize("newest_first", [True, False])
def test_pages_follow_each_other_without_gaps_or_repeats(store: Store, newest_first: bool) -> None:
    executions = [store.begin(i) for i in range(11)]
    store.save(*executions)
    view = runs(store)
    where = ExecutionFilter(newest_first=newest_first)

    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        page = view.executions(where, limit=4, cursor=cursor)
        seen += [e.execution_id for e in page.executions]
        pages += 1
        cursor = page.next_cursor
        if cursor is None:
            break

    expected = [str(e.id) for e in executions]
    assert seen == (expected[::-1] if newest_first else expected)
    assert pages == 3


def test_a_cursor_works_only_for_the_listing_it_came_from(store: Store) -> None:
    store.save(*[store.begin(i) for i in range(3)])
    view = runs(store)
    page = view.executions(ExecutionFilter(workflow_id="orders"), limit=1)
    assert page.next_cursor is not None

    with pytest.raises(InputInvalid, match="filters differ"):
        view.executions(ExecutionFilter(status="failed"), limit=1, cursor=page.next_cursor)
    with pytest.raises(InputInvalid, match="not a cursor"):
        view.executions(ExecutionFilter(), cursor="not-a-cursor!")
    with pytest.raises(InputInvalid, match="at least 1"):
        view.executions(ExecutionFilter(), limit=0)


# -- one execution ---------------------------------------------------------------------------


def test_the_detail_of_an_execution_follows_its_events(store: Store) -> None:
    ex = store.begin(0)
    ex.start_step("reserve", "reserve", "", {}, at(1))
    ex.schedule_retry("reserve", error(), 2.0, at(4), at(2))
    ex.fire_timer("reserve#retry1", at(4))
    ex.start_step("reserve", "reserve", "", {}, at(4))
    ex.succeed_step("reserve", {"r": 1}, {}, at(7))
    ex.start_step("notify", "notify", "", {}, at(7))
    ex.fail_step("notify", error("HTTPError", "410"), at(8))
    ex.select_branch("route", "route", "", None, ["ship"], [("express", "express")], {}, {}, at(9))
    ex.start_step("ship", "ship", "", {}, at(10))
    ex.fail_step("ship", error("ValueError", "no stock"), at(11))
    ex.start_step("ship:on_error:fix", "fix", "", {}, at(11), kind="on_error", owner="ship")
    ex.succeed_step("ship:on_error:fix", {"fixed": True}, {}, at(12))
    ex.recover_step("ship", "ship:on_error:fix", "fix", {"fixed": True}, {}, at(12))
    ex.finish(ExecutionStatus.FAILED, "notify failed", at(13))
    store.save(ex)

    detail = runs(store).execution(str(ex.id))

    assert detail is not None
    assert detail.event_count == ex.version
    assert detail.tags == ["shop", "eu"]
    assert detail.summary.status == "failed"
    assert detail.summary.reason == "notify failed"
    steps = {s.key: s for s in detail.steps}
    assert list(steps) == ["reserve", "notify", "route", "express", "ship", "ship:on_error:fix"]
    reserve = steps["reserve"]
    assert (reserve.status, reserve.attempts, reserve.agent, reserve.type) == (
        "completed",
        2,
        "local",
        "action",
    )
    assert (reserve.duration_seconds, reserve.last_attempt_seconds) == (6.0, 3.0)
    assert reserve.last_error == error()  # kept after the retry succeeded, as the document does
    assert (steps["notify"].status, steps["notify"].agent) == ("failed", "local")
    assert steps["notify"].last_error == error("HTTPError", "410")
    assert (steps["route"].status, steps["route"].agent, steps["route"].attempts) == (
        "completed",
        None,
        1,
    )
    assert steps["express"].status == "skipped"
    assert steps["express"].last_error == {
        "type": "Skipped",
        "message": "branch not taken by 'route'",
        "retryable": False,
    }
    assert (steps["ship"].status, steps["ship"].recovered_by) == ("completed", "fix")
    handler = steps["ship:on_error:fix"]
    assert (handler.kind, handler.handles, handler.step_id) == ("on_error", "ship", "fix")
    # Every field the execution document also has agrees with it.
    doc = execution_document(store.app.execution(ex.id))
    for step in detail.steps:
        shown = doc["steps"][step.key]
        for field in ("status", "attempts", "started_at", "finished_at", "duration_seconds"):
            assert getattr(step, field) == shown[field], (step.key, field)
        assert (step.last_error, step.recovered_by) == (shown["last_error"], shown["recovered_by"])


def test_an_unknown_execution_has_no_detail(store: Store) -> None:
    assert runs(store).execution("00000000-0000-4000-8000-000000000000") is None


def test_the_timeline_lists_every_transition_in_order(store: Store) -> None:
    ex = store.begin(0)
    ex.start_step("reserve", "reserve", "", {}, at(1))
    ex.schedule_retry("reserve", error(), 1.0, at(3), at(2))
    ex.fire_timer("reserve#retry1", at(3))
    ex.start_step("reserve", "reserve", "", {}, at(3))
    ex.succeed_step("reserve", {}, {}, at(4))
    ex.wait_step("approve", "approve", "", {}, "human_deadline", None, at(4), assignee="alice")
    ex.mark_waiting(at(4))
    ex.cancel_step("approve", "cancelled by request", at(5))
    ex.finish(ExecutionStatus.CANCELLED, "cancelled by request", at(5))
    store.save(ex)

    timeline = runs(store).timeline(str(ex.id))

    assert [(t.event, t.step_key, t.status_from, t.status_to) for t in timeline] == [
        ("ExecutionStarted", None, "pending", "running"),
        ("StepStarted", "reserve", "pending", "running"),
        ("StepRetryScheduled", "reserve", "running", "retrying"),
        ("TimerFired", "reserve", None, None),
        ("StepStarted", "reserve", "retrying", "running"),
        ("StepSucceeded", "reserve", "running", "completed"),
        ("StepWaiting", "approve", "pending", "waiting"),
        ("ExecutionWaiting", None, "running", "waiting"),
        ("StepCancelled", "approve", "waiting", "cancelled"),
        ("ExecutionCancelled", None, "waiting", "cancelled"),
    ]
    assert [t.seq for t in timeline] == list(range(1, ex.version + 1))
    assert [t.at for t in timeline] == [at(s).isoformat() for s in (0, 1, 2, 3, 3, 4, 4, 4, 5, 5)]
    positions = [t.position for t in timeline]
    assert positions == sorted(positions)
    assert timeline[2].detail == {
        "delay": 1.0,
        "error": error(),
        "fire_at": at(3).isoformat(),
        "timer_id": "reserve#retry1",
    }
    assert timeline[5].detail == {}  # results stay in the events


def test_the_inbox_holds_waiting_human_tasks_per_assignee_until_answered(store: Store) -> None:
    first, second, third = store.begin(0), store.begin(1), store.begin(2)
    first.wait_step("approve", "approve", "", {}, "human_deadline", at(60), at(5), assignee="alice")
    second.wait_step("approve", "approve", "", {}, "human_deadline", None, at(6), assignee="bob")
    third.wait_step("approve", "approve", "", {}, "human_deadline", None, at(7), assignee="alice")
    third.wait_step("later", "approve", "", {}, "wait", at(99), at(7))  # a timer, no person
    store.save(first, second, third)

    view = runs(store)
    assert [(t.execution_id, t.assignee) for t in view.inbox()] == [
        (str(first.id), "alice"),
        (str(second.id), "bob"),
        (str(third.id), "alice"),
    ]
    alice = view.inbox("alice")
    assert [t.execution_id for t in alice] == [str(first.id), str(third.id)]
    assert (alice[0].key, alice[0].waiting_since, alice[0].deadline) == (
        "approve",
        at(5).isoformat(),
        at(60).isoformat(),
    )

    first.complete_human_task("approve", {"approved": True}, {}, at(8))
    third.cancel_step("approve", "cancelled", at(9))
    third.finish(ExecutionStatus.CANCELLED, "cancelled", at(9))
    store.save(first, third)

    view = runs(store)
    assert view.inbox("alice") == []
    assert [t.execution_id for t in view.inbox()] == [str(second.id)]


def assert_agrees_with_the_document(store: Store, execution_id: Any) -> None:
    """Every field the run view and the execution document both have agrees."""
    detail = runs(store).execution(str(execution_id))
    assert detail is not None
    doc = execution_document(store.app.execution(execution_id))
    assert detail.summary.as_row() == {k: doc[k] for k in detail.summary.as_row()}
    assert detail.deadline == doc["deadline"]
    assert [s.key for s in detail.steps] == list(doc["steps"])
    for step in detail.steps:
        shown = doc["steps"][step.key]
        for field in (
            "status",
            "attempts",
            "started_at",
            "last_attempt_started_at",
            "finished_at",
            "duration_seconds",
            "last_error",
            "recovered_by",
        ):
            assert getattr(step, field) == shown[field], (step.key, field)


def test_a_retried_execution_shows_running_again_with_its_reset_steps(store: Store) -> None:
    ex = failed_at_6(store)
    assert runs(store).inbox() == []  # the cancelled task asks nobody
    retried_at_100(store, ex)

    detail = runs(store).execution(str(ex.id))

    assert detail is not None
    assert (detail.summary.status, detail.summary.reason, detail.summary.finished_at) == (
        "running",
        None,
        None,
    )
    assert detail.deadline == at(3700).isoformat()
    steps = {s.key: s for s in detail.steps}
    assert {k: (s.status, s.attempts) for k, s in steps.items()} == {
        "reserve": ("completed", 1),
        "notify": ("pending", 2),  # attempts counted on: the next one is the third
        "approve": ("pending", 1),
        "route": ("pending", 1),
        "express": ("pending", 0),
    }
    assert steps["notify"].finished_at is None
    assert steps["notify"].last_error == error("HTTPError", "503")
    assert [
        e.execution_id for e in runs(store).executions(ExecutionFilter(status="running")).executions
    ] == [str(ex.id)]
    entry = runs(store).timeline(str(ex.id))[-1]
    assert (entry.event, entry.step_key, entry.status_from, entry.status_to) == (
        "ExecutionRetried",
        None,
        "failed",
        "running",
    )
    assert entry.detail == {
        "reason": "retried by request",
        "reset": {"notify": 2, "route": 1, "express": 0, "approve": 1},
        "resumed": [],
        "deadline": at(3700).isoformat(),
    }
    assert_agrees_with_the_document(store, ex.id)


def test_a_retried_execution_shows_its_final_status_and_attempts_counted_on(
    store: Store,
) -> None:
    ex = failed_at_6(store)
    retried_at_100(store, ex)
    assert [t.key for t in runs(store).inbox()] == []
    completed_at_110(store, ex)

    detail = runs(store).execution(str(ex.id))

    assert detail is not None
    assert (detail.summary.status, detail.summary.duration_seconds) == ("completed", 110.0)
    steps = {s.key: s for s in detail.steps}
    assert {k: (s.status, s.attempts) for k, s in steps.items()} == {
        "reserve": ("completed", 1),
        "notify": ("completed", 3),
        "approve": ("completed", 2),
        "route": ("completed", 2),
        "express": ("skipped", 0),
        "ship": ("completed", 1),
    }
    notify = steps["notify"]
    assert (notify.duration_seconds, notify.last_attempt_seconds) == (101.0, 3.0)
    assert [
        (t.event, t.step_key, t.status_from, t.status_to)
        for t in runs(store).timeline(str(ex.id))
        if t.step_key in (None, "notify")
    ][-5:] == [
        ("ExecutionFailed", None, "running", "failed"),
        ("ExecutionRetried", None, "failed", "running"),
        ("StepStarted", "notify", "pending", "running"),
        ("StepSucceeded", "notify", "running", "completed"),
        ("ExecutionCompleted", None, "running", "completed"),
    ]
    assert_agrees_with_the_document(store, ex.id)
    view = runs(store)
    built = view.dump()
    store.runner.rebuild(["runs"])
    assert view.dump() == built


def test_a_container_the_retry_resumed_runs_again_until_it_ends(store: Store) -> None:
    ex = parallel_failed_at_3(store)
    parallel_retried_at_10(store, ex)

    detail = runs(store).execution(str(ex.id))

    assert detail is not None
    assert {s.key: (s.status, s.attempts, s.finished_at) for s in detail.steps} == {
        "both": ("running", 1, None),
        "left": ("completed", 1, at(2).isoformat()),
        "right": ("pending", 1, None),
    }
    assert detail.summary.status == "running"
    assert_agrees_with_the_document(store, ex.id)
    entry = runs(store).timeline(str(ex.id))[-1]
    assert (entry.event, entry.detail["reset"], entry.detail["resumed"]) == (
        "ExecutionRetried",
        {"right": 1},
        ["both"],
    )

    parallel_completed_at_14(store, ex)
    detail = runs(store).execution(str(ex.id))

    assert detail is not None
    assert {s.key: (s.status, s.attempts, s.duration_seconds) for s in detail.steps} == {
        "both": ("completed", 1, 14.0),
        "left": ("completed", 1, 2.0),
        "right": ("completed", 2, 13.0),
    }
    assert_agrees_with_the_document(store, ex.id)


# -- exactly once, and what the view does not know ---------------------------------------------


def test_an_event_is_applied_once(store: Store) -> None:
    ex = store.begin(0)
    run_step(ex, "reserve", 1, 2)
    store.save(ex)
    projection = store.caught_up().runs
    last = store.runner.head()
    (notification,) = store.app.recorder.select_notifications(last, 1)
    event = store.app.mapper.to_domain_event(notification)
    before = projection.view.dump()

    with pytest.raises(IntegrityError):
        projection.process_event(event, Tracking(store.app.name, last))

    assert projection.view.dump() == before
    detail = projection.view.execution(str(ex.id))
    assert detail is not None
    assert detail.event_count == ex.version


def test_attributes_the_view_does_not_know_are_ignored_and_a_named_agent_is_kept(
    store: Store,
) -> None:
    # A later class version may add attributes (a remote agent's id, anything else).
    ex = store.begin(0)
    ex.start_step("reserve", "reserve", "", {}, at(1))
    events = ex.collect_events()
    for event in events:
        event.__dict__["colour"] = "blue"
    events[-1].__dict__["agent"] = "agent-eu-7"
    store.app.save_events(events)

    detail = runs(store).execution(str(ex.id))

    assert detail is not None
    assert [(s.key, s.status, s.agent) for s in detail.steps] == [
        ("reserve", "running", "agent-eu-7")
    ]


def test_status_reports_each_position_against_the_head(store: Store) -> None:
    store.save(store.begin(0))
    head = store.runner.head()
    assert [(s.name, s.position, s.head, s.lag) for s in store.runner.status()] == [
        ("runs", 0, head, head),
        ("performance", 0, head, head),
        ("step_cache", 0, head, head),
    ]

    store.runner.catch_up()

    assert [(s.position, s.lag) for s in store.runner.status()] == [(head, 0)] * 3


def test_a_rebuild_from_position_zero_gives_the_same_tables(store: Store) -> None:
    for i in range(5):
        ex = store.begin(i * 10)
        run_step(ex, "reserve", i * 10 + 1, i * 10 + 3)
        if i % 2:
            complete(ex, i * 10 + 4)
        store.save(ex)
    view = runs(store)
    built = view.dump()

    applied = store.runner.rebuild(["runs"])

    assert applied == {"runs": store.runner.head()}
    assert view.dump() == built
    with pytest.raises(InputInvalid, match="no projection 'nope'"):
        store.runner.rebuild(["nope"])


def test_runners_racing_on_the_same_views_apply_each_event_once(tmp_path: Path) -> None:
    with opened("sqlite", tmp_path) as store:
        executions = []
        for i in range(30):
            ex = store.begin(i)
            run_step(ex, "reserve", i + 0.25, i + 0.5)
            executions.append(ex)
        store.save(*executions)
        # Three more runners on the same database, tables and tracking rows.
        runners = [Queries(store.app, batch_size=3).runner for _ in range(3)]

        with ThreadPoolExecutor(max_workers=3) as pool:
            for done in [pool.submit(r.catch_up) for r in runners]:
                done.result()

        raced = [p.view.dump() for p in store.projections.all]
        for ex in executions:
            detail = runs(store).execution(str(ex.id))
            assert detail is not None
            assert detail.event_count == ex.version
        store.runner.rebuild()
        assert [p.view.dump() for p in store.projections.all] == raced


def test_an_error_in_a_projection_stops_the_runner(store: Store) -> None:
    store.save(store.begin(0))

    def broken(event: Any, tracking: Tracking) -> None:
        raise IntegrityError("a row the projection wrote twice")

    store.projections.runs.process_event = broken  # type: ignore[method-assign]

    with pytest.raises(IntegrityError, match="wrote twice"):
        store.runner.catch_up()
    assert store.runner.status()[0].position == 0
