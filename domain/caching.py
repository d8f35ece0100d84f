"""Step caching: the key that says two attempts of a cached step would do the same work.

A step with `cache: {ttl, key}` may be served the result of an earlier success with the
same key instead of running. The key is computed purely, when an attempt is dispatched,
and recorded on its `StepStarted`; where earlier results come from is the edge's
business (services/ports.py `StepCache`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from flowledger.domain.definitions import ActionStep, WebhookStep
from flowledger.domain.expressions import evaluate

# Part of what is hashed: a later change to what goes into a key changes this, so keys made
# the old way never match keys made the new way.
KEY_FORMAT: Final = 1


@dataclass(frozen=True, slots=True)
class CachedResult:
    """An earlier success stored under a cache key: its result, and where and when it was
    produced (the TTL counts from `cached_at`)."""

    cache_key: str
    result: dict[str, Any]
    source_execution_id: str
    source_step_key: str
    cached_at: datetime


def step_identity(step: ActionStep | WebhookStep) -> dict[str, Any]:
    """What the step does, apart from its input: the action, or the request it sends
    (the URL and headers as written: `${env:NAME}` references, never their values)."""
    if isinstance(step, ActionStep):
        return {"action": step.action}
    return {"webhook": {"method": step.method, "url": step.url, "headers": step.headers}}


def cache_key(workflow_id: str, step: ActionStep | WebhookStep, step_input: Any) -> str | None:
    """The hex sha256 naming an attempt's result in the cache, or None when the step is
    not cached or its key expression gives null (such an attempt is neither looked up nor
    stored). The key value is the `cache.key` expression's result against the step's
    input, or the whole input without one. ExpressionError if the expression fails."""
    if step.cache is None:
        return None
    value = step_input if step.cache.key is None else evaluate(step.cache.key, step_input)
    if value is None:
        return None
    named = {
        "format": KEY_FORMAT,
        "workflow_id": workflow_id,
        "step_id": step.step_id,
        "step": step_identity(step),
        "key": value,
    }
    text = json.dumps(named, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
