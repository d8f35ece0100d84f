"""Another writer on an execution the engine drives: optimistic concurrency, on every store.

While an engine holds an execution, someone else may append to it: `flowledger complete`
or `cancel` writing straight to the store while a worker drives (any store), or a second
engine process (PostgreSQL). The engine's next save then meets a newer version and fails
(IntegrityError). What the engine was recording (an attempt's result, a person's answer,
a cancellation) must then be recorded on the execution as the store has it, not dropped.
"""

from __future__ import annotations

import asyncio

import pytest
import support

from flowledger.domain.errors import InvalidTransition
from flowledger.domain.states import ExecutionStatus, StepStatus
from flowledger.services.follow import submit_cancel, submit_completion

SETTLE = 5.0


def review(step_id: str) -> dict[str, object]:
    """A human task that waits for {"approved": bool}."""
    return {
        "step_id": step_id,
        "type": "human_task",
        "form_schema": {
            "type": "object",
            "properties": {"approved": {"type": "boolean"}},
            "required": ["approved"],
        },
    }


async def test_a_result_that_meets_a_newer_version_is_recorded_on_it(engine, app, registry, until):
    release = asyncio.Event()

    @registry.action("work")
    async def work(inp):
        await release.wait()
        return {"done": True}

    wf = await engine.register(
        support.workflow(
            {"steps": [{"step_id": "work", "type": "action", "action": "work"}, review("review")]}
        )
    )
    eid = await engine.start(wf, {})
    await until(
        eid,
        lambda ex: (
            ex.steps["work"].status is StepStatus.RUNNING
            and ex.steps["review"].status is StepStatus.WAITING
        ),
    )
    # Another process answers straight into the store: the engine's view is now behind.
    await asyncio.to_thread(submit_completion, app, eid, "review", {"approved": True})
    release.set()

    ex = await asyncio.wait_for(engine.wait_settled(eid), SETTLE)

    assert ex.status is ExecutionStatus.COMPLETED
    assert ex.data["work"] == {"done": True}
    assert ex.data["review"] == {"approved": True}
    assert support.event_types(app, eid).count("StepSucceeded") == 1
    assert support.event_types(app, eid).count("HumanTaskCompleted") == 1


@pytest.mark.parametrize("command", ["complete", "cancel"])
async def test_a_command_given_to_an_engine_whose_view_is_behind_is_recorded(
    engine, app, until, command
):
    wf = await engine.register(support.workflow({"steps": [review("first"), review("second")]}))
    eid = await engine.start(wf, {})
    await until(eid, lambda ex: ex.status is ExecutionStatus.WAITING)
    await asyncio.to_thread(submit_completion, app, eid, "first", {"approved": True})

    if command == "complete":
        await engine.complete_human_task(eid, "second", {"approved": False})
    else:
        await engine.cancel(eid, "stop")
    ex = await asyncio.wait_for(engine.wait_settled(eid), SETTLE)

    stored = app.execution(eid)
    assert stored.data["first"] == {"approved": True}
    if command == "complete":
        assert ex.status is stored.status is ExecutionStatus.COMPLETED
        assert stored.data["second"] == {"approved": False}
    else:
        assert ex.status is stored.status is ExecutionStatus.CANCELLED
        assert stored.steps["second"].status is StepStatus.CANCELLED


async def test_a_second_answer_to_a_task_answered_elsewhere_is_refused(engine, app, until):
    wf = await engine.register(support.workflow({"steps": [review("review")]}))
    eid = await engine.start(wf, {})
    await until(eid, lambda ex: ex.status is ExecutionStatus.WAITING)
    await asyncio.to_thread(submit_completion, app, eid, "review", {"approved": True})

    with pytest.raises(InvalidTransition):
        await engine.complete_human_task(eid, "review", {"approved": False})

    ex = await asyncio.wait_for(engine.wait_settled(eid), SETTLE)
    assert ex.status is ExecutionStatus.COMPLETED
    assert app.execution(eid).data["review"] == {"approved": True}
    assert support.event_types(app, eid).count("HumanTaskCompleted") == 1


async def test_a_cancellation_stored_elsewhere_stops_the_engine_s_running_attempt(
    engine, app, registry, until
):
    started, release = asyncio.Event(), asyncio.Event()

    @registry.action("work")
    async def work(inp):
        started.set()
        await release.wait()
        return {"done": True}

    wf = await engine.register(
        support.workflow({"steps": [{"step_id": "work", "type": "action", "action": "work"}]})
    )
    eid = await engine.start(wf, {})
    await asyncio.wait_for(started.wait(), SETTLE)
    await asyncio.to_thread(submit_cancel, app, eid, "stop")
    release.set()

    ex = await asyncio.wait_for(engine.wait_settled(eid), SETTLE)

    assert ex.status is ExecutionStatus.CANCELLED
    assert "StepSucceeded" not in support.event_types(app, eid)
