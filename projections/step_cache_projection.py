"""How events fill the step cache: `StepCacheProjection` keeps, for each cache key, the
newest successful result of an attempt whose `StepStarted` carried that key.

Only successes are stored, with the time they were produced (the TTL counts from it). A
step served from the cache stores nothing again: its result is the source's, and it is
no younger than the source.
"""

from __future__ import annotations

from typing import Any

from eventsourcing.persistence import Tracking
from eventsourcing.projection import Projection

from flowledger.projections.events import EXECUTION_PREFIX, attr, canonical, event_name, iso, micros
from flowledger.projections.step_cache import StepCacheView
from flowledger.projections.store import Tx

# The events that end an attempt without a result to keep.
_ENDED = frozenset({"StepFailed", "StepRetryScheduled", "StepCancelled", "StepServedFromCache"})


class StepCacheProjection(Projection[StepCacheView]):
    """Folds cached steps' attempts and their successes into the step cache."""

    name = "step_cache"

    def process_event(self, domain_event: Any, tracking: Tracking) -> None:
        """Apply one event and record its position, in one transaction."""
        name = event_name(domain_event)
        with self.view.transaction() as tx:
            tx.track(tracking)
            if not name.startswith(EXECUTION_PREFIX):
                return
            short = name.removeprefix(EXECUTION_PREFIX)
            if short == "StepStarted":
                self._started(tx, domain_event)
            elif short == "StepSucceeded":
                self._succeeded(tx, domain_event)
            elif short in _ENDED:
                self._forget(tx, str(domain_event.originator_id), domain_event.key)

    def _started(self, tx: Tx, e: Any) -> None:
        eid = str(e.originator_id)
        cache_key = attr(e, "cache_key")
        if cache_key is None:
            self._forget(tx, eid, e.key)
            return
        tx.execute(
            "INSERT INTO step_cache_attempts (execution_id, key, step_id, cache_key) "
            "VALUES (:eid, :key, :step, :cache_key) ON CONFLICT (execution_id, key) "
            "DO UPDATE SET step_id = excluded.step_id, cache_key = excluded.cache_key",
            eid=eid,
            key=e.key,
            step=e.step_id,
            cache_key=cache_key,
        )

    def _succeeded(self, tx: Tx, e: Any) -> None:
        eid = str(e.originator_id)
        attempt = tx.one(
            "SELECT step_id, cache_key FROM step_cache_attempts "
            "WHERE execution_id = :eid AND key = :key",
            eid=eid,
            key=e.key,
        )
        if attempt is None:
            return  # not a cached step's attempt
        self._forget(tx, eid, e.key)
        # The newest result wins; one stored before (a batch replayed out of time order,
        # two processes) is not replaced by an older one.
        tx.execute(
            "INSERT INTO step_cache_entries (cache_key, step_id, execution_id, step_key, "
            "result, cached_at, cached_us) VALUES (:cache_key, :step, :eid, :key, :result, "
            ":at, :at_us) ON CONFLICT (cache_key) DO UPDATE SET step_id = excluded.step_id, "
            "execution_id = excluded.execution_id, step_key = excluded.step_key, "
            "result = excluded.result, cached_at = excluded.cached_at, "
            "cached_us = excluded.cached_us "
            "WHERE excluded.cached_us >= step_cache_entries.cached_us",
            cache_key=attempt["cache_key"],
            step=attempt["step_id"],
            eid=eid,
            key=e.key,
            result=canonical(e.result),
            at=iso(e.at),
            at_us=micros(e.at),
        )

    def _forget(self, tx: Tx, eid: str, key: str) -> None:
        tx.execute(
            "DELETE FROM step_cache_attempts WHERE execution_id = :eid AND key = :key",
            eid=eid,
            key=key,
        )
