"""Replay and audit on a real store (SQLite and PostgreSQL): rows changed directly in the
database (events, and the run view's rows), events stored by an earlier class version,
replays of every step type through the engine."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Callable
from contextlib import closing
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
import support
from eventsourcing.persistence import StoredEvent
from eventsourcing.utils import get_topic
from postgres_server import PostgresServer

from flowledger.adapters.agents import AgentRegistry, InProcessRunner
from flowledger.adapters.cli_audit import report_lines
from flowledger.adapters.webhook import WebhookClient
from flowledger.domain.audit import GENESIS, Problem, event_hash
from flowledger.domain.states import ExecutionStatus, StepStatus
from flowledger.services.app import FlowledgerApp
from flowledger.services.audit import audit_all, audit_execution, export_history
from flowledger.services.engine import Engine
from flowledger.services.replay import (
    RecordedExecution,
    RunView,
    execution_as_of,
    timeline,
    verify_all,
    verify_replay,
    version_at,
)

SETTLE = 10.0

# -- the store, and SQL straight at its events table ----------------------------------------


@dataclass
class Rows:
    """What someone with write access to the database can do to the events table (and to
    the run view's tables, which live in the same database).

    All the SQL of these tests is here; another backend needs its own `connect`, table
    name, parameter style and id encoding, nothing else.
    """

    connect: Callable[[], Any]  # a DB-API connection to the store
    table: str
    mark: str  # the driver's parameter placeholder
    key: Callable[[UUID], Any]  # originator_id as the table holds it

    def _run(self, sql: str, *params: Any) -> list[Any]:
        with closing(self.connect()) as conn:
            cursor = conn.cursor()
            cursor.execute(sql.format(t=self.table, p=self.mark), params)
            rows = cursor.fetchall() if cursor.description else []
            conn.commit()
        return list(rows)

    def edit(self, eid: UUID, version: int, old: bytes, new: bytes) -> None:
        """Rewrite part of an event's stored state."""
        [(state,)] = self._run(
            "SELECT state FROM {t} WHERE originator_id = {p} AND originator_version = {p}",
            self.key(eid),
            version,
        )
        assert old in bytes(state), f"{old!r} is not in version {version}"
        self._run(
            "UPDATE {t} SET state = {p} WHERE originator_id = {p} AND originator_version = {p}",
            bytes(state).replace(old, new),
            self.key(eid),
            version,
        )

    def delete(self, eid: UUID, version: int) -> None:
        self._run(
            "DELETE FROM {t} WHERE originator_id = {p} AND originator_version = {p}",
            self.key(eid),
            version,
        )

    def copy(self, eid: UUID, version: int, to: int) -> None:
        """Insert a copy of an event under another version."""
        self._run(
            "INSERT INTO {t} (originator_id, originator_version, topic, state) "
            "SELECT originator_id, {p}, topic, state FROM {t} "
            "WHERE originator_id = {p} AND originator_version = {p}",
            to,
            self.key(eid),
            version,
        )

    def move(self, eid: UUID, version: int, to: int) -> None:
        self._run(
            "UPDATE {t} SET originator_version = {p} "
            "WHERE originator_id = {p} AND originator_version = {p}",
            to,
            self.key(eid),
            version,
        )

    def swap(self, eid: UUID, a: int, b: int) -> None:
        self.move(eid, a, -1)
        self.move(eid, b, a)
        self.move(eid, -1, b)

    def edit_view(self, table: str, eid: UUID, column: str, value: Any, key: str = "") -> None:
        """Set a column of the run view's row of an execution, or of one of its steps."""
        # The views key executions by the id's text on every backend.
        where = " AND key = {p}" if key else ""
        self._run(
            f"UPDATE {table} SET {column} = {{p}} WHERE execution_id = {{p}}{where}",
            value,
            str(eid),
            *([key] if key else []),
        )


def _sqlite(request: pytest.FixtureRequest, tmp: Path) -> tuple[dict[str, str], Rows]:
    db = tmp / "flowledger.db"
    env = {"PERSISTENCE_MODULE": "eventsourcing.sqlite", "SQLITE_DBNAME": str(db)}
    return env, Rows(lambda: sqlite3.connect(db), "stored_events", "?", lambda eid: eid.hex)


def _postgres(request: pytest.FixtureRequest, tmp: Path) -> tuple[dict[str, str], Rows]:
    # A new database on the session's server (tests/postgres_server.py) for each test.
    env: dict[str, str] = request.getfixturevalue("postgres_env")
    server: PostgresServer = request.getfixturevalue("postgres_server")
    # eventsourcing names the table after the application ("flowledger"), in the public
    # schema; originator_id is a uuid column.
    rows = Rows(
        lambda: server.connect(env["POSTGRES_DBNAME"]), "flowledger_events", "%s", lambda eid: eid
    )
    return env, rows


Backend = Callable[[pytest.FixtureRequest, Path], tuple[dict[str, str], Rows]]
BACKENDS: dict[str, Backend] = {"sqlite": _sqlite, "postgres": _postgres}


@dataclass
class Store:
    app: FlowledgerApp
    rows: Rows
    registry: AgentRegistry
    engine: Engine

    async def run(self, doc: dict[str, Any], data: dict[str, Any] | None = None) -> UUID:
        wf = await self.engine.register(support.workflow(doc))
        eid = await self.engine.start(wf, data or {})
        await asyncio.wait_for(self.engine.wait_settled(eid), SETTLE)
        return eid


@pytest.fixture(params=sorted(BACKENDS))
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    env, rows = BACKENDS[request.param](request, tmp_path)
    app = FlowledgerApp(env=env)
    # The SQL of Rows must name the table the application writes to.
    assert getattr(app.recorder, "events_table_name", None) == rows.table
    registry = AgentRegistry()

    @registry.action("ok")
    def ok(data: dict[str, Any]) -> dict[str, Any]:
        return {"done": True}

    runner = InProcessRunner(registry, WebhookClient())
    engine = Engine(app, runner)
    yield Store(app, rows, registry, engine)
    await engine.close()
    runner.close()
    app.close()


THREE = {
    "steps": [
        {"step_id": "a", "type": "action", "action": "ok"},
        {"step_id": "b", "type": "action", "action": "ok", "dependencies": ["a"]},
        {"step_id": "c", "type": "action", "action": "ok", "dependencies": ["b"]},
    ]
}
# ExecutionStarted, then StepStarted and StepSucceeded of a, b and c, ExecutionCompleted.
TYPES = [
    "ExecutionStarted",
    *["StepStarted", "StepSucceeded"] * 3,
    "ExecutionCompleted",
]


def findings(app: FlowledgerApp, eid: UUID) -> list[tuple[Problem, int, str | None]]:
    return [(f.problem, f.version, f.event_type) for f in audit_execution(app, eid).findings]


# -- tampering, done in the database ---------------------------------------------------------


async def test_an_untouched_history_verifies(store: Store) -> None:
    eid = await store.run(THREE)
    assert support.event_types(store.app, eid) == TYPES
    report = audit_execution(store.app, eid)
    assert report.ok
    assert (report.events, report.verified, report.unverifiable) == (8, 8, 0)


async def test_an_event_edited_in_the_database_is_named(store: Store) -> None:
    eid = await store.run(THREE)
    store.rows.edit(eid, 5, b'"done":true', b'"done":false')
    assert findings(store.app, eid) == [(Problem.EDITED, 5, "StepSucceeded")]


async def test_an_event_deleted_from_the_database_is_named(store: Store) -> None:
    eid = await store.run(THREE)
    store.rows.delete(eid, 4)
    assert findings(store.app, eid) == [(Problem.DELETED, 4, None)]


async def test_an_event_copied_into_the_database_is_named(store: Store) -> None:
    eid = await store.run(THREE)
    store.rows.copy(eid, 3, to=9)
    report = audit_execution(store.app, eid)
    assert [(f.problem, f.version, f.event_type, f.detail) for f in report.findings] == [
        (Problem.INSERTED, 9, "StepSucceeded", "a copy of version 3")
    ]


async def test_events_swapped_in_the_database_are_named(store: Store) -> None:
    eid = await store.run(THREE)
    store.rows.swap(eid, 4, 5)
    assert findings(store.app, eid) == [
        (Problem.REORDERED, 4, "StepSucceeded"),
        (Problem.REORDERED, 5, "StepStarted"),
    ]


async def test_a_row_that_no_longer_decodes_is_named(store: Store) -> None:
    eid = await store.run(THREE)
    store.rows.edit(eid, 3, b"{", b"\xff{")
    assert findings(store.app, eid) == [(Problem.EDITED, 3, "StepSucceeded")]


async def test_audit_all_names_each_tampered_event_and_passes_the_rest(store: Store) -> None:
    clean, edited, gone, copied, swapped, first = [await store.run(THREE) for _ in range(6)]
    store.rows.edit(edited, 2, b'"a"', b'"z"')
    store.rows.delete(gone, 7)
    store.rows.copy(copied, 8, to=9)
    store.rows.swap(swapped, 2, 3)
    store.rows.delete(first, 1)
    reports = {UUID(r.originator_id): r for r in audit_all(store.app)}
    assert set(reports) == {clean, edited, gone, copied, swapped, first}
    named = {eid: [(f.problem, f.version) for f in r.findings] for eid, r in reports.items()}
    assert named == {
        clean: [],
        edited: [(Problem.EDITED, 2)],
        gone: [(Problem.DELETED, 7)],
        copied: [(Problem.INSERTED, 9)],
        swapped: [(Problem.REORDERED, 2), (Problem.REORDERED, 3)],
        first: [(Problem.DELETED, 1)],  # found by its other events' topics
    }


async def test_the_export_holds_each_event_as_stored_with_its_hash(store: Store) -> None:
    eid = await store.run(THREE)
    store.rows.edit(eid, 5, b'"done":true', b'"done":false')
    lines = list(export_history(store.app, eid))
    assert [line["type"] for line in lines] == TYPES
    assert [line["version"] for line in lines] == list(range(1, 9))
    assert lines[4]["data"]["result"] == {"done": False}  # what is stored, not what was
    hashes = [line["hash"] for line in lines]
    assert len(set(hashes)) == 8
    assert all(isinstance(h, str) and len(h) == 64 for h in hashes)


# -- events stored by class version 1 -----------------------------------------------------

V1_EID = UUID("00000000-0000-0000-0000-0000000001d1")
V1_TOPIC = "flowledger.domain.execution:Execution."


def _ts(second: int) -> bytes:
    return b'{"_type_":"datetime_iso","_data_":"2024-03-01T09:00:0%d+00:00"}' % second


# As the code before hashing (commit 4fe6928) stored them through the application's mapper,
# timestamps rounded: no "hash", and no "class_version" (version 1 is not written).
V1_ROWS = [
    (
        "ExecutionStarted",
        b'{"timestamp":' + _ts(0) + b',"originator_topic":"flowledger.domain.execution:'
        b'Execution","workflow_id":"orders","workflow_version":"1","input":{"order":"o-1"},'
        b'"idempotency_key":null,"seed":11,"deadline":{"_type_":"datetime_iso","_data_":'
        b'"2024-03-01T10:00:00+00:00"},"at":' + _ts(0) + b"}",
    ),
    (
        "StepStarted",
        b'{"timestamp":' + _ts(1) + b',"key":"reserve","step_id":"reserve","prefix":"",'
        b'"kind":"step","owner":null,"attempt":1,"attempt_id":"00000000-0000-0000-0000-'
        b'0000000001d1/reserve/1","input":{"order":"o-1"},"items":null,"at":' + _ts(1) + b"}",
    ),
    (
        "StepSucceeded",
        b'{"timestamp":' + _ts(2) + b',"key":"reserve","result":{"reservation":"R-1"},'
        b'"patch":{"reservation":"R-1"},"at":' + _ts(2) + b"}",
    ),
    (
        "StepWaiting",
        b'{"timestamp":' + _ts(3) + b',"key":"approve","step_id":"approve","prefix":"",'
        b'"kind":"step","owner":null,"attempt":1,"attempt_id":"00000000-0000-0000-0000-'
        b'0000000001d1/approve/1","input":{},"purpose":"human_deadline","timer_id":'
        b'"approve#human_deadline1","fire_at":{"_type_":"datetime_iso","_data_":'
        b'"2024-03-01T10:00:00+00:00"},"assignee":"sales","at":' + _ts(3) + b"}",
    ),
    ("ExecutionWaiting", b'{"timestamp":' + _ts(4) + b',"at":' + _ts(4) + b"}"),
]


def _store_v1(app: FlowledgerApp) -> None:
    app.recorder.insert_events(
        [
            StoredEvent(V1_EID, version, V1_TOPIC + name, state)
            for version, (name, state) in enumerate(V1_ROWS, start=1)
        ]
    )


async def test_events_of_class_version_1_load_and_upcast(store: Store) -> None:
    _store_v1(store.app)
    events = support.events_of(store.app, V1_EID)
    assert [type(e).__name__ for e in events] == [name for name, _ in V1_ROWS]
    assert all(type(e).class_version == 2 and e.hash is None for e in events)
    ex = store.app.execution(V1_EID)
    assert ex.status is ExecutionStatus.WAITING
    assert ex.steps["reserve"].result == {"reservation": "R-1"}
    assert ex.step_status("approve") is StepStatus.WAITING
    assert ex.timers["approve#human_deadline1"].fired is False
    assert ex.last_hash is None


async def test_a_history_begun_before_hashing_goes_on_hashed_from_genesis(store: Store) -> None:
    _store_v1(store.app)
    ex = store.app.execution(V1_EID)
    at = ex.started_at + timedelta(seconds=5)
    ex.complete_human_task("approve", {"approved": True}, {"approve": {"approved": True}}, at)
    ex.mark_resumed(at)
    ex.finish(ExecutionStatus.COMPLETED, None, at)
    new = ex.collect_events()
    store.app.save_events(list(new))
    report = audit_execution(store.app, V1_EID)
    assert report.ok, report.findings
    assert (report.unverifiable, report.verified, report.events) == (5, 3, 8)
    assert report.head == new[-1].hash
    assert report_lines(report) == [
        f"ok  execution {V1_EID}: 8 events, hash chain intact; versions 1 to 5 were "
        "recorded before hashing: unverifiable, not tampered"
    ]
    # The first hashed event chains from GENESIS: nothing before it can be vouched for.
    first = new[0]
    fields = {
        k: v
        for k, v in vars(first).items()
        if k not in ("originator_id", "originator_version", "timestamp", "hash")
    }
    topic = get_topic(type(first))
    assert first.hash == event_hash(GENESIS, topic, V1_EID, 6, first.timestamp, fields)
    assert verify_replay(store.app, V1_EID) == []

    # The hashed part stays tamper-evident; the v1 part can only be named unverifiable.
    store.rows.delete(V1_EID, 7)
    assert findings(store.app, V1_EID) == [(Problem.DELETED, 7, None)]


# -- replay ----------------------------------------------------------------------------------


async def test_replay_until_a_version_is_the_execution_after_that_many_events(store: Store) -> None:
    eid = await store.run(THREE)
    events = support.events_of(store.app, eid)
    for version in range(1, 9):
        ex = execution_as_of(store.app, eid, version=version)
        assert ex.version == version
        assert ex.last_hash == events[version - 1].hash
    after_b = execution_as_of(store.app, eid, version=5)
    assert after_b.step_status("b") is StepStatus.COMPLETED
    assert after_b.step_status("c") is StepStatus.PENDING
    assert after_b.status is ExecutionStatus.RUNNING


async def test_replay_at_a_moment_is_the_last_version_recorded_by_then(store: Store) -> None:
    eid = await store.run(THREE)
    events = support.events_of(store.app, eid)
    for e in events:
        assert version_at(store.app, eid, e.timestamp) >= e.originator_version
    fourth = events[3].timestamp
    assert execution_as_of(store.app, eid, moment=fourth).version == max(
        e.originator_version for e in events if e.timestamp <= fourth
    )
    with pytest.raises(Exception, match="did not exist yet"):
        version_at(store.app, eid, events[0].timestamp - timedelta(seconds=1))


async def test_the_timeline_is_every_move_in_order(store: Store) -> None:
    eid = await store.run(THREE)
    moves = [(t.version, t.event_type, t.key, t.before, t.after) for t in timeline(store.app, eid)]
    assert moves == [
        (1, "ExecutionStarted", None, "pending", "running"),
        (2, "StepStarted", "a", "pending", "running"),
        (3, "StepSucceeded", "a", "running", "completed"),
        (4, "StepStarted", "b", "pending", "running"),
        (5, "StepSucceeded", "b", "running", "completed"),
        (6, "StepStarted", "c", "pending", "running"),
        (7, "StepSucceeded", "c", "running", "completed"),
        (8, "ExecutionCompleted", None, "running", "completed"),
    ]
    assert [t.version for t in timeline(store.app, eid, until=3)] == [1, 2, 3]


async def test_replay_verification_names_the_event_a_swap_put_out_of_the_tables(
    store: Store,
) -> None:
    eid = await store.run(THREE)
    store.rows.swap(eid, 4, 5)
    found = verify_replay(store.app, eid)
    assert found
    assert (found[0].version, found[0].event_type) == (4, "StepSucceeded")
    assert "pending --succeed-->" in found[0].message


# -- replay held to the run view ---------------------------------------------------------


async def test_an_untouched_store_replays_to_what_its_run_view_records(store: Store) -> None:
    eids = [await store.run(THREE) for _ in range(3)]
    assert verify_replay(store.app, eids[0]) == []
    assert dict(verify_all(store.app)) == {eid: [] for eid in eids}


async def test_a_run_view_row_edited_in_the_database_is_named_with_its_step_and_field(
    store: Store,
) -> None:
    eid = await store.run(THREE)
    assert verify_replay(store.app, eid) == []  # the view is caught up, and agrees
    store.rows.edit_view("runs_steps", eid, "status", "failed", key="b")
    store.rows.edit_view("runs_steps", eid, "attempts", 3, key="c")
    store.rows.edit_view("runs_executions", eid, "status", "running")

    found = verify_replay(store.app, eid)

    assert [str(d) for d in found] == [
        f"execution {eid} version 8 (ExecutionCompleted): {message}"
        for message in (
            "status: replay says completed, the run view says running",
            "step 'b' status: replay says completed, the run view says failed",
            "step 'c' attempts: replay counts 1, the run view 3",
        )
    ]


async def test_a_projection_that_counted_an_event_twice_is_named_at_the_last_event(
    store: Store,
) -> None:
    eid = await store.run(THREE)
    other = await store.run(THREE)
    assert verify_replay(store.app, eid) == []
    store.rows.edit_view("runs_executions", eid, "event_count", 9)
    found = dict(verify_all(store.app))
    assert [(d.version, d.event_type, d.message) for d in found[eid]] == [
        (8, "ExecutionCompleted", "event count: replayed 8, the run view counted 9")
    ]
    assert found[other] == []


async def test_events_stored_while_verifying_are_replayed_before_the_comparison(
    store: Store,
) -> None:
    _store_v1(store.app)  # a history left waiting for a person
    view = RunView(store.app)
    asked: list[int] = []

    def written_meanwhile(execution_id: UUID) -> RecordedExecution | None:
        # As an engine would: the answer is stored after the replay read the history and
        # before the view is caught up.
        if not asked:
            ex = store.app.execution(execution_id)
            at = ex.started_at + timedelta(seconds=5)
            ex.complete_human_task("approve", {"approved": True}, {}, at)
            ex.mark_resumed(at)
            ex.finish(ExecutionStatus.COMPLETED, None, at)
            store.app.save(ex)
        recorded = view(execution_id)
        asked.append(recorded.version if recorded else 0)
        return recorded

    assert verify_replay(store.app, V1_EID, written_meanwhile) == []
    assert asked == [8, 8]  # the replay read on from version 5, then compared


async def test_a_run_view_that_cannot_be_brought_up_to_date_is_not_compared(
    store: Store,
) -> None:
    clean, broken = await store.run(THREE), await store.run(THREE)
    store.rows.edit(broken, 3, b"{", b"\xff{")  # before the view ever read it
    [divergence] = verify_replay(store.app, clean)
    assert (divergence.version, divergence.event_type) == (None, None)
    assert divergence.message.startswith(
        "not compared with the run view: the run view cannot be brought up to date: "
    )


# -- every step type, replayed through the current code ----------------------------------


@pytest.fixture
def every_step_type(registry: AgentRegistry, http_server: Any) -> dict[str, Any]:
    calls: dict[str, int] = {}

    @registry.action("flaky")
    def flaky(data: dict[str, Any], ctx: Any) -> dict[str, Any]:
        calls[ctx.step_key] = calls.get(ctx.step_key, 0) + 1
        if calls[ctx.step_key] == 1:
            raise ConnectionError("first attempt fails")
        return {"items": [1, 2]}

    @registry.action("ok")
    def ok(data: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True}

    @registry.action("boom")
    def boom(data: dict[str, Any]) -> dict[str, Any]:
        raise ValueError("boom")

    hook = http_server.on("/hook", (200, {"received": True}))
    return {
        "retry_policy": {"max_retries": 2, "retry_delay": 0.01},
        "handlers": [
            {"step_id": "fallback", "type": "action", "action": "ok"},
            {"step_id": "undo", "type": "action", "action": "ok"},
        ],
        "steps": [
            {"step_id": "fetch", "type": "action", "action": "flaky", "rollback_actions": ["undo"]},
            {"step_id": "hook", "type": "webhook", "url": hook, "dependencies": ["fetch"]},
            {"step_id": "pause", "type": "wait", "duration": 0, "dependencies": ["fetch"]},
            {
                "step_id": "route",
                "type": "condition",
                "dependencies": ["hook", "pause"],
                "conditions": [{"expression": "finish", "steps": ["fan"]}],
                "else_steps": ["fail"],
            },
            {
                "step_id": "fan",
                "type": "parallel",
                "parallel_steps": [
                    {"step_id": "p1", "type": "action", "action": "ok"},
                    {
                        "step_id": "p2",
                        "type": "action",
                        "action": "boom",
                        "retry_policy": {"max_retries": 0},
                        "error_handlers": ["fallback"],
                    },
                ],
            },
            {
                "step_id": "fail",
                "type": "action",
                "action": "boom",
                "retry_policy": {"max_retries": 0},
            },
            {
                "step_id": "pages",
                "type": "loop",
                "for_each": "fetch.items",
                "dependencies": ["fan"],
                "steps": [{"step_id": "page", "type": "action", "action": "ok"}],
            },
            {
                "step_id": "approve",
                "type": "human_task",
                "dependencies": ["pages"],
                "form_schema": {"type": "object", "required": ["approved"]},
            },
        ],
    }


async def test_every_step_type_replays_through_the_current_code(
    engine: Engine, app: FlowledgerApp, every_step_type: dict[str, Any], until: Any
) -> None:
    wf = await engine.register(support.workflow(every_step_type))
    done = await engine.start(wf, {"finish": True})
    await until(done, lambda e: e.step_status("approve") is StepStatus.WAITING)
    await engine.complete_human_task(done, "approve", {"approved": True})
    compensated = await engine.start(wf, {"finish": False})
    cancelled = await engine.start(wf, {"finish": True})
    await until(cancelled, lambda e: e.step_status("approve") is StepStatus.WAITING)
    await engine.cancel(cancelled, "changed our minds")
    ended = {
        eid: (await asyncio.wait_for(engine.wait_settled(eid), SETTLE)).status
        for eid in (done, compensated, cancelled)
    }
    assert ended == {
        done: ExecutionStatus.COMPLETED,
        compensated: ExecutionStatus.FAILED,
        cancelled: ExecutionStatus.CANCELLED,
    }
    kinds = {type(e).__name__ for eid in ended for e in support.events_of(app, eid)}
    assert kinds >= {
        "StepRetryScheduled",
        "TimerFired",
        "BranchSelected",
        "StepRecovered",
        "LoopIterationStarted",
        "HumanTaskCompleted",
        "CompensationStarted",
        "StepCompensated",
        "StepCancelled",
        "StepWaiting",
    }
    for eid in ended:
        assert verify_replay(app, eid) == [], eid
        assert audit_execution(app, eid).ok, eid
