"""Retry decisions and backoff delays, with jitter drawn from the execution's stored seed."""

from __future__ import annotations

import random

from flowledger.domain.definitions import RetryPolicy


def should_retry(
    policy: RetryPolicy, attempt: int, error_type: str, retryable: bool | None
) -> bool:
    """Whether a failed attempt (1-based) gets another one under `policy`."""
    if error_type in policy.non_retryable_errors or retryable is False:
        return False
    return attempt <= policy.max_retries


def retry_delay(policy: RetryPolicy, seed: int, key: str, attempt: int) -> float:
    """Seconds to wait after failed attempt `attempt` (1-based) of step instance `key`.

    Exponential backoff capped at `max_delay`, then +/- `jitter` of it. The jitter comes
    from a PRNG seeded with the execution's seed, the step and the attempt, so replaying
    the events (or recomputing the delay) gives the same number.
    """
    try:
        growth = policy.backoff_multiplier ** (attempt - 1)
    except OverflowError:  # a steep backoff: the cap applies long before this attempt
        growth = float("inf")
    base = (
        policy.max_delay
        if growth * policy.retry_delay > policy.max_delay
        else (policy.retry_delay * growth)
    )
    spread = random.Random(f"{seed}:{key}:{attempt}").uniform(-1.0, 1.0)
    return max(0.0, min(policy.max_delay, base * (1.0 + policy.jitter * spread)))
