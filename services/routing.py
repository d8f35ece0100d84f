"""Adaptive routing: which of the live agents offering a capability runs a task, and why.

Pure: no I/O, no clock; randomness comes in as a `random.Random`. The score of an agent
is its expected time per success,

    p50 latency x (1 + in flight / concurrency) / max(1 - failure rate, MIN_SUCCESS),

lower is better. The best agent gets the task, except for a share (EXPLORE) that goes to
another agent at random so that figures that went stale are refreshed. An agent with no
figures yet is tried with one task at a time until it has some. Agents a step asks to
avoid are passed over while another live agent offers the capability.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence
from dataclasses import dataclass

EXPLORE = 0.1  # the share of tasks sent to an agent that is not the best
MIN_SUCCESS = 0.05  # a score divides by the success rate, at least this


@dataclass(frozen=True, slots=True)
class Figures:
    """What recent attempts say about an agent."""

    latency: float | None = None  # p50 seconds of recent successful attempts
    failure_rate: float | None = None  # of recent ended attempts
    attempts: int = 0  # recent ended attempts the figures come from

    @property
    def measured(self) -> bool:
        """Whether any attempt of the agent ended lately."""
        return self.attempts > 0


@dataclass(frozen=True, slots=True)
class Candidate:
    """A live agent offering the capability, with its figures and its load."""

    agent: str
    figures: Figures
    in_flight: int = 0
    concurrency: int | None = None  # tasks it runs at once, if it said


@dataclass(frozen=True, slots=True)
class Route:
    """The agent chosen (None: no agent chosen, the capability's shared topic) and why."""

    agent: str | None
    reason: str


def score(candidate: Candidate, fallback_latency: float) -> float:
    """Expected seconds per success (lower is better); an agent whose attempts all failed
    has no latency of its own and is scored with `fallback_latency`."""
    figures = candidate.figures
    latency = figures.latency if figures.latency is not None else fallback_latency
    load = candidate.in_flight / max(candidate.concurrency or 1, 1)
    success = 1.0 - (figures.failure_rate or 0.0)
    return latency * (1.0 + load) / max(success, MIN_SUCCESS)


def describe(candidate: Candidate) -> str:
    """The figures behind a choice, for a person: "p50 0.21 s, 0% failed, 1 in flight"."""
    figures = candidate.figures
    if not figures.measured:
        return f"no figures yet, {candidate.in_flight} in flight"
    latency = "no success" if figures.latency is None else f"p50 {figures.latency:.2f} s"
    failed = round(100 * (figures.failure_rate or 0.0))
    return f"{latency}, {failed}% failed, {candidate.in_flight} in flight"


def choose(
    candidates: Sequence[Candidate],
    rng: random.Random,
    avoid: Collection[str] = (),
    failover: str | None = None,
) -> Route:
    """The agent to send a task to, and the reason in a sentence with the figures.

    `avoid` names agents passed over while another candidate remains; `failover` says why
    the step's previous attempt was taken from its agent (it starts the reason)."""
    route = _choose(sorted(candidates, key=lambda c: c.agent), rng, set(avoid))
    if failover is not None:
        return Route(route.agent, f"failover: {failover}; {route.reason}")
    return route


def _choose(candidates: list[Candidate], rng: random.Random, avoid: set[str]) -> Route:
    if not candidates:
        return Route(None, "no live agent known: shared topic")
    pool = [c for c in candidates if c.agent not in avoid]
    note = ""
    if not pool:
        pool = candidates
        note = " (every live agent is to be avoided)"
    elif len(pool) < len(candidates):
        passed = ", ".join(c.agent for c in candidates if c.agent in avoid)
        note = f" ({passed} avoided)"
    if len(pool) == 1:
        return Route(pool[0].agent, f"only agent{note}: {describe(pool[0])}")
    measured = [c for c in pool if c.figures.measured]
    untried = [c for c in pool if not c.figures.measured and c.in_flight == 0]
    if untried:
        pick = rng.choice(untried)
        return Route(pick.agent, f"trying {pick.agent}: no figures yet{note}")
    if not measured:  # each has a task in flight and none has ended yet: spread the load
        pick = min(pool, key=lambda c: (c.in_flight / max(c.concurrency or 1, 1), c.agent))
        return Route(pick.agent, f"least loaded of {len(pool)}, no figures yet{note}")
    fallback = max((c.figures.latency for c in measured if c.figures.latency), default=1.0)
    ranked = sorted(measured, key=lambda c: (score(c, fallback), c.agent))
    best = ranked[0]
    if len(ranked) > 1 and rng.random() < EXPLORE:
        pick = rng.choice(ranked[1:])
        return Route(
            pick.agent,
            f"exploring{note}: {describe(pick)} (best is {best.agent}: {describe(best)})",
        )
    others = "; ".join(f"{c.agent}: {describe(c)}" for c in ranked[1:])
    return Route(best.agent, f"best of {len(ranked)}{note}: {describe(best)} ({others})")
