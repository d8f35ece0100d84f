"""Step caching through the real engine on every store: a later execution with the same
key is served the earlier result (no agent runs it), with its source recorded."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import pytest
import support

from flowledger.adapters.agents import AgentRegistry, InProcessRunner
from flowledger.adapters.step_cache import StoreStepCache
from flowledger.adapters.webhook import WebhookClient
from flowledger.domain.execution import Execution
from flowledger.domain.states import ExecutionStatus, StepStatus
from flowledger.services.app import FlowledgerApp
from flowledger.services.engine import Engine
from flowledger.services.ports import CachedResult
from flowledger.services.queries import Queries
from flowledger.services.replay import verify_replay

SETTLE_TIMEOUT = 10.0
T0 = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)


class Clock:
    """A clock the test moves."""

    def __init__(self, at: datetime) -> None:
        self.at = at

    def now(self) -> datetime:
        return self.at


@dataclass
class Cached:
    """An engine with the store's step cache, its clock, and what each action was given."""

    app: FlowledgerApp
    engine: Engine
    clock: Clock
    calls: dict[str, list[dict[str, Any]]]

    async def run(self, doc: dict[str, Any], data: dict[str, Any]) -> tuple[UUID, Execution]:
        wf = await self.engine.register(support.workflow(doc))
        eid = await self.engine.start(wf, data)
        ex = await asyncio.wait_for(self.engine.wait_settled(eid), SETTLE_TIMEOUT)
        return eid, ex


@pytest.fixture
async def cached(app: FlowledgerApp, registry: AgentRegistry) -> AsyncIterator[Cached]:
    calls: dict[str, list[dict[str, Any]]] = {"price": [], "flaky": []}

    @registry.action("price")
    def price(inp: dict[str, Any]) -> dict[str, Any]:
        calls["price"].append(inp)
        return {"amount": 10 * inp["quantity"], "currency": "EUR"}

    @registry.action("flaky")
    def flaky(inp: dict[str, Any]) -> dict[str, Any]:
        calls["flaky"].append(inp)
        if len(calls["flaky"]) == 1:
            raise ValueError("not this time")
        return {"ok": True}

    runner = InProcessRunner(registry, WebhookClient())
    cache = StoreStepCache(app)
    clock = Clock(T0)
    engine = Engine(app, runner, clock, cache=cache)
    yield Cached(app, engine, clock, calls)
    await engine.close()
    runner.close()
    cache.close()


def priced(**cache: Any) -> dict[str, Any]:
    return {
        "workflow_id": "pricing",
        "steps": [
            {
                "step_id": "price",
                "type": "action",
                "action": "price",
                "input_mapping": {"quantity": "quantity", "note": "note"},
                "output_mapping": {"amount": "amount"},
                "cache": {"ttl": 60, **cache},
            }
        ],
    }


async def test_the_same_input_again_is_served_from_the_cache_with_its_source(
    cached: Cached,
) -> None:
    first_id, first = await cached.run(priced(), {"quantity": 2})
    cached.clock.at += timedelta(seconds=30)
    second_id, second = await cached.run(priced(), {"quantity": 2})

    assert first.status is second.status is ExecutionStatus.COMPLETED
    assert cached.calls["price"] == [{"quantity": 2, "note": None}]  # ran once
    assert second.data == first.data == {"quantity": 2, "amount": 20}
    assert support.event_types(cached.app, second_id) == [
        "ExecutionStarted",
        "StepStarted",
        "StepServedFromCache",
        "ExecutionCompleted",
    ]
    [served] = support.events_of(cached.app, second_id, "StepServedFromCache")
    [started] = support.events_of(cached.app, second_id, "StepStarted")
    assert (served.source_execution_id, served.source_step_key) == (str(first_id), "price")
    assert served.cached_at == T0  # when the result was produced, not when it was served
    assert served.result == {"amount": 20, "currency": "EUR"}
    assert served.patch == {"amount": 20}
    assert served.cache_key == started.cache_key is not None
    assert second.steps["price"].cached_from == {
        "execution_id": str(first_id),
        "step_key": "price",
        "cached_at": T0.isoformat(),
    }


async def test_the_run_views_show_where_a_hit_came_from_and_count_it_apart(
    cached: Cached,
) -> None:
    first_id, _ = await cached.run(priced(), {"quantity": 3})
    second_id, _ = await cached.run(priced(), {"quantity": 3})

    queries = Queries(cached.app)
    [step] = queries.execution(second_id).steps
    assert (step.status, step.agent, step.attempts) == ("completed", None, 1)
    assert step.cached_from == {
        "execution_id": str(first_id),
        "step_key": "price",
        "cached_at": T0.isoformat(),
    }
    [source] = queries.execution(first_id).steps
    assert (source.agent, source.cached_from) == ("local", None)
    entry = next(e for e in queries.timeline(second_id) if e.event == "StepServedFromCache")
    assert (entry.status_from, entry.status_to) == ("running", "completed")
    assert entry.detail["source_execution_id"] == str(first_id)

    perf = queries.performance("pricing")
    [figures] = perf.steps
    assert (figures.runs, figures.succeeded, figures.cache_hits) == (1, 1, 1)
    assert figures.repeated.repeated_inputs == 0  # a hit is no second run of the input
    [local] = perf.agents
    assert (local.agent, local.attempts) == ("local", 1)  # the hit ran on no agent
    assert perf.executions.completed == 2


async def test_a_different_input_misses(cached: Cached) -> None:
    await cached.run(priced(), {"quantity": 2})
    second_id, second = await cached.run(priced(), {"quantity": 5})

    assert second.data["amount"] == 50
    assert len(cached.calls["price"]) == 2
    assert "StepServedFromCache" not in support.event_types(cached.app, second_id)


async def test_a_result_older_than_the_ttl_misses(cached: Cached) -> None:
    await cached.run(priced(), {"quantity": 2})
    cached.clock.at += timedelta(seconds=60)
    _, within = await cached.run(priced(), {"quantity": 2})
    cached.clock.at += timedelta(seconds=0.5)  # 60.5 s after the result was produced
    third_id, _ = await cached.run(priced(), {"quantity": 2})

    assert within.steps["price"].cached_from is not None
    assert len(cached.calls["price"]) == 2
    assert "StepServedFromCache" not in support.event_types(cached.app, third_id)
    # The fresh result serves from now on (the hit did not renew the old one).
    cached.clock.at += timedelta(seconds=59)
    _, fourth = await cached.run(priced(), {"quantity": 2})
    assert fourth.steps["price"].cached_from == {
        "execution_id": str(third_id),
        "step_key": "price",
        "cached_at": (T0 + timedelta(seconds=60.5)).isoformat(),
    }


async def test_a_key_expression_narrows_what_counts_as_the_same_input(cached: Cached) -> None:
    first_id, _ = await cached.run(priced(key="quantity"), {"quantity": 2, "note": "a"})
    _, second = await cached.run(priced(key="quantity"), {"quantity": 2, "note": "b"})
    _, third = await cached.run(priced(key="quantity"), {"quantity": 4, "note": "a"})

    assert second.steps["price"].cached_from is not None
    assert second.steps["price"].cached_from["execution_id"] == str(first_id)
    assert third.steps["price"].cached_from is None
    assert [c["note"] for c in cached.calls["price"]] == ["a", "a"]


async def test_a_failed_step_is_never_cached(cached: Cached) -> None:
    doc = {
        "workflow_id": "flaky",
        "retry_policy": {"max_retries": 0},
        "steps": [{"step_id": "f", "type": "action", "action": "flaky", "cache": {"ttl": 60}}],
    }
    _, failed = await cached.run(doc, {"x": 1})
    _, ran = await cached.run(doc, {"x": 1})
    _, served = await cached.run(doc, {"x": 1})

    assert failed.status is ExecutionStatus.FAILED
    assert ran.status is ExecutionStatus.COMPLETED
    assert ran.steps["f"].cached_from is None  # the failure was not stored
    assert served.steps["f"].cached_from is not None
    assert len(cached.calls["flaky"]) == 2


async def test_a_history_with_a_hit_replays_exactly(cached: Cached) -> None:
    await cached.run(priced(), {"quantity": 2})
    second_id, second = await cached.run(priced(), {"quantity": 2})

    assert verify_replay(cached.app, second_id) == []
    rebuilt = cached.app.execution(second_id)
    assert rebuilt.steps == second.steps
    assert rebuilt.data == second.data


async def test_a_cache_that_cannot_answer_runs_the_step(
    app: FlowledgerApp, registry: AgentRegistry
) -> None:
    ran: list[dict[str, Any]] = []

    @registry.action("price")
    def price(inp: dict[str, Any]) -> dict[str, Any]:
        ran.append(inp)
        return {"amount": 1}

    class Broken:
        async def lookup(self, cache_key: str, ttl: float, now: datetime) -> CachedResult | None:
            raise ConnectionError("the cache is down")

    runner = InProcessRunner(registry, WebhookClient())
    engine = Engine(app, runner, cache=Broken())
    try:
        wf = await engine.register(support.workflow(priced()))
        eid = await engine.start(wf, {"quantity": 1})
        ex = await asyncio.wait_for(engine.wait_settled(eid), SETTLE_TIMEOUT)
    finally:
        await engine.close()
        runner.close()

    assert ex.status is ExecutionStatus.COMPLETED
    assert ex.steps["price"].status is StepStatus.COMPLETED
    assert len(ran) == 1


async def test_an_engine_without_a_cache_runs_cached_steps(
    app: FlowledgerApp, registry: AgentRegistry
) -> None:
    ran: list[dict[str, Any]] = []

    @registry.action("price")
    def price(inp: dict[str, Any]) -> dict[str, Any]:
        ran.append(inp)
        return {"amount": 1}

    runner = InProcessRunner(registry, WebhookClient())
    engine = Engine(app, runner)
    try:
        wf = await engine.register(support.workflow(priced()))
        for _ in range(2):
            eid = await engine.start(wf, {"quantity": 1})
            await asyncio.wait_for(engine.wait_settled(eid), SETTLE_TIMEOUT)
    finally:
        await engine.close()
        runner.close()

    assert len(ran) == 2


async def test_a_cached_webhook_is_called_once_for_the_same_body(
    cached: Cached, http_server: Any
) -> None:
    url = http_server.on("/rates", (200, {"rate": 1.1}))
    doc = {
        "workflow_id": "rates",
        "steps": [
            {
                "step_id": "rate",
                "type": "webhook",
                "url": url,
                "input_mapping": {"currency": "currency"},
                "cache": {"ttl": 300},
            }
        ],
    }
    first_id, _ = await cached.run(doc, {"currency": "USD"})
    _, second = await cached.run(doc, {"currency": "USD"})

    assert len(http_server.hits("/rates")) == 1
    assert second.data["rate"] == {"rate": 1.1}
    assert second.steps["rate"].cached_from is not None
    assert second.steps["rate"].cached_from["execution_id"] == str(first_id)
