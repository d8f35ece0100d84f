"""Commands from the command topic are stored once: the record of a command's id goes in
the transaction of what the command caused (on every store)."""

from __future__ import annotations

from typing import Any
from uuid import uuid4

import pytest
import support

from flowledger.adapters.kafka import take
from flowledger.adapters.kafka_commands import parse_command
from flowledger.domain.errors import StepNotFound, WorkflowNotFound
from flowledger.services.app import FlowledgerApp

DEFINITION = {
    "workflow_id": "intake",
    "version": "1",
    "steps": [
        {
            "step_id": "review",
            "type": "human_task",
            "assignee": "alice",
            "form_schema": {"type": "object"},
        }
    ],
}


def command(**fields: Any) -> Any:
    import json

    return parse_command(json.dumps({"command_id": str(uuid4()), **fields}).encode())


def register(app: FlowledgerApp) -> None:
    assert take(app, command(type="register_workflow", definition=DEFINITION))


def test_the_same_command_three_times_is_one_execution(app: FlowledgerApp) -> None:
    register(app)
    start = command(type="start_execution", workflow_id="intake", input={"n": 1})

    assert [take(app, start) for _ in range(3)] == [True, False, False]
    assert len(app.execution_ids()) == 1
    assert app.handled(start.command_id)


def test_two_starts_with_one_idempotency_key_are_one_execution(app: FlowledgerApp) -> None:
    register(app)
    for _ in range(2):
        start = command(
            type="start_execution", workflow_id="intake", input={}, idempotency_key="order-9"
        )
        assert take(app, start)  # a new command id: handled, but no second execution
    assert len(app.execution_ids()) == 1


def test_answers_and_cancellations_are_recorded_once(app: FlowledgerApp) -> None:
    register(app)
    assert take(app, command(type="start_execution", workflow_id="intake", input={}))
    (eid,) = app.execution_ids()
    # Nothing drives it here: the human task is not waiting yet, so an answer is refused
    # and leaves no record (a redelivery would be refused again, not swallowed).
    answer = command(type="complete_human_task", execution_id=str(eid), step_id="review", data={})
    with pytest.raises(StepNotFound):
        take(app, answer)
    assert not app.handled(answer.command_id)

    cancel = command(type="cancel_execution", execution_id=str(eid))
    assert [take(app, cancel), take(app, cancel)] == [True, False]
    assert support.event_types(app, eid).count("ExecutionCancelled") == 1


def test_an_unknown_workflow_is_refused_and_nothing_is_stored(app: FlowledgerApp) -> None:
    start = command(type="start_execution", workflow_id="nope", input={})
    with pytest.raises(WorkflowNotFound):
        take(app, start)
    assert app.execution_ids() == []
    assert not app.handled(start.command_id)
