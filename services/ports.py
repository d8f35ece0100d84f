"""The small interfaces services use to reach the edge: running attempts, and the clock."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from flowledger.domain.caching import CachedResult as CachedResult  # the StepCache's answer
from flowledger.domain.progress import Dispatch


class AttemptFailed(Exception):
    """An attempt failed with a typed error; `retryable` None lets the retry policy decide."""

    def __init__(
        self,
        error_type: str,
        message: str,
        retryable: bool | None = None,
        *,
        agent: str | None = None,
        route: str | None = None,
    ) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.message = message
        self.retryable = retryable
        self.agent = agent  # the remote agent that reported the failure, if any
        self.route = route  # why the attempt went to that agent (adaptive routing)


@dataclass(frozen=True, slots=True)
class Ran:
    """An attempt's result with the remote agent that produced it (and why it went there)."""

    output: dict[str, Any]
    agent: str
    route: str | None = None


class StepRunner(Protocol):
    """Runs one attempt of an action or webhook step and returns its JSON-object result."""

    async def run(self, dispatch: Dispatch) -> dict[str, Any] | Ran:
        """Run the attempt; raise AttemptFailed (or any exception) when it fails."""
        ...

    def agent_for(self, dispatch: Dispatch) -> str | None:
        """Who runs the attempt when its outcome names nobody (it timed out): None for
        this process, else a name for the remote agents it was sent to."""
        ...

    def route_for(self, dispatch: Dispatch) -> str | None:
        """Why the attempt went to `agent_for`'s agent (adaptive routing), or None."""
        ...

    def offers(self, action: str) -> bool:
        """Whether an agent known to this runner offers `action`."""
        ...


class StepCache(Protocol):
    """Where the engine finds earlier successes of cached steps (domain/caching.py)."""

    async def lookup(self, cache_key: str, ttl: float, now: datetime) -> CachedResult | None:
        """The newest success stored under `cache_key` no older than `ttl` seconds at
        `now`, or None. The key already names the workflow and step. Any exception is
        taken as a miss (the engine logs it and runs the step)."""
        ...


class Clock(Protocol):
    """Where services get the time; tests substitute their own."""

    def now(self) -> datetime:
        """The current time, timezone-aware."""
        ...


class SystemClock:
    """The wall clock, in UTC."""

    def now(self) -> datetime:
        """The current time in UTC."""
        return datetime.now(UTC)
