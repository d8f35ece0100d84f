"""Step caching in the domain: the `cache` option is checked at registration, the key is a
pure function of the step and its input, and a hit is an event that folds and replays."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import pytest
import support

from flowledger.domain import history, progress
from flowledger.domain.caching import CachedResult, cache_key
from flowledger.domain.definitions import ActionStep, WebhookStep, parse_definition
from flowledger.domain.errors import DefinitionInvalid, InvalidTransition
from flowledger.domain.execution import Execution
from flowledger.domain.states import StepStatus
from flowledger.domain.workflow import Workflow

T0 = datetime(2024, 1, 1, tzinfo=UTC)


def action(step_id: str = "a", **fields: Any) -> dict[str, Any]:
    return {"step_id": step_id, "type": "action", "action": "do.it", **fields}


def problems_of(*steps: Any, **fields: Any) -> list[str]:
    doc = {"workflow_id": "wf", "steps": list(steps), **fields}
    with pytest.raises(DefinitionInvalid) as caught:
        parse_definition(doc, "wf.yaml")
    assert caught.value.source == "wf.yaml"
    return caught.value.problems


# -- the definition ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cache", "problem"),
    [
        ({"ttl": 0}, "field 'cache.ttl': input should be greater than 0 (got 0)"),
        ({"ttl": -5}, "field 'cache.ttl': input should be greater than 0 (got -5)"),
        ({"ttl": 10**9}, "field 'cache.ttl': input should be less than or equal to 31622400"),
        ({}, "field 'cache.ttl': required"),
        ({"ttl": 5, "keys": "id"}, "field 'cache.keys': unknown field"),
        ({"ttl": 5, "key": ""}, "field 'cache.key': string should have at least 1 character"),
        (30, "field 'cache': expected a mapping, got int"),
    ],
)
def test_a_bad_cache_option_names_the_step_and_the_field(cache: Any, problem: str) -> None:
    [found] = problems_of(action(cache=cache))
    assert found.startswith(f"step 'a': {problem}"), found


@pytest.mark.parametrize(
    ("key", "problem"),
    [
        ("lenght(id)", "unknown function 'lenght()'; did you mean 'length()'?"),
        ("customer.[", "syntax error at position"),
    ],
)
def test_a_cache_key_expression_is_compiled_at_registration(key: str, problem: str) -> None:
    [found] = problems_of(action(cache={"ttl": 60, "key": key}))
    assert found.startswith(f"step 'a': field 'cache.key': {problem}"), found


def test_only_action_and_webhook_steps_can_be_cached() -> None:
    wait = {"step_id": "w", "type": "wait", "duration": 1, "cache": {"ttl": 60}}
    assert problems_of(wait) == [
        "step 'w': field 'cache': unknown field (extra inputs are not permitted)"
    ]
    webhook = {"step_id": "h", "type": "webhook", "url": "http://x", "cache": {"ttl": 60}}
    defn = parse_definition({"workflow_id": "wf", "steps": [webhook]})
    assert isinstance(defn.steps[0], WebhookStep)
    assert defn.steps[0].cache is not None
    assert defn.steps[0].cache.ttl == 60


def test_handlers_and_steps_with_rollback_actions_cannot_be_cached() -> None:
    handler = action("undo", cache={"ttl": 60})
    assert problems_of(action(error_handlers=["undo"]), handlers=[handler]) == [
        "step 'undo': field 'cache': a handler cannot be served from the cache"
    ]
    [problem] = problems_of(
        action(rollback_actions=["undo"], cache={"ttl": 60}), handlers=[action("undo")]
    )
    assert problem.startswith(
        "step 'a': field 'cache': a step with rollback_actions cannot be served from the cache"
    )


def test_the_cache_option_round_trips_through_the_document() -> None:
    defn = support.workflow({"steps": [action(cache={"ttl": 90, "key": "id"})]})
    assert parse_definition(defn.to_document()) == defn
    assert defn.to_document()["steps"][0]["cache"] == {"ttl": 90.0, "key": "id"}


# -- the key ----------------------------------------------------------------------------------


def step(**fields: Any) -> ActionStep:
    found = support.workflow({"steps": [action(**fields)]}).steps[0]
    assert isinstance(found, ActionStep)
    return found


def test_the_key_is_a_sha256_of_the_step_and_its_input_whatever_the_key_order() -> None:
    cached = step(cache={"ttl": 60})
    one = cache_key("wf", cached, {"a": 1, "b": {"x": [1, 2], "y": None}})
    two = cache_key("wf", cached, {"b": {"y": None, "x": [1, 2]}, "a": 1})
    assert one == two
    assert one is not None
    assert len(one) == 64
    assert int(one, 16) >= 0
    assert cache_key("wf", cached, {"a": 1, "b": {"x": [2, 1], "y": None}}) != one


def test_the_key_names_the_workflow_the_step_and_what_it_does() -> None:
    data = {"id": 7}
    base = cache_key("wf", step(cache={"ttl": 60}), data)
    assert cache_key("other", step(cache={"ttl": 60}), data) != base
    assert cache_key("wf", step(action="do.other", cache={"ttl": 60}), data) != base
    renamed = support.workflow({"steps": [action("b", cache={"ttl": 60})]}).steps[0]
    assert isinstance(renamed, ActionStep)
    assert cache_key("wf", renamed, data) != base
    # The TTL is how long a result serves, not what it is: it does not change the key.
    assert cache_key("wf", step(cache={"ttl": 5}), data) == base


def test_a_webhook_key_names_its_method_url_and_headers() -> None:
    def hook(**fields: Any) -> WebhookStep:
        doc = {"step_id": "h", "type": "webhook", "url": "http://x/a", "cache": {"ttl": 60}}
        found = support.workflow({"steps": [{**doc, **fields}]}).steps[0]
        assert isinstance(found, WebhookStep)
        return found

    base = cache_key("wf", hook(), {})
    assert cache_key("wf", hook(), {}) == base
    assert cache_key("wf", hook(method="PUT"), {}) != base
    assert cache_key("wf", hook(url="http://x/b"), {}) != base
    assert cache_key("wf", hook(headers={"Accept-Language": "fr"}), {}) != base


def test_a_key_expression_narrows_what_counts_as_the_same_input() -> None:
    keyed = step(cache={"ttl": 60, "key": "customer.id"})
    first = cache_key("wf", keyed, {"customer": {"id": 1, "name": "Ada"}, "at": "09:00"})
    again = cache_key("wf", keyed, {"customer": {"id": 1, "name": "Ada L."}, "at": "10:00"})
    other = cache_key("wf", keyed, {"customer": {"id": 2, "name": "Ada"}, "at": "09:00"})
    assert first == again != other


def test_a_step_without_cache_or_with_a_null_key_has_no_key() -> None:
    assert cache_key("wf", step(), {"id": 1}) is None
    assert cache_key("wf", step(cache={"ttl": 60, "key": "missing"}), {"id": 1}) is None


# -- the event --------------------------------------------------------------------------------

DOC = {
    "workflow_id": "cached",
    "version": "1",
    "steps": [
        action("a", cache={"ttl": 60}, output_mapping={"total": "sum"}),
        action("b", dependencies=["a"]),
    ],
}


def _started(doc: dict[str, Any] = DOC) -> tuple[Execution, Workflow, progress.Dispatch]:
    wf = Workflow(support.workflow(doc))
    ex = Execution.begin(UUID(int=5), "cached", "1", {"n": 2}, None, 7, T0 + timedelta(hours=1), T0)
    [dispatch] = progress.advance(ex, wf, T0).dispatches
    return ex, wf, dispatch


def _hit(dispatch: progress.Dispatch, result: dict[str, Any] | None = None) -> CachedResult:
    assert dispatch.cache_key is not None
    return CachedResult(
        cache_key=dispatch.cache_key,
        result=result if result is not None else {"sum": 3},
        source_execution_id=str(UUID(int=1)),
        source_step_key="a",
        cached_at=T0 - timedelta(seconds=30),
    )


def _fold(events: list[Any]) -> Execution:
    aggregate: Any = None
    for event in events:
        aggregate = event.mutate(aggregate)
    assert isinstance(aggregate, Execution)
    return aggregate


def test_a_cached_steps_attempt_is_dispatched_with_its_key_recorded_on_its_start() -> None:
    ex, _, dispatch = _started()
    started = [e for e in ex.pending_events if type(e).__name__ == "StepStarted"]
    assert dispatch.cache_key == cache_key("cached", dispatch.step, {"n": 2})
    assert [e.cache_key for e in started] == [dispatch.cache_key]
    assert ex.steps["a"].cache_key == dispatch.cache_key


def test_a_hit_completes_the_step_with_its_output_mapping_and_its_source() -> None:
    ex, wf, dispatch = _started()
    assert progress.serve_from_cache(ex, wf, "a", dispatch.attempt_id, _hit(dispatch), T0)
    record = ex.steps["a"]
    assert record.status is StepStatus.COMPLETED
    assert record.result == {"sum": 3}
    assert record.agent is None
    assert record.cached_from == {
        "execution_id": str(UUID(int=1)),
        "step_key": "a",
        "cached_at": (T0 - timedelta(seconds=30)).isoformat(),
    }
    assert ex.data == {"n": 2, "total": 3}
    served = [e for e in ex.pending_events if type(e).__name__ == "StepServedFromCache"]
    assert [(e.attempt_id, e.patch, e.cache_key) for e in served] == [
        (dispatch.attempt_id, {"total": 3}, dispatch.cache_key)
    ]
    # The step that depends on it starts, as after a success.
    assert [d.key for d in progress.advance(ex, wf, T0).dispatches] == ["b"]


def test_a_hit_for_an_attempt_that_is_not_current_records_nothing() -> None:
    ex, wf, dispatch = _started()
    version = ex.version
    assert not progress.serve_from_cache(ex, wf, "a", "someone/else/1", _hit(dispatch), T0)
    wrong = CachedResult("0" * 64, {"sum": 1}, "x", "a", T0)
    assert not progress.serve_from_cache(ex, wf, "a", dispatch.attempt_id, wrong, T0)
    assert ex.version == version
    with pytest.raises(InvalidTransition):
        ex.serve_from_cache("a", {}, {}, "0" * 64, "x", "a", T0, T0)
    assert progress.succeed_attempt(ex, wf, "a", dispatch.attempt_id, {"sum": 1}, T0)
    assert not progress.serve_from_cache(ex, wf, "a", dispatch.attempt_id, _hit(dispatch), T0)


def test_a_hit_whose_result_the_output_mapping_cannot_read_fails_the_step() -> None:
    doc = copy.deepcopy(DOC)
    doc["steps"][0]["output_mapping"] = {"total": "abs(sum)"}
    ex, wf, dispatch = _started(doc)
    assert progress.serve_from_cache(
        ex, wf, "a", dispatch.attempt_id, _hit(dispatch, {"sum": "three"}), T0
    )
    error = ex.steps["a"].error
    assert ex.steps["a"].status is StepStatus.FAILED
    assert error is not None
    assert error["type"] == "ExpressionError"
    assert f"served from the cache: execution {UUID(int=1)} step a" in error["message"]


def test_a_key_expression_that_fails_fails_the_step_before_it_runs() -> None:
    doc = copy.deepcopy(DOC)
    # Compiles, but abs() of null is a type error when it runs: a failure, not a miss.
    doc["steps"][0]["cache"] = {"ttl": 60, "key": "abs(missing)"}
    wf = Workflow(support.workflow(doc))
    ex = Execution.begin(UUID(int=6), "cached", "1", {"n": 2}, None, 7, T0 + timedelta(hours=1), T0)
    advanced = progress.advance(ex, wf, T0)
    assert advanced.dispatches == []
    error = ex.steps["a"].error
    assert ex.steps["a"].status is StepStatus.FAILED
    assert error is not None
    assert error["type"] == "ExpressionError"
    assert error["message"].startswith("cache.key: ")
    assert not error["retryable"]


def test_a_history_with_a_hit_folds_through_the_tables_and_replays_exactly() -> None:
    ex, wf, dispatch = _started()
    assert progress.serve_from_cache(ex, wf, "a", dispatch.attempt_id, _hit(dispatch), T0)
    [b] = progress.advance(ex, wf, T0).dispatches
    assert progress.succeed_attempt(ex, wf, "b", b.attempt_id, {}, T0)
    progress.advance(ex, wf, T0)
    events = list(ex.collect_events())
    rebuilt = _fold(events)
    assert rebuilt.steps == ex.steps
    assert rebuilt.data == ex.data
    assert rebuilt.status == ex.status
    folded = history.fold(events)
    assert folded.violations == []
    [served] = [t for t in folded.transitions if t.event_type == "StepServedFromCache"]
    assert (served.key, served.before, served.after) == ("a", "running", "completed")
    assert served.note == f"from cache: execution {UUID(int=1)} step a"


def test_a_start_recorded_before_step_caching_existed_folds() -> None:
    ex, wf, dispatch = _started()
    assert progress.succeed_attempt(ex, wf, "a", dispatch.attempt_id, {"sum": 1}, T0)
    old = []
    for event in ex.collect_events():
        event = copy.copy(event)
        if hasattr(event, "cache_key"):
            object.__delattr__(event, "cache_key")  # as stored by an earlier version
        old.append(event)
    folded = _fold(old)
    assert folded.steps["a"].status is StepStatus.COMPLETED
    assert folded.steps["a"].cache_key is None
