"""`flowledger optimize` and the optimizer's HTTP routes as a user drives them, on a history
of real runs (made in this process by the engine on the same SQLite store, which is quicker
than 24 `flowledger run` commands and stores the same events)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from cli_driver import Cli
from http_driver import start_server

from flowledger.adapters.agents import AgentRegistry, InProcessRunner
from flowledger.adapters.settings import build_app, load_settings
from flowledger.domain.definitions import parse_definition
from flowledger.domain.states import ExecutionStatus
from flowledger.services.engine import Engine

RUNS = 22
SERIAL: dict[str, Any] = {
    "workflow_id": "profile-and-orders",
    "version": "1.0",
    "steps": [
        {"step_id": "profile", "type": "action", "action": "slow", "input_mapping": {"n": "n"}},
        {
            "step_id": "orders",
            "type": "action",
            "action": "slow",
            "dependencies": ["profile"],
            "input_mapping": {"n": "n"},
        },
    ],
}


@pytest.fixture
def history(cli: Cli) -> Cli:
    """RUNS completed executions of SERIAL on the CLI's store."""

    async def make() -> None:
        app = build_app(load_settings(cli.env))
        registry = AgentRegistry()

        @registry.action("slow")
        async def slow(data: dict[str, Any]) -> dict[str, Any]:
            await asyncio.sleep(0.05)
            return {"n": data["n"]}

        runner = InProcessRunner(registry)
        engine = Engine(app, runner)
        try:
            wf = await engine.register(parse_definition(SERIAL, "<test>"))
            for n in range(RUNS):
                ex = await engine.wait_settled(await engine.start(wf, {"n": n}))
                assert ex.status is ExecutionStatus.COMPLETED
        finally:
            await engine.close()
            runner.close()
            app.close()

    asyncio.run(make())
    return cli


def test_optimize_prints_the_report_and_applies_a_recommendation(history: Cli):
    shown = history("optimize", "profile-and-orders")
    assert shown.code == 0, shown
    assert "critical path (in 100% of 22): profile -> orders" in shown.out
    assert "run orders beside profile" in shown.out

    report = history("optimize", "profile-and-orders", "--json").json()
    [rec] = report["recommendations"]
    assert rec["kind"] == "parallelize"
    assert rec["patch"] == [{"op": "add", "path": "/steps/1/dependencies", "value": []}]
    assert rec["evidence"]["executions"] == RUNS
    assert rec["prediction"]["change_p50"] < 0

    wrong = history("optimize", "profile-and-orders", "--apply", "parallelize-x-000000")
    assert wrong.code == 2
    assert "has no recommendation 'parallelize-x-000000'" in wrong.err
    assert rec["id"] in wrong.err  # the ones there are

    applied = history("optimize", "profile-and-orders", "--apply", rec["id"], "--json").json()
    assert (applied["version"], applied["based_on"], applied["created"]) == ("1.1", "1.0", True)
    assert "no recommendation yet: too few runs" in history("optimize", "profile-and-orders").out
    newest = history("optimize", "profile-and-orders", "--json").json()
    assert newest["version"] == "1.1"
    assert newest["versions"] == ["1.0", "1.1"]
    assert newest["recommendations"] == []
    assert newest["more_data"][0]["more_runs"] == 20

    missing = history("optimize", "no-such-workflow")
    assert missing.code == 2
    assert "no-such-workflow" in missing.err


def test_the_optimizer_over_http(history: Cli):
    server = start_server(history)
    try:
        with server.client() as client:
            got = client.get("/workflows/profile-and-orders/optimizer")
            assert got.status_code == 200, got.text
            [rec] = got.json()["recommendations"]

            bad = client.post("/workflows/profile-and-orders/optimizer/apply", json={"x": 1})
            assert bad.status_code == 422
            unknown = client.post(
                "/workflows/profile-and-orders/optimizer/apply",
                json={"recommendation_id": "cache-nothing-000000"},
            )
            assert unknown.status_code == 404
            assert "cache-nothing-000000" in unknown.text

            body = {"recommendation_id": rec["id"], "version": "1.0"}
            made = client.post("/workflows/profile-and-orders/optimizer/apply", json=body)
            assert made.status_code == 201, made.text
            assert made.json()["version"] == "1.1"
            again = client.post("/workflows/profile-and-orders/optimizer/apply", json=body)
            assert again.status_code == 200
            assert again.json()["created"] is False
            versions = client.get("/workflows/profile-and-orders").json()["versions"]
            assert versions == ["1.0", "1.1"]
            definition = client.get("/workflows/profile-and-orders/versions/1.1").json()
            assert definition["steps"][1]["dependencies"] == []
            assert client.get("/workflows/nothing/optimizer").status_code == 404
    finally:
        server.stop()
