"""The routing policy (services/routing.py): the best agent by expected time per success,
a share of exploration, untried agents tried, avoided agents passed over, and a reason a
person can read, with the figures."""

from __future__ import annotations

import random
from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from flowledger.services.routing import EXPLORE, Candidate, Figures, Route, choose, score


class NeverExplore(random.Random):
    """A source whose draws never fall in the exploration share."""

    def random(self) -> float:
        return 0.99


def measured(agent: str, latency: float, failed: float = 0.0, in_flight: int = 0) -> Candidate:
    return Candidate(agent, Figures(latency, failed, 20), in_flight, concurrency=4)


FAST = measured("fast-1", 0.21, in_flight=1)
SLOW = measured("slow-1", 0.43)


def test_the_fastest_agent_is_chosen_and_the_reason_gives_the_figures() -> None:
    route = choose([SLOW, FAST], NeverExplore())

    assert route == Route(
        "fast-1",
        "best of 2: p50 0.21 s, 0% failed, 1 in flight "
        "(slow-1: p50 0.43 s, 0% failed, 0 in flight)",
    )


def test_most_tasks_go_to_the_fast_agent_and_some_explore_the_slow_one() -> None:
    rng = random.Random(7)

    chosen = Counter(choose([FAST, SLOW], rng).agent for _ in range(2000))

    assert chosen["fast-1"] + chosen["slow-1"] == 2000
    assert abs(chosen["slow-1"] / 2000 - EXPLORE) < 0.03
    explored = choose([FAST, SLOW], ExploreAlways())
    assert explored.agent == "slow-1"
    assert explored.reason.startswith("exploring: p50 0.43 s")
    assert "best is fast-1: p50 0.21 s" in explored.reason


class ExploreAlways(random.Random):
    def random(self) -> float:
        return 0.0


def test_an_agent_whose_attempts_fail_is_scored_worse() -> None:
    flaky = measured("flaky", 0.1, failed=0.9)
    steady = measured("steady", 0.3)

    assert choose([flaky, steady], NeverExplore()).agent == "steady"
    assert "90% failed" in choose([flaky, steady], ExploreAlways()).reason


def test_a_busy_fast_agent_loses_to_an_idle_slower_one() -> None:
    busy = measured("busy", 0.2, in_flight=40)  # 10 tasks queued per slot
    idle = measured("idle", 0.5)

    assert choose([busy, idle], NeverExplore()).agent == "idle"


def test_an_agent_with_no_figures_is_tried_one_task_at_a_time() -> None:
    new = Candidate("new-1", Figures(), in_flight=0)

    tried = choose([FAST, new], NeverExplore())
    assert tried == Route("new-1", "trying new-1: no figures yet")
    busy_new = Candidate("new-1", Figures(), in_flight=1)
    assert choose([FAST, busy_new], NeverExplore()).agent == "fast-1"


def test_with_no_figures_at_all_the_least_loaded_agent_is_chosen() -> None:
    a = Candidate("a", Figures(), in_flight=3, concurrency=4)
    b = Candidate("b", Figures(), in_flight=1, concurrency=4)

    assert choose([a, b], NeverExplore()) == Route("b", "least loaded of 2, no figures yet")


def test_an_agent_whose_attempts_all_failed_is_scored_as_the_slowest_and_failing() -> None:
    broken = Candidate("broken", Figures(None, 1.0, 5), 0, 4)
    ok = measured("ok", 2.0)

    assert choose([broken, ok], NeverExplore()).agent == "ok"
    assert score(broken, 2.0) > score(ok, 2.0)
    assert "no success, 100% failed" in choose([broken, ok], ExploreAlways()).reason


def test_an_only_agent_and_no_agent() -> None:
    assert choose([SLOW], NeverExplore()) == Route(
        "slow-1", "only agent: p50 0.43 s, 0% failed, 0 in flight"
    )
    assert choose([], NeverExplore()) == Route(None, "no live agent known: shared topic")


def test_avoided_agents_are_passed_over_while_another_is_live() -> None:
    route = choose([FAST, SLOW], NeverExplore(), avoid=["fast-1"])
    assert route.agent == "slow-1"
    assert route.reason.startswith("only agent (fast-1 avoided): p50 0.43 s")
    alone = choose([FAST], NeverExplore(), avoid=["fast-1"])
    assert alone.agent == "fast-1"
    assert "every live agent is to be avoided" in alone.reason


def test_a_failover_says_why_first() -> None:
    route = choose([SLOW], NeverExplore(), failover="fast-1 stopped sending heartbeats")

    assert route.agent == "slow-1"
    assert route.reason.startswith("failover: fast-1 stopped sending heartbeats; only agent")


names = st.sampled_from(["a", "b", "c", "d", "e"])
figures = st.one_of(
    st.just(Figures()),
    st.builds(
        Figures,
        st.one_of(st.none(), st.floats(0.001, 100)),
        st.floats(0, 1),
        st.integers(1, 50),
    ),
)
candidates = st.lists(
    st.builds(
        Candidate, names, figures, st.integers(0, 64), st.one_of(st.none(), st.integers(1, 32))
    ),
    max_size=5,
    unique_by=lambda c: c.agent,
)


@given(candidates, st.sets(names), st.integers(0, 2**32))
def test_the_choice_is_a_live_candidate_not_avoided_unless_all_are(
    found: list[Candidate], avoid: set[str], seed: int
) -> None:
    route = choose(found, random.Random(seed), avoid)

    if not found:
        assert route.agent is None
        return
    assert route.agent in {c.agent for c in found}
    if any(c.agent not in avoid for c in found):
        assert route.agent not in avoid
    assert route.reason
    # The same figures and the same draws give the same choice.
    assert choose(list(reversed(found)), random.Random(seed), avoid) == route


@given(candidates)
def test_without_exploration_no_measured_agent_beats_the_choice(found: list[Candidate]) -> None:
    route = choose(found, NeverExplore())

    if any(not c.figures.measured for c in found) or len(found) < 2:
        return
    fallback = max((c.figures.latency for c in found if c.figures.latency), default=1.0)
    best = min(score(c, fallback) for c in found)
    [chosen] = [c for c in found if c.agent == route.agent]
    assert score(chosen, fallback) == best
