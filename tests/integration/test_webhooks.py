"""Webhook steps against a real local HTTP server, through the real asyncio engine."""

from __future__ import annotations

import asyncio
import socket

import pytest
import support

from flowledger.domain.states import ExecutionStatus, StepStatus

SECRET = "s3cr3t-token-9f8e7d"  # a value that must never reach the event store


def _hook(url, **fields):
    return {"step_id": "hook", "type": "webhook", "url": url, **fields}


def _retrying(max_retries=3):
    return {"max_retries": max_retries, "retry_delay": 0.01}


def _stored_bytes(app):
    """Every stored record (events of every aggregate) as the store holds them."""
    notifications = app.recorder.select_notifications(1, 100_000)
    return b"\n".join(n.state for n in notifications)


async def test_webhook_2xx_json_response_is_the_result(run, app, http_server):
    url = http_server.on("/score", (200, {"score": 0.93, "label": "invoice"}))
    _, eid, ex = await run(
        {
            "steps": [
                _hook(
                    url,
                    input_mapping={"doc": "document.id"},
                    output_mapping={"score": "score"},
                    headers={"X-Trace": "abc"},
                )
            ]
        },
        {"document": {"id": "d-1", "pages": 3}},
    )

    assert ex.status is ExecutionStatus.COMPLETED
    assert ex.steps["hook"].result == {"score": 0.93, "label": "invoice"}
    assert ex.data["score"] == 0.93
    assert support.event_types(app, eid) == [
        "ExecutionStarted",
        "StepStarted",
        "StepSucceeded",
        "ExecutionCompleted",
    ]
    [request] = http_server.hits("/score")
    assert request.method == "POST"  # the default
    assert request.body == {"doc": "d-1"}  # body = the step input as JSON
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["X-Trace"] == "abc"


async def test_webhook_without_input_mapping_posts_the_whole_data(run, http_server):
    url = http_server.on("/all", (201, {"accepted": True}))
    _, _, ex = await run({"steps": [_hook(url, method="put")]}, {"a": 1, "b": [2, 3]})

    assert ex.status is ExecutionStatus.COMPLETED
    assert ex.data["hook"] == {"accepted": True}
    [request] = http_server.hits("/all")
    assert request.method == "PUT"
    assert request.body == {"a": 1, "b": [2, 3]}


async def test_webhook_get_sends_no_body(run, http_server):
    url = http_server.on("/status", (200, {"up": True}))
    _, _, ex = await run({"steps": [_hook(url, method="GET")]}, {"a": 1})

    assert ex.status is ExecutionStatus.COMPLETED
    [request] = http_server.hits("/status")
    assert request.method == "GET"
    assert request.body is None


@pytest.mark.parametrize(
    ("answer", "result"),
    [
        ((200, [1, 2]), {"body": [1, 2]}),
        ((200, "text"), {"body": "text"}),
        ((204, None), {"status_code": 204}),
    ],
    ids=["list", "string", "empty"],
)
async def test_webhook_response_that_is_not_an_object(run, http_server, answer, result):
    url = http_server.on("/shape", answer)
    _, _, ex = await run({"steps": [_hook(url)]})

    assert ex.status is ExecutionStatus.COMPLETED
    assert ex.data["hook"] == result


async def test_webhook_response_that_is_not_json_fails_without_retry(run, http_server):
    url = http_server.on("/html", (200, b"<html>oops</html>"))
    _, _, ex = await run({"steps": [_hook(url, retry_policy=_retrying())]})

    assert ex.status is ExecutionStatus.FAILED
    assert ex.steps["hook"].error["type"] == "InvalidResult"
    assert len(http_server.hits("/html")) == 1


@pytest.mark.parametrize("status", [500, 502, 503, 408, 429])
async def test_webhook_retryable_statuses_are_retried(run, app, http_server, status):
    url = http_server.on("/flaky", (status, {"error": "busy"}), (200, {"ok": True}))
    _, eid, ex = await run({"steps": [_hook(url, retry_policy=_retrying())]})

    assert ex.status is ExecutionStatus.COMPLETED
    assert ex.data["hook"] == {"ok": True}
    assert len(http_server.hits("/flaky")) == 2
    assert ex.steps["hook"].attempt == 2
    assert support.event_types(app, eid) == [
        "ExecutionStarted",
        "StepStarted",
        "StepRetryScheduled",
        "TimerFired",
        "StepStarted",
        "StepSucceeded",
        "ExecutionCompleted",
    ]
    error = support.events_of(app, eid, "StepRetryScheduled")[0].error
    assert error["type"] == "HTTPError"
    assert error["retryable"] is True
    assert str(status) in error["message"]


async def test_webhook_5xx_exhausts_the_retries(run, app, http_server):
    url = http_server.on("/down", (503, {}))
    _, eid, ex = await run({"steps": [_hook(url, retry_policy=_retrying(2))]})

    assert ex.status is ExecutionStatus.FAILED
    assert len(http_server.hits("/down")) == 3
    assert len(support.events_of(app, eid, "StepRetryScheduled")) == 2
    assert ex.steps["hook"].error["type"] == "HTTPError"


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 422])
async def test_webhook_other_4xx_are_not_retried(run, app, http_server, status):
    url = http_server.on("/reject", (status, {"error": "no"}))
    _, eid, ex = await run({"steps": [_hook(url, retry_policy=_retrying())]})

    assert ex.status is ExecutionStatus.FAILED
    assert len(http_server.hits("/reject")) == 1
    assert support.event_types(app, eid) == [
        "ExecutionStarted",
        "StepStarted",
        "StepFailed",
        "ExecutionFailed",
    ]
    error = ex.steps["hook"].error
    assert error["type"] == "HTTPError"
    assert error["retryable"] is False
    assert str(status) in error["message"]


def _closed_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens here once the socket is closed


async def test_webhook_connection_refused_is_retried(run, app):
    url = f"http://127.0.0.1:{_closed_port()}/nobody"
    _, eid, ex = await run({"steps": [_hook(url, retry_policy=_retrying(2))]})

    assert ex.status is ExecutionStatus.FAILED
    assert ex.steps["hook"].attempt == 3
    scheduled = support.events_of(app, eid, "StepRetryScheduled")
    assert [e.error["type"] for e in scheduled] == ["ConnectionError", "ConnectionError"]
    assert all(e.error["retryable"] for e in scheduled)
    assert ex.steps["hook"].error["type"] == "ConnectionError"


async def test_webhook_timeout_is_a_retryable_failure(run, app, http_server):
    url = http_server.on("/slow", ("hold", None), (200, {"ok": True}))
    _, eid, ex = await run({"steps": [_hook(url, timeout=0.2, retry_policy=_retrying())]})

    assert ex.status is ExecutionStatus.COMPLETED
    assert ex.data["hook"] == {"ok": True}
    error = support.events_of(app, eid, "StepRetryScheduled")[0].error
    assert error["type"] == "TimeoutError"
    assert error["retryable"] is True


async def test_webhook_header_secret_is_resolved_at_call_time_and_never_stored(
    engine, app, http_server, monkeypatch
):
    http_server.on(f"/secure?key={SECRET}-url", (200, {"ok": True}))
    wf = await engine.register(
        support.workflow(
            {
                "steps": [
                    _hook(
                        http_server.url("/secure?key=${env:FLOWLEDGER_TEST_URL_KEY}"),
                        headers={"Authorization": "Bearer ${env:FLOWLEDGER_TEST_TOKEN}"},
                    )
                ]
            }
        )
    )

    # Set only after registration: the value is read when the call is made.
    monkeypatch.setenv("FLOWLEDGER_TEST_TOKEN", SECRET)
    monkeypatch.setenv("FLOWLEDGER_TEST_URL_KEY", SECRET + "-url")
    first = await engine.start(wf, {"payload": 1})
    ex = await asyncio.wait_for(engine.wait_settled(first), 5)
    assert ex.status is ExecutionStatus.COMPLETED

    monkeypatch.setenv("FLOWLEDGER_TEST_TOKEN", SECRET + "-rotated")
    second = await engine.start(wf, {"payload": 2})
    ex = await asyncio.wait_for(engine.wait_settled(second), 5)
    assert ex.status is ExecutionStatus.COMPLETED

    requests = http_server.hits(f"/secure?key={SECRET}-url")
    assert [r.headers["Authorization"] for r in requests] == [
        f"Bearer {SECRET}",
        f"Bearer {SECRET}-rotated",
    ]
    # Neither the stored records nor the events as the application reads them hold it.
    assert SECRET.encode() not in _stored_bytes(app)
    for eid in (first, second):
        for event in support.events_of(app, eid):
            assert SECRET not in repr(event)
    assert b"${env:FLOWLEDGER_TEST_TOKEN}" in _stored_bytes(app)  # the reference is kept


async def test_webhook_missing_secret_fails_without_retry(run, app, http_server, monkeypatch):
    monkeypatch.delenv("FLOWLEDGER_TEST_ABSENT", raising=False)
    url = http_server.on("/secure", (200, {"ok": True}))
    _, eid, ex = await run(
        {
            "steps": [
                _hook(
                    url,
                    headers={"Authorization": "Bearer ${env:FLOWLEDGER_TEST_ABSENT}"},
                    retry_policy=_retrying(),
                )
            ]
        }
    )

    assert ex.status is ExecutionStatus.FAILED
    assert http_server.hits("/secure") == []
    assert support.event_types(app, eid) == [
        "ExecutionStarted",
        "StepStarted",
        "StepFailed",
        "ExecutionFailed",
    ]
    error = ex.steps["hook"].error
    assert error["type"] == "SecretMissing"
    assert error["retryable"] is False
    assert "FLOWLEDGER_TEST_ABSENT" in error["message"]


async def test_webhook_secret_in_an_error_message_is_not_stored(run, app, http_server, monkeypatch):
    monkeypatch.setenv("FLOWLEDGER_TEST_TOKEN", SECRET)
    url = http_server.on(f"/fail/{SECRET}", (404, {}))
    _, _, ex = await run({"steps": [_hook(http_server.url("/fail/${env:FLOWLEDGER_TEST_TOKEN}"))]})

    assert ex.status is ExecutionStatus.FAILED
    assert len(http_server.hits(f"/fail/{SECRET}")) == 1
    assert url.endswith(SECRET)
    assert SECRET.encode() not in _stored_bytes(app)


async def test_webhook_as_an_error_handler(run, registry, http_server):
    @registry.action("boom")
    def boom(inp):
        raise RuntimeError("down")

    url = http_server.on("/fallback", (200, {"via": "webhook"}))
    _, _, ex = await run(
        {
            "retry_policy": {"max_retries": 0, "retry_delay": 0.01},
            "steps": [
                {"step_id": "a", "type": "action", "action": "boom", "error_handlers": ["page"]}
            ],
            "handlers": [{"step_id": "page", "type": "webhook", "url": url}],
        },
        {"x": 1},
    )

    assert ex.status is ExecutionStatus.COMPLETED
    assert ex.steps["a"].recovered_by == "page"
    assert ex.data["a"] == {"via": "webhook"}
    [request] = http_server.hits("/fallback")
    assert request.body["step_id"] == "a"
    assert request.body["input"] == {"x": 1}
    assert request.body["error"]["message"] == "down"
    assert ex.steps["a"].status is StepStatus.COMPLETED


@pytest.mark.parametrize("where", ["url", "header"])
async def test_webhook_secret_in_a_client_error_is_not_stored(
    run, app, http_server, monkeypatch, where
):
    if where == "url":  # a resolved URL that httpx rejects: its error quotes the value
        monkeypatch.setenv("FLOWLEDGER_TEST_TOKEN", SECRET)
        host = http_server.base.rsplit(":", 1)[0]
        hook = _hook(host + ":${env:FLOWLEDGER_TEST_TOKEN}/x")
    else:  # a resolved header that h11 refuses: its error quotes the header
        monkeypatch.setenv("FLOWLEDGER_TEST_TOKEN", SECRET + "\n")
        hook = _hook(http_server.url("/x"), headers={"X-Key": "${env:FLOWLEDGER_TEST_TOKEN}"})
    _, _, ex = await run({"steps": [{**hook, "retry_policy": {"max_retries": 0}}]})

    assert ex.status is ExecutionStatus.FAILED
    assert SECRET.encode() not in _stored_bytes(app)
