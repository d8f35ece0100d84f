"""An execution's events folded through the transition tables: each move checked, in order.

The fold reads only event names and keys, not the aggregate's event bodies, so it is a
second, independent reading of a history: replay verification holds the aggregate's
rebuilt state against it, and the timeline is made of its moves.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

from flowledger.domain.states import (
    EXECUTION_TRANSITIONS,
    STEP_TRANSITIONS,
    TERMINAL_EXECUTION_STATUSES,
    ExecutionStatus,
    ExecutionTrigger,
    StepStatus,
    StepTrigger,
)

E, S = ExecutionStatus, StepStatus
ET, ST = ExecutionTrigger, StepTrigger

STEP_TABLE: Final = {(t, s): d for t, sources, d in STEP_TRANSITIONS for s in sources}
EXECUTION_TABLE: Final = {(t, s): d for t, sources, d in EXECUTION_TRANSITIONS for s in sources}
# Each trigger leads to one status whatever the source: after a forbidden move the fold
# goes on from where the event says the subject went, so one bad event is one violation.
_STEP_DESTINATION: Final = {t: d for t, _, d in STEP_TRANSITIONS}
_EXECUTION_DESTINATION: Final = {t: d for t, _, d in EXECUTION_TRANSITIONS}
STEP_EVENTS: Final = {
    "StepStarted": ST.START,
    "StepWaiting": ST.WAIT,
    "StepSucceeded": ST.SUCCEED,
    "HumanTaskCompleted": ST.SUCCEED,
    "StepServedFromCache": ST.SUCCEED,
    "StepFailed": ST.FAIL,
    "StepRetryScheduled": ST.SCHEDULE_RETRY,
    "StepSkipped": ST.SKIP,
    "StepRecovered": ST.RECOVER,
    "StepCancelled": ST.CANCEL,
}
EXECUTION_EVENTS: Final = {
    "ExecutionWaiting": ET.WAIT,
    "ExecutionResumed": ET.RESUME,
    "CompensationStarted": ET.COMPENSATE,
    "ExecutionCompleted": ET.COMPLETE,
    "ExecutionFailed": ET.FAIL,
    "ExecutionTimedOut": ET.TIME_OUT,
    "ExecutionCancelled": ET.CANCEL,
}


@dataclass(frozen=True)
class Transition:
    """One move in the timeline: the execution's (`key` None) or a step instance's."""

    version: int
    timestamp: datetime | None
    event_type: str
    key: str | None
    before: str | None
    after: str | None
    attempt: int | None = None
    error: str | None = None
    note: str | None = None


@dataclass(frozen=True)
class Violation:
    """An event the tables (or the aggregate's own rules) do not allow where it stands."""

    version: int
    event_type: str
    message: str

    def __str__(self) -> str:
        return f"event #{self.version} {self.event_type}: {self.message}"


@dataclass
class History:
    """Statuses as the events alone say they are, and every move that got them there."""

    status: ExecutionStatus = E.PENDING
    steps: dict[str, StepStatus] = field(default_factory=dict)
    timers: dict[str, bool] = field(default_factory=dict)  # timer id -> fired
    timer_keys: dict[str, str] = field(default_factory=dict)  # timer id -> step key
    transitions: list[Transition] = field(default_factory=list)
    violations: list[Violation] = field(default_factory=list)
    count: int = 0
    last_version: int = 0

    def apply(self, event: Any) -> list[Transition]:
        """Fold one more event; returns the moves it made (violations are kept on self)."""
        self.count += 1
        fold = _Fold(self, event)
        try:
            moves = fold.run()
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            # A stored event without the fields its type has (edited, or from newer code).
            fold.violation(f"cannot be read: {exc!r}")
            moves = fold.moves
        self.transitions.extend(moves)
        return moves


def fold(events: Iterable[Any]) -> History:
    """Fold a whole history (events in stored order)."""
    history = History()
    for e in events:
        history.apply(e)
    return history


class _Fold:
    """The moves of one event."""

    def __init__(self, history: History, event: Any) -> None:
        self.h = history
        self.e = event
        self.name = type(event).__name__
        self.version = int(getattr(event, "originator_version", history.count))
        self.moves: list[Transition] = []

    def violation(self, message: str) -> None:
        self.h.violations.append(Violation(self.version, self.name, message))

    def run(self) -> list[Transition]:
        h, e, name = self.h, self.e, self.name
        if self.version <= h.last_version:
            self.violation(f"stored after version {h.last_version}: out of order")
        elif self.version != h.last_version + 1:
            first, last = h.last_version + 1, self.version - 1
            gap = f"version {first}" if first == last else f"versions {first} to {last}"
            self.violation(f"follows version {h.last_version}: {gap} missing")
        h.last_version = max(h.last_version, self.version)
        if name == "ExecutionStarted":
            if h.count == 1:
                self.execution(ET.START, note=f"workflow {getattr(e, 'workflow_id', '?')}")
            else:
                self.violation("ExecutionStarted is not the first event")
            return self.moves
        if h.count == 1:
            self.violation("a history starts with ExecutionStarted")
            h.status = E.RUNNING
        if h.status in TERMINAL_EXECUTION_STATUSES and name != "ExecutionRetried":
            self.violation(f"recorded after the execution ended {h.status.value}")
        if name in EXECUTION_EVENTS:
            reason = getattr(e, "reason", None)
            failed = name in ("ExecutionFailed", "ExecutionTimedOut", "ExecutionCancelled")
            self.execution(
                EXECUTION_EVENTS[name],
                error=reason if failed else None,
                note=reason if not failed else None,
            )
        elif name in STEP_EVENTS:
            self.step_event()
        elif name == "BranchSelected":
            selected = ", ".join(e.selected) or "none"
            before = h.steps.get(e.key, S.PENDING)
            self.step(e.key, ST.START, record=False)
            self.step(e.key, ST.SUCCEED, note=f"branch {e.branch}: {selected}", shown=before)
            for skipped_key, _ in e.skipped:
                self.step(skipped_key, ST.SKIP, note=f"branch not taken by {e.step_id!r}")
        elif name == "StepCompensated":
            if h.status is not E.COMPENSATING:
                self.violation(f"a rollback recorded while {h.status.value}")
            if e.ok:
                self.step(e.key, ST.COMPENSATE)
            else:
                self.still(e.key, note="a rollback action failed")
        elif name == "TimerFired":
            if h.timers.get(e.timer_id) is not False:
                self.violation(f"timer {e.timer_id!r} is not pending")
            h.timers[e.timer_id] = True
            self.still(h.timer_keys.get(e.timer_id), note=f"timer {e.timer_id} fired")
        elif name == "ExecutionRetried":
            # The table says from which statuses an execution may be retried.
            self.execution(ET.RETRY, note=e.reason)
            for key, attempts in e.reset.items():
                self.step(key, ST.RESET, note=f"reset by the retry after {attempts} attempts")
            for key in e.resumed:
                self.step(key, ST.RESUME, note="resumed by the retry")
        elif name == "LoopIterationStarted":
            if h.steps.get(e.key) is not S.RUNNING:
                self.violation(f"loop {e.key!r} is not running")
            self.still(e.key, note=f"iteration {e.index}")
        else:
            self.violation("not an execution event")
        return self.moves

    def step_event(self) -> None:
        h, e, name = self.h, self.e, self.name
        if name == "StepStarted" and h.status is E.COMPENSATING and e.kind != "rollback":
            self.violation(f"step {e.key!r} started while compensating")
        error = getattr(e, "error", None)
        message = None
        if isinstance(error, dict) and name in ("StepFailed", "StepRetryScheduled"):
            message = f"{error.get('type')}: {error.get('message')}"
        note = None
        if name == "StepRetryScheduled":
            note = f"retry in {e.delay}s"
        elif name in ("StepSkipped", "StepCancelled"):
            note = e.reason
        elif name == "StepRecovered":
            note = f"recovered by {e.handler_id}"
        elif name == "StepServedFromCache":
            note = f"from cache: execution {e.source_execution_id} step {e.source_step_key}"
        elif name == "StepWaiting":
            note = e.purpose if e.assignee is None else f"{e.purpose} for {e.assignee}"
        agent = getattr(e, "agent", None)  # the remote agent an outcome names, and why
        if agent and name in ("StepSucceeded", "StepFailed", "StepRetryScheduled"):
            route = getattr(e, "route", None)
            ran = f"on agent {agent}" + (f" ({route})" if route else "")
            note = ran if note is None else f"{note}; {ran}"
        self.step(
            e.key, STEP_EVENTS[name], attempt=getattr(e, "attempt", None), error=message, note=note
        )
        timer_id = getattr(e, "timer_id", None)
        if name in ("StepWaiting", "StepRetryScheduled") and timer_id is not None:
            if timer_id in h.timers:
                self.violation(f"timer {timer_id!r} set twice")
            h.timers[timer_id] = False
            h.timer_keys[timer_id] = e.key

    def execution(
        self, trigger: ExecutionTrigger, error: str | None = None, note: str | None = None
    ) -> None:
        before = self.h.status
        after = EXECUTION_TABLE.get((trigger, before))
        if after is None:
            self.violation(f"execution {before.value} --{trigger.value}--> is not in the table")
            after = _EXECUTION_DESTINATION[trigger]
        self.h.status = after
        self.moves.append(
            Transition(
                self.version,
                getattr(self.e, "timestamp", None),
                self.name,
                None,
                before.value,
                after.value,
                error=error,
                note=note,
            )
        )

    def step(
        self,
        key: str,
        trigger: StepTrigger,
        *,
        attempt: int | None = None,
        error: str | None = None,
        note: str | None = None,
        record: bool = True,
        shown: StepStatus | None = None,
    ) -> None:
        before = self.h.steps.get(key, S.PENDING)
        after = STEP_TABLE.get((trigger, before))
        if after is None:
            self.violation(f"step {key!r} {before.value} --{trigger.value}--> is not in the table")
            after = _STEP_DESTINATION[trigger]
        self.h.steps[key] = after
        if record:
            self.moves.append(
                Transition(
                    self.version,
                    getattr(self.e, "timestamp", None),
                    self.name,
                    key,
                    (shown or before).value,
                    after.value,
                    attempt=attempt,
                    error=error,
                    note=note,
                )
            )

    def still(self, key: str | None, note: str) -> None:
        """A move that changes no status (a timer, an iteration, a failed rollback)."""
        current = self.h.steps.get(key) if key is not None else None
        status = current.value if current is not None else None
        self.moves.append(
            Transition(
                self.version,
                getattr(self.e, "timestamp", None),
                self.name,
                key,
                status,
                status,
                note=note,
            )
        )
