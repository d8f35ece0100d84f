"""Why an attempt went to its agent (`route`) is recorded on its outcome event, shown in the
execution document and the timeline, and a history stored before routes existed folds (as
None). The engine takes the route from the runner's answer, its failure, or (a timeout)
from the runner afterwards."""

from __future__ import annotations

import asyncio
import copy
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import support

from flowledger.adapters.render import steps_table
from flowledger.domain import progress
from flowledger.domain.execution import Execution
from flowledger.domain.history import fold
from flowledger.domain.workflow import Workflow
from flowledger.services.app import FlowledgerApp
from flowledger.services.documents import execution_document
from flowledger.services.engine import Engine
from flowledger.services.ports import AttemptFailed, Ran

T0 = datetime(2024, 1, 1, tzinfo=UTC)
DOC = {
    "workflow_id": "routes",
    "version": "1",
    "retry_policy": {"max_retries": 2, "retry_delay": 0.01, "jitter": 0},
    "steps": [{"step_id": "a", "type": "action", "action": "x", "timeout": 0.3}],
}


def _started() -> tuple[Execution, Workflow, list[Any], progress.Dispatch]:
    wf = Workflow(support.workflow(DOC))
    ex = Execution.begin(UUID(int=5), "routes", "1", {}, None, 7, T0 + timedelta(hours=1), T0)
    [dispatch] = progress.advance(ex, wf, T0).dispatches
    return ex, wf, list(ex.collect_events()), dispatch


def _fold(events: list[Any]) -> Execution:
    aggregate: Any = None
    for event in events:
        aggregate = event.mutate(aggregate)
    assert isinstance(aggregate, Execution)
    return aggregate


def test_the_route_is_on_the_retry_and_on_the_success_and_in_the_document() -> None:
    ex, wf, log, first = _started()
    lost = "best of 2: p50 0.05 s, 0% failed, 1 in flight (slow: p50 0.50 s)"
    assert progress.fail_attempt(
        ex, wf, "a", first.attempt_id, "AgentLost", "gone", True, T0, "fast", lost
    )
    [retry] = list(ex.collect_events())
    assert (retry.agent, retry.route) == ("fast", lost)
    [second] = progress.advance(ex, wf, T0 + timedelta(seconds=1)).dispatches
    failover = "failover: fast stopped sending heartbeats; only agent: p50 0.50 s"
    assert progress.succeed_attempt(ex, wf, "a", second.attempt_id, {}, T0, "slow", failover)
    events = [*log, retry, *ex.collect_events()]
    [succeeded] = [e for e in events if type(e).__name__ == "StepSucceeded"]
    assert succeeded.route == failover
    folded = _fold(events)
    assert (folded.steps["a"].agent, folded.steps["a"].route) == ("slow", failover)

    doc = execution_document(folded, wf)
    assert doc["steps"]["a"]["route"] == failover
    notes = [str(cell) for cell in steps_table(doc).columns[-1].cells]
    assert notes[0].startswith(f"on agent slow ({failover})")
    timeline = {t.event_type: t.note for t in fold(events).transitions if t.key == "a"}
    assert timeline["StepRetryScheduled"] == f"retry in 0.01s; on agent fast ({lost})"
    assert timeline["StepSucceeded"] == f"on agent slow ({failover})"


def test_a_failure_for_good_keeps_its_route() -> None:
    ex, wf, _, first = _started()
    assert progress.fail_attempt(ex, wf, "a", first.attempt_id, "Boom", "no", False, T0, "b", "r")
    assert (ex.steps["a"].status.value, ex.steps["a"].route) == ("failed", "r")


def test_an_outcome_stored_before_routes_existed_folds() -> None:
    ex, wf, log, dispatch = _started()
    assert progress.succeed_attempt(ex, wf, "a", dispatch.attempt_id, {}, T0, "a1", "why")
    old = []
    for event in log + list(ex.collect_events()):
        event = copy.copy(event)
        if hasattr(event, "route"):
            object.__delattr__(event, "route")  # as stored by an earlier version
        old.append(event)
    folded = _fold(old)
    assert (folded.steps["a"].agent, folded.steps["a"].route) == ("a1", None)
    assert "route" not in execution_document(folded)["steps"]["a"]


class RoutingRunner:
    """A fake remote runner: the first attempt times out on "slow", the second is lost on
    "fast", the third succeeds on "slow"."""

    def __init__(self) -> None:
        self.calls = 0
        self.timed_out: set[str] = set()

    def offers(self, action: str) -> bool:
        return True

    def agent_for(self, dispatch: Any) -> str | None:
        return "slow" if dispatch.attempt_id in self.timed_out else "remote:x"

    def route_for(self, dispatch: Any) -> str | None:
        return "exploring: slow" if dispatch.attempt_id in self.timed_out else None

    async def run(self, dispatch: Any) -> dict[str, Any] | Ran:
        self.calls += 1
        if self.calls == 1:
            self.timed_out.add(dispatch.attempt_id)
            await asyncio.sleep(10)
        if self.calls == 2:
            raise AttemptFailed("AgentLost", "fast went silent", True, agent="fast", route="best")
        return Ran({"ok": True}, "slow", "failover: fast went silent; only agent")


async def test_the_engine_records_each_attempt_s_agent_and_route() -> None:
    app = FlowledgerApp(env={"PERSISTENCE_MODULE": "eventsourcing.popo"})
    engine = Engine(app, RoutingRunner())
    try:
        wf = await engine.register(support.workflow(DOC))
        eid = await engine.start(wf, {})
        ex = await asyncio.wait_for(engine.wait_settled(eid), 10)
        assert ex.status.value == "completed"
        ended = [
            (type(e).__name__, e.agent, e.route)
            for e in support.events_of(app, eid)
            if type(e).__name__ in ("StepRetryScheduled", "StepSucceeded")
        ]
        assert ended == [
            ("StepRetryScheduled", "slow", "exploring: slow"),
            ("StepRetryScheduled", "fast", "best"),
            ("StepSucceeded", "slow", "failover: fast went silent; only agent"),
        ]
    finally:
        await engine.close()
        app.close()
