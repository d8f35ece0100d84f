"""The projections over real executions the engine ran, on every store: the views agree with
the aggregates, every figure is what the events say, a rebuild changes nothing, and a
runner killed mid-stream resumes without applying an event twice."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
import support
from eventsourcing.projection import ProjectionRunner

from flowledger.adapters.agents import AgentRegistry, InProcessRunner
from flowledger.projections.events import micros
from flowledger.projections.performance import PerformanceView
from flowledger.projections.performance_projection import PerformanceProjection
from flowledger.projections.postgres import PostgresViews
from flowledger.projections.runs import ExecutionFilter, RunsView
from flowledger.projections.runs_projection import RunsProjection
from flowledger.projections.stats import durations
from flowledger.projections.step_cache import StepCacheView
from flowledger.projections.step_cache_projection import StepCacheProjection
from flowledger.projections.store import compose
from flowledger.services.app import FlowledgerApp
from flowledger.services.documents import execution_document
from flowledger.services.engine import Engine
from flowledger.services.queries import Queries

HERE = Path(__file__).resolve().parent
KILL = HERE / "projections_kill.py"
FLOWLEDGER = Path(sys.executable).parent / "flowledger"
TIMEOUT = 60.0
RETRY = {"max_retries": 2, "retry_delay": 0.01, "jitter": 0}

# Every kind of step: retries, a parallel, a loop, a condition, a wait, a person, an error
# handler, and a rollback when the execution is cancelled.
SHOP = {
    "workflow_id": "shop",
    "version": "1",
    "tags": ["shop", "demo"],
    "sla_targets": {"duration_p95": 60, "success_rate": 0.5},
    "steps": [
        {
            "step_id": "reserve",
            "type": "action",
            "action": "shop.ok",
            "rollback_actions": ["release"],
        },
        {
            "step_id": "check",
            "type": "action",
            "action": "shop.flaky",
            "dependencies": ["reserve"],
            "retry_policy": RETRY,
        },
        {
            "step_id": "fan",
            "type": "parallel",
            "dependencies": ["check"],
            "parallel_steps": [
                {"step_id": "left", "type": "action", "action": "shop.ok"},
                {"step_id": "right", "type": "action", "action": "shop.ok"},
            ],
        },
        {
            "step_id": "pages",
            "type": "loop",
            "for_each": "items",
            "dependencies": ["fan"],
            "steps": [
                {
                    "step_id": "tag",
                    "type": "action",
                    "action": "shop.ok",
                    "input_mapping": {"item": "_.item"},
                }
            ],
        },
        {
            "step_id": "route",
            "type": "condition",
            "dependencies": ["pages"],
            "conditions": [{"expression": "express", "steps": ["fast"]}],
            "else_steps": ["slow"],
        },
        {"step_id": "fast", "type": "action", "action": "shop.ok", "dependencies": ["route"]},
        {
            "step_id": "slow",
            "type": "action",
            "action": "shop.refuse",
            "dependencies": ["route"],
            "error_handlers": ["fix"],
        },
        {
            "step_id": "pause",
            "type": "wait",
            "duration": 0.01,
            "dependencies": ["fast", "slow"],
            "trigger_rule": "none_failed",
        },
        {
            "step_id": "approve",
            "type": "human_task",
            "assignee": "alice",
            "dependencies": ["pause"],
        },
    ],
    "handlers": [
        {"step_id": "fix", "type": "action", "action": "shop.ok"},
        {"step_id": "release", "type": "action", "action": "shop.ok"},
    ],
}


def shop_registry(registry: AgentRegistry) -> AgentRegistry:
    @registry.action("shop.ok")
    def ok(data: dict[str, Any]) -> dict[str, Any]:
        return {"item": data.get("item"), "express": data.get("express")}

    @registry.action("shop.flaky")
    def flaky(data: dict[str, Any], ctx: Any) -> dict[str, Any]:
        if ctx.attempt == 1:
            raise RuntimeError("flaky")
        return {"attempt": ctx.attempt}

    @registry.action("shop.refuse")
    def refuse(data: dict[str, Any]) -> dict[str, Any]:
        raise ValueError("refused")

    return registry


async def shop_day(engine: Engine, count: int = 6) -> list[UUID]:
    """`count` executions of SHOP: the first three answered, the fourth cancelled, the rest
    left waiting for alice."""
    wf = await engine.register(support.workflow(SHOP))
    ids = [
        await engine.start(wf, {"express": i % 2 == 0, "items": list(range(i % 3))})
        for i in range(count)
    ]
    for eid in ids:
        await asyncio.wait_for(engine.wait_settled(eid), TIMEOUT)
    for eid in ids[:3]:
        await engine.complete_human_task(eid, "approve", {"approved": True})
        await asyncio.wait_for(engine.wait_settled(eid), TIMEOUT)
    await engine.cancel(ids[3])
    await asyncio.wait_for(engine.wait_settled(ids[3]), TIMEOUT)
    return ids


def events(app: FlowledgerApp, eid: UUID) -> list[Any]:
    return list(app.repository.event_store.get(eid))


# -- the run views ---------------------------------------------------------------------------


async def test_the_run_views_agree_with_the_executions(
    app: FlowledgerApp, engine: Engine, registry: AgentRegistry
) -> None:
    shop_registry(registry)
    ids = await shop_day(engine)
    queries = Queries(app)

    page = queries.executions(ExecutionFilter(), limit=100)

    listed = [
        {k: execution_document(app.execution(eid))[k] for k in page.executions[0].as_row()}
        for eid in reversed(app.execution_ids())
    ]
    assert [e.as_row() for e in page.executions] == listed  # as `executions list` shows it
    statuses = Counter(e.status for e in page.executions)
    assert statuses == {"completed": 3, "cancelled": 1, "waiting": 2}
    assert len(queries.executions(ExecutionFilter(tag="demo")).executions) == 6
    for eid in ids:
        ex = app.execution(eid)
        doc = execution_document(ex)
        detail = queries.execution(eid)
        assert detail.event_count == ex.version == len(events(app, eid))
        assert detail.summary.as_row() == {k: doc[k] for k in detail.summary.as_row()}
        assert [s.key for s in detail.steps] == list(doc["steps"])
        for step in detail.steps:
            shown = doc["steps"][step.key]
            for field in (
                "step_id",
                "kind",
                "status",
                "attempts",
                "started_at",
                "last_attempt_started_at",
                "finished_at",
                "duration_seconds",
                "last_error",
                "recovered_by",
            ):
                assert getattr(step, field) == shown[field], (eid, step.key, field)
            assert step.handles == shown.get("handles")
            assert step.assignee == shown.get("assignee")
            ran_on_agent = step.type == "action" and step.attempts > 0
            assert step.agent == ("local" if ran_on_agent else None)
        timeline = queries.timeline(eid)
        assert [t.event for t in timeline] == support.event_types(app, eid)
    waiting = [
        (str(eid), key)
        for eid in ids
        for key in execution_document(app.execution(eid))["waiting_for_person"]
    ]
    assert [(t.execution_id, t.key) for t in queries.inbox("alice")] == waiting
    assert len(waiting) == 2
    assert queries.inbox("bob") == []


# -- performance, against what the events say ---------------------------------------------------


def step_runs(app: FlowledgerApp, ids: list[UUID]) -> dict[str, list[dict[str, Any]]]:
    """Each step instance's outcome, attempts and duration, read from its events here."""
    by_step: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for eid in ids:
        instances: dict[str, dict[str, Any]] = {}
        for e in events(app, eid):
            name = type(e).__name__
            if name in ("StepStarted", "StepWaiting"):
                run = instances.setdefault(
                    e.key, {"step_id": e.step_id, "start": micros(e.at), "outcome": None}
                )
                run["attempts"] = e.attempt
            elif name in ("StepSucceeded", "HumanTaskCompleted", "StepFailed", "StepCancelled"):
                run = instances[e.key]
                if run["outcome"] is None:
                    run["outcome"] = {"StepFailed": "failed", "StepCancelled": "cancelled"}.get(
                        name, "succeeded"
                    )
                    run["end"] = micros(e.at)
            elif name == "BranchSelected":
                instances[e.key] = {
                    "step_id": e.step_id,
                    "start": micros(e.at),
                    "end": micros(e.at),
                    "attempts": 1,
                    "outcome": "succeeded",
                }
                for key, step_id in e.skipped:
                    instances[key] = {"step_id": step_id, "outcome": "skipped", "attempts": 0}
            elif name == "StepSkipped":
                instances[e.key] = {"step_id": e.step_id, "outcome": "skipped", "attempts": 0}
        for run in instances.values():
            if run["outcome"] is not None:
                by_step[run["step_id"]].append(run)
    return by_step


async def test_performance_figures_are_what_the_events_say(
    app: FlowledgerApp, engine: Engine, registry: AgentRegistry
) -> None:
    shop_registry(registry)
    ids = await shop_day(engine)

    perf = Queries(app).performance("shop")

    expected = step_runs(app, ids)
    assert {s.step_id for s in perf.steps} == set(expected)
    for figures in perf.steps:
        found = expected[figures.step_id]
        runs = [r for r in found if r["outcome"] in ("succeeded", "failed")]
        outcomes = Counter(r["outcome"] for r in found)
        assert (figures.runs, figures.succeeded, figures.failed) == (
            len(runs),
            outcomes["succeeded"],
            outcomes["failed"],
        ), figures.step_id
        assert (figures.cancelled, figures.skipped) == (outcomes["cancelled"], outcomes["skipped"])
        assert figures.attempts == sum(r["attempts"] for r in runs)
        assert figures.duration == durations([r["end"] - r["start"] for r in runs])
    by_id = {s.step_id: s for s in perf.steps}
    assert (by_id["check"].retries, by_id["check"].retry_rate) == (6, 1.0)  # one retry each
    assert (by_id["slow"].failed, by_id["slow"].recovered) == (3, 3)  # odd runs, each recovered
    assert by_id["fast"].succeeded == by_id["slow"].skipped == 3
    assert by_id["approve"].succeeded == 3
    assert by_id["approve"].cancelled == 1
    # Every attempt of an action ran on the in-process agent.
    (local,) = perf.agents
    started = [
        e
        for eid in ids
        for e in events(app, eid)
        if type(e).__name__ == "StepStarted" and e.step_id not in ("fan", "pages", "pause")
    ]
    assert local.attempts + local.cancelled == len(started)
    assert (local.retried, local.lost) == (6, 0)
    # End to end: the three answered executions completed.
    ended = [app.execution(eid) for eid in ids[:4]]
    assert (perf.executions.completed, perf.executions.cancelled) == (3, 1)
    assert perf.executions.in_progress == 2
    assert perf.executions.duration == durations(
        [micros(ex.finished_at) - micros(ex.started_at) for ex in ended[:3] if ex.finished_at]
    )
    (version,) = perf.versions
    assert {c.target: c.met for c in version.sla} == {"duration_p95": True, "success_rate": True}


# -- exactly once ---------------------------------------------------------------------------------


def counted_once(app: FlowledgerApp, queries: Queries, ids: list[UUID]) -> None:
    """Every event is in the views once: per execution, its event count and its timeline;
    in the performance rows, one attempt per attempt event."""
    view = queries.projections.performance.view
    attempts = view.query("SELECT COUNT(*) AS n FROM perf_attempts")[0]["n"]
    attempt_events = 0
    for eid in ids:
        stored = events(app, eid)
        detail = queries.projections.runs.view.execution(str(eid))
        assert detail is not None
        assert detail.event_count == len(stored)
        assert len(queries.projections.runs.view.timeline(str(eid))) == len(stored)
        attempt_events += sum(
            1
            for e in stored
            if type(e).__name__ in ("StepStarted", "StepWaiting", "BranchSelected")
        )
    assert int(attempts) == attempt_events


async def test_a_rebuild_from_position_zero_gives_the_same_views(
    app: FlowledgerApp, engine: Engine, registry: AgentRegistry
) -> None:
    shop_registry(registry)
    ids = await shop_day(engine)
    queries = Queries(app, batch_size=13)
    queries.fresh()
    built = [p.view.dump() for p in queries.projections.all]

    applied = queries.rebuild()

    head = queries.runner.head()
    assert applied == {"runs": head, "performance": head, "step_cache": head}
    assert [p.view.dump() for p in queries.projections.all] == built
    counted_once(app, queries, ids)
    assert all(s.lag == 0 for s in queries.status())


async def test_the_runner_follows_the_engine_in_the_background(
    app: FlowledgerApp, engine: Engine, registry: AgentRegistry
) -> None:
    shop_registry(registry)
    queries = Queries(app, catch_up=False)
    stop = asyncio.Event()
    follower = asyncio.create_task(queries.runner.follow(stop, interval=0.02))

    ids = await shop_day(engine, count=4)
    head = queries.runner.head()
    deadline = time.monotonic() + TIMEOUT
    while any(s.position < head for s in queries.status()):
        assert time.monotonic() < deadline, queries.status()
        await asyncio.sleep(0.02)
    stop.set()
    await asyncio.wait_for(follower, TIMEOUT)

    page = queries.executions(ExecutionFilter(workflow_id="shop"))
    assert {e.execution_id for e in page.executions} == {str(i) for i in ids}
    counted_once(app, queries, ids)


def test_eventsourcings_own_runner_drives_the_same_projections(
    postgres_env: dict[str, str],
) -> None:
    # On PostgreSQL the library's ProjectionRunner follows the store by LISTEN/NOTIFY (its
    # SQLite recorder cannot be subscribed to; the batch runner serves both).
    ids = asyncio.run(_fill(postgres_env, count=4))
    app = _open(postgres_env)
    head = app.recorder.max_notification_id()
    dumps = []
    try:
        for projection, view in (
            (RunsProjection, RunsView),
            (PerformanceProjection, PerformanceView),
            (StepCacheProjection, StepCacheView),
        ):
            with ProjectionRunner(
                application_class=FlowledgerApp,
                projection_class=projection,
                view_class=compose(view, PostgresViews),
                env=postgres_env,
            ) as runner:
                runner.wait(head, timeout=TIMEOUT)
                dumps.append(runner.view.dump())
        queries = Queries(app, catch_up=False)
        assert all(s.lag == 0 for s in queries.status())
        counted_once(app, queries, ids)
        queries.rebuild()
        assert [p.view.dump() for p in queries.projections.all] == dumps
    finally:
        app.close()


# -- a runner killed mid-stream ------------------------------------------------------------------


@pytest.fixture(params=["postgres", "sqlite"])
def store_env(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, str]:
    """A store other processes can open too: a SQLite file, or a PostgreSQL database."""
    if request.param == "postgres":
        env: dict[str, str] = request.getfixturevalue("postgres_env")
        return env
    return {"PERSISTENCE_MODULE": "sqlite", "SQLITE_DBNAME": str(tmp_path / "flowledger.db")}


@pytest.fixture
def shop_store(store_env: dict[str, str], tmp_path: Path) -> tuple[dict[str, str], list[UUID]]:
    """SHOP executions stored by the engine, no projection run yet; the store's settings
    (for a subprocess) and the execution ids."""
    ids = asyncio.run(_fill(store_env))
    child = {k: v for k, v in os.environ.items() if not k.startswith(("POSTGRES_", "SQLITE_"))}
    child |= {**store_env, "FLOWLEDGER_HOME": str(tmp_path)}
    return child, ids


async def _fill(env: dict[str, str], count: int = 30) -> list[UUID]:
    app = FlowledgerApp(env={**env, "PERSISTENCE_MODULE": f"eventsourcing.{_module(env)}"})
    runner = InProcessRunner(shop_registry(AgentRegistry()))
    engine = Engine(app, runner)
    try:
        return await shop_day(engine, count=count)
    finally:
        await engine.close()
        runner.close()
        app.close()


def _module(env: dict[str, str]) -> str:
    return env["PERSISTENCE_MODULE"].removeprefix("eventsourcing.")


def _open(env: dict[str, str]) -> FlowledgerApp:
    return FlowledgerApp(env={**env, "PERSISTENCE_MODULE": f"eventsourcing.{_module(env)}"})


def _views_equal_a_rebuild(env: dict[str, str], ids: list[UUID]) -> None:
    app = _open(env)
    try:
        queries = Queries(app, catch_up=False)
        assert all(s.lag == 0 for s in queries.status()), queries.status()
        resumed = [p.view.dump() for p in queries.projections.all]
        counted_once(app, queries, ids)
        queries.rebuild()
        assert [p.view.dump() for p in queries.projections.all] == resumed
    finally:
        app.close()


def test_a_runner_killed_inside_a_batch_resumes_where_it_committed(
    shop_store: tuple[dict[str, str], list[UUID]],
) -> None:
    env, ids = shop_store
    app = _open(env)
    head = app.recorder.max_notification_id() or 0
    app.close()
    die_at = head // 2

    killed = subprocess.run(
        [sys.executable, str(KILL), "40", str(die_at)], env=env, timeout=TIMEOUT, check=False
    )

    assert killed.returncode == -signal.SIGKILL
    app = _open(env)
    try:
        queries = Queries(app, catch_up=False)
        runs, performance, step_cache = (s.position for s in queries.status())
        # The batch holding `die_at` was rolled back whole: every view stopped at the end of
        # the batch before it (the other views run each batch after the run views), and
        # holds exactly the events up to there.
        stored = app.recorder.select_notifications(1, head)
        batch_ends = [n.id for n in stored[39::40]]
        assert runs == performance == step_cache == max(e for e in [0, *batch_ends] if e < die_at)
        timeline = queries.projections.runs.view.query("SELECT COUNT(*) AS n FROM runs_timeline")
        applied = [n for n in stored if n.id <= runs and ":Execution." in n.topic]
        assert int(timeline[0]["n"]) == len(applied)
    finally:
        app.close()

    resumed = subprocess.run(
        [sys.executable, str(KILL), "40"], env=env, timeout=TIMEOUT, check=False
    )

    assert resumed.returncode == 0
    _views_equal_a_rebuild(env, ids)


def test_a_runner_process_killed_mid_stream_resumes_and_counts_nothing_twice(
    shop_store: tuple[dict[str, str], list[UUID]],
) -> None:
    env, ids = shop_store
    app = _open(env)
    try:
        head = app.recorder.max_notification_id() or 0
        watch = Queries(app, catch_up=False)
        follow = subprocess.Popen(
            [str(FLOWLEDGER), "projections", "follow", "--batch-size", "1", "--interval", "0.05"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + TIMEOUT
            while watch.status()[1].position < 5:  # under way: both views have moved
                assert time.monotonic() < deadline, "the runner made no progress"
                assert follow.poll() is None
                time.sleep(0.005)
            follow.send_signal(signal.SIGKILL)
            follow.wait(TIMEOUT)
        finally:
            if follow.poll() is None:
                follow.kill()
        at_kill = [s.position for s in watch.status()]
        assert min(at_kill) < head, "killed after it was done: not mid-stream"
    finally:
        app.close()

    resumed = subprocess.run(
        [sys.executable, str(KILL), "500"], env=env, timeout=TIMEOUT, check=False
    )

    assert resumed.returncode == 0
    _views_equal_a_rebuild(env, ids)
