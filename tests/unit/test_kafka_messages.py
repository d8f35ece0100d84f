"""What flowledger puts on Kafka and takes from it, without a broker: event ids and types,
the shape of an event's message, the task messages of remote agents, task topics, agent
capabilities, and the partition an execution id falls on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID, uuid4, uuid5

import pytest
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.structs import ConsumerRecord
from confluent_kafka import Producer
from eventsourcing.persistence import Notification
from pydantic import ValidationError

from flowledger.adapters.agents import AgentRegistry
from flowledger.adapters.kafka import KafkaSettings, partition_of
from flowledger.adapters.kafka_events import event_id, event_type, message
from flowledger.adapters.kafka_messages import (
    MAX_TASK_BYTES,
    Heartbeat,
    Task,
    TaskResult,
    parse,
    task_topic,
)
from flowledger.services.audit import execution_topics
from flowledger.services.ports import AttemptFailed

TOPIC = "flowledger.domain.execution:Execution."
SETTINGS = KafkaSettings("127.0.0.1:9092", "acme")
KAFKA_TOPIC_MAX = 249  # Kafka refuses longer topic names (InvalidTopicException)

# -- event ids ----------------------------------------------------------------------------


def test_an_event_id_is_the_same_for_the_same_stored_event() -> None:
    eid = uuid4()

    assert event_id(eid, 3) == event_id(eid, 3)
    assert event_id(eid, 3) == event_id(str(eid), 3)  # as a UUID or as its string
    assert UUID(event_id(eid, 3)).version == 5


def test_event_ids_differ_between_versions_and_between_executions() -> None:
    executions = [uuid5(UUID(int=0), str(n)) for n in range(40)]

    ids = {event_id(eid, version) for eid in executions for version in range(1, 41)}

    assert len(ids) == 40 * 40


# -- event types ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("ExecutionStarted", "execution_started"),
        ("StepStarted", "step_started"),
        ("StepSucceeded", "step_succeeded"),
        ("StepFailed", "step_failed"),
        ("StepRetryScheduled", "step_retry_scheduled"),
        ("HumanTaskCompleted", "human_task_completed"),
        ("ExecutionCompleted", "execution_completed"),
        ("ExecutionFailed", "execution_failed"),
        ("ExecutionTimedOut", "execution_timed_out"),
        ("ExecutionCancelled", "execution_cancelled"),
    ],
)
def test_an_event_type_is_the_event_class_in_lower_snake_case(name: str, expected: str) -> None:
    assert event_type(TOPIC + name) == expected


def test_every_execution_event_has_a_distinct_lower_snake_case_type() -> None:
    topics = execution_topics()
    types = [event_type(topic) for topic in topics]

    assert len(set(types)) == len(topics)
    for kind in types:
        assert kind.replace("_", "").isalpha(), kind
        assert kind == kind.lower(), kind
        assert not kind.startswith("_"), kind
        assert "__" not in kind, kind


# -- an event's message -----------------------------------------------------------------------


def _state(eid: UUID, version: int, **attributes: Any) -> dict[str, Any]:
    """An event's state as the store's mapper decodes it."""
    return {
        "originator_id": eid,
        "originator_version": version,
        "timestamp": datetime(2025, 3, 4, 5, 6, 7, 890_000, tzinfo=UTC),
        "class_version": 2,
        "hash": "ab" * 32,
        **attributes,
    }


def test_a_message_is_keyed_by_execution_and_carries_the_contract_fields() -> None:
    eid = uuid4()
    at = datetime(2025, 3, 4, 5, 6, 8, tzinfo=UTC)
    state = _state(eid, 7, key="fetch", result={"rows": [1, 2]}, at=at, agent=None)
    notification = Notification(eid, 7, TOPIC + "StepSucceeded", b"", 42)

    key, value, headers = message(notification, state, "orders")

    assert key == str(eid).encode()
    body = json.loads(value.decode("utf-8"))
    assert set(body) == {
        "event_id",
        "type",
        "execution_id",
        "workflow_id",
        "version",
        "timestamp",
        "hash",
        "data",
    }
    assert body["event_id"] == event_id(eid, 7)
    assert body["type"] == "step_succeeded"
    assert body["execution_id"] == str(eid)
    assert body["workflow_id"] == "orders"
    assert body["version"] == 7
    assert datetime.fromisoformat(body["timestamp"]) == state["timestamp"]
    assert body["hash"] == "ab" * 32
    # The event's own attributes, as JSON; what the envelope already says is left out.
    assert body["data"]["key"] == "fetch"
    assert body["data"]["result"] == {"rows": [1, 2]}
    assert body["data"]["agent"] is None
    assert datetime.fromisoformat(body["data"]["at"]) == at
    assert not {"hash", "timestamp", "class_version", "originator_id"} & set(body["data"])

    named = dict(headers)
    assert len(named) == len(headers)  # each header once
    assert named["event-id"].decode() == body["event_id"]
    assert named["event-type"].decode() == body["type"]
    assert named["execution-id"].decode() == body["execution_id"]
    assert named["event-version"] == b"7"
    assert named["event-hash"].decode() == body["hash"]


def test_a_message_of_an_event_without_hash_or_workflow_says_null() -> None:
    eid = uuid4()
    state = _state(eid, 1, key="x", reason="r")
    state["hash"] = None  # events stored before the hash chain existed
    notification = Notification(eid, 1, TOPIC + "StepSkipped", b"", 1)

    _, value, headers = message(notification, state, None)

    body = json.loads(value)
    assert body["hash"] is None
    assert body["workflow_id"] is None
    assert dict(headers)["event-hash"] == b""


def test_a_message_of_the_same_event_is_the_same_bytes() -> None:
    eid = uuid4()
    notification = Notification(eid, 2, TOPIC + "StepStarted", b"", 9)

    first = message(notification, _state(eid, 2, key="a", input={"b": 1, "a": 2}), "wf")
    again = message(notification, _state(eid, 2, input={"a": 2, "b": 1}, key="a"), "wf")

    assert first == again


# -- task messages --------------------------------------------------------------------------


def _task(**change: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "attempt_id": "att-1",
        "execution_id": str(uuid4()),
        "step_key": "fetch",
        "step_id": "fetch",
        "attempt": 1,
        "action": "fetch",
        "capability": "http",
        "input": {"url": "https://example.com"},
        "deadline": datetime.now(UTC) + timedelta(seconds=30),
        "worker": "worker-1",
    }
    fields.update(change)
    return fields


def _result(**change: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "attempt_id": "att-1",
        "execution_id": str(uuid4()),
        "agent_id": "agent-1",
        "ok": True,
        "output": {"status": 200},
    }
    fields.update(change)
    return fields


def _heartbeat(**change: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "agent_id": "agent-1",
        "capabilities": ["http"],
        "actions": ["fetch"],
        "in_flight": 0,
        "at": datetime.now(UTC),
    }
    fields.update(change)
    return fields


@pytest.mark.parametrize(
    ("model", "fields"),
    [(Task, _task()), (TaskResult, _result()), (Heartbeat, _heartbeat())],
)
def test_a_message_survives_its_json_round_trip(model: Any, fields: dict[str, Any]) -> None:
    made = model(**fields)

    assert model.model_validate_json(made.model_dump_json()) == made


@pytest.mark.parametrize(
    ("model", "fields"),
    [
        (Task, _task(priority=1)),
        (TaskResult, _result(cost=3)),
        (Heartbeat, _heartbeat(region="eu")),
    ],
)
def test_a_message_with_an_unknown_field_is_refused(model: Any, fields: dict[str, Any]) -> None:
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        model.model_validate_json(json.dumps(fields, default=str))


def _deep(levels: int) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    for _ in range(levels):
        doc = {"d": doc}
    return doc


@pytest.mark.parametrize(
    "change",
    [
        {"attempt": 0},
        {"attempt_id": ""},
        {"attempt_id": "a" * 513},
        {"step_key": "k" * 4097},
        {"worker": ""},
        {"input": [1, 2]},
        {"input": {"x": float("nan")}},
        {"input": _deep(101)},
        {"deadline": "tomorrow"},
    ],
    ids=repr,
)
def test_an_invalid_task_is_refused(change: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        Task(**_task(**change))


def test_a_task_at_its_limits_is_taken() -> None:
    task = Task(**_task(attempt_id="a" * 512, step_key="k" * 4096, input=_deep(99)))

    assert len(task.step_key) == 4096


@pytest.mark.parametrize(
    "change",
    [
        {"message": "m" * 8001},
        {"agent_id": ""},
        {"output": ["not", "an", "object"]},
        {"error_type": "e" * 513},
    ],
    ids=repr,
)
def test_an_invalid_task_result_is_refused(change: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        TaskResult(**_result(**change))


@pytest.mark.parametrize(
    "change",
    [{"in_flight": -1}, {"state": "sleeping"}, {"capabilities": [""]}, {"at": None}],
    ids=repr,
)
def test_an_invalid_heartbeat_is_refused(change: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        Heartbeat(**_heartbeat(**change))


def test_a_message_cannot_be_changed_once_made() -> None:
    task = Task(**_task())

    with pytest.raises(ValidationError):
        task.attempt = 2  # type: ignore[misc]


def _record(value: bytes | None) -> ConsumerRecord[bytes, bytes]:
    size = -1 if value is None else len(value)
    return ConsumerRecord("t", 0, 5, 0, 0, b"k", value, None, 1, size, [])


def test_a_task_read_from_a_topic_is_parsed() -> None:
    task = Task(**_task())

    assert parse(Task, _record(task.model_dump_json().encode())) == task


@pytest.mark.parametrize(
    "value",
    [
        None,
        b"not json",
        b"[]",
        json.dumps(_result()).encode(),  # a result is no task
        b'{"pad": "' + b"x" * MAX_TASK_BYTES + b'"}',
    ],
    ids=["no value", "not json", "not an object", "another message", "oversized"],
)
def test_a_value_that_is_no_task_is_dropped(value: bytes | None) -> None:
    assert parse(Task, _record(value)) is None


def test_an_oversized_value_is_dropped_before_it_is_parsed() -> None:
    task = Task(**_task(input={"pad": "x" * (MAX_TASK_BYTES - 100)}))
    value = task.model_dump_json().encode()
    assert len(value) > MAX_TASK_BYTES
    assert Task.model_validate_json(value) == task  # a valid task, only too large

    assert parse(Task, _record(value)) is None


# -- task topics ----------------------------------------------------------------------------


@pytest.mark.parametrize("capability", ["http", "nlp.summarize", "ocr_v2", "A-1", "c" * 150])
def test_a_capability_names_its_task_topic(capability: str) -> None:
    assert task_topic(SETTINGS, capability) == f"acme.tasks.{capability}"


@pytest.mark.parametrize(
    "capability", ["", "two words", "a/b", "ünïcode", "tab\t", "c" * 151], ids=repr
)
def test_a_capability_that_cannot_name_a_topic_is_refused(capability: str) -> None:
    with pytest.raises(AttemptFailed) as caught:
        task_topic(SETTINGS, capability)

    assert caught.value.error_type == "InvalidCapability"
    assert caught.value.retryable is False


def test_a_capability_whose_topic_would_be_too_long_for_kafka_is_refused() -> None:
    settings = KafkaSettings("127.0.0.1:9092", "p" * 200)  # kafka_settings takes this prefix

    assert len(f"{settings.prefix}.tasks.{'c' * 150}") > KAFKA_TOPIC_MAX

    with pytest.raises(AttemptFailed):
        task_topic(settings, "c" * 150)


# -- agent capabilities ------------------------------------------------------------------------


def test_every_action_is_its_own_capability_and_also_offers_its_declared_one() -> None:
    registry = AgentRegistry()
    for name, capability in [
        ("summarize", "nlp"),
        ("translate", "nlp"),
        ("ocr", None),
        ("fast_fetch", "fetch"),
        ("fetch", None),
    ]:
        registry.action(name, capability=capability)(lambda data: {})

    assert registry.capabilities() == {
        "fast_fetch": ["fast_fetch"],
        "fetch": ["fast_fetch", "fetch"],
        "nlp": ["summarize", "translate"],
        "ocr": ["ocr"],
        "summarize": ["summarize"],
        "translate": ["translate"],
    }


def test_an_action_declaring_its_own_name_as_capability_is_listed_once() -> None:
    registry = AgentRegistry()
    registry.action("ocr", capability="ocr")(lambda data: {})

    assert registry.capabilities() == {"ocr": ["ocr"]}
    assert AgentRegistry().capabilities() == {}


# -- partitions -------------------------------------------------------------------------------

# Kafka's own test vectors for its murmur2 (org.apache.kafka.common.utils.UtilsTest), as the
# signed 32-bit ints Java returns; its default partitioner takes toPositive(hash) % count.
JAVA_MURMUR2 = {
    "21": -973932308,
    "foobar": -790332482,
    "a-little-bit-long-string": -985981536,
    "a-little-bit-longer-string": -1486304829,
    "lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
    "abc": 479470107,
}
KEYS = [str(uuid5(UUID(int=1), str(n))) for n in range(200)]


@pytest.mark.parametrize("key", sorted(JAVA_MURMUR2))
@pytest.mark.parametrize("partitions", [1, 2, 3, 4, 7, 12, 100])
def test_partition_of_is_the_java_client_s_partition(key: str, partitions: int) -> None:
    assert partition_of(key, partitions) == (JAVA_MURMUR2[key] & 0x7FFFFFFF) % partitions


@pytest.mark.parametrize("partitions", [1, 2, 3, 4, 6, 16])
def test_partition_of_is_aiokafka_s_default_partitioner(partitions: int) -> None:
    every = list(range(partitions))
    for key in KEYS:
        assert partition_of(key, partitions) == DefaultPartitioner()(key.encode(), every, every)


def test_partition_of_is_where_librdkafka_s_murmur2_partitioner_puts_a_key() -> None:
    # librdkafka's in-process mock cluster (no broker): auto-created topics get 4 partitions.
    producer = Producer(
        {"test.mock.num.brokers": 1, "partitioner": "murmur2_random", "log_level": 0}
    )
    placed: dict[str, int] = {}

    def delivered(err: Any, msg: Any) -> None:
        assert err is None, err
        placed[msg.key().decode()] = msg.partition()

    for key in KEYS[:60]:
        producer.produce("placed", key=key.encode(), value=b"x", on_delivery=delivered)
    assert producer.flush(30) == 0
    count = len(producer.list_topics("placed", timeout=10).topics["placed"].partitions)

    assert count > 1
    assert len(placed) == 60
    assert placed == {key: partition_of(key, count) for key in KEYS[:60]}
    assert len(set(placed.values())) == count  # the keys spread over every partition


def test_partition_of_spreads_execution_ids_over_every_partition() -> None:
    placed = [partition_of(key, 8) for key in KEYS]

    assert set(placed) == set(range(8))
    assert max(placed.count(p) for p in range(8)) < 3 * len(KEYS) / 8


def test_partition_of_is_the_same_in_every_process() -> None:
    # Another process with another string hash seed (Python's hash() is salted per process):
    # every worker must agree on which of them drives an execution.
    script = (
        "import json, sys\n"
        "from flowledger.adapters.kafka import partition_of\n"
        "keys = json.load(sys.stdin)\n"
        "print(json.dumps([partition_of(k, 12) for k in keys]))\n"
    )
    here = [partition_of(key, 12) for key in KEYS]
    for seed in ("1", "2"):
        done = subprocess.run(
            [sys.executable, "-c", script],
            input=json.dumps(KEYS),
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
            timeout=60,
        )
        assert json.loads(done.stdout) == here
