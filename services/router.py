"""What a worker knows about the remote agents, to route tasks (see `routing`): who is live,
how busy, how fast and how reliable lately, and which attempts to take from an agent that
went silent.

No I/O and no clock: times come in as arguments (`now`: monotonic seconds for liveness,
`at`: wall-clock datetimes for attempt figures, comparable with the performance history).

Liveness: an agent is lost when it said it stopped, or when it sent no heartbeat for
`LOST_INTERVALS` heartbeat intervals while other agents' heartbeats kept arriving. Silence
of every agent at once says more about the broker (away, or restarted empty) than about
the agents, so it takes nobody's attempts away: the steps' timeouts cover that case.
"""

from __future__ import annotations

import random
import statistics
from collections import deque
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from datetime import datetime

from flowledger.services.routing import Candidate, Figures, Route, choose

WINDOW = 50  # recent attempts per agent that its figures come from
LOST_INTERVALS = 3  # heartbeat intervals of silence after which an agent is lost
DOWN_GRACE = 1.0  # seconds between an agent's "down" and taking its attempts: its last
# results, published before it said so, may still be on their way
MAX_FAILOVERS = 10_000  # steps remembered as failed over, awaiting their next attempt


@dataclass(frozen=True, slots=True)
class Sample:
    """One ended attempt of an agent: its duration when it succeeded."""

    agent: str
    ok: bool
    seconds: float | None
    at: datetime  # when it ended


@dataclass
class AgentState:
    """An agent as its last heartbeat described it."""

    agent: str
    capabilities: frozenset[str]
    actions: frozenset[str]
    in_flight: int
    concurrency: int | None
    up: bool
    inbox: bool  # it reads `<prefix>.agent.<id>`, so it can be sent tasks by name
    seen: float  # monotonic seconds


@dataclass
class Router:
    """Heartbeats, recent attempts and this worker's outstanding tasks; picks agents."""

    heartbeat_every: float
    gone_after: float  # an agent not heard from for this long is no candidate at all
    rng: random.Random = field(default_factory=random.Random)
    agents: dict[str, AgentState] = field(default_factory=dict)
    outstanding: dict[str, int] = field(default_factory=dict)  # tasks sent here, unanswered
    _seeded: dict[str, list[Sample]] = field(default_factory=dict)  # performance history
    _live: dict[str, deque[Sample]] = field(default_factory=dict)  # results seen here
    _failovers: dict[tuple[str, str], str] = field(default_factory=dict)
    _stream_last: float | None = None  # when any heartbeat last came
    _stream_resumed: float = 0.0  # when heartbeats came again after a gap

    # -- heartbeats -----------------------------------------------------------------------

    def heard(self, state: AgentState) -> None:
        """An agent's heartbeat came at `state.seen`."""
        now = state.seen
        if self._stream_last is None or now - self._stream_last > 2 * self.heartbeat_every:
            self._stream_resumed = now
        self._stream_last = now
        self.agents[state.agent] = state

    def lost(self, agent: str, now: float) -> str | None:
        """Why the agent is taken to be gone (for a person), or None while it is not."""
        state = self.agents.get(agent)
        if state is None:
            return None
        if not state.up:
            return "said it stopped" if now - state.seen >= DOWN_GRACE else None
        silent = now - max(state.seen, self._stream_resumed)
        others = self._stream_last is not None and (
            now - self._stream_last <= 2 * self.heartbeat_every
        )
        if silent >= LOST_INTERVALS * self.heartbeat_every and others:
            return f"stopped sending heartbeats ({now - state.seen:.0f} s without one)"
        return None

    def live(self, capability: str, action: str, now: float) -> list[AgentState]:
        """The agents that offer the capability's action, take tasks by name, and are live."""
        return [
            a
            for a in self.agents.values()
            if a.up
            and a.inbox
            and capability in a.capabilities
            and action in a.actions
            and now - a.seen < self.gone_after
            and self.lost(a.agent, now) is None
        ]

    # -- figures --------------------------------------------------------------------------

    def observed(self, sample: Sample) -> None:
        """An attempt this worker waited for ended (an answer, a loss, a timeout)."""
        self._live.setdefault(sample.agent, deque(maxlen=WINDOW)).append(sample)

    def seed(self, samples: Iterable[Sample]) -> None:
        """Replace what the performance history says (recent attempts, oldest first); results
        seen here since its newest attempt of an agent still count."""
        seeded: dict[str, list[Sample]] = {}
        for sample in samples:
            seeded.setdefault(sample.agent, []).append(sample)
        self._seeded = {agent: found[-WINDOW:] for agent, found in seeded.items()}

    def figures(self, agent: str) -> Figures:
        """Latency (p50 of successes) and failure rate over the agent's recent attempts."""
        seeded = self._seeded.get(agent, [])
        newest = seeded[-1].at if seeded else None
        live = [s for s in self._live.get(agent, ()) if newest is None or s.at > newest]
        recent = (seeded + live)[-WINDOW:]
        if not recent:
            return Figures()
        durations = [s.seconds for s in recent if s.ok and s.seconds is not None]
        failed = sum(1 for s in recent if not s.ok)
        return Figures(
            latency=statistics.median(durations) if durations else None,
            failure_rate=failed / len(recent),
            attempts=len(recent),
        )

    # -- routing --------------------------------------------------------------------------

    def route(
        self,
        capability: str,
        action: str,
        step: tuple[str, str],
        now: float,
        avoid: Collection[str] = (),
    ) -> Route:
        """Choose an agent for the next attempt of `step` (execution id, step key)."""
        candidates = [
            Candidate(
                agent=a.agent,
                figures=self.figures(a.agent),
                in_flight=max(a.in_flight, self.outstanding.get(a.agent, 0)),
                concurrency=a.concurrency,
            )
            for a in self.live(capability, action, now)
        ]
        return choose(candidates, self.rng, avoid, self._failovers.pop(step, None))

    def sent(self, agent: str) -> None:
        """A task went to the agent; it is outstanding until `settled`."""
        self.outstanding[agent] = self.outstanding.get(agent, 0) + 1

    def settled(self, agent: str) -> None:
        """A task sent to the agent was answered, lost, or given up."""
        left = self.outstanding.get(agent, 0) - 1
        if left > 0:
            self.outstanding[agent] = left
        else:
            self.outstanding.pop(agent, None)

    def failed_over(self, step: tuple[str, str], agent: str, why: str) -> None:
        """The step's attempt was taken from a lost agent: its next route says so."""
        if len(self._failovers) >= MAX_FAILOVERS:
            self._failovers.pop(next(iter(self._failovers)))
        self._failovers[step] = f"{agent} {why}"
