"""Commands from the command topic are validated before anything is stored."""

from __future__ import annotations

import json
from uuid import uuid4

import pytest

from flowledger.adapters.kafka import kafka_settings
from flowledger.adapters.kafka_commands import (
    MAX_COMMAND_BYTES,
    CommandRejected,
    StartExecution,
    parse_command,
)
from flowledger.domain.errors import ConfigurationError


def _bytes(doc: object) -> bytes:
    return json.dumps(doc).encode()


def test_a_start_command_is_parsed() -> None:
    command = parse_command(
        _bytes(
            {
                "command_id": "c-1",
                "type": "start_execution",
                "workflow_id": "wf",
                "input": {"a": 1},
                "idempotency_key": "order-7",
            }
        )
    )
    assert command == StartExecution(
        command_id="c-1",
        type="start_execution",
        workflow_id="wf",
        version=None,
        input={"a": 1},
        idempotency_key="order-7",
    )


@pytest.mark.parametrize(
    ("value", "error_type", "says"),
    [
        (b"{not json", "InvalidJson", "not JSON"),
        (b"\xff\xfe", "InvalidJson", "not UTF-8"),
        (b"[1, 2]", "InvalidCommand", "not an object"),
        (_bytes({"command_id": "c"}), "InvalidCommand", "no 'type'"),
        (_bytes({"command_id": "c", "type": "drop_tables"}), "InvalidCommand", "drop_tables"),
        (
            _bytes({"command_id": "c", "type": "cancel_execution", "execution_id": "nope"}),
            "InvalidCommand",
            "execution_id",
        ),
        (
            _bytes(
                {
                    "command_id": "c",
                    "type": "retry_execution",
                    "execution_id": str(uuid4()),
                    "force": True,
                }
            ),
            "InvalidCommand",
            "force: Extra inputs are not permitted",
        ),
        (
            _bytes({"command_id": "", "type": "retry_execution", "execution_id": str(uuid4())}),
            "InvalidCommand",
            "command_id",
        ),
        (
            _bytes(
                {"command_id": "x" * 129, "type": "retry_execution", "execution_id": str(uuid4())}
            ),
            "InvalidCommand",
            "command_id",
        ),
        (
            _bytes(
                {"command_id": "c", "type": "start_execution", "workflow_id": "w", "input": [1]}
            ),
            "InvalidCommand",
            "input",
        ),
        (None, "InvalidCommand", "no value"),
    ],
)
def test_a_message_that_is_no_command_is_rejected_with_its_reason(
    value: bytes | None, error_type: str, says: str
) -> None:
    with pytest.raises(CommandRejected) as caught:
        parse_command(value)
    assert caught.value.error_type == error_type
    assert says in caught.value.reason


def test_an_oversized_message_is_rejected_before_it_is_parsed() -> None:
    value = b'{"command_id": "c", "pad": "' + b"x" * MAX_COMMAND_BYTES + b'"}'
    with pytest.raises(CommandRejected) as caught:
        parse_command(value)
    assert caught.value.error_type == "CommandTooLarge"


def test_kafka_settings_come_from_the_environment() -> None:
    assert kafka_settings({}) is None
    settings = kafka_settings(
        {"KAFKA_BOOTSTRAP_SERVERS": "a:9092, b:9093", "FLOWLEDGER_TOPIC_PREFIX": "acme"}
    )
    assert settings is not None
    assert settings.bootstrap == "a:9092,b:9093"
    assert (settings.commands, settings.dlq, settings.group) == (
        "acme.commands",
        "acme.commands.dlq",
        "acme-workers",
    )


@pytest.mark.parametrize(
    "env",
    [
        {"KAFKA_BOOTSTRAP_SERVERS": "localhost"},
        {"KAFKA_BOOTSTRAP_SERVERS": "a:1", "FLOWLEDGER_TOPIC_PREFIX": "no spaces"},
        {"KAFKA_BOOTSTRAP_SERVERS": "a:1", "FLOWLEDGER_KAFKA_PARTITIONS": "0"},
    ],
)
def test_bad_kafka_settings_are_named(env: dict[str, str]) -> None:
    with pytest.raises(ConfigurationError):
        kafka_settings(env)
