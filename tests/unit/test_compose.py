"""docker-compose.yml (no Docker engine here): its flowledger services are configured only
by environment variables that flowledger reads, and those settings load."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from flowledger.adapters.kafka import kafka_settings
from flowledger.adapters.settings import load_settings

COMPOSE = Path(__file__).parents[2] / "docker-compose.yml"


def _compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


def _resolved(env: dict[str, Any]) -> dict[str, str]:
    """${NAME:-default} as compose resolves it with NAME unset."""
    pattern = re.compile(r"\$\{[A-Z_]+:-([^}]*)\}")
    return {k: pattern.sub(lambda m: m.group(1), str(v)) for k, v in env.items()}


def test_it_runs_postgres_kafka_kraft_the_service_and_an_agent() -> None:
    services = _compose()["services"]
    assert services["postgres"]["image"].startswith("postgres:")
    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    assert "controller" in kafka["environment"]["KAFKA_PROCESS_ROLES"]  # KRaft, no ZooKeeper
    assert services["flowledger"]["command"][:2] == ["flowledger", "serve"]
    assert services["agent"]["command"][:2] == ["flowledger", "agent"]
    assert "8080:8080" in services["flowledger"]["ports"]


def test_the_service_settings_load_from_its_environment() -> None:
    env = _resolved(_compose()["services"]["flowledger"]["environment"])
    settings = load_settings(env)
    assert settings.is_postgres
    assert settings.persistence["POSTGRES_HOST"] == "postgres"
    kafka = kafka_settings(env)
    assert kafka is not None
    assert kafka.bootstrap == "kafka:9092"
    assert kafka.commands == "flowledger.commands"


def test_the_agent_reaches_the_same_topics() -> None:
    services = _compose()["services"]
    agent = kafka_settings(_resolved(services["agent"]["environment"]))
    service = kafka_settings(_resolved(services["flowledger"]["environment"]))
    assert agent is not None
    assert service is not None
    assert (agent.bootstrap, agent.prefix) == (service.bootstrap, service.prefix)
    example = Path(__file__).parents[2] / services["agent"]["command"][-1]
    assert example.is_file()
