"""What a worker knows to route tasks (services/router.py), and how the Kafka runner uses it
to fail over (adapters/kafka_tasks.py), without a broker: liveness from heartbeats, figures
from the performance history and from results, and attempts taken from a lost agent."""

from __future__ import annotations

import asyncio
import random
import time
from datetime import UTC, datetime, timedelta

import pytest

from flowledger.adapters.agents import AgentRegistry, InProcessRunner
from flowledger.adapters.kafka import KafkaSettings
from flowledger.adapters.kafka_messages import Heartbeat, TaskResult, inbox_topic
from flowledger.adapters.kafka_tasks import RemoteRunner, _Waiting
from flowledger.services.ports import AttemptFailed
from flowledger.services.router import AgentState, Router, Sample
from flowledger.services.routing import Route

EVERY = 2.0
T0 = datetime(2024, 1, 1, tzinfo=UTC)


class NeverExplore(random.Random):
    def random(self) -> float:
        return 0.99


def state(agent: str, seen: float, *, up: bool = True, inbox: bool = True) -> AgentState:
    return AgentState(
        agent=agent,
        capabilities=frozenset({"prep"}),
        actions=frozenset({"remote.prepare"}),
        in_flight=0,
        concurrency=4,
        up=up,
        inbox=inbox,
        seen=seen,
    )


def router() -> Router:
    return Router(heartbeat_every=EVERY, gone_after=10.0, rng=NeverExplore())


def beat(r: Router, agents: list[str], start: float, end: float) -> None:
    """Heartbeats of `agents` every interval from `start` to `end`."""
    t = start
    while t <= end:
        for agent in agents:
            r.heard(state(agent, t))
        t += EVERY


def test_an_agent_silent_while_others_beat_is_lost_after_three_intervals() -> None:
    r = router()
    beat(r, ["fast", "slow"], 100.0, 110.0)
    beat(r, ["slow"], 112.0, 120.0)  # fast was killed after 110

    assert r.lost("fast", 115.0) is None
    assert r.lost("fast", 116.5) == "stopped sending heartbeats (6 s without one)"
    assert r.lost("slow", 116.5) is None
    assert [a.agent for a in r.live("prep", "remote.prepare", 116.5)] == ["slow"]


def test_when_every_agent_is_silent_nobody_is_lost() -> None:
    r = router()
    beat(r, ["a", "b"], 100.0, 110.0)  # then the broker goes away

    assert r.lost("a", 130.0) is None
    # The broker is back: the clock of silence starts again when heartbeats come again.
    r.heard(state("b", 140.0))
    assert r.lost("a", 143.0) is None
    beat(r, ["b"], 142.0, 148.0)
    assert r.lost("a", 146.5) == "stopped sending heartbeats (36 s without one)"


def test_an_agent_that_said_it_stopped_is_lost_after_a_grace() -> None:
    r = router()
    r.heard(state("a", 100.0, up=False))

    assert r.lost("a", 100.5) is None
    assert r.lost("a", 101.5) == "said it stopped"
    assert r.live("prep", "remote.prepare", 100.5) == []


def test_only_agents_with_an_inbox_offering_the_action_are_candidates() -> None:
    r = router()
    r.heard(state("old", 100.0, inbox=False))
    r.heard(state("new", 100.0))

    assert [a.agent for a in r.live("prep", "remote.prepare", 101.0)] == ["new"]
    assert r.live("prep", "other.action", 101.0) == []
    assert r.live("prep", "remote.prepare", 111.0) == []  # gone: not heard for 10 s


def test_figures_come_from_the_history_and_then_from_results_seen_here() -> None:
    r = router()
    history = [Sample("a", True, s, T0 + timedelta(seconds=n)) for n, s in enumerate([1, 2, 3])]
    r.seed(history)
    assert r.figures("a").latency == 2
    # A result seen here before the history's newest is already in it; a later one is not.
    r.observed(Sample("a", True, 9.0, T0 + timedelta(seconds=1)))
    r.observed(Sample("a", False, None, T0 + timedelta(seconds=10)))
    figures = r.figures("a")
    assert (figures.latency, figures.failure_rate, figures.attempts) == (2, 0.25, 4)
    assert not r.figures("b").measured


def test_a_failed_over_step_says_so_on_its_next_route_only() -> None:
    r = router()
    beat(r, ["slow"], 100.0, 104.0)
    r.failed_over(("e1", "prepare"), "fast", "stopped sending heartbeats (6 s without one)")

    first = r.route("prep", "remote.prepare", ("e1", "prepare"), 104.5)
    again = r.route("prep", "remote.prepare", ("e1", "prepare"), 104.5)

    assert first.agent == "slow"
    assert first.reason.startswith("failover: fast stopped sending heartbeats (6 s without one)")
    assert not again.reason.startswith("failover")


def test_tasks_outstanding_here_count_as_load() -> None:
    r = router()
    beat(r, ["a", "b"], 100.0, 100.0)
    for agent, latency in (("a", 0.1), ("b", 0.15)):
        for n in range(5):
            r.observed(Sample(agent, True, latency, T0 + timedelta(seconds=n)))
    assert r.route("prep", "remote.prepare", ("e", "k"), 101.0).agent == "a"
    for _ in range(8):
        r.sent("a")  # 8 in flight on 4 slots: 0.1 x 3 > 0.15
    assert r.route("prep", "remote.prepare", ("e", "k"), 101.0).agent == "b"
    for _ in range(8):
        r.settled("a")
    assert r.outstanding == {}


async def test_the_runner_fails_over_an_attempt_whose_agent_went_silent() -> None:
    runner = RemoteRunner(KafkaSettings("127.0.0.1:1", "t"), InProcessRunner(AgentRegistry()), "w")
    now = time.monotonic()
    for t in (now - 9, now - 7):
        runner.router.heard(state("fast", t))
        runner.router.heard(state("slow", t))
    for t in (now - 5, now - 3, now - 1):
        runner.router.heard(state("slow", t))
    loop = asyncio.get_running_loop()
    lost: asyncio.Future[TaskResult] = loop.create_future()
    kept: asyncio.Future[TaskResult] = loop.create_future()
    runner._pending |= {"at-1": lost, "at-2": kept}
    runner._waiting["at-1"] = _Waiting(Route("fast", "best of 2: ..."), ("e1", "prepare"))
    runner._waiting["at-2"] = _Waiting(Route("slow", "exploring: ..."), ("e2", "prepare"))

    runner._take_from_lost()

    assert not kept.done()
    with pytest.raises(AttemptFailed) as failed:
        lost.result()
    assert failed.value.error_type == "AgentLost"
    assert failed.value.retryable is True
    assert (failed.value.agent, failed.value.route) == ("fast", "best of 2: ...")
    assert "fast stopped sending heartbeats" in failed.value.message
    assert runner.lost == 1
    assert runner.router.figures("fast").failure_rate == 1.0
    retry = runner.router.route("prep", "remote.prepare", ("e1", "prepare"), time.monotonic())
    assert retry.agent == "slow"
    assert retry.reason.startswith("failover: fast stopped sending heartbeats")
    runner.local.close()


def test_an_agent_id_names_its_inbox_topic_or_none() -> None:
    settings = KafkaSettings("127.0.0.1:1", "acme")

    assert inbox_topic(settings, "fast-1") == "acme.agent.fast-1"
    assert inbox_topic(settings, "a b") is None
    assert inbox_topic(settings, "x" * 240) is None  # too long for Kafka with the prefix


def test_a_heartbeat_of_an_agent_without_an_inbox_still_reads() -> None:
    old = {"agent_id": "a", "capabilities": ["c"], "actions": ["c"], "in_flight": 0, "at": T0}

    heartbeat = Heartbeat.model_validate(old)

    assert (heartbeat.inbox, heartbeat.concurrency) == (False, None)
