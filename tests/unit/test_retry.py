"""Retry decisions and backoff delays: deterministic, bounded, and honoured by progress."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import pytest
import support
from hypothesis import example, given, settings
from hypothesis import strategies as st

from flowledger.domain import progress
from flowledger.domain.definitions import RetryPolicy
from flowledger.domain.execution import Execution
from flowledger.domain.retry import retry_delay, should_retry
from flowledger.domain.states import StepStatus
from flowledger.domain.workflow import Workflow

T0 = datetime(2024, 1, 1, tzinfo=UTC)
ERROR_TYPES = ("ValueError", "TypeError", "ValidationError", "TimeoutError", "KeyError", "Boom")
REL = 1e-9


def policies(
    *, max_retries: int = 20, max_multiplier: float = 10.0, max_seconds: float = 1e6
) -> st.SearchStrategy[RetryPolicy]:
    seconds = st.floats(0, max_seconds, allow_nan=False, allow_infinity=False)
    return st.builds(
        RetryPolicy,
        max_retries=st.integers(0, max_retries),
        retry_delay=seconds,
        backoff_multiplier=st.floats(1, max_multiplier, allow_nan=False, allow_infinity=False),
        max_delay=seconds,
        jitter=st.floats(0, 1),
        non_retryable_errors=st.lists(st.sampled_from(ERROR_TYPES), unique=True, max_size=3),
        continue_on_failure=st.booleans(),
    )


keys = st.text(st.characters(codec="utf-8"), min_size=1, max_size=20)
seeds = st.integers(0, 2**63 - 1)


def _base(policy: RetryPolicy, attempt: int) -> float:
    return min(policy.max_delay, policy.retry_delay * policy.backoff_multiplier ** (attempt - 1))


# -- retry_delay ---------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(policies(), seeds, keys, st.integers(1, 21))
def test_retry_delay_is_deterministic_for_the_same_seed_key_and_attempt(
    policy: RetryPolicy, seed: int, key: str, attempt: int
) -> None:
    first = retry_delay(policy, seed, key, attempt)
    assert retry_delay(policy, seed, key, attempt) == first
    assert retry_delay(policy.model_copy(), seed, key, attempt) == first


@settings(max_examples=200, deadline=None)
@given(policies(), seeds, keys, st.integers(1, 21))
def test_retry_delay_stays_within_the_jitter_around_the_capped_backoff(
    policy: RetryPolicy, seed: int, key: str, attempt: int
) -> None:
    delay = retry_delay(policy, seed, key, attempt)
    base = _base(policy, attempt)
    low = max(0.0, base * (1 - policy.jitter))
    high = min(policy.max_delay, base * (1 + policy.jitter))
    assert math.isfinite(delay)
    assert low * (1 - REL) - REL <= delay <= high * (1 + REL) + REL
    assert 0.0 <= delay <= policy.max_delay


@settings(max_examples=100, deadline=None)
@given(policies(), seeds, keys, st.integers(1, 21))
def test_without_jitter_the_delay_is_the_capped_exponential_backoff(
    policy: RetryPolicy, seed: int, key: str, attempt: int
) -> None:
    policy = policy.model_copy(update={"jitter": 0.0})
    assert retry_delay(policy, seed, key, attempt) == pytest.approx(_base(policy, attempt))


def test_backoff_grows_by_the_multiplier_until_max_delay() -> None:
    policy = RetryPolicy(retry_delay=1.0, backoff_multiplier=2.0, max_delay=10.0, jitter=0.0)
    assert [retry_delay(policy, 1, "a", n) for n in range(1, 7)] == [1, 2, 4, 8, 10, 10]


def test_jitter_varies_with_seed_key_and_attempt() -> None:
    policy = RetryPolicy(retry_delay=10.0, backoff_multiplier=1.0, max_delay=60.0, jitter=0.5)
    by_seed = {retry_delay(policy, seed, "a", 1) for seed in range(20)}
    by_key = {retry_delay(policy, 7, f"step{i}", 1) for i in range(20)}
    by_attempt = {retry_delay(policy, 7, "a", n) for n in range(1, 21)}
    assert min(len(by_seed), len(by_key), len(by_attempt)) > 10


def _with_attempt(policy: RetryPolicy) -> st.SearchStrategy[tuple[RetryPolicy, int]]:
    return st.tuples(st.just(policy), st.integers(1, policy.max_retries + 1))


# Every value here is accepted by RetryPolicy (backoff_multiplier has no upper bound,
# max_retries goes to 100), so every attempt the policy allows must get a delay.
@settings(max_examples=200, deadline=None)
@given(
    policies(max_retries=100, max_multiplier=1e300, max_seconds=1e300).flatmap(_with_attempt),
    seeds,
)
@example((RetryPolicy(max_retries=100, backoff_multiplier=10_000.0, max_delay=60.0), 79), 1)
def test_retry_delay_is_a_number_for_every_attempt_a_valid_policy_allows(
    policy_and_attempt: tuple[RetryPolicy, int], seed: int
) -> None:
    policy, attempt = policy_and_attempt
    delay = retry_delay(policy, seed, "a", attempt)
    assert 0.0 <= delay <= policy.max_delay


# -- should_retry --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attempt", "error_type", "retryable", "expected"),
    [
        (1, "Boom", None, True),
        (3, "Boom", None, True),
        (4, "Boom", None, False),  # max_retries=3: attempts 1..3 get another, the 4th does not
        (1, "Boom", True, True),
        (1, "Boom", False, False),
        (1, "ValueError", None, False),
        (1, "ValueError", True, False),  # the policy's list wins over the error's own claim
        (1, "TimeoutError", None, True),
    ],
)
def test_should_retry_table(
    attempt: int, error_type: str, retryable: bool | None, expected: bool
) -> None:
    assert should_retry(RetryPolicy(), attempt, error_type, retryable) is expected


@settings(max_examples=200, deadline=None)
@given(
    policies(),
    st.integers(1, 25),
    st.sampled_from(ERROR_TYPES),
    st.sampled_from([None, True, False]),
)
def test_should_retry_honours_the_list_the_flag_and_max_retries(
    policy: RetryPolicy, attempt: int, error_type: str, retryable: bool | None
) -> None:
    expected = (
        error_type not in policy.non_retryable_errors
        and retryable is not False
        and attempt <= policy.max_retries
    )
    assert should_retry(policy, attempt, error_type, retryable) is expected


def test_zero_retries_means_one_attempt() -> None:
    assert should_retry(RetryPolicy(max_retries=0), 1, "Boom", True) is False


# -- through progress: the attempts and the stored delays ---------------------------------


def _single_action(policy: dict[str, Any]) -> Workflow:
    return Workflow(
        support.workflow(
            {"steps": [{"step_id": "a", "type": "action", "action": "x", "retry_policy": policy}]}
        )
    )


def _begin(wf: Workflow, seed: int) -> Execution:
    return Execution.begin(
        UUID(int=seed),
        wf.workflow_id,
        wf.version,
        {},
        None,
        seed,
        T0 + timedelta(seconds=wf.definition.timeout),
        T0,
    )


@settings(max_examples=60, deadline=None)
@given(
    st.integers(0, 5),
    st.floats(0, 20),
    st.floats(1, 3),
    st.floats(0, 30),
    st.floats(0, 1),
    seeds,
)
def test_a_step_failing_every_attempt_gets_max_retries_plus_one_with_the_stored_delays(
    max_retries: int,
    delay: float,
    multiplier: float,
    max_delay: float,
    jitter: float,
    seed: int,
) -> None:
    raw = {
        "max_retries": max_retries,
        "retry_delay": delay,
        "backoff_multiplier": multiplier,
        "max_delay": max_delay,
        "jitter": jitter,
    }
    wf = _single_action(raw)
    policy = wf.node("a").policy
    ex = _begin(wf, seed)
    now = T0
    attempts = 0
    dispatches = progress.advance(ex, wf, now).dispatches
    while dispatches:
        (d,) = dispatches
        attempts += 1
        assert d.attempt == attempts
        assert progress.fail_attempt(ex, wf, d.key, d.attempt_id, "Boom", "no", None, now)
        record = ex.steps["a"]
        if record.status is StepStatus.RETRYING:
            scheduled = [e for e in ex.pending_events if type(e).__name__ == "StepRetryScheduled"][
                -1
            ]
            assert scheduled.delay == retry_delay(policy, seed, "a", attempts)
            assert scheduled.fire_at == now + timedelta(seconds=scheduled.delay)
            timer = ex.timers[record.timer_id or ""]
            # Not yet due: nothing starts a microsecond early.
            early = timer.fire_at - timedelta(microseconds=1)
            if early >= now:
                assert progress.advance(ex, wf, early).dispatches == []
            now = max(now, timer.fire_at)
        dispatches = progress.advance(ex, wf, now).dispatches
    assert attempts == max_retries + 1
    assert ex.steps["a"].status is StepStatus.FAILED
    assert ex.status == "failed"


@pytest.mark.parametrize(
    ("error_type", "retryable"),
    [("ValueError", None), ("TypeError", True), ("ValidationError", None), ("Boom", False)],
)
def test_a_non_retryable_failure_fails_the_step_at_the_first_attempt(
    error_type: str, retryable: bool | None
) -> None:
    wf = _single_action({"max_retries": 5})
    ex = _begin(wf, 3)
    (d,) = progress.advance(ex, wf, T0).dispatches
    assert progress.fail_attempt(ex, wf, d.key, d.attempt_id, error_type, "no", retryable, T0)
    assert ex.steps["a"].status is StepStatus.FAILED
    assert ex.steps["a"].error == {"type": error_type, "message": "no", "retryable": False}
    assert progress.advance(ex, wf, T0).dispatches == []
    assert ex.status == "failed"


def test_non_retryable_errors_of_the_step_policy_replace_the_defaults() -> None:
    wf = _single_action({"max_retries": 1, "non_retryable_errors": ["Boom"]})
    ex = _begin(wf, 3)
    (d,) = progress.advance(ex, wf, T0).dispatches
    assert progress.fail_attempt(ex, wf, d.key, d.attempt_id, "ValueError", "x", None, T0)
    assert ex.steps["a"].status is StepStatus.RETRYING


def test_a_steep_backoff_is_capped_at_max_delay_rather_than_crashing_progress() -> None:
    # backoff_multiplier has no upper bound in the contract; 1e200 ** 2 overflows a float.
    wf = _single_action({"max_retries": 3, "backoff_multiplier": 1e200, "max_delay": 30})
    ex = _begin(wf, 3)
    now = T0
    for attempt in (1, 2, 3):
        (d,) = progress.advance(ex, wf, now).dispatches
        assert d.attempt == attempt
        assert progress.fail_attempt(ex, wf, d.key, d.attempt_id, "Boom", "x", None, now)
        timer = ex.timers[ex.steps["a"].timer_id or ""]
        assert timer.fire_at <= now + timedelta(seconds=30)
        now = timer.fire_at
