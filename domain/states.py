"""Transition tables for execution and step statuses: the only moves the domain allows."""

from __future__ import annotations

from enum import StrEnum
from typing import Final

from transitions import Machine

from flowledger.domain.errors import InvalidTransition


class ExecutionStatus(StrEnum):
    """Where an execution is in its life."""

    PENDING = "pending"
    RUNNING = "running"
    WAITING = "waiting"
    COMPENSATING = "compensating"
    COMPLETED = "completed"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"


class StepStatus(StrEnum):
    """Where one step instance is in its life."""

    PENDING = "pending"
    RUNNING = "running"
    RETRYING = "retrying"
    WAITING = "waiting"
    COMPLETED = "completed"
    FAILED = "failed"
    SKIPPED = "skipped"
    COMPENSATED = "compensated"
    CANCELLED = "cancelled"


class ExecutionTrigger(StrEnum):
    """The moves of an execution."""

    START = "start"
    WAIT = "wait"
    RESUME = "resume"
    COMPENSATE = "compensate"
    COMPLETE = "complete"
    FAIL = "fail"
    TIME_OUT = "time_out"
    CANCEL = "cancel"
    RETRY = "retry"


class StepTrigger(StrEnum):
    """The moves of a step instance."""

    START = "start"
    WAIT = "wait"
    SUCCEED = "succeed"
    FAIL = "fail"
    SCHEDULE_RETRY = "schedule_retry"
    SKIP = "skip"
    RECOVER = "recover"
    COMPENSATE = "compensate"
    CANCEL = "cancel"
    RESET = "reset"
    RESUME = "resume"


E, S = ExecutionStatus, StepStatus

EXECUTION_TRANSITIONS: Final[
    tuple[tuple[ExecutionTrigger, tuple[ExecutionStatus, ...], ExecutionStatus], ...]
] = (
    (ExecutionTrigger.START, (E.PENDING,), E.RUNNING),
    (ExecutionTrigger.WAIT, (E.RUNNING,), E.WAITING),
    (ExecutionTrigger.RESUME, (E.WAITING,), E.RUNNING),
    (ExecutionTrigger.COMPENSATE, (E.RUNNING, E.WAITING), E.COMPENSATING),
    (ExecutionTrigger.COMPLETE, (E.RUNNING,), E.COMPLETED),
    (ExecutionTrigger.FAIL, (E.RUNNING, E.WAITING, E.COMPENSATING), E.FAILED),
    (ExecutionTrigger.TIME_OUT, (E.RUNNING, E.WAITING, E.COMPENSATING), E.TIMED_OUT),
    (ExecutionTrigger.CANCEL, (E.PENDING, E.RUNNING, E.WAITING, E.COMPENSATING), E.CANCELLED),
    # A retry runs an execution that ended without completing again from the steps that
    # did not complete (progress.retry refuses one whose completed steps were compensated).
    (ExecutionTrigger.RETRY, (E.FAILED, E.TIMED_OUT, E.CANCELLED), E.RUNNING),
)

STEP_TRANSITIONS: Final[tuple[tuple[StepTrigger, tuple[StepStatus, ...], StepStatus], ...]] = (
    (StepTrigger.START, (S.PENDING, S.RETRYING), S.RUNNING),
    (StepTrigger.WAIT, (S.PENDING, S.RETRYING), S.WAITING),
    (StepTrigger.SUCCEED, (S.RUNNING, S.WAITING), S.COMPLETED),
    (StepTrigger.FAIL, (S.RUNNING, S.WAITING), S.FAILED),
    (StepTrigger.SCHEDULE_RETRY, (S.RUNNING, S.WAITING), S.RETRYING),
    (StepTrigger.SKIP, (S.PENDING,), S.SKIPPED),
    # An error handler succeeded: the failed step is recovered with its result.
    (StepTrigger.RECOVER, (S.FAILED,), S.COMPLETED),
    (StepTrigger.COMPENSATE, (S.COMPLETED,), S.COMPENSATED),
    # Only a step that started can be cancelled; one that never did just stays pending.
    (StepTrigger.CANCEL, (S.RUNNING, S.RETRYING, S.WAITING), S.CANCELLED),
    # An execution retry: a step that did not complete (or was skipped because one did
    # not) runs again as if it never had; its attempt numbers count on.
    (StepTrigger.RESET, (S.FAILED, S.CANCELLED, S.SKIPPED), S.PENDING),
    # An execution retry: a container that had started its children picks up where it
    # stopped (its completed children and iterations are kept).
    (StepTrigger.RESUME, (S.FAILED, S.CANCELLED), S.RUNNING),
)

TERMINAL_EXECUTION_STATUSES: Final = frozenset({E.COMPLETED, E.FAILED, E.TIMED_OUT, E.CANCELLED})
TERMINAL_STEP_STATUSES: Final = frozenset(
    {S.COMPLETED, S.FAILED, S.SKIPPED, S.COMPENSATED, S.CANCELLED}
)
ACTIVE_STEP_STATUSES: Final = frozenset({S.RUNNING, S.RETRYING, S.WAITING})


def _machine(
    states: type[StrEnum],
    table: tuple[tuple[StrEnum, tuple[StrEnum, ...], StrEnum], ...],
    initial: StrEnum,
) -> Machine:
    # model=None: the machine only answers questions about the table; binding it to an
    # aggregate would put state outside the events and break replay and snapshots.
    return Machine(
        model=None,
        states=[s.value for s in states],
        transitions=[
            {"trigger": t.value, "source": [s.value for s in sources], "dest": dest.value}
            for t, sources, dest in table
        ],
        initial=initial.value,
        auto_transitions=False,
        send_event=False,
    )


EXECUTION_MACHINE: Final = _machine(ExecutionStatus, EXECUTION_TRANSITIONS, E.PENDING)
STEP_MACHINE: Final = _machine(StepStatus, STEP_TRANSITIONS, S.PENDING)


def _lookup(
    machine: Machine, triggers: type[StrEnum], states: type[StrEnum]
) -> dict[tuple[str, str], str]:
    # Flattened once at import from the machine, so a lookup on the hot path is a dict get.
    table: dict[tuple[str, str], str] = {}
    for trigger in triggers:
        for source in states:
            for tr in machine.get_transitions(trigger=trigger.value, source=source.value):
                table[(trigger.value, source.value)] = str(tr.dest)
    return table


_EXECUTION_MOVES: Final = _lookup(EXECUTION_MACHINE, ExecutionTrigger, ExecutionStatus)
_STEP_MOVES: Final = _lookup(STEP_MACHINE, StepTrigger, StepStatus)


def execution_move(status: ExecutionStatus, trigger: ExecutionTrigger) -> ExecutionStatus:
    """The status `trigger` leads to from `status`; InvalidTransition if the table forbids it."""
    dest = _EXECUTION_MOVES.get((trigger.value, status.value))
    if dest is None:
        raise InvalidTransition(f"execution cannot {trigger.value} while {status.value}")
    return ExecutionStatus(dest)


def step_move(step_key: str, status: StepStatus, trigger: StepTrigger) -> StepStatus:
    """The status `trigger` leads to from `status` for a step; InvalidTransition if forbidden."""
    dest = _STEP_MOVES.get((trigger.value, status.value))
    if dest is None:
        raise InvalidTransition(f"step {step_key!r} cannot {trigger.value} while {status.value}")
    return StepStatus(dest)


def can_move_execution(status: ExecutionStatus, trigger: ExecutionTrigger) -> bool:
    """Whether the execution table allows `trigger` from `status`."""
    return (trigger.value, status.value) in _EXECUTION_MOVES


def can_move_step(status: StepStatus, trigger: StepTrigger) -> bool:
    """Whether the step table allows `trigger` from `status`."""
    return (trigger.value, status.value) in _STEP_MOVES
