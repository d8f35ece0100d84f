"""Applying the planner's decisions to an execution, and recording what attempts returned."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from flowledger.domain.caching import CachedResult, cache_key
from flowledger.domain.definitions import (
    ActionStep,
    ConditionStep,
    HumanTaskStep,
    LoopStep,
    ParallelStep,
    WaitStep,
    WebhookStep,
)
from flowledger.domain.errors import (
    ExpressionError,
    InputInvalid,
    InvalidTransition,
    StepNotFound,
)
from flowledger.domain.execution import JSON, Execution, StepRecord, copy_any
from flowledger.domain.expressions import evaluate, truthy
from flowledger.domain.limits import MAX_JSON_DEPTH, json_depth
from flowledger.domain.planner import (
    Abort,
    Decision,
    Expire,
    FailStep,
    Finish,
    FinishContainer,
    FinishWait,
    FireTimer,
    MarkCompensated,
    Recover,
    SetWaiting,
    SkipStep,
    StartHandler,
    StartIteration,
    StartStep,
    handler_key,
    plan,
)
from flowledger.domain.retry import retry_delay, retry_plan, should_retry
from flowledger.domain.schemas import validate_instance
from flowledger.domain.states import (
    ExecutionStatus,
    ExecutionTrigger,
    StepStatus,
    can_move_execution,
)
from flowledger.domain.workflow import AnyStep, Workflow

S = StepStatus
MAX_ANSWER_BYTES = 1_048_576  # a human task's answer, as JSON
MAX_ROUNDS = 100_000  # a bound on one advance; planning converges long before it


@dataclass(frozen=True, slots=True)
class Dispatch:
    """An attempt the engine must run outside the domain (an action or a webhook)."""

    execution_id: str
    key: str
    step_id: str
    attempt: int
    attempt_id: str
    step: ActionStep | WebhookStep
    input: JSON
    timeout: float | None
    cache_key: str | None = None  # a cached step's: look its result up before running it


@dataclass(frozen=True, slots=True)
class Advance:
    """What one advance produced: attempts to run, and when to advance again at the latest."""

    dispatches: list[Dispatch]
    next_wake: datetime | None


def advance(ex: Execution, wf: Workflow, now: datetime) -> Advance:
    """Apply decisions until the planner has none; return the attempts to run."""
    dispatches: list[Dispatch] = []
    for _ in range(MAX_ROUNDS):
        p = plan(ex, wf, now)
        if not p.decisions:
            live = [d for d in dispatches if _is_current(ex, d.key, d.attempt_id)]
            return Advance(live, p.next_wake)
        for decision in p.decisions:
            dispatch = apply(ex, wf, decision, now)
            if dispatch is not None:
                dispatches.append(dispatch)
            if _stops_others(decision):
                break  # the rest was planned on steps this one may have stopped: plan again
    raise RuntimeError(f"execution {ex.id}: planning did not converge")  # a bug, not input


def _stops_others(d: Decision) -> bool:
    """Whether applying `d` may stop steps other decisions of the same plan are about (a
    failed container stops what runs below it, an abort everything): found by the property
    tests after an execution retry resumed a parallel step inside another."""
    return isinstance(d, Abort) or (isinstance(d, FinishContainer) and d.error is not None)


def apply(ex: Execution, wf: Workflow, d: Decision, now: datetime) -> Dispatch | None:
    """Record one decision as events on the execution."""
    if isinstance(d, FireTimer):
        ex.fire_timer(d.timer_id, now)
    elif isinstance(d, StartStep):
        return _start(ex, wf, d.key, d.step_id, d.prefix, now)
    elif isinstance(d, SkipStep):
        ex.skip_step(d.key, d.step_id, d.prefix, d.reason, now)
    elif isinstance(d, FinishWait):
        record = ex.steps[d.key]
        timer = ex.timers[record.timer_id or ""]
        result = {"waited_until": timer.fire_at.isoformat()}
        try:
            patch = _patch(ex, wf, record, result)
        except ExpressionError as exc:
            ex.fail_step(d.key, _error("ExpressionError", str(exc), False), now)
        else:
            ex.succeed_step(d.key, result, patch, now)
    elif isinstance(d, Expire):
        record = ex.steps[d.key]
        timeout = wf.node(record.step_id).timeout or 0.0
        waited = (
            "the wait"
            if ex.timers[record.timer_id or ""].purpose == "wait_timeout"
            else ("no answer")
        )
        message = f"{waited} exceeded the step's timeout of {timeout:g}s"
        ex.fail_step(d.key, _error("TimeoutError", message, False), now)
    elif isinstance(d, StartHandler):
        return _start_handler(ex, wf, d, now)
    elif isinstance(d, Recover):
        _recover(ex, wf, d, now)
    elif isinstance(d, StartIteration):
        record = ex.steps[d.key]
        item = record.items[d.index] if record.items is not None else None
        ex.start_iteration(
            d.key, d.index, {"iteration": d.index, "item": item, "index": d.index}, now
        )
    elif isinstance(d, FinishContainer):
        _finish_container(ex, wf, d, now)
    elif isinstance(d, FailStep):
        _fail_before_run(
            ex, d.key, wf.node(ex.steps[d.key].step_id).step, d.error_type, d.message, now
        )
    elif isinstance(d, Abort):
        abort(ex, wf, d.status, d.reason, now)
    elif isinstance(d, MarkCompensated):
        ex.mark_compensated(d.key, d.ok, now)
    elif isinstance(d, Finish):
        if ex.status is ExecutionStatus.WAITING and d.status is ExecutionStatus.COMPLETED:
            ex.mark_resumed(now)
        ex.finish(d.status, d.reason, now)
    elif isinstance(d, SetWaiting):
        if d.waiting:
            ex.mark_waiting(now)
        else:
            ex.mark_resumed(now)
    return None


# -- starting steps --------------------------------------------------------------------


def _start(
    ex: Execution, wf: Workflow, key: str, step_id: str, prefix: str, now: datetime
) -> Dispatch | None:
    step = wf.node(step_id).step
    record = ex.steps.get(key)
    if ex.status is ExecutionStatus.WAITING:
        ex.mark_resumed(now)
    if record is not None and record.status is S.RETRYING:
        step_input = record.input  # a retry runs with the input of the first attempt
        return _launch(
            ex, wf, key, step, prefix, step_input, now, kind=record.kind, owner=record.owner
        )
    doc = scope_document(ex, prefix)
    try:
        step_input = _input(step, doc)
    except ExpressionError as exc:
        ex.start_step(key, step_id, prefix, None, now)
        _fail_before_run(ex, key, step, "ExpressionError", str(exc), now)
        return None
    return _launch(ex, wf, key, step, prefix, step_input, now)


def _start_handler(ex: Execution, wf: Workflow, d: StartHandler, now: datetime) -> Dispatch | None:
    owner = ex.steps[d.owner]
    step = wf.node(d.handler_id).step
    if ex.status is ExecutionStatus.WAITING:
        ex.mark_resumed(now)  # as `_start` does: a running handler means not waiting
    context: JSON = {"step_id": owner.step_id, "key": owner.key, "input": copy_any(owner.input)}
    if d.kind == "on_error":
        context["error"] = copy_any(owner.error)
    else:
        context["result"] = copy_any(owner.result)
    key = handler_key(d.owner, d.kind, d.handler_id)
    try:
        step_input = _input(step, {**ex.data, "_": context}) if step.input_mapping else context
    except ExpressionError as exc:
        ex.start_step(key, d.handler_id, owner.prefix, None, now, kind=d.kind, owner=d.owner)
        _fail_before_run(ex, key, step, "ExpressionError", str(exc), now)
        return None
    return _launch(ex, wf, key, step, owner.prefix, step_input, now, kind=d.kind, owner=d.owner)


def _launch(
    ex: Execution,
    wf: Workflow,
    key: str,
    step: AnyStep,
    prefix: str,
    step_input: Any,
    now: datetime,
    *,
    kind: str = "step",
    owner: str | None = None,
) -> Dispatch | None:
    node = wf.node(step.step_id)
    if step.input_validation is not None:
        problem = validate_instance(step.input_validation, step_input)
        if problem is not None:
            ex.start_step(key, step.step_id, prefix, step_input, now, kind=kind, owner=owner)
            _fail_before_run(ex, key, step, "ValidationError", f"input: {problem}", now)
            return None
    if isinstance(step, ActionStep | WebhookStep):
        dispatched = step_input if isinstance(step_input, dict) else {"input": step_input}
        try:
            # Handlers are never cached (definitions refuse `cache` on them).
            key_of = cache_key(ex.workflow_id, step, dispatched) if kind == "step" else None
        except ExpressionError as exc:
            ex.start_step(key, step.step_id, prefix, step_input, now, kind=kind, owner=owner)
            _fail_before_run(ex, key, step, "ExpressionError", f"cache.key: {exc}", now)
            return None
        attempt_id = ex.start_step(
            key, step.step_id, prefix, step_input, now, kind=kind, owner=owner, cache_key=key_of
        )
        return Dispatch(
            str(ex.id),
            key,
            step.step_id,
            ex.steps[key].attempt,
            attempt_id,
            step,
            dispatched,
            node.timeout,
            key_of,
        )
    if isinstance(step, WaitStep):
        try:
            fire_at = _wait_until(step, scope_document(ex, prefix), now)
        except ExpressionError as exc:
            ex.start_step(key, step.step_id, prefix, step_input, now, kind=kind, owner=owner)
            _fail_before_run(ex, key, step, "ExpressionError", str(exc), now)
            return None
        # A timeout shorter than the wait fails the step when it is reached (as a human
        # task's does): retrying a wait that cannot finish in time would only repeat it.
        purpose = "wait"
        if node.timeout is not None and fire_at > now + timedelta(seconds=node.timeout):
            purpose, fire_at = "wait_timeout", now + timedelta(seconds=node.timeout)
        ex.wait_step(
            key, step.step_id, prefix, step_input, purpose, fire_at, now, kind=kind, owner=owner
        )
    elif isinstance(step, HumanTaskStep):
        deadline = now + timedelta(seconds=node.timeout) if node.timeout else None
        ex.wait_step(
            key,
            step.step_id,
            prefix,
            step_input,
            "human_deadline",
            deadline,
            now,
            kind=kind,
            owner=owner,
            assignee=step.assignee,
        )
    elif isinstance(step, ConditionStep):
        _select_branch(ex, wf, key, step, prefix, now)
    elif isinstance(step, LoopStep) and step.for_each is not None:
        try:
            items = evaluate(step.for_each, scope_document(ex, prefix))
            if not isinstance(items, list):
                raise ExpressionError(
                    f"for_each {step.for_each!r} gave {type(items).__name__}, not a list"
                )
        except ExpressionError as exc:
            ex.start_step(key, step.step_id, prefix, step_input, now)
            _fail_before_run(ex, key, step, "ExpressionError", str(exc), now)
            return None
        ex.start_step(key, step.step_id, prefix, step_input, now, items=items)
    elif isinstance(step, ParallelStep | LoopStep):
        ex.start_step(key, step.step_id, prefix, step_input, now)
    return None


def _select_branch(
    ex: Execution, wf: Workflow, key: str, step: ConditionStep, prefix: str, now: datetime
) -> None:
    doc = scope_document(ex, prefix)
    chosen: int | None = None
    try:
        for i, branch in enumerate(step.conditions):
            if truthy(evaluate(branch.expression, doc)):
                chosen = i
                break
        selected = step.conditions[chosen].steps if chosen is not None else step.else_steps
        result: JSON = {
            "branch": chosen if chosen is not None else "else",
            "selected": list(selected),
        }
        patch = _patch(ex, wf, StepRecord(key=key, step_id=step.step_id, prefix=prefix), result)
    except ExpressionError as exc:
        ex.start_step(key, step.step_id, prefix, None, now)
        _fail_before_run(ex, key, step, "ExpressionError", str(exc), now)
        return
    targets = [t for b in step.conditions for t in b.steps] + list(step.else_steps)
    skipped = [(prefix + t, t) for t in dict.fromkeys(targets) if t not in selected]
    ex.select_branch(key, step.step_id, prefix, chosen, list(selected), skipped, result, patch, now)


def _wait_until(step: WaitStep, doc: JSON, now: datetime) -> datetime:
    if step.duration is not None:
        return now + timedelta(seconds=step.duration)
    value = evaluate(step.until or "", doc)
    if not isinstance(value, str):
        raise ExpressionError(f"until {step.until!r} gave {value!r}, not an ISO-8601 time")
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise ExpressionError(
            f"until {step.until!r} gave {value!r}, not an ISO-8601 time"
        ) from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _input(step: AnyStep, doc: JSON) -> Any:
    # A copy: the input is recorded in an event and handed to an agent; neither may alias
    # the live data document.
    if step.input_mapping is None:
        return copy_any(doc)
    return copy_any({param: evaluate(expr, doc) for param, expr in step.input_mapping.items()})


def scope_document(ex: Execution, prefix: str) -> JSON:
    """The document expressions see: `data`, plus `_` inside a loop iteration."""
    scope = ex.iteration_scopes.get(prefix)
    if scope is None:
        return ex.data
    return {**ex.data, "_": scope}


def _fail_before_run(
    ex: Execution, key: str, step: AnyStep, error_type: str, message: str, now: datetime
) -> None:
    ex.fail_step(key, _error(error_type, message, False), now)


# -- results ---------------------------------------------------------------------------


def _is_current(ex: Execution, key: str, attempt_id: str) -> bool:
    record = ex.steps.get(key)
    return (
        record is not None
        and record.attempt_id == attempt_id
        and record.status is S.RUNNING
        and not ex.is_terminal
    )


def succeed_attempt(
    ex: Execution,
    wf: Workflow,
    key: str,
    attempt_id: str,
    result: Any,
    now: datetime,
    agent: str | None = None,
    route: str | None = None,
) -> bool:
    """Record an attempt's result; False (nothing recorded) if the attempt is not current.
    `agent` names the remote agent that ran it (None: in this process), `route` why it
    was sent there."""
    if not _is_current(ex, key, attempt_id):
        return False
    if not isinstance(result, dict):
        return fail_attempt(
            ex,
            wf,
            key,
            attempt_id,
            "InvalidResult",
            f"a step result must be a JSON object, got {type(result).__name__}",
            False,
            now,
            agent,
            route,
        )
    record = ex.steps[key]
    try:
        patch = _patch(ex, wf, record, result)
    except ExpressionError as exc:
        return fail_attempt(
            ex, wf, key, attempt_id, "ExpressionError", str(exc), False, now, agent, route
        )
    ex.succeed_step(key, result, patch, now, agent, route)
    return True


def serve_from_cache(
    ex: Execution,
    wf: Workflow,
    key: str,
    attempt_id: str,
    hit: CachedResult,
    now: datetime,
) -> bool:
    """Complete a running attempt with a cached result instead of running it (its
    output_mapping applied as for a success); False (nothing recorded) if the attempt is
    not current or was started with another cache key."""
    if not _is_current(ex, key, attempt_id) or ex.steps[key].cache_key != hit.cache_key:
        return False
    record = ex.steps[key]
    result = copy_any(hit.result)
    try:
        patch = _patch(ex, wf, record, result)
    except ExpressionError as exc:
        source = f"execution {hit.source_execution_id} step {hit.source_step_key}"
        message = f"{exc} (the result was served from the cache: {source})"
        return fail_attempt(ex, wf, key, attempt_id, "ExpressionError", message, False, now)
    ex.serve_from_cache(
        key,
        result,
        patch,
        hit.cache_key,
        hit.source_execution_id,
        hit.source_step_key,
        hit.cached_at,
        now,
    )
    return True


def fail_attempt(
    ex: Execution,
    wf: Workflow,
    key: str,
    attempt_id: str,
    error_type: str,
    message: str,
    retryable: bool | None,
    now: datetime,
    agent: str | None = None,
    route: str | None = None,
) -> bool:
    """Record a failed attempt: a retry with its durable delay, or the step's failure."""
    if not _is_current(ex, key, attempt_id):
        return False
    record = ex.steps[key]
    policy = wf.node(record.step_id).policy
    # The budget (and the backoff) counts the attempts since the execution's last retry;
    # the attempt numbers themselves count on across it.
    attempt = record.attempt - record.attempt_base
    retry = should_retry(policy, attempt, error_type, retryable)
    error = _error(error_type, message[:4000], retry)
    if retry:
        delay = retry_delay(policy, ex.seed, key, attempt)
        ex.schedule_retry(key, error, delay, now + timedelta(seconds=delay), now, agent, route)
    else:
        ex.fail_step(key, error, now, agent, route)
    return True


def complete_human_task(ex: Execution, wf: Workflow, ref: str, answer: Any, now: datetime) -> str:
    """Record a person's answer to a waiting human task; returns the step key answered."""
    record = find_waiting_task(ex, ref)
    step = wf.node(record.step_id).step
    if not isinstance(answer, dict):
        raise InputInvalid(f"the answer to {record.key!r} must be a JSON object")
    if json_depth(answer) > MAX_JSON_DEPTH:
        raise InputInvalid(
            f"the answer to {record.key!r} nests deeper than {MAX_JSON_DEPTH} levels"
        )
    try:
        size = len(json.dumps(answer, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise InputInvalid(f"the answer to {record.key!r} is not JSON: {exc}") from None
    if size > MAX_ANSWER_BYTES:
        raise InputInvalid(
            f"the answer to {record.key!r} is {size} bytes; at most {MAX_ANSWER_BYTES} are allowed"
        )
    answer = copy_any(answer)  # the caller keeps its object; the event keeps its own
    schema = step.form_schema if isinstance(step, HumanTaskStep) else None
    if schema is not None:
        problem = validate_instance(schema, answer)
        if problem is not None:
            raise InputInvalid(
                f"the answer to {record.key!r} does not match its form_schema: {problem}"
            )
    try:
        patch = _patch(ex, wf, record, answer)
    except ExpressionError as exc:
        raise InputInvalid(f"the answer to {record.key!r}: {exc}") from None
    ex.complete_human_task(record.key, answer, patch, now)
    return record.key


def find_waiting_task(ex: Execution, ref: str) -> StepRecord:
    """The human task instance `ref` names: its key, or a step id with one waiting instance."""
    if ex.is_terminal:
        raise InvalidTransition(f"execution {ex.id} is {ex.status.value}; it waits for no answer")
    record = ex.steps.get(ref)
    candidates = (
        [record]
        if record is not None
        else [r for r in ex.steps.values() if r.step_id == ref and r.status is S.WAITING]
    )
    if not candidates:
        raise StepNotFound(f"execution {ex.id} has no step {ref!r} waiting for an answer")
    if len(candidates) > 1:
        keys = ", ".join(r.key for r in candidates)
        raise StepNotFound(f"step {ref!r} has several waiting instances ({keys}); name one")
    found = candidates[0]
    timer = ex.timers.get(found.timer_id or "")
    if found.status is not S.WAITING or (timer is not None and timer.purpose != "human_deadline"):
        raise InvalidTransition(
            f"step {found.key!r} is {found.status.value}, not a human task waiting for an answer"
        )
    return found


def cancel(ex: Execution, wf: Workflow, reason: str, now: datetime) -> None:
    """Cancel an execution: stop its active steps, compensate, end `cancelled`."""
    if ex.is_terminal or ex.status is ExecutionStatus.COMPENSATING:
        raise InvalidTransition(f"execution {ex.id} is {ex.status.value}; it cannot be cancelled")
    abort(ex, wf, ExecutionStatus.CANCELLED, reason, now)


def retry(ex: Execution, wf: Workflow, now: datetime, reason: str = "retried by request") -> None:
    """Run an execution that failed, timed out or was cancelled again from what did not
    complete.

    Completed steps keep their results and do not run again. Failed and cancelled step
    instances (with their error handlers), and the steps skipped because of them, go back
    to pending: the planner starts them afresh, their input evaluated from the data as it
    is, their attempt numbers counting on and their retry budget whole again. A container
    that had started its children or iterations picks up where it stopped. The execution
    runs again with a new deadline, the workflow's timeout from `now`.
    """
    require_retryable(ex)
    reset, resumed = retry_plan(ex, wf)
    deadline = now + timedelta(seconds=wf.definition.timeout)
    ex.retry(reason, deadline, reset, resumed, now)


def require_retryable(ex: Execution) -> None:
    """Raise InvalidTransition, naming the reason, unless `ex` can be retried."""
    if not can_move_execution(ex.status, ExecutionTrigger.RETRY):
        raise InvalidTransition(
            f"execution {ex.id} is {ex.status.value}; only a failed, timed-out or cancelled "
            "execution can be retried"
        )
    if ex.compensation is not None:
        raise InvalidTransition(
            f"execution {ex.id} was compensated: the rollback actions of its completed steps "
            "ran, so it cannot resume; start a new execution"
        )


def abort(ex: Execution, wf: Workflow, status: ExecutionStatus, reason: str, now: datetime) -> None:
    """Stop every active step, then compensate completed steps (reverse order) or end."""
    for record in sorted(ex.active_steps(), key=lambda r: r.key):
        ex.cancel_step(record.key, reason, now)
    done = sorted(
        (
            r
            for r in ex.steps.values()
            if r.status is S.COMPLETED
            and r.kind == "step"
            and wf.node(r.step_id).step.rollback_actions
        ),
        key=lambda r: r.completion_seq,
        reverse=True,
    )
    rollback = [(r.key, list(wf.node(r.step_id).step.rollback_actions)) for r in done]
    if rollback:
        ex.start_compensation(status, reason, rollback, now)
    else:
        ex.finish(status, reason, now)


def _recover(ex: Execution, wf: Workflow, d: Recover, now: datetime) -> None:
    record = ex.steps[d.key]
    handler = ex.steps[d.handler_key]
    result = handler.result if isinstance(handler.result, dict) else {}
    try:
        patch = _patch(ex, wf, record, result)
    except ExpressionError:
        patch = {}
    ex.recover_step(d.key, d.handler_key, handler.step_id, result, patch, now)


def _finish_container(ex: Execution, wf: Workflow, d: FinishContainer, now: datetime) -> None:
    record = ex.steps[d.key]
    step = wf.node(record.step_id).step
    if d.error is not None:
        # Fail fast: whatever still runs below the container (children, their error
        # handlers, nested containers) is stopped before the container fails.
        _stop_below(ex, wf, record, d.error, now)
        kind = "ParallelFailed" if isinstance(step, ParallelStep) else "LoopFailed"
        ex.fail_step(d.key, _error(kind, d.error, False), now)
        return
    result: JSON
    if isinstance(step, ParallelStep):
        result = {c.step_id: _result_of(ex, record.prefix + c.step_id) for c in step.parallel_steps}
    else:
        assert isinstance(step, LoopStep)
        results = [
            {c.step_id: _result_of(ex, f"{d.key}[{i}]/{c.step_id}") for c in step.steps}
            for i in range(record.iterations)
        ]
        result = {
            "iterations": record.iterations,
            "max_iterations_reached": d.capped,
            "results": results,
        }
    try:
        patch = _patch(ex, wf, record, result)
    except ExpressionError as exc:
        ex.fail_step(d.key, _error("ExpressionError", str(exc), False), now)
        return
    ex.succeed_step(d.key, result, patch, now)


def cancel_tree(ex: Execution, wf: Workflow, key: str, reason: str, now: datetime) -> None:
    """Cancel a step instance if active, its active error handlers and, for a container,
    everything active below it."""
    record = ex.steps.get(key)
    if record is None:
        return
    _stop_below(ex, wf, record, reason, now)
    if record.status in (S.RUNNING, S.RETRYING, S.WAITING):
        ex.cancel_step(key, reason, now)


def _stop_below(
    ex: Execution, wf: Workflow, record: StepRecord, reason: str, now: datetime
) -> None:
    active = (S.RUNNING, S.RETRYING, S.WAITING)
    for handler in [r for r in ex.steps.values() if r.owner == record.key]:
        if handler.kind == "on_error" and handler.status in active:
            ex.cancel_step(handler.key, reason, now)
    step = wf.node(record.step_id).step
    children: list[str] = []
    if isinstance(step, ParallelStep):
        children = [record.prefix + c.step_id for c in step.parallel_steps]
    elif isinstance(step, LoopStep):
        children = [
            f"{record.key}[{i}]/{c.step_id}" for i in range(record.iterations) for c in step.steps
        ]
    for child in children:
        cancel_tree(ex, wf, child, reason, now)


def _result_of(ex: Execution, key: str) -> Any:
    record = ex.steps.get(key)
    return record.result if record is not None and record.status is S.COMPLETED else None


def _patch(ex: Execution, wf: Workflow, record: StepRecord, result: Any) -> JSON:
    """The data a step's result writes: its output_mapping, or the result under its id."""
    if record.kind != "step":
        return {}
    step = wf.node(record.step_id).step
    if step.output_mapping is None:
        return {record.step_id: result}
    return {k: evaluate(expr, result) for k, expr in step.output_mapping.items()}


def _error(error_type: str, message: str, retryable: bool) -> JSON:
    return {"type": error_type, "message": message, "retryable": retryable}


def compensation_actions(ex: Execution, wf: Workflow) -> set[str]:
    """The actions a cancellation of `ex` would run: the rollback actions of its completed
    steps (only these need an agent to cancel)."""
    names: set[str] = set()
    for record in ex.steps.values():
        if record.status is not S.COMPLETED or record.kind != "step":
            continue
        for handler in wf.node(record.step_id).step.rollback_actions:
            step = wf.node(handler).step
            if isinstance(step, ActionStep):
                names.add(step.action)
    return names


def is_settled(ex: Execution, wf: Workflow) -> bool:
    """Ended, or nothing can happen without a person (a human task waits, nothing else runs)."""
    if ex.is_terminal:
        return True
    person = False
    for record in ex.steps.values():
        if not wf.node(record.step_id).is_leaf:
            continue
        if record.status in (StepStatus.RUNNING, StepStatus.RETRYING):
            return False
        if record.status is StepStatus.WAITING:
            if wf.node(record.step_id).step.type == "wait":
                return False
            person = True
    return person
