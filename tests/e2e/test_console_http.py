"""The web console's pages and actions over real HTTP (no browser): what each page answers,
its headers, escaping of user data, bad input, the token, and the answer form's errors.
The browser drives the same pages in tests/browser."""

from __future__ import annotations

import re
import subprocess
from typing import Any

import httpx
from cli_driver import AGENTS, DATA, Cli
from http_driver import Server, start_server, wait_until
from test_http import ORDERS, TOKEN, register, start

FORM = {"Content-Type": "application/x-www-form-urlencoded"}
HOSTILE = '<script>alert("x")</script>'


def waiting_order(api: httpx.Client, order: str = "o-1", key: str | None = None) -> str:
    assert register(api, ORDERS).status_code in (200, 201)
    started = start(api, "e2e-orders", {"order": order}, key)
    assert started.status_code == 201, started.text
    eid: str = started.json()["execution_id"]
    wait_until(api, eid, "waiting")
    return eid


def page(api: httpx.Client, path: str, code: int = 200, **params: Any) -> str:
    response = api.get(path, params=params)
    assert response.status_code == code, response.text
    assert response.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in response.headers["content-security-policy"]
    return response.text


def test_every_page_renders_from_the_store_and_loads_nothing_from_elsewhere(
    api: httpx.Client,
) -> None:
    eid = waiting_order(api)
    pages = [
        page(api, "/"),
        page(api, f"/ui/executions/{eid}"),
        page(api, "/ui/inbox", assignee="sales"),
        page(api, "/ui/workflows"),
        page(api, "/ui/workflows/e2e-orders"),
    ]
    for html in pages:
        for url in re.findall(r'(?:src|href)="([^"]+)"', html):
            assert not re.match(r"^(https?:)?//", url), url  # every asset is the server's own
    assert f'data-execution-id="{eid}"' in pages[0]
    assert 'data-step="approve" data-status="waiting"' in pages[1]
    assert 'class="task-form" data-step="approve"' in pages[2]
    assert 'data-workflow-id="e2e-orders"' in pages[3]
    assert 'class="version card" data-version="1"' in pages[4]
    for asset in re.findall(r'(?:src|href)="(/ui/static/[^"]+)"', "".join(pages)):
        assert api.get(asset).status_code == 200, asset


def test_user_data_is_escaped_in_every_part_of_the_execution_page(api: httpx.Client) -> None:
    eid = waiting_order(api, order=HOSTILE)
    html = page(api, f"/ui/executions/{eid}")
    assert "<script>alert" not in html
    assert "&lt;script&gt;alert(" in html  # in the data document and the event history


def test_the_list_filters_and_refuses_a_bad_filter_by_name(api: httpx.Client) -> None:
    eid = waiting_order(api)
    assert eid in page(api, "/", status="waiting", workflow="e2e-orders")
    assert eid not in page(api, "/", status="completed")
    assert eid in page(api, "/ui/executions/rows", status="waiting")
    bad = page(api, "/", code=422, since="yesterday")
    assert 'hx-trigger="every 2s"' not in bad  # a list that cannot be read is not polled
    assert "since: &#39;yesterday&#39; is not a date and time" in bad
    assert "is not one of" in page(api, "/", code=422, status="done")


def test_search_finds_an_execution_by_id_or_idempotency_key(api: httpx.Client) -> None:
    eid = waiting_order(api, key="order-key-1")
    for text in (eid, "order-key-1"):
        found = api.get("/ui/search", params={"q": text})
        assert found.status_code == 303
        assert found.headers["location"] == f"/ui/executions/{eid}"
    missing = api.get("/ui/search", params={"q": "no-such-key"}, follow_redirects=True)
    assert "no execution has the id or idempotency key &#39;no-such-key&#39;" in missing.text
    assert "not an execution id" in page(api, "/ui/executions/nope", code=404)


def test_the_answer_form_refuses_a_bad_answer_beside_its_field_then_takes_a_good_one(
    api: httpx.Client,
) -> None:
    eid = waiting_order(api)
    url = f"/ui/executions/{eid}/complete"
    bad = api.post(url, content="_key=approve&approved=", headers=FORM)
    assert bad.status_code == 422
    assert re.search(
        r'class="field-error" data-field="approved"[^>]*>a value is required<', bad.text
    )
    assert api.get(f"/executions/{eid}").json()["status"] == "waiting"  # nothing stored
    wrong_type = api.post(url, json={"_key": "approve", "approved": True})
    assert wrong_type.status_code == 422
    assert "application/x-www-form-urlencoded" in wrong_type.text
    good = api.post(url, content="_key=approve&approved=true", headers=FORM)
    assert good.status_code == 200, good.text
    assert 'class="task-done"' in good.text
    assert wait_until(api, eid, "completed")["data"]["approve"] == {"approved": True}
    again = api.post(url, content="_key=approve&approved=true", headers=FORM)
    assert again.status_code == 422
    assert 'class="form-error"' in again.text


def test_cancel_from_the_console_compensates_like_the_api(api: httpx.Client) -> None:
    eid = waiting_order(api)
    done = api.post(f"/ui/executions/{eid}/cancel", content="reason=wrong+order", headers=FORM)
    assert done.status_code == 200, done.text
    doc = wait_until(api, eid, "cancelled")
    assert doc["reason"] == "wrong order"
    html = page(api, f"/ui/executions/{eid}")
    # reserve's rollback action ran: its lane shows the compensation, and reserve compensated
    assert re.search(r'data-kind="compensation" data-status="completed"', html), html
    assert 'data-step="reserve" data-status="compensated"' in html
    twice = api.post(f"/ui/executions/{eid}/cancel", content="reason=x", headers=FORM)
    assert twice.status_code == 409
    assert 'class="form-error"' in twice.text


def test_with_a_token_the_console_reads_freely_and_changes_nothing_without_it(
    cli: Cli, processes: list[subprocess.Popen[str]]
) -> None:
    cli.env["FLOWLEDGER_API_TOKEN"] = TOKEN
    srv = start_server(cli, "--agents", AGENTS)
    processes.append(srv.proc)
    with srv.client(TOKEN) as owner, srv.client() as anyone:
        eid = waiting_order(owner)
        html = page(anyone, f"/ui/executions/{eid}")
        assert 'data-token-required="true"' in html
        url = f"/ui/executions/{eid}/cancel"
        refused = anyone.post(url, content="reason=x", headers=FORM)
        assert refused.status_code == 401
        assert anyone.get(f"/executions/{eid}").json()["status"] == "waiting"
        wrong = anyone.post(url, content="reason=x", headers={**FORM, "Authorization": "Bearer no"})
        assert wrong.status_code == 401
        assert owner.post(url, content="reason=x", headers=FORM).status_code == 200
        wait_until(owner, eid, "cancelled")
    assert srv.stop() == 0, srv.output


def test_a_failed_execution_offers_retry_and_runs_again_from_the_failed_step(
    cli: Cli, api: httpx.Client
) -> None:
    assert register(api, DATA / "gated.yaml").status_code == 201
    eid = start(api, "e2e-gated", {"order": "g-1"}).json()["execution_id"]
    wait_until(api, eid, "failed")
    html = page(api, f"/ui/executions/{eid}")
    assert 'id="retry-form"' in html
    assert 'id="cancel-form"' not in html  # an ended execution cannot be cancelled
    assert 'data-kind="attempt" data-status="failed"' in html  # the gate's failed attempt
    (cli.markers / "gate-open").touch()
    retried = api.post(f"/ui/executions/{eid}/retry", content="", headers=FORM)
    assert retried.status_code == 204
    assert retried.headers["hx-refresh"] == "true"  # the page follows the execution again
    wait_until(api, eid, "completed")
    html = page(api, f"/ui/executions/{eid}")
    assert 'id="retry-form"' not in html
    assert 'data-status="completed"' in html


def test_a_change_sent_from_another_site_is_refused(server: Server, api: httpx.Client) -> None:
    eid = waiting_order(api)
    url = f"/ui/executions/{eid}/cancel"
    for origin in ("http://evil.example", "null"):
        forged = api.post(url, content="reason=x", headers={**FORM, "Origin": origin})
        assert forged.status_code == 403, forged.text
        assert "from another site" in forged.json()["detail"]
        refused = api.post(f"/executions/{eid}/retry", headers={"Origin": origin})
        assert refused.status_code == 403  # the JSON API is covered alike
    assert api.get(f"/executions/{eid}").json()["status"] == "waiting"
    own = server.url.removesuffix("/")
    allowed = api.post(url, content="reason=x", headers={**FORM, "Origin": own})
    assert allowed.status_code == 200, allowed.text


LOOP = {
    "workflow_id": "e2e-many",
    "version": "1",
    "steps": [
        {
            "step_id": "each",
            "type": "loop",
            "for_each": "orders",
            "loop_max_iterations": 200,
            "max_concurrency": 8,
            "steps": [{"step_id": "ship", "type": "action", "action": "e2e.ship"}],
        }
    ],
}


def test_a_long_history_shows_its_newest_events_live_and_the_rest_on_its_own_page(
    api: httpx.Client,
) -> None:
    assert api.post("/workflows", json=LOOP).status_code == 201
    started = start(api, "e2e-many", {"orders": list(range(100))})
    eid = started.json()["execution_id"]
    count = wait_until(api, eid, "completed")["event_count"]
    assert count > 250
    live = page(api, f"/ui/executions/{eid}/live")
    assert live.count('<tr class="event"') == 200
    assert f'data-version="{count}"' in live  # the newest
    assert f"The newest 200 of {count} events" in live
    whole = page(api, f"/ui/executions/{eid}/history")
    assert whole.count('<tr class="event"') == count
    assert 'id="audit" data-ok="true"' in whole
    attributes = page(api, f"/ui/executions/{eid}/events/1")
    assert "&#34;workflow_id&#34;: &#34;e2e-many&#34;" in attributes  # fetched when opened
    assert "has no event" in page(api, f"/ui/executions/{eid}/events/{count + 1}", code=404)
