"""The execution document: what the CLI prints with --json (and the HTTP API will serve)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from flowledger.domain.execution import Execution, StepRecord
from flowledger.domain.workflow import Workflow


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return round((end - start).total_seconds(), 6)


def step_document(record: StepRecord, wf: Workflow | None) -> dict[str, Any]:
    """One step instance: status, attempts, timings, the last error."""
    node = wf.nodes.get(record.step_id) if wf is not None else None
    doc: dict[str, Any] = {
        "step_id": record.step_id,
        "type": node.step.type if node is not None else None,
        "kind": record.kind,
        "status": record.status.value,
        "attempts": record.attempt,
        "started_at": _iso(record.first_started_at),
        "last_attempt_started_at": _iso(record.started_at),
        "finished_at": _iso(record.finished_at),
        "duration_seconds": _seconds(record.first_started_at, record.finished_at),
        "last_error": record.error,
        "recovered_by": record.recovered_by,
        "result": record.result,
    }
    if record.owner is not None:
        doc["handles"] = record.owner
    if record.assignee is not None:
        doc["assignee"] = record.assignee
    if record.cached_from is not None:
        doc["cached_from"] = dict(record.cached_from)
    if record.agent is not None:
        doc["agent"] = record.agent
        if record.route is not None:
            doc["route"] = record.route  # why the attempt went to that agent
    return doc


def execution_document(ex: Execution, wf: Workflow | None = None) -> dict[str, Any]:
    """The whole execution as JSON: ids, status, data and every step instance."""
    waiting = [
        r.key
        for r in ex.steps.values()
        if r.status.value == "waiting"
        and (r.timer_id is None or ex.timers[r.timer_id].purpose == "human_deadline")
    ]
    return {
        "execution_id": str(ex.id),
        "workflow_id": ex.workflow_id,
        "version": ex.workflow_version,
        "status": ex.status.value,
        "reason": ex.reason,
        "idempotency_key": ex.idempotency_key,
        "started_at": _iso(ex.started_at),
        "finished_at": _iso(ex.finished_at),
        "deadline": _iso(ex.deadline),
        "duration_seconds": _seconds(ex.started_at, ex.finished_at),
        "input": ex.input,
        "data": ex.data,
        "steps": _steps(ex, wf),
        "waiting_for_person": waiting,
        "event_count": ex.version,
    }


def _steps(ex: Execution, wf: Workflow | None) -> dict[str, Any]:
    steps = {key: step_document(r, wf) for key, r in ex.steps.items()}
    if wf is None:
        return steps
    # Steps that have not started yet are listed too, so a reader sees the whole graph;
    # loop bodies are left out: their instances exist only once an iteration starts.
    for step_id, node in wf.nodes.items():
        if step_id in steps or node.scope == "<handlers>" or _in_loop(wf, node.scope):
            continue
        steps[step_id] = {
            "step_id": step_id,
            "type": node.step.type,
            "kind": "step",
            "status": "pending",
            "attempts": 0,
            "started_at": None,
            "last_attempt_started_at": None,
            "finished_at": None,
            "duration_seconds": None,
            "last_error": None,
            "recovered_by": None,
            "result": None,
        }
    return steps


def _in_loop(wf: Workflow, scope: str) -> bool:
    while scope and scope != "<handlers>":
        node = wf.nodes[scope]
        if node.step.type == "loop":
            return True
        scope = node.scope
    return False
