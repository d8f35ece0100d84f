"""Optimizer rules that change the shape of the work: run steps side by side, serve a
step from a cache. Each states its change as a JSON Patch and predicts its effect by
replaying the recorded runs; short of samples it says how many more runs it needs.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Iterator

from flowledger.domain.dataflow import data_flow
from flowledger.domain.definitions import ActionStep, ConditionStep
from flowledger.domain.patch import Patch
from flowledger.domain.workflow import TOP
from flowledger.projections.performance_samples import StepSample
from flowledger.services.optimizer_evidence import Evidence, worth
from flowledger.services.optimizer_model import (
    MIN_EXECUTIONS,
    MIN_REPEATS,
    MIN_STEP_RUNS,
    Recommendation,
    recommendation_id,
    ttl_for,
)
from flowledger.services.simulation import Run, predict

# -- parallelization -----------------------------------------------------------------------


def parallelize(ev: Evidence) -> Iterator[Recommendation]:
    """A step that waits for another whose writes it does not read can run beside it."""
    runs = ev.completed_runs
    if not ev.need("parallelize", None, len(runs), MIN_EXECUTIONS):
        return
    for later_id in ev.wf.members[TOP]:
        later = ev.wf.node(later_id)
        if (
            isinstance(later.step, ConditionStep)
            or later.branch_of is not None
            or later.step.trigger_rule != "all_success"
        ):
            continue
        for earlier_id in later.step.dependencies:
            earlier = ev.wf.node(earlier_id)
            if earlier.scope != TOP or isinstance(earlier.step, ConditionStep):
                continue
            if earlier.branch_of is not None or earlier.step.trigger_rule != "all_success":
                continue  # `later` would take over dependencies it cannot judge the same way
            writes = data_flow(earlier.step).writes
            if data_flow(later.step).reads_any_of(writes):
                continue
            rec = _parallel_pair(ev, runs, earlier_id, later_id)
            if rec is not None:
                yield rec


def _parallel_pair(
    ev: Evidence, runs: list[Run], earlier_id: str, later_id: str
) -> Recommendation | None:
    new_graph = {k: list(v) for k, v in ev.graph.items()}
    earlier_deps = list(ev.graph[earlier_id])
    new_graph[later_id] = _unique([d for d in ev.graph[later_id] if d != earlier_id] + earlier_deps)
    changed = {later_id}
    for step_id, deps in ev.graph.items():  # what came after `later` still comes after both
        if later_id in deps and earlier_id not in deps and step_id != earlier_id:
            new_graph[step_id] = [*new_graph[step_id], earlier_id]
            changed.add(step_id)
    prediction = predict(runs, ev.graph, ev.rng(f"parallel:{later_id}"), new_graph=new_graph)
    if not worth(prediction):
        return None
    patch: Patch = [
        {
            "op": "add",
            "path": f"{ev.pointers[s]}/dependencies",
            "value": new_graph[s],
        }
        for s in sorted(changed, key=list(ev.graph).index)
    ]
    med = {s: statistics.median(r.steps[s] for r in runs) for s in (earlier_id, later_id)}
    return Recommendation(
        id=recommendation_id("parallelize", [later_id], patch),
        kind="parallelize",
        title=f"run {later_id} beside {earlier_id}: it reads nothing {earlier_id} writes",
        steps=[earlier_id, later_id],
        evidence={
            f"{earlier_id}_p50_s": round(med[earlier_id], 4),
            f"{later_id}_p50_s": round(med[later_id], 4),
            f"{earlier_id}_writes": sorted(data_flow(ev.wf.node(earlier_id).step).writes),
            f"{later_id}_reads": sorted(data_flow(ev.wf.node(later_id).step).reads),
            "executions": len(runs),
        },
        executions=len(runs),
        patch=patch,
        risk=(
            f"{later_id} starts before {earlier_id} ends: if {earlier_id} fails, {later_id} "
            "may already have run (and its side effects happened); give it rollback_actions "
            "if those must be undone. The data-flow check reads only the mappings: a step "
            "that reaches the same outside state by other means is not seen."
        ),
        prediction=prediction,
    )


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


# -- caching ---------------------------------------------------------------------------------


def cache(ev: Evidence) -> Iterator[Recommendation]:
    """An action whose identical inputs recur with identical outputs can be served from a
    cache for about as long as the outputs were seen not to change."""
    runs = ev.completed_runs
    if len(runs) < MIN_EXECUTIONS:  # the gain is simulated on completed executions
        return
    for node in ev.wf.nodes.values():
        step = node.step
        if not isinstance(step, ActionStep) or node.scope == "<handlers>":
            continue
        if step.cache is not None:
            continue
        ran = [s for s in ev.step_runs(node.step_id) if s.input_hash and s.outcome == "succeeded"]
        if not ev.need("cache", node.step_id, len(ran), MIN_STEP_RUNS):
            continue
        groups: dict[str, list[StepSample]] = defaultdict(list)
        for s in ran:
            groups[str(s.input_hash)].append(s)
        repeated = {h: g for h, g in groups.items() if len(g) > 1}
        if any(len({s.output_hash for s in g}) > 1 for g in repeated.values()):
            continue  # the same input gave different outputs: not a pure step
        again = sum(len(g) - 1 for g in repeated.values())  # runs whose input was seen before
        if again < MIN_REPEATS:
            continue
        spans = [
            max(s.finished_at or 0.0 for s in g) - min(s.finished_at or 0.0 for s in g)
            for g in repeated.values()
        ]
        ttl = ttl_for(max(spans))
        hit_rate = _hit_rate(ran, ttl)
        rec = _cache_rec(ev, runs, node.step_id, ttl, hit_rate, len(ran), len(repeated), spans)
        if rec is not None:
            yield rec


def _hit_rate(ran: list[StepSample], ttl: float) -> float:
    seen: dict[str, float] = {}
    hits = 0
    for s in sorted(ran, key=lambda s: s.finished_at or 0.0):
        at, h = s.finished_at or 0.0, str(s.input_hash)
        if h in seen and at - seen[h] <= ttl:
            hits += 1
        else:
            seen[h] = at
    return hits / len(ran)


def _cache_rec(
    ev: Evidence,
    runs: list[Run],
    step_id: str,
    ttl: float,
    hit_rate: float,
    n_runs: int,
    n_repeated: int,
    spans: list[float],
) -> Recommendation | None:
    prediction = ev.simulate(
        "cache", step_id, lambda st, rng: 0.0 if rng.random() < hit_rate else None
    )
    if not worth(prediction):
        return None
    patch: Patch = [{"op": "add", "path": f"{ev.pointers[step_id]}/cache", "value": {"ttl": ttl}}]
    return Recommendation(
        id=recommendation_id("cache", [step_id], patch),
        kind="cache",
        title=f"cache {step_id} for {ttl:g} s: its repeated inputs always gave the same output",
        steps=[step_id],
        evidence={
            "runs": n_runs,
            "repeated_inputs": n_repeated,
            "outputs_differed": 0,
            "hit_rate_at_ttl": round(hit_rate, 4),
            "longest_span_same_output_s": round(max(spans), 3),
            "suggested_ttl_s": ttl,
        },
        executions=len(runs),
        patch=patch,
        risk=(
            f"a hit returns a result up to {ttl:g} s old; outputs were seen unchanged for "
            f"{max(spans):.0f} s at most, so a longer TTL assumes more than was observed. "
            "An action with side effects (it sends, books, charges) must not be cached."
        ),
        prediction=prediction,
    )
