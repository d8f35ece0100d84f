"""The flowledger side of bench_dbos.py: W1-W3 through the real Engine and InProcessRunner on
a PostgreSQL store built by the composition root (`load_settings` + `build_app`), and W4
through `flowledger serve` (the HTTP API, in its own process).

    .venv/bin/python bench/fl_workloads.py '{"workload": "w1", "dbname": ..., ...}'
"""

from __future__ import annotations

import asyncio
import contextlib
import cProfile
import gc
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
import yaml
from bench_engine import definition as sequential_definition
from bench_engine import registry
from dbos_common import (
    FANOUT,
    REPO,
    STEPS,
    WorkloadFailed,
    child_main,
    die_with_parent,
    pg_params,
    proc_status,
    rss_bytes,
)

from flowledger.adapters.agents import AgentRegistry, InProcessRunner, default_registry, load_agents
from flowledger.adapters.settings import Settings, build_app, load_settings
from flowledger.adapters.webhook import WebhookClient
from flowledger.domain.definitions import WorkflowDefinition, parse_definition
from flowledger.domain.execution import Execution
from flowledger.services.app import FlowledgerApp
from flowledger.services.engine import Engine

EXAMPLE = REPO / "examples" / "document_processing.yaml"
W4_WORKFLOW = {
    "workflow_id": "bench-w4",
    "timeout": 86400,
    "steps": [
        {
            "step_id": "approve",
            "type": "human_task",
            "assignee": "bench",
            "form_schema": {
                "type": "object",
                "required": ["approved"],
                "properties": {"approved": {"type": "boolean"}},
            },
        }
    ],
}


@contextlib.contextmanager
def postgres_settings(dbname: str) -> Iterator[Settings]:
    """The composition root's settings for the bench database (PERSISTENCE_MODULE=postgres)."""
    with tempfile.TemporaryDirectory(prefix="flowledger-bench-dbos-") as home:
        env = {"FLOWLEDGER_HOME": home, "PERSISTENCE_MODULE": "postgres", "POSTGRES_DBNAME": dbname}
        yield load_settings(env | pg_params())


def fanout_definition() -> WorkflowDefinition:
    """W2: a parallel step of FANOUT no-op actions, all at once, then a no-op join."""
    children = [{"step_id": f"c{i}", "type": "action", "action": "noop"} for i in range(FANOUT)]
    steps = [
        {
            "step_id": "fan",
            "type": "parallel",
            "max_concurrency": FANOUT,
            "parallel_steps": children,
        },
        {"step_id": "join", "type": "action", "action": "noop", "dependencies": ["fan"]},
    ]
    doc = {"workflow_id": "bench-w2", "max_parallel_steps": FANOUT, "steps": steps}
    return parse_definition(doc, "<bench>")


def document_definition(notify_url: str) -> WorkflowDefinition:
    """The example as it is, but for its webhook's URL (the bench's receiver)."""
    doc = yaml.safe_load(EXAMPLE.read_text())
    for step in doc["steps"]:
        if step["step_id"] == "notify":
            step["url"] = notify_url
    return parse_definition(doc, str(EXAMPLE))


def count_events(app: FlowledgerApp, name: str) -> int:
    """How many Execution events of this name (say StepRetryScheduled) the store holds."""
    # The topic as eventsourcing writes it (the classes are made by @event: mypy sees none).
    topic, count, start = f"{Execution.__module__}:Execution.{name}", 0, 1
    while True:
        batch = app.recorder.select_notifications(start, 1000, topics=[topic])
        count += len(batch)
        if len(batch) < 1000:
            return count
        start = batch[-1].id + 1


def retry_reasons(app: FlowledgerApp) -> dict[str, int]:
    """Retries by step and error type ("ocr_page TransientError"), from the stored events."""
    topic, found, start = f"{Execution.__module__}:Execution.StepRetryScheduled", {}, 1
    while True:
        batch = app.recorder.select_notifications(start, 1000, topics=[topic])
        for n in batch:
            state = json.loads(n.state)
            step = state["key"].rsplit("/", 1)[-1]
            reason = f"{step} {state['error'].get('type', '?')}"
            found[reason] = found.get(reason, 0) + 1
        if len(batch) < 1000:
            return dict(sorted(found.items()))
        start = batch[-1].id + 1


class Profiles:
    """cProfile of the event-loop thread and of the engine's store thread."""

    def __init__(self) -> None:
        self.loop = cProfile.Profile()
        self.store = cProfile.Profile()
        self.store_profiled = False

    def start(self, engine: Engine) -> None:
        # The store thread is the engine's private executor (as bench_engine.py profiles it).
        executor = getattr(engine, "_store", None)
        if executor is not None:
            executor.submit(self.store.enable).result()
            self.store_profiled = True
        self.loop.enable()

    def stop(self, engine: Engine) -> None:
        self.loop.disable()
        if self.store_profiled:
            engine._store.submit(self.store.disable).result()

    def dump(self, prefix: str) -> None:
        self.loop.dump_stats(f"{prefix}.loop")
        if self.store_profiled:
            self.store.dump_stats(f"{prefix}.store")


async def _closed_loop(
    app: FlowledgerApp,
    runner: InProcessRunner,
    wf_def: WorkflowDefinition,
    jobs: list[dict[str, Any]],
    concurrency: int,
    profiles: Profiles | None,
) -> dict[str, Any]:
    engine = Engine(app, runner)
    try:
        wf = await engine.register(wf_def)
        before_commits = engine.commits
        before_events = app.recorder.max_notification_id() or 0
        pending = iter(jobs)
        latencies: list[float] = []
        statuses: dict[str, int] = {}
        wrong_ids = 0

        async def worker() -> None:
            nonlocal wrong_ids
            for job in pending:
                t0 = time.perf_counter()
                eid = await engine.start(wf, job.get("input", {}), job.get("key"))
                ex = await engine.wait_settled(eid)
                latencies.append(time.perf_counter() - t0)
                statuses[ex.status.value] = statuses.get(ex.status.value, 0) + 1
                wrong_ids += "id" in job and eid != UUID(job["id"])

        gc.collect()
        if profiles is not None:
            profiles.start(engine)
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(min(concurrency, len(jobs)))))
        wall = time.perf_counter() - t0
        if profiles is not None:
            profiles.stop(engine)
        live = engine.driven
        return {
            "wall": wall,
            "latencies": latencies,
            "statuses": statuses,
            "wrong_ids": wrong_ids,
            "live": live,
            "commits": engine.commits - before_commits,
            "events": (app.recorder.max_notification_id() or 0) - before_events,
        }
    finally:
        await engine.close()


def run_closed_loop(spec: dict[str, Any]) -> dict[str, Any]:
    """W1, W2 or W3: executions through the engine, `concurrency` in flight at once."""
    which = spec["workload"]
    agents: AgentRegistry
    webhooks: WebhookClient | None = None
    if which == "w1":
        wf_def, agents = sequential_definition(), registry()
        jobs: list[dict[str, Any]] = [{} for _ in range(int(spec["n"]))]
    elif which == "w2":
        wf_def, agents = fanout_definition(), registry()
        jobs = [{} for _ in range(int(spec["n"]))]
    else:
        load_agents(str(REPO / "examples" / "agents.py"))
        wf_def, agents, webhooks = (
            document_definition(spec["notify_url"]),
            default_registry,
            WebhookClient(),
        )
        jobs = [
            {"input": {"document_url": j["url"]}, "key": j["key"], "id": j["id"]}
            for j in spec["jobs"]
        ]
    profiles = Profiles() if spec.get("profile") else None
    with postgres_settings(spec["dbname"]) as settings:
        app = build_app(settings)
        runner = InProcessRunner(agents, webhooks)
        try:
            out = asyncio.run(
                _closed_loop(app, runner, wf_def, jobs, int(spec["concurrency"]), profiles)
            )
            still_live = len(app.execution_ids(live_only=True))
            retries = count_events(app, "StepRetryScheduled")
            retried = retry_reasons(app)
        finally:
            runner.close()
            if webhooks is not None:
                asyncio.run(webhooks.aclose())
            app.close()
    n = len(jobs)
    completed = out["statuses"].get("completed", 0)
    if completed != n or out["live"] or still_live or out["wrong_ids"]:
        raise WorkloadFailed(
            f"flowledger {which}: statuses {out['statuses']} of {n}, {out['live']} still driven, "
            f"{still_live} not ended in the store, {out['wrong_ids']} unexpected execution ids"
        )
    if profiles is not None:
        profiles.dump(spec["profile"])
    return {
        "wall": out["wall"],
        "n": n,
        "completed": completed,
        "latencies": out["latencies"],
        "commits": out["commits"],
        "events": out["events"],
        "retries": retries,
        "retried": retried,
    }


# -- W4: `flowledger serve`, 10,000 executions waiting on a person ------------------------


def _serve(dbname: str, home: str, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """Start `flowledger serve` on a free port; its process and base URL once it listens."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSTGRES_")}
    env |= pg_params() | {
        "PERSISTENCE_MODULE": "postgres",
        "POSTGRES_DBNAME": dbname,
        "FLOWLEDGER_HOME": home,
    }
    env.pop("FLOWLEDGER_API_TOKEN", None)
    env.pop("FLOWLEDGER_DATABASE_URL", None)
    cli = Path(sys.executable).parent / "flowledger"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(cli), "serve", "--host", "127.0.0.1", "--port", "0"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            preexec_fn=die_with_parent,
        )
    found = re.compile(r"listening on (http://[0-9.]+:\d+)")
    t0 = time.perf_counter()
    while (match := found.search(log.read_text(errors="replace"))) is None:
        if proc.poll() is not None:
            raise WorkloadFailed(
                f"flowledger serve exited with {proc.returncode}: {log.read_text()}"
            )
        if time.perf_counter() - t0 > 60:
            proc.kill()
            raise WorkloadFailed("flowledger serve did not listen within 60 s")
        time.sleep(0.05)
    return proc, match.group(1)


async def _drive_w4(base: str, pid: int, n: int, concurrency: int) -> dict[str, Any]:
    # Idle connections are dropped before uvicorn's keep-alive timeout (5 s) would close
    # them on the server: reusing one the server is closing at that moment fails the
    # request with a ReadError (seen here about one run in two at 3,000 answers).
    limits = httpx.Limits(
        max_connections=concurrency, max_keepalive_connections=concurrency, keepalive_expiry=2.0
    )
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=120) as client:
        reply = await client.post("/workflows", json=W4_WORKFLOW)
        if reply.status_code not in (200, 201):
            raise WorkloadFailed(f"POST /workflows: {reply.status_code} {reply.text}")
        gc.collect()
        idle_rss, _ = rss_bytes(pid)
        limit = asyncio.Semaphore(concurrency)
        ids: list[str] = []
        not_waiting: list[str] = []

        async def start() -> None:
            async with limit:
                r = await client.post("/workflows/bench-w4/executions", json={"input": {}})
            if r.status_code != 201:
                raise WorkloadFailed(f"start: {r.status_code} {r.text[:300]}")
            doc = r.json()
            ids.append(doc["execution_id"])
            if doc["status"] != "waiting":
                not_waiting.append(doc["execution_id"])

        t0 = time.perf_counter()
        await asyncio.gather(*(start() for _ in range(n)))
        started = time.perf_counter() - t0
        await _until(client, not_waiting, "waiting", 600)
        all_waiting = time.perf_counter() - t0
        rss, hwm = rss_bytes(pid)
        threads = proc_status(pid)["Threads"]

        not_completed: list[str] = []

        async def complete(eid: str) -> None:
            async with limit:
                r = await client.post(
                    f"/executions/{eid}/steps/approve/complete", json={"data": {"approved": True}}
                )
            if r.status_code != 200:
                raise WorkloadFailed(f"complete {eid}: {r.status_code} {r.text[:300]}")
            if r.json()["status"] != "completed":
                not_completed.append(eid)

        t0 = time.perf_counter()
        await asyncio.gather(*(complete(eid) for eid in ids))
        answered = time.perf_counter() - t0
        await _until(client, not_completed, "completed", 600)
        completed_s = time.perf_counter() - t0
        _, hwm_end = rss_bytes(pid)
    return {
        "n": n,
        "completed": len(ids),
        "start_s": started,
        "all_waiting_s": all_waiting,
        "idle_rss": idle_rss,
        "rss": rss,
        "hwm": hwm,
        "threads": threads,
        "hwm_end": hwm_end,
        "send_s": answered,
        "complete_s": completed_s,
        "late_waiting": len(not_waiting),
        "late_completed": len(not_completed),
    }


async def _until(client: httpx.AsyncClient, ids: list[str], status: str, timeout: float) -> None:
    """Poll GET /executions/{id} until each of `ids` has `status` (WorkloadFailed after timeout)."""
    t0 = time.perf_counter()
    left = list(ids)
    while left:
        if time.perf_counter() - t0 > timeout:
            raise WorkloadFailed(f"{len(left)} executions not {status} after {timeout:.0f} s")
        docs = [(await client.get(f"/executions/{eid}")).json() for eid in left]
        left = [d["execution_id"] for d in docs if d["status"] != status]
        if left:
            await asyncio.sleep(0.1)


def run_w4(spec: dict[str, Any]) -> dict[str, Any]:
    """W4 through the HTTP API of a `flowledger serve` process (its RSS is measured)."""
    with tempfile.TemporaryDirectory(prefix="flowledger-bench-serve-") as home:
        log = Path(home) / "serve.log"
        proc, base = _serve(spec["dbname"], home, log)
        try:
            out = asyncio.run(_drive_w4(base, proc.pid, int(spec["n"]), int(spec["concurrency"])))
        except Exception as exc:
            running = proc.poll() is None
            tail = log.read_text(errors="replace")[-3000:]
            what = "still running" if running else f"exited with {proc.returncode}"
            raise WorkloadFailed(f"{exc!r}; flowledger serve {what}; its log ends: {tail}") from exc
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
        if code != 0:
            tail = log.read_text(errors="replace")[-2000:]
            raise WorkloadFailed(f"flowledger serve exited with {code} at the end: {tail}")
    return out


def run(spec: dict[str, Any]) -> dict[str, Any]:
    """One measurement, as the spec says."""
    if spec["workload"] in ("w1", "w2", "w3"):
        result = run_closed_loop(spec)
        if spec["workload"] != "w3":
            result["steps_per_execution"] = STEPS if spec["workload"] == "w1" else FANOUT
        return result
    if spec["workload"] == "w4":
        return run_w4(spec)
    raise SystemExit(f"unknown workload {spec['workload']!r}")


if __name__ == "__main__":
    child_main(run)
