"""The remote agent that ran an attempt is recorded on the attempt's outcome event, and a
history recorded before outcome events had an `agent` still folds (as None)."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import support

from flowledger.domain import progress
from flowledger.domain.execution import Execution
from flowledger.domain.states import StepStatus
from flowledger.domain.workflow import Workflow

T0 = datetime(2024, 1, 1, tzinfo=UTC)
DOC = {
    "workflow_id": "agents",
    "version": "1",
    "retry_policy": {"max_retries": 1, "retry_delay": 1, "jitter": 0},
    "steps": [{"step_id": "a", "type": "action", "action": "x"}],
}


def _started() -> tuple[Execution, Workflow, list[Any], progress.Dispatch]:
    wf = Workflow(support.workflow(DOC))
    ex = Execution.begin(UUID(int=3), "agents", "1", {}, None, 7, T0 + timedelta(hours=1), T0)
    [dispatch] = progress.advance(ex, wf, T0).dispatches
    return ex, wf, list(ex.collect_events()), dispatch


def _fold(events: list[Any]) -> Execution:
    aggregate: Any = None
    for event in events:
        aggregate = event.mutate(aggregate)
    assert isinstance(aggregate, Execution)
    return aggregate


def test_a_failed_then_succeeded_attempt_name_their_agents() -> None:
    ex, wf, log, first = _started()
    assert progress.fail_attempt(ex, wf, "a", first.attempt_id, "Boom", "no", True, T0, "a1")
    assert ex.steps["a"].agent == "a1"
    [retry] = list(ex.collect_events())
    assert retry.agent == "a1"
    [second] = progress.advance(ex, wf, T0 + timedelta(seconds=2)).dispatches
    assert progress.succeed_attempt(ex, wf, "a", second.attempt_id, {"ok": 1}, T0, "a2")
    events = [*log, retry, *ex.collect_events()]
    succeeded = [e for e in events if type(e).__name__ == "StepSucceeded"]
    assert [e.agent for e in succeeded] == ["a2"]
    assert _fold(events).steps["a"].agent == "a2"


def test_an_attempt_run_in_process_names_no_agent() -> None:
    ex, wf, _, dispatch = _started()
    assert progress.succeed_attempt(ex, wf, "a", dispatch.attempt_id, {}, T0)
    assert ex.steps["a"].agent is None


def test_an_outcome_recorded_before_agents_existed_folds() -> None:
    ex, wf, log, dispatch = _started()
    assert progress.succeed_attempt(ex, wf, "a", dispatch.attempt_id, {}, T0, "a1")
    events = log + list(ex.collect_events())
    old = []
    for event in events:
        event = copy.copy(event)
        if hasattr(event, "agent"):
            object.__delattr__(event, "agent")  # as stored by an earlier version
        old.append(event)
    folded = _fold(old)
    assert folded.steps["a"].status is StepStatus.COMPLETED
    assert folded.steps["a"].agent is None
