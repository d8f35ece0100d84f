"""What the views read from stored events: names, times, hashes, definition documents.

Events are read by attribute name, so an attribute a later class version adds (a `hash`,
an `agent`) is ignored until a view asks for it, and one it drops reads as None.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from flowledger.domain.workflow import DISPATCHED_TYPES  # steps whose attempts an agent runs

LOCAL_AGENT = "local"  # the in-process runner: agents loaded with --agents, webhook client
EXECUTION_PREFIX = "Execution."
WORKER_LOST = "WorkerLost"  # the error of an attempt whose worker died (an unknown end)
VERSION_REGISTERED = "WorkflowVersion.WorkflowVersionRegistered"


def event_name(event: Any) -> str:
    """The event class's qualified name, e.g. `Execution.StepStarted`."""
    return type(event).__qualname__


def attr(event: Any, name: str) -> Any:
    """An event attribute, or None when this version of the event has none."""
    return getattr(event, name, None)


def micros(moment: datetime) -> int:
    """Microseconds since the epoch (a naive time is taken as UTC): exact, and sortable."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    delta = moment - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def iso(moment: datetime | None) -> str | None:
    """A time as the execution document writes it."""
    return moment.isoformat() if moment is not None else None


def canonical(value: Any) -> str:
    """JSON with sorted keys and no spaces: equal values give equal text."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def content_hash(value: Any) -> str:
    """SHA-256 of the canonical JSON of a value (a step's input or output)."""
    return hashlib.sha256(canonical(value).encode()).hexdigest()


def agent_of(event: Any, step_type: str | None) -> str | None:
    """Who runs an attempt: the agent the event names (remote agents, later), "local" for
    an action or webhook run in-process, None for steps that run on no agent."""
    named = attr(event, "agent")
    if isinstance(named, str) and named:
        return named
    return LOCAL_AGENT if step_type in DISPATCHED_TYPES else None


def agent_named(event: Any) -> str | None:
    """The remote agent an attempt's outcome names (its start could not: the agent that
    takes a task is known only when it answers); None when it ran in this process."""
    named = attr(event, "agent")
    return named if isinstance(named, str) and named else None


def named_agent(event: Any) -> dict[str, Any]:
    """{"agent": name} when the outcome names one (to update a row with), else {}."""
    named = agent_named(event)
    return {"agent": named} if named else {}


def step_types(document: dict[str, Any]) -> dict[str, str]:
    """step_id -> type for every step of a stored definition: nested bodies and handlers."""

    def walk(steps: Any) -> Iterator[tuple[str, str]]:
        for step in steps if isinstance(steps, list) else []:
            if isinstance(step, dict) and isinstance(step.get("step_id"), str):
                yield step["step_id"], str(step.get("type"))
                yield from walk(step.get("parallel_steps"))
                if step.get("type") == "loop":
                    yield from walk(step.get("steps"))

    types: dict[str, str] = {}
    for step_id, kind in (*walk(document.get("steps")), *walk(document.get("handlers"))):
        types.setdefault(step_id, kind)
    return types


def tags(document: dict[str, Any]) -> list[str]:
    """A stored definition's tags, each once, in order."""
    found = document.get("tags")
    return list(dict.fromkeys(t for t in found if isinstance(t, str))) if found else []


def sla_targets(document: dict[str, Any]) -> dict[str, float]:
    """A stored definition's SLA targets."""
    found = document.get("sla_targets") or {}
    return {str(k): float(v) for k, v in found.items() if isinstance(v, int | float)}
