"""Fixtures shared by every test layer."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from flowledger.adapters.agents import AgentRegistry, InProcessRunner
from flowledger.adapters.webhook import WebhookClient
from flowledger.services.app import FlowledgerApp
from flowledger.services.engine import Engine


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
