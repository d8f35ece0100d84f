"""The read side: catch the projections up with the store, then read the views.

The CLI's query commands use this as it is (each query first applies what was stored
since); a process that keeps the projections caught up in the background (`Runner.follow`
next to the engine) builds it with `catch_up=False` and reads the views as they are.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from uuid import UUID

from flowledger.domain.errors import ExecutionNotFound, WorkflowNotFound
from flowledger.projections.performance import Performance
from flowledger.projections.performance_series import (
    DEFAULT_BUCKETS,
    DurationSeries,
    check_buckets,
    duration_series,
    series_samples,
)
from flowledger.projections.runner import (
    DEFAULT_BATCH,
    ProjectionStatus,
    Runner,
    open_projections,
)
from flowledger.projections.runs import (
    ExecutionDetail,
    ExecutionFilter,
    InboxTask,
    Page,
    TimelineEntry,
)
from flowledger.services.app import FlowledgerApp
from flowledger.services.ports import Clock, SystemClock


class Queries:
    """Run views, performance history and projection status of one application."""

    def __init__(
        self,
        app: FlowledgerApp,
        clock: Clock | None = None,
        *,
        catch_up: bool = True,
        batch_size: int = DEFAULT_BATCH,
    ) -> None:
        self.projections = open_projections(app)
        self.runner = Runner(app, self.projections.all, batch_size=batch_size)
        self.clock = clock or SystemClock()
        self._catch_up = catch_up

    def fresh(self) -> None:
        """Apply what was stored since the projections last ran (unless told not to)."""
        if self._catch_up:
            self.runner.catch_up()

    def executions(
        self, where: ExecutionFilter, limit: int = 50, cursor: str | None = None
    ) -> Page:
        """A page of executions matching the filter."""
        self.fresh()
        return self.projections.runs.view.executions(where, limit, cursor)

    def execution(self, execution_id: UUID) -> ExecutionDetail:
        """An execution and each of its step instances."""
        self.fresh()
        detail = self.projections.runs.view.execution(str(execution_id))
        if detail is None:
            raise ExecutionNotFound(f"no execution {execution_id}")
        return detail

    def timeline(self, execution_id: UUID) -> list[TimelineEntry]:
        """An execution's transitions, in order, with their times."""
        self.execution(execution_id)  # caught up, and known
        return self.projections.runs.view.timeline(str(execution_id))

    def inbox(self, assignee: str | None = None) -> list[InboxTask]:
        """Human tasks waiting for an answer (an assignee's, or all)."""
        self.fresh()
        return self.projections.runs.view.inbox(assignee)

    def performance(
        self, workflow_id: str, version: str | None = None, window: timedelta | None = None
    ) -> Performance:
        """A workflow's figures over the last `window` (all time when None)."""
        self.fresh()
        self._known(workflow_id, version)
        since = self.clock.now() - window if window is not None else None
        return self.projections.performance.view.performance(workflow_id, version, since)

    def duration_series(
        self, workflow_id: str, version: str | None = None, buckets: int = DEFAULT_BUCKETS
    ) -> DurationSeries:
        """A workflow's end-to-end duration percentiles per bucket of start time, over its
        executions that ended last (one version, or all when None)."""
        check_buckets(buckets)
        self.fresh()
        self._known(workflow_id, version)
        samples = series_samples(self.projections.performance.view, workflow_id, version)
        return duration_series(workflow_id, version, samples, buckets)

    def _known(self, workflow_id: str, version: str | None) -> None:
        """Raise WorkflowNotFound unless the workflow (and the version, if named) is known."""
        versions = self.projections.performance.view.versions(workflow_id)
        if not versions:
            raise WorkflowNotFound(f"no workflow {workflow_id!r} is registered")
        if version is not None and version not in versions:
            raise WorkflowNotFound(f"workflow {workflow_id!r} has no version {version!r}")

    def status(self) -> list[ProjectionStatus]:
        """Each projection's position against the head of the store."""
        return self.runner.status()

    def rebuild(self, names: Sequence[str] | None = None) -> dict[str, int]:
        """Rebuild projections (all by default) from position zero; returns how many events
        each applied."""
        return self.runner.rebuild(names)
