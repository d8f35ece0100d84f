"""Retrying an execution that ended without completing (progress.retry), driven purely:
what runs again for each kind of step, attempt numbers and budgets, deadlines, refusals,
and the history the retry leaves (folded through the tables, replayed from a store)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import pytest
import support

from flowledger.domain import history, progress
from flowledger.domain.errors import InvalidTransition
from flowledger.domain.execution import Execution
from flowledger.domain.planner import plan
from flowledger.domain.progress import Dispatch
from flowledger.domain.retry import retry_delay
from flowledger.domain.states import ExecutionStatus, StepStatus
from flowledger.domain.workflow import Workflow
from flowledger.services.app import FlowledgerApp

E, S = ExecutionStatus, StepStatus
T0 = datetime(2024, 1, 1, tzinfo=UTC)
NO_RETRY = {"max_retries": 0}


def action(step_id: str, **fields: Any) -> dict[str, Any]:
    return {"step_id": step_id, "type": "action", "action": "x", **fields}


class Driver:
    """One execution driven by hand; every event it records is kept and folded."""

    def __init__(self, doc: dict[str, Any], data: dict[str, Any] | None = None) -> None:
        self.wf = Workflow(support.workflow(doc))
        self.now = T0
        self.ex = Execution.begin(
            UUID(int=7),
            self.wf.workflow_id,
            self.wf.version,
            data or {},
            None,
            7,
            T0 + timedelta(seconds=self.wf.definition.timeout),
            T0,
        )
        self.log: list[Any] = []
        self.dispatched: list[Dispatch] = []
        self.advance()

    def advance(self) -> None:
        adv = progress.advance(self.ex, self.wf, self.now)
        self.dispatched.extend(adv.dispatches)
        self.log.extend(self.ex.collect_events())
        folded = history.fold(self.log)
        assert not folded.violations, [str(v) for v in folded.violations]
        assert folded.status == self.ex.status
        assert plan(self.ex, self.wf, self.now).decisions == []

    def running(self, key: str) -> Dispatch:
        record = self.ex.steps[key]
        assert record.status is S.RUNNING, (key, record.status)
        return next(d for d in self.dispatched if d.attempt_id == record.attempt_id)

    def ok(self, key: str, result: dict[str, Any] | None = None) -> None:
        d = self.running(key)
        assert progress.succeed_attempt(
            self.ex, self.wf, key, d.attempt_id, result or {"done": key}, self.now
        )
        self.advance()

    def fail(self, key: str, error_type: str = "ValueError", retryable: bool = False) -> None:
        d = self.running(key)
        assert progress.fail_attempt(
            self.ex, self.wf, key, d.attempt_id, error_type, "boom", retryable, self.now
        )
        self.advance()

    def pass_time(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)
        self.advance()

    def retry(self) -> Any:
        """Retry, then advance; returns the ExecutionRetried event."""
        progress.retry(self.ex, self.wf, self.now)
        (retried,) = [e for e in self.ex.pending_events if type(e).__name__ == "ExecutionRetried"]
        self.advance()
        return retried

    def started(self, key: str) -> list[int]:
        """The attempt numbers of `key` in StepStarted and StepWaiting events."""
        return [
            e.attempt
            for e in self.log
            if type(e).__name__ in ("StepStarted", "StepWaiting") and e.key == key
        ]

    def status(self, key: str) -> StepStatus:
        return self.ex.step_status(key)


def replayed(driver: Driver) -> Execution:
    """The execution rebuilt from its events as an in-memory store keeps them."""
    app = FlowledgerApp(env={"PERSISTENCE_MODULE": "eventsourcing.popo"})
    try:
        app.save(*driver.log)
        return app.execution(driver.ex.id)
    finally:
        app.close()


def state(ex: Execution) -> dict[str, Any]:
    return {k: v for k, v in vars(ex).items() if k != "_pending_events"}


# -- leaves ------------------------------------------------------------------------------


def test_a_failed_step_runs_again_and_completed_steps_keep_their_results() -> None:
    run = Driver(
        {
            "retry_policy": NO_RETRY,
            "steps": [
                action("a"),
                action("b", dependencies=["a"]),
                action("c", dependencies=["b"]),
            ],
        }
    )
    run.ok("a", {"v": 1})
    run.fail("b")
    assert run.ex.status is E.FAILED

    retried = run.retry()

    assert retried.reset == {"b": 1}
    assert retried.resumed == []
    assert run.ex.status is E.RUNNING
    assert (run.ex.finished_at, run.ex.reason) == (None, None)
    assert run.running("b").attempt_id == f"{run.ex.id}/b/2"
    run.ok("b")
    run.ok("c")
    assert run.ex.status is E.COMPLETED
    assert run.ex.data["a"] == {"v": 1}
    assert (run.started("a"), run.started("b"), run.started("c")) == ([1], [1, 2], [1])
    assert state(replayed(run)) == state(run.ex)


def test_attempt_numbers_count_on_and_the_retry_budget_starts_again() -> None:
    policy = {"max_retries": 1, "retry_delay": 2.0, "backoff_multiplier": 3.0, "jitter": 0.5}
    run = Driver({"retry_policy": policy, "steps": [action("a")]})
    run.fail("a", "ConnectionError", True)
    run.pass_time(60)
    run.fail("a", "ConnectionError", True)  # attempt 2 of 2: the budget is spent
    assert (run.ex.status, run.ex.steps["a"].attempt) == (E.FAILED, 2)

    run.retry()
    assert run.running("a").attempt == 3
    run.fail("a", "ConnectionError", True)  # the first attempt of a whole budget again
    record = run.ex.steps["a"]
    assert record.status is S.RETRYING
    assert record.timer_id == "a#retry3"
    # The backoff starts again too: the delay is the first one's, not the third's.
    delay = retry_delay(run.wf.node("a").policy, run.ex.seed, "a", 1)
    assert run.ex.timers["a#retry3"].fire_at == run.now + timedelta(seconds=delay)
    run.pass_time(60)
    run.fail("a", "ConnectionError", True)

    assert (run.ex.status, run.started("a")) == (E.FAILED, [1, 2, 3, 4])
    attempt_ids = [e.attempt_id for e in run.log if type(e).__name__ == "StepStarted"]
    assert len(set(attempt_ids)) == len(attempt_ids) == 4


def test_a_timed_out_execution_gets_a_new_deadline_counted_from_the_retry() -> None:
    run = Driver({"timeout": 60, "steps": [action("a"), action("b", dependencies=["a"])]})
    run.ok("a")
    run.pass_time(61)
    assert (run.ex.status, run.status("b")) == (E.TIMED_OUT, S.CANCELLED)

    run.pass_time(500)  # retried long after the old deadline
    retried = run.retry()

    assert retried.deadline == run.ex.deadline == run.now + timedelta(seconds=60)
    assert run.running("b").attempt == 2
    run.ok("b")
    assert run.ex.status is E.COMPLETED
    assert run.started("a") == [1]


def test_a_cancelled_execution_whose_steps_had_nothing_to_roll_back_can_be_retried() -> None:
    run = Driver({"steps": [action("a"), action("b", dependencies=["a"])]})
    run.ok("a")
    progress.cancel(run.ex, run.wf, "stop", run.now)
    run.advance()
    assert run.ex.status is E.CANCELLED

    run.retry()
    run.ok("b")

    assert run.ex.status is E.COMPLETED
    assert (run.started("a"), run.started("b")) == ([1], [1, 2])


def test_a_step_skipped_because_of_a_failure_is_decided_again_down_the_graph() -> None:
    lenient = {"max_retries": 0, "continue_on_failure": True}
    run = Driver(
        {
            "retry_policy": NO_RETRY,
            "steps": [
                action("a", retry_policy=lenient),
                action("b", dependencies=["a"]),
                action("c", dependencies=["b"]),
                action("d", dependencies=["a"], trigger_rule="all_done"),
                action("e"),
            ],
        }
    )
    run.fail("a")
    run.ok("d")
    assert (run.status("b"), run.status("c")) == (S.SKIPPED, S.SKIPPED)
    run.fail("e")
    assert run.ex.status is E.FAILED

    retried = run.retry()

    assert list(retried.reset) == ["a", "e", "b", "c"]
    assert run.status("d") is S.COMPLETED  # it ran: it is not run again
    run.ok("a")
    run.ok("e")
    run.ok("b")
    run.ok("c")
    assert run.ex.status is E.COMPLETED
    assert (run.started("b"), run.started("d")) == ([1], [1])


# -- handlers ------------------------------------------------------------------------------


def test_a_failed_step_and_its_failed_error_handlers_run_again() -> None:
    run = Driver(
        {
            "retry_policy": NO_RETRY,
            "steps": [action("ship", error_handlers=["fix", "escalate"])],
            "handlers": [action("fix"), action("escalate")],
        }
    )
    run.fail("ship")
    run.fail("ship:on_error:fix")
    run.fail("ship:on_error:escalate")
    assert run.ex.status is E.FAILED

    retried = run.retry()

    assert retried.reset == {"ship:on_error:fix": 1, "ship:on_error:escalate": 1, "ship": 1}
    run.fail("ship")
    run.ok("ship:on_error:fix", {"fixed": True})
    assert run.ex.status is E.COMPLETED
    assert run.ex.steps["ship"].recovered_by == "fix"
    assert run.started("ship:on_error:fix") == [1, 2]
    assert run.status("ship:on_error:escalate") is S.PENDING  # not needed this time


def test_a_step_whose_error_handler_succeeded_as_the_execution_ended_is_recovered() -> None:
    run = Driver(
        {
            "timeout": 60,
            "retry_policy": NO_RETRY,
            "steps": [
                action("ship", error_handlers=["fix"]),
                action("after", dependencies=["ship"]),
            ],
            "handlers": [action("fix")],
        }
    )
    run.fail("ship")
    fix = run.running("ship:on_error:fix")
    run.now += timedelta(seconds=61)
    progress.succeed_attempt(run.ex, run.wf, fix.key, fix.attempt_id, {"fixed": 1}, run.now)
    run.advance()  # the deadline passed before the handler's success could recover the step
    assert (run.ex.status, run.status("ship")) == (E.TIMED_OUT, S.FAILED)

    retried = run.retry()

    assert retried.reset == {}
    assert run.ex.steps["ship"].recovered_by == "fix"  # recovered, not run again
    run.ok("after")
    assert run.ex.status is E.COMPLETED
    assert (run.started("ship"), run.started("ship:on_error:fix")) == ([1], [1])


# -- containers ----------------------------------------------------------------------------


def test_a_failed_parallel_resumes_and_runs_only_the_children_that_did_not_complete() -> None:
    run = Driver(
        {
            "retry_policy": NO_RETRY,
            "steps": [
                {
                    "step_id": "p",
                    "type": "parallel",
                    "parallel_steps": [action("x"), action("y"), action("z")],
                }
            ],
        }
    )
    run.ok("x", {"v": "x"})
    run.fail("y")  # fails fast: z is cancelled, p fails
    assert (run.ex.status, run.status("p"), run.status("z")) == (E.FAILED, S.FAILED, S.CANCELLED)

    retried = run.retry()

    assert (retried.reset, retried.resumed) == ({"y": 1, "z": 1}, ["p"])
    assert run.status("p") is S.RUNNING
    run.ok("y", {"v": "y"})
    run.ok("z", {"v": "z"})
    assert run.ex.status is E.COMPLETED
    assert run.ex.data["p"] == {"x": {"v": "x"}, "y": {"v": "y"}, "z": {"v": "z"}}
    assert (run.started("p"), run.started("x"), run.started("y")) == ([1], [1], [1, 2])


def test_a_container_that_failed_before_its_children_started_starts_afresh() -> None:
    run = Driver(
        {
            "steps": [
                {
                    "step_id": "p",
                    "type": "parallel",
                    "input_validation": {"type": "object", "required": ["go"]},
                    "parallel_steps": [action("x")],
                }
            ],
        }
    )
    assert (run.ex.status, run.status("p")) == (E.FAILED, S.FAILED)

    retried = run.retry()

    assert (retried.reset, retried.resumed) == ({"p": 1}, [])
    assert run.started("p") == [1, 2]  # started again (and failed again: same input)
    assert run.ex.status is E.FAILED


def test_a_failed_for_each_loop_resumes_at_the_iteration_that_failed() -> None:
    run = Driver(
        {
            "retry_policy": NO_RETRY,
            "steps": [
                {
                    "step_id": "pages",
                    "type": "loop",
                    "for_each": "items",
                    "max_concurrency": 1,
                    "steps": [action("work")],
                }
            ],
        },
        {"items": [10, 20, 30]},
    )
    run.ok("pages[0]/work", {"n": 10})
    run.fail("pages[1]/work")
    assert (run.ex.status, run.status("pages")) == (E.FAILED, S.FAILED)

    retried = run.retry()

    assert (retried.reset, retried.resumed) == ({"pages[1]/work": 1}, ["pages"])
    assert run.running("pages[1]/work").input["_"]["item"] == 20
    run.ok("pages[1]/work", {"n": 20})
    run.ok("pages[2]/work", {"n": 30})
    assert run.ex.status is E.COMPLETED
    assert [r["work"] for r in run.ex.data["pages"]["results"]] == [
        {"n": 10},
        {"n": 20},
        {"n": 30},
    ]
    assert run.started("pages[0]/work") == [1]
    assert run.started("pages[1]/work") == [1, 2]


def test_a_while_loop_resumes_its_failed_iteration_then_checks_its_condition() -> None:
    run = Driver(
        {
            "retry_policy": NO_RETRY,
            "steps": [
                {
                    "step_id": "again",
                    "type": "loop",
                    "loop_condition": "_.iteration < `2`",
                    "steps": [action("fetch"), action("store", dependencies=["fetch"])],
                }
            ],
        }
    )
    run.ok("again[0]/fetch")
    run.ok("again[0]/store")
    run.ok("again[1]/fetch")
    run.fail("again[1]/store")
    assert run.ex.status is E.FAILED

    retried = run.retry()

    assert (retried.reset, retried.resumed) == ({"again[1]/store": 1}, ["again"])
    run.ok("again[1]/store")
    assert run.ex.status is E.COMPLETED
    assert run.ex.data["again"]["iterations"] == 2
    assert run.started("again[1]/fetch") == [1]


def test_nested_containers_resume_down_to_the_leaf_that_failed() -> None:
    run = Driver(
        {
            "retry_policy": NO_RETRY,
            "steps": [
                {
                    "step_id": "p",
                    "type": "parallel",
                    "parallel_steps": [
                        action("side"),
                        {
                            "step_id": "each",
                            "type": "loop",
                            "for_each": "items",
                            "max_concurrency": 2,
                            "steps": [action("work")],
                        },
                    ],
                }
            ],
        },
        {"items": [1, 2]},
    )
    run.ok("each[0]/work")
    run.fail("each[1]/work")  # the loop fails, then the parallel fails fast: side cancelled
    assert (run.status("each"), run.status("side"), run.ex.status) == (
        S.FAILED,
        S.CANCELLED,
        E.FAILED,
    )

    retried = run.retry()

    assert retried.resumed == ["p", "each"]
    assert retried.reset == {"side": 1, "each[1]/work": 1}
    run.ok("side")
    run.ok("each[1]/work")
    assert run.ex.status is E.COMPLETED
    assert run.started("each[0]/work") == [1]


# -- branches ------------------------------------------------------------------------------


ROUTED = {
    "retry_policy": NO_RETRY,
    "steps": [
        action("check", retry_policy={"max_retries": 0, "continue_on_failure": True}),
        {
            "step_id": "route",
            "type": "condition",
            "dependencies": ["check"],
            "conditions": [{"expression": "express", "steps": ["fast"]}],
            "else_steps": ["slow"],
        },
        action("fast"),
        action("slow"),
        action("other"),
    ],
}


def test_a_branch_a_completed_condition_did_not_take_stays_skipped() -> None:
    run = Driver(ROUTED, {"express": True})
    run.ok("check")
    run.fail("fast")
    assert (run.ex.status, run.status("slow")) == (E.FAILED, S.SKIPPED)

    retried = run.retry()

    assert set(retried.reset) == {"fast", "other"}
    run.ok("fast")
    run.ok("other")
    assert run.ex.status is E.COMPLETED
    assert run.status("slow") is S.SKIPPED
    assert run.started("slow") == []


def test_a_condition_that_did_not_run_decides_its_branches_on_the_retry() -> None:
    run = Driver(ROUTED, {"express": False})
    run.fail("check")  # the condition is skipped, and so its branches
    assert {k: run.status(k) for k in ("route", "fast", "slow")} == {
        "route": S.SKIPPED,
        "fast": S.SKIPPED,
        "slow": S.SKIPPED,
    }
    run.fail("other")
    assert run.ex.status is E.FAILED

    retried = run.retry()

    assert list(retried.reset) == ["check", "other", "route", "fast", "slow"]
    run.ok("check")
    assert (run.status("route"), run.status("fast")) == (S.COMPLETED, S.SKIPPED)
    assert run.ex.steps["route"].attempt == 1
    run.ok("slow")
    run.ok("other")
    assert run.ex.status is E.COMPLETED
    assert state(replayed(run)) == state(run.ex)


# -- people and timers ---------------------------------------------------------------------


def test_a_human_task_that_was_not_answered_in_time_waits_again() -> None:
    run = Driver({"steps": [{"step_id": "approve", "type": "human_task", "timeout": 30}]})
    assert run.ex.status is E.WAITING
    run.pass_time(31)
    run.advance()
    assert (run.ex.status, run.status("approve")) == (E.FAILED, S.FAILED)

    run.retry()

    record = run.ex.steps["approve"]
    assert (run.ex.status, record.status, record.attempt) == (E.WAITING, S.WAITING, 2)
    assert record.timer_id == "approve#human_deadline2"
    assert run.ex.timers["approve#human_deadline2"].fire_at == run.now + timedelta(seconds=30)
    progress.complete_human_task(run.ex, run.wf, "approve", {"ok": True}, run.now)
    run.advance()
    assert run.ex.status is E.COMPLETED


def test_a_cancelled_wait_sets_a_new_timer() -> None:
    run = Driver({"steps": [{"step_id": "pause", "type": "wait", "duration": 10}]})
    progress.cancel(run.ex, run.wf, "stop", run.now)
    run.advance()
    assert run.status("pause") is S.CANCELLED

    run.retry()

    assert run.ex.steps["pause"].timer_id == "pause#wait2"
    assert not run.ex.timers["pause#wait1"].fired  # the old one never fires
    run.pass_time(10)
    run.advance()
    assert run.ex.status is E.COMPLETED


# -- refusals ------------------------------------------------------------------------------


def _refused(run: Driver, match: str) -> None:
    before, pending = state(run.ex), len(run.ex.pending_events)
    with pytest.raises(InvalidTransition, match=match):
        progress.retry(run.ex, run.wf, run.now)
    assert len(run.ex.pending_events) == pending
    assert state(run.ex) == before


def test_a_completed_running_or_waiting_execution_is_not_retried() -> None:
    run = Driver({"steps": [{"step_id": "approve", "type": "human_task"}, action("a")]})
    assert run.ex.status is E.RUNNING
    _refused(run, "is running; only a failed, timed-out or cancelled execution can be retried")
    run.ok("a")
    assert run.ex.status is E.WAITING
    _refused(run, "is waiting; only a failed")
    progress.complete_human_task(run.ex, run.wf, "approve", {}, run.now)
    run.advance()
    assert run.ex.status is E.COMPLETED
    _refused(run, "is completed; only a failed")


def test_an_execution_whose_completed_steps_were_compensated_is_not_retried() -> None:
    run = Driver(
        {
            "retry_policy": NO_RETRY,
            "steps": [action("reserve", rollback_actions=["release"]), action("pay")],
            "handlers": [action("release")],
        }
    )
    run.ok("reserve")
    run.fail("pay")
    assert run.ex.status is E.COMPENSATING
    _refused(run, "is compensating")
    run.ok("reserve:rollback:release")
    assert run.ex.status is E.FAILED

    _refused(run, "was compensated: .* cannot resume; start a new execution")
    with pytest.raises(InvalidTransition, match="compensated"):
        run.ex.retry("x", run.now, [], [], run.now)


def test_the_aggregate_refuses_a_reset_the_tables_do_not_allow() -> None:
    run = Driver({"retry_policy": NO_RETRY, "steps": [action("a"), action("b")]})
    run.ok("a")
    run.fail("b")
    deadline = run.now + timedelta(hours=1)
    for reset, resumed, match in (
        (["a"], [], "step 'a' cannot reset while completed"),
        (["never"], [], "step 'never' cannot reset while pending"),
        (["b"], ["b"], "reset or resumed once"),
    ):
        with pytest.raises(InvalidTransition, match=match):
            run.ex.retry("x", deadline, reset, resumed, run.now)
    assert run.ex.status is E.FAILED


# -- the history ---------------------------------------------------------------------------


def test_the_timeline_shows_the_retry_and_the_steps_it_reset() -> None:
    run = Driver({"retry_policy": NO_RETRY, "steps": [action("a")]})
    run.fail("a")
    run.retry()
    run.ok("a")

    moves = [
        (t.event_type, t.key, t.before, t.after, t.attempt)
        for t in history.fold(run.log).transitions
    ]
    assert moves[-6:] == [
        ("ExecutionFailed", None, "running", "failed", None),
        ("ExecutionRetried", None, "failed", "running", None),
        ("ExecutionRetried", "a", "failed", "pending", None),
        ("StepStarted", "a", "pending", "running", 2),
        ("StepSucceeded", "a", "running", "completed", None),
        ("ExecutionCompleted", None, "running", "completed", None),
    ]


def test_a_retry_recorded_while_the_execution_runs_is_a_violation() -> None:
    run = Driver({"retry_policy": NO_RETRY, "steps": [action("a")]})
    run.fail("a")
    run.retry()
    # The same retry event again, as if it were recorded on the running execution.
    events = [*run.log]
    (retried,) = [e for e in events if type(e).__name__ == "ExecutionRetried"]
    folded = history.fold([*events[: events.index(retried) + 1], retried])
    messages = [v.message for v in folded.violations]
    assert "execution running --retry--> is not in the table" in messages
    assert "step 'a' pending --reset--> is not in the table" in messages


def test_a_resumed_inner_parallel_is_not_finished_after_its_outer_one_failed_fast():
    """After a retry resumes a parallel step inside another, both can settle in one batch:
    the outer one fails fast (cancelling the inner one) and the inner one, planned on the
    same snapshot, must not then be finished (it was cancelled by then)."""
    doc = {
        "steps": [
            {
                "step_id": "outer",
                "type": "parallel",
                "parallel_steps": [
                    {
                        "step_id": "inner",
                        "type": "parallel",
                        "parallel_failure_threshold": 0.0,
                        "parallel_steps": [action("c", retry_policy=NO_RETRY)],
                    },
                    action("d", retry_policy=NO_RETRY),
                ],
            }
        ]
    }
    drv = Driver(doc)
    drv.fail("d")
    assert drv.ex.steps["inner"].status is S.CANCELLED
    drv.retry()
    c, d = drv.running("c"), drv.running("d")
    assert progress.fail_attempt(drv.ex, drv.wf, "d", d.attempt_id, "ValueError", "x", False, T0)
    assert progress.fail_attempt(drv.ex, drv.wf, "c", c.attempt_id, "ValueError", "x", False, T0)
    drv.advance()
    assert drv.ex.status is E.FAILED
    assert drv.ex.steps["inner"].status is S.CANCELLED
    assert drv.ex.steps["outer"].status is S.FAILED
