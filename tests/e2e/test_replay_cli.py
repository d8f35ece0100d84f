"""`flowledger replay` and `flowledger audit` as a user drives them, on a store holding
histories of every step type; tampering is done with SQL straight at the store (the SQLite
file, or the PostgreSQL database the CLI is pointed at by POSTGRES_*)."""

from __future__ import annotations

import json
import shutil
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, closing, contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from cli_driver import (
    AGENTS,
    DATA,
    EXAMPLE,
    EXAMPLE_AGENTS,
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_WAITING,
    Cli,
    Receiver,
    store_state,
)
from postgres_server import PostgresServer
from psycopg import sql as pgsql

from flowledger.domain.audit import GENESIS, event_hash

WAIT_WORKFLOW = """\
workflow_id: e2e-wait
version: "1"
retry_policy: {max_retries: 0}
steps:
  - step_id: pause
    type: wait
    duration: 0
  - step_id: ship
    type: action
    action: e2e.ship
    dependencies: [pause]
"""


@dataclass(frozen=True)
class Histories:
    """A store with one execution of each kind, finished; tests work on copies of it."""

    home: Path
    ids: dict[str, str]  # invoice, contract, unknown, wait, cancelled -> execution id

    def copy(self, to: Path) -> Cli:
        """`flowledger` on a copy of the store (WAL included), for a test to change."""
        for f in self.home.glob("flowledger.db*"):
            shutil.copy(f, to / f.name)
        return Cli(to)


def _run(cli: Cli, *args: str | Path, code: int) -> dict[str, Any]:
    result = cli(*args, "--json")
    assert result.code == code, str(result)
    doc: dict[str, Any] = result.json()
    return doc


@pytest.fixture(scope="module")
def histories(tmp_path_factory: pytest.TempPathFactory) -> Histories:
    """The example workflow down each of its paths, a wait step, a cancelled order."""
    return _record_histories(tmp_path_factory.mktemp("histories"), {})


@pytest.fixture(scope="module")
def pg_histories(
    tmp_path_factory: pytest.TempPathFactory, postgres_server: PostgresServer
) -> Iterator[tuple[str, Histories]]:
    """The same histories in a PostgreSQL database (a template for the tests' copies)."""
    name = postgres_server.create_database()
    try:
        home = tmp_path_factory.mktemp("pg-histories")
        yield name, _record_histories(home, postgres_server.env(name))
    finally:
        postgres_server.drop_database(name)


def _record_histories(home: Path, store: dict[str, str]) -> Histories:
    receiver = Receiver()
    cli = Cli(home, env={"NOTIFY_ADDR": receiver.addr, **store})
    example = ("--agents", EXAMPLE_AGENTS)
    ids: dict[str, str] = {}
    try:
        for kind in ("invoice", "contract", "unknown"):
            data = json.dumps({"document_url": f"https://example.com/{kind}-1.pdf"})
            code = EXIT_OK if kind == "invoice" else EXIT_WAITING
            doc = _run(
                cli, "run", EXAMPLE, "--input", data, *example, "--idempotency-key", kind, code=code
            )
            ids[kind] = doc["execution_id"]
        answers = {"contract": ("contract_review", '{"approved": true}')}
        answers["unknown"] = ("human_review", '{"doc_type": "receipt"}')
        for kind, (step, answer) in answers.items():
            _run(cli, "complete", ids[kind], step, "--data", answer, *example, code=EXIT_OK)
        (home / "wait.yaml").write_text(WAIT_WORKFLOW)
        ids["wait"] = _run(cli, "run", home / "wait.yaml", "--agents", AGENTS, code=EXIT_OK)[
            "execution_id"
        ]
        order = ("--input", '{"order": "o-7"}', "--agents", AGENTS)
        ids["cancelled"] = _run(cli, "run", DATA / "orders.yaml", *order, code=EXIT_WAITING)[
            "execution_id"
        ]
        _run(cli, "cancel", ids["cancelled"], "--agents", AGENTS, code=EXIT_FAILED)
    finally:
        receiver.close()
    return Histories(home, ids)


def export(cli: Cli, eid: str) -> list[dict[str, Any]]:
    result = cli("audit", "export", eid)
    assert result.code == EXIT_OK, str(result)
    return [json.loads(line) for line in result.out.splitlines()]


# -- SQL straight at the store -------------------------------------------------------------


@dataclass
class Sql:
    """Changes to the store's events table (and to the run view's tables beside it), as
    someone with write access to the database could make.

    The only SQL of this module; the PostgreSQL variant gives its own connection, table,
    placeholder and id encoding (and the CLI its POSTGRES_* settings).
    """

    connect: Callable[[], Any]
    table: str = "stored_events"
    mark: str = "?"
    key: Callable[[str], Any] = lambda eid: UUID(eid).hex

    def run(self, sql: str, *params: Any) -> list[Any]:
        with closing(self.connect()) as conn:
            cursor = conn.cursor()
            cursor.execute(sql.format(t=self.table, p=self.mark), params)
            rows = cursor.fetchall() if cursor.description else []
            conn.commit()
        return list(rows)

    def edit(self, eid: str, version: int, old: bytes, new: bytes) -> None:
        where = "WHERE originator_id = {p} AND originator_version = {p}"
        [(state,)] = self.run("SELECT state FROM {t} " + where, self.key(eid), version)
        assert old in bytes(state)
        self.run(
            "UPDATE {t} SET state = {p} " + where,
            bytes(state).replace(old, new),
            self.key(eid),
            version,
        )

    def delete(self, eid: str, version: int) -> None:
        self.run(
            "DELETE FROM {t} WHERE originator_id = {p} AND originator_version = {p}",
            self.key(eid),
            version,
        )

    def copy(self, eid: str, version: int, to: int) -> None:
        self.run(
            "INSERT INTO {t} (originator_id, originator_version, topic, state) "
            "SELECT originator_id, {p}, topic, state FROM {t} "
            "WHERE originator_id = {p} AND originator_version = {p}",
            to,
            self.key(eid),
            version,
        )

    def swap(self, eid: str, a: int, b: int) -> None:
        for version, to in ((a, -1), (b, a), (-1, b)):
            self.run(
                "UPDATE {t} SET originator_version = {p} "
                "WHERE originator_id = {p} AND originator_version = {p}",
                to,
                self.key(eid),
                version,
            )

    def edit_view(self, table: str, eid: str, column: str, value: Any, key: str = "") -> None:
        """Set a column of the run view's row of an execution, or of one of its steps."""
        where = " AND key = {p}" if key else ""
        self.run(
            f"UPDATE {table} SET {column} = {{p}} WHERE execution_id = {{p}}{where}",
            value,
            eid,  # the views key executions by the id's text on every backend
            *([key] if key else []),
        )


@dataclass(frozen=True)
class Tampered:
    """`flowledger` on a copy of the histories, SQL to change that copy, and the ids."""

    cli: Cli
    sql: Sql
    ids: dict[str, str]


@contextmanager
def _sqlite(request: pytest.FixtureRequest, tmp: Path) -> Iterator[Tampered]:
    histories: Histories = request.getfixturevalue("histories")
    cli = histories.copy(tmp)
    yield Tampered(cli, Sql(lambda: sqlite3.connect(cli.home / "flowledger.db")), histories.ids)


@contextmanager
def _postgres(request: pytest.FixtureRequest, tmp: Path) -> Iterator[Tampered]:
    template, histories = request.getfixturevalue("pg_histories")
    server: PostgresServer = request.getfixturevalue("postgres_server")
    name = f"{template}_copy"
    with server.connect() as conn:  # no session is on the template: its CLI runs ended
        conn.execute(
            pgsql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                pgsql.Identifier(name), pgsql.Identifier(template)
            )
        )
    try:
        cli = Cli(tmp, env=server.env(name))
        # eventsourcing's table for the application "flowledger"; originator_id is a uuid.
        sql = Sql(lambda: server.connect(name), "flowledger_events", "%s", UUID)
        yield Tampered(cli, sql, histories.ids)
    finally:
        server.drop_database(name)


BACKENDS: dict[str, Callable[[pytest.FixtureRequest, Path], AbstractContextManager[Tampered]]] = {
    "sqlite": _sqlite,
    "postgres": _postgres,
}


@pytest.fixture(params=sorted(BACKENDS))
def tampered(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Tampered]:
    """A copy of the histories' store (SQLite file or PostgreSQL database), and SQL to
    change it."""
    with BACKENDS[request.param](request, tmp_path) as copy:
        yield copy


# -- replay --------------------------------------------------------------------------------


def test_every_stored_history_replays_through_the_current_code(histories: Histories) -> None:
    cli = Cli(histories.home)
    result = cli("replay", "--all", "--verify")
    assert result.code == EXIT_OK, str(result)
    for eid in histories.ids.values():
        assert f"ok  execution {eid}: replayed, every move allowed, the run view matches" in (
            result.out
        )
    assert "5 executions replayed, none diverging" in result.message
    one = cli("replay", histories.ids["unknown"], "--verify", "--json")
    assert one.code == EXIT_OK, str(one)
    assert one.json() == [{"execution_id": histories.ids["unknown"], "ok": True, "divergences": []}]


def test_every_stored_history_has_an_intact_hash_chain(histories: Histories) -> None:
    cli = Cli(histories.home)
    result = cli("audit", "verify", "--all")
    assert result.code == EXIT_OK, str(result)
    assert result.out.count("hash chain intact") == 5
    reports = cli("audit", "verify", histories.ids["invoice"], "--json").json()
    assert [(r["ok"], r["unverifiable"], r["findings"]) for r in reports] == [(True, 0, [])]
    assert reports[0]["verified"] == reports[0]["events"]


def test_replay_until_a_version_shows_the_execution_as_it_was(histories: Histories) -> None:
    cli = Cli(histories.home)
    eid = histories.ids["invoice"]
    lines = export(cli, eid)
    doc = _run(cli, "replay", eid, "--until-version", "6", code=EXIT_OK)
    assert doc["execution_id"] == eid
    assert doc["event_count"] == 6
    assert doc["status"] == "running"
    assert {e["version"] for e in doc["timeline"]} == set(range(1, 7))
    by_version = {e["version"]: e["event"] for e in doc["timeline"]}
    assert by_version == {line["version"]: line["type"] for line in lines[:6]}
    whole = _run(cli, "replay", eid, code=EXIT_OK)
    assert whole["status"] == "completed"
    assert whole["event_count"] == len(lines)
    assert whole["timeline"][-1]["event"] == "ExecutionCompleted"

    shown = cli("replay", eid, "--until-version", "6")
    assert shown.code == EXIT_OK, str(shown)
    assert f"as of version 6 of {len(lines)}" in shown.out
    assert "timeline" in shown.out
    assert "StepStarted" in shown.out


def test_replay_at_a_timestamp_shows_the_last_version_recorded_by_then(
    histories: Histories,
) -> None:
    cli = Cli(histories.home)
    eid = histories.ids["contract"]
    lines = export(cli, eid)
    waiting = next(line for line in lines if line["type"] == "ExecutionWaiting")
    doc = _run(cli, "replay", eid, "--at", waiting["timestamp"], code=EXIT_OK)
    assert doc["event_count"] == waiting["version"]
    assert doc["status"] == "waiting"
    assert doc["waiting_for_person"] == ["contract_review"]

    # No zone means UTC; a moment after the end is the whole history.
    last = datetime.fromisoformat(lines[-1]["timestamp"])
    naive = last.replace(tzinfo=None).isoformat()
    assert _run(cli, "replay", eid, "--at", naive, code=EXIT_OK)["event_count"] == len(lines)


def test_the_export_can_be_checked_without_flowledger(histories: Histories, tmp_path: Path) -> None:
    cli = Cli(histories.home)
    eid = histories.ids["unknown"]
    target = tmp_path / "history.jsonl"
    result = cli("audit", "export", eid, "--output", target)
    assert result.code == EXIT_OK, str(result)
    lines = [json.loads(line) for line in target.read_text().splitlines()]
    assert [line["version"] for line in lines] == list(range(1, len(lines) + 1))
    assert {"type", "version", "timestamp", "data", "hash"} <= lines[0].keys()
    assert f"head hash {lines[-1]['hash']}" in result.message
    # Each hash follows from the line before it and the line itself (domain/audit.py).
    previous = GENESIS
    for line in lines:
        moment = datetime.fromisoformat(line["timestamp"])
        expected = event_hash(
            previous, line["topic"], line["execution_id"], line["version"], moment, line["data"]
        )
        assert line["hash"] == expected, line["type"]
        previous = expected


# -- tampering -----------------------------------------------------------------------------


def test_audit_names_each_event_changed_in_the_database(tampered: Tampered) -> None:
    cli, sql, ids = tampered.cli, tampered.sql, tampered.ids
    before = {kind: export(cli, eid) for kind, eid in ids.items()}
    edited = next(line for line in before["invoice"] if line["type"] == "StepSucceeded")
    sql.edit(ids["invoice"], edited["version"], b'"key":"', b'"key":"x')
    sql.delete(ids["contract"], 5)
    inserted = len(before["unknown"]) + 1
    sql.copy(ids["unknown"], 2, to=inserted)
    sql.swap(ids["wait"], 2, 3)
    wait = {line["version"]: line["type"] for line in before["wait"]}

    result = cli("audit", "verify", "--all")

    assert result.code == EXIT_FAILED, str(result)
    named = [line for line in result.out.splitlines() if not line.startswith("ok  ")]
    assert named == [
        f"EDITED  execution {ids['invoice']} version {edited['version']} (StepSucceeded): "
        "its content does not match its hash",
        f"DELETED  execution {ids['contract']} version 5: version 5 is missing (deleted)",
        f"INSERTED  execution {ids['unknown']} version {inserted} (StepStarted): "
        "a copy of version 2",
        f"REORDERED  execution {ids['wait']} version 2 ({wait[3]}): "
        "stored as version 2, recorded as version 3",
        f"REORDERED  execution {ids['wait']} version 3 ({wait[2]}): "
        "stored as version 3, recorded as version 2",
    ]
    assert f"ok  execution {ids['cancelled']}: " in result.out
    assert "5 executions audited, 4 tampered" in result.message

    one = cli("audit", "verify", ids["contract"], "--json")
    assert one.code == EXIT_FAILED, str(one)
    [report] = one.json()
    assert report["findings"] == [
        {
            "problem": "deleted",
            "version": 5,
            "type": None,
            "detail": "version 5 is missing (deleted)",
        }
    ]
    assert cli("audit", "verify", ids["cancelled"]).code == EXIT_OK

    # The swap also puts a step's success before its start: replay names that event.
    replay = cli("replay", ids["wait"], "--verify")
    assert replay.code == EXIT_FAILED, str(replay)
    assert f"DIVERGES  execution {ids['wait']} version 2 ({wait[3]}):" in replay.out
    assert cli("replay", ids["cancelled"], "--verify").code == EXIT_OK


def test_events_deleted_from_the_end_are_seen_against_the_exported_head(
    tampered: Tampered, tmp_path: Path
) -> None:
    cli, sql = tampered.cli, tampered.sql
    eid = tampered.ids["wait"]
    exported = cli("audit", "export", eid, "--output", tmp_path / "kept.jsonl")
    head = json.loads((tmp_path / "kept.jsonl").read_text().splitlines()[-1])
    assert f"head hash {head['hash']}" in exported.message
    kept = cli("audit", "verify", eid, "--head", head["hash"])
    assert kept.code == EXIT_OK, str(kept)
    assert f"the head kept is version {head['version']}" in kept.out

    sql.delete(eid, head["version"])

    assert cli("audit", "verify", eid).code == EXIT_OK  # no later hash vouches for it
    result = cli("audit", "verify", eid, "--head", head["hash"])
    assert result.code == EXIT_FAILED, str(result)
    assert f"DELETED  execution {eid} version {head['version']}: the head {head['hash']}" in (
        result.out
    )


def test_replay_verify_names_the_step_and_field_of_a_run_view_row_changed_in_the_database(
    tampered: Tampered,
) -> None:
    cli, sql, ids = tampered.cli, tampered.sql, tampered.ids
    agreed = cli("replay", "--all", "--verify")  # the run view is caught up, and agrees
    assert agreed.code == EXIT_OK, str(agreed)
    eid = ids["invoice"]
    last = export(cli, eid)[-1]
    steps = _run(cli, "replay", eid, code=EXIT_OK)["steps"]
    key = next(k for k, step in steps.items() if step["status"] == "completed")
    attempts = steps[key]["attempts"]
    sql.edit_view("runs_steps", eid, "status", "failed", key=key)
    sql.edit_view("runs_steps", eid, "attempts", attempts + 2, key=key)
    wait = export(cli, ids["wait"])
    sql.edit_view("runs_executions", ids["wait"], "event_count", len(wait) + 1)

    result = cli("replay", eid, "--verify")

    assert result.code == EXIT_FAILED, str(result)
    where = f"DIVERGES  execution {eid} version {last['version']} ({last['type']})"
    assert result.out.splitlines() == [
        f"{where}: step {key!r} status: replay says completed, the run view says failed",
        f"{where}: step {key!r} attempts: replay counts {attempts}, the run view {attempts + 2}",
    ]
    every = cli("replay", "--all", "--verify", "--json")
    assert every.code == EXIT_FAILED, str(every)
    diverging = {r["execution_id"]: r["divergences"] for r in every.json() if not r["ok"]}
    assert diverging.keys() == {eid, ids["wait"]}
    assert diverging[ids["wait"]] == [
        {
            "version": wait[-1]["version"],
            "type": wait[-1]["type"],
            "message": f"event count: replayed {len(wait)}, the run view counted {len(wait) + 1}",
        }
    ]
    assert "5 executions replayed, 2 diverging" in cli("replay", "--all", "--verify").message


# -- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("replay", "not-an-id"), "'not-an-id' is not an execution id"),
        (("replay", str(UUID(int=7))), f"no execution {UUID(int=7)}"),
        (("replay", "{invoice}", "--at", "yesterday"), "--at 'yesterday' is not an ISO 8601"),
        (("replay", "{invoice}", "--at", "2000-01-01T00:00:00Z"), "did not exist yet"),
        (("replay", "{invoice}", "--until-version", "0"), "a version must be from 1 to"),
        (("replay", "{invoice}", "--until-version", "9999"), "a version must be from 1 to"),
        (("replay", "{invoice}", "--verify", "--until-version", "2"), "--verify replays whole"),
        (("replay", "--all"), "--all goes with --verify"),
        (("replay",), "give the id of the execution to replay"),
        (("audit", "verify"), "give an execution id, or --all"),
        (("audit", "verify", "{invoice}", "--all"), "give an execution id or --all, not both"),
        (("audit", "verify", "--all", "--head", "abc"), "--head is the head of one execution"),
        (("audit", "export", str(UUID(int=7))), f"no execution {UUID(int=7)}"),
        (("audit", "export", "{invoice}", "--output", "/no/such/dir/x.jsonl"), "--output"),
    ],
)
def test_bad_input_is_refused_with_a_message(
    histories: Histories, args: tuple[str, ...], message: str
) -> None:
    cli = Cli(histories.home)
    result = cli(*(a.format(**histories.ids) for a in args))
    assert result.code == EXIT_BAD_INPUT, str(result)
    assert message in result.message
    assert not result.out


def test_asking_about_an_empty_home_makes_no_store(cli: Cli) -> None:
    before = store_state(cli.home)
    missing = cli("audit", "verify", str(UUID(int=1)))
    assert missing.code == EXIT_BAD_INPUT, str(missing)
    assert "no execution" in missing.message
    assert cli("replay", str(UUID(int=1))).code == EXIT_BAD_INPUT
    everything = cli("audit", "verify", "--all")
    assert everything.code == EXIT_OK, str(everything)
    assert "0 executions audited, none tampered" in everything.message
    assert cli("replay", "--all", "--verify").code == EXIT_OK
    assert store_state(cli.home) == before
