"""The pure planner: from an execution's state, its workflow and `now`, what happens next."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from flowledger.domain.definitions import LoopStep, ParallelStep
from flowledger.domain.errors import ExpressionError
from flowledger.domain.execution import Execution, StepRecord, iteration_prefix
from flowledger.domain.expressions import evaluate, truthy
from flowledger.domain.states import ExecutionStatus, StepStatus
from flowledger.domain.workflow import DISPATCHED_TYPES, TOP, Workflow

S = StepStatus
_DONE = frozenset({S.COMPLETED, S.SKIPPED, S.CANCELLED, S.COMPENSATED})


@dataclass(frozen=True, slots=True)
class FireTimer:
    """A durable timer is due."""

    timer_id: str


@dataclass(frozen=True, slots=True)
class StartStep:
    """A step instance is ready: start it (or its next attempt)."""

    key: str
    step_id: str
    prefix: str


@dataclass(frozen=True, slots=True)
class SkipStep:
    """A step instance will not run: its trigger rule cannot be met."""

    key: str
    step_id: str
    prefix: str
    reason: str


@dataclass(frozen=True, slots=True)
class FinishWait:
    """A wait step's timer fired: the wait is over."""

    key: str


@dataclass(frozen=True, slots=True)
class Expire:
    """A human task's deadline, or a wait step's timeout, passed: the step fails."""

    key: str


@dataclass(frozen=True, slots=True)
class StartHandler:
    """A failed step's next error handler (or a completed step's rollback action) runs."""

    owner: str
    handler_id: str
    kind: str  # "on_error" or "rollback"


@dataclass(frozen=True, slots=True)
class Recover:
    """An error handler succeeded: the failed step completes with the handler's result."""

    key: str
    handler_key: str


@dataclass(frozen=True, slots=True)
class StartIteration:
    """A loop's next iteration begins."""

    key: str
    index: int


@dataclass(frozen=True, slots=True)
class FinishContainer:
    """A parallel or loop step is done: it completes, or fails with `error`."""

    key: str
    error: str | None = None
    capped: bool = False  # a loop stopped by loop_max_iterations, not by its condition


@dataclass(frozen=True, slots=True)
class FailStep:
    """A step fails without running (an expression or its input could not be evaluated)."""

    key: str
    error_type: str
    message: str


@dataclass(frozen=True, slots=True)
class Abort:
    """The execution stops: active steps are cancelled, then completed steps compensated."""

    status: ExecutionStatus
    reason: str


@dataclass(frozen=True, slots=True)
class MarkCompensated:
    """All rollback actions of a step finished (`ok` False: one failed for good)."""

    key: str
    ok: bool


@dataclass(frozen=True, slots=True)
class Finish:
    """The execution ends with this status."""

    status: ExecutionStatus
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class SetWaiting:
    """Nothing runs: the execution waits for a person or a timer (or runs again)."""

    waiting: bool


Decision = (
    FireTimer
    | StartStep
    | SkipStep
    | FinishWait
    | Expire
    | StartHandler
    | Recover
    | StartIteration
    | FinishContainer
    | FailStep
    | Abort
    | MarkCompensated
    | Finish
    | SetWaiting
)


@dataclass
class Plan:
    """The decisions to apply now, and when to plan again if nothing else happens."""

    decisions: list[Decision] = field(default_factory=list)
    next_wake: datetime | None = None


def handler_key(owner: str, kind: str, handler_id: str) -> str:
    """The key of a handler instance run for `owner`."""
    return f"{owner}:{kind}:{handler_id}"


def plan(ex: Execution, wf: Workflow, now: datetime) -> Plan:
    """What happens next. Applying the decisions and planning again reaches a fixpoint."""
    if ex.is_terminal:
        return Plan()
    return _Planner(ex, wf, now).run()


class _Planner:
    def __init__(self, ex: Execution, wf: Workflow, now: datetime) -> None:
        self.ex = ex
        self.wf = wf
        self.now = now
        self.out: list[Decision] = []
        self._taken = 0  # dispatched starts decided in this plan, for the concurrency limits

    def run(self) -> Plan:
        ex = self.ex
        live_timers = [
            t
            for t in ex.timers.values()
            if not t.fired
            and ex.steps[t.step_key].timer_id == t.timer_id
            and ex.steps[t.step_key].status in (S.WAITING, S.RETRYING)
        ]
        due = [FireTimer(t.timer_id) for t in live_timers if t.fire_at <= self.now]
        if due:
            return Plan(list(due))
        wakes = [t.fire_at for t in live_timers]
        if ex.status is not ExecutionStatus.COMPENSATING:
            wakes.append(ex.deadline)
        next_wake = min(wakes) if wakes else None
        self._timer_effects()
        if self.out:
            return Plan(self.out, next_wake)
        if ex.status is ExecutionStatus.COMPENSATING:
            self._compensate()
            return Plan(self.out, next_wake)
        if self.now >= ex.deadline:
            timeout = self.wf.definition.timeout
            return Plan(
                [Abort(ExecutionStatus.TIMED_OUT, f"workflow timeout of {timeout:g}s reached")],
                None,
            )
        self._failures()
        if self.out:
            return Plan(self.out, next_wake)
        self._containers()
        if self.out:
            return Plan(self.out, next_wake)
        self._ready(TOP, "")
        if self.out:
            return Plan(self.out, next_wake)
        self._finish_or_wait()
        return Plan(self.out, next_wake)

    # -- timers and retries ----------------------------------------------------------------

    def _timer_effects(self) -> None:
        for record in self.ex.steps.values():
            if record.timer_id is None:
                continue
            timer = self.ex.timers.get(record.timer_id)
            if timer is None or not timer.fired:
                continue
            if record.status is S.RETRYING:
                if self._has_slot(record):
                    self._taken += 1
                    self.out.append(StartStep(record.key, record.step_id, record.prefix))
            elif record.status is S.WAITING:
                if timer.purpose == "wait":
                    self.out.append(FinishWait(record.key))
                elif timer.purpose in ("human_deadline", "wait_timeout"):
                    self.out.append(Expire(record.key))

    # -- failures, handlers --------------------------------------------------------------

    def settled(self, key: str) -> bool:
        """Whether a step instance will not change any more (handlers included)."""
        record = self.ex.steps.get(key)
        if record is None:
            return False
        if record.status in _DONE:
            return True
        if record.status is S.FAILED:
            return self._next_handler(record) is None
        return False

    def failed_for_good(self, key: str) -> bool:
        record = self.ex.steps.get(key)
        return record is not None and record.status is S.FAILED and self.settled(key)

    def _next_handler(self, record: StepRecord) -> str | None:
        """The error handler still to try for a failed step, or None when all were tried."""
        if record.kind != "step":
            return None
        for hid in self.wf.node(record.step_id).step.error_handlers:
            status = self.ex.step_status(handler_key(record.key, "on_error", hid))
            if status is not S.FAILED and status is not S.CANCELLED:
                return hid
        return None

    def _failures(self) -> None:
        for record in list(self.ex.steps.values()):
            if record.status is not S.FAILED or record.kind != "step":
                continue
            hid = self._next_handler(record)
            if hid is not None:
                hkey = handler_key(record.key, "on_error", hid)
                status = self.ex.step_status(hkey)
                if status is S.PENDING:
                    self.out.append(StartHandler(record.key, hid, "on_error"))
                elif status is S.COMPLETED:
                    self.out.append(Recover(record.key, hkey))
                continue
            node = self.wf.node(record.step_id)
            if node.scope == TOP and not node.policy.continue_on_failure:
                error = record.error or {}
                self.out.append(
                    Abort(
                        ExecutionStatus.FAILED,
                        f"step {record.key!r} failed: {error.get('type')}: {error.get('message')}",
                    )
                )
                return

    # -- containers ----------------------------------------------------------------------

    def _containers(self) -> None:
        for record in list(self.ex.steps.values()):
            if record.status is not S.RUNNING or record.kind != "step":
                continue
            step = self.wf.node(record.step_id).step
            if isinstance(step, ParallelStep):
                self._parallel(record, step)
            elif isinstance(step, LoopStep):
                self._loop(record, step)

    def _parallel(self, record: StepRecord, step: ParallelStep) -> None:
        keys = [record.prefix + c.step_id for c in step.parallel_steps]
        total = len(keys)
        succeeded = sum(1 for k in keys if self.ex.step_status(k) is S.COMPLETED)
        lost = sum(1 for k in keys if self.settled(k) and self.ex.step_status(k) is not S.COMPLETED)
        threshold = step.parallel_failure_threshold
        if (total - lost) / total < threshold:
            # The threshold can no longer be met: fail fast (what still runs is stopped).
            self.out.append(
                FinishContainer(
                    record.key,
                    f"{lost} of {total} parallel steps did not succeed (threshold {threshold:g})",
                )
            )
        elif all(self.settled(k) for k in keys):
            self.out.append(
                FinishContainer(record.key)
                if succeeded / total >= threshold
                else FinishContainer(
                    record.key,
                    f"{lost} of {total} parallel steps did not succeed (threshold {threshold:g})",
                )
            )
        else:
            self._ready(step.step_id, record.prefix)

    def _loop(self, record: StepRecord, step: LoopStep) -> None:
        started = record.iterations
        body = [c.step_id for c in step.steps]
        failed: list[int] = []
        active: list[int] = []
        for i in range(started):
            prefix = iteration_prefix(record.key, i)
            keys = [prefix + b for b in body]
            if all(self.settled(k) for k in keys):
                if any(
                    self.failed_for_good(k)
                    and not self.wf.node(self.ex.steps[k].step_id).policy.continue_on_failure
                    for k in keys
                ):
                    failed.append(i)
            else:
                active.append(i)
        if failed:
            self.out.append(FinishContainer(record.key, f"iteration {failed[0]} failed"))
            return
        for i in active:
            self._ready(step.step_id, iteration_prefix(record.key, i))
        if self.out:
            return
        limit = self.wf.definition.max_parallel_steps
        if step.for_each is not None:
            items = record.items or []
            count = min(len(items), step.loop_max_iterations)
            width = step.max_concurrency or limit
            if started < count and len(active) < width:
                self.out.append(StartIteration(record.key, started))
            elif started >= count and not active:
                capped = len(items) > step.loop_max_iterations
                self.out.append(FinishContainer(record.key, capped=capped))
            return
        if active:
            return
        doc = dict(self.ex.data)
        doc["_"] = {"iteration": started, "item": None, "index": started}
        try:
            go_on = truthy(evaluate(step.loop_condition or "`false`", doc))
        except ExpressionError as exc:
            self.out.append(FinishContainer(record.key, str(exc)))
            return
        if go_on and started < step.loop_max_iterations:
            self.out.append(StartIteration(record.key, started))
        else:
            # Capped only if the condition still wanted another iteration.
            self.out.append(FinishContainer(record.key, capped=go_on))

    # -- ready steps and trigger rules ---------------------------------------------------

    def _ready(self, scope: str, prefix: str) -> None:
        for step_id in self.wf.members[scope]:
            key = prefix + step_id
            if self.ex.step_status(key) is not S.PENDING:  # decided (a retry's reset is not)
                continue
            node = self.wf.node(step_id)
            verdict: Literal[True] | str | None
            if node.branch_of is not None and not self._chosen(prefix + node.branch_of):
                # A branch target is decided only once its condition has chosen: whatever
                # its trigger rule, it never runs (nor is skipped twice) before that.
                owner = prefix + node.branch_of
                if not self.settled(owner):
                    continue
                verdict = f"condition {node.branch_of!r} did not run"
            else:
                verdict = self._trigger(node.step.trigger_rule, [prefix + d for d in node.deps])
            if verdict is None:
                continue
            if verdict is True:
                if node.step.type in DISPATCHED_TYPES:
                    if not self._has_slot_for(scope, prefix):
                        continue
                    self._taken += 1
                self.out.append(StartStep(key, step_id, prefix))
            else:
                self.out.append(SkipStep(key, step_id, prefix, verdict))

    def _chosen(self, condition_key: str) -> bool:
        return self.ex.step_status(condition_key) is S.COMPLETED

    def _trigger(self, rule: str, deps: list[str]) -> Literal[True] | str | None:
        """True: run; a string: skip for that reason; None: not decided yet."""
        if not deps:
            return True
        statuses = {d: self.ex.step_status(d) for d in deps}
        done = {d: self.settled(d) for d in deps}
        ok = [d for d in deps if done[d] and statuses[d] is S.COMPLETED]
        bad = [d for d in deps if done[d] and statuses[d] in (S.FAILED, S.CANCELLED)]
        skipped = [d for d in deps if done[d] and statuses[d] is S.SKIPPED]
        if rule == "one_success":
            if ok:
                return True
            return "no dependency succeeded" if all(done.values()) else None
        if not all(done.values()):
            if rule == "all_success" and (bad or skipped):
                return _reason(rule, bad, skipped)
            return None
        if rule == "all_done":
            return True
        if rule == "all_success":
            return True if len(ok) == len(deps) else _reason(rule, bad, skipped)
        # none_failed: succeeded or skipped, and at least one succeeded
        if bad:
            return _reason(rule, bad, [])
        return True if ok else "every dependency was skipped"

    def _has_slot(self, record: StepRecord) -> bool:
        node = self.wf.node(record.step_id)
        return self._has_slot_for(node.scope, record.prefix, own=record.key)

    def _has_slot_for(self, scope: str, prefix: str, own: str | None = None) -> bool:
        """Whether a step may start; `own` is a retrying step, whose slot is its own."""
        running = sum(
            1
            for r in self.ex.steps.values()
            if r.status is S.RUNNING and self.wf.node(r.step_id).step.type in DISPATCHED_TYPES
        )
        if running + self._taken >= self.wf.definition.max_parallel_steps:
            return False
        container = self.wf.nodes.get(scope)
        if container is not None and isinstance(container.step, ParallelStep):
            width = container.step.max_concurrency or self.wf.definition.max_parallel_steps
            members = [prefix + c for c in self.wf.members[scope]]
            busy = {
                k
                for k in members
                if self.ex.step_status(k) is not S.PENDING and not self.settled(k)
            }
            busy |= {d.key for d in self.out if isinstance(d, StartStep) and d.key in members}
            busy.discard(own or "")
            return len(busy) < width
        return True

    # -- ending ----------------------------------------------------------------------------

    def _finish_or_wait(self) -> None:
        top = self.wf.members[TOP]
        if all(self.settled(k) for k in top):
            self.out.append(Finish(ExecutionStatus.COMPLETED))
            return
        leaves = [r for r in self.ex.steps.values() if self.wf.node(r.step_id).is_leaf]
        running = any(r.status in (S.RUNNING, S.RETRYING) for r in leaves)
        waiting = any(r.status is S.WAITING for r in leaves)
        if self.ex.status is ExecutionStatus.RUNNING and waiting and not running:
            self.out.append(SetWaiting(True))
        elif self.ex.status is ExecutionStatus.WAITING and (running or not waiting):
            self.out.append(SetWaiting(False))

    def _compensate(self) -> None:
        comp = self.ex.compensation
        if comp is None:
            return
        for key, handlers in comp.plan:
            if key in comp.failed or self.ex.step_status(key) is S.COMPENSATED:
                continue
            for hid in handlers:
                hkey = handler_key(key, "rollback", hid)
                status = self.ex.step_status(hkey)
                if status is S.COMPLETED:
                    continue
                if status is S.PENDING:
                    self.out.append(StartHandler(key, hid, "rollback"))
                elif status in (S.FAILED, S.CANCELLED):
                    self.out.append(MarkCompensated(key, ok=False))
                return  # rollbacks run one at a time, in plan order
            self.out.append(MarkCompensated(key, ok=True))
            return
        reason = comp.reason
        if comp.failed:
            reason += f"; compensation failed for {', '.join(comp.failed)}"
        self.out.append(Finish(comp.final_status, reason))


def _reason(rule: str, bad: list[str], skipped: list[str]) -> str:
    parts = []
    if bad:
        parts.append(f"{', '.join(bad)} did not succeed")
    if skipped:
        parts.append(f"{', '.join(skipped)} skipped")
    return f"{rule}: " + "; ".join(parts)


def iter_leaf_keys(ex: Execution, wf: Workflow) -> Iterator[StepRecord]:
    """Step records of leaf steps (actions, webhooks, waits, human tasks)."""
    for record in ex.steps.values():
        if wf.node(record.step_id).is_leaf:
            yield record
