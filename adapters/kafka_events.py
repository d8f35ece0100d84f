"""Events out: every stored Execution event, published to `<prefix>.events` in store order.

The publisher follows the store's notification log. Its position is a tracking record in
the store's own database (a table `kafka_events_tracking`, one row per events topic),
advanced only after the broker acknowledged every message up to it; after a crash it
resumes from there, so an event is published at least once, and a duplicate (only after a
crash, or when two publishers overlap while the consumer group moves the job) carries the
same `event_id`.

Messages follow shared/spec/commands.md: key the execution id (one partition per
execution, so its events stay in version order), value JSON `{event_id, type,
execution_id, workflow_id, version, timestamp, hash, data}`, headers `event-id`,
`event-type`, `execution-id`, `event-version`, `event-hash`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections import OrderedDict
from collections.abc import Mapping
from datetime import datetime
from typing import Any
from uuid import NAMESPACE_URL, UUID, uuid5

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from eventsourcing.persistence import IntegrityError, Notification, Tracking

from flowledger.adapters.kafka import MAX_MESSAGE_BYTES, KafkaSettings, recover, stop_client
from flowledger.domain.audit import canonical_attributes
from flowledger.projections.store import ViewRecorder, backend_for, open_view
from flowledger.services.app import FlowledgerApp
from flowledger.services.audit import decode_state, execution_topics

log = logging.getLogger(__name__)
PAGE = 500  # notifications read (and messages sent) per round
IDLE = 0.05  # seconds between looks at the store when nothing new was there
_EVENT_NAMESPACE = uuid5(NAMESPACE_URL, "https://flowledger.dev/events")
_SNAKE = re.compile(r"(?<!^)(?=[A-Z])")
# In the envelope already (or the stored form's own): not repeated in `data`.
_NOT_DATA = frozenset({"hash", "class_version", "timestamp", "originator_id", "originator_version"})


class PublishedEvents(ViewRecorder):
    """Only a tracking table: how far the events topic has been published."""

    name = "kafka_events"
    tables = ()
    schema = ()


def event_id(execution_id: UUID | str, version: int) -> str:
    """The same id for the same stored event, whoever publishes it and however often."""
    return str(uuid5(_EVENT_NAMESPACE, f"{execution_id}/{version}"))


def event_type(topic: str) -> str:
    """`...:Execution.StepSucceeded` -> `step_succeeded`."""
    name = topic.rpartition(".")[2]
    return _SNAKE.sub("_", name).lower()


def message(
    notification: Notification, state: Mapping[str, Any], workflow_id: str | None
) -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
    """The key, value and headers of one event's message."""
    eid = str(notification.originator_id)
    version = notification.originator_version
    kind = event_type(notification.topic)
    timestamp = state.get("timestamp")
    when = timestamp.isoformat() if isinstance(timestamp, datetime) else None
    digest = state.get("hash")
    data = json.loads(canonical_attributes({k: v for k, v in state.items() if k not in _NOT_DATA}))
    identifier = event_id(eid, version)
    body = {
        "event_id": identifier,
        "type": kind,
        "execution_id": eid,
        "workflow_id": workflow_id,
        "version": version,
        "timestamp": when,
        "hash": digest if isinstance(digest, str) else None,
        "data": data,
    }
    headers = [
        ("event-id", identifier.encode()),
        ("event-type", kind.encode()),
        ("execution-id", eid.encode()),
        ("event-version", str(version).encode()),
        ("event-hash", (digest if isinstance(digest, str) else "").encode()),
    ]
    return eid.encode(), json.dumps(body, separators=(",", ":")).encode(), headers


class EventPublisher:
    """Publishes the store's Execution events to the events topic until stopped."""

    def __init__(self, app: FlowledgerApp, settings: KafkaSettings, client_id: str) -> None:
        self.app = app
        self.settings = settings
        self.topic = settings.events
        self.client_id = client_id
        self.published = 0  # messages the broker acknowledged
        backend = backend_for(app)
        self._tracking = open_view(PublishedEvents, backend)  # type: ignore[type-abstract]
        self._topics = execution_topics()
        self._workflows: OrderedDict[str, str | None] = OrderedDict()  # execution -> workflow
        self._wake = asyncio.Event()

    def position(self) -> int:
        """The last notification id published (0: none)."""
        return self._tracking.max_tracking_id(self.topic) or 0

    async def run(self, stop: asyncio.Event) -> None:
        """Publish until `stop` is set; a broker error is retried, never skipped."""
        producer = AIOKafkaProducer(
            bootstrap_servers=self.settings.bootstrap,
            client_id=self.client_id,
            acks="all",
            linger_ms=5,
            max_request_size=MAX_MESSAGE_BYTES,
        )
        await producer.start()
        try:
            while not stop.is_set():
                try:
                    moved = await self.publish_once(producer)
                except KafkaError as exc:  # the broker went away: again from the position
                    log.warning("events not published yet: %s", exc)
                    await recover(self.settings, what="events")
                    continue
                if not moved:
                    await self._idle(stop)
        finally:
            await stop_client(producer)

    def nudge(self) -> None:
        """Something was just stored (by this process): look now, not at the next poll."""
        self._wake.set()

    async def _idle(self, stop: asyncio.Event) -> None:
        """Wait for a nudge, `stop`, or IDLE seconds (what other processes store)."""
        waiters = [asyncio.ensure_future(e.wait()) for e in (self._wake, stop)]
        try:
            await asyncio.wait(waiters, timeout=IDLE, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
        self._wake.clear()

    async def publish_once(self, producer: AIOKafkaProducer) -> int:
        """Publish the next page of events; how many notifications it moved past."""
        page = await asyncio.to_thread(self._page)  # one trip to the store's thread
        if not page:
            return 0
        sent = []
        for notification, state, workflow_id in page:
            if state is None:
                continue  # not an Execution event, or unreadable (the audit reports those)
            key, value, headers = message(notification, state, workflow_id)
            sent.append(await producer.send(self.topic, value=value, key=key, headers=headers))
        if sent:
            await asyncio.gather(*sent)  # every message acknowledged before the position moves
        last = page[-1][0].id
        try:
            await asyncio.to_thread(self._tracking.insert_tracking, Tracking(self.topic, last))
        except IntegrityError:
            log.info("another publisher recorded position %s first", last)
        self.published += len(sent)
        return len(page)

    def _page(self) -> list[tuple[Notification, Mapping[str, Any] | None, str | None]]:
        """The notifications after the position, each with its decoded state (None for
        what is not an Execution event) and its execution's workflow id."""
        notifications = self.app.recorder.select_notifications(self.position() + 1, PAGE)
        page = []
        for n in notifications:
            state = decode_state(self.app, n) if n.topic in self._topics else None
            page.append((n, state, self._workflow_of(n, state) if state is not None else None))
        return page

    def _workflow_of(self, notification: Notification, state: Mapping[str, Any]) -> str | None:
        eid = str(notification.originator_id)
        found = state.get("workflow_id")
        if isinstance(found, str):
            workflow_id: str | None = found
        elif eid in self._workflows:
            workflow_id = self._workflows[eid]
        else:  # its first event says (one read per execution not seen lately)
            first = self.app.recorder.select_events(UUID(eid), lte=1, limit=1)
            start = decode_state(self.app, first[0]) if first else None
            value = start.get("workflow_id") if start is not None else None
            workflow_id = value if isinstance(value, str) else None
        self._workflows[eid] = workflow_id
        self._workflows.move_to_end(eid)
        while len(self._workflows) > 10_000:
            self._workflows.popitem(last=False)
        return workflow_id
