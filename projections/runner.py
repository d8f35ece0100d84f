"""Catching the projections up with the application's notification log, batch by batch.

eventsourcing's `ProjectionRunner` follows an application through `recorder.subscribe()`,
which its SQLite recorder does not offer; this runner reads the same log with
`select_notifications` instead, and hands each event with its `Tracking` to the same
`Projection.process_event`. Each projection applies a batch in one transaction with its
tracking record, so after a crash a projection resumes after the last batch it committed,
and an event is never applied twice (a second runner racing on the same view fails to
record the position, and its transaction is rolled back).

Used in-process by the query commands (catch up to the head, then read) and as a
background task next to the engine (`follow`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from eventsourcing.application import Application
from eventsourcing.persistence import IntegrityError, Tracking
from eventsourcing.projection import Projection

from flowledger.domain.errors import InputInvalid
from flowledger.projections.performance import PerformanceView
from flowledger.projections.performance_projection import PerformanceProjection
from flowledger.projections.runs import RunsView
from flowledger.projections.runs_projection import RunsProjection
from flowledger.projections.step_cache import StepCacheView
from flowledger.projections.step_cache_projection import StepCacheProjection
from flowledger.projections.store import backend_for, open_view

DEFAULT_BATCH = 500


@dataclass(frozen=True)
class ProjectionStatus:
    """Where a projection is in the application's log."""

    name: str
    position: int  # the notification id of the last event it applied (0: none)
    head: int  # the notification id of the last event stored
    lag: int  # head - position


class Runner:
    """Runs projections over one application's notification log."""

    def __init__(
        self,
        app: Application[Any],
        projections: Sequence[Projection[Any]],
        *,
        batch_size: int = DEFAULT_BATCH,
    ) -> None:
        if batch_size < 1:
            raise InputInvalid("the batch size must be at least 1")
        self.app = app
        self.projections = list(projections)
        self.batch_size = batch_size

    def head(self) -> int:
        """The notification id of the last stored event (0 when the store is empty)."""
        return self.app.recorder.max_notification_id() or 0

    def position(self, projection: Projection[Any]) -> int:
        """The notification id of the last event a projection applied (0: none)."""
        return projection.view.max_tracking_id(self.app.name) or 0

    def status(self) -> list[ProjectionStatus]:
        """Each projection's position against the head of the store."""
        head = self.head()
        found = []
        for projection in self.projections:
            position = self.position(projection)
            found.append(ProjectionStatus(projection.name, position, head, head - position))
        return found

    def select(self, names: Sequence[str] | None) -> list[Projection[Any]]:
        """The projections named (all when None); InputInvalid for an unknown name."""
        if not names:
            return list(self.projections)
        known = {p.name: p for p in self.projections}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise InputInvalid(
                f"no projection {', '.join(map(repr, unknown))} (known: {', '.join(known)})"
            )
        return [known[n] for n in names]

    def catch_up(self, until: int | None = None) -> dict[str, int]:
        """Apply every event up to `until` (the head now, by default); returns how many
        events each projection applied (and committed)."""
        head = self.head() if until is None else until
        applied = {p.name: 0 for p in self.projections}
        while True:
            positions = {p.name: self.position(p) for p in self.projections}
            start = min(positions.values(), default=head)
            if start >= head:
                return applied
            batch = self.app.recorder.select_notifications(
                start, self.batch_size, stop=head, inclusive_of_start=False
            )
            if not batch:
                return applied
            events = [
                (self.app.mapper.to_domain_event(n), Tracking(self.app.name, n.id)) for n in batch
            ]
            for projection in self.projections:
                todo = [(e, t) for e, t in events if t.notification_id > positions[projection.name]]
                if todo:
                    applied[projection.name] += self._apply(projection, todo)

    def _apply(self, projection: Projection[Any], todo: list[tuple[Any, Tracking]]) -> int:
        try:
            with projection.view.transaction():
                for event, tracking in todo:
                    projection.process_event(event, tracking)
        except IntegrityError:
            # Rolled back. If another runner recorded these positions first, its rows
            # stand and the next round starts from where it got to; if nobody did, the
            # error is the projection's own and must stop the runner, not loop it.
            if self.position(projection) < todo[0][1].notification_id:
                raise
            return 0
        return len(todo)

    def rebuild(self, names: Sequence[str] | None = None) -> dict[str, int]:
        """Empty the named projections (all by default) and apply the log from position
        zero; returns how many events each applied."""
        chosen = self.select(names)
        for projection in chosen:
            projection.view.clear(self.app.name)
        applied = self.catch_up()
        return {p.name: applied[p.name] for p in chosen}

    async def follow(self, stop: asyncio.Event, interval: float = 0.5) -> None:
        """Keep the projections caught up until `stop` is set (a background task).

        The store is synchronous: each round runs in a worker thread, never on the loop.
        """
        while not stop.is_set():
            await asyncio.to_thread(self.catch_up)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)


@dataclass(frozen=True)
class Projections:
    """Every projection flowledger keeps, over one application's store."""

    runs: RunsProjection
    performance: PerformanceProjection
    step_cache: StepCacheProjection

    @property
    def all(self) -> list[Projection[Any]]:
        """In the order they are run."""
        return [self.runs, self.performance, self.step_cache]


def open_projections(app: Application[Any]) -> Projections:
    """The run views, the performance history and the step cache over `app`'s store
    (tables created)."""
    backend = backend_for(app)
    # The views are abstract until composed with a backend (open_view does that).
    return Projections(
        runs=RunsProjection(open_view(RunsView, backend)),  # type: ignore[type-abstract]
        performance=PerformanceProjection(
            open_view(PerformanceView, backend)  # type: ignore[type-abstract]
        ),
        step_cache=open_step_cache(app),
    )


def open_step_cache(app: Application[Any]) -> StepCacheProjection:
    """The step cache over `app`'s store (tables created)."""
    view = open_view(StepCacheView, backend_for(app))  # type: ignore[type-abstract]
    return StepCacheProjection(view)


def runner_for(app: Application[Any], *, batch_size: int = DEFAULT_BATCH) -> Runner:
    """A runner of every projection over `app`."""
    return Runner(app, open_projections(app).all, batch_size=batch_size)
