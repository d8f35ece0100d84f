"""Remote agents over Kafka: tasks out to an agent's inbox `<prefix>.agent.<agent_id>` or to
`<prefix>.tasks.<capability>`, results back.

What workers (`kafka_tasks.RemoteRunner`) and agents (`kafka_agent.AgentService`) say to
each other: the task, result and heartbeat messages, the topics tasks go on, and the limits
both keep.
"""

from __future__ import annotations

import logging
import os
import re
import socket
from datetime import datetime
from typing import Annotated, Literal, TypeVar

from aiokafka import ConsumerRecord
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from flowledger.adapters.http_models import JsonObject
from flowledger.adapters.kafka import KafkaSettings
from flowledger.services.ports import AttemptFailed

log = logging.getLogger(__name__)
MAX_TASK_BYTES = 2 * 1_048_576  # an input or a result is at most 1 MiB, plus the envelope
HEARTBEAT_EVERY = 2.0  # seconds between an agent's announcements
# How long the broker may hold a fetch that finds nothing new: the latency a task or result
# can wait on a broker that answers a fetch only when this runs out (Tansu does).
FETCH_WAIT_MS = 20
_TOPIC_PART = re.compile(r"^[A-Za-z0-9._-]{1,150}$")
MAX_TOPIC_NAME = 249  # Kafka's limit
Text = Annotated[str, Field(min_length=1, max_length=512)]


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Task(_Message):
    """One attempt for a remote agent to run."""

    attempt_id: Text
    execution_id: Text
    step_key: Annotated[str, Field(min_length=1, max_length=4096)]
    step_id: Text
    attempt: Annotated[int, Field(ge=1)]
    action: Text
    capability: Text
    input: JsonObject
    deadline: datetime | None = None  # when the worker stops waiting for the result
    worker: Text


class TaskResult(_Message):
    """What an agent answers: the output, or the error, of one attempt."""

    attempt_id: Text
    execution_id: Text
    agent_id: Text
    ok: bool
    output: JsonObject | None = None
    error_type: Text | None = None
    message: Annotated[str, Field(max_length=8000)] = ""
    retryable: bool | None = None


class Heartbeat(_Message):
    """An agent's announcement: who it is, what it offers, how busy it is."""

    agent_id: Text
    capabilities: list[Text]
    actions: list[Text]
    in_flight: Annotated[int, Field(ge=0)]
    at: datetime
    state: Literal["up", "down"] = "up"
    concurrency: Annotated[int, Field(ge=1)] | None = None  # tasks it runs at once
    inbox: bool = False  # it reads `<prefix>.agent.<agent_id>`: it can be sent tasks by name


M = TypeVar("M", bound=_Message)


def task_topic(settings: KafkaSettings, capability: str) -> str:
    """The topic of a capability's tasks; ConfigurationError-like AttemptFailed if the
    capability cannot name a topic."""
    topic = f"{settings.prefix}.tasks.{capability}"
    if not _TOPIC_PART.match(capability) or len(topic) > MAX_TOPIC_NAME:
        raise AttemptFailed(
            "InvalidCapability",
            f"capability {capability!r} cannot name a Kafka topic: use letters, digits, "
            f"'.', '_' or '-', at most {MAX_TOPIC_NAME} characters with the topic's prefix",
            False,
        )
    return topic


def inbox_topic(settings: KafkaSettings, agent_id: str) -> str | None:
    """The topic of an agent's own tasks, or None if its id cannot name a topic."""
    topic = f"{settings.prefix}.agent.{agent_id}"
    if not _TOPIC_PART.match(agent_id) or len(topic) > MAX_TOPIC_NAME:
        return None
    return topic


def parse(model: type[M], message: ConsumerRecord[bytes, bytes]) -> M | None:
    """The message's value as `model`, or None (logged) if it is missing, too large or not one."""
    value = message.value
    if value is None or len(value) > MAX_TASK_BYTES:
        log.warning("%s:%s:%s: no value, or too large", *_where(message))
        return None
    try:
        return model.model_validate_json(value)
    except ValidationError as exc:
        log.warning("%s:%s:%s is not a %s: %s", *_where(message), model.__name__, exc)
        return None


def _where(message: ConsumerRecord[bytes, bytes]) -> tuple[str, int, int]:
    return message.topic, message.partition, message.offset


def agent_id_default() -> str:
    """host-pid: unique enough among the agents of one deployment."""
    return f"{socket.gethostname()}-{os.getpid()}"
