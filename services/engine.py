"""The asyncio engine: persists every decision before acting on it, runs attempts, keeps timers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeVar
from uuid import UUID, uuid4

from eventsourcing.persistence import IntegrityError

from flowledger.domain.definitions import WorkflowDefinition
from flowledger.domain.errors import FlowledgerError
from flowledger.domain.execution import Execution
from flowledger.domain.progress import (
    Dispatch,
    advance,
    cancel,
    complete_human_task,
    fail_attempt,
    is_settled,
    retry,
    serve_from_cache,
    succeed_attempt,
)
from flowledger.domain.states import StepStatus
from flowledger.domain.workflow import DISPATCHED_TYPES, Workflow
from flowledger.services.app import FlowledgerApp
from flowledger.services.committer import Committer
from flowledger.services.follow import (
    follow_until_settled,
    submit_cancel,
    submit_completion,
    submit_retry,
)
from flowledger.services.ports import (
    AttemptFailed,
    CachedResult,
    Clock,
    Ran,
    StepCache,
    StepRunner,
    SystemClock,
)

log = logging.getLogger(__name__)
T = TypeVar("T")
FOLLOW_INTERVAL = 0.25  # how often to look for the outcome of another process's attempt
# An execution with nothing running and no timer due sooner than this is let go of (only
# its next timer is kept) and loaded again when something happens to it.
DORMANT_AFTER = 30.0
Listener = Callable[[Execution], None]
Owner = Callable[[UUID], bool]  # which executions this engine drives (scale-out)
# An attempt's error, its output, or the cached output it was served instead of running.
Outcome = tuple[str, str, bool | None] | dict[str, Any] | CachedResult
# An attempt, its outcome, the agent named and why the attempt was routed to it.
Ended = tuple[Dispatch, Outcome, str | None, str | None]


@dataclass
class _Live:
    ex: Execution
    wf: Workflow
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    tasks: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    wake: asyncio.TimerHandle | None = None
    wake_at: datetime | None = None  # when `wake` fires
    follow: asyncio.TimerHandle | None = None  # see Engine._follow_others
    # Outcomes of attempts that ended while another was being recorded: they go into the
    # next commit together (a fan-out's results take a few commits, not one each).
    outcomes: list[Ended] = field(default_factory=list)
    recording: bool = False  # an attempt's task is recording `outcomes`


class _LetGo(Exception):
    """The execution is driven by another engine (see Engine.set_owner)."""


@dataclass
class _Dormant:
    """An execution not held in memory: it waits for a person or for a distant timer."""

    settled: bool  # it needs a person (is_settled), not only a timer
    version: int  # its version when let go of: a newer one in the store was written elsewhere
    wake: asyncio.TimerHandle | None  # its next timer, which loads it again


class Engine:
    """Drives executions: plan, commit, then run attempts; resume everything on start."""

    def __init__(
        self,
        app: FlowledgerApp,
        runner: StepRunner,
        clock: Clock | None = None,
        *,
        max_batch: int = 256,
        crash_at: str | None = None,
        cache: StepCache | None = None,
    ) -> None:
        self.app = app
        self.runner = runner
        self.clock = clock or SystemClock()
        self.cache = cache  # None: cached steps always run
        self._store = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flowledger-store")
        # crash_at: a test-only kill point for the crash tests (see Committer).
        self._committer = Committer(app, self._store, max_batch=max_batch, crash_at=crash_at)
        self._live: dict[UUID, _Live] = {}
        self._dormant: dict[UUID, _Dormant] = {}
        self._pinned: dict[UUID, int] = {}  # executions a caller is about to act on
        self._waiters: dict[UUID, list[asyncio.Future[Execution]]] = {}
        self._idle: list[asyncio.Future[None]] = []
        self._background: set[asyncio.Task[None]] = set()
        self._listeners: list[Listener] = []
        self._fatal: BaseException | None = None
        self._store_position = 0
        self._polling = asyncio.Lock()
        self._owner: Owner | None = None  # None: every execution in the store
        self.skipped: dict[UUID, set[str]] = {}  # executions left alone: actions not offered

    # -- store access (one thread: the eventsourcing application is synchronous) ----------

    async def _io(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._store, fn, *args)

    async def close(self) -> None:
        """Stop running attempts and timers (nothing is recorded for them) and the store."""
        for dormant in self._dormant.values():
            if dormant.wake is not None:
                dormant.wake.cancel()
        for live in self._live.values():
            for handle in (live.wake, live.follow):
                if handle is not None:
                    handle.cancel()
            for task in live.tasks.values():
                task.cancel()
        tasks = [t for live in self._live.values() for t in live.tasks.values()]
        tasks += list(self._background)
        await asyncio.gather(*tasks, return_exceptions=True)
        self._store.shutdown(wait=True)

    @property
    def commits(self) -> int:
        """Group commits this engine has made (each one transaction of one or more saves)."""
        return self._committer.batches

    @property
    def driven(self) -> int:
        """Executions this engine holds in memory and drives now."""
        return len(self._live)

    @property
    def dormant(self) -> int:
        """Executions this engine drives but does not hold in memory: they wait for a person
        or a distant timer, and are loaded again when something happens to them."""
        return len(self._dormant)

    def owns(self, execution_id: UUID) -> bool:
        """Whether this engine drives the execution (all of them unless `set_owner`)."""
        return self._owner is None or self._owner(execution_id)

    async def set_owner(self, owner: Owner | None) -> int:
        """Drive only the executions `owner` accepts (None: all), e.g. those whose
        partition of the command topic this worker's consumer group assigned to it.

        Executions it no longer owns are let go of at once, without recording anything:
        their next owner adopts them from their events (attempts left running count as
        failed and are retried, timers fire there). Those it now owns are loaded and
        driven on. Returns how many were taken up."""
        async with self._polling:  # not while a look at the store adopts executions
            self._owner = owner
            for eid in [e for e in self._live if not self.owns(e)]:
                self._release(eid)
            for eid in [e for e in self._dormant if not self.owns(e)]:
                self._wake_dormant_cancel(eid)
            for eid in [e for e in self.skipped if not self.owns(e)]:
                del self.skipped[eid]
            return await self._resume_all()

    def _release(self, execution_id: UUID) -> None:
        live = self._live.pop(execution_id)
        for handle in (live.wake, live.follow):
            if handle is not None:
                handle.cancel()
        live.wake = live.wake_at = live.follow = None
        for task in live.tasks.values():
            task.cancel()
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        live.tasks.clear()
        for fut in self._waiters.pop(execution_id, []):
            if not fut.done():  # as far as this engine saw it: another drives it on
                fut.set_result(live.ex)

    def add_listener(self, listener: Listener) -> None:
        """Call `listener` with the execution after each commit of its events."""
        self._listeners.append(listener)

    # -- use cases ----------------------------------------------------------------------

    async def register(self, definition: WorkflowDefinition) -> Workflow:
        """Register a definition version (idempotent for the same document)."""
        wf, _ = await self._io(self.app.register, definition)
        return wf

    async def workflow(self, workflow_id: str, version: str | None = None) -> Workflow:
        """A registered workflow version (the newest when None)."""
        return await self._io(self.app.workflow, workflow_id, version)

    async def start(self, wf: Workflow, data: Any, idempotency_key: str | None = None) -> UUID:
        """Start an execution (or find the one its idempotency key already started)."""
        seed = random.getrandbits(63)
        if idempotency_key is None:
            # A fresh id: nothing to look up in the store, nothing another start can take.
            # ExecutionStarted is committed with the first decisions (one commit, not two).
            ex, _ = self.app.new_execution(wf, data, None, seed, self.clock.now(), uuid4())
            if not self.owns(ex.id):  # stored for the engine that owns it to drive
                await self._committer.save(ex)
                self._notify(ex)
                return ex.id
            try:
                await self._adopt(ex, wf)
            except BaseException:
                self._live.pop(ex.id, None)  # not stored: nothing to drive
                raise
            return ex.id
        ex, new = await self._io(
            self.app.new_execution, wf, data, idempotency_key, seed, self.clock.now(), uuid4()
        )
        if new:
            try:
                await self._committer.save(ex)
            except IntegrityError:
                if idempotency_key is None:
                    raise
                # A concurrent start with the same key was stored first: that one is it.
                return await self.start(wf, data, idempotency_key)
            self._notify(ex)
            if self.owns(ex.id):
                await self._adopt(ex, wf)
        elif ex.id not in self._live and not ex.is_terminal and self.owns(ex.id):
            await self._adopt(ex, await self.workflow(ex.workflow_id, ex.workflow_version))
        return ex.id

    async def resume_all(self) -> int:
        """Load every execution that has not ended and drive it on; returns how many.

        An execution whose workflow names an action no agent here offers is left alone
        (listed in `skipped`): driving it would fail its steps for want of an agent.
        """
        async with self._polling:
            return await self._resume_all()

    async def _resume_all(self) -> int:
        # The position is taken before the listing: an execution another process starts
        # while this loop runs is then found by `poll_store`, not missed by both.
        position = await self._io(self._max_position)
        ids = await self._io(lambda: self.app.execution_ids(live_only=True))
        count = 0
        for eid in ids:
            if eid not in self._live and self.owns(eid) and await self._resume(eid):
                count += 1
        self._store_position = max(self._store_position, position)
        return count

    def _max_position(self) -> int:
        return self.app.recorder.max_notification_id() or 0

    async def _resume(self, execution_id: UUID) -> bool:
        ex = await self._io(self.app.execution, execution_id)
        if ex.is_terminal:
            return False
        wf = await self.workflow(ex.workflow_id, ex.workflow_version)
        missing = {a for a in wf.actions() if not self.runner.offers(a)}
        if missing:
            self.skipped[execution_id] = missing
            return False
        self.skipped.pop(execution_id, None)
        await self._adopt(ex, wf)
        return True

    async def watch_store(self, stop: asyncio.Event, interval: float = 0.25) -> None:
        """Until `stop`, pick up what other processes write: new executions, and commands
        (answers, cancellations) on executions this engine drives."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
            self._raise_fatal()  # a worker whose engine stopped must not look alive
            if stop.is_set():
                return
            await self.poll_store()

    async def poll_store(self) -> None:
        """Look once at the events stored since the last look (one look at a time: the
        watcher and a command intake that nudges may ask at once)."""
        async with self._polling:
            await self._poll_store()

    async def _poll_store(self) -> None:
        notifications = await self._io(
            lambda: self.app.recorder.select_notifications(self._store_position + 1, 1000)
        )
        changed: dict[UUID, int] = {}
        for n in notifications:
            self._store_position = max(self._store_position, n.id)
            if ":Execution." in n.topic:
                eid = UUID(str(n.originator_id))
                changed[eid] = max(changed.get(eid, 0), n.originator_version)
        # Side by side: the store thread still reads one at a time, but what they decide
        # is committed together (a burst of starts from a command topic takes a few
        # commits, not one each).
        await asyncio.gather(*(self._changed(eid, version) for eid, version in changed.items()))

    async def _changed(self, eid: UUID, version: int) -> None:
        """Another process wrote the execution up to `version`: drive it on from there."""
        live = self._live.get(eid)
        if live is None:
            if not self.owns(eid):
                return  # another worker's
            dormant = self._dormant.get(eid)
            if eid not in self.skipped and (dormant is None or version > dormant.version):
                await self._resume(eid)
            return
        async with live.lock:
            if version > live.ex.version:  # written by someone else
                await self._reload(live)

    async def execution(self, execution_id: UUID) -> Execution:
        """The execution as this engine knows it (live), or as stored."""
        live = self._live.get(execution_id)
        if live is not None:
            return live.ex
        return await self._io(self.app.execution, execution_id)

    async def drive(self, execution_id: UUID) -> None:
        """Drive a stored execution on from its events (attempts left running are retried);
        one another engine owns is left to it."""
        if self.owns(execution_id):
            await self._ensure_live(execution_id)

    async def complete_human_task(self, execution_id: UUID, ref: str, answer: Any) -> str:
        """Answer a waiting human task and drive the execution on."""
        with contextlib.suppress(_LetGo):
            async with self._holding(execution_id) as live:
                while True:  # after a conflict, again on the stored execution (may refuse)
                    key = complete_human_task(live.ex, live.wf, ref, answer, self.clock.now())
                    if await self._progress(live):
                        return key
        # Another engine drives it: stored for that one to carry out.
        now = self.clock
        return await self._io(submit_completion, self.app, execution_id, ref, answer, now)

    async def cancel(self, execution_id: UUID, reason: str = "cancelled by request") -> None:
        """Cancel an execution: active steps stop, completed steps are compensated."""
        with contextlib.suppress(_LetGo):
            async with self._holding(execution_id) as live:
                while True:  # after a conflict, again on the stored execution (may refuse)
                    cancel(live.ex, live.wf, reason, self.clock.now())
                    if await self._progress(live):
                        return
        # Another engine drives it: stored for that one to carry out.
        await self._io(submit_cancel, self.app, execution_id, reason, self.clock)

    async def retry(self, execution_id: UUID, reason: str = "retried by request") -> None:
        """Retry a failed, timed-out or cancelled execution from the steps that did not
        complete (domain.progress.retry), then drive it on to its end."""
        if self.owns(execution_id):
            live = self._live.get(execution_id)
            if live is None:  # an ended execution is not driven here: load it
                ex = await self._io(self.app.execution, execution_id)
                wf = await self.workflow(ex.workflow_id, ex.workflow_version)
                live = self._live.get(execution_id) or _Live(ex, wf)
            if await self._retry(live, reason):
                return
        # Another engine drives it: stored for that one to carry out.
        await self._io(lambda: submit_retry(self.app, execution_id, self.clock, reason=reason))

    async def _retry(self, live: _Live, reason: str) -> bool:
        """Retry and drive; False if ownership moved away first (nothing recorded)."""
        execution_id = live.ex.id
        async with live.lock:
            while self.owns(execution_id):  # after a conflict, again on the stored execution
                try:
                    retry(live.ex, live.wf, self.clock.now(), reason)
                except FlowledgerError:
                    if live.ex.is_terminal and self._live.get(execution_id) is live:
                        self._live.pop(execution_id)  # refused: nothing to drive here
                    raise
                # Driven from here on: waiters and the store's watcher find it live.
                self._live[execution_id] = live
                if await self._progress(live):
                    return True
        return False

    async def wait_settled(self, execution_id: UUID) -> Execution:
        """Wait until the execution ends or needs a person; timers are waited out."""
        self._raise_fatal()
        fut: asyncio.Future[Execution] = asyncio.get_running_loop().create_future()
        if not self.owns(execution_id):  # driven elsewhere: follow it in the store
            found = await follow_until_settled(self.app, execution_id)
            assert found is not None  # no driver_gone: it is followed to the end
            return found
        with self._pin(execution_id):
            dormant = self._dormant.get(execution_id)
            if dormant is not None and not dormant.settled:
                await self._ensure_live(execution_id)  # a timer is due: wait for it in memory
            live = self._live.get(execution_id)
            if live is None and dormant is None:
                # Owned but not loaded: stored a moment ago by another path (a command
                # intake, a follower) that the store watcher has not seen yet. Take it up
                # here rather than answer with a state that is not settled.
                await self._resume(execution_id)
                live = self._live.get(execution_id)
            if live is None:  # dormant (settled), ended, or no agent here offers its actions
                return await self._io(self.app.execution, execution_id)
            # Under the lock: state being committed now is not yet settled for the caller.
            async with live.lock:
                if is_settled(live.ex, live.wf) and not live.tasks:
                    return live.ex
                self._waiters.setdefault(execution_id, []).append(fut)
        return await fut

    async def wait_idle(self) -> None:
        """Wait until every execution this engine drives has ended or needs a person."""
        self._raise_fatal()
        if self._all_settled():
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._idle.append(fut)
        await fut

    # -- driving ------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _holding(self, execution_id: UUID) -> AsyncIterator[_Live]:
        """The execution, loaded if need be, under its lock; never one let go of (made
        dormant) while this waited for the lock: a command recorded on that one would
        be driven by nobody."""
        live: _Live | None = None
        try:
            with self._pin(execution_id):
                while True:
                    if not self.owns(execution_id):
                        raise _LetGo  # another engine drives it now
                    live = await self._ensure_live(execution_id)
                    async with live.lock:
                        if self._live.get(execution_id) is live or live.ex.is_terminal:
                            yield live
                            return
        finally:
            # Unpinned, and nothing awaited since: let go of it if it is quiet again.
            if live is not None and self._quiet(live):
                self._let_go(live)

    @contextlib.contextmanager
    def _pin(self, execution_id: UUID) -> Iterator[None]:
        """Keep the execution in memory while a caller loads it and acts on it."""
        self._pinned[execution_id] = self._pinned.get(execution_id, 0) + 1
        try:
            yield
        finally:
            self._unpin(execution_id)

    def _unpin(self, execution_id: UUID) -> None:
        count = self._pinned.get(execution_id, 0) - 1
        if count > 0:
            self._pinned[execution_id] = count
        else:
            self._pinned.pop(execution_id, None)

    async def _ensure_live(self, execution_id: UUID) -> _Live:
        live = self._live.get(execution_id)
        if live is not None:
            return live
        ex = await self._io(self.app.execution, execution_id)
        wf = await self.workflow(ex.workflow_id, ex.workflow_version)
        if ex.is_terminal or not self.owns(execution_id):
            return _Live(ex, wf)  # nothing to drive here
        # Adopting counts attempts a dead process left running, so they are retried.
        await self._adopt(ex, wf)
        return self._live.get(execution_id) or _Live(ex, wf)

    async def _adopt(self, ex: Execution, wf: Workflow) -> None:
        if ex.id in self._live:
            return  # adopted meanwhile: a store poll and a caller loaded it side by side
        live = _Live(ex, wf)
        self._wake_dormant_cancel(ex.id)
        self._live[ex.id] = live
        async with live.lock:
            now = self.clock.now()
            # Attempts recorded as running have no task here: the worker that ran them is
            # gone. Each counts as a failed attempt and is retried under the step's policy.
            for record in list(ex.steps.values()):
                if (
                    record.status is StepStatus.RUNNING
                    and wf.node(record.step_id).step.type in DISPATCHED_TYPES
                ):
                    fail_attempt(
                        ex,
                        wf,
                        record.key,
                        record.attempt_id,
                        "WorkerLost",
                        f"the worker stopped during attempt {record.attempt}",
                        True,
                        now,
                    )
            await self._progress(live)

    async def _kick(self, execution_id: UUID) -> None:
        live = self._live.get(execution_id)
        if live is None:
            return
        try:
            async with live.lock:
                await self._progress(live)
        except Exception as exc:  # noqa: BLE001 - a timer's wake-up has no caller to tell
            self._set_fatal(exc)

    async def _progress(self, live: _Live) -> bool:
        """Advance, commit, then act: nothing runs before the decision to run it is stored.

        False when another writer got there first: every pending event (a command's or a
        result's too) was dropped with the stale view, and the execution was rebuilt from
        the store and advanced from there; the caller records its command again on it.
        """
        ex = live.ex
        adv = advance(ex, live.wf, self.clock.now())
        try:
            await self._committer.save(ex)
        except IntegrityError:
            await self._reload(live)
            return False
        self._notify(ex)
        self._stop_stale(live)
        if self._live.get(ex.id) is not live and self._owner is not None:
            return True  # let go of meanwhile (another engine owns it now): nothing to run
        for dispatch in adv.dispatches:
            task = asyncio.create_task(self._serve_or_run(live, dispatch))
            live.tasks[dispatch.attempt_id] = task
        if live.wake is not None:
            live.wake.cancel()
            live.wake = live.wake_at = None
        if adv.next_wake is not None and not ex.is_terminal:
            delay = max(0.0, (adv.next_wake - self.clock.now()).total_seconds())
            live.wake = asyncio.get_running_loop().call_later(delay, self._wake, ex.id)
            live.wake_at = adv.next_wake
        self._follow_others(live)
        self._after(live)
        return True

    def _follow_others(self, live: _Live) -> None:
        """An attempt recorded as running with no task here is another process's (this engine
        lost a race to it, PostgreSQL): its outcome shows only in the store, so look there
        until it does, or a caller waiting for this execution would wait for ever."""
        if live.follow is not None or live.ex.is_terminal:
            return
        if any(
            r.status is StepStatus.RUNNING
            and r.attempt_id not in live.tasks
            and live.wf.node(r.step_id).step.type in DISPATCHED_TYPES
            for r in live.ex.steps.values()
        ):
            live.follow = asyncio.get_running_loop().call_later(
                FOLLOW_INTERVAL, self._wake_follow, live.ex.id
            )

    def _wake_follow(self, execution_id: UUID) -> None:
        task = asyncio.get_running_loop().create_task(self._follow(execution_id))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _follow(self, execution_id: UUID) -> None:
        live = self._live.get(execution_id)
        if live is None:
            return
        try:
            async with live.lock:
                live.follow = None
                version = live.ex.version
                newer = await self._io(
                    lambda: self.app.recorder.select_events(execution_id, gt=version, limit=1)
                )
                if newer:
                    await self._reload(live)
                else:
                    self._follow_others(live)
        except Exception as exc:  # noqa: BLE001 - a follow-up has no caller to tell
            self._set_fatal(exc)

    def _stop_stale(self, live: _Live) -> None:
        """Cancel attempts the events no longer count as running (a parallel step failed
        fast, the execution was cancelled or ended): their outcome would be ignored."""
        running = {r.attempt_id for r in live.ex.steps.values() if r.status is StepStatus.RUNNING}
        for attempt_id, task in list(live.tasks.items()):
            if attempt_id not in running or live.ex.is_terminal:
                del live.tasks[attempt_id]
                task.cancel()
                self._background.add(task)  # so close() still awaits its end
                task.add_done_callback(self._background.discard)

    async def _reload(self, live: _Live) -> None:
        fresh = await self._io(self.app.execution, live.ex.id)
        live.ex = fresh
        await self._progress(live)

    async def _serve_or_run(self, live: _Live, d: Dispatch) -> None:
        """A cached step's attempt is looked up first: a hit is its outcome (no agent runs
        it); a miss, or a cache that cannot answer, runs it."""
        hit = await self._look_up(d)
        if hit is None:
            await self._attempt(live, d)
            return
        live.outcomes.append((d, hit, None, None))
        self._record_soon(live)

    async def _look_up(self, d: Dispatch) -> CachedResult | None:
        if self.cache is None or d.cache_key is None or d.step.cache is None:
            return None
        try:
            return await self.cache.lookup(d.cache_key, d.step.cache.ttl, self.clock.now())
        except Exception as exc:  # noqa: BLE001 - a cache is an optimisation: run the step
            log.warning("step cache lookup for %s failed, running it: %r", d.attempt_id, exc)
            return None

    async def _attempt(self, live: _Live, d: Dispatch) -> None:
        outcome: Outcome
        agent: str | None = None
        route: str | None = None
        try:
            try:
                async with asyncio.timeout(d.timeout) as budget:
                    ran = await self.runner.run(d)
                if isinstance(ran, Ran):
                    outcome, agent, route = ran.output, ran.agent, ran.route
                else:
                    outcome = ran
            except TimeoutError:
                if not budget.expired():
                    raise
                outcome = (
                    "TimeoutError",
                    f"attempt {d.attempt} exceeded its timeout of {d.timeout:g}s",
                    True,
                )
            except AttemptFailed as exc:
                outcome = (exc.error_type, exc.message, exc.retryable)
                agent, route = exc.agent, exc.route
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - any error of user code fails the attempt
            outcome = (type(exc).__name__, str(exc) or repr(exc), None)
        if agent is None:  # asked only now: a runner that routed the attempt knows where
            agent, route = self.runner.agent_for(d), self.runner.route_for(d)
        live.outcomes.append((d, outcome, agent, route))
        self._record_soon(live)

    def _record_soon(self, live: _Live) -> None:
        if not live.recording:  # else the task recording now takes it into its next commit
            live.recording = True
            # A task of its own, not this attempt's: cancelling a stale attempt must not
            # strand the outcomes of others queued behind it.
            task = asyncio.get_running_loop().create_task(self._record_outcomes(live))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _record_outcomes(self, live: _Live) -> None:
        try:
            async with live.lock:
                while live.outcomes:
                    batch, live.outcomes = live.outcomes, []
                    await self._record(live, batch)
        except Exception as exc:  # noqa: BLE001 - the engine cannot go on; surface it
            self._set_fatal(exc)
        finally:
            live.recording = False

    async def _record(self, live: _Live, batch: list[Ended]) -> None:
        """Record attempts' outcomes, then advance and commit once for all of them."""
        for d, *_ in batch:
            live.tasks.pop(d.attempt_id, None)
        while True:  # after a conflict, again on the execution as stored
            now = self.clock.now()
            recorded = False
            for d, outcome, agent, route in batch:
                ex, wf = live.ex, live.wf
                if isinstance(outcome, CachedResult):
                    done = serve_from_cache(ex, wf, d.key, d.attempt_id, outcome, now)
                elif isinstance(outcome, dict):
                    done = succeed_attempt(ex, wf, d.key, d.attempt_id, outcome, now, agent, route)
                else:
                    done = fail_attempt(ex, wf, d.key, d.attempt_id, *outcome, now, agent, route)
                recorded = recorded or done
            if not recorded:  # none is current there any more: lost, cancelled or ended
                self._after(live)
                return
            if await self._progress(live):
                return

    def _wake(self, execution_id: UUID) -> None:
        task = asyncio.get_running_loop().create_task(self._kick(execution_id))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- watchers -------------------------------------------------------------------------

    def _after(self, live: _Live) -> None:
        ex = live.ex
        if is_settled(ex, live.wf) and not live.tasks:
            for fut in self._waiters.pop(ex.id, []):
                if not fut.done():
                    fut.set_result(ex)
            if ex.is_terminal:
                self._live.pop(ex.id, None)
                for handle in (live.wake, live.follow):
                    if handle is not None:
                        handle.cancel()
        if self._quiet(live):
            self._let_go(live)
        if is_settled(ex, live.wf) and not live.tasks and self._idle and self._all_settled():
            for idle in self._idle:
                if not idle.done():
                    idle.set_result(None)
            self._idle.clear()

    def _all_settled(self) -> bool:
        return all(
            is_settled(live.ex, live.wf) and not live.tasks for live in self._live.values()
        ) and all(d.settled for d in self._dormant.values())

    # -- dormant executions -------------------------------------------------------------

    def _quiet(self, live: _Live) -> bool:
        """Nothing runs or is followed, nobody waits on it here, no timer is due soon."""
        ex = live.ex
        if ex.is_terminal or live.tasks or live.follow is not None:
            return False
        if ex.id in self._waiters or ex.id in self._pinned:
            return False
        if self._live.get(ex.id) is not live:
            return False
        soon = self.clock.now() + timedelta(seconds=DORMANT_AFTER)
        if live.wake_at is not None and live.wake_at < soon:
            return False
        return not any(
            r.status in (StepStatus.RUNNING, StepStatus.RETRYING) for r in ex.steps.values()
        )

    def _let_go(self, live: _Live) -> None:
        """Keep only the execution's next timer; its events are in the store."""
        ex = live.ex
        wake = None
        if live.wake is not None:
            live.wake.cancel()
        if live.wake_at is not None:
            delay = max(0.0, (live.wake_at - self.clock.now()).total_seconds())
            wake = asyncio.get_running_loop().call_later(delay, self._wake_dormant, ex.id)
        live.wake = live.wake_at = None
        del self._live[ex.id]
        self._dormant[ex.id] = _Dormant(is_settled(ex, live.wf), ex.version, wake)

    def _wake_dormant_cancel(self, execution_id: UUID) -> None:
        dormant = self._dormant.pop(execution_id, None)
        if dormant is not None and dormant.wake is not None:
            dormant.wake.cancel()

    def _wake_dormant(self, execution_id: UUID) -> None:
        self._dormant.pop(execution_id, None)
        task = asyncio.get_running_loop().create_task(self._drive_woken(execution_id))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _drive_woken(self, execution_id: UUID) -> None:
        try:
            await self._ensure_live(execution_id)
        except Exception as exc:  # noqa: BLE001 - a timer's wake-up has no caller to tell
            self._set_fatal(exc)

    def _notify(self, ex: Execution) -> None:
        for listener in self._listeners:
            listener(ex)

    def _set_fatal(self, exc: BaseException) -> None:
        log.error("engine stopped: %s", exc, exc_info=exc)
        self._fatal = exc
        for futures in self._waiters.values():
            for fut in futures:
                if not fut.done():
                    fut.set_exception(exc)
        self._waiters.clear()
        for idle in self._idle:
            if not idle.done():
                idle.set_exception(exc)
        self._idle.clear()

    def _raise_fatal(self) -> None:
        if self._fatal is not None:
            raise self._fatal
