"""Execution properties: no command sequence leaves the transition tables; replay is exact.

Executions are driven purely (no engine, no I/O): a simulated clock, generated workflows,
and a hypothesis-chosen interleaving of attempt outcomes, human answers, cancellations,
clock jumps and illegal commands sent straight to the aggregate.
"""

from __future__ import annotations

import copy
import itertools
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import pytest
import support
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

from flowledger.domain import history, progress
from flowledger.domain.errors import InputInvalid, InvalidTransition, StepNotFound
from flowledger.domain.execution import Execution
from flowledger.domain.history import EXECUTION_TABLE, STEP_TABLE
from flowledger.domain.planner import plan
from flowledger.domain.progress import Dispatch
from flowledger.domain.states import (
    ExecutionStatus,
    ExecutionTrigger,
    StepStatus,
    StepTrigger,
)
from flowledger.domain.workflow import Workflow
from flowledger.services.app import FlowledgerApp

E, S = ExecutionStatus, StepStatus
ET, ST = ExecutionTrigger, StepTrigger
T0 = datetime(2024, 1, 1, tzinfo=UTC)
ERROR_TYPES = ("ValueError", "TypeError", "TimeoutError", "ConnectionError", "KeyError")
FORM = {"type": "object", "required": ["ok"], "properties": {"ok": {"type": "boolean"}}}
REFUSALS = (InvalidTransition, StepNotFound, InputInvalid)
ACTIVE = (S.RUNNING, S.RETRYING, S.WAITING)

# -- a strategy of workflow definitions --------------------------------------------------

RULES = ("all_success", "none_failed", "all_done", "one_success")
# Expressions that fail at run time (length of a number or of null) are kept rare.
CONDITIONS = ("flag", "k > `1`", "`true`", "`false`", "v", "flag", "`true`", "length(k)")
INPUT_MAPPINGS = (None, None, None, {"p": "k"}, {"p": "_.item"}, {"p": "length(k)"})
OUTPUT_MAPPINGS = (None, None, None, {"v": "v"}, {"flag": "flag"}, {"n": "length(v)"})
UNTIL = ("'2024-01-01T00:05:00+00:00'", "'2023-12-31T00:00:00Z'", "nope", "'not a time'")
LOOP_CONDITIONS = ("`true`", "_.iteration < `1`", "`true`", "`false`", "flag", "length(k)")
FOR_EACH = ("items", "items", "items", "nope", "k")


def retry_policies() -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {},
        optional={
            "max_retries": st.sampled_from([2, 3, 1, 0]),
            "retry_delay": st.sampled_from([0.0, 0.5, 2.0, 10.0]),
            "backoff_multiplier": st.sampled_from([1.0, 2.0, 3.0]),
            "max_delay": st.sampled_from([0.0, 5.0, 60.0]),
            "jitter": st.sampled_from([0.0, 0.1, 1.0]),
            "non_retryable_errors": st.lists(st.sampled_from(ERROR_TYPES), unique=True, max_size=2),
            "continue_on_failure": st.booleans(),
        },
    )


def _leaf_fields(draw: st.DrawFn, kind: str) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    if kind in ("action", "webhook"):
        if kind == "action":
            fields["action"] = "act"
        else:
            fields["url"] = "http://agent.invalid/hook"
        if (mapping := draw(st.sampled_from(INPUT_MAPPINGS))) is not None:
            fields["input_mapping"] = mapping
        if draw(st.booleans()) and draw(st.booleans()):
            fields["input_validation"] = {"type": "object", "required": ["p"]}
        if (timeout := draw(st.sampled_from([None, 5.0, 60.0]))) is not None:
            fields["timeout"] = timeout
    elif kind == "wait":
        if draw(st.booleans()):
            fields["duration"] = draw(st.sampled_from([0.0, 1.0, 30.0, 600.0]))
        else:
            fields["until"] = draw(st.sampled_from(UNTIL))
    elif kind == "human_task":
        if (timeout := draw(st.sampled_from([None, 30.0, 900.0]))) is not None:
            fields["timeout"] = timeout
        if draw(st.booleans()):
            fields["form_schema"] = FORM
        if draw(st.booleans()):
            fields["assignee"] = "ann"
    return fields


@st.composite
def handlers(draw: st.DrawFn, handler_id: str) -> dict[str, Any]:
    kind = draw(st.sampled_from(["action", "action", "webhook", "human_task", "wait"]))
    step = {"step_id": handler_id, "type": kind, **_leaf_fields(draw, kind)}
    if draw(st.booleans()):
        step["retry_policy"] = draw(retry_policies())
    return step


def _scope(
    draw: st.DrawFn, ids: Iterator[int], depth: int, handler_ids: list[str], size: int
) -> list[dict[str, Any]]:
    kinds_here = ["action", "action", "webhook", "wait", "human_task", "condition"]
    if depth < 2:
        kinds_here += ["parallel", "loop"]
    n = draw(st.integers(1, size))
    kinds = [draw(st.sampled_from(kinds_here)) for _ in range(n)]
    names = [f"s{next(ids)}" for _ in range(n)]
    claimed: set[str] = set()
    steps: list[dict[str, Any]] = []
    for i, kind in enumerate(kinds):
        later = [x for x in names[i + 1 :] if x not in claimed]
        if kind == "condition" and not later:
            kind = "action"
        step: dict[str, Any] = {"step_id": names[i], "type": kind}
        if i and (deps := draw(st.lists(st.sampled_from(names[:i]), unique=True, max_size=2))):
            step["dependencies"] = deps
        if draw(st.booleans()):
            step["trigger_rule"] = draw(st.sampled_from(RULES))
        if handler_ids:
            handled = st.lists(st.sampled_from(handler_ids), unique=True, max_size=2)
            if on_error := draw(handled):
                step["error_handlers"] = on_error
            if rollback := draw(handled):
                step["rollback_actions"] = rollback
        if draw(st.booleans()):
            step["retry_policy"] = draw(retry_policies())
        if (mapping := draw(st.sampled_from(OUTPUT_MAPPINGS))) is not None:
            step["output_mapping"] = mapping
        if kind == "condition":
            targets = draw(st.permutations(later))[: draw(st.integers(1, min(3, len(later))))]
            claimed.update(targets)
            cut = draw(st.integers(1, len(targets)))
            branches = [targets[:cut]]
            else_steps = targets[cut:]
            if else_steps and draw(st.booleans()):
                branches.append(else_steps)
                else_steps = []
            step["conditions"] = [
                {"expression": draw(st.sampled_from(CONDITIONS)), "steps": b} for b in branches
            ]
            if else_steps:
                step["else_steps"] = else_steps
        elif kind == "parallel":
            step["parallel_steps"] = _scope(draw, ids, depth + 1, handler_ids, 3)
            step["parallel_failure_threshold"] = draw(st.sampled_from([0.0, 0.5, 1.0]))
            if draw(st.booleans()):
                step["max_concurrency"] = draw(st.sampled_from([1, 2, 3]))
        elif kind == "loop":
            step["steps"] = _scope(draw, ids, depth + 1, handler_ids, 3)
            step["loop_max_iterations"] = draw(st.integers(1, 3))
            if draw(st.booleans()):
                step["loop_condition"] = draw(st.sampled_from(LOOP_CONDITIONS))
            else:
                step["for_each"] = draw(st.sampled_from(FOR_EACH))
                if draw(st.booleans()):
                    step["max_concurrency"] = draw(st.integers(1, 2))
        else:
            step.update(_leaf_fields(draw, kind))
        steps.append(step)
    return steps


@st.composite
def definitions(draw: st.DrawFn) -> dict[str, Any]:
    """Valid workflow documents using every step type and most fields of the contract."""
    handler_ids = [f"h{i}" for i in range(draw(st.integers(0, 3)))]
    doc: dict[str, Any] = {
        "timeout": draw(st.sampled_from([3600.0, 600.0, 60.0, 86400.0])),
        "max_parallel_steps": draw(st.integers(1, 4)),
        "handlers": [draw(handlers(h)) for h in handler_ids],
        "steps": _scope(draw, itertools.count(), 0, handler_ids, 7),
    }
    if draw(st.booleans()):
        doc["retry_policy"] = draw(retry_policies())
    return doc


inputs = st.fixed_dictionaries(
    {
        "k": st.integers(0, 3),
        "flag": st.booleans(),
        "items": st.lists(st.integers(0, 9), min_size=1, max_size=3),
    }
)
results = st.fixed_dictionaries({"v": st.integers(0, 3)}, optional={"flag": st.booleans()})


# -- the checker: fold the events and hold every move against the tables ---------------


def fold(events: list[Any]) -> history.History:
    """Replay the event names and keys through the tables; AssertionError on a forbidden move."""
    folded = history.fold(events)
    assert not folded.violations, "; ".join(str(v) for v in folded.violations)
    return folded


def state(ex: Execution) -> dict[str, Any]:
    """Everything the aggregate holds except its uncommitted events."""
    return {k: v for k, v in vars(ex).items() if k != "_pending_events"}


# -- the driver --------------------------------------------------------------------------


def waits_only_for_a_person(ex: Execution, wf: Workflow) -> bool:
    """No leaf runs or retries, no wait timer runs, and at least one human task waits."""
    if ex.is_terminal:
        return False
    person = False
    for record in ex.steps.values():
        if not wf.node(record.step_id).is_leaf:
            continue
        if record.status in (S.RUNNING, S.RETRYING):
            return False
        if record.status is S.WAITING:
            timer = ex.timers.get(record.timer_id or "")
            if timer is not None and timer.purpose == "wait":
                return False
            person = True
    return person


class Run:
    """One execution driven by hand, with every recorded event kept in order."""

    def __init__(
        self, wf: Workflow, data: dict[str, Any], seed: int, apps: tuple[FlowledgerApp, ...] = ()
    ) -> None:
        self.wf = wf
        self.now = T0
        self.ex = Execution.begin(
            UUID(int=seed),
            wf.workflow_id,
            wf.version,
            data,
            None,
            seed,
            T0 + timedelta(seconds=wf.definition.timeout),
            T0,
        )
        self.apps = apps
        self.log: list[Any] = []
        self.dispatches: list[Dispatch] = []
        self.next_wake: datetime | None = None
        self.failure_rate = 3  # attempts failing, in ten

    def events(self) -> list[Any]:
        return [*self.log, *self.ex.pending_events]

    def note(self, what: str) -> None:
        """Tell the story of the run in a failing example's report."""
        if currently_in_test_context():
            note(f"{self.now:%H:%M:%S} {what} -> {self.ex.status}")

    def commit(self) -> None:
        """What the engine does after each progress: store the new events."""
        new = self.ex.collect_events()
        self.log.extend(new)
        for app in self.apps:
            app.save(*new)

    def is_current(self, d: Dispatch) -> bool:
        record = self.ex.steps.get(d.key)
        return (
            record is not None
            and record.attempt_id == d.attempt_id
            and record.status is S.RUNNING
            and not self.ex.is_terminal
        )

    # -- checks --------------------------------------------------------------------------

    def check(self) -> None:
        """The events obey the tables and say what the live aggregate says."""
        ex = self.ex
        events = self.events()
        f = fold(events)
        assert ex.version == len(events)
        assert f.status == ex.status, f"events say {f.status}, aggregate says {ex.status}"
        for key, status in f.steps.items():
            assert ex.step_status(key) == status, (
                f"step {key!r}: events say {status}, aggregate says {ex.step_status(key)}"
            )
        assert set(ex.steps) <= set(f.steps)
        assert {t: timer.fired for t, timer in ex.timers.items()} == f.timers
        if ex.is_terminal:
            assert not ex.active_steps(), f"{ex.status} with active steps {ex.active_steps()}"
        # An attempt's number never repeats for its step instance, retries of the
        # execution included: attempt ids stay unique.
        last: dict[str, int] = {}
        for e in events:
            if type(e).__name__ in ("StepStarted", "StepWaiting"):
                assert e.attempt > last.get(e.key, 0), f"{e.key} attempt {e.attempt} again"
                last[e.key] = e.attempt

    def check_planner_is_pure(self) -> None:
        ex = self.ex
        before, n = copy.deepcopy(state(ex)), len(ex.pending_events)
        first = plan(ex, self.wf, self.now)
        second = plan(ex, self.wf, self.now)
        assert first == second
        assert len(ex.pending_events) == n
        assert state(ex) == before

    def advance(self) -> None:
        self.check_planner_is_pure()
        adv = progress.advance(self.ex, self.wf, self.now)
        self.dispatches.extend(adv.dispatches)
        self.next_wake = adv.next_wake
        assert all(self.is_current(d) for d in adv.dispatches)
        # A fixpoint: planning again right away decides nothing.
        assert plan(self.ex, self.wf, self.now).decisions == []
        if not self.ex.is_terminal and self.ex.status is not E.COMPENSATING:
            leaves = [r for r in self.ex.steps.values() if self.wf.node(r.step_id).is_leaf]
            running = any(r.status in (S.RUNNING, S.RETRYING) for r in leaves)
            waiting = any(r.status is S.WAITING for r in leaves)
            assert (self.ex.status is E.WAITING) == (waiting and not running), self.ex.status
        self.check_not_stalled()

    def check_not_stalled(self) -> None:
        """At a fixpoint, something other than the workflow deadline can move the execution:
        an attempt in flight, a waiting step (a person or a timer), or a retry timer to come.
        A retry whose timer fired but that never restarts would wait for the deadline."""
        ex = self.ex
        if ex.is_terminal:
            return
        movers = [
            r.key
            for r in ex.steps.values()
            if self.wf.node(r.step_id).is_leaf
            and (
                r.status in (S.RUNNING, S.WAITING)
                or (r.status is S.RETRYING and not ex.timers[r.timer_id or ""].fired)
            )
        ]
        assert movers, (
            f"stalled at {ex.status}: only the deadline can move it; "
            f"steps {[(r.key, r.status.value) for r in ex.steps.values()]}"
        )

    @contextmanager
    def records_nothing(self, what: str) -> Iterator[None]:
        """The block must raise a domain refusal and leave no trace on the aggregate."""
        n, before = len(self.events()), copy.deepcopy(state(self.ex))
        try:
            yield
        except REFUSALS:
            pass
        else:
            raise AssertionError(f"{what}: accepted ({self.events()[n:]})")
        assert len(self.events()) == n, f"{what}: refused but recorded {self.events()[n:]}"
        assert state(self.ex) == before, f"{what}: refused but changed the aggregate"

    # -- actions -------------------------------------------------------------------------

    def answer(self, d: Dispatch, outcome: tuple[Any, ...]) -> None:
        ex, wf = self.ex, self.wf
        current = self.is_current(d)
        n, before = len(self.events()), copy.deepcopy(state(ex))
        self.note(f"answer {d.key} attempt {d.attempt}: {outcome}")
        if outcome[0] == "ok":
            done = progress.succeed_attempt(ex, wf, d.key, d.attempt_id, outcome[1], self.now)
        elif outcome[0] == "not_object":
            done = progress.succeed_attempt(ex, wf, d.key, d.attempt_id, ["x"], self.now)
        elif outcome[0] == "timeout":
            self.now += timedelta(seconds=d.timeout or 300)
            current = self.is_current(d)
            message = f"attempt exceeded {d.timeout}s"
            done = progress.fail_attempt(
                ex, wf, d.key, d.attempt_id, "TimeoutError", message, True, self.now
            )
        else:
            _, error_type, retryable = outcome
            done = progress.fail_attempt(
                ex, wf, d.key, d.attempt_id, error_type, "boom", retryable, self.now
            )
        assert done is current, f"answer to {d.attempt_id} recorded={done}, current={current}"
        if not done:
            assert len(self.events()) == n
            assert state(ex) == before

    def answer_person(self, ref: str, answer: Any) -> bool:
        self.note(f"complete {ref} with {answer!r}")
        n, before = len(self.events()), copy.deepcopy(state(self.ex))
        try:
            progress.complete_human_task(self.ex, self.wf, ref, answer, self.now)
        except REFUSALS:
            assert len(self.events()) == n
            assert state(self.ex) == before
            return False
        return True

    def waiting_tasks(self) -> list[Any]:
        """Step instances waiting for a person (a human task, not a wait timer)."""
        tasks = []
        for record in self.ex.steps.values():
            timer = self.ex.timers.get(record.timer_id or "")
            if record.status is S.WAITING and (timer is None or timer.purpose != "wait"):
                tasks.append(record)
        return tasks

    def cancel(self) -> None:
        self.note("cancel")
        if self.ex.is_terminal or self.ex.status is E.COMPENSATING:
            with self.records_nothing("cancel"):
                progress.cancel(self.ex, self.wf, "stop", self.now)
            return
        progress.cancel(self.ex, self.wf, "stop", self.now)
        assert self.ex.status in (E.COMPENSATING, E.CANCELLED)
        assert not self.ex.active_steps()

    def retryable(self) -> bool:
        """Whether the execution may be retried: it ended without completing, and no
        rollback action ran."""
        return (ET.RETRY, self.ex.status) in EXECUTION_TABLE and self.ex.compensation is None

    def retry(self) -> None:
        """Retry the execution (refused, recording nothing, unless it is retryable)."""
        ex = self.ex
        self.note("retry")
        if not self.retryable():
            with self.records_nothing("retry"):
                progress.retry(ex, self.wf, self.now)
            return
        kept = {k: copy.deepcopy(r) for k, r in ex.steps.items() if r.status is S.COMPLETED}
        data = copy.deepcopy(ex.data)
        progress.retry(ex, self.wf, self.now)
        assert ex.status is E.RUNNING
        assert ex.deadline == self.now + timedelta(seconds=self.wf.definition.timeout)
        assert ex.data == data
        for key, record in kept.items():
            assert ex.steps[key] == record, f"completed step {key!r} changed by the retry"

    def illegal_commands(self, *, ended: bool = False) -> list[tuple[str, Callable[[], object]]]:
        """Commands the tables (or the aggregate's own rules) forbid in the current state.

        With `ended`, the execution has ended and every command is forbidden, even one the
        step table alone would allow (a step of a finished execution does not move), but
        the moves of a retry where the execution may be retried.
        """
        ex, now = self.ex, self.now
        assert ex.is_terminal or not ended
        out: list[tuple[str, Callable[[], object]]] = []
        targets = [(r.key, r.step_id, r.prefix, r.status) for r in ex.steps.values()]
        # A key that never started is pending: only start, wait, skip and cancel fit it.
        top = self.wf.members[""][0]
        targets.append(("never-started", top, "", S.PENDING))
        for key, step_id, prefix, status in targets:
            for trigger in StepTrigger:
                if trigger in (ST.RESET, ST.RESUME):  # a step moves so only in a retry
                    allowed = self.retryable() and (trigger, status) in STEP_TABLE
                else:
                    allowed = not ended and (trigger, status) in STEP_TABLE
                if not allowed:
                    label = f"{trigger} step {key!r} while {status} (execution {ex.status})"
                    out.append((label, step_command(ex, trigger, key, step_id, prefix, now)))
        for trigger in ExecutionTrigger:
            if trigger is not ET.START and (trigger, ex.status) not in EXECUTION_TABLE:
                out.append(
                    (f"{trigger} execution while {ex.status}", execution_command(ex, trigger, now))
                )
        if (ET.RETRY, ex.status) in EXECUTION_TABLE and ex.compensation is not None:
            out.append(("retry a compensated execution", execution_command(ex, ET.RETRY, now)))
        for timer_id, timer in ex.timers.items():
            if timer.fired or ended:
                out.append((f"fire timer {timer_id!r}", lambda t=timer_id: ex.fire_timer(t, now)))
        out.append(("fire unknown timer", lambda: ex.fire_timer("no-such-timer", now)))
        for record in ex.steps.values():
            timer = ex.timers.get(record.timer_id or "")
            is_task = record.status is S.WAITING and (
                timer is None or timer.purpose == "human_deadline"
            )
            if ended or not is_task:
                out.append(
                    (
                        f"complete {record.key!r} while {record.status}",
                        lambda k=record.key: ex.complete_human_task(k, {"ok": True}, {}, now),
                    )
                )
            else:
                out.append(
                    (
                        f"answer {record.key!r} with a non-object",
                        lambda k=record.key: progress.complete_human_task(
                            ex, self.wf, k, "yes", now
                        ),
                    )
                )
                step = self.wf.node(record.step_id).step
                if getattr(step, "form_schema", None) == FORM:
                    out.append(
                        (
                            f"answer {record.key!r} against its form",
                            lambda k=record.key: progress.complete_human_task(
                                ex, self.wf, k, {"ok": "yes"}, now
                            ),
                        )
                    )
            # Only the next index of a running loop may start; nothing once the execution ended.
            index = record.iterations + (record.status is S.RUNNING and not ended)
            out.append(
                (
                    f"iteration {index} of {record.key!r} while {record.status}",
                    lambda k=record.key, i=index: ex.start_iteration(k, i, {}, now),
                )
            )
        out.append(
            (
                "answer an unknown task",
                lambda: progress.complete_human_task(ex, self.wf, "no-such", {}, now),
            )
        )
        if ex.compensation is None or ended:
            for record in list(ex.steps.values())[:3]:
                for ok in (True, False):
                    out.append(
                        (
                            f"mark {record.key!r} compensated ok={ok} while {ex.status}",
                            lambda k=record.key, o=ok: ex.mark_compensated(k, o, now),
                        )
                    )
        return out


ERROR = {"type": "Boom", "message": "x", "retryable": False}


def step_command(
    ex: Execution, trigger: StepTrigger, key: str, step_id: str, prefix: str, now: datetime
) -> Callable[[], object]:
    """The aggregate command that makes `trigger` happen to step `key`."""
    later = now + timedelta(seconds=1)
    commands: dict[StepTrigger, Callable[[], object]] = {
        ST.START: lambda: ex.start_step(key, step_id, prefix, {}, now),
        ST.WAIT: lambda: ex.wait_step(key, step_id, prefix, {}, "wait", later, now),
        ST.SUCCEED: lambda: ex.succeed_step(key, {}, {}, now),
        ST.FAIL: lambda: ex.fail_step(key, ERROR, now),
        ST.SCHEDULE_RETRY: lambda: ex.schedule_retry(key, ERROR, 1.0, later, now),
        ST.SKIP: lambda: ex.skip_step(key, step_id, prefix, "no", now),
        ST.RECOVER: lambda: ex.recover_step(key, "h", "h", {}, {}, now),
        ST.COMPENSATE: lambda: ex.mark_compensated(key, True, now),
        ST.CANCEL: lambda: ex.cancel_step(key, "no", now),
        ST.RESET: lambda: ex.retry("no", later, [key], [], now),
        ST.RESUME: lambda: ex.retry("no", later, [], [key], now),
    }
    return commands[trigger]


def execution_command(
    ex: Execution, trigger: ExecutionTrigger, now: datetime
) -> Callable[[], object]:
    """The aggregate command that makes `trigger` happen to the execution."""
    commands: dict[ExecutionTrigger, Callable[[], object]] = {
        ET.WAIT: lambda: ex.mark_waiting(now),
        ET.RESUME: lambda: ex.mark_resumed(now),
        ET.COMPENSATE: lambda: ex.start_compensation(E.FAILED, "no", [], now),
        ET.COMPLETE: lambda: ex.finish(E.COMPLETED, None, now),
        ET.FAIL: lambda: ex.finish(E.FAILED, "no", now),
        ET.TIME_OUT: lambda: ex.finish(E.TIMED_OUT, "no", now),
        ET.CANCEL: lambda: ex.finish(E.CANCELLED, "no", now),
        ET.RETRY: lambda: ex.retry("no", now, [], [], now),
    }
    return commands[trigger]


# Failures are mostly retryable, so retries, their timers and their slots get exercised.
retryable_failures = st.tuples(
    st.just("fail"), st.sampled_from(["ConnectionError", "TimeoutError", "KeyError"]), st.none()
)
other_failures = st.one_of(
    st.tuples(st.just("fail"), st.sampled_from(ERROR_TYPES), st.sampled_from([None, True, False])),
    st.just(("timeout",)),
    st.just(("not_object",)),
)
failures = st.integers(0, 9).flatmap(lambda n: other_failures if n >= 6 else retryable_failures)
successes = st.tuples(st.just("ok"), results)


def outcomes(failure_rate: int) -> st.SearchStrategy[tuple[Any, ...]]:
    """Attempt outcomes, `failure_rate` in ten failing: a calm run gets deep into the graph,
    a flaky one exercises retries, handlers and fail-fast."""
    return st.integers(0, 9).flatmap(lambda n: failures if n < failure_rate else successes)


MAX_ACTIONS = 40
DRAIN_BOUND = 400


def draw_action(data: st.DataObject) -> str:
    """Weighted: cancelling or passing the deadline ends the run, so they are rare."""
    n = data.draw(st.integers(0, 99), label="action")
    for bound, action in ((50, "answer"), (58, "stale"), (68, "person"), (70, "cancel")):
        if n < bound:
            return action
    return "time" if n < 86 else "illegal"


def explore(run: Run, data: st.DataObject, *, illegal: bool = True) -> None:
    """A hypothesis-chosen interleaving of outcomes, answers, cancels, time and bad commands."""
    answered: list[Dispatch] = []
    run.failure_rate = data.draw(st.sampled_from([3, 1, 6]), label="failures in ten")
    run.advance()
    run.check()
    run.commit()
    for _ in range(data.draw(st.integers(0, MAX_ACTIONS), label="actions")):
        action = draw_action(data)
        if action == "answer":
            open_ = [d for d in run.dispatches if d not in answered]
            if not open_:
                continue
            d = data.draw(st.sampled_from(open_), label="dispatch")
            answered.append(d)
            run.answer(d, data.draw(outcomes(run.failure_rate), label="outcome"))
        elif action == "stale" and answered:
            run.answer(data.draw(st.sampled_from(answered)), data.draw(outcomes(5)))
        elif action == "person":
            tasks = run.waiting_tasks()
            if tasks:
                record = data.draw(st.sampled_from(tasks), label="task")
                ref = data.draw(st.sampled_from([record.key, record.step_id]))
                run.answer_person(ref, data.draw(st.sampled_from([{"ok": True}, {"ok": False}])))
        elif action == "cancel":
            run.cancel()
        elif action == "time":
            choice = data.draw(st.sampled_from(["s", "s", "wake", "wake", "s", "deadline"]))
            if choice == "s":
                run.now += timedelta(seconds=data.draw(st.sampled_from([1, 7, 45, 301, 1000])))
            elif choice == "wake" and run.next_wake is not None:
                run.now = max(run.now, run.next_wake)
            elif choice == "deadline":
                run.now = max(run.now, run.ex.deadline + timedelta(seconds=1))
            run.note("time passes")
        elif action == "illegal" and illegal:
            commands = run.illegal_commands()
            label, command = commands[data.draw(st.integers(0, len(commands) - 1))]
            run.note(f"illegal: {label}")
            with run.records_nothing(label):
                command()
        run.check()
        if data.draw(st.booleans(), label="advance") or action == "time":
            run.advance()
            run.check()
        run.commit()


def drain(run: Run, data: st.DataObject) -> None:
    """Drive the execution to its end, as an engine would; fail if that takes too long."""
    for _ in range(DRAIN_BOUND):
        run.advance()
        run.check()
        run.commit()
        if run.ex.is_terminal:
            return
        live = [d for d in run.dispatches if run.is_current(d)]
        if live:
            for d in live:
                run.answer(d, data.draw(outcomes(run.failure_rate), label="drain outcome"))
            continue
        if waits_only_for_a_person(run.ex, run.wf):
            # No deadline bounds compensation: there the person must answer.
            compensating = run.ex.status is E.COMPENSATING
            ask = compensating or data.draw(st.integers(0, 3), label="answer the person") < 3
            if ask and any(run.answer_person(r.key, {"ok": True}) for r in run.waiting_tasks()):
                continue
            if not compensating:
                run.now = max(run.now, run.ex.deadline)
                continue
        assert run.next_wake is not None, (
            f"stuck: {run.ex.status}, no attempt runs, nobody is asked, no timer is set; "
            f"steps {[(r.key, r.status) for r in run.ex.steps.values()]}"
        )
        run.now = max(run.now, run.next_wake)
    raise AssertionError(f"not ended after {DRAIN_BOUND} rounds: {run.ex.status}")


def retries(run: Run, data: st.DataObject, *, illegal: bool = True) -> None:
    """Retry the ended execution a hypothesis-chosen number of times, each retry explored
    and drained to the end again as the first run was."""
    for _ in range(data.draw(st.integers(0, 2), label="retries")):
        run.retry()
        run.check()
        if run.ex.is_terminal:  # refused: it completed, or was compensated
            return
        explore(run, data, illegal=illegal)
        drain(run, data)


def workflows() -> st.SearchStrategy[Workflow]:
    return definitions().map(lambda doc: Workflow(support.workflow(doc)))


# -- property: no command sequence leaves the tables ---------------------------------------


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(workflows(), inputs, st.integers(0, 2**63 - 1), st.data())
def test_no_command_sequence_takes_a_step_or_execution_off_the_tables(
    wf: Workflow, data_in: dict[str, Any], seed: int, data: st.DataObject
) -> None:
    """After every action, each recorded move of every step and of the execution is in the
    tables and the events say what the aggregate says; an illegal command is refused and
    records nothing; planning is pure and reaches a fixpoint; nothing stalls; the run ends
    within a bound (people answering, or the deadline passing). All of it again after each
    retry of an execution that did not complete."""
    run = Run(wf, data_in, seed)
    explore(run, data)
    drain(run, data)
    assert run.ex.is_terminal
    retries(run, data)
    assert run.ex.is_terminal


@settings(
    max_examples=60,
    report_multiple_bugs=False,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(workflows(), inputs, st.integers(0, 2**63 - 1), st.data())
def test_a_finished_execution_refuses_every_command(
    wf: Workflow, data_in: dict[str, Any], seed: int, data: st.DataObject
) -> None:
    """Once ended, an execution refuses every command (but a retry where it may be retried),
    even one the step table alone allows."""
    run = Run(wf, data_in, seed)
    explore(run, data, illegal=False)
    drain(run, data)
    retries(run, data, illegal=False)
    for label, command in run.illegal_commands(ended=True):
        with run.records_nothing(label):
            command()


# -- property: replaying the stored events gives the same state --------------------------


@contextmanager
def stores() -> Iterator[tuple[FlowledgerApp, FlowledgerApp]]:
    with tempfile.TemporaryDirectory() as tmp:
        memory = FlowledgerApp(env={"PERSISTENCE_MODULE": "eventsourcing.popo"})
        sqlite = FlowledgerApp(
            env={
                "PERSISTENCE_MODULE": "eventsourcing.sqlite",
                "SQLITE_DBNAME": os.path.join(tmp, "events.db"),
            }
        )
        try:
            yield memory, sqlite
        finally:
            memory.close()
            sqlite.close()


@settings(
    max_examples=100,
    report_multiple_bugs=False,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(workflows(), inputs, st.integers(0, 2**63 - 1), st.data())
def test_replaying_the_stored_events_rebuilds_the_live_execution(
    wf: Workflow, data_in: dict[str, Any], seed: int, data: st.DataObject
) -> None:
    """The events as stored (in memory, then through SQLite) rebuild the live execution."""
    with stores() as (memory, sqlite):
        # Events are stored after every action, as the engine commits after every progress:
        # what is stored is the event as it was then, not as later code may have changed it.
        run = Run(wf, data_in, seed, (memory,))
        explore(run, data, illegal=False)
        assert state(memory.execution(run.ex.id)) == state(run.ex)
        drain(run, data)
        retries(run, data, illegal=False)
        # The same stored events through the SQLite store: one more serialisation round trip.
        sqlite.save(*memory.repository.event_store.get(run.ex.id))
        for app in (memory, sqlite):
            replayed = app.execution(run.ex.id)
            assert replayed.version == run.ex.version
            assert replayed.status == run.ex.status
            assert replayed.data == run.ex.data
            assert replayed.steps == run.ex.steps
            assert replayed.timers == run.ex.timers
            assert replayed.compensation == run.ex.compensation
            assert state(replayed) == state(run.ex)


# -- the bugs the properties found, each pinned by its smallest case ---------------------


def _run(doc: dict[str, Any], data_in: dict[str, Any] | None = None) -> Run:
    run = Run(Workflow(support.workflow(doc)), data_in or {"k": 1}, 1)
    run.advance()
    return run


def test_a_retry_runs_with_the_input_of_the_first_attempt() -> None:
    run = _run(
        {
            "steps": [
                {"step_id": "a", "type": "action", "action": "x"},
                {"step_id": "b", "type": "action", "action": "x"},
            ]
        }
    )
    first_a, first_b = run.dispatches
    assert first_a.input == {"k": 1}
    run.answer(first_b, ("ok", {"v": 2}))
    run.answer(first_a, ("fail", "Boom", True))
    run.now = run.ex.timers[run.ex.steps["a"].timer_id or ""].fire_at
    run.advance()
    retry = run.dispatches[-1]
    assert retry.key == "a"
    assert retry.attempt == 2
    assert retry.input == {"k": 1}, "a retry must not see data written after its first attempt"


def test_a_started_steps_recorded_input_does_not_change_when_data_does() -> None:
    run = _run(
        {
            "steps": [
                {"step_id": "a", "type": "action", "action": "x"},
                {"step_id": "b", "type": "action", "action": "x"},
            ]
        }
    )
    with stores() as (memory, _):
        memory.save(*run.ex.collect_events())
        _, b = run.dispatches
        run.answer(b, ("ok", {"v": 2}))
        memory.save(*run.ex.collect_events())
        assert memory.execution(run.ex.id).steps["a"].input == {"k": 1}
        assert run.ex.steps["a"].input == {"k": 1}


def test_cancelling_a_step_that_never_started_cancels_it_or_is_refused() -> None:
    run = _run({"steps": [{"step_id": "a", "type": "action", "action": "x"}]})
    ex = run.ex
    try:
        ex.cancel_step("never", "no", run.now)
    except InvalidTransition:
        return
    # Accepted: then the step is cancelled, and a cancelled step cannot start.
    assert ex.step_status("never") is S.CANCELLED
    with run.records_nothing("start a cancelled step"):
        ex.start_step("never", "never", "", {}, run.now)


@pytest.mark.parametrize(
    "step",
    [
        {"step_id": "w", "type": "wait", "duration": 0, "output_mapping": {"n": "length(v)"}},
        {
            "step_id": "w",
            "type": "condition",
            "conditions": [{"expression": "`true`", "steps": ["t"]}],
            "output_mapping": {"n": "length(v)"},
        },
    ],
    ids=["wait", "condition"],
)
def test_an_output_mapping_that_fails_at_run_time_fails_the_step(step: dict[str, Any]) -> None:
    # length(null) is a JMESPath type error: the step fails, advance does not raise.
    steps = [step, {"step_id": "t", "type": "action", "action": "x"}]
    run = _run({"retry_policy": {"max_retries": 0}, "steps": steps})
    assert run.ex.steps["w"].status is S.FAILED
    assert (run.ex.steps["w"].error or {}).get("type") == "ExpressionError"
    assert run.ex.status is E.FAILED


def _finished_with_a_cancelled_wait() -> tuple[Run, Callable[[], object]]:
    run = _run({"steps": [{"step_id": "w", "type": "wait", "duration": 600}]})
    timer_id = run.ex.steps["w"].timer_id or ""
    progress.cancel(run.ex, run.wf, "stop", run.now)
    return run, lambda: run.ex.fire_timer(timer_id, run.now)


def _finished_after_compensation(ok: bool) -> tuple[Run, Callable[[], object]]:
    run = _run(
        {
            "retry_policy": {"max_retries": 0},
            "handlers": [{"step_id": "undo", "type": "action", "action": "undo"}],
            "steps": [
                {"step_id": "a", "type": "action", "action": "x", "rollback_actions": ["undo"]},
                {"step_id": "b", "type": "action", "action": "x"},
                {"step_id": "c", "type": "action", "action": "x", "dependencies": ["a", "b"]},
            ],
        }
    )
    for d in list(run.dispatches):
        run.answer(d, ("ok", {"v": 1}))
    run.advance()
    run.answer(run.dispatches[-1], ("fail", "Boom", False))
    run.advance()
    run.answer(run.dispatches[-1], ("ok", {}))  # a's rollback
    run.advance()
    assert run.ex.status is E.FAILED
    assert run.ex.step_status("b") is S.COMPLETED
    # ok=True: b (completed, no rollback actions) marked compensated after the end.
    return run, lambda: run.ex.mark_compensated("b" if ok else "a", ok, run.now)


def _finished(command: str) -> tuple[Run, Callable[[], object]]:
    run = _run({"steps": [{"step_id": "a", "type": "action", "action": "x"}]})
    run.answer(run.dispatches[0], ("ok", {"v": 1}))
    run.advance()
    assert run.ex.status is E.COMPLETED
    ex, now = run.ex, run.now
    commands: dict[str, Callable[[], object]] = {
        "skip_step": lambda: ex.skip_step("other", "a", "", "late", now),
        "cancel_step": lambda: ex.cancel_step("other", "late", now),
    }
    return run, commands[command]


@pytest.mark.parametrize(
    "scenario",
    [
        lambda: _finished("skip_step"),
        lambda: _finished("cancel_step"),
        _finished_with_a_cancelled_wait,
        lambda: _finished_after_compensation(ok=False),
        lambda: _finished_after_compensation(ok=True),
    ],
    ids=[
        "skip_step",
        "cancel_step",
        "fire_timer_of_a_cancelled_wait",
        "mark_compensated_not_ok",
        "mark_compensated_ok",
    ],
)
def test_a_finished_execution_records_no_more_events(
    scenario: Callable[[], tuple[Run, Callable[[], object]]],
) -> None:
    run, command = scenario()
    assert run.ex.is_terminal
    with run.records_nothing("a command after the end"):
        command()
