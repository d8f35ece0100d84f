"""Run views: executions (filtered, sorted, paged), each execution's steps, its timeline,
and the inbox of human tasks waiting for a person.

`RunsView` holds the tables and answers the queries; `runs_projection.RunsProjection`
folds the application's events into it, each event's rows and its tracking record in one
transaction.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from flowledger.domain.errors import InputInvalid
from flowledger.projections.events import canonical, micros
from flowledger.projections.store import Row, ViewRecorder

JSON = dict[str, Any]


# -- what the view returns -----------------------------------------------------------------


@dataclass(frozen=True)
class ExecutionSummary:
    """One execution in a list: the fields of `flowledger executions list --json`."""

    execution_id: str
    workflow_id: str
    version: str
    status: str
    reason: str | None
    started_at: str
    finished_at: str | None
    duration_seconds: float | None

    def as_row(self) -> dict[str, Any]:
        """The list's JSON object."""
        return asdict(self)


@dataclass(frozen=True)
class StepView:
    """One step instance of an execution, as its events say."""

    key: str
    step_id: str
    type: str | None
    kind: str
    handles: str | None
    status: str
    attempts: int
    agent: str | None
    started_at: str | None
    last_attempt_started_at: str | None
    finished_at: str | None
    duration_seconds: float | None
    last_attempt_seconds: float | None
    last_error: JSON | None
    recovered_by: str | None
    assignee: str | None
    # Served from the step cache: {"execution_id", "step_key", "cached_at"} of the source.
    cached_from: JSON | None = None


@dataclass(frozen=True)
class ExecutionDetail:
    """An execution with its steps in the order they first appeared."""

    summary: ExecutionSummary
    idempotency_key: str | None
    deadline: str | None
    tags: list[str]
    event_count: int
    steps: list[StepView]


@dataclass(frozen=True)
class TimelineEntry:
    """One recorded transition of an execution or one of its steps."""

    seq: int
    position: int
    at: str
    event: str
    step_key: str | None
    status_from: str | None
    status_to: str | None
    detail: JSON


@dataclass(frozen=True)
class InboxTask:
    """A human task waiting for a person's answer."""

    execution_id: str
    workflow_id: str
    version: str
    key: str
    step_id: str
    assignee: str | None
    waiting_since: str
    deadline: str | None


@dataclass(frozen=True)
class ExecutionFilter:
    """Which executions to list; times bound the start (since inclusive, until exclusive)."""

    workflow_id: str | None = None
    version: str | None = None
    status: str | None = None
    tag: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    newest_first: bool = True


@dataclass(frozen=True)
class Page:
    """Some executions, and the cursor of the next page (None on the last)."""

    executions: list[ExecutionSummary]
    next_cursor: str | None


# -- the view ------------------------------------------------------------------------------


class RunsView(ViewRecorder):
    """The tables of the run views, and the queries on them."""

    name = "runs"
    tables = (
        "runs_versions",
        "runs_version_tags",
        "runs_version_steps",
        "runs_executions",
        "runs_steps",
        "runs_timeline",
        "runs_inbox",
        "runs_cached",
    )
    schema = (
        "CREATE TABLE IF NOT EXISTS runs_versions (workflow_id TEXT NOT NULL, "
        "version TEXT NOT NULL, tags TEXT NOT NULL, position BIGINT NOT NULL, "
        "PRIMARY KEY (workflow_id, version))",
        "CREATE TABLE IF NOT EXISTS runs_version_tags (tag TEXT NOT NULL, "
        "workflow_id TEXT NOT NULL, version TEXT NOT NULL, "
        "PRIMARY KEY (tag, workflow_id, version))",
        "CREATE TABLE IF NOT EXISTS runs_version_steps (workflow_id TEXT NOT NULL, "
        "version TEXT NOT NULL, step_id TEXT NOT NULL, type TEXT NOT NULL, "
        "PRIMARY KEY (workflow_id, version, step_id))",
        "CREATE TABLE IF NOT EXISTS runs_executions (execution_id TEXT PRIMARY KEY, "
        "position BIGINT NOT NULL, workflow_id TEXT NOT NULL, version TEXT NOT NULL, "
        "status TEXT NOT NULL, reason TEXT, idempotency_key TEXT, started_at TEXT NOT NULL, "
        "started_us BIGINT NOT NULL, finished_at TEXT, finished_us BIGINT, deadline TEXT, "
        "event_count INTEGER NOT NULL)",
        "CREATE INDEX IF NOT EXISTS runs_executions_by_position ON runs_executions (position)",
        "CREATE INDEX IF NOT EXISTS runs_executions_by_workflow "
        "ON runs_executions (workflow_id, version, position)",
        "CREATE INDEX IF NOT EXISTS runs_executions_by_status "
        "ON runs_executions (status, position)",
        "CREATE INDEX IF NOT EXISTS runs_executions_by_start ON runs_executions (started_us)",
        "CREATE TABLE IF NOT EXISTS runs_steps (execution_id TEXT NOT NULL, key TEXT NOT NULL, "
        "seq INTEGER NOT NULL, sub INTEGER NOT NULL, step_id TEXT NOT NULL, type TEXT, "
        "kind TEXT NOT NULL, "
        "owner TEXT, status TEXT NOT NULL, attempts INTEGER NOT NULL, agent TEXT, "
        "started_at TEXT, started_us BIGINT, last_attempt_started_at TEXT, "
        "last_attempt_started_us BIGINT, finished_at TEXT, finished_us BIGINT, last_error TEXT, "
        "recovered_by TEXT, assignee TEXT, PRIMARY KEY (execution_id, key))",
        "CREATE TABLE IF NOT EXISTS runs_timeline (execution_id TEXT NOT NULL, "
        "seq INTEGER NOT NULL, position BIGINT NOT NULL, at TEXT NOT NULL, "
        "at_us BIGINT NOT NULL, event TEXT NOT NULL, step_key TEXT, status_from TEXT, "
        "status_to TEXT, detail TEXT NOT NULL, PRIMARY KEY (execution_id, seq))",
        "CREATE TABLE IF NOT EXISTS runs_inbox (execution_id TEXT NOT NULL, key TEXT NOT NULL, "
        "step_id TEXT NOT NULL, assignee TEXT, workflow_id TEXT NOT NULL, "
        "version TEXT NOT NULL, since TEXT NOT NULL, since_us BIGINT NOT NULL, deadline TEXT, "
        "PRIMARY KEY (execution_id, key))",
        "CREATE INDEX IF NOT EXISTS runs_inbox_by_assignee ON runs_inbox (assignee, since_us)",
        # A table of its own, not columns of runs_steps: views made before step caching
        # existed gain it without a rebuild.
        "CREATE TABLE IF NOT EXISTS runs_cached (execution_id TEXT NOT NULL, key TEXT NOT NULL, "
        "source_execution_id TEXT NOT NULL, source_step_key TEXT NOT NULL, "
        "cached_at TEXT NOT NULL, PRIMARY KEY (execution_id, key))",
    )

    # -- queries -------------------------------------------------------------------------

    def executions(
        self, where: ExecutionFilter, limit: int = 50, cursor: str | None = None
    ) -> Page:
        """A page of executions matching `where`, in start order (newest first by default)."""
        if limit < 1:
            raise InputInvalid("the limit must be at least 1")
        clauses, params = _conditions(where)
        if cursor is not None:
            after = decode_cursor(cursor, where)
            clauses.append("e.position < :after" if where.newest_first else "e.position > :after")
            params["after"] = after
        sql = (
            "SELECT e.* FROM runs_executions e"
            + (" WHERE " + " AND ".join(clauses) if clauses else "")
            + f" ORDER BY e.position {'DESC' if where.newest_first else 'ASC'} LIMIT :limit"
        )
        rows = self.query(sql, limit=limit + 1, **params)
        more = len(rows) > limit
        rows = rows[:limit]
        next_cursor = encode_cursor(rows[-1]["position"], where) if more else None
        return Page([_summary(r) for r in rows], next_cursor)

    def execution(self, execution_id: str) -> ExecutionDetail | None:
        """One execution and its steps, or None if the view has not seen it."""
        with self.reading() as tx:
            row = tx.one(
                "SELECT * FROM runs_executions WHERE execution_id = :eid", eid=execution_id
            )
            if row is None:
                return None
            version = tx.one(
                "SELECT tags FROM runs_versions WHERE workflow_id = :wf AND version = :v",
                wf=row["workflow_id"],
                v=row["version"],
            )
            steps = tx.all(
                "SELECT * FROM runs_steps WHERE execution_id = :eid ORDER BY seq, sub",
                eid=execution_id,
            )
            cached = tx.all("SELECT * FROM runs_cached WHERE execution_id = :eid", eid=execution_id)
        sources = {
            c["key"]: {
                "execution_id": c["source_execution_id"],
                "step_key": c["source_step_key"],
                "cached_at": c["cached_at"],
            }
            for c in cached
        }
        return ExecutionDetail(
            summary=_summary(row),
            idempotency_key=row["idempotency_key"],
            deadline=row["deadline"],
            tags=json.loads(version["tags"]) if version else [],
            event_count=int(row["event_count"]),
            steps=[_step_view(s, sources.get(s["key"])) for s in steps],
        )

    def timeline(self, execution_id: str) -> list[TimelineEntry]:
        """An execution's transitions in the order they were recorded."""
        rows = self.query(
            "SELECT * FROM runs_timeline WHERE execution_id = :eid ORDER BY seq",
            eid=execution_id,
        )
        return [
            TimelineEntry(
                seq=int(r["seq"]),
                position=int(r["position"]),
                at=r["at"],
                event=r["event"],
                step_key=r["step_key"],
                status_from=r["status_from"],
                status_to=r["status_to"],
                detail=json.loads(r["detail"]),
            )
            for r in rows
        ]

    def inbox(self, assignee: str | None = None) -> list[InboxTask]:
        """Human tasks waiting for an answer (only `assignee`'s when given), oldest first."""
        sql = "SELECT * FROM runs_inbox"
        params: dict[str, Any] = {}
        if assignee is not None:
            sql += " WHERE assignee = :assignee"
            params["assignee"] = assignee
        rows = self.query(sql + " ORDER BY since_us, execution_id, key", **params)
        return [
            InboxTask(
                execution_id=r["execution_id"],
                workflow_id=r["workflow_id"],
                version=r["version"],
                key=r["key"],
                step_id=r["step_id"],
                assignee=r["assignee"],
                waiting_since=r["since"],
                deadline=r["deadline"],
            )
            for r in rows
        ]


def _conditions(where: ExecutionFilter) -> tuple[list[str], dict[str, Any]]:
    clauses: list[str] = []
    params: dict[str, Any] = {}
    for column, value in (
        ("workflow_id", where.workflow_id),
        ("version", where.version),
        ("status", where.status),
    ):
        if value is not None:
            clauses.append(f"e.{column} = :{column}")
            params[column] = value
    if where.tag is not None:
        clauses.append(
            "EXISTS (SELECT 1 FROM runs_version_tags t WHERE t.tag = :tag "
            "AND t.workflow_id = e.workflow_id AND t.version = e.version)"
        )
        params["tag"] = where.tag
    if where.since is not None:
        clauses.append("e.started_us >= :since")
        params["since"] = micros(where.since)
    if where.until is not None:
        clauses.append("e.started_us < :until")
        params["until"] = micros(where.until)
    return clauses, params


def _seconds(start_us: int | None, end_us: int | None) -> float | None:
    if start_us is None or end_us is None:
        return None
    return round((end_us - start_us) / 1_000_000, 6)


def _summary(row: Row) -> ExecutionSummary:
    return ExecutionSummary(
        execution_id=row["execution_id"],
        workflow_id=row["workflow_id"],
        version=row["version"],
        status=row["status"],
        reason=row["reason"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        duration_seconds=_seconds(row["started_us"], row["finished_us"]),
    )


def _step_view(row: Row, cached_from: JSON | None = None) -> StepView:
    return StepView(
        key=row["key"],
        step_id=row["step_id"],
        type=row["type"],
        kind=row["kind"],
        handles=row["owner"],
        status=row["status"],
        attempts=int(row["attempts"]),
        agent=row["agent"],
        started_at=row["started_at"],
        last_attempt_started_at=row["last_attempt_started_at"],
        finished_at=row["finished_at"],
        duration_seconds=_seconds(row["started_us"], row["finished_us"]),
        last_attempt_seconds=_seconds(row["last_attempt_started_us"], row["finished_us"]),
        last_error=json.loads(row["last_error"]) if row["last_error"] else None,
        recovered_by=row["recovered_by"],
        assignee=row["assignee"],
        cached_from=cached_from,
    )


# -- cursors: opaque to the caller, bound to the query they came from -----------------------


def _fingerprint(where: ExecutionFilter) -> str:
    # The time bounds are left out: `--since 1d` means a new instant at every call, and
    # paging by position neither skips nor repeats an execution whatever they are.
    fields = ("workflow_id", "version", "status", "tag", "newest_first")
    text = canonical({k: getattr(where, k) for k in fields})
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def encode_cursor(position: int, where: ExecutionFilter) -> str:
    """The cursor of the page after the row at `position`."""
    raw = canonical({"p": int(position), "q": _fingerprint(where)}).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str, where: ExecutionFilter) -> int:
    """The position a cursor continues after; InputInvalid if it is not one of this query's."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        data = json.loads(raw)
        position, query = data["p"], data["q"]
    except (binascii.Error, ValueError, TypeError, KeyError):
        raise InputInvalid(f"{cursor!r} is not a cursor of this listing") from None
    if not isinstance(position, int) or query != _fingerprint(where):
        raise InputInvalid(f"{cursor!r} is not a cursor of this listing (its filters differ)")
    return position
