"""Executions that wait for a person or a distant timer are not held in memory: the engine
lets go of them (keeping only their next timer) and loads them again when something
happens to them."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import support

from flowledger.domain.states import ExecutionStatus, StepStatus
from flowledger.services import engine as engine_module
from flowledger.services.follow import submit_completion, submit_start

SETTLE = 10.0
REVIEW = {
    "step_id": "review",
    "type": "human_task",
    "assignee": "alice",
    "form_schema": {
        "type": "object",
        "required": ["approved"],
        "properties": {"approved": {"type": "boolean"}},
    },
}
PUBLISH = {"step_id": "publish", "type": "action", "action": "publish", "dependencies": ["review"]}


@pytest.fixture
def published(registry: Any) -> list[dict[str, Any]]:
    """The inputs `publish` ran with."""
    seen: list[dict[str, Any]] = []

    @registry.action("publish")
    def publish(data: dict[str, Any]) -> dict[str, Any]:
        seen.append(data)
        return {"published": True}

    return seen


async def waiting_for_review(engine: Any, count: int = 1) -> tuple[Any, list[Any]]:
    wf = await engine.register(support.workflow({"steps": [REVIEW, PUBLISH]}))
    eids = [await engine.start(wf, {"n": n}) for n in range(count)]
    for eid in eids:
        ex = await asyncio.wait_for(engine.wait_settled(eid), SETTLE)
        assert ex.status is ExecutionStatus.WAITING
    return wf, eids


async def test_executions_waiting_for_a_person_are_let_go(engine, published) -> None:
    _, eids = await waiting_for_review(engine, 3)

    assert (engine.driven, engine.dormant) == (0, 3)
    for eid in eids:
        ex = await engine.execution(eid)  # read from the store
        assert ex.steps["review"].status is StepStatus.WAITING
    await asyncio.wait_for(engine.wait_idle(), SETTLE)  # nothing can move without a person


async def test_an_answer_loads_a_dormant_execution_and_drives_it_to_its_end(
    engine, app, published
) -> None:
    _, [eid] = await waiting_for_review(engine)
    events = support.event_types(app, eid)

    await engine.complete_human_task(eid, "review", {"approved": True})
    ex = await asyncio.wait_for(engine.wait_settled(eid), SETTLE)

    assert ex.status is ExecutionStatus.COMPLETED
    assert len(published) == 1
    # Loading it again added nothing of its own: no lost attempt, no second wait.
    assert support.event_types(app, eid)[: len(events)] == events
    assert support.event_types(app, eid)[len(events) :] == [
        "HumanTaskCompleted",
        "ExecutionResumed",
        "StepStarted",
        "StepSucceeded",
        "ExecutionCompleted",
    ]
    assert (engine.driven, engine.dormant) == (0, 0)


async def test_a_dormant_execution_is_cancelled_and_compensated_on_request(
    engine, published
) -> None:
    _, [eid] = await waiting_for_review(engine)

    await engine.cancel(eid, "withdrawn")
    ex = await asyncio.wait_for(engine.wait_settled(eid), SETTLE)

    assert ex.status is ExecutionStatus.CANCELLED
    assert (engine.driven, engine.dormant) == (0, 0)


async def test_an_answer_stored_by_another_process_wakes_the_dormant_execution(
    engine, app, published
) -> None:
    _, [eid] = await waiting_for_review(engine)
    await engine.poll_store()  # its own events: nothing to load again
    assert (engine.driven, engine.dormant) == (0, 1)

    await asyncio.to_thread(submit_completion, app, eid, "review", {"approved": True})
    await engine.poll_store()

    ex = await asyncio.wait_for(engine.wait_settled(eid), SETTLE)
    assert ex.status is ExecutionStatus.COMPLETED
    assert len(published) == 1


async def test_a_distant_timer_lets_go_and_fires_once(engine, app, monkeypatch) -> None:
    monkeypatch.setattr(engine_module, "DORMANT_AFTER", 0.2)
    wf = await engine.register(
        support.workflow({"steps": [{"step_id": "pause", "type": "wait", "duration": 0.6}]})
    )

    eid = await engine.start(wf, {})

    assert (engine.driven, engine.dormant) == (0, 1)
    # Not settled: only a timer is awaited; waiting for it loads the execution again.
    ex = await asyncio.wait_for(engine.wait_settled(eid), SETTLE)
    assert ex.status is ExecutionStatus.COMPLETED
    assert support.event_types(app, eid).count("TimerFired") == 1
    assert (engine.driven, engine.dormant) == (0, 0)


async def test_a_dormant_timer_fires_without_anyone_waiting(engine, app, monkeypatch) -> None:
    monkeypatch.setattr(engine_module, "DORMANT_AFTER", 0.2)
    wf = await engine.register(
        support.workflow({"steps": [{"step_id": "pause", "type": "wait", "duration": 0.4}]})
    )
    eid = await engine.start(wf, {})
    assert engine.dormant == 1

    # wait_idle counts a timer still to fire as work to do.
    await asyncio.wait_for(engine.wait_idle(), SETTLE)

    assert (await engine.execution(eid)).status is ExecutionStatus.COMPLETED
    assert support.event_types(app, eid).count("TimerFired") == 1


async def test_waiting_for_an_execution_stored_by_another_path_drives_it(engine, app, registry):
    """An execution this engine owns but has not loaded (stored by a command intake or a
    follower a moment ago, before the store watcher saw it) is taken up, not answered
    with its unsettled state."""
    @registry.action("hello")
    def hello(data: dict) -> dict:
        return {"hi": data["name"]}

    wf = await engine.register(
        support.workflow({"steps": [{"step_id": "a", "type": "action", "action": "hello"}]})
    )
    eid = submit_start(app, wf, {"name": "ada"}, None)

    ex = await asyncio.wait_for(engine.wait_settled(eid), 10)

    assert ex.status is ExecutionStatus.COMPLETED
    assert ex.data["a"] == {"hi": "ada"}
