"""Engines that share one PostgreSQL store by ownership (`Engine.set_owner`): each drives
only the executions its owner function accepts; an execution started or answered on an
engine that does not own it is stored for its owner; an engine that takes over another's
executions resumes them from their events, an attempt the other left running counting as
a failed attempt that is retried.

No broker: in a worker the owner functions come from the command topic's partitions
(adapters/cli_kafka.py); here they are plain sets of execution ids."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID, uuid4

import pytest
import support

from flowledger.adapters.agents import ActionContext, AgentRegistry, InProcessRunner
from flowledger.domain.states import ExecutionStatus, StepStatus
from flowledger.domain.workflow import Workflow
from flowledger.services.app import FlowledgerApp, execution_id_for
from flowledger.services.engine import Engine

SETTLE = 10.0  # a bound so a broken engine fails a test instead of hanging it
DEFINITION = {
    "workflow_id": "owned",
    "version": "1",
    "retry_policy": {"max_retries": 2, "retry_delay": 0.01, "jitter": 0},
    "steps": [{"step_id": "work", "type": "action", "action": "work"}],
}
REVIEWED = {
    "workflow_id": "reviewed",
    "version": "1",
    "steps": [
        {
            "step_id": "review",
            "type": "human_task",
            "form_schema": {"type": "object", "properties": {"ok": {"type": "boolean"}}},
        },
        {"step_id": "work", "type": "action", "action": "work", "dependencies": ["review"]},
    ],
}


@dataclass
class Side:
    """One engine process: its own application (connections) on the shared database, its
    own agents, and what they did."""

    name: str
    app: FlowledgerApp
    engine: Engine
    runner: InProcessRunner
    ran: list[tuple[str, int]] = field(default_factory=list)  # (execution, attempt) begun
    cancelled: list[tuple[str, int]] = field(default_factory=list)
    started: asyncio.Event = field(default_factory=asyncio.Event)

    def executions_run(self) -> set[UUID]:
        return {UUID(eid) for eid, _ in self.ran}


def _side(name: str, env: dict[str, str]) -> Side:
    app = FlowledgerApp(env=dict(env))
    registry = AgentRegistry()
    runner = InProcessRunner(registry)
    side = Side(name, app, Engine(app, runner), runner)

    @registry.action("work")
    async def work(data: dict[str, Any], ctx: ActionContext) -> dict[str, Any]:
        side.ran.append((ctx.execution_id, ctx.attempt))
        side.started.set()
        if data.get("fail_on") == name:
            raise RuntimeError(f"{name} fails it")
        if data.get("hold_on") == name:
            try:
                # Until the engine lets go of the attempt (bounded: an engine that never
                # does fails the test rather than hang it).
                await asyncio.sleep(3 * SETTLE)
            except asyncio.CancelledError:
                side.cancelled.append((ctx.execution_id, ctx.attempt))
                raise
        return {"by": name, "attempt": ctx.attempt}

    return side


@pytest.fixture
async def sides(postgres_env: dict[str, str]) -> AsyncIterator[tuple[Side, Side]]:
    """Two engines on one new PostgreSQL database."""
    a, b = _side("a", postgres_env), _side("b", postgres_env)
    try:
        yield a, b
    finally:
        for side in (a, b):
            await side.engine.close()
            side.runner.close()
            side.app.close()


def keys(count: int) -> dict[str, UUID]:
    """Idempotency keys and the execution ids they give (known before the start)."""
    made = [f"own-{uuid4()}" for _ in range(count)]
    return {key: execution_id_for(key) for key in made}


def member(ids: set[UUID]) -> Callable[[UUID], bool]:
    return lambda eid: eid in ids


async def until(condition: Callable[[], bool], what: str) -> None:
    """Wait until `condition` holds (asked in a thread: it may read the store)."""
    deadline = time.monotonic() + SETTLE
    while not await asyncio.to_thread(condition):
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        await asyncio.sleep(0.01)


async def settled(side: Side, eid: UUID) -> Any:
    return await asyncio.wait_for(side.engine.wait_settled(eid), SETTLE)


async def register(side: Side, doc: dict[str, Any]) -> Workflow:
    return await side.engine.register(support.workflow(doc))


async def test_each_engine_drives_only_the_executions_its_owner_accepts(
    sides: tuple[Side, Side],
) -> None:
    a, b = sides
    mine_a, mine_b = keys(3), keys(3)
    assert await a.engine.set_owner(member(set(mine_a.values()))) == 0
    assert await b.engine.set_owner(member(set(mine_b.values()))) == 0
    wf = await register(a, DEFINITION)

    for key, eid in {**mine_a, **mine_b}.items():  # every one started on a
        assert await a.engine.start(wf, {}, key) == eid
    for eid in mine_a.values():
        assert (await settled(a, eid)).status is ExecutionStatus.COMPLETED
    await a.engine.poll_store()  # a looks at the store: b's are not its to drive
    for eid in mine_b.values():
        assert support.event_types(a.app, eid) == ["ExecutionStarted"]
        assert a.engine.owns(eid) is False
        assert b.engine.owns(eid) is True

    await b.engine.poll_store()
    for eid in mine_b.values():
        assert (await settled(b, eid)).status is ExecutionStatus.COMPLETED

    assert a.executions_run() == set(mine_a.values())
    assert b.executions_run() == set(mine_b.values())
    for side, mine in ((a, mine_a), (b, mine_b)):
        for eid in mine.values():
            assert side.app.execution(eid).steps["work"].result == {"by": side.name, "attempt": 1}
            assert support.event_types(side.app, eid).count("StepStarted") == 1


@pytest.mark.parametrize("idempotency_key", [None, "given"])
async def test_an_execution_started_where_it_is_not_owned_is_stored_for_its_owner(
    sides: tuple[Side, Side], idempotency_key: str | None
) -> None:
    a, b = sides
    await a.engine.set_owner(lambda _: False)
    await b.engine.set_owner(lambda _: True)
    wf = await register(a, DEFINITION)
    key = None if idempotency_key is None else f"{idempotency_key}-{uuid4()}"

    eid = await asyncio.wait_for(a.engine.start(wf, {"n": 1}, key), SETTLE)

    assert support.event_types(a.app, eid) == ["ExecutionStarted"]
    assert a.app.execution(eid).input == {"n": 1}
    assert a.engine.driven == 0
    await a.engine.poll_store()
    assert support.event_types(a.app, eid) == ["ExecutionStarted"]
    assert a.ran == []

    await b.engine.poll_store()
    ex = await settled(b, eid)
    assert ex.status is ExecutionStatus.COMPLETED
    assert b.executions_run() == {eid}
    assert a.ran == []
    # a, asked, follows it in the store to the same end.
    assert (await settled(a, eid)).steps["work"].result == {"by": "b", "attempt": 1}


async def test_taking_over_retries_the_attempt_the_released_engine_left_running(
    sides: tuple[Side, Side],
) -> None:
    a, b = sides
    ((key, eid),) = keys(1).items()
    await a.engine.set_owner(member({eid}))
    await b.engine.set_owner(lambda _: False)
    wf = await register(a, DEFINITION)
    await a.engine.start(wf, {"hold_on": "a"}, key)
    await asyncio.wait_for(a.started.wait(), SETTLE)
    running = a.app.execution(eid).steps["work"]
    assert (running.status, running.attempt) == (StepStatus.RUNNING, 1)

    assert await a.engine.set_owner(lambda _: False) == 0  # a lets go, records nothing
    await until(lambda: a.cancelled == [(str(eid), 1)], "a's attempt was cancelled")
    assert a.engine.driven == 0
    assert support.event_types(a.app, eid) == ["ExecutionStarted", "StepStarted"]

    assert await b.engine.set_owner(lambda _: True) == 1  # b takes it up from its events
    ex = await settled(b, eid)

    assert ex.status is ExecutionStatus.COMPLETED
    assert ex.steps["work"].attempt == 2
    assert ex.steps["work"].result == {"by": "b", "attempt": 2}
    assert a.ran == [(str(eid), 1)]
    assert b.ran == [(str(eid), 2)]
    assert support.event_types(b.app, eid) == [
        "ExecutionStarted",
        "StepStarted",
        "StepRetryScheduled",
        "TimerFired",
        "StepStarted",
        "StepSucceeded",
        "ExecutionCompleted",
    ]
    starts = support.events_of(b.app, eid, "StepStarted")
    assert [e.attempt for e in starts] == [1, 2]
    (lost,) = support.events_of(b.app, eid, "StepRetryScheduled")
    assert lost.error["type"] == "WorkerLost"
    assert "attempt 1" in lost.error["message"]


async def test_a_retry_timer_set_by_the_released_engine_fires_on_its_new_owner(
    sides: tuple[Side, Side],
) -> None:
    a, b = sides
    ((key, eid),) = keys(1).items()
    await a.engine.set_owner(member({eid}))
    await b.engine.set_owner(lambda _: False)
    # Long enough for a to let go before its timer is due.
    policy = {"max_retries": 2, "retry_delay": 1.0, "jitter": 0}
    wf = await register(a, {**DEFINITION, "workflow_id": "delayed", "retry_policy": policy})
    await a.engine.start(wf, {"fail_on": "a"}, key)
    await until(
        lambda: a.app.execution(eid).steps["work"].status is StepStatus.RETRYING,
        "a's first attempt failed",
    )

    await a.engine.set_owner(lambda _: False)
    assert await b.engine.set_owner(lambda _: True) == 1
    ex = await settled(b, eid)

    assert ex.status is ExecutionStatus.COMPLETED
    assert ex.steps["work"].result == {"by": "b", "attempt": 2}
    assert a.ran == [(str(eid), 1)]
    assert b.ran == [(str(eid), 2)]
    assert support.event_types(b.app, eid).count("TimerFired") == 1
    (failed,) = support.events_of(b.app, eid, "StepRetryScheduled")
    assert failed.error["type"] == "RuntimeError"


async def test_an_execution_taken_over_while_it_waits_is_driven_on_by_its_new_owner(
    sides: tuple[Side, Side],
) -> None:
    a, b = sides
    ((key, eid),) = keys(1).items()
    await a.engine.set_owner(member({eid}))
    await b.engine.set_owner(lambda _: False)
    wf = await register(a, REVIEWED)
    await a.engine.start(wf, {}, key)
    assert (await settled(a, eid)).status is ExecutionStatus.WAITING

    await a.engine.set_owner(lambda _: False)
    assert await b.engine.set_owner(lambda _: True) == 1
    # The answer reaches a, which stores it for b; b finds it when it looks at the store.
    await a.engine.complete_human_task(eid, "review", {"ok": True})
    assert a.ran == []
    await b.engine.poll_store()

    ex = await settled(b, eid)
    assert ex.status is ExecutionStatus.COMPLETED
    assert ex.data["review"] == {"ok": True}
    assert ex.steps["work"].result == {"by": "b", "attempt": 1}
    assert a.ran == []
    assert support.event_types(b.app, eid).count("HumanTaskCompleted") == 1


async def test_an_engine_given_back_its_executions_drives_them_again(
    sides: tuple[Side, Side],
) -> None:
    a, b = sides
    ((key, eid),) = keys(1).items()
    await b.engine.set_owner(lambda _: False)
    await a.engine.set_owner(member({eid}))
    wf = await register(a, REVIEWED)
    await a.engine.start(wf, {}, key)
    assert (await settled(a, eid)).status is ExecutionStatus.WAITING
    await a.engine.set_owner(lambda _: False)

    assert await a.engine.set_owner(None) == 1  # every execution again
    assert a.engine.owns(uuid4())
    await a.engine.complete_human_task(eid, "review", {"ok": False})

    ex = await settled(a, eid)
    assert ex.status is ExecutionStatus.COMPLETED
    assert a.executions_run() == {eid}
    assert b.ran == []


async def test_an_answer_in_flight_while_the_engine_lets_go_is_driven_by_the_new_owner(
    sides: tuple[Side, Side],
) -> None:
    a, b = sides
    ((key, eid),) = keys(1).items()
    await a.engine.set_owner(member({eid}))
    await b.engine.set_owner(lambda _: False)
    wf = await register(a, REVIEWED)
    await a.engine.start(wf, {}, key)
    assert (await settled(a, eid)).status is ExecutionStatus.WAITING

    # The answer is taken while a owns the execution; a lets go before it is recorded.
    await asyncio.gather(
        a.engine.complete_human_task(eid, "review", {"ok": True}),
        a.engine.set_owner(lambda _: False),
    )
    await b.engine.set_owner(lambda _: True)
    await b.engine.poll_store()
    ex = await settled(b, eid)

    assert a.ran == []  # a owns nothing: it must not run the step the answer unblocked
    assert ex.status is ExecutionStatus.COMPLETED
    assert ex.steps["work"].result == {"by": "b", "attempt": 1}
    assert support.event_types(b.app, eid).count("HumanTaskCompleted") == 1
