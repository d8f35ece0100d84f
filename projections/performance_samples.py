"""The raw samples behind the performance figures, execution by execution, for the optimizer.

`PerformanceView.performance` answers with aggregates; the optimizer needs what they were
computed from: each ended execution with its step instances and their attempts (durations,
outcomes, agents, error types, input and output hashes), so it can find the critical path of
every run and resample runs under a changed definition. Read from the same rows
(`perf_executions`, `perf_steps`, `perf_attempts`), newest executions first, bounded.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from flowledger.projections.performance import PerformanceView
from flowledger.projections.stats import US
from flowledger.projections.store import Row

MAX_EXECUTIONS = 2_000  # the newest ended executions a sample holds, at most


@dataclass(frozen=True)
class AttemptSample:
    """One attempt of a step instance."""

    attempt: int
    agent: str | None
    outcome: str | None  # succeeded, failed, cancelled; None while it runs
    error_type: str | None
    retried: bool
    started: float  # seconds since the execution started
    ended: float | None
    duration: float | None  # seconds


@dataclass(frozen=True)
class StepSample:
    """One step instance of an execution (a loop iteration's instance has its own key)."""

    key: str
    step_id: str
    type: str | None
    outcome: str | None  # succeeded, failed, skipped, cancelled
    recovered: bool
    agent: str | None
    attempts: list[AttemptSample]
    started: float | None  # seconds since the execution started
    duration: float | None  # first attempt's start to the step's end, seconds
    finished_at: float | None  # seconds since the epoch (event time)
    input_hash: str | None
    output_hash: str | None


@dataclass(frozen=True)
class ExecutionSample:
    """One ended execution and its step instances."""

    execution_id: str
    status: str
    started_at: float  # seconds since the epoch
    duration: float | None  # end to end, seconds
    steps: dict[str, StepSample] = field(default_factory=dict)  # by key


def execution_samples(
    view: PerformanceView,
    workflow_id: str,
    version: str,
    limit: int = MAX_EXECUTIONS,
) -> list[ExecutionSample]:
    """The newest `limit` ended executions of a workflow version, oldest first."""
    params = {"wf": workflow_id, "v": version, "limit": limit}
    newest = (
        "SELECT execution_id FROM perf_executions WHERE workflow_id = :wf AND version = :v "
        "AND finished_us IS NOT NULL ORDER BY finished_us DESC LIMIT :limit"
    )
    with view.reading() as tx:
        executions = tx.all(
            "SELECT execution_id, status, started_us, duration_us FROM perf_executions "
            f"WHERE execution_id IN ({newest}) ORDER BY started_us",
            **params,
        )
        steps = tx.all(
            "SELECT execution_id, key, step_id, type, agent, outcome, recovered, started_us, "
            "finished_us, duration_us, input_hash, output_hash FROM perf_steps "
            f"WHERE execution_id IN ({newest})",
            **params,
        )
        attempts = tx.all(
            "SELECT execution_id, key, attempt, agent, outcome, retried, error_type, started_us, "
            f"ended_us, duration_us FROM perf_attempts WHERE execution_id IN ({newest}) "
            "ORDER BY attempt",
            **params,
        )
    origin = {r["execution_id"]: int(r["started_us"]) for r in executions}
    tries: dict[tuple[str, str], list[AttemptSample]] = defaultdict(list)
    for r in attempts:
        t0 = origin[r["execution_id"]]
        tries[(r["execution_id"], r["key"])].append(_attempt(r, t0))
    by_execution: dict[str, dict[str, StepSample]] = defaultdict(dict)
    for r in steps:
        eid = r["execution_id"]
        by_execution[eid][r["key"]] = _step(r, origin[eid], tries.get((eid, r["key"]), []))
    return [
        ExecutionSample(
            execution_id=r["execution_id"],
            status=r["status"],
            started_at=int(r["started_us"]) / US,
            duration=_seconds(r["duration_us"]),
            steps=by_execution.get(r["execution_id"], {}),
        )
        for r in executions
    ]


def _seconds(us: int | None) -> float | None:
    return None if us is None else int(us) / US


def _since(us: int | None, t0: int) -> float | None:
    return None if us is None else (int(us) - t0) / US


def _attempt(r: Row, t0: int) -> AttemptSample:
    return AttemptSample(
        attempt=int(r["attempt"]),
        agent=r["agent"],
        outcome=r["outcome"],
        error_type=r["error_type"],
        retried=bool(r["retried"]),
        started=(int(r["started_us"]) - t0) / US,
        ended=_since(r["ended_us"], t0),
        duration=_seconds(r["duration_us"]),
    )


def _step(r: Row, t0: int, attempts: list[AttemptSample]) -> StepSample:
    return StepSample(
        key=r["key"],
        step_id=r["step_id"],
        type=r["type"],
        outcome=r["outcome"],
        recovered=bool(r["recovered"]),
        agent=r["agent"],
        attempts=attempts,
        started=_since(r["started_us"], t0),
        duration=_seconds(r["duration_us"]),
        finished_at=_seconds(r["finished_us"]),
        input_hash=r["input_hash"],
        output_hash=r["output_hash"],
    )
