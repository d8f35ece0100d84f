"""The DBOS Transact side of bench_dbos.py: W1, W2 and W4 as DBOS workflows (W3 is in
dbos_document.py), run in this process on a PostgreSQL system database.

DBOS is used as its docs say for async code: `async def` workflows and steps decorated
with `@DBOS.workflow()` / `@DBOS.step()`, started with `DBOS.start_workflow_async` (which
returns once the workflow is durably recorded) and awaited with the handle's
`get_result()`; concurrent steps inside a workflow with `asyncio.gather`; a person's
answer with `DBOS.recv_async` and `DBOS.send_async`. Steps are checkpointed as by
default: each step's output is committed to the system database before the workflow
goes on. DBOS is configured (`DBOS(config=...)`) and launched once, in main, and
destroyed at the end.

    .venv/bin/python bench/dbos_workloads.py '{"workload": "w1", "dbname": ..., ...}'
"""

from __future__ import annotations

import asyncio
import gc
import os
import time
from typing import Any

from dbos import DBOS, DBOSConfig
from dbos_common import (
    FANOUT,
    STEPS,
    WorkloadFailed,
    child_main,
    connect,
    database_url,
    poll,
    proc_status,
    rss_bytes,
)

W4_TOPIC = "approve"
W4_TIMEOUT = 3600.0  # seconds a W4 workflow waits for its answer (the run is far shorter)


@DBOS.step()
async def noop(i: int) -> dict[str, Any]:
    """A no-op action (async, so it runs on the event loop, like flowledger's)."""
    return {}


@DBOS.workflow()
async def sequential() -> int:
    """W1: STEPS no-op steps, each after the one before."""
    for i in range(STEPS):
        await noop(i)
    return STEPS


@DBOS.workflow()
async def fanout() -> int:
    """W2: FANOUT no-op steps at once (asyncio.gather), then a no-op join step."""
    results = await asyncio.gather(*(noop(i) for i in range(FANOUT)))
    await noop(FANOUT)
    return len(results)


@DBOS.workflow()
async def waiting() -> bool:
    """W4: wait for a person's answer (a message on the topic W4_TOPIC)."""
    answer = await DBOS.recv_async(W4_TOPIC, timeout_seconds=W4_TIMEOUT)
    if not isinstance(answer, dict) or not isinstance(answer.get("approved"), bool):
        raise ValueError(f"answer {answer!r} does not fit the form")
    approved: bool = answer["approved"]
    return approved


def launch(dbname: str) -> None:
    """Configure and launch DBOS on `dbname` (its system database; no application one)."""
    config: DBOSConfig = {
        "name": "flowledger-bench",
        "system_database_url": database_url(dbname),
        "log_level": "WARNING",
    }
    DBOS(config=config)
    DBOS.launch()


def status_counts(dbname: str) -> dict[str, int]:
    """Workflows in the system database by status (the store's own account)."""
    with connect(dbname) as conn:
        rows = conn.execute(
            "SELECT status, count(*) FROM dbos.workflow_status GROUP BY status"
        ).fetchall()
    return {str(status): int(count) for status, count in rows}


async def _closed_loop(n: int, concurrency: int, expected: int, which: str) -> dict[str, Any]:
    workflow = sequential if which == "w1" else fanout
    pending = iter(range(n))
    latencies: list[float] = []
    wrong = 0

    async def worker() -> None:
        nonlocal wrong
        for _ in pending:
            t0 = time.perf_counter()
            handle = await DBOS.start_workflow_async(workflow)
            result = await handle.get_result()
            latencies.append(time.perf_counter() - t0)
            wrong += result != expected

    gc.collect()
    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(concurrency, n))))
    wall = time.perf_counter() - t0
    return {"wall": wall, "latencies": latencies, "wrong": wrong}


def run_closed_loop(spec: dict[str, Any]) -> dict[str, Any]:
    """W1 or W2: n workflows, `concurrency` in flight, the next started when one ends."""
    n, which = int(spec["n"]), str(spec["workload"])
    expected = STEPS if which == "w1" else FANOUT
    launch(spec["dbname"])
    try:
        out = asyncio.run(_closed_loop(n, int(spec["concurrency"]), expected, which))
    finally:
        DBOS.destroy()
    counts = status_counts(spec["dbname"])
    if out["wrong"] or counts.get("SUCCESS", 0) != n or sum(counts.values()) != n:
        raise WorkloadFailed(f"DBOS {which}: {out['wrong']} wrong results, statuses {counts}")
    return {"wall": out["wall"], "n": n, "completed": n, "latencies": out["latencies"]}


# -- W4: many workflows waiting for a person ------------------------------------------------


def _recv_waits(dbname: str) -> int:
    """Workflows whose recv has recorded its durable timeout: from then on they wait."""
    with connect(dbname) as conn:
        row = conn.execute(
            "SELECT count(*) FROM dbos.operation_outputs WHERE function_name = 'DBOS.sleep'"
        ).fetchone()
    return int(row[0]) if row else 0


async def _w4(spec: dict[str, Any]) -> dict[str, Any]:
    n, concurrency, dbname = int(spec["n"]), int(spec["concurrency"]), str(spec["dbname"])
    pid = os.getpid()
    gc.collect()
    idle_rss, _ = rss_bytes(pid)
    handles: list[Any] = []
    limit = asyncio.Semaphore(concurrency)

    async def start() -> None:
        async with limit:
            handles.append(await DBOS.start_workflow_async(waiting))

    t0 = time.perf_counter()
    await asyncio.gather(*(start() for _ in range(n)))
    started = time.perf_counter() - t0
    waited = await asyncio.to_thread(
        poll, lambda: _recv_waits(dbname) >= n, "DBOS W4: all workflows waiting", 600, 0.2
    )
    rss, hwm = rss_bytes(pid)
    threads = proc_status(pid)["Threads"]

    async def answer(handle: Any) -> None:
        async with limit:
            await DBOS.send_async(handle.get_workflow_id(), {"approved": True}, W4_TOPIC)

    t0 = time.perf_counter()
    await asyncio.gather(*(answer(h) for h in handles))
    sent = time.perf_counter() - t0
    results = await asyncio.gather(*(h.get_result() for h in handles))
    completed_s = time.perf_counter() - t0
    return {
        "n": n,
        "completed": sum(r is True for r in results),
        "start_s": started,
        "all_waiting_s": started + waited,
        "idle_rss": idle_rss,
        "rss": rss,
        "hwm": hwm,
        "threads": threads,
        "send_s": sent,
        "complete_s": completed_s,
    }


def run_w4(spec: dict[str, Any]) -> dict[str, Any]:
    """W4: n workflows waiting on DBOS.recv in this process; RSS; DBOS.send to all."""
    launch(spec["dbname"])
    try:
        out = asyncio.run(_w4(spec))
    finally:
        DBOS.destroy()
    counts = status_counts(spec["dbname"])
    n = out["n"]
    if out["completed"] != n or counts.get("SUCCESS", 0) != n or sum(counts.values()) != n:
        raise WorkloadFailed(f"DBOS w4: {out['completed']} of {n} completed, statuses {counts}")
    return out


def run(spec: dict[str, Any]) -> dict[str, Any]:
    """One measurement, as the spec says."""
    which = spec["workload"]
    if which in ("w1", "w2"):
        return run_closed_loop(spec)
    if which == "w3":
        from dbos_document import run_w3

        return run_w3(spec)
    if which == "w4":
        return run_w4(spec)
    raise SystemExit(f"unknown workload {which!r}")


if __name__ == "__main__":
    child_main(run)
