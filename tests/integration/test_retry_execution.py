"""Retrying an execution that failed, timed out or was cancelled, through the real engine on
every store: from the steps that did not complete, with attempt numbers counting on, a
new deadline, refusals that store nothing, and a retry that survives a restart."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from typing import Any
from uuid import UUID

import pytest
import support

from flowledger.adapters.agents import ActionContext, AgentRegistry, InProcessRunner
from flowledger.adapters.webhook import WebhookClient
from flowledger.domain.errors import InvalidTransition
from flowledger.domain.execution import Execution
from flowledger.domain.states import ExecutionStatus, StepStatus
from flowledger.services.app import FlowledgerApp
from flowledger.services.audit import audit_execution
from flowledger.services.engine import Engine
from flowledger.services.follow import submit_retry
from flowledger.services.replay import verify_replay

SETTLE = 10.0
FAST = {"max_retries": 1, "retry_delay": 0.0, "jitter": 0.0}
E, S = ExecutionStatus, StepStatus


def action(step_id: str, **fields: Any) -> dict[str, Any]:
    return {"step_id": step_id, "type": "action", "action": step_id, **fields}


class Flaky:
    """Actions that count their calls; `flaky` raises ConnectionError until `fixed`."""

    def __init__(self, registry: AgentRegistry) -> None:
        self.calls: Counter[str] = Counter()
        self.attempts: list[int] = []
        self.fixed = False

        @registry.action("prepare")
        def prepare(data: dict[str, Any]) -> dict[str, Any]:
            self.calls["prepare"] += 1
            return {"prepared": True}

        @registry.action("flaky")
        def flaky(data: dict[str, Any], ctx: ActionContext) -> dict[str, Any]:
            self.calls["flaky"] += 1
            self.attempts.append(ctx.attempt)
            if not self.fixed:
                raise ConnectionError("the service is down")
            return {"attempt": ctx.attempt}

        @registry.action("finish")
        def finish(data: dict[str, Any]) -> dict[str, Any]:
            self.calls["finish"] += 1
            return {"finished": True}


LINE = {
    "retry_policy": FAST,
    "steps": [
        action("prepare"),
        action("flaky", dependencies=["prepare"]),
        action("finish", dependencies=["flaky"]),
    ],
}


async def settled(engine: Engine, eid: UUID) -> Execution:
    return await asyncio.wait_for(engine.wait_settled(eid), SETTLE)


def started_attempts(app: FlowledgerApp, eid: UUID, key: str) -> list[int]:
    return [e.attempt for e in support.events_of(app, eid, "StepStarted") if e.key == key]


def assert_history_verifies(app: FlowledgerApp, eid: UUID) -> None:
    """Replay through the current domain code finds no divergence; the hash chain holds."""
    assert verify_replay(app, eid) == []
    report = audit_execution(app, eid)
    assert report.ok, report.findings
    assert report.verified == app.execution(eid).version


async def test_a_failed_execution_retried_completes_without_running_completed_steps_again(
    engine: Engine, app: FlowledgerApp, registry: AgentRegistry
) -> None:
    agents = Flaky(registry)
    wf = await engine.register(support.workflow(LINE))
    eid = await engine.start(wf, {})
    failed = await settled(engine, eid)
    assert failed.status is E.FAILED
    assert agents.attempts == [1, 2]

    agents.fixed = True
    await engine.retry(eid)
    ex = await settled(engine, eid)

    assert ex.status is E.COMPLETED
    assert agents.calls == Counter(prepare=1, flaky=3, finish=1)
    assert agents.attempts == [1, 2, 3]  # counted on across the retry
    assert ex.data["flaky"] == {"attempt": 3}
    stored = app.execution(eid)
    assert stored.status is E.COMPLETED
    assert started_attempts(app, eid, "flaky") == [1, 2, 3]
    assert len({r.attempt_id for r in stored.steps.values()}) == len(stored.steps)
    types = support.event_types(app, eid)
    assert types.count("ExecutionFailed") == types.count("ExecutionRetried") == 1
    assert types[-1] == "ExecutionCompleted"
    assert_history_verifies(app, eid)


async def test_a_retried_step_gets_its_whole_retry_budget_again(
    engine: Engine, app: FlowledgerApp, registry: AgentRegistry
) -> None:
    agents = Flaky(registry)
    wf = await engine.register(support.workflow(LINE))
    eid = await engine.start(wf, {})
    await settled(engine, eid)

    await engine.retry(eid)  # still broken: two more attempts, then failed again
    ex = await settled(engine, eid)

    assert ex.status is E.FAILED
    assert agents.attempts == [1, 2, 3, 4]
    assert agents.calls["prepare"] == 1
    agents.fixed = True
    await engine.retry(eid)
    assert (await settled(engine, eid)).status is E.COMPLETED
    assert started_attempts(app, eid, "flaky") == [1, 2, 3, 4, 5]
    assert_history_verifies(app, eid)


async def test_a_parallel_runs_again_only_its_children_that_did_not_complete(
    engine: Engine, app: FlowledgerApp, registry: AgentRegistry
) -> None:
    agents = Flaky(registry)
    release = asyncio.Event()

    @registry.action("steady")
    def steady(data: dict[str, Any]) -> dict[str, Any]:
        agents.calls["steady"] += 1
        return {"steady": True}

    @registry.action("slow")  # still running when the parallel fails fast: cancelled
    async def slow(data: dict[str, Any]) -> dict[str, Any]:
        agents.calls["slow"] += 1
        await release.wait()
        return {"slow": True}

    wf = await engine.register(
        support.workflow(
            {
                "retry_policy": FAST,
                "steps": [
                    {
                        "step_id": "both",
                        "type": "parallel",
                        "parallel_steps": [
                            action("steady"),
                            action("slow"),
                            action("flaky", dependencies=["steady"]),
                        ],
                    },
                    action("finish", dependencies=["both"]),
                ],
            }
        )
    )
    eid = await engine.start(wf, {})
    failed = await settled(engine, eid)
    assert (failed.status, failed.steps["both"].status) == (E.FAILED, S.FAILED)
    assert (failed.steps["steady"].status, failed.steps["slow"].status) == (
        S.COMPLETED,
        S.CANCELLED,
    )

    agents.fixed = True
    release.set()
    await engine.retry(eid)
    ex = await settled(engine, eid)

    assert ex.status is E.COMPLETED
    assert agents.calls == Counter(steady=1, slow=2, flaky=3, finish=1)
    assert ex.data["both"] == {
        "steady": {"steady": True},
        "slow": {"slow": True},
        "flaky": {"attempt": 3},
    }
    assert started_attempts(app, eid, "both") == [1]  # resumed, not started again
    assert started_attempts(app, eid, "slow") == [1, 2]
    assert_history_verifies(app, eid)


async def test_a_timed_out_execution_retried_gets_a_new_deadline(
    engine: Engine, app: FlowledgerApp, registry: AgentRegistry
) -> None:
    release = asyncio.Event()

    @registry.action("slow")
    async def slow(data: dict[str, Any]) -> dict[str, Any]:
        await release.wait()
        return {"done": True}

    wf = await engine.register(support.workflow({"timeout": 1.0, "steps": [action("slow")]}))
    eid = await engine.start(wf, {})
    timed_out = await settled(engine, eid)
    assert timed_out.status is E.TIMED_OUT
    assert timed_out.finished_at is not None
    old_deadline = timed_out.deadline

    release.set()
    await engine.retry(eid)
    ex = await settled(engine, eid)

    assert ex.status is E.COMPLETED
    (retried,) = support.events_of(app, eid, "ExecutionRetried")
    assert retried.deadline == retried.at + (old_deadline - timed_out.started_at)
    assert retried.deadline > timed_out.finished_at
    assert app.execution(eid).deadline == retried.deadline
    assert retried.reset == {"slow": 1}
    assert_history_verifies(app, eid)


async def test_a_completed_or_running_execution_is_not_retried(
    engine: Engine, app: FlowledgerApp, registry: AgentRegistry
) -> None:
    release = asyncio.Event()

    @registry.action("work")
    async def work(data: dict[str, Any]) -> dict[str, Any]:
        await release.wait()
        return {"done": True}

    wf = await engine.register(support.workflow({"steps": [action("work")]}))
    eid = await engine.start(wf, {})
    stored = len(support.event_types(app, eid))

    with pytest.raises(InvalidTransition, match=f"execution {eid} is running; only a failed"):
        await engine.retry(eid)
    assert len(support.event_types(app, eid)) == stored

    release.set()
    assert (await settled(engine, eid)).status is E.COMPLETED
    stored = len(support.event_types(app, eid))
    with pytest.raises(InvalidTransition, match="is completed; only a failed, timed-out or"):
        await engine.retry(eid)
    with pytest.raises(InvalidTransition, match="is completed"):
        await asyncio.to_thread(submit_retry, app, eid)
    assert len(support.event_types(app, eid)) == stored
    assert (await engine.execution(eid)).status is E.COMPLETED


async def test_a_compensated_execution_is_not_retried(
    engine: Engine, app: FlowledgerApp, registry: AgentRegistry
) -> None:
    registry.action("reserve")(lambda data: {"reservation": "R-1"})
    registry.action("release")(lambda data: {"released": True})

    @registry.action("pay")
    def pay(data: dict[str, Any]) -> dict[str, Any]:
        raise ValueError("card declined")

    wf = await engine.register(
        support.workflow(
            {
                "steps": [
                    action("reserve", rollback_actions=["release"]),
                    action("pay", dependencies=["reserve"]),
                ],
                "handlers": [action("release")],
            }
        )
    )
    eid = await engine.start(wf, {})
    ex = await settled(engine, eid)
    assert (ex.status, ex.steps["reserve"].status) == (E.FAILED, S.COMPENSATED)
    stored = len(support.event_types(app, eid))

    with pytest.raises(InvalidTransition, match=r"was compensated.*start a new execution"):
        await engine.retry(eid)

    assert len(support.event_types(app, eid)) == stored
    assert app.execution(eid).status is E.FAILED


async def test_a_retry_stored_without_an_engine_is_driven_by_the_one_watching_the_store(
    engine: Engine,
    app: FlowledgerApp,
    registry: AgentRegistry,
    until: Callable[..., Any],
) -> None:
    agents = Flaky(registry)
    wf = await engine.register(support.workflow(LINE))
    eid = await engine.start(wf, {})
    assert (await settled(engine, eid)).status is E.FAILED
    stop = asyncio.Event()
    watcher = asyncio.create_task(engine.watch_store(stop, interval=0.02))
    try:
        agents.fixed = True
        await asyncio.to_thread(submit_retry, app, eid)

        ex = await until(eid, lambda ex: ex.status is E.COMPLETED)
    finally:
        stop.set()
        await watcher

    assert agents.calls == Counter(prepare=1, flaky=3, finish=1)
    assert app.execution(eid).status is E.COMPLETED
    assert ex.version == app.execution(eid).version
    assert_history_verifies(app, eid)


async def test_a_retried_execution_survives_a_restart(
    engine: Engine, app: FlowledgerApp, registry: AgentRegistry
) -> None:
    agents = Flaky(registry)
    started = asyncio.Event()
    hang = {"on": True}

    @registry.action("finish")  # replaces Flaky's: the first process dies while it runs
    async def finish(data: dict[str, Any], ctx: ActionContext) -> dict[str, Any]:
        agents.calls["finish"] += 1
        if hang["on"]:
            started.set()
            await asyncio.Event().wait()
        return {"finish_attempt": ctx.attempt}

    runner = InProcessRunner(registry, WebhookClient())
    first = Engine(app, runner)
    try:
        wf = await first.register(support.workflow(LINE))
        eid = await first.start(wf, {})
        assert (await settled(first, eid)).status is E.FAILED
        agents.fixed = True
        await first.retry(eid)
        await asyncio.wait_for(started.wait(), SETTLE)
    finally:
        await first.close()  # the process is gone: its attempt is recorded as running
        runner.close()
    assert app.execution(eid).steps["finish"].status is S.RUNNING
    hang["on"] = False

    assert await engine.resume_all() == 1
    ex = await settled(engine, eid)

    assert ex.status is E.COMPLETED
    assert ex.data["finish"] == {"finish_attempt": 2}
    assert ex.steps["finish"].error is not None
    assert ex.steps["finish"].error["type"] == "WorkerLost"
    assert agents.calls == Counter(prepare=1, flaky=3, finish=2)
    assert_history_verifies(app, eid)
