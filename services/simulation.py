"""Simulating a workflow's step graph on recorded runs: critical paths and predicted gains.

Each recorded execution is one sample of the world: how long each of its top-level steps
took. Its end-to-end time is the longest path through the step graph (steps start when
their dependencies end) plus a residual: the engine's own time between steps, which the
graph does not explain. A change (steps side by side, a cached step, shorter retry
delays, a better agent) is simulated by rewriting each recorded execution: a new graph, or
step durations redrawn from the recorded samples, with the execution's own residual kept.
Drawing those redrawn durations many times, and resampling the executions (bootstrap),
gives the predicted change of the median and its spread. Randomness comes in as an
argument, so a report is the same for the same history.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

Graph = Mapping[str, Sequence[str]]  # step id -> the step ids it waits for

DRAWS = 16  # redrawn variants of each recorded execution
BOOTSTRAP_ROUNDS = 400


def topological(graph: Graph) -> list[str]:
    """The steps in an order where each comes after its dependencies (definition order kept
    where it already is one)."""
    done: set[str] = set()
    order: list[str] = []

    def visit(step: str, path: tuple[str, ...]) -> None:
        if step in done or step not in graph:
            return
        if step in path:
            raise ValueError(f"dependency cycle through {step!r}")
        for dep in graph[step]:
            visit(dep, (*path, step))
        done.add(step)
        order.append(step)

    for step in graph:
        visit(step, ())
    return order


def longest_path(
    graph: Graph, order: Sequence[str], durations: Mapping[str, float]
) -> tuple[float, list[str]]:
    """The end of the last step when each starts as its dependencies end, and the critical
    path (the chain of steps that decides it). A step with no duration took no time."""
    finish: dict[str, float] = {}
    before: dict[str, str | None] = {}
    for step in order:
        deps = [d for d in graph[step] if d in finish]
        start, prev = 0.0, None
        for d in deps:
            if prev is None or finish[d] > start:
                start, prev = finish[d], d
        finish[step] = start + durations.get(step, 0.0)
        before[step] = prev
    if not finish:
        return 0.0, []
    last = max(order, key=lambda s: finish[s])
    path: list[str] = []
    at: str | None = last
    while at is not None:
        path.append(at)
        at = before[at]
    return finish[last], path[::-1]


@dataclass(frozen=True)
class Run:
    """A recorded execution reduced to what the simulation needs."""

    execution_id: str
    duration: float  # end to end, seconds
    steps: dict[str, float]  # top-level step id -> its duration (0 when it did not run)


@dataclass(frozen=True)
class Prediction:
    """The simulated effect of a change on the end-to-end time of the recorded executions."""

    metric: str
    executions: int  # recorded executions the simulation resampled
    simulated_runs: int
    observed_p50: float
    baseline_p50: float  # the simulation of the definition as it is (equals the observed)
    predicted_p50: float
    predicted_p95: float
    baseline_p95: float
    change_p50: float  # seconds; negative: faster
    change_p50_pct: float
    interval_p50: tuple[float, float]  # 90% bootstrap interval of change_p50
    baseline_mean: float
    predicted_mean: float
    change_mean_pct: float  # a mix of fast and slow runs can move the mean, not the median


# How a change rewrites one recorded run: its new step durations (and the graph to use).
Rewrite = Callable[[Run, random.Random], dict[str, float]]


def predict(
    runs: Sequence[Run],
    graph: Graph,
    rng: random.Random,
    *,
    new_graph: Graph | None = None,
    rewrite: Rewrite | None = None,
    metric: str = "end-to-end duration of completed executions",
) -> Prediction:
    """Simulate the recorded runs under a new graph and/or redrawn step durations."""
    if not runs:
        raise ValueError("no recorded runs to simulate")
    order = topological(graph)
    proposed_graph = new_graph if new_graph is not None else graph
    proposed_order = topological(proposed_graph)
    draws = DRAWS if rewrite is not None else 1
    baseline: list[float] = []
    proposed: list[list[float]] = []
    for run in runs:
        span, _ = longest_path(graph, order, run.steps)
        residual = run.duration - span
        baseline.append(run.duration)
        variants = []
        for _ in range(draws):
            steps = rewrite(run, rng) if rewrite is not None else run.steps
            new_span, _ = longest_path(proposed_graph, proposed_order, steps)
            variants.append(max(0.0, residual + new_span))
        proposed.append(variants)
    flat = sorted(v for vs in proposed for v in vs)
    base_sorted = sorted(baseline)
    base_p50, new_p50 = percentile(base_sorted, 50), percentile(flat, 50)
    change = new_p50 - base_p50
    base_mean, new_mean = sum(baseline) / len(baseline), sum(flat) / len(flat)
    return Prediction(
        metric=metric,
        executions=len(runs),
        simulated_runs=len(flat),
        observed_p50=base_p50,
        baseline_p50=base_p50,
        predicted_p50=new_p50,
        predicted_p95=percentile(flat, 95),
        baseline_p95=percentile(base_sorted, 95),
        change_p50=change,
        change_p50_pct=(change / base_p50 * 100) if base_p50 > 0 else 0.0,
        interval_p50=_bootstrap(baseline, proposed, rng),
        baseline_mean=base_mean,
        predicted_mean=new_mean,
        change_mean_pct=((new_mean - base_mean) / base_mean * 100) if base_mean > 0 else 0.0,
    )


def _bootstrap(
    baseline: list[float], proposed: list[list[float]], rng: random.Random
) -> tuple[float, float]:
    n = len(baseline)
    changes = []
    for _ in range(BOOTSTRAP_ROUNDS):
        picks = [rng.randrange(n) for _ in range(n)]
        base = sorted(baseline[i] for i in picks)
        new = sorted(rng.choice(proposed[i]) for i in picks)
        changes.append(percentile(new, 50) - percentile(base, 50))
    changes.sort()
    return percentile(changes, 5), percentile(changes, 95)


def percentile(ordered: Sequence[float], percent: float) -> float:
    """Nearest rank, as the performance figures use (an observed or simulated value)."""
    if not ordered:
        raise ValueError("no values")
    rank = max(1, math.ceil(percent / 100 * len(ordered)))
    return ordered[rank - 1]
