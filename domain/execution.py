"""The Execution aggregate: one workflow run, its state always rebuilt from its events."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Self
from uuid import UUID

from eventsourcing.domain import Aggregate, CanInitAggregate, CanMutateAggregate, event
from eventsourcing.utils import get_topic

from flowledger.domain.audit import event_hash
from flowledger.domain.errors import InvalidTransition
from flowledger.domain.states import (
    ACTIVE_STEP_STATUSES,
    TERMINAL_EXECUTION_STATUSES,
    ExecutionStatus,
    ExecutionTrigger,
    StepStatus,
    StepTrigger,
    execution_move,
    step_move,
)

JSON = dict[str, Any]


@dataclass
class StepRecord:
    """What the events say about one step instance."""

    key: str
    step_id: str
    prefix: str
    kind: str = "step"  # "step", "on_error" (error handler) or "rollback" (compensation)
    owner: str | None = None  # for handlers: the key of the step they handle
    status: StepStatus = StepStatus.PENDING
    attempt: int = 0  # the number of its last attempt; it never goes back, even on a retry
    # Attempts made before the execution's last retry: the retry budget counts from here.
    attempt_base: int = 0
    attempt_id: str = ""
    input: Any = None
    result: Any = None
    error: JSON | None = None
    first_started_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    recovered_by: str | None = None
    completion_seq: int = 0
    timer_id: str | None = None
    items: list[Any] | None = None  # for_each: the items, resolved once when the loop starts
    iterations: int = 0  # loops: iterations started
    assignee: str | None = None
    agent: str | None = None  # the remote agent that ran its last ended attempt, if named
    route: str | None = None  # why that attempt went to that agent (adaptive routing)
    cache_key: str | None = None  # its last attempt's step-cache key (a cached step)
    # Served from the step cache: {"execution_id", "step_key", "cached_at"} of the source.
    cached_from: JSON | None = None


@dataclass
class Timer:
    """A durable timer: set and fired by events, so it fires once across restarts."""

    timer_id: str
    step_key: str
    purpose: str  # "retry", "wait", "wait_timeout" or "human_deadline"
    fire_at: datetime
    fired: bool = False


@dataclass
class Compensation:
    """The rollback plan fixed when compensation starts, in reverse completion order."""

    final_status: ExecutionStatus
    reason: str
    plan: list[tuple[str, list[str]]] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


class Execution(Aggregate):
    """A workflow execution. Commands check the transition tables, events only assign."""

    id: UUID  # given by the caller: deterministic where a retry must not duplicate

    class Event(Aggregate.Event):
        """Every execution event carries `hash`, chained over the one before (domain/audit.py).

        The hash is computed from the event's fields before the event is made (in
        `trigger_event` and `_create`); applying an event only assigns it as `last_hash`.
        """

        hash: str | None  # None: recorded before hashing (class_version 1)

        class_version = 2

        @staticmethod
        def upcast_v1_v2(state: dict[str, Any]) -> None:
            """Version 1 had no hash: None says "recorded before hashing, unverifiable"."""
            state.setdefault("hash", None)

        def apply(self, aggregate: Any) -> None:
            aggregate.last_hash = self.hash

    @classmethod
    def _create(
        cls,
        event_class: type[CanInitAggregate[UUID]],
        *,
        id: UUID | None = None,
        **kwargs: Any,
    ) -> Self:
        """Hash ExecutionStarted from its fields before eventsourcing makes it (frozen)."""
        originator_id = id if id is not None else cls.create_id()
        timestamp = kwargs.pop("timestamp", None) or event_class.create_timestamp()
        digest = event_hash(
            None,
            get_topic(event_class),
            originator_id,
            cls.INITIAL_VERSION,
            timestamp,
            {**kwargs, "originator_topic": get_topic(cls)},
        )
        return super()._create(
            event_class, id=originator_id, timestamp=timestamp, hash=digest, **kwargs
        )

    def trigger_event(self, event_class: type[CanMutateAggregate[UUID]], **kwargs: Any) -> None:
        """Hash each later event from its fields and the last hash, before it is made."""
        timestamp = kwargs.pop("timestamp", None) or event_class.create_timestamp()
        digest = event_hash(
            self.last_hash, get_topic(event_class), self.id, self.version + 1, timestamp, kwargs
        )
        super().trigger_event(event_class, timestamp=timestamp, hash=digest, **kwargs)

    @event("ExecutionStarted")
    def __init__(
        self,
        workflow_id: str,
        workflow_version: str,
        input: JSON,
        idempotency_key: str | None,
        seed: int,
        deadline: datetime,
        at: datetime,
    ) -> None:
        self.workflow_id = workflow_id
        self.workflow_version = workflow_version
        self.input = input
        self.idempotency_key = idempotency_key
        self.seed = seed
        self.deadline = deadline
        self.started_at = at
        self.finished_at: datetime | None = None
        self.status = execution_move(ExecutionStatus.PENDING, ExecutionTrigger.START)
        self.data: JSON = copy_json(input)
        self.steps: dict[str, StepRecord] = {}
        self.timers: dict[str, Timer] = {}
        self.iteration_scopes: dict[str, JSON] = {}  # iteration prefix -> the `_` document
        self.completions = 0
        self.compensation: Compensation | None = None
        self.reason: str | None = None
        self.last_hash: str | None = None  # the hash of the last event (its `apply` sets it)

    @classmethod
    def begin(
        cls,
        execution_id: UUID,
        workflow_id: str,
        workflow_version: str,
        input: JSON,
        idempotency_key: str | None,
        seed: int,
        deadline: datetime,
        at: datetime,
    ) -> Execution:
        """Start an execution under an id chosen by the caller (uuid5 of an idempotency key)."""
        return cls(
            id=execution_id,
            workflow_id=workflow_id,  # type: ignore[call-arg]
            workflow_version=workflow_version,
            input=input,
            idempotency_key=idempotency_key,
            seed=seed,
            deadline=deadline,
            at=at,
        )

    # -- queries -------------------------------------------------------------------------

    @property
    def execution_id(self) -> UUID:
        """The execution's id."""
        return self.id

    @property
    def is_terminal(self) -> bool:
        """Whether the execution has ended."""
        return self.status in TERMINAL_EXECUTION_STATUSES

    def step_status(self, key: str) -> StepStatus:
        """The status of a step instance; one that has no record yet is pending."""
        record = self.steps.get(key)
        return record.status if record is not None else StepStatus.PENDING

    def _record(self, key: str) -> StepRecord:
        record = self.steps.get(key)
        if record is None:
            raise InvalidTransition(f"step {key!r} has not started")
        return record

    def _require(self, key: str, trigger: StepTrigger) -> StepStatus:
        return step_move(key, self.step_status(key), trigger)

    def _require_live(self) -> None:
        if self.is_terminal:
            raise InvalidTransition(f"execution is {self.status.value}")

    # -- step commands -------------------------------------------------------------------

    def start_step(
        self,
        key: str,
        step_id: str,
        prefix: str,
        step_input: Any,
        at: datetime,
        *,
        kind: str = "step",
        owner: str | None = None,
        items: list[Any] | None = None,
        cache_key: str | None = None,
    ) -> str:
        """Start the next attempt of a step instance; returns the attempt id. `cache_key`
        names the attempt's result in the step cache (a cached step's attempts only)."""
        self._require_live()
        self._require(key, StepTrigger.START)
        record = self.steps.get(key)
        attempt = (record.attempt if record else 0) + 1
        attempt_id = f"{self.id}/{key}/{attempt}"
        self._step_started(
            key=key,
            step_id=step_id,
            prefix=prefix,
            kind=kind,
            owner=owner,
            attempt=attempt,
            attempt_id=attempt_id,
            input=step_input,
            items=items,
            at=at,
            cache_key=cache_key,
        )
        return attempt_id

    # `cache_key` came after the first stored events: one without it reads as None.
    @event("StepStarted")
    def _step_started(
        self,
        key: str,
        step_id: str,
        prefix: str,
        kind: str,
        owner: str | None,
        attempt: int,
        attempt_id: str,
        input: Any,
        items: list[Any] | None,
        at: datetime,
        cache_key: str | None = None,
    ) -> None:
        record = self._begin(key, step_id, prefix, kind, owner, attempt, attempt_id, input, at)
        if items is not None:
            record.items = items
        record.cache_key = cache_key

    def _begin(
        self,
        key: str,
        step_id: str,
        prefix: str,
        kind: str,
        owner: str | None,
        attempt: int,
        attempt_id: str,
        step_input: Any,
        at: datetime,
    ) -> StepRecord:
        record = self.steps.get(key)
        if record is None:
            record = StepRecord(key=key, step_id=step_id, prefix=prefix, kind=kind, owner=owner)
            self.steps[key] = record
        if record.first_started_at is None:  # new, or reset by a retry after it was skipped
            record.first_started_at = at
        record.status = StepStatus.RUNNING
        record.attempt = attempt
        record.attempt_id = attempt_id
        record.input = step_input
        record.started_at = at
        return record

    def wait_step(
        self,
        key: str,
        step_id: str,
        prefix: str,
        step_input: Any,
        purpose: str,
        fire_at: datetime | None,
        at: datetime,
        *,
        kind: str = "step",
        owner: str | None = None,
        assignee: str | None = None,
    ) -> None:
        """Put a wait or human-task step into waiting, with its durable timer if it has one."""
        self._require_live()
        self._require(key, StepTrigger.WAIT)
        record = self.steps.get(key)
        attempt = (record.attempt if record else 0) + 1
        timer_id = f"{key}#{purpose}{attempt}" if fire_at is not None else None
        self._step_waiting(
            key=key,
            step_id=step_id,
            prefix=prefix,
            kind=kind,
            owner=owner,
            attempt=attempt,
            attempt_id=f"{self.id}/{key}/{attempt}",
            input=step_input,
            purpose=purpose,
            timer_id=timer_id,
            fire_at=fire_at,
            assignee=assignee,
            at=at,
        )

    @event("StepWaiting")
    def _step_waiting(
        self,
        key: str,
        step_id: str,
        prefix: str,
        kind: str,
        owner: str | None,
        attempt: int,
        attempt_id: str,
        input: Any,
        purpose: str,
        timer_id: str | None,
        fire_at: datetime | None,
        assignee: str | None,
        at: datetime,
    ) -> None:
        record = self._begin(key, step_id, prefix, kind, owner, attempt, attempt_id, input, at)
        record.status = StepStatus.WAITING
        record.assignee = assignee
        record.timer_id = timer_id
        if timer_id is not None and fire_at is not None:
            self.timers[timer_id] = Timer(timer_id, key, purpose, fire_at)

    def succeed_step(
        self,
        key: str,
        result: Any,
        patch: JSON,
        at: datetime,
        agent: str | None = None,
        route: str | None = None,
    ) -> None:
        """Record a step's result and the data it writes (and the agent that ran it, when
        the attempt ran on a remote agent, with why it was routed there)."""
        self._require_live()
        self._require(key, StepTrigger.SUCCEED)
        self._step_succeeded(key=key, result=result, patch=patch, at=at, agent=agent, route=route)

    # `agent`, then `route`, came after the first stored events: one without reads as None.
    @event("StepSucceeded")
    def _step_succeeded(
        self,
        key: str,
        result: Any,
        patch: JSON,
        at: datetime,
        agent: str | None = None,
        route: str | None = None,
    ) -> None:
        self._complete(key, result, patch, at)
        self.steps[key].agent = agent
        self.steps[key].route = route

    def complete_human_task(self, key: str, answer: JSON, patch: JSON, at: datetime) -> None:
        """Record a person's answer to a waiting human task as the step's result."""
        self._require_live()
        record = self._record(key)
        if record.status is not StepStatus.WAITING or (
            record.timer_id is not None
            and (self.timers[record.timer_id].purpose != "human_deadline")
        ):
            raise InvalidTransition(
                f"step {key!r} is {record.status.value}, not a human task waiting for an answer"
            )
        self._require(key, StepTrigger.SUCCEED)
        self._human_task_completed(key=key, result=answer, patch=patch, at=at)

    @event("HumanTaskCompleted")
    def _human_task_completed(self, key: str, result: Any, patch: JSON, at: datetime) -> None:
        self._complete(key, result, patch, at)

    def serve_from_cache(
        self,
        key: str,
        result: JSON,
        patch: JSON,
        cache_key: str,
        source_execution_id: str,
        source_step_key: str,
        cached_at: datetime,
        at: datetime,
    ) -> None:
        """Complete a running attempt with the result an earlier success with the same
        cache key produced (in execution `source_execution_id`, step `source_step_key`,
        at `cached_at`) instead of running it."""
        self._require_live()
        record = self._record(key)
        if record.status is not StepStatus.RUNNING or record.cache_key != cache_key:
            raise InvalidTransition(
                f"step {key!r} is {record.status.value}, not an attempt running with "
                f"cache key {cache_key!r}"
            )
        self._require(key, StepTrigger.SUCCEED)
        self._step_served_from_cache(
            key=key,
            attempt_id=record.attempt_id,
            result=result,
            patch=patch,
            cache_key=cache_key,
            source_execution_id=source_execution_id,
            source_step_key=source_step_key,
            cached_at=cached_at,
            at=at,
        )

    @event("StepServedFromCache")
    def _step_served_from_cache(
        self,
        key: str,
        attempt_id: str,
        result: JSON,
        patch: JSON,
        cache_key: str,
        source_execution_id: str,
        source_step_key: str,
        cached_at: datetime,
        at: datetime,
    ) -> None:
        self._complete(key, result, patch, at)
        record = self.steps[key]
        record.agent = record.route = None  # no agent ran it, nothing was routed
        record.cached_from = {
            "execution_id": source_execution_id,
            "step_key": source_step_key,
            "cached_at": cached_at.isoformat(),
        }

    def _complete(self, key: str, result: Any, patch: JSON, at: datetime) -> None:
        record = self.steps[key]
        record.status = StepStatus.COMPLETED
        record.result = result
        record.finished_at = at
        self.completions += 1
        record.completion_seq = self.completions
        self.data.update(patch)

    def fail_step(
        self,
        key: str,
        error: JSON,
        at: datetime,
        agent: str | None = None,
        route: str | None = None,
    ) -> None:
        """Record that a step failed for good (no retry left, or not retryable)."""
        self._require_live()
        self._require(key, StepTrigger.FAIL)
        self._step_failed(key=key, error=error, at=at, agent=agent, route=route)

    @event("StepFailed")
    def _step_failed(
        self,
        key: str,
        error: JSON,
        at: datetime,
        agent: str | None = None,
        route: str | None = None,
    ) -> None:
        record = self.steps[key]
        record.status = StepStatus.FAILED
        record.error = error
        record.finished_at = at
        record.agent = agent
        record.route = route

    def schedule_retry(
        self,
        key: str,
        error: JSON,
        delay: float,
        fire_at: datetime,
        at: datetime,
        agent: str | None = None,
        route: str | None = None,
    ) -> None:
        """Record a failed attempt and the durable timer for the next one."""
        self._require_live()
        self._require(key, StepTrigger.SCHEDULE_RETRY)
        record = self.steps[key]
        self._step_retry_scheduled(
            key=key,
            error=error,
            delay=delay,
            timer_id=f"{key}#retry{record.attempt}",
            fire_at=fire_at,
            at=at,
            agent=agent,
            route=route,
        )

    @event("StepRetryScheduled")
    def _step_retry_scheduled(
        self,
        key: str,
        error: JSON,
        delay: float,
        timer_id: str,
        fire_at: datetime,
        at: datetime,
        agent: str | None = None,
        route: str | None = None,
    ) -> None:
        record = self.steps[key]
        record.status = StepStatus.RETRYING
        record.error = error
        record.agent = agent
        record.route = route
        record.timer_id = timer_id
        self.timers[timer_id] = Timer(timer_id, key, "retry", fire_at)

    def skip_step(self, key: str, step_id: str, prefix: str, reason: str, at: datetime) -> None:
        """Record that a step will not run (trigger rule or branch not taken)."""
        self._require_live()
        self._require(key, StepTrigger.SKIP)
        self._step_skipped(key=key, step_id=step_id, prefix=prefix, reason=reason, at=at)

    @event("StepSkipped")
    def _step_skipped(self, key: str, step_id: str, prefix: str, reason: str, at: datetime) -> None:
        self._skip(key, step_id, prefix, reason, at)

    def _skip(self, key: str, step_id: str, prefix: str, reason: str, at: datetime) -> None:
        record = StepRecord(key=key, step_id=step_id, prefix=prefix, status=StepStatus.SKIPPED)
        record.attempt = self._attempts_so_far(key)
        record.error = {"type": "Skipped", "message": reason, "retryable": False}
        record.finished_at = at
        self.steps[key] = record

    def cancel_step(self, key: str, reason: str, at: datetime) -> None:
        """Record that an active step was stopped (execution failing, timing out or cancelled)."""
        self._require_live()
        self._require(key, StepTrigger.CANCEL)
        self._step_cancelled(key=key, reason=reason, at=at)

    @event("StepCancelled")
    def _step_cancelled(self, key: str, reason: str, at: datetime) -> None:
        record = self.steps.get(key)
        if record is None:
            return
        record.status = StepStatus.CANCELLED
        record.error = {"type": "Cancelled", "message": reason, "retryable": False}
        record.finished_at = at

    def recover_step(
        self, key: str, handler_key: str, handler_id: str, result: Any, patch: JSON, at: datetime
    ) -> None:
        """Record that an error handler recovered a failed step with its result."""
        self._require_live()
        self._require(key, StepTrigger.RECOVER)
        self._step_recovered(
            key=key,
            handler_key=handler_key,
            handler_id=handler_id,
            result=result,
            patch=patch,
            at=at,
        )

    @event("StepRecovered")
    def _step_recovered(
        self, key: str, handler_key: str, handler_id: str, result: Any, patch: JSON, at: datetime
    ) -> None:
        self._complete(key, result, patch, at)
        self.steps[key].recovered_by = handler_id

    def select_branch(
        self,
        key: str,
        step_id: str,
        prefix: str,
        branch: int | None,
        selected: list[str],
        skipped: list[tuple[str, str]],
        result: JSON,
        patch: JSON,
        at: datetime,
    ) -> None:
        """Record a condition's choice: it completes, and the branches not taken are skipped."""
        self._require_live()
        running = step_move(key, self.step_status(key), StepTrigger.START)
        step_move(key, running, StepTrigger.SUCCEED)
        for skipped_key, _ in skipped:
            self._require(skipped_key, StepTrigger.SKIP)
        self._branch_selected(
            key=key,
            step_id=step_id,
            prefix=prefix,
            branch=branch,
            selected=selected,
            skipped=[list(s) for s in skipped],
            result=result,
            patch=patch,
            at=at,
        )

    @event("BranchSelected")
    def _branch_selected(
        self,
        key: str,
        step_id: str,
        prefix: str,
        branch: int | None,
        selected: list[str],
        skipped: list[list[str]],
        result: JSON,
        patch: JSON,
        at: datetime,
    ) -> None:
        attempt = self._attempts_so_far(key) + 1
        record = StepRecord(key=key, step_id=step_id, prefix=prefix, attempt=attempt)
        record.first_started_at = record.started_at = at
        self.steps[key] = record
        self._complete(key, result, patch, at)
        for skipped_key, skipped_id in skipped:
            self._skip(skipped_key, skipped_id, prefix, f"branch not taken by {step_id!r}", at)

    def start_iteration(self, key: str, index: int, scope: JSON, at: datetime) -> None:
        """Record the start of a loop iteration (its `_` document: iteration, item, index)."""
        self._require_live()
        record = self._record(key)
        if record.status is not StepStatus.RUNNING or index != record.iterations:
            raise InvalidTransition(f"loop {key!r} cannot start iteration {index}")
        self._loop_iteration_started(key=key, index=index, scope=scope, at=at)

    @event("LoopIterationStarted")
    def _loop_iteration_started(self, key: str, index: int, scope: JSON, at: datetime) -> None:
        self.steps[key].iterations = index + 1
        self.iteration_scopes[iteration_prefix(key, index)] = scope

    def fire_timer(self, timer_id: str, at: datetime) -> None:
        """Record that a durable timer fired; a timer fires once."""
        self._require_live()
        timer = self.timers.get(timer_id)
        if timer is None or timer.fired:
            raise InvalidTransition(f"timer {timer_id!r} is not pending")
        self._timer_fired(timer_id=timer_id, at=at)

    @event("TimerFired")
    def _timer_fired(self, timer_id: str, at: datetime) -> None:
        self.timers[timer_id].fired = True

    # -- execution commands --------------------------------------------------------------

    def mark_waiting(self, at: datetime) -> None:
        """Record that nothing runs until a person or a timer acts."""
        execution_move(self.status, ExecutionTrigger.WAIT)
        self._execution_waiting(at=at)

    @event("ExecutionWaiting")
    def _execution_waiting(self, at: datetime) -> None:
        self.status = ExecutionStatus.WAITING

    def mark_resumed(self, at: datetime) -> None:
        """Record that a waiting execution runs again."""
        execution_move(self.status, ExecutionTrigger.RESUME)
        self._execution_resumed(at=at)

    @event("ExecutionResumed")
    def _execution_resumed(self, at: datetime) -> None:
        self.status = ExecutionStatus.RUNNING

    def start_compensation(
        self,
        final_status: ExecutionStatus,
        reason: str,
        plan: list[tuple[str, list[str]]],
        at: datetime,
    ) -> None:
        """Record the rollback plan; the execution compensates before it ends."""
        execution_move(self.status, ExecutionTrigger.COMPENSATE)
        self._compensation_started(
            final_status=final_status.value,
            reason=reason,
            plan=[[k, list(h)] for k, h in plan],
            at=at,
        )

    @event("CompensationStarted")
    def _compensation_started(
        self, final_status: str, reason: str, plan: list[list[Any]], at: datetime
    ) -> None:
        self.status = ExecutionStatus.COMPENSATING
        self.reason = reason
        self.compensation = Compensation(
            ExecutionStatus(final_status), reason, [(str(k), list(h)) for k, h in plan]
        )

    def mark_compensated(self, key: str, ok: bool, at: datetime) -> None:
        """Record the end of one step's rollback actions (`ok` False: one of them failed)."""
        self._require_live()
        if self.compensation is None:
            raise InvalidTransition("execution is not compensating")
        if ok:
            self._require(key, StepTrigger.COMPENSATE)
        self._step_compensated(key=key, ok=ok, at=at)

    @event("StepCompensated")
    def _step_compensated(self, key: str, ok: bool, at: datetime) -> None:
        if self.compensation is None:
            return
        if ok:
            self.steps[key].status = StepStatus.COMPENSATED
        else:
            self.compensation.failed.append(key)

    def finish(self, status: ExecutionStatus, reason: str | None, at: datetime) -> None:
        """Record the end of the execution with its final status."""
        trigger = {
            ExecutionStatus.COMPLETED: ExecutionTrigger.COMPLETE,
            ExecutionStatus.FAILED: ExecutionTrigger.FAIL,
            ExecutionStatus.TIMED_OUT: ExecutionTrigger.TIME_OUT,
            ExecutionStatus.CANCELLED: ExecutionTrigger.CANCEL,
        }[status]
        execution_move(self.status, trigger)
        if status is ExecutionStatus.COMPLETED:
            self._execution_completed(at=at)
        elif status is ExecutionStatus.FAILED:
            self._execution_failed(reason=reason or "failed", at=at)
        elif status is ExecutionStatus.TIMED_OUT:
            self._execution_timed_out(reason=reason or "timed out", at=at)
        else:
            self._execution_cancelled(reason=reason or "cancelled", at=at)

    @event("ExecutionCompleted")
    def _execution_completed(self, at: datetime) -> None:
        self._end(ExecutionStatus.COMPLETED, None, at)

    @event("ExecutionFailed")
    def _execution_failed(self, reason: str, at: datetime) -> None:
        self._end(ExecutionStatus.FAILED, reason, at)

    @event("ExecutionTimedOut")
    def _execution_timed_out(self, reason: str, at: datetime) -> None:
        self._end(ExecutionStatus.TIMED_OUT, reason, at)

    @event("ExecutionCancelled")
    def _execution_cancelled(self, reason: str, at: datetime) -> None:
        self._end(ExecutionStatus.CANCELLED, reason, at)

    def _end(self, status: ExecutionStatus, reason: str | None, at: datetime) -> None:
        self.status = status
        self.finished_at = at
        if reason is not None:
            self.reason = reason

    def retry(
        self,
        reason: str,
        deadline: datetime,
        reset: list[str],
        resumed: list[str],
        at: datetime,
    ) -> None:
        """Record that an execution that ended without completing runs again.

        `reset` step instances go back to pending (the planner starts them afresh; their
        attempt numbers count on from the attempts they had, their retry budget starts
        again), `resumed` containers back to running with what they had done; the
        execution gets a new `deadline`. Which steps those are is progress.retry's choice.
        """
        execution_move(self.status, ExecutionTrigger.RETRY)
        if self.compensation is not None:
            raise InvalidTransition("a compensated execution cannot run again")
        if len(set(reset) | set(resumed)) != len(reset) + len(resumed):
            raise InvalidTransition("a step instance is reset or resumed once")
        for key in reset:
            self._require(key, StepTrigger.RESET)
        for key in resumed:
            self._require(key, StepTrigger.RESUME)
        self._execution_retried(
            reason=reason,
            deadline=deadline,
            reset={key: self.steps[key].attempt for key in reset},
            resumed=list(resumed),
            at=at,
        )

    @event("ExecutionRetried")
    def _execution_retried(
        self,
        reason: str,
        deadline: datetime,
        reset: dict[str, int],
        resumed: list[str],
        at: datetime,
    ) -> None:
        self.status = ExecutionStatus.RUNNING
        self.deadline = deadline
        self.finished_at = None
        self.reason = None
        for key, attempts in reset.items():
            record = self.steps[key]
            record.status = StepStatus.PENDING
            record.attempt = record.attempt_base = attempts
            record.finished_at = None
            record.timer_id = None
        for key in resumed:
            record = self.steps[key]
            record.status = StepStatus.RUNNING
            record.finished_at = None

    # -- helpers -------------------------------------------------------------------------

    def active_steps(self) -> list[StepRecord]:
        """Step instances that are running, retrying or waiting."""
        return [r for r in self.steps.values() if r.status in ACTIVE_STEP_STATUSES]

    def _attempts_so_far(self, key: str) -> int:
        # Only a step instance a retry reset has a record before it is decided again.
        record = self.steps.get(key)
        return record.attempt if record is not None else 0


def iteration_prefix(loop_key: str, index: int) -> str:
    """The key prefix of the step instances of one loop iteration."""
    return f"{loop_key}[{index}]/"


def copy_json(value: JSON) -> JSON:
    """A deep copy of a JSON object.

    Events hold the values they were given; live state must never alias them (nor what an
    in-process agent holds), or a later change would rewrite what was recorded.
    """
    return {k: copy_any(v) for k, v in value.items()}


def copy_any(value: Any) -> Any:
    """A deep copy of a JSON value (dicts and lists; scalars are immutable)."""
    if isinstance(value, dict):
        return {k: copy_any(v) for k, v in value.items()}
    if isinstance(value, list):
        return [copy_any(v) for v in value]
    return value
