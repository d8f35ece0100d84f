"""Replay use cases: an execution as it was at a version or a moment, its timeline, and
verification that the current domain code rebuilds every stored history the same way,
and to the state the run view records."""

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
from flowledger.projections.runner import Runner, open_projections
from flowledger.services.app import FlowledgerApp, mutate_each
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
        ex = app.repository.get(execution_id, version=version, projector_func=mutate_each)
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

# How many times a replay reads on when the run view has counted events stored after the
# replay read the history (an engine still writing): each round reads only the new ones.
_CATCH_UP_ROUNDS = 5


@dataclass(frozen=True)
class RecordedExecution:
    """An execution as the run view (projections/runs.py) records it, to hold a replay to."""

    version: int  # the events the view applied
    status: str
    steps: dict[str, str]  # step key -> status
    attempts: dict[str, int] = field(default_factory=dict)  # step key -> attempts


RecordedView = Callable[[UUID], RecordedExecution | None]
"""The recorded state of an execution (None if there is none); FlowledgerError if it
cannot be read."""


def recorded_from(ex: Execution) -> RecordedExecution:
    """The recorded-state shape of an execution aggregate."""
    return RecordedExecution(
        version=ex.version,
        status=ex.status.value,
        steps={k: r.status.value for k, r in ex.steps.items()},
        attempts={k: r.attempt for k, r in ex.steps.items()},
    )


class RunView:
    """The run view as a RecordedView: caught up with the store's head, then read."""

    def __init__(self, app: FlowledgerApp) -> None:
        runs = open_projections(app).runs
        self._view = runs.view
        # The run view alone: another projection that cannot fold some event must not
        # stop this one (each keeps its own position).
        self._runner = Runner(app, [runs])
        self._stuck: FlowledgerError | None = None

    def __call__(self, execution_id: UUID) -> RecordedExecution | None:
        if self._stuck is not None:
            raise self._stuck
        try:
            self._runner.catch_up()
        except (*_APPLY_ERRORS, ImportError) as exc:
            # An event the projection cannot read or fold stops it there (the batch rolls
            # back): what the view holds may be behind, so nothing is held to it.
            self._stuck = FlowledgerError(f"the run view cannot be brought up to date: {exc!r}")
            raise self._stuck from None
        detail = self._view.execution(str(execution_id))
        if detail is None:
            return None
        return RecordedExecution(
            version=detail.event_count,
            status=detail.summary.status,
            steps={s.key: s.status for s in detail.steps},
            attempts={s.key: s.attempts for s in detail.steps},
        )


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
    app: FlowledgerApp, execution_id: UUID, recorded: RecordedView | None = None
) -> list[Divergence]:
    """Replay one stored history through the current domain code, event by event.

    Every move must be in the transition tables (domain/history.py); after each event
    the aggregate must say what the tables say about what that event moved; at the end
    the rebuilt state must equal the recorded one (the run view's, unless `recorded`
    says otherwise). Each divergence names its event.
    """
    replay = _Replay(str(execution_id))
    stored, read_to = _decoded_events(app, execution_id, replay.out)
    if read_to is None:
        raise ExecutionNotFound(f"no execution {execution_id}")
    replay.apply(stored)
    if replay.ex is None or replay.broken:
        return replay.out
    view = recorded if recorded is not None else RunView(app)
    for _ in range(_CATCH_UP_ROUNDS):
        if replay.broken:
            return replay.out
        try:
            record = view(execution_id)
        except FlowledgerError as exc:
            replay.diverges(None, None, f"not compared with the run view: {exc}")
            return replay.out
        if record is None or record.version <= replay.ex.version:
            break
        # The view has counted more events than were replayed: if they were stored since
        # the history was read, replay them too and ask again; if not, the view is wrong.
        more, newer = _decoded_events(app, execution_id, replay.out, after=read_to)
        if newer is None:
            break
        read_to = newer
        replay.apply(more)
    else:
        replay.diverges(
            None,
            None,
            f"still being written to after {_CATCH_UP_ROUNDS} reads: "
            "not compared with the run view (verify it again)",
        )
        return replay.out
    if record is None:
        replay.diverges(None, None, "the run view has no record of this execution")
        return replay.out
    last = replay.last
    for message in _compare_recorded(recorded_from(replay.ex), record):
        replay.diverges(last.originator_version, type(last).__name__, message)
    return replay.out


def verify_all(
    app: FlowledgerApp, recorded: RecordedView | None = None
) -> Iterator[tuple[UUID, list[Divergence]]]:
    """Verify the replay of every stored execution (held to one run view, by default)."""
    view = recorded if recorded is not None else RunView(app)
    for execution_id in stored_execution_ids(app):
        yield execution_id, verify_replay(app, execution_id, view)


class _Replay:
    """One history replayed event by event: the aggregate, the tables' fold, and what
    diverged so far."""

    def __init__(self, execution_id: str) -> None:
        self.eid = execution_id
        self.out: list[Divergence] = []
        self.folded = history.History()
        self.ex: Any = None
        self.broken = False  # an event could not be applied: nothing after it is checked
        self.last: Any = None  # the last event applied

    def diverges(self, version: int | None, event_type: str | None, message: str) -> None:
        self.out.append(Divergence(self.eid, version, event_type, message))

    def apply(self, events: list[Any]) -> None:
        for e in events:
            name = type(e).__name__
            version = int(e.originator_version)
            before = len(self.folded.violations)
            moves = self.folded.apply(e)
            for v in self.folded.violations[before:]:
                self.diverges(v.version, v.event_type, v.message)
            if self.broken:
                continue
            if (self.ex is None) != isinstance(e, CanInitAggregate):
                self.diverges(
                    version,
                    name,
                    "cannot be applied: "
                    + (
                        "the history does not start by creating the execution"
                        if self.ex is None
                        else "the execution was already created"
                    ),
                )
                self.broken = True
                continue
            try:
                self.ex = e.mutate(self.ex)
            except _APPLY_ERRORS as exc:
                self.diverges(version, name, f"cannot be applied: {exc!r}")
                self.broken = True
                continue
            self.last = e
            self.out.extend(_compare_moves(self.eid, version, name, self.ex, self.folded, moves))


def _decoded_events(
    app: FlowledgerApp, execution_id: UUID, out: list[Divergence], after: int | None = None
) -> tuple[list[Any], int | None]:
    """The execution's events (after version `after`), one stored record at a time, so
    one unreadable event is named instead of hiding the rest; and the last version read
    (None if there is none, or none of an Execution)."""
    stored = app.recorder.select_events(execution_id, gt=after)
    events: list[Any] = []
    for s in stored:
        try:
            events.append(app.mapper.to_domain_event(readable(s)))
        except (*_APPLY_ERRORS, ImportError) as exc:
            name = s.topic.rpartition(".")[2]
            message = f"cannot be read by the current code: {exc!r}"
            out.append(Divergence(str(execution_id), s.originator_version, name, message))
    if not any(is_execution_topic(s.topic) for s in stored):
        return events, None
    return events, max(s.originator_version for s in stored)


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
    """What the run view records differently from the replay, field by field."""
    problems = []
    if rebuilt.version != recorded.version:
        problems.append(
            f"event count: replayed {rebuilt.version}, the run view counted {recorded.version}"
        )
    if rebuilt.status != recorded.status:
        problems.append(
            f"status: replay says {rebuilt.status}, the run view says {recorded.status}"
        )
    for key in sorted(rebuilt.steps.keys() | recorded.steps.keys()):
        a, b = rebuilt.steps.get(key), recorded.steps.get(key)
        if a is None or b is None:
            problems.append(
                f"step {key!r}: the run view has no such step (replay says {a})"
                if b is None
                else f"step {key!r}: the replay has no such step (the run view says {b})"
            )
            continue
        if a != b:
            problems.append(f"step {key!r} status: replay says {a}, the run view says {b}")
        if key in recorded.attempts and rebuilt.attempts.get(key) != recorded.attempts[key]:
            problems.append(
                f"step {key!r} attempts: replay counts {rebuilt.attempts.get(key)}, "
                f"the run view {recorded.attempts[key]}"
            )
    return problems
