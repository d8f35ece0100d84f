"""Group commit inside one execution: what becomes ready together is committed together.

Counts of commits are exact here: every action is a no-op coroutine, so the results of a
fan-out all arrive before the first of them has been committed.
"""

from __future__ import annotations

import asyncio
from typing import Any

import support

from flowledger.domain.states import ExecutionStatus, StepStatus

SETTLE = 10.0
FANOUT = 20


async def test_a_fan_outs_results_are_committed_together(engine: Any, registry: Any) -> None:
    @registry.action("noop")
    async def noop(data: dict[str, Any]) -> dict[str, Any]:
        return {}

    children = [{"step_id": f"c{i}", "type": "action", "action": "noop"} for i in range(FANOUT)]
    wf = await engine.register(
        support.workflow(
            {
                "max_parallel_steps": FANOUT,
                "steps": [
                    {"step_id": "fan", "type": "parallel", "parallel_steps": children},
                    {
                        "step_id": "join",
                        "type": "action",
                        "action": "noop",
                        "dependencies": ["fan"],
                    },
                ],
            }
        )
    )
    before = engine.commits
    eid = await engine.start(wf, {})
    ex = await asyncio.wait_for(engine.wait_settled(eid), SETTLE)

    assert ex.status is ExecutionStatus.COMPLETED
    children_done = [r for r in ex.steps.values() if r.step_id.startswith("c")]
    assert len(children_done) == FANOUT, sorted(ex.steps)
    assert all(r.status is StepStatus.COMPLETED for r in children_done)
    # Start and the fan-out's 20 starts; the 20 results and the join's start; the join's
    # result and the end. One commit per child result would make 23.
    assert engine.commits - before == 3
    assert support.event_types(engine.app, eid).count("StepSucceeded") == FANOUT + 2


async def test_an_execution_without_a_key_starts_in_one_commit(engine: Any, registry: Any) -> None:
    @registry.action("noop")
    async def noop(data: dict[str, Any]) -> dict[str, Any]:
        return {}

    wf = await engine.register(
        support.workflow({"steps": [{"step_id": "a", "type": "action", "action": "noop"}]})
    )
    before = engine.commits
    eid = await engine.start(wf, {})
    stored = support.event_types(engine.app, eid)  # committed before start() returns

    assert stored[0] == "ExecutionStarted"
    assert "StepStarted" in stored
    ex = await asyncio.wait_for(engine.wait_settled(eid), SETTLE)
    assert ex.status is ExecutionStatus.COMPLETED
    assert engine.commits - before == 2  # started with the step's start; result with the end


async def test_a_start_that_cannot_be_stored_leaves_nothing_driven(
    engine: Any, registry: Any
) -> None:
    @registry.action("noop")
    async def noop(data: dict[str, Any]) -> dict[str, Any]:
        return {}

    wf = await engine.register(
        support.workflow({"steps": [{"step_id": "a", "type": "action", "action": "noop"}]})
    )

    def refuse(events: list[Any]) -> None:
        raise OSError("the store is down")

    engine.app.save_events, saved = refuse, engine.app.save_events
    try:
        try:
            await engine.start(wf, {})
        except OSError:
            pass
        else:
            raise AssertionError("start() returned although nothing was stored")
    finally:
        engine.app.save_events = saved
    assert engine.driven == 0
    assert engine.app.execution_ids() == []
