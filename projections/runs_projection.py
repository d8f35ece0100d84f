"""How events become run views: `RunsProjection` folds registrations and execution events
into the tables of `RunsView` (projections/runs.py), mirroring what the Execution
aggregate's events assign, one transaction per event (or per batch) with its tracking
record.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime
from typing import Any

from eventsourcing.persistence import Tracking
from eventsourcing.projection import Projection

from flowledger.domain.states import ExecutionStatus as X
from flowledger.domain.states import StepStatus as S
from flowledger.projections.events import (
    EXECUTION_PREFIX,
    VERSION_REGISTERED,
    agent_of,
    attr,
    canonical,
    event_name,
    iso,
    micros,
    named_agent,
    step_types,
    tags,
)
from flowledger.projections.runs import JSON, RunsView
from flowledger.projections.store import Row, Tx

# Event attributes a timeline entry shows (payloads such as input, result and patch stay
# in the events; `replay` prints those).
_DETAIL = (
    "attempt",
    "kind",
    "owner",
    "purpose",
    "fire_at",
    "timer_id",
    "assignee",
    "delay",
    "error",
    "reason",
    "handler_key",
    "handler_id",
    "branch",
    "selected",
    "skipped",
    "index",
    "final_status",
    "ok",
    "reset",
    "resumed",
    "agent",
    "route",
    "cache_key",
    "source_execution_id",
    "source_step_key",
    "cached_at",
)


Handler = Callable[["RunsProjection", Tx, Any, Row], tuple[str | None, str | None, str | None]]


class RunsProjection(Projection[RunsView]):
    """Folds workflow registrations and execution events into the run views."""

    name = "runs"

    def __init__(self, view: RunsView) -> None:
        super().__init__(view)
        self._types: dict[tuple[str, str, str], str] = {}  # (workflow, version, step) -> type

    def process_event(self, domain_event: Any, tracking: Tracking) -> None:
        """Apply one event and record its position, in one transaction."""
        name = event_name(domain_event)
        with self.view.transaction() as tx:
            tx.track(tracking)
            if name == VERSION_REGISTERED:
                self._version_registered(tx, domain_event, tracking.notification_id)
            elif name.startswith(EXECUTION_PREFIX):
                short = name.removeprefix(EXECUTION_PREFIX)
                self._execution_event(tx, domain_event, short, tracking.notification_id)
            # other events (catalogs, later kinds) change no run view

    def _version_registered(self, tx: Tx, e: Any, position: int) -> None:
        document = attr(e, "document") or {}
        workflow_id, version = e.workflow_id, e.version
        found = tags(document)
        tx.execute(
            "INSERT INTO runs_versions (workflow_id, version, tags, position) "
            "VALUES (:wf, :v, :tags, :position) ON CONFLICT (workflow_id, version) DO NOTHING",
            wf=workflow_id,
            v=version,
            tags=json.dumps(found),
            position=position,
        )
        for tag in found:
            tx.execute(
                "INSERT INTO runs_version_tags (tag, workflow_id, version) VALUES (:tag, :wf, :v) "
                "ON CONFLICT (tag, workflow_id, version) DO NOTHING",
                tag=tag,
                wf=workflow_id,
                v=version,
            )
        for step_id, kind in step_types(document).items():
            tx.execute(
                "INSERT INTO runs_version_steps (workflow_id, version, step_id, type) "
                "VALUES (:wf, :v, :step, :type) "
                "ON CONFLICT (workflow_id, version, step_id) DO NOTHING",
                wf=workflow_id,
                v=version,
                step=step_id,
                type=kind,
            )

    def _execution_event(self, tx: Tx, e: Any, name: str, position: int) -> None:
        eid = str(e.originator_id)
        if name == "ExecutionStarted":
            self._started(tx, e, eid, position)
        ex = tx.one(
            "SELECT workflow_id, version, status FROM runs_executions WHERE execution_id = :eid",
            eid=eid,
        )
        if ex is None:
            return  # an execution whose start is not in this log: nothing to attach it to
        ex["execution_id"] = eid
        handler = _HANDLERS.get(name)
        step_key, before, after = handler(self, tx, e, ex) if handler else (None, None, None)
        if name == "ExecutionStarted":
            before, after = X.PENDING.value, X.RUNNING.value
        detail = _detail(e)
        if name == "ExecutionRetried":
            detail["deadline"] = iso(e.deadline)
        at = e.at
        tx.execute(
            "INSERT INTO runs_timeline (execution_id, seq, position, at, at_us, event, step_key, "
            "status_from, status_to, detail) VALUES (:eid, :seq, :position, :at, :at_us, :event, "
            ":key, :before, :after, :detail)",
            eid=eid,
            seq=e.originator_version,
            position=position,
            at=iso(at),
            at_us=micros(at),
            event=name,
            key=step_key,
            before=before,
            after=after,
            detail=canonical(detail),
        )
        tx.execute(
            "UPDATE runs_executions SET event_count = event_count + 1 WHERE execution_id = :eid",
            eid=eid,
        )

    def _started(self, tx: Tx, e: Any, eid: str, position: int) -> None:
        at = e.at
        tx.execute(
            "INSERT INTO runs_executions (execution_id, position, workflow_id, version, status, "
            "reason, idempotency_key, started_at, started_us, finished_at, finished_us, deadline, "
            "event_count) VALUES (:eid, :position, :wf, :v, :status, NULL, :key, :at, :at_us, "
            "NULL, NULL, :deadline, 0)",
            eid=eid,
            position=position,
            wf=e.workflow_id,
            v=e.workflow_version,
            status=X.RUNNING.value,
            key=attr(e, "idempotency_key"),
            at=iso(at),
            at_us=micros(at),
            deadline=iso(attr(e, "deadline")),
        )

    # -- execution moves -----------------------------------------------------------------

    def _move_execution(
        self, tx: Tx, ex: Row, status: X, at: datetime | None, reason: str | None = None
    ) -> tuple[str | None, str | None, str | None]:
        sets = ["status = :status"]
        params: dict[str, Any] = {"status": status.value, "eid": ex["execution_id"]}
        if reason is not None:
            sets.append("reason = :reason")
            params["reason"] = reason
        if at is not None:
            sets += ["finished_at = :at", "finished_us = :at_us"]
            params |= {"at": iso(at), "at_us": micros(at)}
            # An ended execution asks nobody anything any more.
            tx.execute("DELETE FROM runs_inbox WHERE execution_id = :eid", eid=ex["execution_id"])
        tx.execute(
            f"UPDATE runs_executions SET {', '.join(sets)} WHERE execution_id = :eid", **params
        )
        return None, ex["status"], status.value

    def _retried(self, tx: Tx, e: Any, ex: Row) -> tuple[str | None, str | None, str | None]:
        """The execution runs again: as the aggregate does, reset step instances are pending
        (their attempts counted on), resumed containers running, none of them finished."""
        eid = ex["execution_id"]
        tx.execute(
            "UPDATE runs_executions SET status = :status, reason = NULL, finished_at = NULL, "
            "finished_us = NULL, deadline = :deadline WHERE execution_id = :eid",
            status=X.RUNNING.value,
            deadline=iso(e.deadline),
            eid=eid,
        )
        moves = [(key, S.PENDING) for key in e.reset] + [(key, S.RUNNING) for key in e.resumed]
        for key, status in moves:
            tx.execute(
                "UPDATE runs_steps SET status = :status, finished_at = NULL, finished_us = NULL "
                "WHERE execution_id = :eid AND key = :key",
                status=status.value,
                eid=eid,
                key=key,
            )
        return None, ex["status"], X.RUNNING.value

    # -- step moves ----------------------------------------------------------------------

    def _step(self, tx: Tx, ex: Row, key: str) -> Row | None:
        return tx.one(
            "SELECT status, seq FROM runs_steps WHERE execution_id = :eid AND key = :key",
            eid=ex["execution_id"],
            key=key,
        )

    def _step_type(self, tx: Tx, ex: Row, step_id: str) -> str | None:
        # A registered version never changes: what it says a step is can be kept.
        known = (ex["workflow_id"], ex["version"], step_id)
        found = self._types.get(known)
        if found is None:
            row = tx.one(
                "SELECT type FROM runs_version_steps "
                "WHERE workflow_id = :wf AND version = :v AND step_id = :step",
                wf=ex["workflow_id"],
                v=ex["version"],
                step=step_id,
            )
            found = row["type"] if row else None
            if found is not None:
                self._types[known] = found
        return found

    def _attempt(
        self, tx: Tx, e: Any, ex: Row, status: S
    ) -> tuple[str | None, str | None, str | None]:
        """StepStarted / StepWaiting: the next attempt of a step instance begins."""
        at, key = e.at, e.key
        row = self._step(tx, ex, key)
        step_type = self._step_type(tx, ex, e.step_id)
        params = {
            "eid": ex["execution_id"],
            "key": key,
            "status": status.value,
            "attempts": e.attempt,
            "agent": agent_of(e, step_type),
            "at": iso(at),
            "at_us": micros(at),
        }
        waiting = status is S.WAITING
        if row is None:
            tx.execute(
                "INSERT INTO runs_steps (execution_id, key, seq, sub, step_id, type, kind, owner, "
                "status, attempts, agent, started_at, started_us, last_attempt_started_at, "
                "last_attempt_started_us, assignee) VALUES (:eid, :key, :seq, 0, :step, :type, "
                ":kind, :owner, :status, :attempts, :agent, :at, :at_us, :at, :at_us, :assignee)",
                seq=e.originator_version,
                step=e.step_id,
                type=step_type,
                kind=attr(e, "kind") or "step",
                owner=attr(e, "owner"),
                assignee=attr(e, "assignee") if waiting else None,
                **params,
            )
        else:
            assignee = ", assignee = :assignee" if waiting else ""
            # A step a retry reset after it was skipped starts for the first time now.
            tx.execute(
                "UPDATE runs_steps SET status = :status, attempts = :attempts, agent = :agent, "
                "started_at = COALESCE(started_at, :at), "
                "started_us = COALESCE(started_us, :at_us), "
                f"last_attempt_started_at = :at, last_attempt_started_us = :at_us{assignee} "
                "WHERE execution_id = :eid AND key = :key",
                **params,
                **({"assignee": attr(e, "assignee")} if waiting else {}),
            )
        if waiting and attr(e, "purpose") == "human_deadline":
            tx.execute(
                "INSERT INTO runs_inbox (execution_id, key, step_id, assignee, workflow_id, "
                "version, since, since_us, deadline) VALUES (:eid, :key, :step, :assignee, :wf, "
                ":v, :at, :at_us, :deadline) ON CONFLICT (execution_id, key) DO UPDATE SET "
                "assignee = excluded.assignee, since = excluded.since, "
                "since_us = excluded.since_us, deadline = excluded.deadline",
                eid=ex["execution_id"],
                key=key,
                step=e.step_id,
                assignee=attr(e, "assignee"),
                wf=ex["workflow_id"],
                v=ex["version"],
                at=iso(at),
                at_us=micros(at),
                deadline=iso(attr(e, "fire_at")),
            )
        return key, row["status"] if row else S.PENDING.value, status.value

    def _update_step(
        self, tx: Tx, ex: Row, key: str, status: S, at: datetime | None = None, **fields: Any
    ) -> tuple[str | None, str | None, str | None]:
        """Move an existing step instance; one the view has no row for is left alone."""
        row = self._step(tx, ex, key)
        if row is None:
            return key, None, None
        sets = ["status = :status"] + [f"{name} = :{name}" for name in fields]
        params: dict[str, Any] = {"eid": ex["execution_id"], "key": key, "status": status.value}
        params |= fields
        if at is not None:
            sets += ["finished_at = :at", "finished_us = :at_us"]
            params |= {"at": iso(at), "at_us": micros(at)}
        tx.execute(
            f"UPDATE runs_steps SET {', '.join(sets)} WHERE execution_id = :eid AND key = :key",
            **params,
        )
        if row["status"] == S.WAITING.value and status is not S.WAITING:
            tx.execute(
                "DELETE FROM runs_inbox WHERE execution_id = :eid AND key = :key",
                eid=ex["execution_id"],
                key=key,
            )
        return key, row["status"], status.value

    def _replace_step(
        self,
        tx: Tx,
        e: Any,
        ex: Row,
        key: str,
        step_id: str,
        status: S,
        error: JSON | None,
        sub: int = 0,
    ) -> str:
        """A fresh record for a step instance (a skip, or a condition's choice); `sub`
        orders the records one event makes. Only a step instance a retry reset has a row
        already: its attempts count on (a choice is one more)."""
        row = tx.one(
            "SELECT status, attempts FROM runs_steps WHERE execution_id = :eid AND key = :key",
            eid=ex["execution_id"],
            key=key,
        )
        at = e.at
        started = status is not S.SKIPPED
        attempts = (int(row["attempts"]) if row else 0) + (1 if started else 0)
        tx.execute(
            "INSERT INTO runs_steps (execution_id, key, seq, sub, step_id, type, kind, owner, "
            "status, attempts, agent, started_at, started_us, last_attempt_started_at, "
            "last_attempt_started_us, finished_at, finished_us, last_error, recovered_by, "
            "assignee) VALUES (:eid, :key, :seq, :sub, :step, :type, 'step', NULL, :status, "
            ":attempts, NULL, :start, :start_us, :start, :start_us, :at, :at_us, :error, NULL, "
            "NULL) ON CONFLICT (execution_id, key) DO UPDATE SET step_id = excluded.step_id, "
            "type = excluded.type, kind = excluded.kind, owner = NULL, status = excluded.status, "
            "attempts = excluded.attempts, agent = NULL, started_at = excluded.started_at, "
            "started_us = excluded.started_us, "
            "last_attempt_started_at = excluded.last_attempt_started_at, "
            "last_attempt_started_us = excluded.last_attempt_started_us, "
            "finished_at = excluded.finished_at, finished_us = excluded.finished_us, "
            "last_error = excluded.last_error, recovered_by = NULL, assignee = NULL",
            eid=ex["execution_id"],
            key=key,
            seq=e.originator_version,
            sub=sub,
            step=step_id,
            type=self._step_type(tx, ex, step_id),
            status=status.value,
            attempts=attempts,
            start=iso(at) if started else None,
            start_us=micros(at) if started else None,
            at=iso(at),
            at_us=micros(at),
            error=canonical(error) if error is not None else None,
        )
        if row is not None and row["status"] == S.WAITING.value:
            tx.execute(
                "DELETE FROM runs_inbox WHERE execution_id = :eid AND key = :key",
                eid=ex["execution_id"],
                key=key,
            )
        return row["status"] if row else S.PENDING.value

    def _served_from_cache(
        self, tx: Tx, e: Any, ex: Row
    ) -> tuple[str | None, str | None, str | None]:
        """Completed with an earlier success's result: no agent ran it; where it came from."""
        moved = self._update_step(tx, ex, e.key, S.COMPLETED, e.at, agent=None)
        tx.execute(
            "INSERT INTO runs_cached (execution_id, key, source_execution_id, source_step_key, "
            "cached_at) VALUES (:eid, :key, :source, :source_key, :cached_at) "
            "ON CONFLICT (execution_id, key) DO UPDATE SET "
            "source_execution_id = excluded.source_execution_id, "
            "source_step_key = excluded.source_step_key, cached_at = excluded.cached_at",
            eid=ex["execution_id"],
            key=e.key,
            source=e.source_execution_id,
            source_key=e.source_step_key,
            cached_at=iso(e.cached_at),
        )
        return moved

    def _skipped(self, tx: Tx, e: Any, ex: Row) -> tuple[str | None, str | None, str | None]:
        error = {"type": "Skipped", "message": e.reason, "retryable": False}
        before = self._replace_step(tx, e, ex, e.key, e.step_id, S.SKIPPED, error)
        return e.key, before, S.SKIPPED.value

    def _branch_selected(
        self, tx: Tx, e: Any, ex: Row
    ) -> tuple[str | None, str | None, str | None]:
        before = self._replace_step(tx, e, ex, e.key, e.step_id, S.COMPLETED, None)
        for sub, (skipped_key, skipped_id) in enumerate(e.skipped, start=1):
            error = {
                "type": "Skipped",
                "message": f"branch not taken by {e.step_id!r}",
                "retryable": False,
            }
            self._replace_step(tx, e, ex, skipped_key, skipped_id, S.SKIPPED, error, sub)
        return e.key, before, S.COMPLETED.value


def _detail(e: Any) -> JSON:
    detail: JSON = {}
    for name in _DETAIL:
        value = attr(e, name)
        if value is not None:
            detail[name] = iso(value) if isinstance(value, datetime) else value
    return detail


def _cancel_error(e: Any) -> str:
    return canonical({"type": "Cancelled", "message": e.reason, "retryable": False})


def _timer_step(e: Any) -> tuple[str | None, str | None, str | None]:
    # A timer id is "<step key>#<purpose><attempt>" (domain/execution.py).
    return str(e.timer_id).rsplit("#", 1)[0], None, None


_HANDLERS: dict[str, Handler] = {
    "ExecutionWaiting": lambda p, tx, e, ex: p._move_execution(tx, ex, X.WAITING, None),
    "ExecutionResumed": lambda p, tx, e, ex: p._move_execution(tx, ex, X.RUNNING, None),
    "CompensationStarted": lambda p, tx, e, ex: p._move_execution(
        tx, ex, X.COMPENSATING, None, e.reason
    ),
    "ExecutionCompleted": lambda p, tx, e, ex: p._move_execution(tx, ex, X.COMPLETED, e.at),
    "ExecutionFailed": lambda p, tx, e, ex: p._move_execution(tx, ex, X.FAILED, e.at, e.reason),
    "ExecutionTimedOut": lambda p, tx, e, ex: p._move_execution(
        tx, ex, X.TIMED_OUT, e.at, e.reason
    ),
    "ExecutionCancelled": lambda p, tx, e, ex: p._move_execution(
        tx, ex, X.CANCELLED, e.at, e.reason
    ),
    "ExecutionRetried": lambda p, tx, e, ex: p._retried(tx, e, ex),
    "StepStarted": lambda p, tx, e, ex: p._attempt(tx, e, ex, S.RUNNING),
    "StepWaiting": lambda p, tx, e, ex: p._attempt(tx, e, ex, S.WAITING),
    "StepSucceeded": lambda p, tx, e, ex: p._update_step(
        tx, ex, e.key, S.COMPLETED, e.at, **named_agent(e)
    ),
    "HumanTaskCompleted": lambda p, tx, e, ex: p._update_step(tx, ex, e.key, S.COMPLETED, e.at),
    "StepServedFromCache": lambda p, tx, e, ex: p._served_from_cache(tx, e, ex),
    "StepFailed": lambda p, tx, e, ex: p._update_step(
        tx, ex, e.key, S.FAILED, e.at, last_error=canonical(e.error), **named_agent(e)
    ),
    "StepRetryScheduled": lambda p, tx, e, ex: p._update_step(
        tx, ex, e.key, S.RETRYING, last_error=canonical(e.error), **named_agent(e)
    ),
    "StepCancelled": lambda p, tx, e, ex: p._update_step(
        tx, ex, e.key, S.CANCELLED, e.at, last_error=_cancel_error(e)
    ),
    "StepRecovered": lambda p, tx, e, ex: p._update_step(
        tx, ex, e.key, S.COMPLETED, e.at, recovered_by=e.handler_id
    ),
    "StepCompensated": lambda p, tx, e, ex: (
        p._update_step(tx, ex, e.key, S.COMPENSATED) if e.ok else (e.key, None, None)
    ),
    "StepSkipped": lambda p, tx, e, ex: p._skipped(tx, e, ex),
    "BranchSelected": lambda p, tx, e, ex: p._branch_selected(tx, e, ex),
    "LoopIterationStarted": lambda p, tx, e, ex: (e.key, None, None),
    "TimerFired": lambda p, tx, e, ex: _timer_step(e),
}
