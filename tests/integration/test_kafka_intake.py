"""Commands published to Kafka by a plain client (confluent-kafka, not flowledger's code)
drive executions; poison messages go to the DLQ and do not stall their partition.

Against a real broker (tests/kafka_broker.py: Tansu, or KAFKA_BOOTSTRAP_SERVERS)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from confluent_kafka import Producer
from kafka_broker import Broker

from flowledger.adapters.agents import AgentRegistry, InProcessRunner
from flowledger.adapters.kafka import CommandIntake, KafkaSettings, ensure_topics
from flowledger.adapters.kafka_commands import MAX_COMMAND_BYTES
from flowledger.adapters.webhook import WebhookClient
from flowledger.domain.states import ExecutionStatus
from flowledger.services.app import FlowledgerApp
from flowledger.services.engine import Engine

SETTLE = 60.0  # a consumer group's first join takes about 5 s here
DEFINITION = {
    "workflow_id": "greet",
    "version": "1",
    "steps": [{"step_id": "hello", "type": "action", "action": "hello"}],
}


@pytest.fixture
async def running(
    kafka_broker: Broker, topic_prefix: str, tmp_path: Path
) -> AsyncIterator[tuple[FlowledgerApp, Engine, CommandIntake]]:
    """A worker's parts in this process: the store, an engine, and the command intake."""
    settings = KafkaSettings(kafka_broker.bootstrap, topic_prefix, partitions=2)
    await ensure_topics(settings)
    app = FlowledgerApp(
        env={"PERSISTENCE_MODULE": "eventsourcing.sqlite", "SQLITE_DBNAME": str(tmp_path / "s.db")}
    )
    registry = AgentRegistry()

    @registry.action("hello")
    async def hello(data: dict[str, Any]) -> dict[str, Any]:
        return {"greeting": f"hello {data.get('name', 'world')}"}

    runner = InProcessRunner(registry, WebhookClient())
    engine = Engine(app, runner)
    intake = CommandIntake(app, settings, engine.poll_store)
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(intake.run(stop)),
        asyncio.create_task(engine.watch_store(stop)),
    ]
    try:
        yield app, engine, intake
    finally:
        stop.set()
        await asyncio.gather(*tasks)
        await engine.close()
        runner.close()
        app.close()


def publish(broker: Broker, topic: str, messages: list[tuple[bytes | None, bytes]]) -> None:
    """Publish with librdkafka (confluent-kafka), as a client outside flowledger would."""
    producer = Producer({"bootstrap.servers": broker.bootstrap, "message.max.bytes": 4_000_000})
    for key, value in messages:
        producer.produce(topic, value=value, key=key)
    assert producer.flush(30) == 0


def as_bytes(command: dict[str, Any]) -> bytes:
    return json.dumps(command).encode()


async def until(condition: Any, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + SETTLE
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not within {SETTLE:g} s: {what}")
        await asyncio.sleep(0.05)


async def dlq_messages(broker: Broker, topic: str, count: int) -> list[Any]:
    """The first `count` messages of the DLQ (read without a consumer group)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=broker.bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        while not partitions:
            await consumer.client.force_metadata_update()
            partitions = consumer.partitions_for_topic(topic) or set()
        consumer.assign([TopicPartition(topic, p) for p in partitions])
        await consumer.seek_to_beginning()
        found: list[Any] = []
        deadline = asyncio.get_running_loop().time() + SETTLE
        while len(found) < count:
            assert asyncio.get_running_loop().time() < deadline, f"only {len(found)} in {topic}"
            for messages in (await consumer.getmany(timeout_ms=200)).values():
                found.extend(messages)
        return found
    finally:
        await consumer.stop()


async def test_a_start_published_by_a_plain_client_runs_to_completion(
    running: tuple[FlowledgerApp, Engine, CommandIntake], kafka_broker: Broker, topic_prefix: str
) -> None:
    app, engine, intake = running
    start = {
        "command_id": str(uuid4()),
        "type": "start_execution",
        "workflow_id": "greet",
        "input": {"name": "kafka"},
        "idempotency_key": "greeting-1",
    }
    register = {"command_id": "r1", "type": "register_workflow", "definition": DEFINITION}
    publish(kafka_broker, f"{topic_prefix}.commands", [(b"greet", as_bytes(register))])
    # Keys spread commands over partitions, ordered only within one: register first.
    await until(lambda: intake.handled == 1, "the workflow registered")
    # The same start three times (a client retrying, say): one execution.
    publish(kafka_broker, f"{topic_prefix}.commands", [(b"greeting-1", as_bytes(start))] * 3)
    await until(lambda: intake.handled + intake.duplicates >= 4, "four commands taken")
    (eid,) = app.execution_ids()
    ex = await asyncio.wait_for(engine.wait_settled(eid), SETTLE)

    assert ex.status is ExecutionStatus.COMPLETED
    assert ex.data["hello"] == {"greeting": "hello kafka"}
    assert (intake.handled, intake.duplicates, intake.rejected) == (2, 2, 0)


async def test_poison_messages_go_to_the_dlq_and_the_commands_behind_them_run(
    running: tuple[FlowledgerApp, Engine, CommandIntake], kafka_broker: Broker, topic_prefix: str
) -> None:
    app, engine, intake = running
    key = b"one-partition"  # every message on one partition, in this order
    poison = [
        (b"{not json", "InvalidJson"),
        (
            as_bytes({"command_id": "w", "type": "start_execution", "workflow": "greet"}),
            "InvalidCommand",
        ),
        (b'{"pad": "' + b"x" * MAX_COMMAND_BYTES + b'"}', "CommandTooLarge"),
        (
            as_bytes(
                {"command_id": "u", "type": "start_execution", "workflow_id": "nope", "input": {}}
            ),
            "WorkflowNotFound",
        ),
    ]
    publish(
        kafka_broker,
        f"{topic_prefix}.commands",
        [
            (
                key,
                as_bytes(
                    {"command_id": "r", "type": "register_workflow", "definition": DEFINITION}
                ),
            ),
            *[(key, value) for value, _ in poison],
            (
                key,
                as_bytes(
                    {
                        "command_id": "s",
                        "type": "start_execution",
                        "workflow_id": "greet",
                        "input": {},
                    }
                ),
            ),
        ],
    )
    await until(lambda: intake.handled == 2, "the register and the start behind the poison")
    (eid,) = app.execution_ids()
    ex = await asyncio.wait_for(engine.wait_settled(eid), SETTLE)
    assert ex.status is ExecutionStatus.COMPLETED

    rejected = await dlq_messages(kafka_broker, f"{topic_prefix}.commands.dlq", len(poison))
    assert [m.value for m in rejected] == [value for value, _ in poison]
    for message, (_, error_type) in zip(rejected, poison, strict=True):
        headers = {k: v.decode() for k, v in message.headers}
        assert headers["error-type"] == error_type
        assert headers["error"]
        assert headers["original-topic"] == f"{topic_prefix}.commands"
        assert int(headers["original-offset"]) >= 1
        assert message.key == key
    assert intake.rejected == len(poison)
