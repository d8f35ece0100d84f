"""What the HTTP API does: commands through the in-process engine (or, with --no-engine,
written to the store for a worker to pick up), reads off the store. Never on the event loop."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from enum import Enum
from typing import Any, TypeVar
from uuid import UUID

from eventsourcing.application import AggregateNotFoundError
from eventsourcing.persistence import IntegrityError

from flowledger.adapters.http_metrics import EngineFigures, EventCounts, exposition
from flowledger.adapters.http_models import AgentList, AgentView
from flowledger.domain.audit import AuditReport
from flowledger.domain.definitions import WorkflowDefinition
from flowledger.domain.errors import (
    ActionNotFound,
    ExecutionNotFound,
    IdempotencyConflict,
    InputInvalid,
    InvalidTransition,
    StepNotFound,
    StoreUnavailable,
    WorkflowNotFound,
)
from flowledger.domain.execution import Execution
from flowledger.domain.progress import compensation_actions
from flowledger.domain.workflow import Workflow
from flowledger.projections.performance import Performance
from flowledger.projections.performance_series import DEFAULT_BUCKETS, DurationSeries
from flowledger.projections.runner import ProjectionStatus
from flowledger.projections.runs import ExecutionDetail, ExecutionFilter, InboxTask, Page
from flowledger.projections.runs import TimelineEntry as TimelineRow
from flowledger.services import follow
from flowledger.services.app import (
    FlowledgerApp,
    WorkflowCatalog,
    catalog_id,
    check_input,
    execution_id_for,
)
from flowledger.services.audit import audit_execution, is_execution_topic
from flowledger.services.documents import execution_document
from flowledger.services.engine import Engine
from flowledger.services.follow import submit_cancel, submit_completion, submit_start
from flowledger.services.optimizer import Applied, Optimizer
from flowledger.services.optimizer_model import OptimizerReport
from flowledger.services.ports import StepRunner
from flowledger.services.queries import Queries

T = TypeVar("T")
_CONFLICT_RETRIES = 5
MAX_KEY = 256  # the longest idempotency key (and execution lookup)
# The topic of a workflow catalog's first event (as FlowledgerApp._scan names execution topics).
_CATALOG_CREATED = f"{WorkflowCatalog.__module__}:WorkflowCatalog.WorkflowCreated"


def stored_event(event: Any) -> dict[str, Any]:
    """A stored event as JSON: its type, version, timestamp and the rest of its attributes."""
    attributes = {
        name: plain(value)
        for name, value in vars(event).items()
        if name not in ("originator_id", "originator_version", "timestamp")
    }
    return {
        "type": type(event).__name__,
        "version": event.originator_version,
        "timestamp": event.timestamp.isoformat(),
        "attributes": attributes,
    }


def plain(value: Any) -> Any:
    """An event attribute as JSON (datetimes as ISO 8601, ids as text, enums as values)."""
    if value is None or isinstance(value, str | bool | int | float):
        return value
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Enum):
        return plain(value.value)
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [plain(v) for v in value]
    return str(value)  # UUIDs and anything else a transcoding brings back


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


class ApiService:
    """The use cases behind the routes.

    With an engine, commands go through it (its store thread); without one they are
    written to the store from one writer thread, as `flowledger run` does beside a worker.
    Reads run in worker threads (`asyncio.to_thread`): the store serves concurrent readers.
    Listings, timelines, the inbox and performance read the projections, caught up to the
    head of the store first (one catch-up at a time in this process), so a client reads
    what it just wrote; `follow_views` keeps them caught up between requests.
    """

    def __init__(
        self, app: FlowledgerApp, engine: Engine | None = None, runner: StepRunner | None = None
    ) -> None:
        self.app = app
        self.engine = engine
        self.runner = runner
        self.counts = EventCounts(app)
        self.queries = Queries(app, catch_up=False)
        self._catching = threading.Lock()
        self._writer = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="flowledger-api-writer")
            if engine is None
            else None
        )

    def agents(self) -> AgentList:
        """The remote agents the runner heard from (a Kafka RemoteRunner has a roster)."""
        roster = getattr(self.runner, "roster", None)  # no import of aiokafka without Kafka
        if roster is None:
            return AgentList(kafka=False, agents=[])
        return AgentList(kafka=True, agents=[AgentView(**a) for a in roster()])

    def close(self) -> None:
        """Stop the writer thread (the app, engine and runner belong to the caller)."""
        if self._writer is not None:
            self._writer.shutdown(wait=True)

    async def _read(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.to_thread(fn, *args)

    async def _write(self, fn: Callable[..., T], *args: Any) -> T:
        if self._writer is None:
            raise RuntimeError("commands go through the engine when there is one")
        return await asyncio.get_running_loop().run_in_executor(self._writer, fn, *args)

    # -- workflows ------------------------------------------------------------------------

    async def register(self, definition: WorkflowDefinition) -> tuple[Workflow, bool]:
        """Register a version; returns its workflow and whether it is new."""
        for _ in range(_CONFLICT_RETRIES):
            try:
                if self.engine is None:
                    return await self._write(self.app.register, definition)
                known = await self._read(
                    self._has_version, definition.workflow_id, definition.version
                )
                return await self.engine.register(definition), not known
            except IntegrityError:
                continue  # another process added a version of this workflow just now
        raise StoreUnavailable(f"workflow {definition.workflow_id!r} kept changing; try again")

    def _has_version(self, workflow_id: str, version: str) -> bool:
        try:
            self.app.workflow(workflow_id, version)
        except WorkflowNotFound:
            return False
        return True

    async def workflows(self) -> dict[str, list[str]]:
        """Every registered workflow id and its versions, in registration order."""
        return await self._read(self._workflows)

    def _workflows(self) -> dict[str, list[str]]:
        found: dict[str, list[str]] = {}
        start = 1
        while True:
            batch = self.app.recorder.select_notifications(start, 1000, topics=[_CATALOG_CREATED])
            for n in batch:
                catalog: Any = self.app.repository.get(UUID(str(n.originator_id)))
                found[catalog.workflow_id] = list(catalog.versions)
            if len(batch) < 1000:
                return dict(sorted(found.items()))
            start = batch[-1].id + 1

    async def versions(self, workflow_id: str) -> list[str]:
        """The versions of a workflow, in registration order."""
        return await self._read(self._versions, workflow_id)

    def _versions(self, workflow_id: str) -> list[str]:
        catalog: Any
        try:
            catalog = self.app.repository.get(catalog_id(workflow_id))
        except AggregateNotFoundError:
            raise WorkflowNotFound(f"no workflow {workflow_id!r} is registered") from None
        return list(catalog.versions)

    async def definition(self, workflow_id: str, version: str) -> dict[str, Any]:
        """The registered document of a version."""
        wf = await self._read(self.app.workflow, workflow_id, version)
        return wf.definition.to_document()

    # -- executions -----------------------------------------------------------------------

    async def start(
        self, workflow_id: str, version: str | None, data: dict[str, Any], key: str | None
    ) -> tuple[dict[str, Any], bool]:
        """Start an execution; returns its document and whether it is new.

        A key that already started an execution returns that one, unless it was for
        another workflow (or version, when one is named) or another input.
        """
        if key is not None and not 1 <= len(key) <= MAX_KEY:
            raise InputInvalid(f"an idempotency key must have 1 to {MAX_KEY} characters")
        wf = await self._read(self.app.workflow, workflow_id, version)
        check_input(wf, data)
        for _ in range(_CONFLICT_RETRIES):
            if key is not None:
                existing = await self._read(self._keyed, key)
                if existing is not None:
                    _same_start(existing, wf, version, data, key)
                    return await self.execution(existing.id), False
            if self.engine is not None:
                self._require_actions(wf, wf.actions())
                eid = await self.engine.start(wf, data, key)
            else:
                try:
                    eid = await self._write(submit_start, self.app, wf, data, key)
                except IntegrityError:
                    continue  # another process started the same key just now: that one is it
            doc = await self.execution(eid)
            if key is not None and (doc["workflow_id"], _canonical(doc["input"])) != (
                wf.workflow_id,
                _canonical(data),
            ):
                # A concurrent start with the same key and another input was stored first.
                raise IdempotencyConflict(f"idempotency key {key!r} started execution {eid}")
            return doc, True
        raise StoreUnavailable(f"the execution of idempotency key {key!r} kept changing")

    def _keyed(self, key: str) -> Execution | None:
        try:
            return self.app.execution(execution_id_for(key))
        except ExecutionNotFound:
            return None

    async def find_execution(self, text: str) -> UUID | None:
        """The execution `text` names: its id, or the idempotency key that started it
        (None when it names neither)."""
        if not 1 <= len(text) <= MAX_KEY:
            raise InputInvalid(
                f"an execution id or idempotency key must have 1 to {MAX_KEY} characters"
            )
        return await self._read(self._find, text)

    def _find(self, text: str) -> UUID | None:
        try:
            named: UUID | None = UUID(text.strip())
        except ValueError:
            named = None
        if named is not None and self._stored(named):
            return named
        # Not an execution's id (any text, a UUID too, may be an idempotency key).
        keyed = self._keyed(text)
        return keyed.id if keyed is not None else None

    def _stored(self, execution_id: UUID) -> bool:
        # The first stored record only, as stored: no replay to answer "is it there".
        first = self.app.recorder.select_events(execution_id, limit=1)
        return bool(first) and is_execution_topic(first[0].topic)

    async def audit(self, execution_id: UUID) -> AuditReport:
        """Check an execution's hash chain as stored (as `flowledger audit verify` does)."""
        return await self._read(audit_execution, self.app, execution_id)

    async def execution(self, execution_id: UUID) -> dict[str, Any]:
        """The execution document, as stored."""
        return await self._read(self._document, execution_id)

    def _document(self, execution_id: UUID) -> dict[str, Any]:
        ex, wf = self._loaded(execution_id)
        return execution_document(ex, wf)

    def _loaded(self, execution_id: UUID) -> tuple[Execution, Workflow]:
        ex = self.app.execution(execution_id)
        return ex, self.app.workflow(ex.workflow_id, ex.workflow_version)

    async def executions(self, where: ExecutionFilter, limit: int, cursor: str | None) -> Page:
        """A page of the executions listing, from the run views."""
        return await self._views(lambda q: q.executions(where, limit, cursor))

    async def execution_steps(self, execution_id: UUID) -> ExecutionDetail:
        """An execution as the run views have it: each step's attempts, agent, timings."""
        return await self._views(lambda q: q.execution(execution_id))

    async def timeline(self, execution_id: UUID) -> list[TimelineRow]:
        """An execution's transitions, in order, from the run views."""
        return await self._views(lambda q: q.timeline(execution_id))

    async def inbox(self, assignee: str | None) -> list[InboxTask]:
        """Human tasks waiting for an answer (an assignee's, or all)."""
        return await self._views(lambda q: q.inbox(assignee))

    async def performance(
        self, workflow_id: str, version: str | None, window: timedelta | None
    ) -> Performance:
        """A workflow's performance history over the window (all time when None)."""
        return await self._views(lambda q: q.performance(workflow_id, version, window))

    async def duration_series(
        self, workflow_id: str, version: str | None, buckets: int = DEFAULT_BUCKETS
    ) -> DurationSeries:
        """End-to-end duration percentiles per bucket of start time, over the executions of
        a workflow (one version, or all when None) that ended last."""
        return await self._views(lambda q: q.duration_series(workflow_id, version, buckets))

    async def optimizer_report(self, workflow_id: str, version: str | None) -> OptimizerReport:
        """The optimizer's report on a version (the newest when None), projections caught up."""
        return await self._views(lambda q: Optimizer(self.app, q).report(workflow_id, version))

    async def apply_recommendation(
        self, workflow_id: str, recommendation_id: str, version: str | None
    ) -> Applied:
        """Register the new version a recommendation makes (through the engine if any)."""
        definition, rec, based_on = await self._views(
            lambda q: Optimizer(self.app, q).proposal(workflow_id, recommendation_id, version)
        )
        wf, created = await self.register(definition)
        return Applied(wf.workflow_id, wf.version, based_on, rec, created)

    async def projections(self) -> list[ProjectionStatus]:
        """Each projection's position against the head of the store (not caught up first:
        the lag is the figure asked for)."""
        return await self._read(self.queries.status)

    async def follow_views(self, stop: asyncio.Event, interval: float = 0.5) -> None:
        """Keep the projections caught up until `stop` is set (a background task)."""
        while not stop.is_set():
            await self._read(self._catch_up)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)

    def _catch_up(self) -> None:
        with self._catching:
            self.queries.runner.catch_up()

    async def _views(self, fn: Callable[[Queries], T]) -> T:
        def caught_up() -> T:
            self._catch_up()
            return fn(self.queries)

        return await self._read(caught_up)

    async def events(self, execution_id: UUID, after: int, limit: int) -> list[dict[str, Any]]:
        """The execution's stored events after version `after`, in order, at most `limit`."""
        return await self._read(self._events, execution_id, after, limit)

    def _events(self, execution_id: UUID, after: int, limit: int) -> list[dict[str, Any]]:
        store = self.app.repository.event_store
        first = list(store.get(execution_id, limit=1))
        # Workflow versions live in the same store: their ids are not executions.
        if not first or not isinstance(first[0], Execution.Event):
            raise ExecutionNotFound(f"no execution {execution_id}")
        return [stored_event(e) for e in store.get(execution_id, gt=after, limit=limit)]

    async def complete(
        self, execution_id: UUID, ref: str, answer: dict[str, Any]
    ) -> dict[str, Any]:
        """Answer a waiting human task (a step id, or a step instance key)."""
        ex, wf = await self._read(self._loaded, execution_id)
        if ref not in ex.steps and ref not in wf.nodes:
            raise StepNotFound(f"workflow {wf.workflow_id!r} has no step {ref!r}")
        try:
            if self.engine is not None:
                if not ex.is_terminal:
                    self._require_actions(wf, wf.actions())
                await self.engine.complete_human_task(execution_id, ref, answer)
            else:
                await self._write(submit_completion, self.app, execution_id, ref, answer)
        except StepNotFound as exc:
            # The workflow has the step; it is just not waiting for an answer now.
            raise InvalidTransition(str(exc)) from None
        return await self.execution(execution_id)

    async def cancel(self, execution_id: UUID, reason: str) -> dict[str, Any]:
        """Cancel an execution: active steps stop, completed steps are compensated."""
        if self.engine is not None:
            ex, wf = await self._read(self._loaded, execution_id)
            if not ex.is_terminal:
                self._require_actions(wf, compensation_actions(ex, wf))
            await self.engine.cancel(execution_id, reason)
        else:
            await self._write(submit_cancel, self.app, execution_id, reason)
        return await self.execution(execution_id)

    async def retry(self, execution_id: UUID) -> dict[str, Any]:
        """Run a failed (or timed out) execution again from the steps that failed."""
        if self.engine is not None:
            _, wf = await self._read(self._loaded, execution_id)
            self._require_actions(wf, wf.actions())
            await self.engine.retry(execution_id)
        else:
            await self._write(follow.submit_retry, self.app, execution_id)
        return await self.execution(execution_id)

    def _require_actions(self, wf: Workflow, needed: set[str]) -> None:
        """Refuse to drive an execution whose actions no agent of this process offers."""
        missing = sorted(a for a in needed if self.runner is not None and not self.runner.offers(a))
        if missing:
            raise ActionNotFound(
                f"workflow {wf.workflow_id!r} names actions no loaded agent offers: "
                f"{', '.join(missing)} (start `flowledger serve` with --agents MODULE)"
            )

    # -- health and metrics ---------------------------------------------------------------

    async def store_position(self) -> int:
        """The position of the newest stored event: a cheap read that proves the store works."""
        return await self._read(self._head)

    def _head(self) -> int:
        return self.app.recorder.max_notification_id() or 0

    async def metrics(self) -> str:
        """The Prometheus exposition of the store's counts and this engine's figures."""
        counts = await self._read(self.counts.refresh)
        head = await self._read(self._head)
        views = await self.projections()
        figures = None
        if self.engine is not None:
            figures = EngineFigures(
                commits=self.engine.commits,
                driven=self.engine.driven,
                dormant=self.engine.dormant,
            )
        return exposition(counts, head, figures, views)


def _same_start(
    existing: Execution, wf: Workflow, version: str | None, data: dict[str, Any], key: str
) -> None:
    if existing.workflow_id != wf.workflow_id or (
        version is not None and existing.workflow_version != version
    ):
        raise IdempotencyConflict(
            f"idempotency key {key!r} already started execution {existing.id} of workflow "
            f"{existing.workflow_id!r} version {existing.workflow_version!r}"
        )
    if _canonical(existing.input) != _canonical(data):
        raise IdempotencyConflict(
            f"idempotency key {key!r} already started execution {existing.id} with another input"
        )
