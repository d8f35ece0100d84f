"""Every stored Execution event reaches `<prefix>.events` as the contract says, once, in
version order per execution; the publisher's position is a tracking record in the store,
so another publisher goes on from it, and one that starts again from an older position
publishes duplicates that carry the same event ids.

Against a real broker (tests/kafka_broker.py) and each store (memory, SQLite, PostgreSQL);
the events are read back with librdkafka (confluent-kafka), as a client outside flowledger
would, from offset 0 of every partition (no consumer group joined)."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID, uuid4

import pytest
from aiokafka import AIOKafkaProducer
from confluent_kafka import Consumer, Producer, TopicPartition
from kafka_broker import Broker

from flowledger.adapters.agents import ActionContext, AgentRegistry
from flowledger.adapters.kafka import KafkaSettings, ensure_topics, partition_of
from flowledger.adapters.kafka_events import EventPublisher, event_id, event_type
from flowledger.domain.states import ExecutionStatus
from flowledger.services.app import FlowledgerApp

PARTITIONS = 3
DEADLINE = 30.0  # seconds a publication or a read may take before the test fails
MARK = b"test-reader-marker"  # the key of the markers read_topic appends
CONTRACT_FIELDS = {
    "event_id",
    "type",
    "execution_id",
    "workflow_id",
    "version",
    "timestamp",
    "hash",
    "data",
}
WORKFLOW = {
    "workflow_id": "published",
    "version": "1",
    "retry_policy": {"max_retries": 2, "retry_delay": 0.01, "jitter": 0},
    "steps": [
        {"step_id": "fetch", "type": "action", "action": "fetch"},
        {"step_id": "flaky", "type": "action", "action": "flaky", "dependencies": ["fetch"]},
    ],
}


@dataclass(frozen=True)
class Read:
    """One message as a plain client reads it."""

    partition: int
    offset: int
    key: bytes
    body: dict[str, Any]
    value: bytes
    headers: dict[str, bytes]


@pytest.fixture
def actions(registry: AgentRegistry) -> AgentRegistry:
    """`fetch` answers; `flaky` fails its first attempt, and every one when asked to."""

    @registry.action("fetch")
    def fetch(data: dict[str, Any]) -> dict[str, Any]:
        return {"rows": data.get("n", 0)}

    @registry.action("flaky")
    def flaky(data: dict[str, Any], ctx: ActionContext) -> dict[str, Any]:
        if data.get("fail"):
            raise ValueError("refused for good")  # not retryable: the execution fails
        if ctx.attempt == 1:
            raise RuntimeError("first attempt fails")
        return {"attempt": ctx.attempt}

    return registry


@pytest.fixture
async def settings(kafka_broker: Broker, topic_prefix: str) -> KafkaSettings:
    """The test's own topics, made."""
    made = KafkaSettings(kafka_broker.bootstrap, topic_prefix, partitions=PARTITIONS)
    await ensure_topics(made)
    return made


@pytest.fixture
async def producer(kafka_broker: Broker) -> AsyncIterator[AIOKafkaProducer]:
    client = AIOKafkaProducer(bootstrap_servers=kafka_broker.bootstrap, acks="all")
    await client.start()
    try:
        yield client
    finally:
        await client.stop()


async def run_some(run: Any, inputs: list[dict[str, Any]]) -> list[UUID]:
    """Run an execution per input to its end; their ids."""
    ids = []
    for data in inputs:
        _, eid, ex = await run(WORKFLOW, data)
        expected = ExecutionStatus.FAILED if data.get("fail") else ExecutionStatus.COMPLETED
        assert ex.status is expected
        ids.append(eid)
    return ids


async def publish_all(publisher: EventPublisher, producer: AIOKafkaProducer) -> int:
    """Publish pages until the publisher finds nothing new; how many pages moved it."""
    pages = 0
    while await asyncio.wait_for(publisher.publish_once(producer), DEADLINE):
        pages += 1
        assert pages < 1000, "the publisher never reached the end of the log"
    return pages


def read_topic(bootstrap: str, topic: str) -> list[Read]:
    """Every message of the topic, from offset 0 of each partition, in offset order.

    Read up to a marker this reader first appends to each partition, not up to the high
    watermark: Tansu reports the end of a partition as one past the start of its last
    record batch, short of the end when that batch holds several records."""
    token = uuid4().hex.encode()
    marker = Producer({"bootstrap.servers": bootstrap})
    partitions = sorted(marker.list_topics(topic, timeout=10).topics[topic].partitions)
    for p in partitions:
        marker.produce(topic, key=MARK, value=token, partition=p)
    assert marker.flush(DEADLINE) == 0
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"reader-{uuid4()}",  # required by the client; never joined (assign)
            "enable.auto.commit": False,
        }
    )
    try:
        consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
        waiting = set(partitions)
        found: list[Read] = []
        deadline = time.monotonic() + DEADLINE
        while waiting:
            assert time.monotonic() < deadline, f"partitions {waiting} not read to their marker"
            msg = consumer.poll(0.2)
            if msg is None:
                continue
            assert msg.error() is None, msg.error()
            partition, offset, key, value = msg.partition(), msg.offset(), msg.key(), msg.value()
            assert partition is not None
            assert offset is not None
            assert isinstance(key, bytes)
            assert isinstance(value, bytes)
            if key == MARK:  # this reader's, or an earlier one's
                if value == token:
                    waiting.discard(partition)
                continue
            raw = msg.headers() or []
            assert isinstance(raw, list)
            headers = {name: v for name, v in raw if isinstance(v, bytes)}
            assert len(headers) == len(raw)  # each header once, with a value
            found.append(Read(partition, offset, key, json.loads(value), value, headers))
        return sorted(found, key=lambda r: (r.partition, r.offset))
    finally:
        consumer.close()


def stored_events(app: FlowledgerApp) -> dict[str, list[Any]]:
    """Every execution's stored events (domain objects), in version order."""
    return {str(eid): list(app.repository.event_store.get(eid)) for eid in app.execution_ids()}


async def until(condition: Callable[[], bool], what: str) -> None:
    """Wait (in a thread: the condition may read the store) until `condition` holds."""
    deadline = time.monotonic() + DEADLINE
    while not await asyncio.to_thread(condition):
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        await asyncio.sleep(0.02)


def by_execution(reads: list[Read]) -> dict[str, list[Read]]:
    grouped: dict[str, list[Read]] = defaultdict(list)
    for read in reads:  # offset order within a partition, and an execution has one
        grouped[read.body["execution_id"]].append(read)
    return grouped


def assert_published_once(reads: list[Read], app: FlowledgerApp) -> None:
    """Every stored Execution event, once, keyed, in version order, as the contract says."""
    stored = stored_events(app)
    ids = [r.body["event_id"] for r in reads]
    assert len(set(ids)) == len(ids), "an event published twice"
    assert len(reads) == sum(len(events) for events in stored.values())
    published = by_execution(reads)
    assert set(published) == set(stored)
    for eid, events in stored.items():
        mine = published[eid]
        assert {r.partition for r in mine} == {partition_of(eid, PARTITIONS)}
        assert [r.body["version"] for r in mine] == [e.originator_version for e in events]
        for read, event in zip(mine, events, strict=True):
            assert read.key == eid.encode()
            assert set(read.body) == CONTRACT_FIELDS
            assert read.body["event_id"] == event_id(eid, event.originator_version)
            assert read.body["type"] == event_type(type(event).__qualname__)
            assert read.body["execution_id"] == eid
            assert read.body["workflow_id"] == "published"
            assert datetime.fromisoformat(read.body["timestamp"]) == event.timestamp
            assert read.body["hash"] == event.hash
            assert isinstance(read.body["data"], dict)
            assert read.headers["event-id"].decode() == read.body["event_id"]
            assert read.headers["event-type"].decode() == read.body["type"]
            assert read.headers["execution-id"].decode() == eid


async def test_every_execution_event_is_published_once_in_version_order(
    app: FlowledgerApp, actions: AgentRegistry, run: Any, settings: KafkaSettings
) -> None:
    ids = await run_some(run, [{"n": 1}, {"n": 2}, {"n": 3, "fail": True}])
    last = app.recorder.max_notification_id()
    publisher = EventPublisher(app, settings, "test-events")
    assert publisher.position() == 0

    stop = asyncio.Event()
    task = asyncio.create_task(publisher.run(stop))
    try:
        await until(lambda: publisher.position() == last, f"the position reached {last}")
    finally:
        stop.set()
        await asyncio.wait_for(task, DEADLINE)

    reads = await asyncio.to_thread(read_topic, settings.bootstrap, settings.events)
    assert_published_once(reads, app)
    assert publisher.published == len(reads)
    types = Counter(r.body["type"] for r in reads)
    assert types["execution_started"] == 3
    assert types["step_retry_scheduled"] == 2  # flaky's first attempt, in the two that end
    assert types["execution_completed"] == 2
    assert (types["step_failed"], types["execution_failed"]) == (1, 1)
    # The data is the event's own: what the action returned, the error it raised.
    first = by_execution(reads)[str(ids[0])]
    results = [r.body["data"]["result"] for r in first if r.body["type"] == "step_succeeded"]
    assert results == [{"rows": 1}, {"attempt": 2}]
    started = next(r for r in first if r.body["type"] == "execution_started")
    assert started.body["data"]["input"] == {"n": 1}
    assert started.body["version"] == 1
    failed = by_execution(reads)[str(ids[2])]
    error = next(r for r in failed if r.body["type"] == "step_failed").body["data"]["error"]
    assert "ValueError" in json.dumps(error)


async def test_the_position_is_stored_and_another_publisher_goes_on_from_it(
    app: FlowledgerApp,
    actions: AgentRegistry,
    run: Any,
    settings: KafkaSettings,
    producer: AIOKafkaProducer,
) -> None:
    await run_some(run, [{"n": 1}, {"n": 2}])
    first = EventPublisher(app, settings, "first")
    await publish_all(first, producer)
    reached = app.recorder.max_notification_id()
    assert first.position() == reached

    later = await run_some(run, [{"n": 3}])
    second = EventPublisher(app, settings, "second")
    assert second.position() == reached  # read from the store, not from `first`
    await publish_all(second, producer)

    assert second.position() == app.recorder.max_notification_id()
    assert second.published == len(stored_events(app)[str(later[0])])
    reads = await asyncio.to_thread(read_topic, settings.bootstrap, settings.events)
    assert_published_once(reads, app)

    third = EventPublisher(app, settings, "third")
    assert await third.publish_once(producer) == 0
    assert third.published == 0


async def test_a_publisher_whose_position_is_lost_publishes_duplicates_with_the_same_ids(
    app: FlowledgerApp,
    actions: AgentRegistry,
    run: Any,
    settings: KafkaSettings,
    producer: AIOKafkaProducer,
) -> None:
    await run_some(run, [{"n": 1}, {"n": 2, "fail": True}])
    publisher = EventPublisher(app, settings, "test-events")
    await publish_all(publisher, producer)
    once = await asyncio.to_thread(read_topic, settings.bootstrap, settings.events)
    assert_published_once(once, app)

    # A crash after the broker took the messages, before the position was recorded.
    await asyncio.to_thread(publisher._tracking.clear, settings.events)
    assert publisher.position() == 0
    await publish_all(publisher, producer)

    assert publisher.position() == app.recorder.max_notification_id()
    twice = await asyncio.to_thread(read_topic, settings.bootstrap, settings.events)
    assert len(twice) == 2 * len(once)
    copies: dict[str, list[Read]] = defaultdict(list)
    for read in twice:
        copies[read.body["event_id"]].append(read)
    assert set(copies) == {r.body["event_id"] for r in once}
    for original, duplicate in copies.values():
        assert duplicate.value == original.value
        assert duplicate.key == original.key
        assert duplicate.headers == original.headers
        assert duplicate.partition == original.partition
        assert duplicate.offset > original.offset
    # Each pass, on its own, is in version order per execution.
    for reads in by_execution(twice).values():
        versions = [r.body["version"] for r in reads]
        half = len(versions) // 2
        assert versions[:half] == versions[half:] == list(range(1, half + 1))


async def test_a_publisher_that_stopped_before_recording_its_position_republishes_that_page(
    app: FlowledgerApp,
    actions: AgentRegistry,
    run: Any,
    settings: KafkaSettings,
    producer: AIOKafkaProducer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await run_some(run, [{"n": 1}])
    publisher = EventPublisher(app, settings, "test-events")
    await publish_all(publisher, producer)
    before = publisher.position()
    first_pass = await asyncio.to_thread(read_topic, settings.bootstrap, settings.events)
    await run_some(run, [{"n": 2}])

    def crash(*_: Any) -> None:
        raise RuntimeError("the process died here")

    monkeypatch.setattr(publisher._tracking, "insert_tracking", crash)
    with pytest.raises(RuntimeError, match="died"):
        await publisher.publish_once(producer)
    monkeypatch.undo()
    assert publisher.position() == before  # the messages went out; the position did not

    await publish_all(publisher, producer)

    reads = await asyncio.to_thread(read_topic, settings.bootstrap, settings.events)
    counts = Counter(r.body["event_id"] for r in reads)
    old = {r.body["event_id"] for r in first_pass}
    assert all(counts[e] == 1 for e in old)  # what was recorded is not sent again
    new = set(counts) - old
    assert new
    assert all(counts[e] == 2 for e in new)  # the page sent before the crash, twice
    values: dict[str, set[bytes]] = defaultdict(set)
    for read in reads:
        values[read.body["event_id"]].add(read.value)
    assert all(len(v) == 1 for v in values.values())
