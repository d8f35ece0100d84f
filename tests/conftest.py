"""Fixtures shared by every test layer."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from flowledger.adapters.agents import AgentRegistry, InProcessRunner
from flowledger.adapters.webhook import WebhookClient
from flowledger.domain.definitions import WorkflowDefinition, parse_definition
from flowledger.services.app import FlowledgerApp
from flowledger.services.engine import Engine

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def workflow(doc: dict[str, Any]) -> WorkflowDefinition:
    """A definition from a dict, with a default workflow_id."""
    return parse_definition({"workflow_id": "test-wf", **doc}, "<test>")


@pytest.fixture
def app() -> FlowledgerApp:
    """An application on the in-memory store."""
    return FlowledgerApp(env={"PERSISTENCE_MODULE": "eventsourcing.popo"})


@pytest.fixture
def registry() -> AgentRegistry:
    """An empty agent registry for the test's own actions."""
    return AgentRegistry()


@pytest.fixture
async def engine(app: FlowledgerApp, registry: AgentRegistry) -> AsyncIterator[Engine]:
    """An engine on the in-memory store, running the test's registry and real webhooks."""
    runner = InProcessRunner(registry, WebhookClient())
    eng = Engine(app, runner)
    yield eng
    await eng.close()
    runner.close()


def event_types(app: FlowledgerApp, execution_id: Any) -> list[str]:
    """The class names of an execution's stored events, in order."""
    return [type(e).__name__ for e in app.repository.event_store.get(execution_id)]


def events_of(app: FlowledgerApp, execution_id: Any,
              kind: str | None = None) -> list[Any]:
    """An execution's stored events (only those of class `kind` if given)."""
    events = list(app.repository.event_store.get(execution_id))
    return [e for e in events if kind is None or type(e).__name__ == kind]


Factory = Callable[..., Any]
