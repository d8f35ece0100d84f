"""What bench_dbos.py and its child processes share: the PostgreSQL server, fresh databases,
the child protocol (one JSON line on stdout), and small measurements (RSS, percentiles).

Every measurement runs in a child process of its own (`python bench/<module>.py SPEC`), so
neither system inherits the other's threads, connections, caches or garbage, and DBOS (a
process-wide singleton) is launched once per process, as its docs say.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

REPO = Path(__file__).resolve().parents[1]
PG_DEFAULTS = {"POSTGRES_HOST": "127.0.0.1", "POSTGRES_PORT": "5432", "POSTGRES_USER": "postgres"}
RESULT_PREFIX = "BENCH-RESULT "
STEPS = 5  # W1: sequential no-op steps
FANOUT = 20  # W2: parallel no-op children, then a join


class WorkloadFailed(Exception):
    """A workload did not complete as it must (lost, failed or stuck executions)."""


def die_with_parent() -> None:
    """In a child, before exec: get SIGTERM when its parent dies (Linux prctl), so a bench
    that is stopped leaves no receiver, measurement or server running."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def pg_params() -> dict[str, str]:
    """Where the PostgreSQL server is: POSTGRES_* from the environment, else the defaults."""
    params = {k: os.environ.get(k) or v for k, v in PG_DEFAULTS.items()}
    params["POSTGRES_PASSWORD"] = os.environ.get("POSTGRES_PASSWORD", "")
    return params


def connect(dbname: str, *, autocommit: bool = True) -> psycopg.Connection[Any]:
    """A connection to `dbname` on the bench's server."""
    p = pg_params()
    return psycopg.connect(
        host=p["POSTGRES_HOST"],
        port=int(p["POSTGRES_PORT"]),
        user=p["POSTGRES_USER"],
        password=p["POSTGRES_PASSWORD"] or None,
        dbname=dbname,
        autocommit=autocommit,
    )


def database_url(dbname: str) -> str:
    """The SQLAlchemy/libpq URL of `dbname` (what DBOS is configured with)."""
    p = pg_params()
    auth = p["POSTGRES_USER"] + (f":{p['POSTGRES_PASSWORD']}" if p["POSTGRES_PASSWORD"] else "")
    return f"postgresql://{auth}@{p['POSTGRES_HOST']}:{p['POSTGRES_PORT']}/{dbname}"


def fresh_database(dbname: str) -> str:
    """Drop and create `dbname`; returns its synchronous_commit (the bench needs "on")."""
    drop_database(dbname)
    with connect("postgres") as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
    with connect(dbname) as conn:
        row = conn.execute("SHOW synchronous_commit").fetchone()
    setting = str(row[0]) if row else "?"
    if setting != "on":
        raise SystemExit(f"database {dbname}: synchronous_commit is {setting!r}, not 'on'")
    return setting


def drop_database(dbname: str) -> None:
    """Drop `dbname` if it exists, ending its sessions."""
    with connect("postgres") as admin:
        admin.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname))
        )


def rss_bytes(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process, in bytes, from /proc/<pid>/status."""
    found = proc_status(pid)
    return found["VmRSS"] * 1024, found["VmHWM"] * 1024  # kB


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (kB) and Threads of a process, from /proc/<pid>/status."""
    found = {"VmRSS": 0, "VmHWM": 0, "Threads": 0}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in found:
            found[key] = int(value.split()[0])
    return found


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by the nearest-rank method."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def poll(check: Callable[[], bool], what: str, timeout: float, interval: float = 0.05) -> float:
    """Wait until `check()` holds (looking every `interval` s); the seconds it took.

    Raises WorkloadFailed after `timeout` s: a condition that never comes is a failed run.
    """
    t0 = time.perf_counter()
    while not check():
        if time.perf_counter() - t0 > timeout:
            raise WorkloadFailed(f"{what}: not reached after {timeout:.0f} s")
        time.sleep(interval)
    return time.perf_counter() - t0


def child_main(run: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """Entry point of a child: SPEC (JSON, or @FILE holding it) in argv[1]; the result as the
    last stdout line."""
    arg = sys.argv[1]
    spec = json.loads(Path(arg[1:]).read_text() if arg.startswith("@") else arg)
    try:
        result = run(spec)
    except WorkloadFailed as exc:
        print(f"{RESULT_PREFIX}{json.dumps({'failed': str(exc)})}", flush=True)
        sys.exit(1)
    print(f"{RESULT_PREFIX}{json.dumps(result)}", flush=True)
