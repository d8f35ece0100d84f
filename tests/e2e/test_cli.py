"""The `flowledger` command line as a user (or a script) drives it: exit codes and documents."""

from __future__ import annotations

import json
import signal
import subprocess
from importlib.metadata import version
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
import support
from cli_driver import (
    AGENTS,
    COMMAND_TIMEOUT,
    DATA,
    EXAMPLE,
    EXAMPLE_AGENTS,
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_WAITING,
    NOTIFY_TOKEN,
    Cli,
    Receiver,
    stored_bytes,
    wait_for,
)

ORDERS = DATA / "orders.yaml"
STEP_KEYS = {
    "step_id",
    "type",
    "status",
    "attempts",
    "started_at",
    "finished_at",
    "duration_seconds",
    "last_error",
}
INVOICE = {"document_url": "https://example.com/invoice-1042.pdf"}
CONTRACT = {"document_url": "https://example.com/contract-7.pdf"}
UNKNOWN = {"document_url": "https://example.com/scan-0001.pdf"}


def run_json(cli: Cli, definition: Path, data: dict[str, Any], *options: str) -> tuple[int, Any]:
    """`flowledger run DEFINITION --input DATA --json ...`: the exit code and the document."""
    result = cli("run", definition, "--input", json.dumps(data), "--json", *options)
    return result.code, result.json()


def run_example(example: Cli, data: dict[str, Any], key: str) -> tuple[int, Any]:
    """Run the document-processing example with its demo agents.

    The idempotency key fixes the execution id, so the demo agents' seeded failures (and
    so the number of attempts) are the same on every run of the test.
    """
    return run_json(
        example, EXAMPLE, data, "--agents", str(EXAMPLE_AGENTS), "--idempotency-key", key
    )


def statuses(doc: dict[str, Any]) -> dict[str, str]:
    """Step key -> status."""
    return {key: step["status"] for key, step in doc["steps"].items()}


def assert_document_shape(doc: dict[str, Any]) -> None:
    """The fields scripts rely on, for the execution and for every step."""
    UUID(doc["execution_id"])
    assert isinstance(doc["workflow_id"], str)
    assert isinstance(doc["version"], str)
    assert isinstance(doc["data"], dict)
    assert isinstance(doc["steps"], dict)
    for key, step in doc["steps"].items():
        assert step.keys() >= STEP_KEYS, key
        assert isinstance(step["attempts"], int)
        if step["status"] == "completed":
            assert step["attempts"] >= 1, key
            assert step["started_at"] is not None, key
            assert step["finished_at"] >= step["started_at"], key
            assert step["duration_seconds"] >= 0, key


def assert_secret_not_stored(cli: Cli) -> None:
    """The webhook's bearer token is resolved at call time and never written to the store."""
    data = stored_bytes(cli.home)
    # The definition's unresolved reference is there in clear: the bytes are readable, so
    # the token's absence means something.
    assert b"Bearer ${env:NOTIFY_TOKEN}" in data
    assert NOTIFY_TOKEN.encode() not in data


# -- version and validate --------------------------------------------------------------------


def test_version_names_the_installed_package(cli: Cli) -> None:
    result = cli("--version")
    assert result.code == EXIT_OK, str(result)
    assert result.out.strip() == f"flowledger {version('flowledger')}"


def test_validate_accepts_the_shared_example(cli: Cli) -> None:
    shared = support.SHARED / "examples" / "document_processing.yaml"
    if not shared.is_file():
        pytest.fail(f"{shared} is missing: CI checks out ../shared beside the repository")
    result = cli("validate", shared)
    assert result.code == EXIT_OK, str(result)
    assert "ok" in result.out
    assert "'document-processing'" in result.out


@pytest.mark.parametrize("definition", [support.EXAMPLES / "document_processing.yaml", EXAMPLE])
def test_validate_accepts_the_repository_examples(cli: Cli, definition: Path) -> None:
    result = cli("validate", definition)
    assert result.code == EXIT_OK, str(result)
    assert f"{definition}: ok: workflow 'document-processing' version '1.0'" in result.out
    assert not (cli.home / "flowledger.db").exists(), "validate must not open the store"


def test_a_webhook_url_may_come_whole_from_the_environment(
    cli: Cli, receiver: Receiver, tmp_path: Path
) -> None:
    # docs/architecture.md: "`${env:NAME}` works in the `url` as in headers". A url that is
    # all one reference (the host differs per environment) must be accepted and resolved.
    definition = tmp_path / "env_url.yaml"
    definition.write_text(
        "workflow_id: env-url\n"
        "steps:\n"
        "  - step_id: notify\n"
        "    type: webhook\n"
        '    url: "${env:NOTIFY_URL}/hooks/env"\n'
        '    headers: {Authorization: "Bearer ${env:NOTIFY_TOKEN}"}\n'
    )
    cli.env["NOTIFY_URL"] = f"http://{receiver.addr}"
    checked = cli("validate", definition)
    assert checked.code == EXIT_OK, str(checked)
    code, doc = run_json(cli, definition, {"n": 1})
    assert code == EXIT_OK, doc
    assert [r.path for r in receiver.requests] == ["/hooks/env"]


# -- the example, end to end -----------------------------------------------------------------


def test_an_invoice_runs_to_completion(example: Cli, receiver: Receiver) -> None:
    code, doc = run_example(example, INVOICE, "e2e-invoice")

    assert code == EXIT_OK, doc
    assert_document_shape(doc)
    assert (doc["workflow_id"], doc["version"], doc["status"]) == (
        "document-processing",
        "1.0",
        "completed",
    )
    pages = doc["data"]["pages"]
    loop_keys = [f"invoice_pages[{i}]/extract_line_items" for i in range(len(pages))]
    expected = {
        **dict.fromkeys(
            ["fetch", "extract", "ocr", "metadata", "route", "invoice_pages", *loop_keys],
            "completed",
        ),
        "contract_review": "skipped",
        "classify_unknown": "skipped",
        "validate": "completed",
        "notify": "completed",
    }
    assert statuses(doc) == expected
    assert doc["data"]["doc_type"] == "invoice"
    assert doc["data"]["invoice_pages"]["iterations"] == len(pages)
    assert doc["data"]["notify"] == {"received": True, "path": "/hooks/document-processed"}
    assert doc["waiting_for_person"] == []
    # The webhook got the step input, with the token resolved from the environment.
    assert len(receiver.requests) == 1
    request = receiver.requests[0]
    assert request.path == "/hooks/document-processed"
    assert request.body == {"document_url": INVOICE["document_url"], "doc_type": "invoice"}
    assert receiver.refused == 0
    assert_secret_not_stored(example)
    assert example.show(doc["execution_id"]) == doc


def test_a_contract_waits_for_legal_then_completes(example: Cli, receiver: Receiver) -> None:
    code, waiting = run_example(example, CONTRACT, "e2e-contract")

    assert code == EXIT_WAITING, waiting
    assert_document_shape(waiting)
    assert waiting["status"] == "waiting"
    assert waiting["waiting_for_person"] == ["contract_review"]
    review = waiting["steps"]["contract_review"]
    assert (review["status"], review["assignee"]) == ("waiting", "legal")
    assert statuses(waiting)["validate"] == "pending"
    assert receiver.requests == []
    eid = waiting["execution_id"]
    assert example.show(eid)["status"] == "waiting"

    answered = example(
        "complete",
        eid,
        "contract_review",
        "--data",
        '{"approved": true}',
        "--agents",
        EXAMPLE_AGENTS,
        "--json",
    )

    assert answered.code == EXIT_OK, str(answered)
    doc = answered.json()
    assert_document_shape(doc)
    assert doc["execution_id"] == eid
    assert doc["status"] == "completed"
    assert doc["data"]["contract_review"] == {"approved": True}
    assert statuses(doc)["contract_review"] == "completed"
    assert statuses(doc)["validate"] == "completed"
    assert statuses(doc)["invoice_pages"] == "skipped"
    assert [r.body["doc_type"] for r in receiver.requests] == ["contract"]
    assert_secret_not_stored(example)
    assert example.show(eid) == doc


def test_an_unknown_document_is_classified_by_a_person(example: Cli, receiver: Receiver) -> None:
    code, waiting = run_example(example, UNKNOWN, "e2e-unknown")

    assert code == EXIT_WAITING, waiting
    handler = "classify_unknown:on_error:human_review"
    assert waiting["waiting_for_person"] == [handler]
    classify = waiting["steps"]["classify_unknown"]
    assert classify["status"] == "failed"
    assert classify["last_error"]["type"] == "LowConfidenceError"
    review = waiting["steps"][handler]
    assert (review["status"], review["assignee"], review["handles"]) == (
        "waiting",
        "operations",
        "classify_unknown",
    )

    # The handler is answered by its step id, as a person knows it.
    answered = example(
        "complete",
        waiting["execution_id"],
        "human_review",
        "--data",
        '{"doc_type": "receipt"}',
        "--agents",
        EXAMPLE_AGENTS,
        "--json",
    )

    assert answered.code == EXIT_OK, str(answered)
    doc = answered.json()
    assert doc["status"] == "completed"
    recovered = doc["steps"]["classify_unknown"]
    assert (recovered["status"], recovered["recovered_by"]) == ("completed", "human_review")
    assert recovered["result"] == {"doc_type": "receipt"}
    assert doc["data"]["classify_unknown"] == {"doc_type": "receipt"}
    assert statuses(doc)[handler] == "completed"
    assert statuses(doc)["notify"] == "completed"
    assert len(receiver.requests) == 1
    assert_secret_not_stored(example)


def test_cancel_needs_no_agents_when_nothing_is_compensated(example: Cli) -> None:
    # `flowledger cancel ID`, the contract's form: no completed step of a waiting contract
    # has a rollback action, so no agent has to be loaded to cancel it.
    code, waiting = run_example(example, CONTRACT, "e2e-contract-cancel")
    assert code == EXIT_WAITING, waiting

    result = example("cancel", waiting["execution_id"])

    assert result.code == EXIT_FAILED, str(result)
    assert "cancelled" in result.out
    doc = example.show(waiting["execution_id"])
    assert doc["status"] == "cancelled"
    assert statuses(doc)["contract_review"] == "cancelled"
    assert statuses(doc)["validate"] == "pending"


# -- executions list and show ----------------------------------------------------------------


def test_executions_are_listed_and_shown(cli: Cli) -> None:
    code, waiting = run_json(cli, ORDERS, {"order": "o-1"}, "--agents", str(AGENTS))
    assert code == EXIT_WAITING, waiting
    code, failed = run_json(
        cli, DATA / "failing.yaml", {"message": "out of stock"}, "--agents", str(AGENTS)
    )
    assert code == EXIT_FAILED, failed
    ids = {"waiting": waiting["execution_id"], "failed": failed["execution_id"]}

    rows = cli.executions()

    assert [r["execution_id"] for r in rows] == [ids["failed"], ids["waiting"]]  # newest first
    for row in rows:
        assert {"execution_id", "workflow_id", "version", "status", "started_at"} <= row.keys()
    assert {r["execution_id"]: r["status"] for r in rows} == {v: k for k, v in ids.items()}
    for status, eid in ids.items():
        assert [r["execution_id"] for r in cli.executions("--status", status)] == [eid]
    assert cli.executions("--status", "completed") == []

    table = cli("executions", "list")
    assert table.code == EXIT_OK, str(table)
    for status, eid in ids.items():
        line = next(line for line in table.out.splitlines() if eid in line)
        assert status in line

    assert cli.show(ids["waiting"]) == waiting
    assert cli.show(ids["failed"]) == failed
    shown = cli("executions", "show", ids["waiting"])
    assert shown.code == EXIT_OK, str(shown)
    assert "reserve" in shown.out
    assert "approve" in shown.out
    assert f"execution {ids['waiting']} waiting" in " ".join(shown.out.split())


def test_a_failure_message_is_printed_verbatim(cli: Cli) -> None:
    # An agent's message is data, not terminal markup: brackets print as they are.
    message = "no such path [/tmp/in] for [bold]order[/bold]"
    result = cli(
        "run",
        DATA / "failing.yaml",
        "--input",
        f'{{"message": "{message}"}}',
        "--agents",
        AGENTS,
    )

    assert result.code == EXIT_FAILED, str(result)
    assert f"ValueError: {message}" in result.out
    rows = cli.executions()
    doc = cli.show(rows[0]["execution_id"])
    assert doc["status"] == "failed"
    assert doc["steps"]["boom"]["last_error"]["message"] == message


# -- cancel ------------------------------------------------------------------------------------


def test_cancel_compensates_the_completed_steps_of_a_waiting_execution(cli: Cli) -> None:
    code, waiting = run_json(cli, ORDERS, {"order": "o-7"}, "--agents", str(AGENTS))
    assert code == EXIT_WAITING, waiting
    assert statuses(waiting) == {"reserve": "completed", "approve": "waiting", "ship": "pending"}

    result = cli("cancel", waiting["execution_id"], "--agents", AGENTS, "--json")

    assert result.code == EXIT_FAILED, str(result)
    doc = result.json()
    assert doc["status"] == "cancelled"
    assert statuses(doc) == {
        "reserve": "compensated",
        "approve": "cancelled",
        "reserve:rollback:release": "completed",
        "ship": "pending",
    }
    rollback = doc["steps"]["reserve:rollback:release"]
    assert (rollback["kind"], rollback["handles"]) == ("rollback", "reserve")
    assert rollback["result"] == {"released": "R-o-7"}
    released = (cli.markers / "released.jsonl").read_text().splitlines()
    assert released == ['{"step_id": "reserve", "reservation": "R-o-7"}']
    assert cli.show(doc["execution_id"]) == doc
    assert [r["execution_id"] for r in cli.executions("--status", "cancelled")] == [
        doc["execution_id"]
    ]


# -- idempotency -------------------------------------------------------------------------------


def test_an_idempotency_key_starts_one_execution(cli: Cli) -> None:
    key = ("--idempotency-key", "order-o-3")
    code, first = run_json(cli, ORDERS, {"order": "o-3"}, "--agents", str(AGENTS), *key)
    assert code == EXIT_WAITING, first
    code, second = run_json(cli, ORDERS, {"order": "o-3"}, "--agents", str(AGENTS), *key)
    assert code == EXIT_WAITING, second

    assert second["execution_id"] == first["execution_id"]
    assert second["steps"]["reserve"]["attempts"] == 1  # not run again
    assert [r["execution_id"] for r in cli.executions()] == [first["execution_id"]]

    answer = ("--data", '{"approved": true}', "--agents", AGENTS)
    done = cli("complete", first["execution_id"], "approve", *answer)
    assert done.code == EXIT_OK, str(done)
    code, third = run_json(cli, ORDERS, {"order": "o-3"}, "--agents", str(AGENTS), *key)
    assert code == EXIT_OK, third
    assert third["execution_id"] == first["execution_id"]
    assert third["status"] == "completed"
    assert len(cli.executions()) == 1


# -- worker ------------------------------------------------------------------------------------


def test_a_second_run_with_the_same_key_is_served_from_the_step_cache(cli: Cli) -> None:
    cached = DATA / "cached.yaml"
    code, first = run_json(cli, cached, {"quantity": 3, "note": "a"}, "--agents", str(AGENTS))
    assert code == EXIT_OK, first
    # Another process, the same store: the key (the quantity) is the same, the note is not.
    code, second = run_json(cli, cached, {"quantity": 3, "note": "b"}, "--agents", str(AGENTS))
    assert code == EXIT_OK, second

    quoted = (cli.markers / "quoted.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in quoted] == [{"note": "a", "quantity": 3}]  # ran once
    assert second["data"]["quote"] == first["data"]["quote"] == {"price": 30}
    source = second["steps"]["quote"]["cached_from"]
    assert (source["execution_id"], source["step_key"]) == (first["execution_id"], "quote")
    assert "cached_from" not in first["steps"]["quote"]

    shown = cli("executions", "show", second["execution_id"])

    assert shown.code == EXIT_OK, str(shown)
    assert "from cache: execution" in shown.out
    assert first["execution_id"] in shown.out


def test_worker_drives_an_execution_whose_driver_was_killed(
    cli: Cli, processes: list[subprocess.Popen[str]]
) -> None:
    stall = ("run", DATA / "stall.yaml", "--input", "{}", "--agents", AGENTS)
    run = cli.start(*stall, stderr=cli.home / "run.err")
    processes.append(run)
    # The agent leaves a marker as its first attempt begins: the attempt is stored as running.
    marker = wait_for(
        "the first attempt of 'slow' to begin",
        lambda: next(cli.markers.glob("stalled-*"), None),
    )
    run.send_signal(signal.SIGKILL)
    run.wait(timeout=COMMAND_TIMEOUT)
    eid = marker.name.removeprefix("stalled-")
    assert [(r["execution_id"], r["status"]) for r in cli.executions()] == [(eid, "running")]

    result = cli("worker", "--until-idle", "--agents", AGENTS)

    assert result.code == EXIT_OK, str(result)
    assert "resumed 1 execution" in result.message
    doc = cli.show(eid)
    assert doc["status"] == "completed"
    slow = doc["steps"]["slow"]
    assert (slow["status"], slow["attempts"], slow["result"]) == ("completed", 2, {"attempt": 2})
    assert doc["steps"]["after"]["status"] == "completed"


def test_worker_until_idle_leaves_human_tasks_to_people(cli: Cli) -> None:
    code, waiting = run_json(cli, ORDERS, {"order": "o-4"}, "--agents", str(AGENTS))
    assert code == EXIT_WAITING, waiting

    result = cli("worker", "--until-idle", "--agents", AGENTS)

    assert result.code == EXIT_OK, str(result)
    assert cli.show(waiting["execution_id"]) == waiting


def test_commands_hand_over_to_a_running_worker(
    cli: Cli, processes: list[subprocess.Popen[str]]
) -> None:
    log = cli.home / "worker.err"
    worker = cli.start("worker", "--agents", AGENTS, stderr=log)
    processes.append(worker)
    # Printed once the worker has resumed what was stored and watches for what comes next.
    wait_for("the worker to watch the store", lambda: "worker: resumed" in log.read_text())

    # run, complete and cancel store their command; the worker drives; they follow it.
    code, waiting = run_json(cli, ORDERS, {"order": "o-5"})
    assert code == EXIT_WAITING, waiting
    assert statuses(waiting) == {"reserve": "completed", "approve": "waiting", "ship": "pending"}
    bad = cli("complete", waiting["execution_id"], "approve", "--data", '{"approved": "yes"}')
    assert bad.code == EXIT_BAD_INPUT, str(bad)
    assert "form_schema" in bad.message
    done = cli("complete", waiting["execution_id"], "approve", "--data", '{"approved": true}')
    assert done.code == EXIT_OK, str(done)
    assert f"a worker (pid {worker.pid}) drives this store" in done.message
    assert cli.show(waiting["execution_id"])["status"] == "completed"

    code, other = run_json(cli, ORDERS, {"order": "o-6"})
    assert code == EXIT_WAITING, other
    cancelled = cli("cancel", other["execution_id"], "--json")
    assert cancelled.code == EXIT_FAILED, str(cancelled)
    assert statuses(cancelled.json())["reserve"] == "compensated"
    assert statuses(cancelled.json())["reserve:rollback:release"] == "completed"

    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=COMMAND_TIMEOUT) == EXIT_OK, log.read_text()
