"""Optimizer rules that tune a step's policies: retry delays and budgets, errors not
worth retrying, timeouts, and which agents to route to. Each states its change as a JSON
Patch and predicts its effect by replaying the recorded runs.
"""

from __future__ import annotations

import random
import statistics
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

from flowledger.domain.definitions import ActionStep, RetryPolicy
from flowledger.domain.patch import Patch
from flowledger.projections.performance_samples import StepSample
from flowledger.services.optimizer_evidence import Evidence, worth
from flowledger.services.optimizer_model import (
    MIN_AGENT_ATTEMPTS,
    MIN_EXECUTIONS,
    MIN_REPEATS,
    MIN_STEP_RUNS,
    Recommendation,
    nice_seconds,
    recommendation_id,
)
from flowledger.services.simulation import Run, predict

TIMEOUT = "TimeoutError"


# -- retries and timeouts -------------------------------------------------------------------


def retries(ev: Evidence) -> Iterator[Recommendation]:
    """Retry delays that waste time, retry budgets beyond what recoveries need, and errors
    retried that never recovered."""
    runs = ev.completed_runs
    for node in ev.wf.nodes.values():
        if node.step.type not in ("action", "webhook"):
            continue
        ran = ev.step_runs(node.step_id)
        if not ev.need("retry", node.step_id, len(ran), MIN_STEP_RUNS):
            continue
        rec = _never_recover(ev, node.step_id, node.policy, ran)
        if rec is not None:
            yield rec
        if len(runs) >= MIN_EXECUTIONS:
            rec = _retry_delay(ev, runs, node.step_id, node.policy, ran)
            if rec is not None:
                yield rec


def _waits(st: StepSample) -> list[float]:
    """The time between each failed attempt's end and the next attempt's start."""
    out = []
    for a, b in zip(st.attempts, st.attempts[1:], strict=False):
        if a.ended is not None:
            out.append(max(0.0, b.started - a.ended))
    return out


def _retry_delay(
    ev: Evidence, runs: list[Run], step_id: str, policy: RetryPolicy, ran: list[StepSample]
) -> Recommendation | None:
    recovered = [s for s in ran if s.outcome == "succeeded" and len(s.attempts) > 1]
    if len(recovered) < MIN_REPEATS or policy.retry_delay <= 0.05:
        return None
    by_attempt: dict[int, int] = defaultdict(int)
    for s in recovered:
        by_attempt[len(s.attempts)] += 1
    last = max(by_attempt)
    waited = sum(sum(_waits(s)) for s in recovered)
    spent = sum(s.duration or 0.0 for s in recovered)
    if spent <= 0 or waited / spent < 0.2:
        return None
    new_delay = max(0.05, round(policy.retry_delay / 4, 3))
    new_retries = min(policy.max_retries, max(1, last))  # one more than recoveries needed
    scale = new_delay / policy.retry_delay

    def shorter_waits(st: StepSample, rng: random.Random) -> float | None:
        if st.duration is None or len(st.attempts) < 2:
            return None
        return st.duration - sum(_waits(st)) * (1 - scale)

    prediction = ev.simulate("retry", step_id, shorter_waits)
    if not worth(prediction):
        return None
    new_policy = policy.model_dump(mode="json") | {
        "retry_delay": new_delay,
        "max_retries": new_retries,
    }
    patch: Patch = [
        {"op": "add", "path": f"{ev.pointers[step_id]}/retry_policy", "value": new_policy}
    ]
    return Recommendation(
        id=recommendation_id("retry", [step_id], patch),
        kind="retry",
        title=(
            f"retry {step_id} after {new_delay:g} s instead of {policy.retry_delay:g} s: "
            f"its failures recovered by attempt {last}"
        ),
        steps=[step_id],
        evidence={
            "runs": len(ran),
            "recovered_runs": len(recovered),
            "recovered_at_attempt": {str(k): v for k, v in sorted(by_attempt.items())},
            "recovered_by_attempt": last,
            "time_waiting_share_of_recovered_runs": round(waited / spent, 4),
            "retry_delay_s": policy.retry_delay,
            "max_retries": policy.max_retries,
        },
        executions=len(runs),
        patch=patch,
        risk=(
            "a shorter delay gives the failing dependency less time to recover: every "
            f"recovery seen came after {policy.retry_delay:g} s or more. max_retries "
            f"{new_retries} keeps one attempt beyond the latest recovery seen."
        ),
        prediction=prediction,
    )


def _never_recover(
    ev: Evidence, step_id: str, policy: RetryPolicy, ran: list[StepSample]
) -> Recommendation | None:
    retried: dict[str, int] = defaultdict(int)
    recovered: dict[str, int] = defaultdict(int)
    for st in ran:
        for i, a in enumerate(st.attempts):
            if a.error_type and a.retried and a.error_type != TIMEOUT:
                retried[a.error_type] += 1
                if any(b.outcome == "succeeded" for b in st.attempts[i + 1 :]):
                    recovered[a.error_type] += 1
    hopeless = sorted(
        e
        for e, n in retried.items()
        if n >= MIN_REPEATS and recovered[e] == 0 and e not in policy.non_retryable_errors
    )
    if not hopeless:
        return None
    failed_runs = ev.failed_runs
    if not failed_runs:
        return None

    def fail_at_once(st: StepSample, rng: random.Random) -> float | None:
        first = next((a for a in st.attempts if a.error_type in hopeless), None)
        if first is None or first.ended is None or st.started is None:
            return None
        return max(0.0, first.ended - st.started)  # it ends with the first such failure

    prediction = ev.simulate("non_retryable", step_id, fail_at_once, failed=True)
    new_policy = policy.model_dump(mode="json") | {
        "non_retryable_errors": sorted({*policy.non_retryable_errors, *hopeless})
    }
    patch: Patch = [
        {"op": "add", "path": f"{ev.pointers[step_id]}/retry_policy", "value": new_policy}
    ]
    return Recommendation(
        id=recommendation_id("non_retryable", [step_id], patch),
        kind="non_retryable",
        title=f"stop retrying {', '.join(hopeless)} in {step_id}: no retry of it ever recovered",
        steps=[step_id],
        evidence={
            "runs": len(ran),
            "retried_attempts": {e: retried[e] for e in hopeless},
            "recovered_after": dict.fromkeys(hopeless, 0),
            "failed_executions": len(failed_runs),
        },
        executions=len(ran),
        patch=patch,
        risk=(
            "if these errors can be transient in conditions not seen yet, the step now fails "
            "at once where a retry might have helped."
        ),
        prediction=prediction,
    )


def timeouts(ev: Evidence) -> Iterator[Recommendation]:
    """Timeouts far above what attempts take, or so low that they cut attempts short."""
    runs = ev.completed_runs
    for node in ev.wf.nodes.values():
        if node.step.type not in ("action", "webhook") or node.timeout is None:
            continue
        attempts = [a for st in ev.step_runs(node.step_id) for a in st.attempts if a.outcome]
        if not ev.need("timeout", node.step_id, len(attempts), MIN_STEP_RUNS):
            continue
        ok = sorted(a.duration for a in attempts if a.outcome == "succeeded" and a.duration)
        cut = [a for a in attempts if a.error_type == TIMEOUT]
        if len(ok) < MIN_STEP_RUNS or len(runs) < MIN_EXECUTIONS:
            continue
        p99 = ok[max(0, -(-99 * len(ok) // 100) - 1)]
        if len(cut) / len(attempts) >= 0.05:
            rec = _timeout_low(ev, runs, node.step_id, node.timeout, ok, cut, len(attempts))
        elif node.step.timeout is not None and node.timeout >= 10 * p99 and node.timeout - p99 >= 5:
            # Only a timeout the definition sets: the default (300 s) is nobody's claim.
            rec = _timeout_high(ev, runs, node.step_id, node.timeout, p99, len(attempts))
        else:
            rec = None
        if rec is not None:
            yield rec


def _timeout_high(
    ev: Evidence, runs: list[Run], step_id: str, timeout: float, p99: float, n: int
) -> Recommendation:
    new = nice_seconds(max(1.0, p99 * 3))
    prediction = predict(runs, ev.graph, ev.rng(f"timeout:{step_id}"))
    patch: Patch = [{"op": "add", "path": f"{ev.pointers[step_id]}/timeout", "value": new}]
    return Recommendation(
        id=recommendation_id("timeout", [step_id], patch),
        kind="timeout",
        title=f"lower {step_id}'s timeout from {timeout:g} s to {new:g} s (p99 {p99:.3f} s)",
        steps=[step_id],
        evidence={"attempts": n, "p99_s": round(p99, 4), "timeout_s": timeout},
        executions=len(runs),
        patch=patch,
        risk=("attempts slower than the new timeout (none seen) would be cut short and retried."),
        prediction=prediction,
        note=(
            f"no attempt hung in these runs, so the median does not move; a hung attempt "
            f"is given up after {new:g} s instead of {timeout:g} s"
        ),
    )


def _timeout_low(
    ev: Evidence,
    runs: list[Run],
    step_id: str,
    timeout: float,
    ok: list[float],
    cut: list[Any],
    n: int,
) -> Recommendation | None:
    new = nice_seconds(max(ok[-1] * 1.5, timeout * 2))
    slow = [d for d in ok if d >= ok[len(ok) * 9 // 10]] or ok

    def goes_on(st: StepSample, rng: random.Random) -> float | None:
        first = next((a for a in st.attempts if a.error_type == TIMEOUT), None)
        if first is None or st.started is None:
            return None
        # The cut attempt would have gone on instead, as long as a slow successful one.
        return (first.started - st.started) + max(timeout, rng.choice(slow))

    prediction = ev.simulate("timeout", step_id, goes_on)
    if not worth(prediction):
        return None
    patch: Patch = [{"op": "add", "path": f"{ev.pointers[step_id]}/timeout", "value": new}]
    return Recommendation(
        id=recommendation_id("timeout", [step_id], patch),
        kind="timeout",
        title=f"raise {step_id}'s timeout from {timeout:g} s to {new:g} s: it cuts attempts short",
        steps=[step_id],
        evidence={
            "attempts": n,
            "timed_out": len(cut),
            "slowest_success_s": round(ok[-1], 4),
            "timeout_s": timeout,
        },
        executions=len(runs),
        patch=patch,
        risk=(
            "a timed-out attempt's true length is unknown; the simulation assumes it would "
            "have taken as long as the slowest tenth of successful attempts."
        ),
        prediction=prediction,
    )


# -- routing ---------------------------------------------------------------------------------


def routing(ev: Evidence) -> Iterator[Recommendation]:
    """Agents offering the same step with clearly different latency or success rate."""
    runs = ev.completed_runs
    for node in ev.wf.nodes.values():
        if not isinstance(node.step, ActionStep):
            continue
        by_agent: dict[str, list[Any]] = defaultdict(list)
        for st in ev.step_runs(node.step_id):
            for a in st.attempts:
                if a.agent and a.outcome in ("succeeded", "failed"):
                    by_agent[a.agent].append(a)
        if len(by_agent) < 2:
            continue
        ready = {k: v for k, v in by_agent.items() if len(v) >= MIN_AGENT_ATTEMPTS}
        for agent, found in by_agent.items():
            ev.need("routing", f"{node.step_id}@{agent}", len(found), MIN_AGENT_ATTEMPTS)
        if len(ready) < 2 or len(runs) < MIN_EXECUTIONS:
            continue
        figures = {agent: _agent_figures(found) for agent, found in ready.items()}
        best = min(figures, key=lambda a: (-figures[a][1], figures[a][0]))
        worse = sorted(
            a
            for a, (p50, ok, _) in figures.items()
            if a != best and (p50 >= 1.5 * figures[best][0] or ok <= figures[best][1] - 0.1)
        )
        avoid = [a for a in worse if a not in node.step.avoid_agents]
        if avoid:
            current = node.step.avoid_agents
            rec = _routing_rec(ev, runs, node.step_id, best, avoid, current, figures)
            if rec is not None:
                yield rec


def _agent_figures(found: list[Any]) -> tuple[float, float, list[float]]:
    ok = sorted(a.duration for a in found if a.outcome == "succeeded" and a.duration)
    p50 = statistics.median(ok) if ok else float("inf")
    return p50, sum(1 for a in found if a.outcome == "succeeded") / len(found), ok


def _routing_rec(
    ev: Evidence,
    runs: list[Run],
    step_id: str,
    best: str,
    avoid: list[str],
    current: list[str],
    figures: dict[str, tuple[float, float, list[float]]],
) -> Recommendation | None:
    fast = figures[best][2]
    if not fast:
        return None

    def on_best(st: StepSample, rng: random.Random) -> float | None:
        spent = [a.duration for a in st.attempts if a.agent in avoid and a.duration is not None]
        if not spent or st.duration is None:
            return None
        return max(0.0, st.duration - sum(spent) + rng.choice(fast))

    prediction = ev.simulate("routing", step_id, on_best)
    if not worth(prediction):
        return None
    patch: Patch = [
        {
            "op": "add",
            "path": f"{ev.pointers[step_id]}/avoid_agents",
            "value": sorted({*current, *avoid}),
        }
    ]
    return Recommendation(
        id=recommendation_id("routing", [step_id], patch),
        kind="routing",
        title=f"route {step_id} away from {', '.join(avoid)}: {best} is faster or more reliable",
        steps=[step_id],
        evidence={
            agent: {
                "attempts_p50_s": round(p50, 4),
                "success_rate": round(ok, 4),
                "succeeded_attempts": len(durations),
            }
            for agent, (p50, ok, durations) in sorted(figures.items())
        },
        executions=len(runs),
        patch=patch,
        risk=(
            f"all of {step_id}'s work goes to the remaining agents while they live (failover "
            "still uses the avoided ones); their load grows and their latency may with it."
        ),
        prediction=prediction,
    )
