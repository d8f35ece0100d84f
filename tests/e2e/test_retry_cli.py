"""`flowledger retry` as a user drives it: a failed execution runs again from the step that
failed, alone or handed over to a running worker; refusals exit 2 and store nothing."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
from cli_driver import (
    AGENTS,
    COMMAND_TIMEOUT,
    DATA,
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_WAITING,
    Cli,
    stored_bytes,
    wait_for,
)

# Agents of this test, written next to the store: `flaky.call` fails (retryable) until a
# file `fixed` exists in the marker folder; every call is logged, to count what ran.
FLAKY_AGENTS = """
import json
import os
from pathlib import Path

from flowledger.adapters.agents import ActionContext, action


def _log(name: str, ctx: ActionContext) -> Path:
    markers = Path(os.environ["E2E_MARKER_DIR"])
    with (markers / "calls.jsonl").open("a", encoding="utf-8") as log:
        log.write(json.dumps({"action": name, "attempt": ctx.attempt}) + "\\n")
    return markers


@action("flaky.prepare")
def prepare(data, ctx: ActionContext):
    _log("prepare", ctx)
    return {"prepared": True}


@action("flaky.call")
def call(data, ctx: ActionContext):
    if not (_log("call", ctx) / "fixed").exists():
        raise ConnectionError("the service is down")
    return {"attempt": ctx.attempt}
"""
FLOW = {
    "workflow_id": "e2e-flaky",
    "version": "1",
    "retry_policy": {"max_retries": 1, "retry_delay": 0.01, "jitter": 0.0},
    "steps": [
        {"step_id": "prepare", "type": "action", "action": "flaky.prepare"},
        {"step_id": "call", "type": "action", "action": "flaky.call", "dependencies": ["prepare"]},
    ],
}


@pytest.fixture
def flaky(cli: Cli) -> tuple[Path, Path]:
    """The flaky workflow (JSON is YAML) and its agents, in the store's folder."""
    definition, agents = cli.home / "flaky.yaml", cli.home / "flaky_agents.py"
    definition.write_text(json.dumps(FLOW))
    agents.write_text(FLAKY_AGENTS)
    return definition, agents


def calls(cli: Cli) -> list[tuple[str, int]]:
    log = cli.markers / "calls.jsonl"
    lines = log.read_text().splitlines() if log.exists() else []
    return [(c["action"], c["attempt"]) for c in map(json.loads, lines)]


def steps(doc: dict[str, Any]) -> dict[str, tuple[str, int]]:
    return {key: (step["status"], step["attempts"]) for key, step in doc["steps"].items()}


def test_a_failed_execution_is_retried_from_the_step_that_failed(
    cli: Cli, flaky: tuple[Path, Path]
) -> None:
    definition, agents = flaky
    failed = cli("run", definition, "--agents", agents, "--json")
    assert failed.code == EXIT_FAILED, str(failed)
    eid = failed.json()["execution_id"]
    assert steps(failed.json()) == {"prepare": ("completed", 1), "call": ("failed", 2)}

    # Without the agents that would run, nothing is stored.
    before = stored_bytes(cli.home)
    missing = cli("retry", eid)
    assert missing.code == EXIT_BAD_INPUT, str(missing)
    assert "names actions no loaded agent offers: flaky.call, flaky.prepare" in missing.message
    assert stored_bytes(cli.home) == before

    (cli.markers / "fixed").touch()
    result = cli("retry", eid, "--agents", agents, "--json")

    assert result.code == EXIT_OK, str(result)
    doc = result.json()
    assert (doc["execution_id"], doc["status"], doc["reason"]) == (eid, "completed", None)
    assert steps(doc) == {"prepare": ("completed", 1), "call": ("completed", 3)}
    assert doc["data"]["call"] == {"attempt": 3}
    assert calls(cli) == [("prepare", 1), ("call", 1), ("call", 2), ("call", 3)]
    assert cli.show(eid) == doc
    verified = cli("replay", eid, "--verify")
    assert verified.code == EXIT_OK, str(verified)
    audited = cli("audit", "verify", eid)
    assert audited.code == EXIT_OK, str(audited)

    again = cli("retry", eid, "--agents", agents)
    assert again.code == EXIT_BAD_INPUT, str(again)
    assert (
        f"execution {eid} is completed; only a failed, timed-out or cancelled execution "
        "can be retried" in again.message
    )


def test_retry_refuses_what_it_cannot_retry(cli: Cli) -> None:
    bad = cli("retry", "not-an-id")
    assert bad.code == EXIT_BAD_INPUT, str(bad)
    assert "'not-an-id' is not an execution id" in bad.message

    # A cancelled order whose reservation was released cannot run on.
    run = cli("run", DATA / "orders.yaml", "--input", '{"order": "o-9"}', "--agents", AGENTS)
    assert run.code == EXIT_WAITING, str(run)
    eid = cli.executions()[0]["execution_id"]
    cancelled = cli("cancel", eid, "--agents", AGENTS)
    assert cancelled.code == EXIT_FAILED, str(cancelled)
    before = stored_bytes(cli.home)

    refused = cli("retry", eid, "--agents", AGENTS)

    assert refused.code == EXIT_BAD_INPUT, str(refused)
    assert "was compensated" in refused.message
    assert "start a new execution" in refused.message
    assert stored_bytes(cli.home) == before
    unknown = cli("retry", "00000000-0000-4000-8000-000000000000")
    assert unknown.code == EXIT_BAD_INPUT, str(unknown)
    assert "no execution" in unknown.message


def test_retry_hands_over_to_a_running_worker(
    cli: Cli, flaky: tuple[Path, Path], processes: list[subprocess.Popen[str]]
) -> None:
    definition, agents = flaky
    log = cli.home / "worker.err"
    worker = cli.start("worker", "--agents", agents, stderr=log)
    processes.append(worker)
    wait_for("the worker to watch the store", lambda: "worker: resumed" in log.read_text())
    failed = cli("run", definition, "--json")
    assert failed.code == EXIT_FAILED, str(failed)
    eid = failed.json()["execution_id"]

    (cli.markers / "fixed").touch()
    result = cli("retry", eid, "--json")

    assert result.code == EXIT_OK, str(result)
    assert f"a worker (pid {worker.pid}) drives this store" in result.message
    assert steps(result.json()) == {"prepare": ("completed", 1), "call": ("completed", 3)}
    assert calls(cli) == [("prepare", 1), ("call", 1), ("call", 2), ("call", 3)]
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=COMMAND_TIMEOUT) == EXIT_OK, log.read_text()
