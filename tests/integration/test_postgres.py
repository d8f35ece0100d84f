"""PostgreSQL as the store: configuration through the environment, and two engine
processes on one execution.

On PostgreSQL nothing makes one process the only driver (the SQLite driver lock is off):
the store's optimistic concurrency does. An execution's events are keyed by (id,
version), so of two processes that decide the same next step from the same version, one
commits and the other's save fails (IntegrityError); the loser rebuilds the execution
from the store and goes on from there. The engine tests of test_step_types.py,
test_policies.py and test_webhooks.py, and most crash tests, also run on PostgreSQL.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID

import psycopg
import pytest
from integration.crash.harness import AGENTS, Lab, flowledger_executable, read_ledger
from postgres_server import PostgresServer

from flowledger.adapters.files import load_definition_file
from flowledger.domain.states import ExecutionStatus
from flowledger.services.app import FlowledgerApp
from flowledger.services.follow import submit_start

DATA = {"ms": 30}
EVENTS_TABLE = "flowledger_events"  # eventsourcing's table for the application "flowledger"

# The race: both workers hold the execution while `pause` waits, so both wake when its
# timer is due and decide the same next step (TimerFired, then b's first attempt).
RACE = """
workflow_id: pg-race
version: "1"
timeout: 600
steps:
  - {step_id: a, type: action, action: crash.step}
  - {step_id: pause, type: wait, duration: 3, dependencies: [a]}
  - {step_id: b, type: action, action: crash.step, dependencies: [pause]}
  - {step_id: pause2, type: wait, duration: 2, dependencies: [b]}
  - {step_id: c, type: action, action: crash.step, dependencies: [pause2]}
"""

# A second worker adopts the execution while the first still runs b's attempt.
SLOW = """
workflow_id: pg-slow
version: "1"
timeout: 600
retry_policy: {max_retries: 3, retry_delay: 0.5, backoff_multiplier: 1.0, max_delay: 1}
steps:
  - {step_id: a, type: action, action: crash.step}
  - step_id: b
    type: action
    action: crash.step
    dependencies: [a]
    input_mapping: {ms: "`2500`"}
  - {step_id: c, type: action, action: crash.step, dependencies: [b]}
"""


@pytest.fixture
def lab(tmp_path: Path, postgres_env: dict[str, str]) -> Iterator[Lab]:
    """A crash lab on a new PostgreSQL database."""
    pg_lab = Lab(tmp_path, store=postgres_env)
    yield pg_lab
    pg_lab.close()


def submit(lab: Lab, definition: str, key: str) -> UUID:
    """Register a definition (YAML text) and store an execution of it, not driven."""
    path = lab.root / f"{key}.yaml"
    path.write_text(definition)
    app = lab.reader()
    wf, _ = app.register(load_definition_file(path))
    return submit_start(app, wf, dict(DATA), key)


def serving_worker(lab: Lab) -> subprocess.Popen[bytes]:
    """`flowledger worker`: drives what it finds and what appears, until SIGTERM."""
    return lab.spawn(["worker", "--agents", str(AGENTS)])


def stop(lab: Lab, proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM a serving worker; it must end cleanly (its engine did not stop on an error)."""
    proc.send_signal(signal.SIGTERM)
    lab.finish(proc)
    assert "Traceback" not in lab.output(proc, "err"), lab.describe(proc, "logged a traceback")


def named(events: list[Any], name: str, **fields: Any) -> list[Any]:
    """The events of one class (with these field values)."""
    return [
        e
        for e in events
        if type(e).__name__ == name and all(getattr(e, k) == v for k, v in fields.items())
    ]


def ran_in(lab: Lab, key: str) -> dict[int, int]:
    """The pid of the process that called each attempt of a step instance."""
    return {
        line["attempt"]: line["pid"]
        for line in read_ledger(lab.ledger)
        if line["key"] == key and line["phase"] == "start"
    }


def waiting_writers(conn: psycopg.Connection[Any]) -> int:
    """How many sessions wait for the events table's write lock."""
    row = conn.execute(
        "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = %s::regclass "
        "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        (EVENTS_TABLE,),
    ).fetchone()
    assert row is not None
    return int(row[0])


def duplicate_keys(server: PostgresServer) -> int | None:
    """How many inserts the server refused for a duplicate key (None: its log is not ours)."""
    if server.log is None:
        return None
    return server.log.read_text(errors="replace").count("duplicate key value violates unique")


@pytest.mark.slow
def test_two_engines_deciding_the_same_next_step_record_it_once_and_the_loser_drives_on(
    lab: Lab, postgres_server: PostgresServer
) -> None:
    eid = submit(lab, RACE, "race")
    first = serving_worker(lab)
    lab.wait_for(lab.stored(eid, "StepWaiting", key="pause"), "the first worker to wait", first)
    fire_at = lab.event(eid, "StepWaiting", key="pause").fire_at
    second = serving_worker(lab)
    lab.wait_for(
        lambda: "resumed 1 executions" in lab.output(second, "err"),
        "the second worker to adopt the execution",
        second,
    )
    # Writes to the events table wait behind this lock (reads do not), so both workers
    # decide the timer's next step from the same version and queue to save it.
    assert lab.store is not None
    with postgres_server.connect(lab.store["POSTGRES_DBNAME"]) as conn, conn.transaction():
        conn.execute(f"LOCK TABLE {EVENTS_TABLE} IN EXCLUSIVE MODE")
        assert datetime.now(UTC) < fire_at, "the second worker started too late for the race"
        stored = list(lab.reader().repository.event_store.get(eid))
        assert not named(stored, "TimerFired"), "the timer fired before the lock was taken"
        lab.wait_for(lambda: waiting_writers(conn) == 2, "both workers to wait to save", timeout=30)
        refused = duplicate_keys(postgres_server)
    # Released: the first in the queue commits; the other's insert of the same version
    # fails on the primary key (IntegrityError), and that worker reloads.
    lab.wait_for(lab.stored(eid, "StepWaiting", key="pause2"), "b to be done", first)
    if refused is not None:  # the server's log shows the loser's refused insert
        assert duplicate_keys(postgres_server) == refused + 1
    (winner_pid,) = ran_in(lab, "b").values()
    winner, loser = (first, second) if winner_pid == first.pid else (second, first)
    assert winner_pid == winner.pid
    lab.kill(winner, "the winner, during pause2")
    lab.wait_for(lambda: lab.reader().execution(eid).is_terminal, "the loser to finish", loser)
    stop(lab, loser)
    events = lab.check({eid: ExecutionStatus.COMPLETED})[eid]
    assert [e.timer_id for e in named(events, "TimerFired")] == ["pause#wait1", "pause2#wait1"]
    assert [e.attempt for e in named(events, "StepStarted", key="b")] == [1]
    # The loser carried on with the execution as the store has it: it fired pause2 and ran c.
    assert ran_in(lab, "a") == {1: first.pid}
    assert ran_in(lab, "c") == {1: loser.pid}


@pytest.mark.slow
def test_a_second_engine_adopting_a_running_attempt_runs_it_again_but_stores_one_success(
    lab: Lab,
) -> None:
    # The second worker takes b's running attempt for lost (it cannot tell a slow process
    # from a dead one), so b runs twice: at least once, as documented. The first worker's
    # late result loses to the store: only one success is recorded. Both then race for
    # b's retry; `--until-idle` ends whichever wins (the loser follows the store).
    eid = submit(lab, SLOW, "slow")
    first = serving_worker(lab)
    lab.wait_for(lab.stored(eid, "StepStarted", key="b"), "b's first attempt to run", first)
    second = lab.worker()
    lab.finish(second)
    assert lab.reader().execution(eid).is_terminal
    stop(lab, first)
    events = lab.check({eid: ExecutionStatus.COMPLETED})[eid]
    assert [e.attempt for e in named(events, "StepStarted", key="b")] == [1, 2]
    assert [e.error["type"] for e in named(events, "StepRetryScheduled", key="b")] == ["WorkerLost"]
    assert len(named(events, "StepSucceeded", key="b")) == 1
    assert ran_in(lab, "b")[1] == first.pid
    ends = Counter(
        line["attempt"]
        for line in read_ledger(lab.ledger)
        if line["key"] == "b" and line["phase"] == "end"
    )
    assert ends == {1: 1, 2: 1}  # both calls returned; the store kept attempt 2's result


@pytest.mark.slow
def test_a_run_beside_a_serving_worker_ends_with_each_step_done_once(lab: Lab) -> None:
    # On PostgreSQL `run` drives too (no driver lock); the worker adopts the new execution
    # and counts the run's running attempt as lost. Whichever loses a race follows the
    # store, so the run still ends and reports the outcome.
    worker = serving_worker(lab)
    lab.wait_for(lambda: "resumed 0 executions" in lab.output(worker, "err"), "the worker", worker)
    run, eid = lab.run("sequence", {"ms": 400}, "beside")
    lab.finish(run)
    assert json.loads(lab.output(run))["status"] == "completed"
    stop(lab, worker)
    events = lab.check({eid: ExecutionStatus.COMPLETED})[eid]
    for key in ("a", "b", "c"):
        assert len(named(events, "StepSucceeded", key=key)) == 1


# -- configuration through the environment ---------------------------------------------------


def flowledger(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run `flowledger ARGS` with only these store settings in its environment."""
    scrubbed = ("FLOWLEDGER_", "PERSISTENCE_MODULE", "SQLITE_", "POSTGRES_")
    base = {k: v for k, v in os.environ.items() if not k.startswith(scrubbed)}
    return subprocess.run(
        [flowledger_executable(), *args],
        env={**base, "FLOWLEDGER_HOME": str(cwd / "home"), **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def database_url(settings: dict[str, str]) -> str:
    """The FLOWLEDGER_DATABASE_URL of a database (a socket folder goes in ?host=)."""
    user, dbname = settings["POSTGRES_USER"], settings["POSTGRES_DBNAME"]
    password = f":{settings['POSTGRES_PASSWORD']}" if settings["POSTGRES_PASSWORD"] else ""
    host, port = settings["POSTGRES_HOST"], settings["POSTGRES_PORT"]
    if host.startswith("/"):
        return f"postgresql://{user}{password}@/{dbname}?host={host}&port={port}"
    return f"postgresql://{user}{password}@{host}:{port}/{dbname}"


def test_a_run_configured_by_one_database_url_stores_its_events_in_that_database(
    tmp_path: Path, postgres_env: dict[str, str]
) -> None:
    definition = tmp_path / "sequence.yaml"
    definition.write_text(
        "workflow_id: pg-url\nversion: '1'\nsteps:\n"
        "  - {step_id: a, type: action, action: crash.step}\n"
        "  - {step_id: b, type: action, action: crash.step, dependencies: [a]}\n"
    )
    env = {"FLOWLEDGER_DATABASE_URL": database_url(postgres_env), "CRASH_LEDGER": "ledger"}
    args = ["run", str(definition), "--agents", str(AGENTS), "--input", json.dumps(DATA)]
    done = flowledger([*args, "--json"], env, tmp_path)
    assert done.returncode == 0, done.stderr
    eid = UUID(json.loads(done.stdout)["execution_id"])
    app = FlowledgerApp(env=postgres_env)
    try:
        assert app.execution(eid).status is ExecutionStatus.COMPLETED
    finally:
        app.close()
    assert not (tmp_path / "home" / "flowledger.db").exists()  # nothing went to SQLite
    listed = flowledger(["executions", "list", "--json"], env, tmp_path)
    assert [row["execution_id"] for row in json.loads(listed.stdout)] == [str(eid)]


def test_a_missing_postgres_setting_is_named_at_start(tmp_path: Path) -> None:
    env = {"PERSISTENCE_MODULE": "postgres", "POSTGRES_HOST": "localhost"}
    done = flowledger(["executions", "list"], env, tmp_path)
    assert done.returncode == 2
    assert "POSTGRES_DBNAME is not set" in done.stderr


def test_a_server_that_cannot_be_reached_is_reported_without_a_traceback(tmp_path: Path) -> None:
    env = {
        "PERSISTENCE_MODULE": "postgres",
        "POSTGRES_HOST": str(tmp_path / "no-server-here"),  # a socket folder with no socket
        "POSTGRES_DBNAME": "flowledger",
        "POSTGRES_USER": "flowledger",
        "POSTGRES_CONNECT_TIMEOUT": "1",
    }
    began = time.monotonic()
    done = flowledger(["executions", "list"], env, tmp_path)
    assert done.returncode == 2, done.stderr
    assert "cannot open PostgreSQL database 'flowledger'" in done.stderr
    assert "Traceback" not in done.stderr
    assert time.monotonic() - began < 30
