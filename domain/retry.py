"""Retry decisions: a step attempt's retry and its backoff delay (jitter drawn from the
execution's stored seed), and what an execution retry runs again."""

from __future__ import annotations

import random

from flowledger.domain.definitions import LoopStep, ParallelStep, RetryPolicy
from flowledger.domain.execution import Execution, StepRecord, iteration_prefix
from flowledger.domain.planner import handler_key
from flowledger.domain.states import StepStatus
from flowledger.domain.workflow import TOP, AnyStep, Workflow

S = StepStatus


def should_retry(
    policy: RetryPolicy, attempt: int, error_type: str, retryable: bool | None
) -> bool:
    """Whether a failed attempt (1-based) gets another one under `policy`."""
    if error_type in policy.non_retryable_errors or retryable is False:
        return False
    return attempt <= policy.max_retries


def retry_delay(policy: RetryPolicy, seed: int, key: str, attempt: int) -> float:
    """Seconds to wait after failed attempt `attempt` (1-based) of step instance `key`.

    Exponential backoff capped at `max_delay`, then +/- `jitter` of it. The jitter comes
    from a PRNG seeded with the execution's seed, the step and the attempt, so replaying
    the events (or recomputing the delay) gives the same number.
    """
    try:
        growth = policy.backoff_multiplier ** (attempt - 1)
    except OverflowError:  # a steep backoff: the cap applies long before this attempt
        growth = float("inf")
    base = (
        policy.max_delay
        if growth * policy.retry_delay > policy.max_delay
        else (policy.retry_delay * growth)
    )
    spread = random.Random(f"{seed}:{key}:{attempt}").uniform(-1.0, 1.0)
    return max(0.0, min(policy.max_delay, base * (1.0 + policy.jitter * spread)))


def retry_plan(ex: Execution, wf: Workflow) -> tuple[list[str], list[str]]:
    """What an execution retry runs again: the step instances it resets to pending, and
    the containers it resumes (see progress.retry)."""
    reset: dict[str, None] = {}  # ordered sets: the event lists them in the order found
    resumed: dict[str, None] = {}
    _retry_scope(ex, wf, TOP, "", reset, resumed)
    return list(reset), list(resumed)


def _retry_scope(
    ex: Execution,
    wf: Workflow,
    scope: str,
    prefix: str,
    reset: dict[str, None],
    resumed: dict[str, None],
) -> None:
    """Decide for the step instances of one scope instance (the top level, a parallel's
    children, one loop iteration's body), and below them for the containers resumed."""
    keys = [prefix + step_id for step_id in wf.members[scope]]
    for key in keys:
        record = ex.steps.get(key)
        if record is None or record.status not in (S.FAILED, S.CANCELLED):
            continue
        step = wf.node(record.step_id).step
        handlers = [handler_key(key, "on_error", h) for h in step.error_handlers]
        if any(ex.step_status(h) is S.COMPLETED for h in handlers):
            continue  # an error handler succeeded: the planner recovers the step with it
        for h in handlers:
            if ex.step_status(h) in (S.FAILED, S.CANCELLED):
                reset[h] = None  # tried again if the step fails again
        children = _child_scopes(ex, record, step)
        if children:
            resumed[key] = None
            for child_scope, child_prefix in children:
                _retry_scope(ex, wf, child_scope, child_prefix, reset, resumed)
        else:
            reset[key] = None
    # A step skipped because a dependency did not succeed is decided again once that
    # dependency has run again (and so on down the graph). A branch target a completed
    # condition did not select stays skipped: that choice is kept with the condition.
    again = True
    while again:
        again = False
        for key in keys:
            record = ex.steps.get(key)
            if record is None or record.status is not S.SKIPPED or key in reset:
                continue
            node = wf.node(record.step_id)
            if _not_selected(ex, node.step_id, node.branch_of, prefix):
                continue
            if any(prefix + d in reset or prefix + d in resumed for d in node.deps):
                reset[key] = None
                again = True


def _child_scopes(ex: Execution, record: StepRecord, step: AnyStep) -> list[tuple[str, str]]:
    """The scope instances a container had started (none: it starts afresh if retried)."""
    if isinstance(step, ParallelStep):
        started = any(record.prefix + c.step_id in ex.steps for c in step.parallel_steps)
        return [(step.step_id, record.prefix)] if started else []
    if isinstance(step, LoopStep):
        return [(step.step_id, iteration_prefix(record.key, i)) for i in range(record.iterations)]
    return []


def _not_selected(ex: Execution, step_id: str, condition: str | None, prefix: str) -> bool:
    if condition is None:
        return False
    record = ex.steps.get(prefix + condition)
    if record is None or record.status is not S.COMPLETED:
        return False
    selected = record.result.get("selected", []) if isinstance(record.result, dict) else []
    return step_id not in selected
