"""Fixtures shared by every test layer."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from flowledger.adapters.agents import AgentRegistry, InProcessRunner
from flowledger.adapters.webhook import WebhookClient
from flowledger.services.app import FlowledgerApp
from flowledger.services.engine import Engine

pytest_plugins = ["postgres_server", "kafka_broker"]

STORES = {
    "memory": lambda request, tmp: {"PERSISTENCE_MODULE": "eventsourcing.popo"},
    "sqlite": lambda request, tmp: {
        "PERSISTENCE_MODULE": "eventsourcing.sqlite",
        "SQLITE_DBNAME": str(tmp / "flowledger.db"),
    },
    # A new database on the session's server (tests/postgres_server.py) for each test.
    "postgres": lambda request, tmp: request.getfixturevalue("postgres_env"),
}


@pytest.fixture(params=sorted(STORES))
def app(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[FlowledgerApp]:
    """The application on each store: every engine test runs against memory, PostgreSQL
    and SQLite."""
    application = FlowledgerApp(env=STORES[request.param](request, tmp_path))
    yield application
    application.close()


@pytest.fixture
def registry() -> AgentRegistry:
    """An empty agent registry for the test's own actions."""
    return AgentRegistry()


@pytest.fixture
async def engine(app: FlowledgerApp, registry: AgentRegistry) -> AsyncIterator[Engine]:
    """An engine on the test's store, running the test's registry and real webhooks."""
    runner = InProcessRunner(registry, WebhookClient())
    eng = Engine(app, runner)
    yield eng
    await eng.close()
    runner.close()
