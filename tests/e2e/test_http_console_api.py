"""The reads the web console uses, over real HTTP: an execution found by its id or its
idempotency key, the audit of an execution's hash chain (tampered with in the SQLite file
while the server runs), and a workflow's duration percentiles over time."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from typing import Any
from uuid import UUID

import httpx
from cli_driver import DATA, EXIT_FAILED, EXIT_OK, Cli
from http_driver import wait_until
from test_http import NO_SUCH_EXECUTION, ORDERS, error, register, start

from flowledger.services.app import catalog_id

GATED = DATA / "gated.yaml"
GATE_AGENTS = DATA / "gate.py"
LADDER = (60, 300, 900, 3600, 21_600, 86_400, 604_800)



def ok(response: httpx.Response) -> Any:
    assert response.status_code == 200, response.text
    return response.json()


def lookup(api: httpx.Client, text: str) -> httpx.Response:
    return api.get("/executions/lookup", params={"q": text})


def completed_order(api: httpx.Client, order: str) -> str:
    """An e2e-orders execution, approved and completed."""
    assert register(api, ORDERS).status_code in (200, 201)
    eid: str = start(api, "e2e-orders", {"order": order}).json()["execution_id"]
    wait_until(api, eid, "waiting")
    answer = api.post(
        f"/executions/{eid}/steps/approve/complete", json={"data": {"approved": True}}
    )
    assert answer.status_code == 200, answer.text
    wait_until(api, eid, "completed")
    return eid


# -- lookup ----------------------------------------------------------------------------------


def test_an_execution_is_found_by_its_id_or_its_idempotency_key(api: httpx.Client) -> None:
    assert register(api, ORDERS).status_code == 201
    keyed = start(api, "e2e-orders", {"order": "o-1"}, key="order o-1").json()["execution_id"]
    plain = start(api, "e2e-orders", {"order": "o-2"}).json()["execution_id"]
    # A key may look like an execution id: as none has that id, the key is what it names.
    uuid_key = "11111111-2222-4333-8444-555555555555"
    by_uuid_key = start(api, "e2e-orders", {"order": "o-3"}, key=uuid_key).json()["execution_id"]

    assert ok(lookup(api, keyed)) == {"execution_id": keyed}
    assert ok(lookup(api, "order o-1")) == {"execution_id": keyed}
    assert ok(lookup(api, plain)) == {"execution_id": plain}
    assert ok(lookup(api, f" {plain.upper()} ")) == {"execution_id": plain}
    assert ok(lookup(api, uuid_key)) == {"execution_id": by_uuid_key}
    # The path is not taken for an execution id, and the execution route still answers.
    assert ok(api.get(f"/executions/{plain}"))["execution_id"] == plain

    error(lookup(api, NO_SUCH_EXECUTION), 404, "ExecutionNotFound", f"'{NO_SUCH_EXECUTION}'")
    error(lookup(api, "order o-9"), 404, "ExecutionNotFound", "'order o-9'", "idempotency key")
    # A workflow's catalog lives in the same store: its id is no execution's.
    error(lookup(api, str(catalog_id("e2e-orders"))), 404, "ExecutionNotFound")
    error(lookup(api, ""), 422, "InputInvalid", "q")
    error(lookup(api, "k" * 257), 422, "InputInvalid", "q")
    error(api.get("/executions/lookup"), 422, "InputInvalid", "q")


# -- audit -----------------------------------------------------------------------------------


def edit_stored_event(cli: Cli, eid: str, version: int, old: bytes, new: bytes) -> None:
    """Change an event's stored bytes in the SQLite file, as someone with the file could."""
    where = "WHERE originator_id = ? AND originator_version = ?"
    with closing(sqlite3.connect(cli.home / "flowledger.db")) as conn:
        [(state,)] = conn.execute(
            f"SELECT state FROM stored_events {where}", (UUID(eid).hex, version)
        )
        assert old in bytes(state)
        conn.execute(
            f"UPDATE stored_events SET state = ? {where}",
            (bytes(state).replace(old, new), UUID(eid).hex, version),
        )
        conn.commit()


def cli_audit(cli: Cli, eid: str, code: int) -> dict[str, Any]:
    result = cli("audit", "verify", eid, "--json")
    assert result.code == code, str(result)
    [report] = result.json()
    return dict(report)


def test_the_audit_sees_an_event_edited_in_the_store_as_the_cli_does(
    api: httpx.Client, cli: Cli
) -> None:
    eid = completed_order(api, "o-4")
    other = completed_order(api, "o-5")
    events = ok(api.get(f"/executions/{eid}/events"))["events"]

    intact = ok(api.get(f"/executions/{eid}/audit"))

    assert intact["execution_id"] == eid
    assert (intact["ok"], intact["events"], intact["findings"]) == (True, len(events), [])
    assert intact["head"] == events[-1]["attributes"]["hash"]
    assert intact == cli_audit(cli, eid, EXIT_OK)

    shipped = next(
        e for e in events if e["type"] == "StepSucceeded" and e["attributes"]["key"] == "ship"
    )
    edit_stored_event(cli, eid, shipped["version"], b'"key":"ship"', b'"key":"shipped"')
    tampered = ok(api.get(f"/executions/{eid}/audit"))

    assert tampered["ok"] is False
    assert tampered["findings"] == [
        {
            "problem": "edited",
            "version": shipped["version"],
            "type": "StepSucceeded",
            "detail": "its content does not match its hash",
        }
    ]
    assert tampered == cli_audit(cli, eid, EXIT_FAILED)
    assert ok(api.get(f"/executions/{other}/audit"))["ok"] is True
    error(api.get(f"/executions/{NO_SUCH_EXECUTION}/audit"), 404, "ExecutionNotFound")
    catalog = catalog_id("e2e-orders")
    error(api.get(f"/executions/{catalog}/audit"), 404, "ExecutionNotFound", str(catalog))
    error(api.get("/executions/not-an-id/audit"), 422, "InputInvalid", "execution_id")


# -- duration series -------------------------------------------------------------------------


def test_the_duration_series_counts_and_ranks_the_ended_executions(
    api: httpx.Client, cli: Cli
) -> None:
    assert register(api, GATED).status_code == 201
    for order in ("g-1", "g-2"):
        failed = start(api, "e2e-gated", {"order": order}).json()["execution_id"]
        wait_until(api, failed, "failed")
    (cli.markers / "gate-open").touch()
    passed = start(api, "e2e-gated", {"order": "g-3"}).json()["execution_id"]
    wait_until(api, passed, "completed")
    assert register(api, ORDERS).status_code == 201
    other = start(api, "e2e-orders", {"order": "o-6"}).json()["execution_id"]
    wait_until(api, other, "waiting")  # another workflow's, and not ended: in no series

    series = ok(api.get("/workflows/e2e-gated/performance/series"))
    v1 = ok(api.get("/workflows/e2e-gated/performance/series", params={"version": "1"}))
    one = ok(api.get("/workflows/e2e-gated/performance/series", params={"buckets": 1}))
    perf = ok(api.get("/workflows/e2e-gated/performance"))

    assert (series["workflow_id"], series["version"], series["bucket_seconds"]) == (
        "e2e-gated",
        None,
        60,
    )
    points = series["points"]
    assert all(
        set(p) == {"start", "count", "completed", "failed", "p50", "p95", "p99"} for p in points
    )
    assert [sum(p[n] for p in points) for n in ("count", "completed", "failed")] == [3, 1, 2]
    [done] = [p for p in points if p["completed"]]
    duration = perf["executions"]["duration"]["p50"]
    assert (done["p50"], done["p95"], done["p99"]) == (duration, duration, duration)
    assert all(p["p50"] is None for p in points if not p["completed"])
    assert [p["start"] for p in points] == sorted(p["start"] for p in points)
    assert all(p["start"].endswith(":00+00:00") for p in points)
    assert v1["version"] == "1"
    assert v1["points"] == points
    assert one["bucket_seconds"] in LADDER
    assert [(p["count"], p["completed"]) for p in one["points"]] == [(3, 1)]

    error(api.get("/workflows/e2e-nothing/performance/series"), 404, "WorkflowNotFound")
    notfound = api.get("/workflows/e2e-gated/performance/series", params={"version": "9"})
    error(notfound, 404, "WorkflowNotFound", "'9'")
    for buckets in ("0", "201", "many"):
        bad = api.get("/workflows/e2e-gated/performance/series", params={"buckets": buckets})
        error(bad, 422, "InputInvalid", "buckets")
