"""The optimizer on real histories: workflows run by the engine with seeded demo agents, the
performance projection caught up from their events, and a known right answer in each."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import support

from flowledger.adapters.agents import AgentRegistry, InProcessRunner
from flowledger.domain.errors import RecommendationNotFound
from flowledger.domain.progress import Dispatch
from flowledger.domain.states import ExecutionStatus
from flowledger.services.app import FlowledgerApp
from flowledger.services.engine import Engine
from flowledger.services.optimizer import Optimizer, next_version
from flowledger.services.optimizer_model import MIN_EXECUTIONS
from flowledger.services.ports import Ran
from flowledger.services.queries import Queries

RUNS = 24
FAST = {"max_retries": 0, "retry_delay": 0.01}


@pytest.fixture
def store(tmp_path: Path) -> Iterator[FlowledgerApp]:
    app = FlowledgerApp(
        env={
            "PERSISTENCE_MODULE": "eventsourcing.sqlite",
            "SQLITE_DBNAME": str(tmp_path / "flowledger.db"),
        }
    )
    yield app
    app.close()


class TwoAgents(InProcessRunner):
    """The action `rank` offered by two agents, one twice as slow: attempts alternate."""

    def __init__(self, registry: AgentRegistry) -> None:
        super().__init__(registry)
        self.count = 0

    async def run(self, dispatch: Dispatch) -> dict[str, Any] | Ran:
        if dispatch.step_id != "rank":
            return await super().run(dispatch)
        self.count += 1
        agent, delay = ("fast-1", 0.05) if self.count % 2 else ("slow-1", 0.10)
        await asyncio.sleep(delay)
        return Ran({"score": len(str(dispatch.input))}, agent)


@pytest.fixture
async def engine(store: FlowledgerApp, registry: AgentRegistry) -> AsyncIterator[Engine]:
    runner = TwoAgents(registry)
    eng = Engine(store, runner)
    yield eng
    await eng.close()
    runner.close()


@pytest.fixture
def optimizer(store: FlowledgerApp) -> Optimizer:
    return Optimizer(store, Queries(store))


async def run_many(
    engine: Engine,
    doc: dict[str, Any],
    inputs: list[dict[str, Any]],
    *,
    at_once: int = 1,
    may_fail: bool = False,
) -> str:
    """Register `doc` (unless already) and run one execution per input; returns the version."""
    wf = await engine.register(support.workflow(doc))
    return await run_version(engine, wf, inputs, at_once=at_once, may_fail=may_fail)


async def run_version(
    engine: Engine,
    wf: Any,
    inputs: list[dict[str, Any]],
    *,
    at_once: int = 1,
    may_fail: bool = False,
) -> str:
    gate = asyncio.Semaphore(at_once)

    async def one(data: dict[str, Any]) -> None:
        async with gate:
            eid = await engine.start(wf, data)
            ex = await asyncio.wait_for(engine.wait_settled(eid), 30)
            ok = {ExecutionStatus.COMPLETED, ExecutionStatus.FAILED} if may_fail else None
            assert ex.status in (ok or {ExecutionStatus.COMPLETED}), ex.status

    await asyncio.gather(*(one(d) for d in inputs))
    return str(wf.version)


def sleeper(registry: AgentRegistry, name: str, seconds: float) -> None:
    @registry.action(name)
    async def work(data: dict[str, Any]) -> dict[str, Any]:
        await asyncio.sleep(seconds)
        return {"done": name, "n": data.get("n")}


SERIAL = {
    "version": "1.0",
    "steps": [
        {
            "step_id": "fetch_profile",
            "type": "action",
            "action": "profile",
            "input_mapping": {"n": "n"},
        },
        {
            "step_id": "fetch_orders",
            "type": "action",
            "action": "orders",
            "dependencies": ["fetch_profile"],
            "input_mapping": {"n": "n"},
        },
        {
            "step_id": "summarize",
            "type": "action",
            "action": "summary",
            "dependencies": ["fetch_orders"],
            "input_mapping": {"profile": "fetch_profile", "orders": "fetch_orders"},
        },
    ],
}


async def test_two_independent_slow_steps_in_sequence_are_parallelized(
    engine, registry, optimizer, store
):
    sleeper(registry, "profile", 0.08)
    sleeper(registry, "orders", 0.08)
    sleeper(registry, "summary", 0.0)
    await run_many(engine, SERIAL, [{"n": i} for i in range(RUNS)])

    report = optimizer.report("test-wf")

    [rec] = [r for r in report.recommendations if r.kind == "parallelize"]
    assert rec.steps == ["fetch_profile", "fetch_orders"]
    assert rec.executions == RUNS
    # fetch_orders no longer waits; summarize, which read fetch_profile through it, now
    # waits for both.
    assert rec.patch == [
        {"op": "add", "path": "/steps/1/dependencies", "value": []},
        {"op": "add", "path": "/steps/2/dependencies", "value": ["fetch_orders", "fetch_profile"]},
    ]
    # Simulated on the recorded runs: about one 80 ms step (and its overhead) less.
    assert -0.3 < rec.prediction.change_p50 < -0.05
    assert rec.prediction.interval_p50[0] <= rec.prediction.change_p50
    assert rec.prediction.interval_p50[1] >= rec.prediction.change_p50
    assert report.critical_path is not None
    assert report.critical_path.steps == ["fetch_profile", "fetch_orders", "summarize"]
    assert {b.step_id for b in report.bottlenecks if b.kind == "critical_path"} == {
        "fetch_profile",
        "fetch_orders",
    }
    assert [r.kind for r in report.recommendations] == ["parallelize"]


async def test_applying_a_recommendation_mid_run_keeps_versions_apart(
    engine, registry, optimizer, store
):
    gate = asyncio.Event()

    @registry.action("profile")
    async def profile(data: dict[str, Any]) -> dict[str, Any]:
        if data["n"] >= 100:  # the executions that straddle the new version wait here
            await gate.wait()
        await asyncio.sleep(0.08)
        return {"n": data["n"]}

    sleeper(registry, "orders", 0.08)
    sleeper(registry, "summary", 0.0)
    await run_many(engine, SERIAL, [{"n": i} for i in range(RUNS)])
    [rec] = optimizer.report("test-wf").recommendations

    # Executions of 1.0 are running (held in their first step) when 1.1 is registered.
    v1 = await engine.workflow("test-wf", "1.0")
    running = [await engine.start(v1, {"n": 100 + i}) for i in range(4)]
    applied = optimizer.apply("test-wf", rec.id)
    for eid in running:
        assert not (await engine.execution(eid)).is_terminal
    gate.set()
    assert (applied.version, applied.based_on, applied.created) == ("1.1", "1.0", True)

    newest = await engine.workflow("test-wf")
    assert newest.version == "1.1"  # new executions start on the newest version
    assert newest.node("fetch_orders").deps == ()
    for eid in running:
        ex = await asyncio.wait_for(engine.wait_settled(eid), 30)
        assert ex.status is ExecutionStatus.COMPLETED
        assert ex.workflow_version == "1.0"
    await run_version(engine, newest, [{"n": i} for i in range(RUNS)])

    old = optimizer.report("test-wf", "1.0")
    new = optimizer.report("test-wf", "1.1")
    assert old.executions_completed == RUNS + 4
    assert new.executions_completed == RUNS
    assert new.end_to_end_p50 is not None
    assert old.end_to_end_p50 is not None
    assert new.end_to_end_p50 < old.end_to_end_p50  # one 80 ms step less on the path
    assert new.critical_path is not None
    assert len(new.critical_path.steps) == 2
    assert [r.kind for r in new.recommendations] == []
    assert old.versions == ["1.0", "1.1"]
    with pytest.raises(RecommendationNotFound, match="no recommendation"):
        optimizer.apply("test-wf", "parallelize-nothing-000000", "1.1")


async def test_a_flaky_step_that_recovers_on_attempt_two_gets_a_shorter_retry_delay(
    engine, registry, optimizer
):
    @registry.action("flaky")
    async def flaky(data: dict[str, Any], ctx: Any) -> dict[str, Any]:
        await asyncio.sleep(0.01)
        if ctx.attempt == 1:
            raise ConnectionError("upstream reset the connection")
        return {"ok": True}

    doc = {
        "steps": [
            {
                "step_id": "call",
                "type": "action",
                "action": "flaky",
                "retry_policy": {"max_retries": 3, "retry_delay": 0.2, "jitter": 0},
            }
        ]
    }
    await run_many(engine, doc, [{"n": i} for i in range(RUNS)], at_once=8)

    report = optimizer.report("test-wf")

    [rec] = report.recommendations
    assert rec.kind == "retry"
    assert rec.evidence["recovered_by_attempt"] == 2
    assert rec.evidence["recovered_at_attempt"] == {"2": RUNS}
    [op] = rec.patch
    assert op["path"] == "/steps/0/retry_policy"
    assert op["value"]["retry_delay"] == 0.05
    assert op["value"]["max_retries"] == 2
    assert rec.prediction.change_p50 < -0.1  # 0.15 s less waiting on every run
    assert {b.kind for b in report.bottlenecks if b.step_id == "call"} >= {"retry_rate"}


async def test_an_agent_twice_as_slow_as_its_peer_is_routed_around(engine, registry, optimizer):
    doc = {"steps": [{"step_id": "rank", "type": "action", "action": "rank"}]}
    await run_many(engine, doc, [{"n": i} for i in range(RUNS)])

    report = optimizer.report("test-wf")

    [rec] = report.recommendations
    assert rec.kind == "routing"
    assert rec.patch == [{"op": "add", "path": "/steps/0/avoid_agents", "value": ["slow-1"]}]
    assert rec.evidence["slow-1"]["attempts_p50_s"] > 1.5 * rec.evidence["fast-1"]["attempts_p50_s"]
    assert rec.prediction.change_mean_pct < -10


async def test_a_pure_step_with_recurring_inputs_is_cached(engine, registry, optimizer):
    @registry.action("rates")
    async def rates(data: dict[str, Any]) -> dict[str, Any]:
        await asyncio.sleep(0.05)
        return {"rate": {"eur": 1.0, "usd": 1.08, "gbp": 0.85}[data["currency"]]}

    doc = {
        "steps": [
            {
                "step_id": "rate",
                "type": "action",
                "action": "rates",
                "input_mapping": {"currency": "currency"},
            },
            {
                "step_id": "convert",
                "type": "action",
                "action": "noop",
                "dependencies": ["rate"],
                "input_mapping": {"rate": "rate.rate", "n": "n"},
            },
        ]
    }
    sleeper(registry, "noop", 0.0)
    currencies = ["eur", "usd", "gbp"]
    inputs = [{"currency": currencies[i % 3], "n": i} for i in range(RUNS)]
    await run_many(engine, doc, inputs, at_once=4)

    report = optimizer.report("test-wf")

    [rec] = report.recommendations
    assert rec.kind == "cache"
    assert rec.steps == ["rate"]
    assert rec.evidence["repeated_inputs"] == 3
    assert rec.evidence["hit_rate_at_ttl"] == pytest.approx((RUNS - 3) / RUNS)
    assert rec.patch == [{"op": "add", "path": "/steps/0/cache", "value": {"ttl": 60.0}}]
    assert rec.prediction.change_p50 < -0.03


async def test_an_error_that_retries_never_cure_is_made_non_retryable(engine, registry, optimizer):
    class CardDeclined(Exception):
        pass

    @registry.action("charge")
    async def charge(data: dict[str, Any]) -> dict[str, Any]:
        await asyncio.sleep(0.01)
        if data["n"] % 2:
            raise CardDeclined("the issuer declined the card")
        return {"charged": True}

    doc = {
        "steps": [
            {
                "step_id": "pay",
                "type": "action",
                "action": "charge",
                "input_mapping": {"n": "n"},
                "retry_policy": {"max_retries": 2, "retry_delay": 0.05, "jitter": 0},
            }
        ]
    }
    await run_many(engine, doc, [{"n": i} for i in range(RUNS)], at_once=8, may_fail=True)

    report = optimizer.report("test-wf")

    assert report.executions_failed == RUNS // 2
    [rec] = report.recommendations
    assert rec.kind == "non_retryable"
    assert rec.evidence["retried_attempts"] == {"CardDeclined": RUNS}  # 2 retries, 12 runs
    assert "CardDeclined" in rec.patch[0]["value"]["non_retryable_errors"]
    assert rec.prediction.metric == "time until a failed execution ends"
    assert rec.prediction.change_p50 < -0.1  # two delays and two attempts less


async def test_timeouts_far_above_or_below_what_attempts_take_are_tuned(
    engine, registry, optimizer
):
    @registry.action("quick")
    async def quick(data: dict[str, Any]) -> dict[str, Any]:
        await asyncio.sleep(0.01)
        return {"n": data["n"]}

    @registry.action("sometimes_slow")
    async def sometimes_slow(data: dict[str, Any], ctx: Any) -> dict[str, Any]:
        # Every third first attempt takes longer than the step's timeout allows.
        await asyncio.sleep(0.3 if data["n"] % 3 == 0 and ctx.attempt == 1 else 0.02)
        return {"n": data["n"]}

    doc = {
        "steps": [
            {
                "step_id": "lookup",
                "type": "action",
                "action": "quick",
                "timeout": 60,
                "input_mapping": {"n": "n"},
            },
            {
                "step_id": "enrich",
                "type": "action",
                "action": "sometimes_slow",
                "timeout": 0.1,
                "input_mapping": {"n": "n"},
                "retry_policy": {"max_retries": 2, "retry_delay": 0.3, "jitter": 0},
            },
        ]
    }
    await run_many(engine, doc, [{"n": i} for i in range(RUNS)], at_once=8)

    report = optimizer.report("test-wf")

    by_step = {r.steps[0]: r for r in report.recommendations if r.kind == "timeout"}
    lower, raise_ = by_step["lookup"], by_step["enrich"]
    [op] = lower.patch
    assert op["path"] == "/steps/0/timeout"
    assert 1.0 <= op["value"] <= 5.0  # three times the p99 (10 ms here), at least a second
    assert lower.prediction.change_p50 == 0  # nothing hung: the median cannot move
    assert f"given up after {op['value']:g} s instead of 60 s" in lower.note
    assert raise_.evidence["timed_out"] >= RUNS // 3
    assert raise_.patch[0]["path"] == "/steps/1/timeout"
    assert raise_.patch[0]["value"] > 0.1
    assert raise_.prediction.change_mean_pct < -10  # no 0.1 s cut plus 0.3 s delay


async def test_a_healthy_history_gets_no_recommendation(engine, registry, optimizer):
    rng = random.Random(3)

    @registry.action("step")
    async def step(data: dict[str, Any]) -> dict[str, Any]:
        await asyncio.sleep(rng.uniform(0.01, 0.02))
        return {"value": data.get("value", 0) + 1}

    doc = {
        "retry_policy": FAST,
        "steps": [
            {"step_id": "a", "type": "action", "action": "step", "input_mapping": {"n": "n"}},
            {
                "step_id": "b",
                "type": "action",
                "action": "step",
                "dependencies": ["a"],
                "input_mapping": {"value": "a.value", "n": "n"},
            },
        ],
    }
    await run_many(engine, doc, [{"n": i} for i in range(RUNS)], at_once=4)

    report = optimizer.report("test-wf")

    assert report.recommendations == []
    assert report.more_data == []
    assert report.executions_completed == RUNS


async def test_too_few_runs_say_how_many_more_are_needed(engine, registry, optimizer):
    sleeper(registry, "profile", 0.0)
    sleeper(registry, "orders", 0.0)
    sleeper(registry, "summary", 0.0)
    await run_many(engine, SERIAL, [{"n": i} for i in range(5)])

    report = optimizer.report("test-wf")

    assert report.recommendations == []
    [note] = [n for n in report.more_data if n.check == "any recommendation"]
    assert (note.have, note.need, note.more_runs) == (5, MIN_EXECUTIONS, MIN_EXECUTIONS - 5)


def test_next_version_counts_up_and_skips_taken_ones():
    assert next_version("1.0", ["1.0"]) == "1.1"
    assert next_version("1.9", ["1.9", "1.10"]) == "1.11"
    assert next_version("v3", ["v3"]) == "v4"
    assert next_version("beta", ["beta"]) == "beta.1"
