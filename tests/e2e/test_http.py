"""The HTTP API (`flowledger serve`) over real HTTP: calls, status codes and documents."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from cli_driver import AGENTS, COMMAND_TIMEOUT, DATA, EXIT_BAD_INPUT, EXIT_WAITING, Cli, wait_for
from http_driver import Server, start_server, wait_until

from flowledger.services.app import version_id

ORDERS = DATA / "orders.yaml"
FAILING = DATA / "failing.yaml"
STALL = DATA / "stall.yaml"
MAX_BODY = 1_048_576
TOKEN = "e2e-api-token-3f9a1c"
NO_SUCH_EXECUTION = "00000000-0000-4000-8000-000000000000"
ENDED = ("completed", "failed", "timed_out", "cancelled")



def register(api: httpx.Client, definition: Path) -> httpx.Response:
    """POST a YAML definition file as it is."""
    return api.post(
        "/workflows", content=definition.read_bytes(), headers={"Content-Type": "application/yaml"}
    )


def start(
    api: httpx.Client, workflow: str, data: dict[str, Any], key: str | None = None, **body: Any
) -> httpx.Response:
    """POST /workflows/{workflow}/executions."""
    headers = {"Idempotency-Key": key} if key is not None else {}
    return api.post(
        f"/workflows/{workflow}/executions", json={"input": data, **body}, headers=headers
    )


def waiting_order(api: httpx.Client, order: str) -> dict[str, Any]:
    """An e2e-orders execution, once it waits for its approval."""
    assert register(api, ORDERS).status_code in (200, 201)
    started = start(api, "e2e-orders", {"order": order})
    assert started.status_code == 201, started.text
    doc = wait_until(api, started.json()["execution_id"], "waiting")
    assert doc["waiting_for_person"] == ["approve"]
    return doc


def error(response: httpx.Response, status: int, kind: str, *naming: str) -> dict[str, Any]:
    """Check an error response: its status, its body's shape and type, the texts it names."""
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert set(body) == {"error", "detail", "problems"}, body
    assert body["error"] == kind, body
    text = " ".join([body["detail"], *body["problems"]])
    for part in naming:
        assert part in text, f"{part!r} is not named in {body}"
    return body


def statuses(doc: dict[str, Any]) -> dict[str, str]:
    """Step key -> status."""
    return {key: step["status"] for key, step in doc["steps"].items()}


def metrics(api: httpx.Client) -> dict[str, float]:
    """GET /metrics parsed: sample name (with labels) -> value."""
    response = api.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for line in response.text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


# -- workflows -------------------------------------------------------------------------------


def test_a_version_registers_once_and_is_immutable(api: httpx.Client) -> None:
    doc = yaml.safe_load(ORDERS.read_text())

    first = api.post("/workflows", json=doc)
    again = register(api, ORDERS)  # the same document, as YAML this time
    changed = api.post("/workflows", json={**doc, "description": "another document"})

    assert first.status_code == 201, first.text
    assert first.json() == {"workflow_id": "e2e-orders", "version": "1", "created": True}
    assert again.status_code == 200, again.text
    assert again.json() == {"workflow_id": "e2e-orders", "version": "1", "created": False}
    error(changed, 409, "DefinitionConflict", "'e2e-orders'", "'1'", "new version")
    newer = api.post("/workflows", json={**doc, "version": "2", "description": "v2"})
    assert newer.status_code == 201, newer.text

    assert api.get("/workflows").json() == {
        "workflows": [{"workflow_id": "e2e-orders", "versions": ["1", "2"]}]
    }
    assert api.get("/workflows/e2e-orders").json() == {
        "workflow_id": "e2e-orders",
        "versions": ["1", "2"],
    }
    stored = api.get("/workflows/e2e-orders/versions/1")
    assert stored.status_code == 200, stored.text
    assert stored.json()["steps"][0]["step_id"] == "reserve"
    # The stored document registers again as the same version.
    assert api.post("/workflows", json=stored.json()).status_code == 200
    error(api.get("/workflows/e2e-nothing"), 404, "WorkflowNotFound", "'e2e-nothing'")
    error(api.get("/workflows/e2e-orders/versions/9"), 404, "WorkflowNotFound", "'9'")


DEFINITIONS = {
    "an unknown key": (
        (DATA / "unknown_key.yaml").read_bytes(),
        ["step 'reserve'", "field 'retires'", "unknown field"],
    ),
    "an unknown JMESPath function": (
        (DATA / "unknown_function.yaml").read_bytes(),
        ["step 'count'", "unknown function 'lenght()'", "did you mean 'length()'"],
    ),
    "invalid YAML": ((DATA / "invalid_yaml.yaml").read_bytes(), ["YAML syntax error at line"]),
}


@pytest.mark.parametrize(("body", "naming"), DEFINITIONS.values(), ids=DEFINITIONS.keys())
def test_an_invalid_definition_is_refused_with_every_problem(
    api: httpx.Client, body: bytes, naming: list[str]
) -> None:
    response = api.post("/workflows", content=body, headers={"Content-Type": "application/yaml"})

    error(response, 422, "DefinitionInvalid", "invalid workflow definition", *naming)
    assert api.get("/workflows").json() == {"workflows": []}


BAD_JSON = {
    "malformed": b'{"workflow_id": "x", ',
    "a key twice": b'{"workflow_id": "x", "workflow_id": "y", "steps": []}',
    "NaN": b'{"workflow_id": "x", "timeout": NaN}',
    "not an object": b"[1, 2]",
    "not UTF-8": b'{"workflow_id": "\xff"}',
    "empty": b"",
}


@pytest.mark.parametrize("body", BAD_JSON.values(), ids=BAD_JSON.keys())
def test_a_definition_that_is_not_a_json_object_is_422(api: httpx.Client, body: bytes) -> None:
    response = api.post("/workflows", content=body, headers={"Content-Type": "application/json"})

    error(response, 422, "DefinitionInvalid")
    assert api.get("/workflows").json() == {"workflows": []}


# -- executions ------------------------------------------------------------------------------


def test_an_order_waits_for_approval_then_completes(api: httpx.Client, cli: Cli) -> None:
    assert register(api, ORDERS).status_code == 201

    started = start(api, "e2e-orders", {"order": "o-1"})

    assert started.status_code == 201, started.text
    doc = started.json()
    eid = doc["execution_id"]
    assert (doc["workflow_id"], doc["version"], doc["input"]) == (
        "e2e-orders",
        "1",
        {"order": "o-1"},
    )
    waiting = wait_until(api, eid, "waiting")
    assert statuses(waiting) == {"reserve": "completed", "approve": "waiting", "ship": "pending"}
    assert waiting["steps"]["approve"]["assignee"] == "sales"
    assert waiting["steps"]["reserve"]["result"] == {"reservation": "R-o-1"}
    # The API serves the document the CLI prints, from the same store.
    assert cli.show(eid) == waiting

    answered = api.post(
        f"/executions/{eid}/steps/approve/complete", json={"data": {"approved": True}}
    )

    assert answered.status_code == 200, answered.text
    assert answered.json()["steps"]["approve"]["status"] == "completed"
    done = wait_until(api, eid, *ENDED)
    assert done["status"] == "completed"
    assert statuses(done) == {"reserve": "completed", "approve": "completed", "ship": "completed"}
    assert done["steps"]["ship"]["result"] == {"shipped": True}
    listed = api.get("/executions").json()
    assert [(r["execution_id"], r["status"]) for r in listed["executions"]] == [(eid, "completed")]


def test_a_failure_is_reported_in_the_document(api: httpx.Client) -> None:
    assert register(api, FAILING).status_code == 201
    message = 'no such path [/tmp/in] for "order" <b>'

    started = start(api, "e2e-failing", {"message": message})

    assert started.status_code == 201, started.text
    doc = wait_until(api, started.json()["execution_id"], *ENDED)
    assert doc["status"] == "failed"
    assert doc["steps"]["boom"]["last_error"]["type"] == "ValueError"
    assert doc["steps"]["boom"]["last_error"]["message"] == message


def test_an_idempotency_key_starts_one_execution(api: httpx.Client) -> None:
    assert register(api, ORDERS).status_code == 201
    assert register(api, FAILING).status_code == 201

    first = start(api, "e2e-orders", {"order": "o-3"}, key="order-o-3")
    again = start(api, "e2e-orders", {"order": "o-3"}, key="order-o-3")

    assert first.status_code == 201, first.text
    assert again.status_code == 200, again.text
    eid = first.json()["execution_id"]
    assert again.json()["execution_id"] == eid
    assert again.json()["idempotency_key"] == "order-o-3"
    error(
        start(api, "e2e-orders", {"order": "o-4"}, key="order-o-3"),
        409,
        "IdempotencyConflict",
        "'order-o-3'",
        eid,
        "another input",
    )
    error(
        start(api, "e2e-failing", {"order": "o-3"}, key="order-o-3"),
        409,
        "IdempotencyConflict",
        "'e2e-orders'",
    )
    error(
        start(api, "e2e-orders", {"order": "o-3"}, key="order-o-3", version="2"),
        404,
        "WorkflowNotFound",
        "no version '2'",
    )
    waited = wait_until(api, eid, "waiting")
    assert waited["steps"]["reserve"]["attempts"] == 1  # not run again

    # Without a key, every start is a new execution.
    plain = [start(api, "e2e-orders", {"order": "o-5"}) for _ in range(2)]
    assert [r.status_code for r in plain] == [201, 201]
    assert plain[0].json()["execution_id"] != plain[1].json()["execution_id"]
    error(start(api, "e2e-orders", {"order": "o-6"}, key="k" * 257), 422, "InputInvalid")


def test_a_human_task_refuses_what_it_cannot_take(api: httpx.Client) -> None:
    eid = waiting_order(api, "o-7")["execution_id"]
    complete = f"/executions/{eid}/steps/approve/complete"

    error(
        api.post(complete, json={"data": {"approved": "yes"}}),
        422,
        "InputInvalid",
        "form_schema",
        "'yes' is not of type 'boolean'",
    )
    error(api.post(complete, json={"data": [True]}), 422, "InputInvalid", "body.data")
    error(api.post(complete, json={"answer": {}}), 422, "InputInvalid", "body.answer")
    error(
        api.post(f"/executions/{eid}/steps/teleport/complete", json={"data": {}}),
        404,
        "StepNotFound",
        "no step 'teleport'",
    )
    error(
        api.post(f"/executions/{eid}/steps/ship/complete", json={"data": {}}),
        409,
        "InvalidTransition",
        "no step 'ship' waiting for an answer",
    )
    error(
        api.post(f"/executions/{eid}/steps/reserve/complete", json={"data": {}}),
        409,
        "InvalidTransition",
        "'reserve' is completed",
    )
    error(
        api.post(f"/executions/{NO_SUCH_EXECUTION}/steps/approve/complete", json={"data": {}}),
        404,
        "ExecutionNotFound",
        NO_SUCH_EXECUTION,
    )
    error(
        api.post("/executions/order-o-7/steps/approve/complete", json={"data": {}}),
        422,
        "InputInvalid",
        "execution_id",
    )
    assert wait_until(api, eid, "waiting")["event_count"] == 5  # nothing was recorded

    assert api.post(complete, json={"data": {"approved": True}}).status_code == 200
    wait_until(api, eid, "completed")
    error(api.post(complete, json={"data": {"approved": True}}), 409, "InvalidTransition")


def test_cancel_compensates_the_completed_steps(api: httpx.Client, cli: Cli) -> None:
    eid = waiting_order(api, "o-8")["execution_id"]

    cancelled = api.post(f"/executions/{eid}/cancel", json={"reason": "customer withdrew"})

    assert cancelled.status_code == 200, cancelled.text
    doc = wait_until(api, eid, *ENDED)
    assert (doc["status"], doc["reason"]) == ("cancelled", "customer withdrew")
    assert statuses(doc) == {
        "reserve": "compensated",
        "approve": "cancelled",
        "reserve:rollback:release": "completed",
        "ship": "pending",
    }
    released = (cli.markers / "released.jsonl").read_text().splitlines()
    assert released == ['{"step_id": "reserve", "reservation": "R-o-8"}']
    error(api.post(f"/executions/{eid}/cancel"), 409, "InvalidTransition", "is cancelled")
    error(api.post(f"/executions/{NO_SUCH_EXECUTION}/cancel"), 404, "ExecutionNotFound")

    other = waiting_order(api, "o-9")["execution_id"]
    assert api.post(f"/executions/{other}/cancel").status_code == 200  # no body: a default reason
    assert wait_until(api, other, *ENDED)["reason"] == "cancelled by request"


def test_the_events_of_an_execution_are_served_in_order(api: httpx.Client) -> None:
    eid = waiting_order(api, "o-10")["execution_id"]

    response = api.get(f"/executions/{eid}/events")

    assert response.status_code == 200, response.text
    events = response.json()["events"]
    assert [e["type"] for e in events] == [
        "ExecutionStarted",
        "StepStarted",
        "StepSucceeded",
        "StepWaiting",
        "ExecutionWaiting",
    ]
    assert [e["version"] for e in events] == [1, 2, 3, 4, 5]
    assert events[0]["attributes"]["input"] == {"order": "o-10"}
    assert events[2]["attributes"]["result"] == {"reservation": "R-o-10"}
    assert all(e["timestamp"] for e in events)
    page = api.get(f"/executions/{eid}/events", params={"after": 2, "limit": 2}).json()["events"]
    assert page == events[2:4]
    error(api.get(f"/executions/{NO_SUCH_EXECUTION}/events"), 404, "ExecutionNotFound")
    # A workflow version is an aggregate of the same store, not an execution.
    error(api.get(f"/executions/{version_id('e2e-orders', '1')}/events"), 404, "ExecutionNotFound")
    error(api.get(f"/executions/{version_id('e2e-orders', '1')}"), 404, "ExecutionNotFound")
    error(api.get(f"/executions/{eid}/events", params={"limit": 0}), 422, "InputInvalid")


def test_executions_are_filtered_and_paged_newest_first(api: httpx.Client) -> None:
    assert register(api, FAILING).status_code == 201
    waiting = [waiting_order(api, f"o-{n}")["execution_id"] for n in (11, 12)]
    failed = start(api, "e2e-failing", {"message": "out of stock"}).json()["execution_id"]
    wait_until(api, failed, "failed")
    newest_first = [failed, *reversed(waiting)]

    def ids(**params: Any) -> list[str]:
        response = api.get("/executions", params=params)
        assert response.status_code == 200, response.text
        return [row["execution_id"] for row in response.json()["executions"]]

    assert ids() == newest_first
    assert ids(status="waiting") == list(reversed(waiting))
    assert ids(status="failed", workflow="e2e-failing") == [failed]
    assert ids(workflow="e2e-orders", version="1") == list(reversed(waiting))
    assert ids(workflow="e2e-orders", version="2") == []
    assert ids(status="completed") == []
    paged, cursor = [], None
    while True:
        params = {"limit": 1, **({"cursor": cursor} if cursor else {})}
        page = api.get("/executions", params=params).json()
        paged += [row["execution_id"] for row in page["executions"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert paged == newest_first
    error(api.get("/executions", params={"limit": 501}), 422, "InputInvalid", "limit")
    error(api.get("/executions", params={"status": "asleep"}), 422, "InputInvalid", "status")
    error(api.get("/executions", params={"cursor": "nowhere"}), 422, "InputInvalid", "cursor")


# -- errors ----------------------------------------------------------------------------------


def test_bad_requests_get_their_status_codes(api: httpx.Client) -> None:
    assert register(api, ORDERS).status_code == 201

    error(start(api, "e2e-nothing", {}), 404, "WorkflowNotFound", "'e2e-nothing'")
    error(start(api, "e2e-orders", {"order": 7}), 422, "InputInvalid", "input_schema")
    error(start(api, "e2e-orders", {}, extra=1), 422, "InputInvalid", "body.extra")
    malformed = api.post(
        "/workflows/e2e-orders/executions",
        content=b'{"input": {"order": "o-1"}',
        headers={"Content-Type": "application/json"},
    )
    error(malformed, 422, "InputInvalid", "not valid JSON")
    nan = api.post(
        "/workflows/e2e-orders/executions",
        content=b'{"input": {"order": NaN}}',
        headers={"Content-Type": "application/json"},
    )
    error(nan, 422, "InputInvalid", "finite")
    deep: Any = {}
    for _ in range(150):
        deep = {"a": deep}
    error(start(api, "e2e-orders", {"order": "o-1", "deep": deep}), 422, "InputInvalid", "nested")
    very_deep = b'{"input": {"order": "o-1", "deep": ' + b"[" * 5000 + b"]" * 5000 + b"}}"
    error(
        api.post(
            "/workflows/e2e-orders/executions",
            content=very_deep,
            headers={"Content-Type": "application/json"},
        ),
        422,
        "InputInvalid",
    )
    error(api.get(f"/executions/{NO_SUCH_EXECUTION}"), 404, "ExecutionNotFound")
    error(api.get("/executions/not-an-id"), 422, "InputInvalid", "execution_id")
    error(api.get("/no/such/path"), 404, "NotFound")
    # An action no loaded agent offers: refused before anything is stored.
    assert register(api, DATA / "unknown_action.yaml").status_code == 201
    error(
        start(api, "e2e-unknown-action", {}),
        422,
        "ActionNotFound",
        "e2e.teleport",
        "--agents",
    )
    assert api.get("/executions").json()["executions"] == []


def test_a_body_over_one_mebibyte_is_413(api: httpx.Client) -> None:
    big = b" " * (MAX_BODY + 1)
    headers = {"Content-Type": "application/json"}

    declared = api.post("/workflows", content=big, headers=headers)
    chunked = api.post("/workflows", content=iter([big[:65536]] * 17), headers=headers)
    start_body = json.dumps({"input": {"blob": "x" * MAX_BODY}}).encode()
    starting = api.post("/workflows/e2e-orders/executions", content=start_body, headers=headers)

    error(declared, 413, "PayloadTooLarge", str(MAX_BODY))
    assert chunked.request.headers["transfer-encoding"] == "chunked"
    error(chunked, 413, "PayloadTooLarge")
    error(starting, 413, "PayloadTooLarge")
    # At the limit is allowed through (and then judged on its content).
    error(
        api.post("/workflows", content=b" " * MAX_BODY, headers=headers), 422, "DefinitionInvalid"
    )


def test_a_token_guards_every_post_and_leaves_reads_open(
    cli: Cli, processes: list[subprocess.Popen[str]]
) -> None:
    cli.env["FLOWLEDGER_API_TOKEN"] = TOKEN
    server = start_server(cli, "--agents", AGENTS)
    processes.append(server.proc)
    body = ORDERS.read_bytes()
    yaml_type = {"Content-Type": "application/yaml"}

    with server.client() as anonymous, server.client("not-the-token") as wrong:
        for client in (anonymous, wrong):
            refused = client.post("/workflows", content=body, headers=yaml_type)
            error(refused, 401, "Unauthorized", "Bearer")
            assert refused.headers["www-authenticate"] == "Bearer"
        # Refused before the body is even looked at.
        error(anonymous.post("/workflows", content=b" " * (MAX_BODY + 1)), 401, "Unauthorized")
        error(anonymous.post(f"/executions/{NO_SUCH_EXECUTION}/cancel"), 401, "Unauthorized")
        assert anonymous.get("/workflows").json() == {"workflows": []}
        assert anonymous.get("/executions").status_code == 200
        assert anonymous.get("/metrics").status_code == 200
        spec = anonymous.get("/openapi.json").json()
        assert spec["paths"]["/workflows"]["post"]["security"] == [{"bearer": []}]
        assert "security" not in spec["paths"]["/workflows"]["get"]
    with server.client(TOKEN) as client:
        assert client.post("/workflows", content=body, headers=yaml_type).status_code == 201
        started = start(client, "e2e-orders", {"order": "o-20"})
        assert started.status_code == 201, started.text
        eid = started.json()["execution_id"]
        wait_until(client, eid, "waiting")
        answer = client.post(
            f"/executions/{eid}/steps/approve/complete", json={"data": {"approved": True}}
        )
        assert answer.status_code == 200, answer.text
    assert server.stop() == 0, server.output


# -- operations ------------------------------------------------------------------------------


def test_metrics_count_what_ran(api: httpx.Client) -> None:
    before = metrics(api)
    assert before["flowledger_executions_started_total"] == 0
    assert register(api, FAILING).status_code == 201
    completed = waiting_order(api, "o-30")["execution_id"]
    api.post(f"/executions/{completed}/steps/approve/complete", json={"data": {"approved": True}})
    cancelled = waiting_order(api, "o-31")["execution_id"]
    api.post(f"/executions/{cancelled}/cancel")
    failed = start(api, "e2e-failing", {"message": "no"}).json()["execution_id"]
    live = waiting_order(api, "o-32")["execution_id"]
    for eid, status in ((completed, "completed"), (cancelled, "cancelled"), (failed, "failed")):
        wait_until(api, eid, status)

    after = metrics(api)

    assert after["flowledger_executions_started_total"] == 4
    assert after['flowledger_executions_ended_total{status="completed"}'] == 1
    assert after['flowledger_executions_ended_total{status="cancelled"}'] == 1
    assert after['flowledger_executions_ended_total{status="failed"}'] == 1
    assert after['flowledger_executions_ended_total{status="timed_out"}'] == 0
    assert after["flowledger_executions_live"] == 1
    # reserve x3, ship, and the rollback's release; boom failed for good, unretried.
    assert after["flowledger_steps_succeeded_total"] == 5
    assert after["flowledger_steps_failed_total"] == 1
    assert after["flowledger_steps_retried_total"] == 0
    assert after["flowledger_human_tasks_completed_total"] == 1
    # The order still waiting is let go of: it waits for a person, out of memory.
    assert after["flowledger_engine_executions_driven"] == 0
    assert after["flowledger_engine_executions_dormant"] == 1
    assert after["flowledger_engine_commits_total"] >= 1
    events = sum(
        len(api.get(f"/executions/{e}/events").json()["events"])
        for e in (completed, cancelled, failed, live)
    )
    # Every commit holds at least one event; the store also holds the 3 workflow registrations.
    assert after["flowledger_engine_commits_total"] <= events
    assert after["flowledger_store_position"] >= events


def test_health_and_readiness(api: httpx.Client, server: Server) -> None:
    assert api.get("/healthz").json() == {"status": "ok"}
    ready = api.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json() == {"status": "ready", "store_position": 0, "engine": True}
    assert register(api, ORDERS).status_code == 201
    assert api.get("/readyz").json()["store_position"] > 0
    spec = api.get("/openapi.json").json()
    assert {"/workflows", "/executions/{execution_id}/events", "/metrics"} <= set(spec["paths"])
    assert "security" not in spec["paths"]["/workflows"]["post"]  # no token: POSTs are open


# -- the engine in the process -----------------------------------------------------------------


def test_a_restarted_server_resumes_what_its_predecessor_left_running(
    cli: Cli, processes: list[subprocess.Popen[str]]
) -> None:
    first = start_server(cli, "--agents", AGENTS)
    processes.append(first.proc)
    with first.client() as api:
        assert register(api, STALL).status_code == 201
        eid = start(api, "e2e-stall", {}).json()["execution_id"]
    # The agent leaves a marker as its first attempt begins; that attempt never ends.
    wait_for("the first attempt of 'slow'", lambda: (cli.markers / f"stalled-{eid}").is_file())
    first.kill()

    second = start_server(cli, "--agents", AGENTS)
    processes.append(second.proc)
    with second.client() as api:
        doc = wait_until(api, eid, *ENDED)
    assert "the engine resumed 1 executions" in second.output
    assert doc["status"] == "completed"
    assert (doc["steps"]["slow"]["attempts"], doc["steps"]["slow"]["result"]) == (2, {"attempt": 2})
    assert second.stop() == 0, second.output


def test_cli_commands_hand_over_to_the_server(api: httpx.Client, cli: Cli, server: Server) -> None:
    # The server holds the driver lock as the store's worker: `run` stores and follows.
    result = cli("run", ORDERS, "--input", '{"order": "o-40"}', "--json")

    assert result.code == EXIT_WAITING, str(result)
    assert f"a worker (pid {server.proc.pid}) drives this store" in result.message
    eid = result.json()["execution_id"]
    assert wait_until(api, eid, "waiting") == result.json()


def test_serve_refuses_to_drive_a_store_a_worker_drives(
    cli: Cli, processes: list[subprocess.Popen[str]]
) -> None:
    log = cli.home / "worker.err"
    worker = cli.start("worker", "--agents", AGENTS, stderr=log)
    processes.append(worker)
    wait_for("the worker to watch the store", lambda: "worker: resumed" in log.read_text())

    refused = cli("serve", "--port", "0", "--agents", AGENTS, timeout=COMMAND_TIMEOUT)

    assert refused.code == EXIT_BAD_INPUT, str(refused)
    assert f"a worker (pid {worker.pid}) already drives" in refused.message
    assert "--no-engine" in refused.message

    # Beside the worker, a server without an engine stores commands; the worker drives them.
    server = start_server(cli, "--no-engine")
    processes.append(server.proc)
    with server.client() as api:
        assert api.get("/readyz").json()["engine"] is False
        assert register(api, ORDERS).status_code == 201
        started = start(api, "e2e-orders", {"order": "o-50"}, key="o-50")
        assert started.status_code == 201, started.text
        assert started.json()["status"] == "running"
        eid = started.json()["execution_id"]
        wait_until(api, eid, "waiting")
        answer = api.post(
            f"/executions/{eid}/steps/approve/complete", json={"data": {"approved": 1}}
        )
        error(answer, 422, "InputInvalid", "form_schema")
        answer = api.post(
            f"/executions/{eid}/steps/approve/complete", json={"data": {"approved": True}}
        )
        assert answer.status_code == 200, answer.text
        assert wait_until(api, eid, *ENDED)["status"] == "completed"
        error(api.post(f"/executions/{eid}/cancel"), 409, "InvalidTransition")
        assert start(api, "e2e-orders", {"order": "o-50"}, key="o-50").status_code == 200
        assert "flowledger_engine_commits_total" not in api.get("/metrics").text
    assert server.stop() == 0, server.output
