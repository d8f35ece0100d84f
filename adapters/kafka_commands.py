"""The commands clients publish to `<prefix>.commands` (shared/spec/commands.md), validated.

A message is untrusted input: its value is bounded (1 MiB), must be one JSON object, and
must match one command's schema exactly (unknown fields are an error). What fails is a
`CommandRejected` with the DLQ's `error-type` and a readable reason; nothing of it is
stored.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from flowledger.adapters.http_models import JsonObject

MAX_COMMAND_BYTES = 1_048_576


class CommandRejected(Exception):
    """A message that is not a command flowledger can take (it goes to the DLQ)."""

    def __init__(self, error_type: str, reason: str) -> None:
        super().__init__(reason)
        self.error_type = error_type
        self.reason = reason


class _Command(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    command_id: Annotated[str, Field(min_length=1, max_length=128)]


class RegisterWorkflow(_Command):
    """Register a workflow version (the document of workflows.md)."""

    type: Literal["register_workflow"]
    definition: JsonObject


class StartExecution(_Command):
    """Start an execution of a workflow (the newest version unless one is named)."""

    type: Literal["start_execution"]
    workflow_id: Annotated[str, Field(min_length=1, max_length=256)]
    version: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    input: JsonObject
    idempotency_key: Annotated[str, Field(min_length=1, max_length=256)] | None = None


class CompleteHumanTask(_Command):
    """Answer a waiting human task."""

    type: Literal["complete_human_task"]
    execution_id: UUID
    step_id: Annotated[str, Field(min_length=1, max_length=512)]
    data: JsonObject


class CancelExecution(_Command):
    """Cancel an execution (its completed steps are compensated)."""

    type: Literal["cancel_execution"]
    execution_id: UUID
    reason: Annotated[str, Field(max_length=1000)] | None = None


class RetryExecution(_Command):
    """Retry a failed, timed-out or cancelled execution from the steps that did not complete."""

    type: Literal["retry_execution"]
    execution_id: UUID


Command = Annotated[
    RegisterWorkflow | StartExecution | CompleteHumanTask | CancelExecution | RetryExecution,
    Field(discriminator="type"),
]
_COMMAND: TypeAdapter[Command] = TypeAdapter(Command)
TYPES = (
    "register_workflow",
    "start_execution",
    "complete_human_task",
    "cancel_execution",
    "retry_execution",
)


def parse_command(value: bytes | None) -> Command:
    """The command a message's value holds; CommandRejected says why it holds none."""
    if value is None:
        raise CommandRejected("InvalidCommand", "the message has no value")
    if len(value) > MAX_COMMAND_BYTES:
        raise CommandRejected(
            "CommandTooLarge",
            f"the value has {len(value):,} bytes; a command has at most {MAX_COMMAND_BYTES:,}",
        )
    try:
        document: Any = json.loads(value.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise CommandRejected("InvalidJson", f"the value is not UTF-8: {exc}") from None
    except (ValueError, RecursionError) as exc:
        raise CommandRejected("InvalidJson", f"the value is not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise CommandRejected("InvalidCommand", "the value is JSON but not an object")
    kind = document.get("type")
    if kind not in TYPES:
        raise CommandRejected(
            "InvalidCommand",
            f"unknown command type {kind!r}: use one of {', '.join(TYPES)}"
            if kind is not None
            else "the command has no 'type'",
        )
    try:
        return _COMMAND.validate_python(document)
    except ValidationError as exc:
        raise CommandRejected("InvalidCommand", _problems(exc)) from None


def _problems(exc: ValidationError) -> str:
    found = []
    for error in exc.errors(include_url=False, include_input=False):
        # The first location is the union member (the command type): name the field only.
        where = ".".join(str(p) for p in error["loc"][1:]) or "command"
        found.append(f"{where}: {error['msg']}")
    return "; ".join(found)
