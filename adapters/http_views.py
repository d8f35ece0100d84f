"""The read routes of the HTTP API over the projections: the executions listing, an
execution's steps and timeline, the human-task inbox, performance history (and its series
over time), and the projections' lag. Each reads the views caught up to the head of the
store. Beside them, two reads of the store itself: an execution found by its id or its
idempotency key, and the audit of an execution's hash chain."""

from __future__ import annotations

from dataclasses import asdict
from datetime import UTC, datetime
from typing import Annotated, Any, Literal
from uuid import UUID

from fastapi import FastAPI, Query

from flowledger.adapters.http_models import (
    AuditDocument,
    DurationSeriesReport,
    ExecutionFound,
    ExecutionPage,
    ExecutionSteps,
    Inbox,
    PerformanceReport,
    ProjectionList,
    Timeline,
    error_responses,
)
from flowledger.adapters.http_service import MAX_KEY, ApiService
from flowledger.adapters.timeparse import parse_window
from flowledger.domain.errors import ExecutionNotFound, InputInvalid
from flowledger.domain.states import ExecutionStatus
from flowledger.projections.performance_series import DEFAULT_BUCKETS, MAX_BUCKETS
from flowledger.projections.runs import ExecutionFilter

MAX_CURSOR = 512
MAX_NAME = 256
# An optional filter naming something: a workflow, a version, a tag, an assignee.
Name = Annotated[str | None, Query(min_length=1, max_length=MAX_NAME)]


_errors = error_responses


def _utc(moment: datetime | None, what: str) -> datetime | None:
    if moment is None:
        return None
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)  # a time with no zone is UTC, as in the CLI
    try:
        return moment.astimezone(UTC)
    except OverflowError:
        raise InputInvalid(f"{what} {moment.isoformat()} is out of range") from None


def add_view_routes(app: FastAPI, service: ApiService) -> None:
    """Add the projection-backed read routes to `app`: before /executions/{execution_id},
    which would take /executions/lookup for an execution id."""

    @app.get("/executions", response_model=ExecutionPage, responses=_errors(422, 503))
    async def list_executions(
        workflow: Name = None,
        version: Name = None,
        status: ExecutionStatus | None = None,
        tag: Name = None,
        since: Annotated[
            datetime | None, Query(description="started at or after (ISO 8601; UTC if no zone)")
        ] = None,
        until: Annotated[
            datetime | None, Query(description="started before (ISO 8601; UTC if no zone)")
        ] = None,
        order: Literal["newest", "oldest"] = "newest",
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        cursor: Annotated[str | None, Query(min_length=1, max_length=MAX_CURSOR)] = None,
    ) -> dict[str, Any]:
        """Executions filtered by workflow, version, status, tag (of the version) and start
        time, in start order (newest first unless `order=oldest`); a full page gives a
        `next_cursor` to pass as `cursor` with the same filters."""
        where = ExecutionFilter(
            workflow_id=workflow,
            version=version,
            status=status.value if status else None,
            tag=tag,
            since=_utc(since, "since"),
            until=_utc(until, "until"),
            newest_first=order == "newest",
        )
        page = await service.executions(where, limit, cursor)
        return {
            "executions": [e.as_row() for e in page.executions],
            "next_cursor": page.next_cursor,
        }

    @app.get("/executions/lookup", response_model=ExecutionFound, responses=_errors(404, 422, 503))
    async def find_execution(
        q: Annotated[
            str,
            Query(
                min_length=1,
                max_length=MAX_KEY,
                description="an execution id, or the idempotency key that started one",
            ),
        ],
    ) -> ExecutionFound:
        """The execution an id or an idempotency key names (404 when it names none)."""
        found = await service.find_execution(q)
        if found is None:
            raise ExecutionNotFound(f"no execution has the id or the idempotency key {q!r}")
        return ExecutionFound(execution_id=found)

    @app.get(
        "/executions/{execution_id}/audit",
        response_model=AuditDocument,
        responses=_errors(404, 422, 503),
    )
    async def audit_execution(execution_id: UUID) -> AuditDocument:
        """Check the execution's hash chain as stored: every event edited, deleted, inserted
        or moved is a finding (as `flowledger audit verify ID --json` says)."""
        return AuditDocument.of(await service.audit(execution_id))

    @app.get(
        "/executions/{execution_id}/steps",
        response_model=ExecutionSteps,
        responses=_errors(404, 422, 503),
    )
    async def execution_steps(execution_id: UUID) -> dict[str, Any]:
        """Each step instance of an execution: status, attempts, the agent of the last
        attempt, durations, last error, and the handler that recovered it."""
        detail = await service.execution_steps(execution_id)
        doc = asdict(detail)
        doc["execution"] = doc.pop("summary")
        return doc

    @app.get(
        "/executions/{execution_id}/timeline",
        response_model=Timeline,
        responses=_errors(404, 422, 503),
    )
    async def execution_timeline(execution_id: UUID) -> dict[str, Any]:
        """Every recorded transition of the execution and its steps, in order, with times."""
        entries = await service.timeline(execution_id)
        return {"execution_id": execution_id, "timeline": [asdict(e) for e in entries]}

    @app.get("/inbox", response_model=Inbox, responses=_errors(422, 503))
    async def inbox(assignee: Name = None) -> dict[str, Any]:
        """Human tasks waiting for a person (only the assignee's when given), oldest first."""
        tasks = await service.inbox(assignee)
        return {"tasks": [asdict(t) for t in tasks]}

    @app.get(
        "/workflows/{workflow_id}/performance",
        response_model=PerformanceReport,
        responses=_errors(404, 422, 503),
    )
    async def performance(
        workflow_id: str,
        version: Name = None,
        window: Annotated[
            str, Query(max_length=32, description="all, or a duration such as 1h, 24h, 7d")
        ] = "all",
    ) -> dict[str, Any]:
        """Counts, success and retry rates and duration percentiles, end to end (with SLA
        compliance per version), per step and per agent, counted from the events."""
        span = parse_window(window, "window")
        perf = await service.performance(workflow_id, version, span)
        return {"window": window, **asdict(perf)}

    @app.get(
        "/workflows/{workflow_id}/performance/series",
        response_model=DurationSeriesReport,
        responses=_errors(404, 422, 503),
    )
    async def performance_series(
        workflow_id: str,
        version: Name = None,
        buckets: Annotated[
            int, Query(ge=1, le=MAX_BUCKETS, description="at most this many buckets")
        ] = DEFAULT_BUCKETS,
    ) -> dict[str, Any]:
        """End-to-end duration percentiles (p50, p95, p99 of completed executions) and
        counts per bucket of start time, over the executions that ended last; the bucket
        width (1 min to 1 week) is the smallest that keeps to `buckets`."""
        return asdict(await service.duration_series(workflow_id, version, buckets))

    @app.get("/projections", response_model=ProjectionList, responses=_errors(503))
    async def projections() -> dict[str, Any]:
        """Each projection's position against the head of the store, and its lag."""
        found = await service.projections()
        return {"projections": [asdict(p) for p in found]}
