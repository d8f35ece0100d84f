"""Executions survive kill -9 at any moment.

Each test drives executions in a `flowledger run` or `flowledger worker` subprocess on a
temporary SQLite store (those marked `@on_every_store`, and three random seeds, on a
PostgreSQL database too), kills it with SIGKILL at a chosen point (an agent's marker, an
event appearing in the store, FLOWLEDGER_CRASH_AT around a commit) or after a random
delay, restarts with `flowledger worker --until-idle`, and lets `Lab.check` prove from
the store, the agents' ledger and a snapshot taken at every kill that: every execution
ends as expected; no completed step ran again; each attempt cut by a kill was counted
(WorkerLost) and tried again; every timer fired once; nothing stored was lost, changed
or duplicated (versions 1..n).
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from integration.crash.harness import AGENTS, Lab

from flowledger.domain.states import ExecutionStatus, StepStatus

pytestmark = pytest.mark.slow

COMPLETED, FAILED = ExecutionStatus.COMPLETED, ExecutionStatus.FAILED
DATA = {"ms": 30, "items": [1, 2, 3]}


STORES = ["sqlite", "postgres"]
# The tests that also run on PostgreSQL (a new database each, through the environment).
# The others use the SQLite driver lock, or repeat what these show on PostgreSQL.
on_every_store = pytest.mark.parametrize("lab", STORES, indirect=True)


@pytest.fixture
def lab(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Lab]:
    """A crash lab on a fresh store (SQLite unless parametrized); whatever still runs at the
    end is killed."""
    store = getattr(request, "param", "sqlite")
    settings = request.getfixturevalue("postgres_env") if store == "postgres" else None
    crash_lab = Lab(tmp_path, store=settings)
    yield crash_lab
    crash_lab.close()


def attempts(events: list[Any], key: str) -> list[int]:
    """The attempt numbers stored for a step instance, in order."""
    return [e.attempt for e in events if type(e).__name__ == "StepStarted" and e.key == key]


def errors(events: list[Any], key: str) -> list[str]:
    """The error types of a step instance's failed attempts, in order."""
    return [
        e.error["type"]
        for e in events
        if type(e).__name__ in ("StepRetryScheduled", "StepFailed") and e.key == key
    ]


def named(events: list[Any], name: str, **fields: Any) -> list[Any]:
    """The events of one class (with these field values)."""
    return [
        e
        for e in events
        if type(e).__name__ == name and all(getattr(e, k) == v for k, v in fields.items())
    ]


# -- every commit boundary ---------------------------------------------------------------


SEQUENCE_COMMITS = 5  # started; a started; a done + b started; b done + c; c done + end


@on_every_store
@pytest.mark.parametrize(
    "point", [f"{when}:{n}" for n in range(1, SEQUENCE_COMMITS + 1) for when in ("before", "after")]
)
def test_a_kill_at_any_commit_boundary_loses_nothing_and_reruns_nothing_done(
    lab: Lab, point: str
) -> None:
    proc, eid = lab.run("sequence", DATA, "seq", crash_at=point)
    lab.died(proc, point)
    lab.recover()
    nothing_stored = point == "before:1"  # died before the execution's first commit
    events = lab.check({} if nothing_stored else {eid: COMPLETED})
    if not nothing_stored:
        for key in ("a", "b", "c"):
            assert len(named(events[eid], "StepSucceeded", key=key)) == 1


# -- targeted points -----------------------------------------------------------------------


@on_every_store
def test_a_kill_right_after_start_is_resumed_by_the_worker(lab: Lab) -> None:
    proc, eid = lab.run("sequence", DATA, "seq")
    lab.wait_for(lab.stored(eid, "ExecutionStarted"), "the execution to be stored", proc)
    lab.kill(proc, "right after start")
    lab.recover()
    lab.check({eid: COMPLETED})


@on_every_store
def test_a_result_lost_between_the_action_and_its_save_is_an_attempt_run_again(
    lab: Lab,
) -> None:
    proc, eid = lab.run("sequence", DATA, "seq", crash_at="before:1:StepSucceeded")
    lab.died(proc, "between a's result and its save")
    assert lab.snapshots[-1].step(eid, "a") is StepStatus.RUNNING
    lab.recover()
    events = lab.check({eid: COMPLETED})[eid]
    assert attempts(events, "a") == [1, 2]
    assert errors(events, "a") == ["WorkerLost"]


@on_every_store
def test_a_parallel_child_result_lost_before_its_save_runs_again(lab: Lab) -> None:
    proc, eid = lab.run("fanout", DATA, "fan", crash_at="before:2:StepSucceeded")
    lab.died(proc, "between a parallel child's result and its save")
    lost = [k for k in ("p1", "p2", "p3") if lab.snapshots[-1].step(eid, k) is StepStatus.RUNNING]
    assert lost, "no child was running at the kill"
    lab.recover()
    events = lab.check({eid: COMPLETED})[eid]
    for key in lost:
        assert attempts(events, key) == [1, 2]


@on_every_store
@pytest.mark.parametrize("restart", ["worker", "same run"])
def test_an_action_cut_by_a_kill_counts_as_a_failed_attempt(lab: Lab, restart: str) -> None:
    proc, eid = lab.run("sequence", DATA, "seq", hold=["b"])
    lab.wait_for(lab.reached("b"), "b to run", proc)
    lab.kill(proc, "during b")
    if restart == "worker":
        lab.recover()
    else:  # the same command again: its idempotency key finds the execution and adopts it
        again, same = lab.run("sequence", DATA, "seq")
        assert same == eid
        lab.finish(again)
    events = lab.check({eid: COMPLETED})[eid]
    assert attempts(events, "a") == [1]
    assert attempts(events, "b") == [1, 2]
    assert errors(events, "b") == ["WorkerLost"]


@on_every_store
def test_attempts_are_counted_across_repeated_kills_of_the_worker(lab: Lab) -> None:
    proc, eid = lab.run("sequence", DATA, "seq", hold=["b@1"])
    lab.wait_for(lab.reached("b", 1), "b attempt 1", proc)
    lab.kill(proc, "during b attempt 1")
    for attempt in (2, 3):
        worker = lab.worker(hold=[f"b@{attempt}"])
        lab.wait_for(lab.reached("b", attempt), f"b attempt {attempt}", worker)
        lab.kill(worker, f"during b attempt {attempt}")
    lab.recover()
    events = lab.check({eid: COMPLETED})[eid]
    assert attempts(events, "b") == [1, 2, 3, 4]
    assert errors(events, "b") == ["WorkerLost"] * 3


@on_every_store
def test_attempts_cut_by_kills_use_up_the_retry_policy(lab: Lab) -> None:
    proc, eid = lab.run("fragile", DATA, "fragile", hold=["b@1"])
    lab.wait_for(lab.reached("b", 1), "b attempt 1", proc)
    lab.kill(proc, "during b attempt 1")
    worker = lab.worker(hold=["b@2"])
    lab.wait_for(lab.reached("b", 2), "b attempt 2", worker)
    lab.kill(worker, "during b attempt 2, its last")
    lab.recover()
    events = lab.check({eid: FAILED})[eid]
    assert attempts(events, "b") == [1, 2]
    assert errors(events, "b") == ["WorkerLost", "WorkerLost"]
    assert attempts(events, "a:rollback:undo") == [1]


def test_a_deadline_passed_while_no_process_ran_times_the_execution_out(lab: Lab) -> None:
    proc, eid = lab.run("deadline", DATA, "deadline")
    lab.wait_for(lab.stored(eid, "StepWaiting", key="pause"), "the wait to start", proc)
    lab.kill(proc, "during the wait, before the deadline")
    deadline = lab.event(eid, "ExecutionStarted").deadline
    assert lab.snapshots[-1].killed_at < deadline
    lab.wait_for(lambda: datetime.now(UTC) > deadline, "the deadline to pass")
    lab.recover()
    events = lab.check({eid: ExecutionStatus.TIMED_OUT})[eid]
    assert named(events, "TimerFired") == []
    assert len(named(events, "StepCancelled", key="pause")) == 1
    assert attempts(events, "a:rollback:undo") == [1]
    assert attempts(events, "b") == []


@on_every_store
def test_a_worker_killed_while_it_recovers_loses_no_count(lab: Lab) -> None:
    proc, eid = lab.run("sequence", DATA, "seq", hold=["b@1"])
    lab.wait_for(lab.reached("b", 1), "b attempt 1", proc)
    lab.kill(proc, "during b")
    # Its first commit is the WorkerLost of b's first attempt.
    lab.died(lab.worker(crash_at="after:1"), "after the worker's first commit")
    assert lab.snapshots[-1].step(eid, "b") is StepStatus.RETRYING
    # Right after b's retry timer fired and attempt 2 was recorded, before it ran.
    lab.died(lab.worker(crash_at="after:1:TimerFired"), "after b's retry timer fired")
    assert (eid, "b#retry1") in lab.snapshots[-1].fired
    lab.recover()
    events = lab.check({eid: COMPLETED})[eid]
    assert attempts(events, "b") == [1, 2, 3]
    assert errors(events, "b") == ["WorkerLost", "WorkerLost"]
    assert [e.timer_id for e in named(events, "TimerFired")] == ["b#retry1", "b#retry2"]


@on_every_store
@pytest.mark.parametrize("overdue", [False, True], ids=["pending", "overdue"])
def test_a_kill_during_a_retry_delay_keeps_the_timer(lab: Lab, overdue: bool) -> None:
    proc, eid = lab.run("retry", DATA, "retry")
    lab.wait_for(lab.stored(eid, "StepRetryScheduled", key="flaky"), "flaky's retry", proc)
    lab.kill(proc, "during flaky's retry delay")
    assert (eid, "flaky#retry1") not in lab.snapshots[-1].fired
    assert lab.snapshots[-1].step(eid, "flaky") is StepStatus.RETRYING
    fire_at = lab.event(eid, "StepRetryScheduled", key="flaky").fire_at
    assert lab.snapshots[-1].killed_at < fire_at
    if overdue:
        lab.wait_for(lambda: datetime.now(UTC) > fire_at, "the retry timer to be overdue")
    lab.recover()
    events = lab.check({eid: COMPLETED})[eid]
    assert attempts(events, "flaky") == [1, 2]
    assert errors(events, "flaky") == ["TransientError"]
    assert [e.timer_id for e in named(events, "TimerFired")] == ["flaky#retry1"]


@on_every_store
def test_a_kill_right_after_a_retry_timer_fired_does_not_fire_it_again(lab: Lab) -> None:
    proc, eid = lab.run("retry", DATA, "retry", crash_at="after:1:TimerFired")
    lab.died(proc, "after flaky's retry timer fired")
    assert lab.snapshots[-1].step(eid, "flaky") is StepStatus.RUNNING
    lab.recover()
    events = lab.check({eid: COMPLETED})[eid]
    assert attempts(events, "flaky") == [1, 2, 3]
    assert errors(events, "flaky") == ["TransientError", "WorkerLost"]
    assert [e.timer_id for e in named(events, "TimerFired")] == ["flaky#retry1", "flaky#retry2"]


@on_every_store
@pytest.mark.parametrize("overdue", [False, True], ids=["pending", "overdue"])
def test_a_kill_during_a_wait_step_keeps_its_timer(lab: Lab, overdue: bool) -> None:
    proc, eid = lab.run("wait", DATA, "wait")
    lab.wait_for(lab.stored(eid, "StepWaiting", key="pause"), "the wait to start", proc)
    lab.kill(proc, "during the wait")
    assert lab.snapshots[-1].step(eid, "pause") is StepStatus.WAITING
    fire_at = lab.event(eid, "StepWaiting", key="pause").fire_at
    assert lab.snapshots[-1].killed_at < fire_at
    if overdue:
        lab.wait_for(lambda: datetime.now(UTC) > fire_at, "the wait to be overdue")
    lab.recover()
    events = lab.check({eid: COMPLETED})[eid]
    assert [e.timer_id for e in named(events, "TimerFired")] == ["pause#wait1"]
    assert attempts(events, "a") == [1]
    assert attempts(events, "b") == [1]


def test_a_kill_right_after_a_wait_ended_runs_the_next_step_once_more(lab: Lab) -> None:
    proc, eid = lab.run("wait", DATA, "wait", crash_at="after:1:TimerFired")
    lab.died(proc, "after the wait's timer fired")
    assert lab.snapshots[-1].step(eid, "pause") is StepStatus.COMPLETED
    lab.recover()
    events = lab.check({eid: COMPLETED})[eid]
    assert [e.timer_id for e in named(events, "TimerFired")] == ["pause#wait1", "b#retry1"]
    assert attempts(events, "b") == [1, 2]


@on_every_store
def test_a_kill_while_a_fan_out_is_in_flight_retries_each_child(lab: Lab) -> None:
    children = ["p1", "p2", "p3"]
    proc, eid = lab.run("fanout", DATA, "fan", hold=children)
    for key in children:
        lab.wait_for(lab.reached(key), f"{key} to run", proc)
    lab.kill(proc, "with the fan-out in flight")
    lab.recover()
    events = lab.check({eid: COMPLETED})[eid]
    assert attempts(events, "prepare") == [1]
    for key in children:
        assert attempts(events, key) == [1, 2]
        assert errors(events, key) == ["WorkerLost"]


@on_every_store
def test_a_kill_with_part_of_a_fan_out_done_reruns_only_the_rest(lab: Lab) -> None:
    proc, eid = lab.run("fanout", DATA, "fan", hold=["p1", "p2"])
    lab.wait_for(lab.reached("p1"), "p1 to run", proc)
    lab.wait_for(lab.reached("p2"), "p2 to run", proc)
    lab.wait_for(lab.stored(eid, "StepSucceeded", key="p3"), "p3 to be done", proc)
    lab.kill(proc, "with p3 done, p1 and p2 in flight")
    lab.recover()
    events = lab.check({eid: COMPLETED})[eid]
    assert attempts(events, "p3") == [1]
    assert attempts(events, "p1") == attempts(events, "p2") == [1, 2]


@on_every_store
def test_a_kill_during_a_rollback_action_finishes_the_compensation(lab: Lab) -> None:
    refund = "charge:rollback:refund"
    proc, eid = lab.run("saga", DATA, "saga", hold=[refund])
    lab.wait_for(lab.reached(refund), "the refund to run", proc)
    lab.kill(proc, "during the refund")
    assert lab.snapshots[-1].execution_status[eid] is ExecutionStatus.COMPENSATING
    lab.recover()
    events = lab.check({eid: FAILED})[eid]
    assert attempts(events, refund) == [1, 2]
    assert attempts(events, "reserve:rollback:release") == [1]
    assert [(e.key, e.ok) for e in named(events, "StepCompensated")] == [
        ("charge", True),
        ("reserve", True),
    ]


@on_every_store
@pytest.mark.parametrize("point", ["after:1:CompensationStarted", "after:1:StepCompensated"])
def test_a_kill_between_compensation_commits_compensates_each_step_once(
    lab: Lab, point: str
) -> None:
    proc, eid = lab.run("saga", DATA, "saga", crash_at=point)
    lab.died(proc, point)
    assert lab.snapshots[-1].execution_status[eid] is ExecutionStatus.COMPENSATING
    lab.recover()
    events = lab.check({eid: FAILED})[eid]
    assert [(e.key, e.ok) for e in named(events, "StepCompensated")] == [
        ("charge", True),
        ("reserve", True),
    ]
    assert attempts(events, "ship") == [1]


@on_every_store
def test_kills_in_a_loop_iteration_and_an_error_handler_resume_both(lab: Lab) -> None:
    page, fallback = "pages[1]/page", "classify:on_error:fallback"
    proc, eid = lab.run("mixed", DATA, "mixed", hold=[page])
    lab.wait_for(lab.reached(page), "a loop iteration to run", proc)
    lab.kill(proc, "during a loop iteration")
    worker = lab.worker(hold=[fallback])
    lab.wait_for(lab.reached(fallback), "the error handler to run", worker)
    lab.kill(worker, "during the error handler")
    lab.recover()
    events = lab.check({eid: COMPLETED})[eid]
    assert attempts(events, page) == [1, 2]
    assert attempts(events, fallback) == [1, 2]
    assert len(named(events, "StepRecovered", key="classify")) == 1


@on_every_store
def test_an_answer_after_a_kill_counts_the_cut_attempt_and_drives_on(lab: Lab) -> None:
    proc, eid = lab.run("human", DATA, "human", hold=["work"])
    lab.wait_for(lab.reached("work"), "work to run beside the review", proc)
    lab.kill(proc, "during work, with the review waiting")
    assert lab.snapshots[-1].step(eid, "review") is StepStatus.WAITING
    answer = lab.command("complete", eid, "review", "--data", '{"approved": true}', hold=["b"])
    lab.wait_for(lab.reached("b"), "b to run after the answer", answer)
    lab.kill(answer, "during b, driven by `complete`")
    lab.recover()
    events = lab.check({eid: COMPLETED})[eid]
    assert len(named(events, "HumanTaskCompleted", key="review")) == 1
    assert attempts(events, "work") == [1, 2]
    assert attempts(events, "b") == [1, 2]


@on_every_store
def test_a_cancel_after_a_kill_compensates_what_completed(lab: Lab) -> None:
    proc, eid = lab.run("saga", DATA, "saga", hold=["charge"])
    lab.wait_for(lab.reached("charge"), "charge to run", proc)
    lab.kill(proc, "during charge")
    lab.finish(lab.command("cancel", eid), codes=(1,))
    events = lab.check({eid: ExecutionStatus.CANCELLED})[eid]
    assert errors(events, "charge") == ["WorkerLost"]
    assert len(named(events, "StepCancelled", key="charge")) == 1
    assert [(e.key, e.ok) for e in named(events, "StepCompensated")] == [("reserve", True)]
    assert attempts(events, "reserve:rollback:release") == [1]


@on_every_store
def test_kills_around_group_commits_of_many_executions(lab: Lab) -> None:
    expected = {
        lab.submit(name, DATA, f"group-{i}"): FAILED if name == "saga" else COMPLETED
        for i, name in enumerate(["sequence", "fanout", "saga", "mixed"] * 3)
    }
    for point in ["before:3", "after:4", "before:6", "after:2", "before:8"]:
        lab.died(lab.worker(crash_at=point), f"worker, {point}")
    lab.recover()
    lab.check(expected)


@on_every_store
def test_an_execution_started_while_a_restarted_worker_recovers_is_driven(lab: Lab) -> None:
    many = [lab.submit("sequence", DATA, f"held-{i}") for i in range(30)]
    first = lab.worker(hold=["a"])
    for eid in many:
        lab.wait_for(lab.stored(eid, "StepStarted", key="a"), "every a to run", first)
    lab.kill(first, "with 30 attempts running")
    serving = lab.spawn(["worker", "--agents", str(AGENTS)])
    # While it counts the 30 cut attempts, `flowledger run` stores a new execution (as it
    # does when a worker holds the store) and waits for the worker to drive it.
    lab.wait_for(lab.stored(many[0], "StepRetryScheduled", key="a"), "the recovery", serving)
    late = lab.submit("sequence", DATA, "late")
    lab.wait_for(lambda: lab.reader().execution(late).is_terminal, "the new execution", serving)
    lab.kill(serving, "a serving worker")
    lab.recover()
    lab.check(dict.fromkeys([*many, late], COMPLETED))


# -- the driver lock (SQLite only: on PostgreSQL every process drives, optimistically) ------


def test_a_worker_waiting_for_the_store_takes_over_from_a_killed_run(lab: Lab) -> None:
    proc, eid = lab.run("sequence", DATA, "seq", hold=["b"])
    lab.wait_for(lab.reached("b"), "b to run", proc)
    waiting = lab.worker()
    lab.wait_for(lambda: "waiting for" in lab.output(waiting, "err"), "the worker to wait", waiting)
    lab.kill(proc, "the run, with a worker waiting for the store")
    lab.finish(waiting)
    events = lab.check({eid: COMPLETED})[eid]
    assert attempts(events, "b") == [1, 2]


def test_a_run_following_a_killed_worker_takes_over_and_finishes(lab: Lab) -> None:
    serving = lab.spawn(["worker", "--agents", str(AGENTS)], hold=["b"])
    holding = (serving.pid, "worker")
    lab.wait_for(lambda: lab.lock_holder() == holding, "the worker to hold the store", serving)
    follower, eid = lab.run("sequence", DATA, "followed")
    lab.wait_for(lab.reached("b"), "b to run in the worker", serving)
    lab.kill(serving, "the worker, with a run following it")
    lab.finish(follower)  # the run notices the lock is free, takes it and drives on
    lab.recover()
    assert json.loads(lab.output(follower))["status"] == "completed"
    events = lab.check({eid: COMPLETED})[eid]
    assert attempts(events, "b") == [1, 2]


# -- random points -------------------------------------------------------------------------


BATCH = [("mixed", COMPLETED), ("mixed", COMPLETED), ("saga", FAILED), ("fanout", COMPLETED)]


def _submit_batch(lab: Lab, tag: str) -> dict[UUID, ExecutionStatus]:
    return {
        lab.submit(name, DATA, f"{tag}-{i}-{name}"): status
        for i, (name, status) in enumerate(BATCH)
    }


@pytest.fixture(scope="module")
def calm_durations() -> dict[str, float]:
    """The normal durations measured so far in this module, by kind of store."""
    return {}


@pytest.fixture
def normal_duration(
    lab: Lab,
    calm_durations: dict[str, float],
    tmp_path_factory: pytest.TempPathFactory,
    request: pytest.FixtureRequest,
) -> float:
    """How long a worker takes to drive the random tests' batch on the lab's kind of store
    when nothing kills it (measured once per kind, on a store of its own)."""
    kind = lab.store_name
    if kind not in calm_durations:
        server = request.getfixturevalue("postgres_server") if kind == "postgres" else None
        dbname = server.create_database() if server is not None else None
        settings = server.env(dbname) if server is not None and dbname is not None else None
        calm = Lab(tmp_path_factory.mktemp(f"calm-{kind}"), store=settings)
        try:
            expected = _submit_batch(calm, "calm")
            began = time.monotonic()
            calm.recover()
            calm_durations[kind] = time.monotonic() - began
            calm.check(expected)
        finally:
            calm.close()
            if server is not None and dbname is not None:
                server.drop_database(dbname)
    return calm_durations[kind]


RANDOM_SEEDS = [("sqlite", seed) for seed in range(8)] + [("postgres", seed) for seed in range(3)]


@pytest.mark.parametrize(("lab", "seed"), RANDOM_SEEDS, indirect=["lab"])
def test_kills_at_random_moments_lose_and_repeat_nothing(
    lab: Lab, seed: int, normal_duration: float
) -> None:
    rng = random.Random(seed)
    expected = _submit_batch(lab, f"seed{seed}")
    proc, run_eid = lab.run("mixed", DATA, f"seed{seed}-run")
    lab.kill_after(proc, rng.uniform(0, normal_duration), "run, random")
    for cycle in range(4):
        # `worker --until-idle` or a serving `worker` (which only a kill ends).
        serve = rng.random() < 0.5
        worker = lab.spawn(["worker", "--agents", str(AGENTS)]) if serve else lab.worker()
        lab.kill_after(worker, rng.uniform(0, normal_duration), f"worker {cycle}, random")
    lab.recover()
    if run_eid in lab.reader().execution_ids():
        expected[run_eid] = COMPLETED  # the run was killed before storing its start otherwise
    lab.check(expected)
