"""What the optimizer reports: the analysis of a workflow version and its recommendations."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

from flowledger.domain.patch import Patch
from flowledger.projections.performance import SlaCheck
from flowledger.services.simulation import Prediction

# Below these, figures are noise: no recommendation rests on fewer samples.
MIN_EXECUTIONS = 20  # completed executions of the version
MIN_STEP_RUNS = 20  # runs of the step
MIN_AGENT_ATTEMPTS = 10  # ended attempts of each agent compared
MIN_REPEATS = 5  # runs (or recoveries, or retries) a pattern is seen in before it counts
MIN_GAIN_PCT = 3.0  # a predicted p50 change smaller than this is not worth a new version


@dataclass(frozen=True)
class StepTime:
    """A top-level step's observed duration and its place on the critical path."""

    step_id: str
    type: str
    runs: int
    p50: float | None
    mean: float | None
    cv: float | None  # coefficient of variation: standard deviation / mean
    on_critical_path: float  # share of executions whose critical path holds the step
    share: float  # the step's share of end-to-end time, on the critical path


@dataclass(frozen=True)
class CriticalPath:
    """The chain of steps that most often decided the end-to-end time."""

    steps: list[str]
    frequency: float  # share of executions with exactly this critical path
    executions: int


@dataclass(frozen=True)
class Bottleneck:
    """A step (or the version, for an SLA) whose figures stand out, and by how much."""

    kind: str  # critical_path, variance, success_rate, retry_rate, sla
    step_id: str | None
    value: float
    threshold: float
    detail: str


@dataclass(frozen=True)
class Recommendation:
    """A change to the definition, the evidence for it and its simulated effect."""

    id: str
    kind: str  # parallelize, cache, retry, non_retryable, timeout, routing
    title: str
    steps: list[str]
    evidence: dict[str, Any]
    executions: int  # how many executions the evidence comes from
    patch: Patch
    risk: str
    prediction: Prediction
    note: str = ""


@dataclass(frozen=True)
class MoreData:
    """A check that could not be made yet, and how many more runs it needs."""

    check: str
    step_id: str | None
    have: int
    need: int
    more_runs: int


@dataclass(frozen=True)
class OptimizerReport:
    """The optimizer's report on one workflow version."""

    workflow_id: str
    version: str
    versions: list[str]
    executions_ended: int
    executions_completed: int
    executions_failed: int
    end_to_end_p50: float | None
    end_to_end_p95: float | None
    critical_path: CriticalPath | None
    steps: list[StepTime]
    bottlenecks: list[Bottleneck]
    sla: list[SlaCheck]
    recommendations: list[Recommendation]
    more_data: list[MoreData] = field(default_factory=list)


def recommendation_id(kind: str, steps: list[str], patch: Patch) -> str:
    """Stable for the same change: kind, the steps, and a digest of the patch."""
    digest = hashlib.sha256(json.dumps(patch, sort_keys=True).encode()).hexdigest()[:6]
    return f"{kind}-{'-'.join(steps)}-{digest}"


def nice_seconds(value: float) -> float:
    """A round number of seconds at or above `value` (1, 2 or 5 times a power of ten)."""
    if value <= 0:
        return 0.0
    power = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 5, 10):
        if step * power >= value - 1e-12:
            return float(f"{step * power:.6g}")
    return float(f"{10 * power:.6g}")


TTL_LADDER = (60, 120, 300, 600, 900, 1800, 3600, 7200, 21600, 43200, 86400)


def ttl_for(span: float) -> float:
    """A cache TTL to suggest: the first usual value at or above the time identical outputs
    were seen over (at least a minute, at most a day)."""
    return float(next((t for t in TTL_LADDER if t >= span), TTL_LADDER[-1]))
