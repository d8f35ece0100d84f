"""The event-sourced application: workflow versions and executions in one store."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from uuid import NAMESPACE_URL, UUID, uuid5

from eventsourcing.application import AggregateNotFoundError, Application
from eventsourcing.domain import Aggregate, event

from flowledger.domain.definitions import WorkflowDefinition, parse_definition
from flowledger.domain.errors import (
    DefinitionConflict,
    ExecutionNotFound,
    InputInvalid,
    WorkflowNotFound,
)
from flowledger.domain.execution import Execution
from flowledger.domain.limits import MAX_JSON_DEPTH, json_depth
from flowledger.domain.schemas import validate_instance
from flowledger.domain.workflow import Workflow

NAMESPACE = uuid5(NAMESPACE_URL, "https://flowledger.dev/ids")
MAX_INPUT_BYTES = 1_048_576
_ENDS = (
    "ExecutionCompleted",
    "ExecutionFailed",
    "ExecutionTimedOut",
    "ExecutionCancelled",
)


class WorkflowVersion(Aggregate):
    """One registered, immutable (workflow_id, version) and its definition document."""

    @staticmethod
    def create_id(workflow_id: str, version: str) -> UUID:
        """Deterministic: registering the same version twice addresses one aggregate."""
        return version_id(workflow_id, version)

    @event("WorkflowVersionRegistered")
    def __init__(self, workflow_id: str, version: str, document: dict[str, Any]) -> None:
        self.workflow_id = workflow_id
        self.workflow_version = version
        self.document = document


class WorkflowCatalog(Aggregate):
    """The versions registered under one workflow id, in registration order."""

    @staticmethod
    def create_id(workflow_id: str) -> UUID:
        """Deterministic: one catalog per workflow id."""
        return catalog_id(workflow_id)

    @event("WorkflowCreated")
    def __init__(self, workflow_id: str) -> None:
        self.workflow_id = workflow_id
        self.versions: list[str] = []

    def add_version(self, version: str) -> None:
        """Record a newly registered version (ignored if already listed)."""
        if version not in self.versions:
            self._version_added(version=version)

    @event("VersionAdded")
    def _version_added(self, version: str) -> None:
        self.versions.append(version)


class HandledCommand(Aggregate):
    """A command taken from the command topic, saved in the transaction of what it caused:
    the same command id again finds this and changes nothing."""

    @staticmethod
    def create_id(command_id: str, command_type: str, execution_id: str | None) -> UUID:
        """Deterministic: one record per command id."""
        return command_marker_id(command_id)

    @event("CommandHandled")
    def __init__(self, command_id: str, command_type: str, execution_id: str | None) -> None:
        self.command_id = command_id
        self.command_type = command_type
        self.execution_id = execution_id


@dataclass(frozen=True)
class CommandRef:
    """A command from the command topic, to record as handled with what it causes."""

    command_id: str
    command_type: str

    def record(self, execution_id: UUID | None = None) -> list[Aggregate]:
        """A new record of this command (one per save attempt: a failed save spends it)."""
        target = str(execution_id) if execution_id is not None else None
        return [HandledCommand(self.command_id, self.command_type, target)]


def command_marker_id(command_id: str) -> UUID:
    """The id of the record of a handled command."""
    return uuid5(NAMESPACE, f"command:{command_id}")


def version_id(workflow_id: str, version: str) -> UUID:
    """The deterministic id of a workflow version aggregate."""
    return uuid5(NAMESPACE, f"workflow-version:{workflow_id}@{version}")


def catalog_id(workflow_id: str) -> UUID:
    """The deterministic id of a workflow's catalog aggregate."""
    return uuid5(NAMESPACE, f"workflow:{workflow_id}")


def execution_id_for(idempotency_key: str) -> UUID:
    """The execution id an idempotency key always maps to."""
    return uuid5(NAMESPACE, f"execution:{idempotency_key}")


def _canonical(document: dict[str, Any]) -> str:
    return json.dumps(document, sort_keys=True, separators=(",", ":"))


class FlowledgerApp(Application[UUID]):
    """Workflow versions and executions, stored as events (SQLite, PostgreSQL or memory)."""

    name = "flowledger"

    def __init__(self, env: dict[str, str] | None = None) -> None:
        super().__init__(env)
        self._compiled: dict[tuple[str, str], Workflow] = {}

    # -- workflows ------------------------------------------------------------------------

    def register(
        self, definition: WorkflowDefinition, command: CommandRef | None = None
    ) -> tuple[Workflow, bool]:
        """Register a definition; returns its workflow and whether it was new.

        A registered (id, version) is immutable: the same document again is a no-op,
        a different one raises DefinitionConflict. `command`, when given, is recorded as
        handled in the same transaction.
        """
        also = command.record() if command is not None else []
        document = definition.to_document()
        vid = version_id(definition.workflow_id, definition.version)
        existing: Any
        try:
            existing = self.repository.get(vid)
        except AggregateNotFoundError:
            existing = None
        if isinstance(existing, WorkflowVersion):
            if _canonical(existing.document) != _canonical(document):
                raise DefinitionConflict(
                    f"workflow {definition.workflow_id!r} version {definition.version!r} is "
                    "already registered with a different definition; give it a new version"
                )
            if also:
                self.save(*also)
            return self.workflow(definition.workflow_id, definition.version), False
        version = WorkflowVersion(
            workflow_id=definition.workflow_id, version=definition.version, document=document
        )
        catalog: Any
        try:
            catalog = self.repository.get(catalog_id(definition.workflow_id))
        except AggregateNotFoundError:
            catalog = WorkflowCatalog(workflow_id=definition.workflow_id)
        catalog.add_version(definition.version)
        self.save(version, catalog, *also)
        compiled = Workflow(definition)
        self._compiled[(definition.workflow_id, definition.version)] = compiled
        return compiled, True

    def handled(self, command_id: str) -> bool:
        """Whether a command with this id was handled (its record is stored)."""
        return command_marker_id(command_id) in self.repository

    def workflow(self, workflow_id: str, version: str | None = None) -> Workflow:
        """The compiled workflow of a version (the newest registered when None)."""
        catalog: Any
        if version is None:
            try:
                catalog = self.repository.get(catalog_id(workflow_id))
            except AggregateNotFoundError:
                raise WorkflowNotFound(f"no workflow {workflow_id!r} is registered") from None
            version = catalog.versions[-1]
        cached = self._compiled.get((workflow_id, version))
        if cached is not None:
            return cached
        stored: Any
        try:
            stored = self.repository.get(version_id(workflow_id, version))
        except AggregateNotFoundError:
            raise WorkflowNotFound(f"workflow {workflow_id!r} has no version {version!r}") from None
        compiled = Workflow(parse_definition(stored.document, f"{workflow_id}@{version}"))
        self._compiled[(workflow_id, version)] = compiled
        return compiled

    def save_events(self, events: list[Any]) -> None:
        """Store already collected events, of any number of aggregates, in one transaction.

        Application.save checks every object it is given against a runtime-checkable
        Protocol, which costs about 6 µs an event on Python 3.11 (a third of the store
        thread's time under load, see docs/benchmarks.md); the committer hands over plain
        events, so they go to the event store directly.
        """
        self.events.put(events)

    # -- executions -----------------------------------------------------------------------

    def new_execution(
        self,
        wf: Workflow,
        data: Any,
        idempotency_key: str | None,
        seed: int,
        now: datetime,
        execution_id: UUID,
    ) -> tuple[Execution, bool]:
        """A new execution of `wf` (not yet saved), or the existing one for the same key.

        Returns the execution and whether it is new. The input is validated against the
        workflow's input_schema first: a bad input raises InputInvalid and nothing is made.
        """
        if idempotency_key is not None:
            if not idempotency_key or len(idempotency_key) > 256:
                raise InputInvalid("an idempotency key must have 1 to 256 characters")
            execution_id = execution_id_for(idempotency_key)
            try:
                return self.execution(execution_id), False
            except ExecutionNotFound:
                pass
        check_input(wf, data)
        ex = Execution.begin(
            execution_id=execution_id,
            workflow_id=wf.workflow_id,
            workflow_version=wf.version,
            input=data,
            idempotency_key=idempotency_key,
            seed=seed,
            deadline=now + timedelta(seconds=wf.definition.timeout),
            at=now,
        )
        return ex, True

    def execution(self, execution_id: UUID) -> Execution:
        """The execution rebuilt from its events."""
        ex: Any
        try:
            ex = self.repository.get(execution_id, projector_func=mutate_each)
        except AggregateNotFoundError:
            raise ExecutionNotFound(f"no execution {execution_id}") from None
        if not isinstance(ex, Execution):
            raise ExecutionNotFound(f"no execution {execution_id}")
        return ex

    def execution_ids(self, *, live_only: bool = False) -> list[UUID]:
        """Execution ids in start order (only those not yet ended with `live_only`: an
        execution retried after it ended is live again until it ends again)."""
        started: dict[UUID, None] = {}
        ended: set[UUID] = set()
        # The log is in commit order, and one execution's events in its version order.
        for topic, originator in self._scan(("ExecutionStarted", "ExecutionRetried", *_ENDS)):
            if topic.endswith(":Execution.ExecutionStarted"):
                started[originator] = None
            elif topic.endswith(":Execution.ExecutionRetried"):
                ended.discard(originator)
            else:
                ended.add(originator)
        return [i for i in started if not (live_only and i in ended)]

    def _scan(self, names: tuple[str, ...]) -> Iterator[tuple[str, UUID]]:
        topics = [f"{Execution.__module__}:Execution.{n}" for n in names]
        start = 1
        while True:
            batch = self.recorder.select_notifications(start, 1000, topics=topics)
            for n in batch:
                yield n.topic, UUID(str(n.originator_id))
            if len(batch) < 1000:
                return
            start = batch[-1].id + 1


def mutate_each(aggregate: Any, events: Iterable[Any]) -> Any:
    """eventsourcing's `project_aggregate` without its per-event `isinstance` check against a
    runtime-checkable Protocol: that check was 42% of a replay (docs/benchmarks.md), and
    every event in the store is an aggregate event that mutates."""
    for domain_event in events:
        aggregate = domain_event.mutate(aggregate)
    return aggregate


def check_input(wf: Workflow, data: Any) -> None:
    """Raise InputInvalid unless `data` is a JSON object within bounds matching input_schema."""
    if not isinstance(data, dict):
        raise InputInvalid(f"the input of {wf.workflow_id!r} must be a JSON object")
    if json_depth(data) > MAX_JSON_DEPTH:
        raise InputInvalid(f"the input nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        size = len(json.dumps(data, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise InputInvalid(f"the input is not JSON: {exc}") from None
    if size > MAX_INPUT_BYTES:
        raise InputInvalid(f"the input is {size} bytes; at most {MAX_INPUT_BYTES} are allowed")
    schema = wf.definition.input_schema
    if schema is not None:
        problem = validate_instance(schema, data)
        if problem is not None:
            raise InputInvalid(
                f"the input does not match {wf.workflow_id!r}'s input_schema: {problem}"
            )
