"""The HTTP API's reads over the projections (listing, steps, timeline, inbox, performance,
projection lag) and the retry of a failed execution, over real HTTP."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from cli_driver import DATA, Cli
from http_driver import wait_until
from test_http import ENDED, FAILING, NO_SUCH_EXECUTION, ORDERS, error, metrics, register, start

GATED = DATA / "gated.yaml"
GATE_AGENTS = DATA / "gate.py"



def ok(response: httpx.Response) -> Any:
    assert response.status_code == 200, response.text
    return response.json()


def gated(api: httpx.Client, order: str) -> str:
    """An e2e-gated execution, once it has failed at the closed gate."""
    started = start(api, "e2e-gated", {"order": order})
    assert started.status_code == 201, started.text
    eid: str = started.json()["execution_id"]
    wait_until(api, eid, "failed")
    return eid


def gate_runs(cli: Cli, eid: str) -> list[tuple[str, int]]:
    """(step, attempt) of each run the gate agents made for an execution, in order."""
    log = cli.markers / "gate-runs.jsonl"
    runs = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return [(r["step"], r["attempt"]) for r in runs if r["execution_id"] == eid]


def ids(api: httpx.Client, **params: Any) -> list[str]:
    page = ok(api.get("/executions", params=params))
    return [row["execution_id"] for row in page["executions"]]


# -- listing ---------------------------------------------------------------------------------


def test_the_listing_filters_by_tag_and_start_time_in_either_order(api: httpx.Client) -> None:
    for definition in (ORDERS, GATED):
        assert register(api, definition).status_code == 201
    first = gated(api, "g-1")
    order = start(api, "e2e-orders", {"order": "o-1"}).json()["execution_id"]
    wait_until(api, order, "waiting")
    second = gated(api, "g-2")
    rows = {r["execution_id"]: r for r in ok(api.get("/executions"))["executions"]}
    middle = rows[order]["started_at"]

    assert ids(api) == [second, order, first]
    assert ids(api, order="oldest") == [first, order, second]
    assert ids(api, tag="gated") == [second, first]
    assert ids(api, tag="gated", status="failed", order="oldest") == [first, second]
    assert ids(api, tag="nothing") == []
    assert ids(api, since=middle) == [second, order]
    assert ids(api, until=middle) == [first]
    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    assert ids(api, since=later) == []
    # Pages of one, with filters: the cursor carries on in the same order.
    paged, cursor = [], None
    while True:
        params: dict[str, Any] = {"tag": "gated", "order": "oldest", "limit": 1}
        if cursor is not None:
            params["cursor"] = cursor
        page = ok(api.get("/executions", params=params))
        paged += [row["execution_id"] for row in page["executions"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
        stray = api.get("/executions", params={"limit": 1, "cursor": cursor})
        error(stray, 422, "InputInvalid", "filters differ")
    assert paged == [first, second]
    error(api.get("/executions", params={"since": "yesterday-ish"}), 422, "InputInvalid", "since")
    error(api.get("/executions", params={"order": "random"}), 422, "InputInvalid", "order")


# -- one execution ---------------------------------------------------------------------------


def test_the_steps_and_timeline_of_an_execution_come_from_its_events(api: httpx.Client) -> None:
    assert register(api, ORDERS).status_code == 201
    eid = start(api, "e2e-orders", {"order": "o-2"}).json()["execution_id"]
    wait_until(api, eid, "waiting")
    api.post(f"/executions/{eid}/steps/approve/complete", json={"data": {"approved": True}})
    wait_until(api, eid, "completed")

    detail = ok(api.get(f"/executions/{eid}/steps"))
    timeline = ok(api.get(f"/executions/{eid}/timeline"))["timeline"]

    assert detail["execution"]["status"] == "completed"
    steps = {s["key"]: s for s in detail["steps"]}
    assert [s["key"] for s in detail["steps"]] == ["reserve", "approve", "ship"]
    assert {k: (s["status"], s["attempts"]) for k, s in steps.items()} == {
        "reserve": ("completed", 1),
        "approve": ("completed", 1),
        "ship": ("completed", 1),
    }
    assert steps["reserve"]["agent"] is not None
    assert steps["approve"]["assignee"] == "sales"
    assert detail["event_count"] == len(ok(api.get(f"/executions/{eid}/events"))["events"])
    assert [e["seq"] for e in timeline] == sorted(e["seq"] for e in timeline)
    moves = [(e["step_key"], e["status_to"]) for e in timeline if e["status_to"]]
    assert moves[0] == (None, "running")
    assert moves[-1] == (None, "completed")
    assert ("approve", "waiting") in moves
    assert moves.index(("reserve", "completed")) < moves.index(("ship", "running"))
    for path in ("steps", "timeline"):
        error(api.get(f"/executions/{NO_SUCH_EXECUTION}/{path}"), 404, "ExecutionNotFound")
        error(api.get(f"/executions/not-an-id/{path}"), 422, "InputInvalid")


def test_the_inbox_holds_each_waiting_task_until_it_is_answered(api: httpx.Client) -> None:
    assert register(api, ORDERS).status_code == 201
    eids = [start(api, "e2e-orders", {"order": f"o-{n}"}).json()["execution_id"] for n in (3, 4)]
    for eid in eids:
        wait_until(api, eid, "waiting")

    tasks = ok(api.get("/inbox", params={"assignee": "sales"}))["tasks"]
    assert [(t["execution_id"], t["step_id"]) for t in tasks] == [(e, "approve") for e in eids]
    assert ok(api.get("/inbox", params={"assignee": "nobody"})) == {"tasks": []}
    assert len(ok(api.get("/inbox"))["tasks"]) == 2

    api.post(f"/executions/{eids[0]}/steps/approve/complete", json={"data": {"approved": True}})

    remaining = ok(api.get("/inbox", params={"assignee": "sales"}))["tasks"]
    assert [t["execution_id"] for t in remaining] == [eids[1]]


# -- performance and lag ---------------------------------------------------------------------


def test_performance_is_counted_per_workflow_step_and_agent(api: httpx.Client, cli: Cli) -> None:
    assert register(api, GATED).status_code == 201
    failed = [gated(api, f"g-{n}") for n in (5, 6)]
    (cli.markers / "gate-open").touch()
    passed = start(api, "e2e-gated", {"order": "g-7"}).json()["execution_id"]
    wait_until(api, passed, "completed")

    perf = ok(api.get("/workflows/e2e-gated/performance"))
    hour = ok(api.get("/workflows/e2e-gated/performance", params={"window": "1h"}))
    v1 = ok(api.get("/workflows/e2e-gated/performance", params={"version": "1"}))

    assert (perf["window"], perf["since"], perf["version"]) == ("all", None, None)
    ex = perf["executions"]
    assert (ex["ended"], ex["completed"], ex["failed"], ex["in_progress"]) == (3, 1, 2, 0)
    assert ex["success_rate"] == pytest.approx(1 / 3)
    assert ex["duration"]["count"] == 1
    steps = {s["step_id"]: s for s in perf["steps"]}
    assert (steps["prepare"]["runs"], steps["prepare"]["succeeded"]) == (3, 3)
    assert (steps["gate"]["runs"], steps["gate"]["succeeded"], steps["gate"]["failed"]) == (3, 1, 2)
    assert sum(a["attempts"] for a in perf["agents"]) == 6
    [version] = perf["versions"]
    sla = {c["target"]: c for c in version["sla"]}
    assert sla["success_rate"]["met"] is False  # 1 of 3 against a goal of 0.5
    assert hour["executions"] == ex
    assert hour["since"] is not None
    assert v1["version"] == "1"
    assert v1["executions"] == ex
    assert len(failed) == 2
    error(api.get("/workflows/e2e-nothing/performance"), 404, "WorkflowNotFound")
    notfound = api.get("/workflows/e2e-gated/performance", params={"version": "9"})
    error(notfound, 404, "WorkflowNotFound", "'9'")
    bad = api.get("/workflows/e2e-gated/performance", params={"window": "forever"})
    error(bad, 422, "InputInvalid", "window", "'forever'")


def test_projections_report_their_lag_and_metrics_carry_it(api: httpx.Client) -> None:
    assert register(api, ORDERS).status_code == 201
    eid = start(api, "e2e-orders", {"order": "o-8"}).json()["execution_id"]
    wait_until(api, eid, "waiting")
    ok(api.get("/inbox"))  # a read through the views catches them up to the head

    found = {p["name"]: p for p in ok(api.get("/projections"))["projections"]}
    samples = metrics(api)

    assert set(found) == {"runs", "performance", "step_cache"}
    head = samples["flowledger_store_position"]
    for name, p in found.items():
        assert p["head"] >= p["position"] > 0
        assert p["lag"] == p["head"] - p["position"]
        assert samples[f'flowledger_projection_position{{projection="{name}"}}'] <= head
        assert samples[f'flowledger_projection_lag{{projection="{name}"}}'] >= 0


# -- retry -----------------------------------------------------------------------------------


def test_a_failed_execution_retries_from_its_failed_step(api: httpx.Client, cli: Cli) -> None:
    assert register(api, GATED).status_code == 201
    eid = gated(api, "g-9")
    error(api.post(f"/executions/{eid}/cancel"), 409, "InvalidTransition")
    (cli.markers / "gate-open").touch()

    retried = api.post(f"/executions/{eid}/retry")

    assert retried.status_code == 200, retried.text
    done = wait_until(api, eid, *ENDED)
    assert done["status"] == "completed"
    assert done["data"]["gate"] == {"passed": True}
    # prepare kept its result and never ran again; the gate ran on, attempt numbers counting.
    assert gate_runs(cli, eid) == [("prepare", 1), ("gate", 1), ("gate", 2)]
    assert done["steps"]["gate"]["attempts"] == 2
    timeline = ok(api.get(f"/executions/{eid}/timeline"))["timeline"]
    statuses = [e["status_to"] for e in timeline if e["step_key"] is None and e["status_to"]]
    assert statuses == ["running", "failed", "running", "completed"]
    listed = ok(api.get("/executions", params={"status": "completed"}))["executions"]
    assert [r["execution_id"] for r in listed] == [eid]
    error(api.post(f"/executions/{eid}/retry"), 409, "InvalidTransition", "completed")
    error(api.post(f"/executions/{NO_SUCH_EXECUTION}/retry"), 404, "ExecutionNotFound")


def test_a_cancelled_execution_with_compensated_steps_is_not_retried(api: httpx.Client) -> None:
    assert register(api, ORDERS).status_code == 201
    eid = start(api, "e2e-orders", {"order": "o-10"}).json()["execution_id"]
    wait_until(api, eid, "waiting")
    api.post(f"/executions/{eid}/cancel")
    wait_until(api, eid, "cancelled")

    error(api.post(f"/executions/{eid}/retry"), 409, "InvalidTransition")
    assert ok(api.get(f"/executions/{eid}"))["status"] == "cancelled"


def test_a_retried_execution_whose_step_fails_again_fails_again(api: httpx.Client) -> None:
    assert register(api, FAILING).status_code == 201
    failed = start(api, "e2e-failing", {"message": "no"}).json()["execution_id"]
    wait_until(api, failed, "failed")

    # The step's error does not go away: it fails again, its attempts counted on.
    assert api.post(f"/executions/{failed}/retry").status_code == 200
    again = wait_until(api, failed, "failed")
    assert again["steps"]["boom"]["attempts"] == 2
    samples = metrics(api)
    assert samples['flowledger_executions_ended_total{status="failed"}'] == 2
    assert samples["flowledger_executions_retried_total"] == 1
    assert samples["flowledger_executions_live"] == 0
