"""The step cache: for each cache key, the newest successful result of a cached step.

`StepCacheView` holds the entries and answers lookups; `step_cache_projection.
StepCacheProjection` fills it from execution events (a `StepStarted` that carried a
`cache_key`, then that attempt's `StepSucceeded`), each event's rows and its tracking
record in one transaction. The engine reads it through `adapters/step_cache.py`.
"""

from __future__ import annotations

import json
from datetime import datetime

from flowledger.domain.caching import CachedResult
from flowledger.projections.events import micros
from flowledger.projections.store import ViewRecorder


class StepCacheView(ViewRecorder):
    """Entries by cache key, and the cached attempts still running."""

    name = "step_cache"
    tables = ("step_cache_attempts", "step_cache_entries")
    schema = (
        # A cached step's attempt that has started and not ended: its key waits for a result.
        "CREATE TABLE IF NOT EXISTS step_cache_attempts (execution_id TEXT NOT NULL, "
        "key TEXT NOT NULL, step_id TEXT NOT NULL, cache_key TEXT NOT NULL, "
        "PRIMARY KEY (execution_id, key))",
        # The key names the workflow and the step already (domain/caching.py).
        "CREATE TABLE IF NOT EXISTS step_cache_entries (cache_key TEXT PRIMARY KEY, "
        "step_id TEXT NOT NULL, execution_id TEXT NOT NULL, step_key TEXT NOT NULL, "
        "result TEXT NOT NULL, cached_at TEXT NOT NULL, cached_us BIGINT NOT NULL)",
    )

    def entry(self, cache_key: str, not_before: datetime) -> CachedResult | None:
        """The result stored under `cache_key` if it was produced at or after `not_before`."""
        rows = self.query(
            "SELECT * FROM step_cache_entries WHERE cache_key = :key AND cached_us >= :oldest",
            key=cache_key,
            oldest=micros(not_before),
        )
        if not rows:
            return None
        row = rows[0]
        return CachedResult(
            cache_key=cache_key,
            result=json.loads(row["result"]),
            source_execution_id=row["execution_id"],
            source_step_key=row["step_key"],
            cached_at=datetime.fromisoformat(row["cached_at"]),
        )
