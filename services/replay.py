"""Replay use cases: an execution as it was at a version or a moment, its timeline, and
verification that the current domain code rebuilds every stored history the same way."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from uuid import UUID

from eventsourcing.application import AggregateNotFoundError
from eventsourcing.domain import CanInitAggregate, EventSourcingError

from flowledger.domain import history
from flowledger.domain.errors import ExecutionNotFound, FlowledgerError, InputInvalid
from flowledger.domain.execution import Execution
from flowledger.domain.history import Transition
from flowledger.services.app import FlowledgerApp
from flowledger.services.audit import is_execution_topic, readable, stored_execution_ids

# What a corrupt or tampered event can make an event body raise while it is applied.
_APPLY_ERRORS = (KeyError, TypeError, ValueError, AttributeError, IndexError, EventSourcingError)


# -- as it was ---------------------------------------------------------------------------


def _unreadable(execution_id: UUID, exc: Exception) -> FlowledgerError:
    return FlowledgerError(
        f"execution {execution_id} cannot be rebuilt from its stored events ({exc!r}); "
        "verifying its replay or its hash chain names the event at fault"
    )


def events_of(app: FlowledgerApp, execution_id: UUID, until: int | None = None) -> list[Any]:
    """An execution's events as the domain reads them (decoded, upcast), up to `until`."""
    try:
        events = list(app.repository.event_store.get(execution_id, lte=until))
    except _APPLY_ERRORS as exc:
        raise _unreadable(execution_id, exc) from None
    if not events or not isinstance(events[0], Execution.Event):
        raise ExecutionNotFound(f"no execution {execution_id}")
    return events


def version_at(app: FlowledgerApp, execution_id: UUID, moment: datetime) -> int:
    """The last version recorded at or before `moment` (event timestamps)."""
    version = 0
    events = events_of(app, execution_id)
    for e in events:
        if e.timestamp > moment:
            break
        version = e.originator_version
    if version == 0:
        started = events[0].timestamp.isoformat()
        raise InputInvalid(
            f"execution {execution_id} did not exist yet at {moment.isoformat()} "
            f"(its first event is from {started})"
        )
    return version


def execution_as_of(
    app: FlowledgerApp,
    execution_id: UUID,
    *,
    version: int | None = None,
    moment: datetime | None = None,
) -> Execution:
    """The execution rebuilt up to `version`, or as it was at `moment` (else as it is)."""
    if version is not None and moment is not None:
        raise InputInvalid("give a version or a moment, not both")
    if moment is not None:
        version = version_at(app, execution_id, moment)
    stored = len(events_of(app, execution_id))
    if version is not None and not 1 <= version <= stored:
        raise InputInvalid(
            f"execution {execution_id} has {stored} events: a version must be from 1 to {stored}"
        )
    ex: Any
    try:
        ex = app.repository.get(execution_id, version=version)
    except AggregateNotFoundError:
        raise ExecutionNotFound(f"no execution {execution_id}") from None
    except _APPLY_ERRORS as exc:
        raise _unreadable(execution_id, exc) from None
    return ex  # type: ignore[no-any-return]


def timeline(app: FlowledgerApp, execution_id: UUID, until: int | None = None) -> list[Transition]:
    """The ordered moves of the execution and its steps, with their timestamps."""
    return history.fold(events_of(app, execution_id, until)).transitions


def transition_document(t: Transition) -> dict[str, Any]:
    """A timeline entry as JSON."""
    return {
        "version": t.version,
        "timestamp": t.timestamp.isoformat() if t.timestamp is not None else None,
        "event": t.event_type,
        "step": t.key,
        "from": t.before,
        "to": t.after,
        "attempt": t.attempt,
        "error": t.error,
        "note": t.note,
    }


# -- verification --------------------------------------------------------------------------


@dataclass(frozen=True)
class RecordedExecution:
    """The state recorded for an execution elsewhere than its events, to hold a replay to.

    The run views (projections/) record it; until they are plugged in, `rebuilt_view`
    gives the execution as the repository rebuilds it.
    """

    version: int
    status: str
    steps: dict[str, str]  # step key -> status
    attempts: dict[str, int] = field(default_factory=dict)  # step key -> attempts


RecordedView = Callable[[FlowledgerApp, UUID], RecordedExecution | None]


def recorded_from(ex: Execution) -> RecordedExecution:
    """The recorded-state shape of an execution aggregate."""
    return RecordedExecution(
        version=ex.version,
        status=ex.status.value,
        steps={k: r.status.value for k, r in ex.steps.items()},
        attempts={k: r.attempt for k, r in ex.steps.items()},
    )


def rebuilt_view(app: FlowledgerApp, execution_id: UUID) -> RecordedExecution | None:
    """The recorded state until projections exist: the repository's rebuilt execution."""
    try:
        return recorded_from(app.execution(execution_id))
    except _APPLY_ERRORS:
        return None


@dataclass(frozen=True)
class Divergence:
    """A place where a stored history and the current domain code disagree."""

    execution_id: str
    version: int | None
    event_type: str | None
    message: str

    def __str__(self) -> str:
        where = f"version {self.version} ({self.event_type})" if self.version else "history"
        return f"execution {self.execution_id} {where}: {self.message}"


def verify_replay(
    app: FlowledgerApp, execution_id: UUID, recorded: RecordedView = rebuilt_view
) -> list[Divergence]:
    """Replay one stored history through the current domain code, event by event.

    Every move must be in the transition tables (domain/history.py); after each event
    the aggregate must say what the tables say about what that event moved; at the end
    the rebuilt state must equal the recorded one. Each divergence names its event.
    """
    eid = str(execution_id)
    out: list[Divergence] = []
    events = _decoded_events(app, execution_id, out)
    folded = history.History()
    ex: Any = None
    broken = False
    for e in events:
        name = type(e).__name__
        version = int(e.originator_version)
        before = len(folded.violations)
        moves = folded.apply(e)
        out.extend(
            Divergence(eid, v.version, v.event_type, v.message) for v in folded.violations[before:]
        )
        if broken:
            continue
        if (ex is None) != isinstance(e, CanInitAggregate):
            message = "cannot be applied: " + (
                "the history does not start by creating the execution"
                if ex is None
                else "the execution was already created"
            )
            out.append(Divergence(eid, version, name, message))
            broken = True
            continue
        try:
            ex = e.mutate(ex)
        except _APPLY_ERRORS as exc:
            out.append(Divergence(eid, version, name, f"cannot be applied: {exc!r}"))
            broken = True
            continue
        out.extend(_compare_moves(eid, version, name, ex, folded, moves))
    if ex is None or broken:
        return out
    view = recorded(app, execution_id)
    last = events[-1]
    if view is None:
        out.append(Divergence(eid, None, None, "no recorded state to compare the replay with"))
    else:
        for message in _compare_recorded(recorded_from(ex), view):
            out.append(Divergence(eid, last.originator_version, type(last).__name__, message))
    return out


def verify_all(
    app: FlowledgerApp, recorded: RecordedView = rebuilt_view
) -> Iterator[tuple[UUID, list[Divergence]]]:
    """Verify the replay of every stored execution."""
    for execution_id in stored_execution_ids(app):
        yield execution_id, verify_replay(app, execution_id, recorded)


def _decoded_events(app: FlowledgerApp, execution_id: UUID, out: list[Divergence]) -> list[Any]:
    """The execution's events, one stored record at a time, so one unreadable event is
    named instead of hiding the rest."""
    stored = app.recorder.select_events(execution_id)
    events: list[Any] = []
    for s in stored:
        try:
            events.append(app.mapper.to_domain_event(readable(s)))
        except (*_APPLY_ERRORS, ImportError) as exc:
            name = s.topic.rpartition(".")[2]
            message = f"cannot be read by the current code: {exc!r}"
            out.append(Divergence(str(execution_id), s.originator_version, name, message))
    if not any(is_execution_topic(s.topic) for s in stored):
        raise ExecutionNotFound(f"no execution {execution_id}")
    return events


def _compare_moves(
    eid: str,
    version: int,
    name: str,
    ex: Execution,
    folded: history.History,
    moves: list[Transition],
) -> list[Divergence]:
    """The aggregate must say what the tables say about whatever this event moved."""
    out = []
    if ex.status != folded.status:
        out.append(
            Divergence(
                eid,
                version,
                name,
                f"the aggregate is {ex.status.value}, the tables say {folded.status.value}",
            )
        )
    for key in {m.key for m in moves if m.key is not None}:
        said = folded.steps.get(key)
        has = ex.step_status(key)
        if said is not None and has != said:
            out.append(
                Divergence(
                    eid,
                    version,
                    name,
                    f"step {key!r} is {has.value} in the aggregate, {said.value} by the tables",
                )
            )
    return out


def _compare_recorded(rebuilt: RecordedExecution, recorded: RecordedExecution) -> list[str]:
    problems = []
    if rebuilt.version != recorded.version:
        problems.append(f"replayed {rebuilt.version} events, {recorded.version} recorded")
    if rebuilt.status != recorded.status:
        problems.append(f"replay says {rebuilt.status}, the record says {recorded.status}")
    for key in sorted(rebuilt.steps.keys() | recorded.steps.keys()):
        a, b = rebuilt.steps.get(key), recorded.steps.get(key)
        if a != b:
            problems.append(f"step {key!r}: replay says {a}, the record says {b}")
        elif key in recorded.attempts and rebuilt.attempts.get(key) != recorded.attempts[key]:
            problems.append(
                f"step {key!r}: replay counts {rebuilt.attempts.get(key)} attempts, "
                f"the record {recorded.attempts[key]}"
            )
    return problems
