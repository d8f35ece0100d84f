"""The console's Gantt chart: bars folded from timeline rows, and their SVG."""

from __future__ import annotations

import asyncio
import xml.etree.ElementTree as ET
from datetime import UTC, datetime, timedelta
from typing import Any

import support

from flowledger.adapters.agents import AgentRegistry, InProcessRunner
from flowledger.adapters.console.gantt import Bar, GanttChart, gantt_bars, render_gantt
from flowledger.projections.runs import TimelineEntry
from flowledger.services.app import FlowledgerApp
from flowledger.services.engine import Engine
from flowledger.services.queries import Queries

NS = "{http://www.w3.org/2000/svg}"
T0 = datetime(2024, 1, 1, tzinfo=UTC)
ERROR = {"type": "RuntimeError", "message": "boom", "retryable": True}


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def timeline(*rows: tuple[Any, ...]) -> list[TimelineEntry]:
    """Rows of (seconds, event, step_key, status_from, status_to[, detail]) as the runs
    projection writes them."""
    entries = []
    for seq, (seconds, event, key, before, after, *detail) in enumerate(rows, start=1):
        entries.append(
            TimelineEntry(
                seq=seq,
                position=100 + seq,
                at=at(seconds).isoformat(),
                event=event,
                step_key=key,
                status_from=before,
                status_to=after,
                detail=detail[0] if detail else {},
            )
        )
    return entries


def started(seconds: float) -> tuple[Any, ...]:
    return (seconds, "ExecutionStarted", None, "pending", "running")


def shape(chart: GanttChart, key: str) -> list[tuple[str, int | None, str, float, float]]:
    return [(b.kind, b.attempt, b.status, b.start, b.end) for b in chart.lane(key).bars]


def parse(svg: str) -> ET.Element:
    return ET.fromstring(svg)  # parsing at all shows the text and attributes were escaped


def bars_of(root: ET.Element, key: str) -> list[ET.Element]:
    return [
        r
        for r in root.iter(f"{NS}rect")
        if "bar" in (r.get("class") or "").split() and r.get("data-key") == key
    ]


# -- folding -------------------------------------------------------------------------------


def test_a_retried_attempt_a_human_wait_and_a_cancel_become_bars() -> None:
    # The sequence of the runs projection's own timeline test.
    chart = gantt_bars(
        timeline(
            started(0),
            (1, "StepStarted", "reserve", "pending", "running", {"attempt": 1, "kind": "step"}),
            (2, "StepRetryScheduled", "reserve", "running", "retrying", {"delay": 1.0}),
            (3, "TimerFired", "reserve", None, None, {"timer_id": "reserve#retry1"}),
            (3, "StepStarted", "reserve", "retrying", "running", {"attempt": 2, "kind": "step"}),
            (4, "StepSucceeded", "reserve", "running", "completed"),
            (4, "StepWaiting", "approve", "pending", "waiting", {"attempt": 1}),
            (4, "ExecutionWaiting", None, "running", "waiting"),
            (5, "StepCancelled", "approve", "waiting", "cancelled"),
            (5, "ExecutionCancelled", None, "waiting", "cancelled"),
        ),
        now=at(60),
    )

    assert [lane.key for lane in chart.lanes] == ["reserve", "approve"]
    assert shape(chart, "reserve") == [
        ("attempt", 1, "failed", 1, 2),
        ("retry_delay", None, "running", 2, 3),
        ("attempt", 2, "completed", 3, 4),
    ]
    assert shape(chart, "approve") == [("waiting", 1, "cancelled", 4, 5)]
    assert chart.span == 5  # the execution ended: `now` does not stretch it
    assert not any(b.open for b in chart.bars)


def test_bars_still_open_end_now() -> None:
    chart = gantt_bars(
        timeline(
            started(0),
            (1, "StepStarted", "ocr", "pending", "running", {"attempt": 1}),
            (1, "StepWaiting", "review", "pending", "waiting", {"attempt": 1}),
            (2, "StepStarted", "pay", "pending", "running", {"attempt": 1}),
            (3, "StepRetryScheduled", "pay", "running", "retrying"),
        ),
        now=at(10),
    )

    assert chart.lane("ocr").bars == (Bar("ocr", "attempt", 1, 10, "running", 1, open=True),)
    assert chart.lane("review").bars == (Bar("review", "waiting", 1, 10, "waiting", 1, open=True),)
    assert shape(chart, "pay") == [
        ("attempt", 1, "failed", 2, 3),
        ("retry_delay", None, "retrying", 3, 10),
    ]
    assert chart.span == 10
    root = parse(render_gantt(chart))
    (ocr,) = bars_of(root, "ocr")
    assert ocr.get("class") == "bar kind-attempt status-running open"


def test_a_wait_step_waits_until_its_timer_fires() -> None:
    chart = gantt_bars(
        timeline(
            started(0),
            (0, "StepWaiting", "pause", "pending", "waiting", {"attempt": 1, "purpose": "wait"}),
            (0, "ExecutionWaiting", None, "running", "waiting"),
            (30, "TimerFired", "pause", None, None, {"timer_id": "pause#wait1"}),
            (30, "StepSucceeded", "pause", "waiting", "completed"),
            (30, "ExecutionResumed", None, "waiting", "running"),
            (30, "ExecutionCompleted", None, "running", "completed"),
        ),
        now=at(99),
    )

    assert shape(chart, "pause") == [("waiting", 1, "completed", 0, 30)]


def test_instant_moves_are_marks_not_bars() -> None:
    chart = gantt_bars(
        timeline(
            started(0),
            (
                1,
                "BranchSelected",
                "route",
                "pending",
                "completed",
                {"branch": 0, "selected": ["fast"], "skipped": [["slow", "slow"]]},
            ),
            (1, "StepStarted", "fast", "pending", "running", {"attempt": 1, "cache_key": "k"}),
            (1, "StepServedFromCache", "fast", "running", "completed", {"cache_key": "k"}),
            (2, "StepSkipped", "after", "pending", "skipped", {"reason": "all_success"}),
        ),
        now=at(5),
    )

    assert chart.lane("route").bars == ()
    assert [(m.event, m.status) for m in chart.lane("route").marks] == [
        ("BranchSelected", "completed")
    ]
    assert [(m.event, m.status) for m in chart.lane("slow").marks] == [
        ("BranchSelected", "skipped")
    ]
    assert shape(chart, "fast") == [("attempt", 1, "completed", 1, 1)]  # an instant bar
    assert [m.event for m in chart.lane("fast").marks] == ["StepServedFromCache"]
    assert [(m.event, m.at) for m in chart.lane("after").marks] == [("StepSkipped", 2)]
    root = parse(render_gantt(chart))
    (fast,) = bars_of(root, "fast")
    assert float(fast.get("width") or 0) == 2  # the minimum: still visible
    circles = [(c.get("data-key"), c.get("data-event")) for c in root.iter(f"{NS}circle")]
    assert ("after", "StepSkipped") in circles
    assert all(c.get("class", "").startswith("mark ") for c in root.iter(f"{NS}circle"))


def test_error_handlers_and_rollback_actions_get_lanes_of_their_own() -> None:
    chart = gantt_bars(
        timeline(
            started(0),
            (0, "StepStarted", "pay", "pending", "running", {"attempt": 1}),
            (1, "StepSucceeded", "pay", "running", "completed"),
            (1, "StepStarted", "ship", "pending", "running", {"attempt": 1}),
            (2, "StepFailed", "ship", "running", "failed", {"error": ERROR}),
            (2, "StepStarted", "ship:on_error:fix", "pending", "running", {"kind": "on_error"}),
            (3, "StepFailed", "ship:on_error:fix", "running", "failed", {"error": ERROR}),
            (3, "CompensationStarted", None, "running", "compensating", {"reason": "x"}),
            (
                3,
                "StepStarted",
                "pay:rollback:refund",
                "pending",
                "running",
                {"attempt": 1, "kind": "rollback", "owner": "pay"},
            ),
            (4, "StepRetryScheduled", "pay:rollback:refund", "running", "retrying"),
            (5, "StepStarted", "pay:rollback:refund", "retrying", "running", {"attempt": 2}),
            (6, "StepSucceeded", "pay:rollback:refund", "running", "completed"),
            (6, "StepCompensated", "pay", "completed", "compensated", {"ok": True}),
            (6, "ExecutionFailed", None, "compensating", "failed", {"reason": "x"}),
        ),
        now=at(60),
    )

    assert chart.lane("ship:on_error:fix").role == "on_error"
    assert shape(chart, "ship:on_error:fix") == [("attempt", 1, "failed", 2, 3)]
    rollback = chart.lane("pay:rollback:refund")
    assert rollback.role == "rollback"
    assert shape(chart, "pay:rollback:refund") == [
        ("compensation", 1, "failed", 3, 4),
        ("retry_delay", None, "running", 4, 5),
        ("compensation", 2, "completed", 5, 6),
    ]
    assert [(m.event, m.status) for m in chart.lane("pay").marks] == [
        ("StepCompensated", "compensated")
    ]


def test_a_retried_execution_counts_attempts_on_and_resumes_containers() -> None:
    chart = gantt_bars(
        timeline(
            started(0),
            (0, "StepStarted", "pages", "pending", "running", {"attempt": 1}),
            (0, "StepStarted", "pages[0]/read", "pending", "running", {"attempt": 1}),
            (1, "StepFailed", "pages[0]/read", "running", "failed", {"error": ERROR}),
            (1, "StepFailed", "pages", "running", "failed", {"error": ERROR}),
            (1, "ExecutionFailed", None, "running", "failed", {"reason": "x"}),
            (
                10,
                "ExecutionRetried",
                None,
                "failed",
                "running",
                {"reset": {"pages[0]/read": 1}, "resumed": ["pages"]},
            ),
            (10, "StepStarted", "pages[0]/read", "pending", "running", {"attempt": 2}),
            (11, "StepSucceeded", "pages[0]/read", "running", "completed"),
            (11, "StepSucceeded", "pages", "running", "completed"),
            (11, "ExecutionCompleted", None, "running", "completed"),
        ),
        now=at(60),
    )

    assert shape(chart, "pages") == [
        ("attempt", 1, "failed", 0, 1),
        ("attempt", 1, "completed", 10, 11),
    ]
    assert shape(chart, "pages[0]/read") == [
        ("attempt", 1, "failed", 0, 1),
        ("attempt", 2, "completed", 10, 11),
    ]


def test_no_entries_make_an_empty_chart() -> None:
    chart = gantt_bars([], now=at(0))
    assert chart == GanttChart((), 0.0)
    root = parse(render_gantt(chart))
    assert root.get("class") == "gantt"


# -- the SVG -------------------------------------------------------------------------------


def test_the_svg_has_an_axis_lane_labels_and_bars_as_the_contract_says() -> None:
    chart = gantt_bars(
        timeline(
            started(0),
            (1, "StepStarted", "ocr", "pending", "running", {"attempt": 1}),
            (2, "StepRetryScheduled", "ocr", "running", "retrying"),
            (3, "StepStarted", "ocr", "retrying", "running", {"attempt": 2}),
            (3.41, "StepSucceeded", "ocr", "running", "completed"),
            (4, "ExecutionCompleted", None, "running", "completed"),
        ),
        now=at(60),
    )
    root = parse(render_gantt(chart))

    assert root.tag == f"{NS}svg"
    assert root.get("class") == "gantt"
    (axis,) = [g for g in root.iter(f"{NS}g") if g.get("class") == "axis"]
    ticks = [t.text for t in axis.iter(f"{NS}text")]
    assert ticks[0] == "0 s"
    assert len(ticks) >= 3
    assert all(t is not None and t.endswith(" s") for t in ticks)
    labels = [t.text for t in root.iter(f"{NS}text") if t.get("class") == "lane-label"]
    assert labels == ["ocr"]
    first, delay, second = bars_of(root, "ocr")
    assert first.get("class") == "bar kind-attempt status-failed"
    assert (first.get("data-kind"), first.get("data-status"), first.get("data-attempt")) == (
        "attempt",
        "failed",
        "1",
    )
    assert delay.get("data-kind") == "retry_delay"
    assert delay.get("data-attempt") == ""
    assert second.get("class") == "bar kind-attempt status-completed"
    title = second.find(f"{NS}title")
    assert title is not None
    assert title.text == "attempt 2 of ocr: 0.41 s from +3.00 s, completed"
    # One fixed scale over the execution's whole span: 1 s is a quarter of 4 s.
    widths = [float(r.get("width") or 0) for r in (first, delay, second)]
    assert widths[0] == widths[1]
    assert abs(widths[0] - 900 / 4) < 0.2
    assert float(first.get("x") or 0) < float(delay.get("x") or 0) < float(second.get("x") or 0)


def test_keys_are_escaped_and_long_ones_shortened() -> None:
    long = "invoice_pages[12]/extract_every_line_item_of_the_page"
    chart = gantt_bars(
        timeline(
            started(0),
            (1, "StepStarted", '<script>"x"</script>', "pending", "running"),
            (2, "StepStarted", long, "pending", "running"),
        ),
        now=at(3),
    )
    svg = render_gantt(chart)
    assert "<script" not in svg
    assert "style=" not in svg
    root = parse(svg)
    (bad,) = bars_of(root, '<script>"x"</script>')
    assert bad.get("data-attempt") == "1"  # counted when the event carries no number
    labels = [t for t in root.iter(f"{NS}text") if t.get("class") == "lane-label"]
    assert labels[0].text == '<script>"x"</script>'
    title = labels[1].find(f"{NS}title")
    assert title is not None
    assert title.text == long
    assert title.tail is not None
    assert title.tail.startswith("\u2026")
    assert long.endswith(title.tail[1:])  # the end names the step: it is kept


# -- from a real run -----------------------------------------------------------------------


async def test_a_step_that_fails_once_shows_attempt_retry_delay_attempt() -> None:
    app = FlowledgerApp(env={"PERSISTENCE_MODULE": "eventsourcing.popo"})
    registry = AgentRegistry()
    calls: list[int] = []

    @registry.action("flaky")
    def flaky(data: dict[str, Any]) -> dict[str, Any]:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("not yet")
        return {"ok": True}

    runner = InProcessRunner(registry)
    engine = Engine(app, runner)
    try:
        wf = await engine.register(
            support.workflow(
                {
                    "retry_policy": {"max_retries": 2, "retry_delay": 0.05, "jitter": 0},
                    "steps": [{"step_id": "ocr", "type": "action", "action": "flaky"}],
                }
            )
        )
        eid = await engine.start(wf, {})
        ex = await asyncio.wait_for(engine.wait_settled(eid), 10)
        assert ex.status.value == "completed"
        entries = Queries(app).timeline(eid)
    finally:
        await engine.close()
        runner.close()
        app.close()

    chart = gantt_bars(entries, now=datetime.now(UTC))

    assert [lane.key for lane in chart.lanes] == ["ocr"]
    assert [(b.kind, b.attempt, b.status, b.open) for b in chart.lane("ocr").bars] == [
        ("attempt", 1, "failed", False),
        ("retry_delay", None, "running", False),
        ("attempt", 2, "completed", False),
    ]
    delay = chart.lane("ocr").bars[1]
    assert delay.end - delay.start >= 0.04  # the durable timer's delay
    root = parse(render_gantt(chart))
    assert [r.get("data-kind") for r in bars_of(root, "ocr")] == [
        "attempt",
        "retry_delay",
        "attempt",
    ]
