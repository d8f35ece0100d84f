"""Schemathesis against the OpenAPI document `flowledger serve` publishes: generated calls to
every operation get no 5xx, and every answer matches the schema (status, type, body).

Schemathesis's own pytest loader for a schema served by a fixture does not run on pytest 9
(it sets a node attribute pytest no longer has), so each operation's strategy is driven
with Hypothesis here, through schemathesis's Python API.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import schemathesis
from cli_driver import AGENTS, DATA, Cli
from http_driver import Server, start_server, wait_until
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

# Small on purpose: the whole module runs in well under a minute.
MAX_EXAMPLES = 8
OPERATIONS = [
    "POST /workflows",
    "GET /workflows",
    "GET /workflows/{workflow_id}",
    "GET /workflows/{workflow_id}/versions/{version}",
    "POST /workflows/{workflow_id}/executions",
    "GET /executions",
    "GET /executions/{execution_id}",
    "GET /executions/{execution_id}/events",
    "POST /executions/{execution_id}/steps/{step_id}/complete",
    "POST /executions/{execution_id}/cancel",
    "POST /executions/{execution_id}/retry",
    "GET /executions/{execution_id}/steps",
    "GET /executions/{execution_id}/timeline",
    "GET /executions/{execution_id}/audit",
    "GET /executions/lookup",
    "GET /inbox",
    "GET /workflows/{workflow_id}/performance",
    "GET /workflows/{workflow_id}/performance/series",
    "GET /workflows/{workflow_id}/optimizer",
    "POST /workflows/{workflow_id}/optimizer/apply",
    "GET /projections",
    "GET /agents",
    "GET /healthz",
    "GET /readyz",
    "GET /metrics",
]
# Negative data (what the schema forbids) needs something that can be wrong: not possible
# where there is no input, or where any text is a valid path parameter.
NOTHING_TO_BREAK = {
    "GET /agents",
    "GET /workflows",
    "GET /workflows/{workflow_id}",
    "GET /workflows/{workflow_id}/versions/{version}",
    "GET /healthz",
    "GET /readyz",
    "GET /metrics",
    "GET /projections",
}
# "known": positive data with path parameters naming what the store holds, so the
# documents themselves (not only 404s) are checked against the schema.
CASES = (
    [(label, "positive") for label in OPERATIONS]
    + [(label, "negative") for label in OPERATIONS if label not in NOTHING_TO_BREAK]
    + [(label, "known") for label in OPERATIONS if "{" in label]
)
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


@dataclass(frozen=True)
class Served:
    """The server and the path parameters of what its store holds."""

    server: Server
    known: dict[str, str]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """One server for the module, holding workflows and an execution waiting for a person."""
    cli = Cli(tmp_path_factory.mktemp("schema"))
    server = start_server(cli, "--agents", AGENTS)
    try:
        with server.client() as api:
            for name in ("orders.yaml", "failing.yaml"):
                body = (DATA / name).read_bytes()
                headers = {"Content-Type": "application/yaml"}
                assert api.post("/workflows", content=body, headers=headers).status_code == 201
            started = api.post("/workflows/e2e-orders/executions", json={"input": {"order": "o"}})
            assert started.status_code == 201, started.text
            eid = started.json()["execution_id"]
            wait_until(api, eid, "waiting")
        yield Served(
            server,
            {
                "workflow_id": "e2e-orders",
                "version": "1",
                "execution_id": eid,
                "step_id": "approve",
            },
        )
    finally:
        if server.proc.poll() is None:
            server.stop()
    assert server.proc.returncode == 0, server.output
    assert "Traceback" not in server.output, server.output


@pytest.fixture(scope="module")
def api_schema(served: Served) -> schemathesis.BaseSchema:
    """The OpenAPI document the server serves, aimed at the server."""
    schema = schemathesis.openapi.from_url(f"{served.server.url}/openapi.json")
    schema.config.update(base_url=served.server.url)
    return schema


def test_the_schema_names_every_operation(api_schema: schemathesis.BaseSchema) -> None:
    labels = [result.ok().label for result in api_schema.get_all_operations()]

    assert sorted(labels) == sorted(OPERATIONS)


@pytest.mark.parametrize(("label", "mode"), CASES, ids=[f"{label} {m}" for label, m in CASES])
def test_every_operation_answers_as_its_schema_says(
    api_schema: schemathesis.BaseSchema, served: Served, label: str, mode: str
) -> None:
    operation = api_schema.find_operation_by_label(label)
    assert operation is not None, label
    options: dict[str, Any] = {}
    if mode == "known":
        names = re.findall(r"{(\w+)}", label)
        options["path_parameters"] = {name: served.known[name] for name in names}
    generation = GenerationMode.NEGATIVE if mode == "negative" else GenerationMode.POSITIVE

    @given(case=operation.as_strategy(generation_mode=generation, **options))
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],  # no shrinking: the run stays bounded
        suppress_health_check=list(HealthCheck),
    )
    def answers_as_documented(case: schemathesis.Case) -> None:
        case.call_and_validate(checks=CHECKS)

    answers_as_documented()
