"""The optimizer: reads a workflow version's performance history (the projection only),
finds its critical path and bottlenecks, recommends changes with evidence and a simulated
gain, and applies one as a new version of the workflow.

Running executions stay on the version they started with; an applied recommendation is a
new registered version, which new executions start on unless they name another.
"""

from __future__ import annotations

import json
import re
import statistics
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from flowledger.domain.definitions import WorkflowDefinition, parse_definition
from flowledger.domain.errors import RecommendationNotFound
from flowledger.domain.patch import apply_patch
from flowledger.domain.workflow import TOP, Workflow
from flowledger.projections.performance_samples import execution_samples
from flowledger.services import recommend_shape, recommend_tuning
from flowledger.services.app import FlowledgerApp, version_id
from flowledger.services.optimizer_evidence import Evidence
from flowledger.services.optimizer_model import (
    MIN_EXECUTIONS,
    MIN_STEP_RUNS,
    Bottleneck,
    CriticalPath,
    MoreData,
    OptimizerReport,
    Recommendation,
    StepTime,
)
from flowledger.services.queries import Queries
from flowledger.services.simulation import longest_path, percentile, topological

# A step stands out when it crosses one of these.
CRITICAL_SHARE = 0.3  # of end-to-end time, on the critical path
HIGH_CV = 0.5
LOW_SUCCESS = 0.95
HIGH_RETRY = 0.1

RULES: tuple[Callable[[Evidence], Iterator[Recommendation]], ...] = (
    recommend_shape.parallelize,
    recommend_shape.cache,
    recommend_tuning.retries,
    recommend_tuning.timeouts,
    recommend_tuning.routing,
)


@dataclass(frozen=True)
class Applied:
    """A recommendation applied: the new version registered with its change."""

    workflow_id: str
    version: str
    based_on: str
    recommendation: Recommendation
    created: bool


class Optimizer:
    """Reports on a workflow version and applies its recommendations."""

    def __init__(self, app: FlowledgerApp, queries: Queries) -> None:
        self.app = app
        self.queries = queries

    def report(self, workflow_id: str, version: str | None = None) -> OptimizerReport:
        """The analysis and recommendations of a version (the newest when None)."""
        wf = self.app.workflow(workflow_id, version)
        self.queries.fresh()
        view = self.queries.projections.performance.view
        samples = execution_samples(view, wf.workflow_id, wf.version)
        perf = view.performance(wf.workflow_id, wf.version)
        completed = [s for s in samples if s.status == "completed" and s.duration is not None]
        failed = [s for s in samples if s.status in ("failed", "timed_out")]
        document = self._document(wf)
        ev = Evidence(
            wf=wf,
            document=document,
            pointers=_pointers(document),
            completed=completed,
            failed=failed,
            graph={sid: wf.node(sid).deps for sid in wf.members[TOP]},
            seed=f"{wf.workflow_id}@{wf.version}",
            more_data=[],
        )
        recs: list[Recommendation] = []
        # Failed executions count here: retrying what never recovers shows in them.
        ended = len(completed) + len(failed)
        if ev.need("any recommendation", None, ended, MIN_EXECUTIONS):
            for rule in RULES:
                recs.extend(rule(ev))
        recs.sort(key=lambda r: r.prediction.change_p50)
        e2e = sorted(s.duration for s in completed if s.duration is not None)
        path, steps = _critical(ev)
        return OptimizerReport(
            workflow_id=wf.workflow_id,
            version=wf.version,
            versions=view.versions(wf.workflow_id),
            executions_ended=len(samples),
            executions_completed=len(completed),
            executions_failed=len(failed),
            end_to_end_p50=percentile(e2e, 50) if e2e else None,
            end_to_end_p95=percentile(e2e, 95) if e2e else None,
            critical_path=path,
            steps=steps,
            bottlenecks=_bottlenecks(steps, perf, wf.version),
            sla=[c for v in perf.versions if v.version == wf.version for c in v.sla],
            recommendations=recs,
            more_data=_merge(ev.more_data),
        )

    def apply(
        self, workflow_id: str, recommendation_id: str, version: str | None = None
    ) -> Applied:
        """Register a new version of the workflow with the recommendation's change."""
        definition, rec, based_on = self.proposal(workflow_id, recommendation_id, version)
        registered, created = self.app.register(definition)
        return Applied(registered.workflow_id, registered.version, based_on, rec, created)

    def proposal(
        self, workflow_id: str, recommendation_id: str, version: str | None = None
    ) -> tuple[WorkflowDefinition, Recommendation, str]:
        """The new version's definition a recommendation makes (not registered), the
        recommendation, and the version it is based on."""
        report = self.report(workflow_id, version)
        rec = next((r for r in report.recommendations if r.id == recommendation_id), None)
        if rec is None:
            known = ", ".join(r.id for r in report.recommendations) or "none"
            raise RecommendationNotFound(
                f"workflow {report.workflow_id!r} version {report.version!r} has no "
                f"recommendation {recommendation_id!r} (now: {known})"
            )
        wf = self.app.workflow(report.workflow_id, report.version)
        document = apply_patch(self._document(wf), rec.patch)
        # Applied before (an HTTP client retrying, say): the version it made, not another.
        same = [
            v
            for v in report.versions
            if _unversioned(self._stored(wf.workflow_id, v)) == _unversioned(document)
        ]
        document["version"] = same[0] if same else next_version(report.version, report.versions)
        source = f"{report.workflow_id}@{document['version']} ({rec.id})"
        return parse_definition(document, source), rec, report.version

    def _document(self, wf: Workflow) -> dict[str, Any]:
        return self._stored(wf.workflow_id, wf.version)

    def _stored(self, workflow_id: str, version: str) -> dict[str, Any]:
        stored: Any = self.app.repository.get(version_id(workflow_id, version))
        return dict(stored.document)


def _unversioned(document: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in document.items() if k != "version"}, sort_keys=True)


def next_version(version: str, taken: list[str]) -> str:
    """The next free version after `version`: 1.0 -> 1.1, v3 -> v4, beta -> beta.1."""
    candidate = version
    while True:
        match = re.fullmatch(r"(.*?)(\d+)", candidate)
        candidate = f"{match.group(1)}{int(match.group(2)) + 1}" if match else f"{candidate}.1"
        if candidate not in taken:
            return candidate


def _pointers(document: dict[str, Any]) -> dict[str, str]:
    """step id -> JSON pointer of the step in the document (nested bodies and handlers)."""
    found: dict[str, str] = {}

    def walk(steps: list[dict[str, Any]], base: str) -> None:
        for i, step in enumerate(steps):
            at = f"{base}/{i}"
            found[step["step_id"]] = at
            for body in ("parallel_steps", "steps"):
                if isinstance(step.get(body), list):
                    walk(step[body], f"{at}/{body}")

    walk(document.get("steps", []), "/steps")
    walk(document.get("handlers", []), "/handlers")
    return found


def _critical(ev: Evidence) -> tuple[CriticalPath | None, list[StepTime]]:
    runs = ev.completed_runs
    order = topological(ev.graph)
    paths: Counter[tuple[str, ...]] = Counter()
    on_path: Counter[str] = Counter()
    share: defaultdict[str, float] = defaultdict(float)
    total = sum(r.duration for r in runs)
    for run in runs:
        _, path = longest_path(ev.graph, order, run.steps)
        paths[tuple(path)] += 1
        for sid in path:
            on_path[sid] += 1
            share[sid] += run.steps.get(sid, 0.0)
    steps = []
    for sid in ev.wf.members[TOP]:
        ran = [
            s.steps[sid].duration
            for s in ev.completed
            if sid in s.steps and s.steps[sid].outcome != "skipped"
        ]
        values = [d for d in ran if d is not None]
        mean = statistics.fmean(values) if values else None
        cv = (
            statistics.pstdev(values) / mean
            if mean is not None and mean > 0 and len(values) > 1
            else None
        )
        steps.append(
            StepTime(
                step_id=sid,
                type=ev.wf.node(sid).step.type,
                runs=len(values),
                p50=percentile(sorted(values), 50) if values else None,
                mean=mean,
                cv=cv,
                on_critical_path=on_path[sid] / len(runs) if runs else 0.0,
                share=share[sid] / total if total > 0 else 0.0,
            )
        )
    if not paths:
        return None, steps
    common, count = paths.most_common(1)[0]
    return CriticalPath(list(common), count / len(runs), len(runs)), steps


def _bottlenecks(steps: list[StepTime], perf: Any, version: str) -> list[Bottleneck]:
    found = []
    for s in steps:
        if s.share >= CRITICAL_SHARE:
            found.append(
                Bottleneck(
                    "critical_path",
                    s.step_id,
                    s.share,
                    CRITICAL_SHARE,
                    f"{s.share:.0%} of end-to-end time, on the critical path in "
                    f"{s.on_critical_path:.0%} of executions",
                )
            )
        if s.cv is not None and s.cv >= HIGH_CV and s.runs >= MIN_STEP_RUNS:
            found.append(
                Bottleneck(
                    "variance",
                    s.step_id,
                    s.cv,
                    HIGH_CV,
                    f"durations vary widely (coefficient of variation {s.cv:.2f})",
                )
            )
    for f in perf.steps:
        if f.runs < MIN_STEP_RUNS:
            continue
        if f.success_rate is not None and f.success_rate < LOW_SUCCESS:
            found.append(
                Bottleneck(
                    "success_rate",
                    f.step_id,
                    f.success_rate,
                    LOW_SUCCESS,
                    f"{f.succeeded} of {f.runs} runs succeeded",
                )
            )
        if f.retry_rate is not None and f.retry_rate > HIGH_RETRY:
            found.append(
                Bottleneck(
                    "retry_rate",
                    f.step_id,
                    f.retry_rate,
                    HIGH_RETRY,
                    f"{f.retry_rate:.0%} of runs needed a retry ({f.retries} retries)",
                )
            )
    for v in perf.versions:
        for check in v.sla:
            if v.version == version and check.met is False and check.actual is not None:
                found.append(
                    Bottleneck(
                        "sla",
                        None,
                        check.actual,
                        check.goal,
                        f"SLA {check.target} {check.actual:.4g} misses its goal {check.goal:g}",
                    )
                )
    return found


def _merge(notes: list[MoreData]) -> list[MoreData]:
    """One note per check and step (the largest need)."""
    best: dict[tuple[str, str | None], MoreData] = {}
    for n in notes:
        key = (n.check, n.step_id)
        if key not in best or n.more_runs > best[key].more_runs:
            best[key] = n
    return list(best.values())
