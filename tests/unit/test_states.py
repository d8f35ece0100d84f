"""Transition tables: the machine, the lookups and the tables agree, and nothing else moves."""

from __future__ import annotations

import itertools
from enum import StrEnum

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transitions import Machine, MachineError

from flowledger.domain.errors import InvalidTransition
from flowledger.domain.states import (
    ACTIVE_STEP_STATUSES,
    EXECUTION_MACHINE,
    EXECUTION_TRANSITIONS,
    STEP_MACHINE,
    STEP_TRANSITIONS,
    TERMINAL_EXECUTION_STATUSES,
    TERMINAL_STEP_STATUSES,
    ExecutionStatus,
    ExecutionTrigger,
    StepStatus,
    StepTrigger,
    can_move_execution,
    can_move_step,
    execution_move,
    step_move,
)

E, S = ExecutionStatus, StepStatus
ET, ST = ExecutionTrigger, StepTrigger


def _flatten(table: tuple[tuple[StrEnum, tuple[StrEnum, ...], StrEnum], ...]) -> dict:
    moves: dict[tuple[str, str], str] = {}
    for trigger, sources, dest in table:
        for source in sources:
            assert (trigger, source) not in moves, f"{trigger} from {source} listed twice"
            moves[(trigger.value, source.value)] = dest.value
    return moves


EXECUTION_MOVES = _flatten(EXECUTION_TRANSITIONS)
STEP_MOVES = _flatten(STEP_TRANSITIONS)
ALL_EXECUTION_PAIRS = list(itertools.product(ExecutionTrigger, ExecutionStatus))
ALL_STEP_PAIRS = list(itertools.product(StepTrigger, StepStatus))


# -- the machine built from the tables agrees with the lookups -----------------------------


@pytest.mark.parametrize(("trigger", "status"), ALL_EXECUTION_PAIRS)
def test_execution_machine_and_lookup_agree_with_the_table(
    trigger: ExecutionTrigger, status: ExecutionStatus
) -> None:
    machine_dests = {
        t.dest
        for t in EXECUTION_MACHINE.get_transitions(trigger=trigger.value, source=status.value)
    }
    expected = EXECUTION_MOVES.get((trigger.value, status.value))
    assert machine_dests == ({expected} if expected else set())
    assert can_move_execution(status, trigger) is (expected is not None)
    if expected is None:
        with pytest.raises(InvalidTransition, match=f"cannot {trigger.value} while {status.value}"):
            execution_move(status, trigger)
    else:
        assert execution_move(status, trigger) is ExecutionStatus(expected)


@pytest.mark.parametrize(("trigger", "status"), ALL_STEP_PAIRS)
def test_step_machine_and_lookup_agree_with_the_table(
    trigger: StepTrigger, status: StepStatus
) -> None:
    machine_dests = {
        t.dest for t in STEP_MACHINE.get_transitions(trigger=trigger.value, source=status.value)
    }
    expected = STEP_MOVES.get((trigger.value, status.value))
    assert machine_dests == ({expected} if expected else set())
    assert can_move_step(status, trigger) is (expected is not None)
    if expected is None:
        with pytest.raises(
            InvalidTransition, match=f"step 'k' cannot {trigger.value} while {status.value}"
        ):
            step_move("k", status, trigger)
    else:
        assert step_move("k", status, trigger) is StepStatus(expected)


def test_machines_know_every_status_and_start_pending() -> None:
    assert set(EXECUTION_MACHINE.states) == {s.value for s in ExecutionStatus}
    assert set(STEP_MACHINE.states) == {s.value for s in StepStatus}
    assert EXECUTION_MACHINE.initial == E.PENDING
    assert STEP_MACHINE.initial == S.PENDING


def test_machines_are_bound_to_no_model() -> None:
    # A bound model would hold state outside the events (see STYLE.md).
    assert EXECUTION_MACHINE.models == []
    assert STEP_MACHINE.models == []


def test_machines_have_no_auto_transitions() -> None:
    assert not any(
        t.startswith("to_") for t in EXECUTION_MACHINE.get_triggers(*(s.value for s in E))
    )
    assert not any(t.startswith("to_") for t in STEP_MACHINE.get_triggers(*(s.value for s in S)))


# -- terminal statuses ---------------------------------------------------------------------


def test_a_completed_execution_has_no_way_out() -> None:
    assert EXECUTION_MACHINE.get_triggers(E.COMPLETED.value) == []
    for trigger in ExecutionTrigger:
        with pytest.raises(InvalidTransition):
            execution_move(E.COMPLETED, trigger)


def test_an_execution_that_ended_without_completing_leaves_only_by_a_retry() -> None:
    for status in TERMINAL_EXECUTION_STATUSES - {E.COMPLETED}:
        assert EXECUTION_MACHINE.get_triggers(status.value) == [ET.RETRY.value]
        assert execution_move(status, ET.RETRY) is E.RUNNING
        for trigger in set(ExecutionTrigger) - {ET.RETRY}:
            with pytest.raises(InvalidTransition):
                execution_move(status, trigger)


def test_only_an_ended_execution_is_retried() -> None:
    for status in set(ExecutionStatus) - TERMINAL_EXECUTION_STATUSES:
        with pytest.raises(InvalidTransition, match=f"cannot retry while {status.value}"):
            execution_move(status, ET.RETRY)


def test_terminal_step_statuses_leave_only_by_recover_compensate_and_a_retry() -> None:
    exits = {
        (status, trigger, dest)
        for (trigger, status), dest in STEP_MOVES.items()
        if StepStatus(status) in TERMINAL_STEP_STATUSES
    }
    assert exits == {
        (S.FAILED, ST.RECOVER, S.COMPLETED),
        (S.COMPLETED, ST.COMPENSATE, S.COMPENSATED),
        (S.FAILED, ST.RESET, S.PENDING),
        (S.CANCELLED, ST.RESET, S.PENDING),
        (S.SKIPPED, ST.RESET, S.PENDING),
        (S.FAILED, ST.RESUME, S.RUNNING),
        (S.CANCELLED, ST.RESUME, S.RUNNING),
    }


def test_completed_and_compensated_steps_are_never_reset() -> None:
    for status in (S.COMPLETED, S.COMPENSATED):
        for trigger in (ST.RESET, ST.RESUME):
            with pytest.raises(InvalidTransition):
                step_move("k", status, trigger)


def test_compensated_steps_are_final_and_skipped_and_cancelled_ones_move_only_in_a_retry() -> None:
    assert STEP_MACHINE.get_triggers(S.COMPENSATED.value) == []
    assert set(STEP_MACHINE.get_triggers(S.SKIPPED.value)) == {ST.RESET.value}
    assert set(STEP_MACHINE.get_triggers(S.CANCELLED.value)) == {
        ST.RESET.value,
        ST.RESUME.value,
    }


def test_an_active_step_is_never_reset() -> None:
    # A retry finds none: an execution ends only once its active steps were cancelled.
    for status in (*ACTIVE_STEP_STATUSES, S.PENDING):
        for trigger in (ST.RESET, ST.RESUME):
            assert not can_move_step(status, trigger)


def test_status_sets_partition_the_step_statuses() -> None:
    assert not ACTIVE_STEP_STATUSES & TERMINAL_STEP_STATUSES
    assert ACTIVE_STEP_STATUSES | TERMINAL_STEP_STATUSES | {S.PENDING} == set(StepStatus)
    assert set(ExecutionStatus) - TERMINAL_EXECUTION_STATUSES == {
        E.PENDING,
        E.RUNNING,
        E.WAITING,
        E.COMPENSATING,
    }


def _reachable(moves: dict[tuple[str, str], str], start: str) -> set[str]:
    seen, todo = {start}, [start]
    while todo:
        here = todo.pop()
        for (_, source), dest in moves.items():
            if source == here and dest not in seen:
                seen.add(dest)
                todo.append(dest)
    return seen


def test_every_status_is_reachable_and_every_status_can_end() -> None:
    assert _reachable(EXECUTION_MOVES, E.PENDING) == {s.value for s in ExecutionStatus}
    assert _reachable(STEP_MOVES, S.PENDING) == {s.value for s in StepStatus}
    for status in ExecutionStatus:
        assert _reachable(EXECUTION_MOVES, status) & TERMINAL_EXECUTION_STATUSES
    for status in StepStatus:
        assert _reachable(STEP_MOVES, status) & TERMINAL_STEP_STATUSES


# -- random walks: a machine bound to a throwaway model walks as the lookups do -------------


class _Model:
    state: str


def _walker(table: tuple[tuple[StrEnum, tuple[StrEnum, ...], StrEnum], ...], initial: str):
    model = _Model()
    states = {s.value for _, sources, dest in table for s in (*sources, dest)} | {initial}
    Machine(
        model=model,
        states=sorted(states),
        transitions=[
            {"trigger": t.value, "source": [s.value for s in sources], "dest": dest.value}
            for t, sources, dest in table
        ],
        initial=initial,
        auto_transitions=False,
    )
    return model


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(StepTrigger), max_size=30))
def test_random_step_walks_agree_with_a_machine(triggers: list[StepTrigger]) -> None:
    model = _walker(STEP_TRANSITIONS, S.PENDING.value)
    status = S.PENDING
    for trigger in triggers:
        try:
            status = step_move("k", status, trigger)
            allowed = True
        except InvalidTransition:
            allowed = False
        try:
            getattr(model, trigger.value)()
            moved = True
        except MachineError:
            moved = False
        assert allowed == moved
        assert model.state == status.value


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(ExecutionTrigger), max_size=20))
def test_random_execution_walks_agree_with_a_machine(triggers: list[ExecutionTrigger]) -> None:
    model = _walker(EXECUTION_TRANSITIONS, E.PENDING.value)
    status = E.PENDING
    for trigger in triggers:
        try:
            status = execution_move(status, trigger)
            allowed = True
        except InvalidTransition:
            allowed = False
        try:
            getattr(model, trigger.value)()
            moved = True
        except MachineError:
            moved = False
        assert allowed == moved
        assert model.state == status.value
