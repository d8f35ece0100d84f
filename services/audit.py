"""Audit use cases: verify executions' hash chains as stored, export a history with its hashes.

Everything here reads the store's raw records (eventsourcing's StoredEvent: originator id,
version, topic, state bytes) and decodes them with the application's own mapper parts,
without resolving topics or upcasting: a row someone tampered with must still be read,
and must be judged as stored.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterator, Mapping
from typing import Any
from uuid import UUID

from eventsourcing.domain import CanMutateAggregate, EventSourcingError
from eventsourcing.persistence import StoredEvent
from eventsourcing.utils import get_topic

from flowledger.domain.audit import (
    AuditReport,
    StoredRecord,
    canonical_attributes,
    verify_chain,
)
from flowledger.domain.errors import ExecutionNotFound
from flowledger.domain.execution import Execution
from flowledger.services.app import FlowledgerApp

_PAGE = 1000


def execution_topics() -> list[str]:
    """The topics of every Execution event class."""
    return sorted(
        get_topic(cls)
        for cls in vars(Execution).values()
        if isinstance(cls, type) and issubclass(cls, CanMutateAggregate)
    )


def is_execution_topic(topic: str) -> bool:
    """Whether a stored topic is one of an Execution event."""
    return topic.startswith(f"{Execution.__module__}:{Execution.__qualname__}.")


def decode_state(app: FlowledgerApp, stored: StoredEvent) -> Mapping[str, Any] | None:
    """A stored event's state as its mapper decodes it (no upcasting); None if unreadable."""
    mapper = app.mapper
    data = _bytes(stored.state)
    try:
        if mapper.cipher is not None:
            data = mapper.cipher.decrypt(data)
        if mapper.compressor is not None:
            data = mapper.compressor.decompress(data)
        state = mapper.transcoder.decode(data)
    except (ValueError, TypeError, KeyError, zlib.error, EventSourcingError):
        return None
    return state if isinstance(state, dict) else None


def _bytes(state: bytes | str) -> bytes:
    # A row edited by hand may hold text where the store wrote bytes (SQLite's replace()
    # returns TEXT): read it as its UTF-8 bytes rather than fail on it.
    return state.encode("utf-8", "surrogatepass") if isinstance(state, str) else bytes(state)


def readable(stored: StoredEvent) -> StoredEvent:
    """The stored event with its state as bytes, whatever the row held."""
    if isinstance(stored.state, bytes):
        return stored
    return StoredEvent(
        stored.originator_id, stored.originator_version, stored.topic, _bytes(stored.state)
    )


def stored_records(app: FlowledgerApp, execution_id: UUID) -> list[StoredRecord]:
    """An execution's stored events, in stored version order, decoded but not trusted."""
    records = [
        StoredRecord(s.originator_id, s.originator_version, s.topic, decode_state(app, s))
        for s in app.recorder.select_events(execution_id)
    ]
    if not any(is_execution_topic(r.topic) for r in records):
        raise ExecutionNotFound(f"no execution {execution_id}")
    return records


def audit_execution(
    app: FlowledgerApp, execution_id: UUID, anchor: str | None = None
) -> AuditReport:
    """Verify one execution's hash chain as stored (and that it still holds `anchor`)."""
    return verify_chain(stored_records(app, execution_id), anchor)


def stored_execution_ids(app: FlowledgerApp) -> list[UUID]:
    """Every execution that has any event stored, in order of its first stored event.

    Found from all the Execution topics, not only ExecutionStarted: an execution whose
    first event was deleted must still be audited.
    """
    topics = execution_topics()
    seen: dict[UUID, None] = {}
    start = 1
    while True:
        batch = app.recorder.select_notifications(start, _PAGE, topics=topics)
        for n in batch:
            seen.setdefault(UUID(str(n.originator_id)), None)
        if len(batch) < _PAGE:
            return list(seen)
        start = batch[-1].id + 1


def audit_all(app: FlowledgerApp) -> Iterator[AuditReport]:
    """Verify every stored execution's hash chain."""
    for execution_id in stored_execution_ids(app):
        yield audit_execution(app, execution_id)


def export_history(app: FlowledgerApp, execution_id: UUID) -> Iterator[dict[str, Any]]:
    """One JSON object per stored event, as stored: type, version, timestamp, data, hash.

    The topic is included so the export can be verified on its own (it is hashed).
    """
    for record in stored_records(app, execution_id):
        line: dict[str, Any] = {
            "execution_id": str(record.originator_id),
            "version": record.version,
            "type": record.event_type,
            "topic": record.topic,
        }
        state = record.state
        if state is None:
            line.update(timestamp=None, hash=None, data=None, unreadable=True)
        else:
            timestamp = record.timestamp
            attributes = {
                k: v for k, v in state.items() if k not in ("hash", "class_version", "timestamp")
            }
            line.update(
                timestamp=timestamp.isoformat() if timestamp is not None else None,
                hash=record.hash,
                class_version=record.class_version,
                data=json.loads(canonical_attributes(attributes)),
            )
        yield line
