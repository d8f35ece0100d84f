"""How events become performance history: `PerformanceProjection` folds execution events
into rows of executions, step instances and attempts in `PerformanceView`
(projections/performance.py), one transaction per event (or per batch) with its tracking
record.

A retried execution (ExecutionRetried) is one execution, counted once, at its final end:
the retry reopens its row (running again, no end, no duration) and the rows of the step
instances it runs again, so a step instance is one run whose outcome is its last, with
every attempt it made before and after the retry (attempt numbers count on, so no attempt
row is overwritten). The end-to-end duration runs from the first start to the final end.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from eventsourcing.persistence import Tracking
from eventsourcing.projection import Projection

from flowledger.projections.events import (
    EXECUTION_PREFIX,
    VERSION_REGISTERED,
    WORKER_LOST,
    agent_named,
    agent_of,
    attr,
    content_hash,
    event_name,
    micros,
    sla_targets,
    step_types,
)
from flowledger.projections.performance import PerformanceView
from flowledger.projections.store import Row, Tx

_TERMINAL = {
    "ExecutionCompleted": "completed",
    "ExecutionFailed": "failed",
    "ExecutionTimedOut": "timed_out",
    "ExecutionCancelled": "cancelled",
}
_LOST = "WorkerLost"
CACHED = "cached"  # the outcome of a step instance (and its attempt) served from the cache


class PerformanceProjection(Projection[PerformanceView]):
    """Folds execution events into rows of executions, step instances and attempts."""

    name = "performance"

    def __init__(self, view: PerformanceView) -> None:
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
                self._execution_event(tx, domain_event, name.removeprefix(EXECUTION_PREFIX))

    def _version_registered(self, tx: Tx, e: Any, position: int) -> None:
        document = attr(e, "document") or {}
        tx.execute(
            "INSERT INTO perf_versions (workflow_id, version, sla_targets, position) "
            "VALUES (:wf, :v, :sla, :position) ON CONFLICT (workflow_id, version) DO NOTHING",
            wf=e.workflow_id,
            v=e.version,
            sla=json.dumps(sla_targets(document)),
            position=position,
        )
        for ord_, (step_id, kind) in enumerate(step_types(document).items()):
            tx.execute(
                "INSERT INTO perf_version_steps (workflow_id, version, step_id, type, ord) "
                "VALUES (:wf, :v, :step, :type, :ord) "
                "ON CONFLICT (workflow_id, version, step_id) DO NOTHING",
                wf=e.workflow_id,
                v=e.version,
                step=step_id,
                type=kind,
                ord=ord_,
            )

    def _execution_event(self, tx: Tx, e: Any, name: str) -> None:
        eid = str(e.originator_id)
        if name == "ExecutionStarted":
            tx.execute(
                "INSERT INTO perf_executions (execution_id, workflow_id, version, started_us, "
                "status) VALUES (:eid, :wf, :v, :at, 'running')",
                eid=eid,
                wf=e.workflow_id,
                v=e.workflow_version,
                at=micros(e.at),
            )
            return
        ex = tx.one(
            "SELECT workflow_id, version, started_us FROM perf_executions "
            "WHERE execution_id = :eid",
            eid=eid,
        )
        if ex is None:
            return  # an execution whose start is not in this log
        ex["execution_id"] = eid
        if name in _TERMINAL:
            at = micros(e.at)
            tx.execute(
                "UPDATE perf_executions SET status = :status, finished_us = :at, "
                "duration_us = :duration WHERE execution_id = :eid",
                status=_TERMINAL[name],
                at=at,
                duration=at - int(ex["started_us"]),
                eid=eid,
            )
        elif name == "ExecutionRetried":
            self._retried(tx, e, ex)
        elif name in ("StepStarted", "StepWaiting"):
            self._attempt_started(tx, e, ex)
        elif name in ("StepSucceeded", "HumanTaskCompleted"):
            self._attempt_ended(tx, ex, e.key, "succeeded", e.at, agent=agent_named(e))
            self._step_ended(tx, ex, e.key, "succeeded", e.at, content_hash(attr(e, "result")))
        elif name == "StepServedFromCache":
            self._served_from_cache(tx, e, ex)
        elif name == "StepRetryScheduled":
            self._attempt_ended(
                tx, ex, e.key, "failed", e.at, e.error, retried=True, agent=agent_named(e)
            )
        elif name == "StepFailed":
            self._attempt_ended(tx, ex, e.key, "failed", e.at, e.error, agent=agent_named(e))
            self._step_ended(tx, ex, e.key, "failed", e.at)
        elif name == "StepCancelled":
            self._attempt_ended(tx, ex, e.key, "cancelled", e.at)
            self._step_ended(tx, ex, e.key, "cancelled", e.at)
        elif name == "StepRecovered":
            tx.execute(
                "UPDATE perf_steps SET recovered = 1 WHERE execution_id = :eid AND key = :key",
                eid=eid,
                key=e.key,
            )
        elif name == "StepSkipped":
            self._replace_step(tx, e, ex, e.key, e.step_id, "skipped")
        elif name == "BranchSelected":
            self._replace_step(tx, e, ex, e.key, e.step_id, "succeeded", attr(e, "result"))
            for skipped_key, skipped_id in e.skipped:
                self._replace_step(tx, e, ex, skipped_key, skipped_id, "skipped")

    def _retried(self, tx: Tx, e: Any, ex: Row) -> None:
        ids = {"eid": ex["execution_id"]}
        tx.execute(
            "UPDATE perf_executions SET status = 'running', finished_us = NULL, "
            "duration_us = NULL WHERE execution_id = :eid",
            **ids,
        )
        for key in [*e.reset, *e.resumed]:
            tx.execute(
                "UPDATE perf_steps SET outcome = NULL, finished_us = NULL, duration_us = NULL, "
                "output_hash = NULL WHERE execution_id = :eid AND key = :key",
                key=key,
                **ids,
            )
        for key in e.resumed:
            # A resumed container's run goes on: its attempt ends when the container does.
            tx.execute(
                "UPDATE perf_attempts SET outcome = NULL, retried = 0, error_type = NULL, "
                "ended_us = NULL, duration_us = NULL WHERE execution_id = :eid AND key = :key "
                "AND attempt = (SELECT MAX(attempt) FROM perf_attempts "
                "WHERE execution_id = :eid AND key = :key)",
                key=key,
                **ids,
            )

    def _step_type(self, tx: Tx, ex: Row, step_id: str) -> str | None:
        # A registered version never changes: what it says a step is can be kept.
        known = (ex["workflow_id"], ex["version"], step_id)
        found = self._types.get(known)
        if found is None:
            row = tx.one(
                "SELECT type FROM perf_version_steps "
                "WHERE workflow_id = :wf AND version = :v AND step_id = :step",
                wf=ex["workflow_id"],
                v=ex["version"],
                step=step_id,
            )
            found = row["type"] if row else None
            if found is not None:
                self._types[known] = found
        return found

    def _attempt_started(self, tx: Tx, e: Any, ex: Row) -> None:
        at = micros(e.at)
        agent = agent_of(e, self._step_type(tx, ex, e.step_id))
        ids = {"eid": ex["execution_id"], "key": e.key}
        known = tx.one(
            "SELECT attempts FROM perf_steps WHERE execution_id = :eid AND key = :key", **ids
        )
        if known is None:
            tx.execute(
                "INSERT INTO perf_steps (execution_id, key, workflow_id, version, step_id, type, "
                "agent, attempts, started_us, recovered, input_hash) VALUES (:eid, :key, :wf, "
                ":v, :step, :type, :agent, :attempt, :at, 0, :input)",
                wf=ex["workflow_id"],
                v=ex["version"],
                step=e.step_id,
                type=self._step_type(tx, ex, e.step_id),
                agent=agent,
                attempt=e.attempt,
                at=at,
                input=content_hash(attr(e, "input")),
                **ids,
            )
        else:
            # A step a retry reset after it was skipped starts for the first time now.
            tx.execute(
                "UPDATE perf_steps SET attempts = :attempt, agent = :agent, "
                "started_us = COALESCE(started_us, :at), input_hash = COALESCE(input_hash, :input) "
                "WHERE execution_id = :eid AND key = :key",
                attempt=e.attempt,
                agent=agent,
                at=at,
                input=content_hash(attr(e, "input")),
                **ids,
            )
            # An attempt that failed for good and is followed by another (the execution
            # was retried) counts as retried, as one followed by a scheduled retry does.
            tx.execute(
                "UPDATE perf_attempts SET retried = 1 WHERE execution_id = :eid AND key = :key "
                "AND outcome = 'failed' AND retried = 0",
                **ids,
            )
        tx.execute(
            "INSERT INTO perf_attempts (execution_id, key, attempt, workflow_id, version, "
            "step_id, agent, started_us, retried) VALUES (:eid, :key, :attempt, :wf, :v, :step, "
            ":agent, :at, 0)",
            attempt=e.attempt,
            wf=ex["workflow_id"],
            v=ex["version"],
            step=e.step_id,
            agent=agent,
            at=at,
            **ids,
        )

    def _attempt_ended(
        self,
        tx: Tx,
        ex: Row,
        key: str,
        outcome: str,
        at: datetime,
        error: dict[str, Any] | None = None,
        *,
        retried: bool = False,
        agent: str | None = None,
    ) -> None:
        ids = {"eid": ex["execution_id"], "key": key}
        running = tx.one(
            "SELECT attempt, started_us FROM perf_attempts WHERE execution_id = :eid "
            "AND key = :key AND outcome IS NULL ORDER BY attempt DESC LIMIT 1",
            **ids,
        )
        if running is None:
            return  # e.g. a step cancelled while it waited for its retry: no attempt runs
        error_type = (error or {}).get("type")
        ended = micros(at)
        lost = error_type == WORKER_LOST  # ended when a restart noticed, not when it stopped
        tx.execute(
            "UPDATE perf_attempts SET outcome = :outcome, retried = :retried, "
            "error_type = :error_type, ended_us = :ended, duration_us = :duration "
            "WHERE execution_id = :eid AND key = :key AND attempt = :attempt",
            outcome=outcome,
            retried=1 if retried else 0,
            error_type=error_type,
            ended=ended,
            duration=None if lost else ended - int(running["started_us"]),
            attempt=running["attempt"],
            **ids,
        )
        if agent is not None:  # the remote agent that ran it, known only now
            tx.execute(
                "UPDATE perf_attempts SET agent = :agent WHERE execution_id = :eid "
                "AND key = :key AND attempt = :attempt",
                agent=agent,
                attempt=running["attempt"],
                **ids,
            )
            tx.execute(
                "UPDATE perf_steps SET agent = :agent WHERE execution_id = :eid AND key = :key",
                agent=agent,
                **ids,
            )

    def _served_from_cache(self, tx: Tx, e: Any, ex: Row) -> None:
        """A hit: no agent ran the attempt, and the step is no run of its own (its outcome
        `cached` keeps it out of the rates and durations; it is counted as a cache hit)."""
        ids = {"eid": ex["execution_id"], "key": e.key}
        self._attempt_ended(tx, ex, e.key, CACHED, e.at)
        tx.execute(
            "UPDATE perf_attempts SET agent = NULL WHERE execution_id = :eid AND key = :key "
            "AND outcome = :outcome",
            outcome=CACHED,
            **ids,
        )
        tx.execute(
            "UPDATE perf_steps SET agent = NULL WHERE execution_id = :eid AND key = :key", **ids
        )
        self._step_ended(tx, ex, e.key, CACHED, e.at, content_hash(attr(e, "result")))

    def _step_ended(
        self, tx: Tx, ex: Row, key: str, outcome: str, at: datetime, output: str | None = None
    ) -> None:
        ended = micros(at)
        tx.execute(
            "UPDATE perf_steps SET outcome = :outcome, finished_us = :ended, "
            "duration_us = :ended - started_us, output_hash = :output "
            "WHERE execution_id = :eid AND key = :key AND outcome IS NULL",
            outcome=outcome,
            ended=ended,
            output=output,
            eid=ex["execution_id"],
            key=key,
        )

    def _replace_step(
        self, tx: Tx, e: Any, ex: Row, key: str, step_id: str, outcome: str, result: Any = None
    ) -> None:
        """A step instance decided at once: a skip, or a condition's choice (one attempt).
        Only one a retry reset has a row already: its attempts count on."""
        at = micros(e.at)
        ran = outcome != "skipped"
        known = tx.one(
            "SELECT attempts FROM perf_steps WHERE execution_id = :eid AND key = :key",
            eid=ex["execution_id"],
            key=key,
        )
        before = int(known["attempts"]) if known else 0
        attempt = before + 1
        params = {
            "eid": ex["execution_id"],
            "key": key,
            "wf": ex["workflow_id"],
            "v": ex["version"],
            "step": step_id,
            "at": at,
        }
        tx.execute(
            "INSERT INTO perf_steps (execution_id, key, workflow_id, version, step_id, type, "
            "agent, attempts, started_us, outcome, recovered, finished_us, duration_us, "
            "input_hash, output_hash) VALUES (:eid, :key, :wf, :v, :step, :type, NULL, "
            ":attempts, :start, :outcome, 0, :at, :duration, NULL, :output) "
            "ON CONFLICT (execution_id, key) DO UPDATE SET step_id = excluded.step_id, "
            "type = excluded.type, agent = NULL, attempts = excluded.attempts, "
            "started_us = excluded.started_us, outcome = excluded.outcome, recovered = 0, "
            "finished_us = excluded.finished_us, duration_us = excluded.duration_us, "
            "input_hash = NULL, output_hash = excluded.output_hash",
            type=self._step_type(tx, ex, step_id),
            attempts=attempt if ran else before,
            start=at if ran else None,
            outcome=outcome,
            duration=0 if ran else None,
            output=content_hash(result) if ran else None,
            **params,
        )
        if ran:
            tx.execute(
                "INSERT INTO perf_attempts (execution_id, key, attempt, workflow_id, version, "
                "step_id, agent, started_us, outcome, retried, ended_us, duration_us) "
                "VALUES (:eid, :key, :attempt, :wf, :v, :step, NULL, :at, 'succeeded', 0, :at, 0) "
                "ON CONFLICT (execution_id, key, attempt) DO UPDATE SET "
                "started_us = excluded.started_us, ended_us = excluded.ended_us",
                attempt=attempt,
                **params,
            )
