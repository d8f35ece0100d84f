"""Performance history, counted from events only: per workflow and version, per step and per
agent, over a time window; SLA compliance; repeated identical step inputs.

`performance_projection.PerformanceProjection` stores one row per execution, per step
instance and per attempt, with exact durations in microseconds; `PerformanceView` computes
the figures from those rows when asked (percentiles by nearest rank, see `stats.py`).
What counts as what:

- A step *run* is a step instance that succeeded or failed for good (recovered ones
  included: the step failed, its error handler recovered it). Cancelled and skipped step
  instances are counted apart and are in no rate and no duration.
- A step instance served from the step cache is no run either: it is counted as a cache
  hit, in no rate, no duration and no repeated input, and its attempt is no agent's.
- Step success rate = succeeded / runs; retry rate = runs that needed more than one
  attempt / runs; step duration = first attempt's start to the step's end.
- An *attempt* runs on an agent (actions and webhooks: "local" in-process). Agent success
  rate = succeeded attempts / ended attempts (cancelled ones excluded); retry rate =
  attempts followed by a retry / ended attempts. An attempt lost with its worker
  (`WorkerLost`) ended at an unknown time: it counts as failed, with no duration.
- Executions: success rate = completed / (completed + failed + timed out); cancelled
  executions are counted apart. End-to-end durations are those of completed executions.
- A window keeps what *ended* at or after its start (event time, the events' `at`).
- A retried execution is counted once, with the status of its final end (in progress
  while it runs again); its end-to-end duration runs from its first start. A step
  instance the retry ran again is one run with its last outcome and all its attempts;
  the attempt that failed before the retry counts as retried.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from flowledger.projections.events import WORKER_LOST, micros
from flowledger.projections.stats import Durations, durations, ratio
from flowledger.projections.store import Row, ViewRecorder

# -- what the view returns -----------------------------------------------------------------


@dataclass(frozen=True)
class RepeatedInputs:
    """Step runs whose input (canonical JSON, hashed) was seen before, and their outputs."""

    distinct_inputs: int
    repeated_inputs: int  # inputs seen in more than one run
    repeated_runs: int  # runs with such an input
    outputs_matched: int  # repeated inputs whose successful runs (two or more) gave one output
    outputs_differed: int  # repeated inputs whose successful runs gave different outputs


@dataclass(frozen=True)
class StepFigures:
    """One step (by step_id, over its instances: loop iterations, handlers)."""

    step_id: str
    type: str | None
    runs: int
    succeeded: int
    failed: int
    recovered: int
    cancelled: int
    skipped: int
    cache_hits: int  # instances served from the step cache: no run, no agent attempt
    attempts: int
    retries: int
    success_rate: float | None
    retry_rate: float | None
    duration: Durations
    repeated: RepeatedInputs


@dataclass(frozen=True)
class AgentFigures:
    """The attempts one agent ran."""

    agent: str
    attempts: int
    succeeded: int
    failed: int
    retried: int
    lost: int
    cancelled: int
    success_rate: float | None
    retry_rate: float | None
    duration: Durations


@dataclass(frozen=True)
class AgentAttempt:
    """One ended attempt of a named agent, whatever the workflow (routing's figures)."""

    agent: str
    succeeded: bool
    seconds: float | None  # from its start to its end; None when that is unknown
    ended: datetime


@dataclass(frozen=True)
class ExecutionFigures:
    """End-to-end figures of the executions that ended (and those still going)."""

    ended: int
    completed: int
    failed: int
    timed_out: int
    cancelled: int
    in_progress: int
    success_rate: float | None
    duration: Durations  # of completed executions


@dataclass(frozen=True)
class SlaCheck:
    """One SLA target of a version's definition against what its executions did."""

    version: str
    target: str
    goal: float
    actual: float | None
    met: bool | None  # None: no execution to judge by


@dataclass(frozen=True)
class VersionFigures:
    """A version's execution figures and its SLA compliance."""

    version: str
    executions: ExecutionFigures
    sla: list[SlaCheck]


@dataclass(frozen=True)
class Performance:
    """The performance of a workflow (one version, or all) over a window."""

    workflow_id: str
    version: str | None
    since: str | None
    executions: ExecutionFigures
    versions: list[VersionFigures]
    steps: list[StepFigures]
    agents: list[AgentFigures]


# -- the view ------------------------------------------------------------------------------


class PerformanceView(ViewRecorder):
    """Rows of executions, step instances and attempts; figures computed when read."""

    name = "performance"
    tables = (
        "perf_versions",
        "perf_version_steps",
        "perf_executions",
        "perf_steps",
        "perf_attempts",
    )
    schema = (
        "CREATE TABLE IF NOT EXISTS perf_versions (workflow_id TEXT NOT NULL, "
        "version TEXT NOT NULL, sla_targets TEXT NOT NULL, position BIGINT NOT NULL, "
        "PRIMARY KEY (workflow_id, version))",
        "CREATE TABLE IF NOT EXISTS perf_version_steps (workflow_id TEXT NOT NULL, "
        "version TEXT NOT NULL, step_id TEXT NOT NULL, type TEXT NOT NULL, "
        "ord INTEGER NOT NULL, PRIMARY KEY (workflow_id, version, step_id))",
        "CREATE TABLE IF NOT EXISTS perf_executions (execution_id TEXT PRIMARY KEY, "
        "workflow_id TEXT NOT NULL, version TEXT NOT NULL, started_us BIGINT NOT NULL, "
        "status TEXT NOT NULL, finished_us BIGINT, duration_us BIGINT)",
        "CREATE INDEX IF NOT EXISTS perf_executions_by_workflow "
        "ON perf_executions (workflow_id, version, finished_us)",
        "CREATE TABLE IF NOT EXISTS perf_steps (execution_id TEXT NOT NULL, key TEXT NOT NULL, "
        "workflow_id TEXT NOT NULL, version TEXT NOT NULL, step_id TEXT NOT NULL, type TEXT, "
        "agent TEXT, attempts INTEGER NOT NULL, started_us BIGINT, outcome TEXT, "
        "recovered INTEGER NOT NULL, finished_us BIGINT, duration_us BIGINT, input_hash TEXT, "
        "output_hash TEXT, PRIMARY KEY (execution_id, key))",
        "CREATE INDEX IF NOT EXISTS perf_steps_by_workflow "
        "ON perf_steps (workflow_id, version, step_id, finished_us)",
        "CREATE TABLE IF NOT EXISTS perf_attempts (execution_id TEXT NOT NULL, "
        "key TEXT NOT NULL, attempt INTEGER NOT NULL, workflow_id TEXT NOT NULL, "
        "version TEXT NOT NULL, step_id TEXT NOT NULL, agent TEXT, started_us BIGINT NOT NULL, "
        "outcome TEXT, retried INTEGER NOT NULL, error_type TEXT, ended_us BIGINT, "
        "duration_us BIGINT, PRIMARY KEY (execution_id, key, attempt))",
        "CREATE INDEX IF NOT EXISTS perf_attempts_by_agent "
        "ON perf_attempts (workflow_id, version, agent, ended_us)",
        # Routing reads the latest attempts of every workflow (agent_attempts).
        "CREATE INDEX IF NOT EXISTS perf_attempts_by_end ON perf_attempts (ended_us)",
    )

    def versions(self, workflow_id: str) -> list[str]:
        """The workflow's registered versions, in registration order."""
        rows = self.query(
            "SELECT version FROM perf_versions WHERE workflow_id = :wf ORDER BY position",
            wf=workflow_id,
        )
        return [r["version"] for r in rows]

    def agent_attempts(self, since: datetime, limit: int = 5000) -> list[AgentAttempt]:
        """The attempts of named agents (remote, and "local") that succeeded or failed at or
        after `since`, of every workflow: the newest `limit`, oldest first."""
        rows = self.query(
            "SELECT agent, outcome, duration_us, ended_us FROM perf_attempts "
            "WHERE ended_us >= :since AND agent IS NOT NULL "
            "AND outcome IN ('succeeded', 'failed') ORDER BY ended_us DESC LIMIT :limit",
            since=micros(since),
            limit=limit,
        )
        epoch = datetime(1970, 1, 1, tzinfo=UTC)
        return [
            AgentAttempt(
                agent=r["agent"],
                succeeded=r["outcome"] == "succeeded",
                seconds=None if r["duration_us"] is None else int(r["duration_us"]) / 1e6,
                ended=epoch + timedelta(microseconds=int(r["ended_us"])),
            )
            for r in reversed(rows)
        ]

    def performance(
        self, workflow_id: str, version: str | None = None, since: datetime | None = None
    ) -> Performance:
        """The figures of a workflow's executions, steps and agents (one version, or all)
        over what ended at or after `since` (all time when None)."""
        where = "workflow_id = :wf" + (" AND version = :v" if version is not None else "")
        params: dict[str, Any] = {"wf": workflow_id, "v": version}
        if version is None:
            del params["v"]
        window = ""
        if since is not None:
            params["since"] = micros(since)
            window = " AND {ended} >= :since"
        with self.reading() as tx:
            versions = tx.all(
                f"SELECT version, sla_targets FROM perf_versions WHERE {where} ORDER BY position",
                **params_without(params, "since"),
            )
            ended = tx.all(
                "SELECT version, status, duration_us FROM perf_executions "
                f"WHERE {where} AND finished_us IS NOT NULL" + window.format(ended="finished_us"),
                **params,
            )
            going = tx.all(
                "SELECT version, COUNT(*) AS n FROM perf_executions "
                f"WHERE {where} AND finished_us IS NULL GROUP BY version",
                **params_without(params, "since"),
            )
            steps = tx.all(
                "SELECT step_id, type, outcome, recovered, attempts, duration_us FROM perf_steps "
                f"WHERE {where} AND outcome IS NOT NULL" + window.format(ended="finished_us"),
                **params,
            )
            repeats = tx.all(
                "SELECT step_id, input_hash, COUNT(*) AS runs, "
                "SUM(CASE WHEN outcome = 'succeeded' THEN 1 ELSE 0 END) AS succeeded, "
                "COUNT(DISTINCT output_hash) AS outputs FROM perf_steps "
                f"WHERE {where} AND outcome IS NOT NULL AND outcome <> 'cached' "
                "AND input_hash IS NOT NULL"
                + window.format(ended="finished_us")
                + " GROUP BY step_id, input_hash",
                **params,
            )
            attempts = tx.all(
                "SELECT agent, outcome, retried, error_type, duration_us FROM perf_attempts "
                f"WHERE {where} AND agent IS NOT NULL AND outcome IS NOT NULL"
                + window.format(ended="ended_us"),
                **params,
            )
            order = tx.all(
                "SELECT step_id, MIN(ord) AS ord FROM perf_version_steps "
                f"WHERE {where} GROUP BY step_id",
                **params_without(params, "since"),
            )
        in_progress = {r["version"]: int(r["n"]) for r in going}
        per_version = [
            _version_figures(
                v["version"],
                json.loads(v["sla_targets"]),
                [r for r in ended if r["version"] == v["version"]],
                in_progress.get(v["version"], 0),
            )
            for v in versions
        ]
        rank = {r["step_id"]: int(r["ord"]) for r in order}
        return Performance(
            workflow_id=workflow_id,
            version=version,
            since=since.isoformat() if since is not None else None,
            executions=_execution_figures(ended, sum(in_progress.values())),
            versions=per_version,
            steps=sorted(
                _step_figures(steps, repeats),
                key=lambda s: (rank.get(s.step_id, 1 << 30), s.step_id),
            ),
            agents=_agent_figures(attempts),
        )


def params_without(params: dict[str, Any], name: str) -> dict[str, Any]:
    """The parameters less one (a statement must not be given one it does not name)."""
    return {k: v for k, v in params.items() if k != name}


def _execution_figures(rows: list[Row], in_progress: int) -> ExecutionFigures:
    count: defaultdict[str, int] = defaultdict(int)
    for r in rows:
        count[r["status"]] += 1
    judged = count["completed"] + count["failed"] + count["timed_out"]
    return ExecutionFigures(
        ended=len(rows),
        completed=count["completed"],
        failed=count["failed"],
        timed_out=count["timed_out"],
        cancelled=count["cancelled"],
        in_progress=in_progress,
        success_rate=ratio(count["completed"], judged),
        duration=durations([int(r["duration_us"]) for r in rows if r["status"] == "completed"]),
    )


def _version_figures(
    version: str, targets: dict[str, float], rows: list[Row], in_progress: int
) -> VersionFigures:
    figures = _execution_figures(rows, in_progress)
    checks = []
    for target, goal in targets.items():
        if target == "success_rate":
            actual = figures.success_rate
            met = None if actual is None else actual >= goal
        else:
            actual = getattr(figures.duration, target.removeprefix("duration_"), None)
            met = None if actual is None else actual <= goal
        checks.append(SlaCheck(version, target, goal, actual, met))
    return VersionFigures(version, figures, checks)


def _step_figures(rows: list[Row], repeats: list[Row]) -> list[StepFigures]:
    by_step: dict[str, list[Row]] = defaultdict(list)
    for r in rows:
        by_step[r["step_id"]].append(r)
    repeated: dict[str, list[Row]] = defaultdict(list)
    for r in repeats:
        repeated[r["step_id"]].append(r)
    figures = []
    for step_id, found in by_step.items():
        outcome: dict[str, int] = defaultdict(int)
        for r in found:
            outcome[r["outcome"]] += 1
        runs = [r for r in found if r["outcome"] in ("succeeded", "failed")]
        figures.append(
            StepFigures(
                step_id=step_id,
                type=next((r["type"] for r in found if r["type"]), None),
                runs=len(runs),
                succeeded=outcome["succeeded"],
                failed=outcome["failed"],
                recovered=sum(1 for r in runs if r["recovered"]),
                cancelled=outcome["cancelled"],
                skipped=outcome["skipped"],
                cache_hits=outcome["cached"],
                attempts=sum(int(r["attempts"]) for r in runs),
                retries=sum(int(r["attempts"]) - 1 for r in runs),
                success_rate=ratio(outcome["succeeded"], len(runs)),
                retry_rate=ratio(sum(1 for r in runs if int(r["attempts"]) > 1), len(runs)),
                duration=durations([int(r["duration_us"]) for r in runs]),
                repeated=_repeated(repeated.get(step_id, [])),
            )
        )
    return figures


def _repeated(groups: list[Row]) -> RepeatedInputs:
    again = [g for g in groups if int(g["runs"]) > 1]
    return RepeatedInputs(
        distinct_inputs=len(groups),
        repeated_inputs=len(again),
        repeated_runs=sum(int(g["runs"]) for g in again),
        outputs_matched=sum(
            1 for g in again if int(g["succeeded"]) >= 2 and int(g["outputs"]) == 1
        ),
        outputs_differed=sum(1 for g in again if int(g["outputs"]) > 1),
    )


def _agent_figures(rows: list[Row]) -> list[AgentFigures]:
    by_agent: dict[str, list[Row]] = defaultdict(list)
    for r in rows:
        by_agent[r["agent"]].append(r)
    figures = []
    for agent in sorted(by_agent):
        found = by_agent[agent]
        ended = [r for r in found if r["outcome"] != "cancelled"]
        succeeded = sum(1 for r in ended if r["outcome"] == "succeeded")
        retried = sum(1 for r in ended if r["retried"])
        figures.append(
            AgentFigures(
                agent=agent,
                attempts=len(ended),
                succeeded=succeeded,
                failed=len(ended) - succeeded,
                retried=retried,
                lost=sum(1 for r in ended if r["error_type"] == WORKER_LOST),
                cancelled=len(found) - len(ended),
                success_rate=ratio(succeeded, len(ended)),
                retry_rate=ratio(retried, len(ended)),
                duration=durations(
                    [int(r["duration_us"]) for r in ended if r["duration_us"] is not None]
                ),
            )
        )
    return figures
