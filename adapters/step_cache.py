"""The engine's StepCache over its own store: the step-cache projection, caught up on demand.

Every process that drives executions on a store (`run`, `worker`, `serve`, and other
`run`s later) finds what any of them stored, because the entries are folded from the
store's events, not kept in memory.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from typing import Any, TypeVar

from flowledger.domain.caching import CachedResult
from flowledger.projections.runner import Runner, open_step_cache
from flowledger.projections.step_cache import StepCacheView
from flowledger.services.app import FlowledgerApp

T = TypeVar("T")


class StoreStepCache:
    """Looks results up in the step-cache projection, after catching it up with the store.

    A catch-up happens only when the store's head moved since the last one, on one
    thread of its own: lookups that arrive together take turns, and those after the first
    find the projection already at the head (one cheap query each).
    """

    def __init__(self, app: FlowledgerApp) -> None:
        self._app = app
        # Opened at the first lookup: a store whose workflows cache nothing gets no tables.
        self._opened: tuple[StepCacheView, Runner] | None = None
        self._head = -1  # the store's head at the last catch-up
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flowledger-cache")

    async def lookup(self, cache_key: str, ttl: float, now: datetime) -> CachedResult | None:
        """The newest success under `cache_key` produced at most `ttl` seconds before `now`."""
        return await self._run(self._lookup, cache_key, now - timedelta(seconds=ttl))

    def _lookup(self, cache_key: str, not_before: datetime) -> CachedResult | None:
        if self._opened is None:
            projection = open_step_cache(self._app)
            self._opened = projection.view, Runner(self._app, [projection])
        view, runner = self._opened
        head = runner.head()
        if head != self._head:
            runner.catch_up(head)
            self._head = head
        return view.entry(cache_key, not_before)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    def close(self) -> None:
        """Stop the lookup thread (after the lookup in flight, if any)."""
        self._thread.shutdown(wait=True)
