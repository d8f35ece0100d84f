"""Group commit: the events of many executions that are ready together go in one transaction."""

from __future__ import annotations

import asyncio
import os
import signal
from concurrent.futures import Executor
from typing import Any

from eventsourcing.domain import DomainEventProtocol

from flowledger.domain.errors import ConfigurationError
from flowledger.domain.execution import Execution
from flowledger.services.app import FlowledgerApp

Events = list[DomainEventProtocol[Any]]


class Committer:
    """One writer: saves queued executions' pending events in batches of at most `max_batch`.

    A caller awaits until its events are committed, so nothing acts on a decision that is
    not durable. If a batch fails, each execution's events are saved alone, so one bad
    write (say, a version conflict) fails only its own caller.
    """

    def __init__(
        self,
        app: FlowledgerApp,
        executor: Executor,
        *,
        max_batch: int = 256,
        crash_at: str | None = None,
    ) -> None:
        self.app = app
        self.executor = executor
        self.max_batch = max_batch
        self._queue: list[tuple[Events, asyncio.Future[None]]] = []
        self._draining = False
        self._task: asyncio.Task[None] | None = None
        self.batches = 0  # commits made (for the benchmarks)
        self._crash = _CrashPoint(crash_at) if crash_at else None

    async def save(self, ex: Execution) -> None:
        """Commit `ex`'s pending events; returns once they are durable."""
        events: Events = list(ex.collect_events())
        if not events:
            return
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._queue.append((events, fut))
        if not self._draining:
            self._draining = True
            self._task = loop.create_task(self._drain())
        await fut

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._queue:
                batch = self._queue[: self.max_batch]
                del self._queue[: self.max_batch]
                events = [e for evs, _ in batch for e in evs]
                try:
                    await loop.run_in_executor(self.executor, self._save, events)
                except Exception:
                    if len(batch) == 1:
                        raise
                    for evs, fut in batch:
                        try:
                            await loop.run_in_executor(self.executor, self._save, evs)
                        except Exception as exc:  # noqa: BLE001 - handed to its caller
                            fut.set_exception(exc)
                        else:
                            fut.set_result(None)
                    continue
                for _, fut in batch:
                    fut.set_result(None)
        except Exception as exc:  # noqa: BLE001 - handed to the callers waiting on it
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)
        finally:
            self._draining = False
            if self._queue:
                self._draining = True
                self._task = loop.create_task(self._drain())

    def _save(self, events: Events) -> None:
        if self._crash is not None:
            self._crash.reached("before", events)
        self.app.save_events(events)
        self.batches += 1
        if self._crash is not None:
            self._crash.reached("after", events)


class _CrashPoint:
    """Test-only, off unless set: FLOWLEDGER_CRASH_AT="before:N[:EVENT]" or "after:N[:EVENT]".

    The process SIGKILLs itself just before (or after) its Nth commit, counting only the
    commits that hold an EVENT (say StepSucceeded) when one is named, so the crash tests
    (tests/integration/test_crash.py) can die exactly between a result and its save.
    """

    def __init__(self, spec: str) -> None:
        when, _, rest = spec.partition(":")
        count, _, self.event = rest.partition(":")
        if when not in ("before", "after") or not count.isdigit():
            raise ConfigurationError(f"FLOWLEDGER_CRASH_AT={spec!r}: use before|after:N[:EVENT]")
        self.when, self.count, self.seen = when, int(count), 0

    def reached(self, when: str, events: Events) -> None:
        if self.event and not any(type(e).__name__ == self.event for e in events):
            return
        if when == "before":
            self.seen += 1
        if when == self.when and self.seen == self.count:
            os.kill(os.getpid(), signal.SIGKILL)
