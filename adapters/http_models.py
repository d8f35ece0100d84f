"""The bodies of the HTTP API: what requests carry and responses return, as pydantic models.

They are the OpenAPI document's schemas too (schemathesis checks responses against them).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from flowledger.domain.audit import AuditReport, Problem
from flowledger.domain.states import ExecutionStatus, StepStatus
from flowledger.projections.performance import (
    AgentFigures,
    ExecutionFigures,
    StepFigures,
    VersionFigures,
)
from flowledger.projections.performance_series import SeriesPoint

MAX_NESTING = 100

# -- bodies ------------------------------------------------------------------------------


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _bounded_json(value: dict[str, Any]) -> dict[str, Any]:
    # The domain copies and renders user data recursively: bound the nesting at the edge,
    # as definitions are bounded (domain/definitions.py), rather than fail deep inside.
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_NESTING:
            raise ValueError(f"the JSON is nested deeper than {MAX_NESTING} levels")
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    try:
        json.dumps(value, allow_nan=False)
    except ValueError:
        raise ValueError("numbers must be finite (NaN and Infinity are not JSON)") from None
    return value


JsonObject = Annotated[dict[str, Any], AfterValidator(_bounded_json)]


class ErrorBody(_Model):
    """Every error: the error class, a message, and each problem when there are several."""

    error: str
    detail: str
    problems: list[str] = Field(default_factory=list)


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI `responses` entries of error status codes (each an ErrorBody)."""
    return {code: {"model": ErrorBody} for code in codes}


class Registered(_Model):
    """A registered workflow version; `created` is false when it was already there."""

    workflow_id: str
    version: str
    created: bool


class WorkflowVersions(_Model):
    """A workflow and its versions, in registration order."""

    workflow_id: str
    versions: list[str]


class WorkflowList(_Model):
    """Every registered workflow."""

    workflows: list[WorkflowVersions]


class StartRequest(_Model):
    """Start an execution of the workflow (its newest version unless one is named)."""

    input: JsonObject = Field(default_factory=dict)
    version: str | None = Field(default=None, min_length=1, max_length=64)


class CompleteRequest(_Model):
    """A person's answer to a human task, checked against its form_schema."""

    data: JsonObject


class CancelRequest(_Model):
    """Why the execution is cancelled."""

    reason: str = Field(default="cancelled by request", min_length=1, max_length=4096)


class StepDocument(_Model):
    """One step instance of an execution."""

    step_id: str
    type: str | None
    kind: str
    status: StepStatus
    attempts: int
    started_at: str | None
    last_attempt_started_at: str | None
    finished_at: str | None
    duration_seconds: float | None
    last_error: dict[str, Any] | None
    recovered_by: str | None
    result: Any
    handles: str | None = None  # handlers: the key of the step they handle
    assignee: str | None = None  # human tasks
    agent: str | None = None  # the remote agent that ran its last ended attempt
    route: str | None = None  # why that attempt went to that agent (adaptive routing)


class ExecutionDocument(_Model):
    """The execution document (as `flowledger executions show --json` prints it)."""

    execution_id: UUID
    workflow_id: str
    version: str
    status: ExecutionStatus
    reason: str | None
    idempotency_key: str | None
    started_at: str | None
    finished_at: str | None
    deadline: str | None
    duration_seconds: float | None
    input: dict[str, Any]
    data: dict[str, Any]
    steps: dict[str, StepDocument]
    waiting_for_person: list[str]
    event_count: int


class ExecutionSummary(_Model):
    """One row of the executions listing."""

    execution_id: UUID
    workflow_id: str
    version: str
    status: ExecutionStatus
    reason: str | None
    started_at: str | None
    finished_at: str | None
    duration_seconds: float | None


class ExecutionPage(_Model):
    """A page of executions, newest first; pass `next_cursor` as `cursor` for the next."""

    executions: list[ExecutionSummary]
    next_cursor: str | None


class StoredEvent(_Model):
    """One stored event of an execution."""

    type: str
    version: int
    timestamp: str
    attributes: dict[str, Any]


class EventList(_Model):
    """An execution's stored events, in order."""

    execution_id: UUID
    events: list[StoredEvent]


class Health(_Model):
    """The process is up."""

    status: Literal["ok"]


class AgentView(_Model):
    """A remote agent as its last announcement (heartbeat) described it."""

    agent_id: str
    capabilities: list[str]
    actions: list[str]
    in_flight: int
    last_seen: str
    live: bool  # heard from lately, and it did not say it stopped
    concurrency: int | None = None  # tasks it runs at once, if it said
    inbox: bool = False  # it reads its own task topic: the router can send it tasks by name


class AgentList(_Model):
    """The remote agents this process heard from (Kafka); empty without Kafka."""

    kafka: bool
    agents: list[AgentView]


class Ready(_Model):
    """The store answers; `engine` says whether this process drives executions."""

    status: Literal["ready"]
    store_position: int
    engine: bool


class StepView(_Model):
    """One step instance in the run view."""

    key: str
    step_id: str
    type: str | None
    kind: str
    handles: str | None
    status: StepStatus
    attempts: int
    agent: str | None
    started_at: str | None
    last_attempt_started_at: str | None
    finished_at: str | None
    duration_seconds: float | None
    last_attempt_seconds: float | None
    last_error: dict[str, Any] | None
    recovered_by: str | None
    assignee: str | None
    cached_from: dict[str, Any] | None = Field(
        default=None,
        description="served from the step cache: the execution_id and step_key whose result "
        "it was given, and when that result was produced (cached_at)",
    )


class ExecutionSteps(_Model):
    """An execution as the run view has it: each step with its attempts, agent and timings."""

    execution: ExecutionSummary
    idempotency_key: str | None
    deadline: str | None
    tags: list[str]
    event_count: int
    steps: list[StepView]


class TimelineEntry(_Model):
    """One recorded transition: of the execution (step_key null) or of a step instance."""

    seq: int
    position: int
    at: str
    event: str
    step_key: str | None
    status_from: str | None
    status_to: str | None
    detail: dict[str, Any]


class Timeline(_Model):
    """An execution's transitions, in the order they were recorded."""

    execution_id: UUID
    timeline: list[TimelineEntry]


class InboxTask(_Model):
    """A human task waiting for a person's answer."""

    execution_id: UUID
    workflow_id: str
    version: str
    key: str
    step_id: str
    assignee: str | None
    waiting_since: str
    deadline: str | None


class Inbox(_Model):
    """Waiting human tasks, oldest first."""

    tasks: list[InboxTask]


class PerformanceReport(_Model):
    """A workflow's figures over a window, counted from its events: end to end, per version
    (with SLA compliance), per step and per agent."""

    workflow_id: str
    version: str | None
    window: str
    since: str | None
    executions: ExecutionFigures
    versions: list[VersionFigures]
    steps: list[StepFigures]
    agents: list[AgentFigures]


class DurationSeriesReport(_Model):
    """End-to-end duration percentiles of a workflow's executions (one version, or all),
    per bucket of start time (`bucket_seconds` wide), oldest first; empty buckets left out."""

    workflow_id: str
    version: str | None
    bucket_seconds: int
    points: list[SeriesPoint]


class ExecutionFound(_Model):
    """The execution an id or an idempotency key names."""

    execution_id: UUID


class AuditFinding(_Model):
    """One event the hash chain says was edited, deleted, inserted or moved."""

    problem: Problem
    version: int  # as stored (for `deleted`: the missing one)
    type: str | None  # the event's class, when there is an event to name
    detail: str


class AuditDocument(_Model):
    """An execution's hash chain checked as stored (as `flowledger audit verify ID --json`
    prints it): `ok` when there is no finding; `head` is the chain's last hash."""

    execution_id: UUID
    ok: bool
    events: int
    verified: int
    unverifiable: int  # the prefix recorded before hashing
    unchecked: list[int]  # versions right after a gap: no predecessor to check against
    head: str | None
    approximate: bool  # too much is broken to trace every move
    anchored_at: int | None
    findings: list[AuditFinding]

    @classmethod
    def of(cls, report: AuditReport) -> AuditDocument:
        """The document of a report."""
        return cls(
            execution_id=UUID(report.originator_id),
            ok=report.ok,
            events=report.events,
            verified=report.verified,
            unverifiable=report.unverifiable,
            unchecked=list(report.unchecked),
            head=report.head,
            approximate=report.approximate,
            anchored_at=report.anchored_at,
            findings=[
                AuditFinding(
                    problem=f.problem, version=f.version, type=f.event_type, detail=f.detail
                )
                for f in report.findings
            ],
        )


class ProjectionState(_Model):
    """A projection's position against the head of the store."""

    name: str
    position: int
    head: int
    lag: int


class ProjectionList(_Model):
    """Every projection this API reads."""

    projections: list[ProjectionState]
