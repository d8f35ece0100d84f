"""The pure planner with a fixed clock: trigger rules, branches, compensation order, purity."""

from __future__ import annotations

import contextlib
import copy
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import pytest
import support
from hypothesis import given, settings
from hypothesis import strategies as st

from flowledger.adapters.files import load_definition_file
from flowledger.domain import progress
from flowledger.domain.errors import InputInvalid, InvalidTransition
from flowledger.domain.execution import Execution
from flowledger.domain.planner import (
    Abort,
    Decision,
    Plan,
    SkipStep,
    StartStep,
    plan,
)
from flowledger.domain.progress import Dispatch
from flowledger.domain.states import ExecutionStatus, StepStatus
from flowledger.domain.workflow import Workflow

E, S = ExecutionStatus, StepStatus
NOW = datetime(2024, 1, 1, tzinfo=UTC)
ERROR = {"type": "Boom", "message": "x", "retryable": False}


def compile_(doc: dict[str, Any]) -> Workflow:
    return Workflow(support.workflow(doc))


def begin(wf: Workflow, data: dict[str, Any] | None = None, seed: int = 1) -> Execution:
    return Execution.begin(
        UUID(int=seed),
        wf.workflow_id,
        wf.version,
        data or {},
        None,
        seed,
        NOW + timedelta(seconds=wf.definition.timeout),
        NOW,
    )


def state(ex: Execution) -> dict[str, Any]:
    return {k: v for k, v in vars(ex).items() if k != "_pending_events"}


def decisions_for(p: Plan, key: str) -> list[Decision]:
    return [d for d in p.decisions if getattr(d, "key", None) == key]


# -- trigger rules -------------------------------------------------------------------------

# How a dependency ends up, set straight on the aggregate.
C, F, SK, R, X = "completed", "failed", "skipped", "running", "cancelled"


def _put(ex: Execution, key: str, outcome: str) -> None:
    if outcome == SK:
        ex.skip_step(key, key, "", "not taken", NOW)
        return
    ex.start_step(key, key, "", {}, NOW)
    if outcome == C:
        ex.succeed_step(key, {"ok": True}, {key: {"ok": True}}, NOW)
    elif outcome == F:
        ex.fail_step(key, ERROR, NOW)
    elif outcome == X:
        ex.cancel_step(key, "stopped", NOW)


def _verdict(rule: str, outcomes: tuple[str, ...]) -> str:
    """What the planner decides for a step depending on steps that ended as `outcomes`."""
    deps = [f"d{i}" for i in range(len(outcomes))]
    wf = compile_(
        {
            # continue_on_failure: a failed dependency does not fail the execution.
            "retry_policy": {"max_retries": 0, "continue_on_failure": True},
            "steps": [
                *({"step_id": d, "type": "action", "action": "x"} for d in deps),
                {
                    "step_id": "c",
                    "type": "action",
                    "action": "x",
                    "dependencies": deps,
                    "trigger_rule": rule,
                },
            ],
        }
    )
    ex = begin(wf)
    for dep, outcome in zip(deps, outcomes, strict=True):
        _put(ex, dep, outcome)
    p = plan(ex, wf, NOW)
    assert not any(isinstance(d, Abort) for d in p.decisions)
    found = decisions_for(p, "c")
    if not found:
        return "wait"
    (decision,) = found
    return "run" if isinstance(decision, StartStep) else "skip"


# (rule, dependency outcomes, what the planner may decide). Two answers where the contract
# allows either: skipping early once the rule can no longer be met, or waiting for the rest.
TRIGGER_TABLE: list[tuple[str, tuple[str, ...], set[str]]] = [
    ("all_success", (C, C), {"run"}),
    ("all_success", (C, F), {"skip"}),
    ("all_success", (C, SK), {"skip"}),
    ("all_success", (C, X), {"skip"}),
    ("all_success", (C, R), {"wait"}),
    ("all_success", (F, R), {"skip", "wait"}),
    ("all_success", (SK, R), {"skip", "wait"}),
    ("none_failed", (C, C), {"run"}),
    ("none_failed", (C, SK), {"run"}),
    ("none_failed", (SK, SK), {"skip"}),
    ("none_failed", (C, F), {"skip"}),
    ("none_failed", (SK, X), {"skip"}),
    ("none_failed", (C, R), {"wait"}),
    ("none_failed", (SK, R), {"wait"}),
    ("none_failed", (F, R), {"skip", "wait"}),
    ("all_done", (C, C), {"run"}),
    ("all_done", (C, F), {"run"}),
    ("all_done", (F, F), {"run"}),
    ("all_done", (SK, SK), {"run"}),
    ("all_done", (X, SK), {"run"}),
    ("all_done", (C, R), {"wait"}),
    ("all_done", (F, R), {"wait"}),
    ("one_success", (C, R), {"run"}),
    ("one_success", (C, F), {"run"}),
    ("one_success", (SK, C), {"run"}),
    ("one_success", (F, F), {"skip"}),
    ("one_success", (SK, SK), {"skip"}),
    ("one_success", (X, F), {"skip"}),
    ("one_success", (F, R), {"wait"}),
    ("one_success", (R, R), {"wait"}),
]


@pytest.mark.parametrize(("rule", "outcomes", "allowed"), TRIGGER_TABLE)
def test_trigger_rule_table(rule: str, outcomes: tuple[str, ...], allowed: set[str]) -> None:
    assert _verdict(rule, outcomes) in allowed


def _oracle(rule: str, outcomes: tuple[str, ...]) -> set[str]:
    """The trigger rules as the contract words them."""
    done = R not in outcomes
    ok = outcomes.count(C)
    bad = outcomes.count(F) + outcomes.count(X)
    skipped = outcomes.count(SK)
    if rule == "one_success":
        return {"run"} if ok else ({"skip"} if done else {"wait"})
    if rule == "all_done":
        return {"run"} if done else {"wait"}
    if rule == "all_success":
        if ok == len(outcomes):
            return {"run"}
        if bad or skipped:
            return {"skip"} if done else {"skip", "wait"}
        return {"wait"}
    # none_failed: succeeded or skipped, at least one succeeded
    if not done:
        return {"skip", "wait"} if bad else {"wait"}
    if bad:
        return {"skip"}
    return {"run"} if ok else {"skip"}


@settings(max_examples=150, deadline=None)
@given(
    st.sampled_from(["all_success", "none_failed", "all_done", "one_success"]),
    st.lists(st.sampled_from([C, F, SK, R, X]), min_size=1, max_size=4).map(tuple),
)
def test_trigger_rules_follow_the_contract(rule: str, outcomes: tuple[str, ...]) -> None:
    assert _verdict(rule, outcomes) in _oracle(rule, outcomes)


def test_a_step_without_dependencies_starts_at_once() -> None:
    wf = compile_({"steps": [{"step_id": "a", "type": "action", "action": "x"}]})
    assert plan(begin(wf), wf, NOW).decisions == [StartStep("a", "a", "")]


# -- branches ------------------------------------------------------------------------------

BRANCHING = {
    "retry_policy": {"max_retries": 0},
    "steps": [
        {
            "step_id": "route",
            "type": "condition",
            "conditions": [{"expression": "flag", "steps": ["yes"]}],
            "else_steps": ["no"],
        },
        {"step_id": "yes", "type": "action", "action": "x"},
        {"step_id": "no", "type": "action", "action": "x"},
        {"step_id": "after_yes", "type": "action", "action": "x", "dependencies": ["yes"]},
        {"step_id": "after_no", "type": "action", "action": "x", "dependencies": ["no"]},
        {
            "step_id": "join",
            "type": "action",
            "action": "x",
            "dependencies": ["yes", "no"],
            "trigger_rule": "none_failed",
        },
        {"step_id": "strict", "type": "action", "action": "x", "dependencies": ["yes", "no"]},
    ],
}


@pytest.mark.parametrize("flag", [True, False])
def test_the_branch_not_taken_is_skipped_and_skipping_flows_by_trigger_rule(flag: bool) -> None:
    wf = compile_(BRANCHING)
    ex = begin(wf, {"flag": flag})
    taken, other = ("yes", "no") if flag else ("no", "yes")
    (d,) = progress.advance(ex, wf, NOW).dispatches
    assert d.key == taken
    assert ex.steps["route"].status is S.COMPLETED
    assert ex.data["route"] == {"branch": 0 if flag else "else", "selected": [taken]}
    assert ex.step_status(other) is S.SKIPPED
    assert ex.step_status(f"after_{other}") is S.SKIPPED
    assert ex.step_status("strict") is S.SKIPPED
    assert ex.step_status("join") is S.PENDING  # waits for the branch taken
    assert progress.succeed_attempt(ex, wf, d.key, d.attempt_id, {"v": 1}, NOW)
    started = {d.key for d in progress.advance(ex, wf, NOW).dispatches}
    assert started == {f"after_{taken}", "join"}


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 4))
def test_the_first_true_condition_wins_and_every_other_target_is_skipped(k: int) -> None:
    wf = compile_(
        {
            "steps": [
                {
                    "step_id": "route",
                    "type": "condition",
                    "conditions": [
                        {"expression": "k > `2`", "steps": ["big"]},
                        {"expression": "k > `0`", "steps": ["small", "also_small"]},
                    ],
                    "else_steps": ["zero"],
                },
                {"step_id": "big", "type": "action", "action": "x"},
                {"step_id": "small", "type": "action", "action": "x"},
                {"step_id": "also_small", "type": "action", "action": "x"},
                {"step_id": "zero", "type": "action", "action": "x"},
            ]
        }
    )
    ex = begin(wf, {"k": k})
    started = {d.key for d in progress.advance(ex, wf, NOW).dispatches}
    selected = {"big"} if k > 2 else ({"small", "also_small"} if k > 0 else {"zero"})
    assert started == selected
    targets = {"big", "small", "also_small", "zero"}
    assert {t for t in targets if ex.step_status(t) is S.SKIPPED} == targets - selected


@pytest.mark.parametrize("flag", [True, False])
@pytest.mark.parametrize("route_after", ["a", "b"])
def test_a_branch_target_waits_for_its_condition_whatever_its_trigger_rule(
    flag: bool, route_after: str
) -> None:
    # t's other dependency (a) succeeding must not start it before route has chosen:
    # route decides in the same plan (route_after a) or later (route_after b).
    wf = compile_(
        {
            "steps": [
                {"step_id": "a", "type": "action", "action": "x"},
                {"step_id": "b", "type": "action", "action": "x"},
                {
                    "step_id": "route",
                    "type": "condition",
                    "dependencies": [route_after],
                    "conditions": [{"expression": "flag", "steps": ["t"]}],
                },
                {
                    "step_id": "t",
                    "type": "action",
                    "action": "x",
                    "dependencies": ["a"],
                    "trigger_rule": "one_success",
                },
            ]
        }
    )
    ex = begin(wf, {"flag": flag})
    first = {d.key: d for d in progress.advance(ex, wf, NOW).dispatches}
    assert progress.succeed_attempt(ex, wf, "a", first["a"].attempt_id, {}, NOW)
    started = {d.key: d for d in progress.advance(ex, wf, NOW).dispatches}
    if route_after == "b":
        assert "t" not in started, "t started before its condition chose a branch"
    assert progress.succeed_attempt(ex, wf, "b", first["b"].attempt_id, {}, NOW)
    started |= {d.key: d for d in progress.advance(ex, wf, NOW).dispatches}
    if flag:
        assert set(started) == {"t"}
        assert progress.succeed_attempt(ex, wf, "t", started["t"].attempt_id, {}, NOW)
        progress.advance(ex, wf, NOW)
    else:
        assert started == {}
        assert ex.step_status("t") is S.SKIPPED
    assert ex.status is E.COMPLETED


@pytest.mark.parametrize("flag", [True, False])
def test_a_branch_target_whose_other_dependency_failed_is_skipped_once(flag: bool) -> None:
    # x fails: t (all_success) can no longer run, and route decides in the same plan.
    wf = compile_(
        {
            "steps": [
                {
                    "step_id": "x",
                    "type": "action",
                    "action": "x",
                    "retry_policy": {"max_retries": 0, "continue_on_failure": True},
                },
                {
                    "step_id": "route",
                    "type": "condition",
                    "dependencies": ["x"],
                    "trigger_rule": "all_done",
                    "conditions": [{"expression": "flag", "steps": ["t"]}],
                },
                {"step_id": "t", "type": "action", "action": "x", "dependencies": ["x"]},
            ]
        }
    )
    ex = begin(wf, {"flag": flag})
    (d,) = progress.advance(ex, wf, NOW).dispatches
    assert progress.fail_attempt(ex, wf, "x", d.attempt_id, "Boom", "x", False, NOW)
    assert progress.advance(ex, wf, NOW).dispatches == []
    assert ex.step_status("t") is S.SKIPPED
    assert ex.status is E.COMPLETED


def test_skipping_is_decided_by_the_planner_without_recording() -> None:
    wf = compile_(BRANCHING)
    ex = begin(wf, {"flag": True})
    ex.skip_step("yes", "yes", "", "test", NOW)
    p = plan(ex, wf, NOW)
    assert SkipStep("after_yes", "after_yes", "", "all_success: yes skipped") in p.decisions
    assert ex.step_status("after_yes") is S.PENDING


# -- compensation ----------------------------------------------------------------------------


def _compensating_workflow(names: list[str]) -> Workflow:
    return compile_(
        {
            "retry_policy": {"max_retries": 0},
            "handlers": [
                {"step_id": "undo", "type": "action", "action": "undo"},
                {"step_id": "notify", "type": "action", "action": "notify"},
            ],
            "steps": [
                *(
                    {
                        "step_id": n,
                        "type": "action",
                        "action": "x",
                        "rollback_actions": ["undo", "notify"],
                    }
                    for n in names
                ),
                {"step_id": "last", "type": "action", "action": "x", "dependencies": names},
            ],
        }
    )


def _run_rollbacks(ex: Execution, wf: Workflow, fail: frozenset[str] = frozenset()) -> list[str]:
    """Answer rollback attempts one by one (failing those in `fail`); the keys in order."""
    order: list[str] = []
    for _ in range(100):
        dispatches = progress.advance(ex, wf, NOW).dispatches
        if not dispatches:
            return order
        assert len(dispatches) == 1, "rollbacks run one at a time"
        (d,) = dispatches
        order.append(d.key)
        if d.key in fail:
            assert progress.fail_attempt(ex, wf, d.key, d.attempt_id, "Boom", "x", False, NOW)
        else:
            assert progress.succeed_attempt(ex, wf, d.key, d.attempt_id, {}, NOW)
    raise AssertionError("compensation did not end")


@settings(max_examples=100, deadline=None)
@given(st.permutations(["a", "b", "c", "d"]), st.sampled_from(["fail", "cancel", "timeout"]))
def test_rollback_runs_in_reverse_completion_order(completion: list[str], how: str) -> None:
    wf = _compensating_workflow(["a", "b", "c", "d"])
    ex = begin(wf)
    dispatches = {d.key: d for d in progress.advance(ex, wf, NOW).dispatches}
    assert set(dispatches) == {"a", "b", "c", "d"}
    for key in completion:
        d = dispatches[key]
        assert progress.succeed_attempt(ex, wf, key, d.attempt_id, {"done": key}, NOW)
    (last,) = progress.advance(ex, wf, NOW).dispatches
    when = NOW
    if how == "fail":
        assert progress.fail_attempt(ex, wf, "last", last.attempt_id, "Boom", "x", False, NOW)
    elif how == "cancel":
        progress.cancel(ex, wf, "by request", NOW)
    else:
        when = ex.deadline
    assert progress.advance(ex, wf, when).dispatches  # the first rollback
    reverse = list(reversed(completion))
    assert ex.compensation is not None
    assert ex.compensation.plan == [(k, ["undo", "notify"]) for k in reverse]
    assert ex.status is E.COMPENSATING
    # Replay what is left: the first rollback is already dispatched; answer them in turn.
    first = ex.steps[f"{reverse[0]}:rollback:undo"]
    assert progress.succeed_attempt(ex, wf, first.key, first.attempt_id, {}, when)
    rest = _run_rollbacks(ex, wf)
    keys = [f"{reverse[0]}:rollback:undo", *rest]
    assert keys == [f"{k}:rollback:{h}" for k in reverse for h in ("undo", "notify")]
    assert ex.steps[keys[0]].input["result"] == {"done": reverse[0]}
    final = {"fail": E.FAILED, "cancel": E.CANCELLED, "timeout": E.TIMED_OUT}[how]
    assert ex.status is final
    assert all(ex.step_status(k) is S.COMPENSATED for k in completion)


def test_a_rollback_action_receives_the_steps_input_and_result() -> None:
    wf = _compensating_workflow(["a", "b"])
    ex = begin(wf, {"order": 7})
    ds = {d.key: d for d in progress.advance(ex, wf, NOW).dispatches}
    assert ds["a"].input == {"order": 7}
    assert progress.succeed_attempt(ex, wf, "a", ds["a"].attempt_id, {"done": "a"}, NOW)
    assert progress.succeed_attempt(ex, wf, "b", ds["b"].attempt_id, {"done": "b"}, NOW)
    (last,) = progress.advance(ex, wf, NOW).dispatches
    assert progress.fail_attempt(ex, wf, "last", last.attempt_id, "Boom", "x", False, NOW)
    (undo_b,) = progress.advance(ex, wf, NOW).dispatches
    assert progress.succeed_attempt(ex, wf, undo_b.key, undo_b.attempt_id, {}, NOW)
    (notify_b,) = progress.advance(ex, wf, NOW).dispatches
    assert progress.succeed_attempt(ex, wf, notify_b.key, notify_b.attempt_id, {}, NOW)
    (undo_a,) = progress.advance(ex, wf, NOW).dispatches
    assert undo_a.key == "a:rollback:undo"
    # The input a ran with, not the data as it is when the rollback runs.
    assert undo_a.input == {
        "step_id": "a",
        "key": "a",
        "input": {"order": 7},
        "result": {"done": "a"},
    }


def test_a_failed_rollback_is_reported_and_the_other_steps_are_still_compensated() -> None:
    wf = _compensating_workflow(["a", "b"])
    ex = begin(wf)
    for d in progress.advance(ex, wf, NOW).dispatches:
        assert progress.succeed_attempt(ex, wf, d.key, d.attempt_id, {}, NOW)
    (last,) = progress.advance(ex, wf, NOW).dispatches
    assert progress.fail_attempt(ex, wf, "last", last.attempt_id, "Boom", "x", False, NOW)
    order = _run_rollbacks(ex, wf, fail=frozenset({"b:rollback:undo"}))
    # b's undo failed: its notify does not run, a is still rolled back.
    assert order == ["b:rollback:undo", "a:rollback:undo", "a:rollback:notify"]
    assert ex.status is E.FAILED
    assert ex.step_status("b") is S.COMPLETED
    assert ex.step_status("a") is S.COMPENSATED
    assert ex.reason is not None
    assert ex.reason.endswith("compensation failed for b")


def test_only_completed_steps_with_rollback_actions_are_compensated() -> None:
    wf = compile_(
        {
            "retry_policy": {"max_retries": 0},
            "handlers": [{"step_id": "undo", "type": "action", "action": "undo"}],
            "steps": [
                {"step_id": "a", "type": "action", "action": "x", "rollback_actions": ["undo"]},
                {"step_id": "b", "type": "action", "action": "x"},
                {"step_id": "c", "type": "action", "action": "x", "rollback_actions": ["undo"]},
            ],
        }
    )
    ex = begin(wf)
    ds = {d.key: d for d in progress.advance(ex, wf, NOW).dispatches}
    assert progress.succeed_attempt(ex, wf, "a", ds["a"].attempt_id, {}, NOW)
    assert progress.succeed_attempt(ex, wf, "b", ds["b"].attempt_id, {}, NOW)
    assert progress.fail_attempt(ex, wf, "c", ds["c"].attempt_id, "Boom", "x", False, NOW)
    assert _run_rollbacks(ex, wf) == ["a:rollback:undo"]
    assert ex.status is E.FAILED


# -- purity ----------------------------------------------------------------------------------

EXAMPLE = Workflow(load_definition_file(support.EXAMPLES / "document_processing.yaml"))
SMALL = compile_(
    {
        "timeout": 600,
        "max_parallel_steps": 2,
        "retry_policy": {"max_retries": 2, "retry_delay": 1.0, "non_retryable_errors": []},
        "handlers": [
            {"step_id": "fix", "type": "action", "action": "fix"},
            {"step_id": "ask", "type": "human_task", "timeout": 60},
            {"step_id": "undo", "type": "action", "action": "undo"},
        ],
        "steps": [
            {"step_id": "a", "type": "action", "action": "x", "rollback_actions": ["undo"]},
            {
                "step_id": "fan",
                "type": "parallel",
                "dependencies": ["a"],
                "parallel_failure_threshold": 0.5,
                "max_concurrency": 2,
                "parallel_steps": [
                    {"step_id": "p1", "type": "action", "action": "x"},
                    {"step_id": "p2", "type": "webhook", "url": "http://h.invalid/"},
                    {"step_id": "p3", "type": "wait", "duration": 5},
                ],
            },
            {
                "step_id": "each",
                "type": "loop",
                "for_each": "items",
                "max_concurrency": 2,
                "steps": [
                    {"step_id": "body", "type": "action", "action": "x", "error_handlers": ["fix"]}
                ],
            },
            {
                "step_id": "again",
                "type": "loop",
                "loop_condition": "_.iteration < `2`",
                "steps": [{"step_id": "turn", "type": "action", "action": "x"}],
            },
            {
                "step_id": "review",
                "type": "human_task",
                "dependencies": ["fan"],
                "timeout": 30,
                "error_handlers": ["ask"],
            },
            {
                "step_id": "end",
                "type": "action",
                "action": "x",
                "dependencies": ["review", "each", "again"],
                "trigger_rule": "all_done",
                "rollback_actions": ["undo"],
            },
        ],
    }
)
RESULTS = st.fixed_dictionaries(
    {},
    optional={
        "document": st.just("doc"),
        "pages": st.lists(st.integers(1, 9), max_size=3),
        "text": st.just("hello"),
        "confidence": st.floats(0, 1),
        "doc_type": st.sampled_from(["invoice", "contract", "letter"]),
        "v": st.integers(0, 3),
    },
)


def _checked_plan(ex: Execution, wf: Workflow, now: datetime) -> Plan:
    """Plan twice: the same decisions, and the execution untouched."""
    version, pending = ex.version, len(ex.pending_events)
    before = copy.deepcopy(state(ex))
    first = plan(ex, wf, now)
    second = plan(ex, wf, now)
    assert first == second
    assert (ex.version, len(ex.pending_events)) == (version, pending)
    assert state(ex) == before
    return first


@settings(max_examples=120, deadline=None)
@given(st.sampled_from([EXAMPLE, SMALL]), st.data())
def test_the_planner_is_pure(wf: Workflow, data: st.DataObject) -> None:
    ex = begin(wf, {"document_url": "http://d.invalid/1", "items": [1, 2, 3]})
    now = NOW
    outstanding: list[Dispatch] = []
    for _ in range(150):
        p = _checked_plan(ex, wf, now)
        if ex.is_terminal:
            assert p == Plan()
            return
        if p.decisions:
            # Applied in order, as progress.advance does; each plan in between is checked.
            for decision in p.decisions:
                dispatch = progress.apply(ex, wf, decision, now)
                if dispatch is not None:
                    outstanding.append(dispatch)
            continue
        live = [
            d
            for d in outstanding
            if ex.steps[d.key].attempt_id == d.attempt_id and ex.step_status(d.key) is S.RUNNING
        ]
        waiting = [r for r in ex.steps.values() if r.status is S.WAITING]
        n = data.draw(st.integers(0, 99))
        if n < 60 and live:
            d = data.draw(st.sampled_from(live))
            if data.draw(st.integers(0, 4)):
                progress.succeed_attempt(ex, wf, d.key, d.attempt_id, data.draw(RESULTS), now)
            else:
                progress.fail_attempt(ex, wf, d.key, d.attempt_id, "Boom", "x", None, now)
        elif n < 75 and waiting:
            record = data.draw(st.sampled_from(waiting))
            answer = {"approved": True, "doc_type": "letter"}
            # A wait step is not a person's task: refused, and that is fine here.
            with contextlib.suppress(InvalidTransition, InputInvalid):
                progress.complete_human_task(ex, wf, record.key, answer, now)
        elif n < 95 or p.next_wake is None:
            now += timedelta(seconds=data.draw(st.sampled_from([0.5, 2.0, 30.0])))
        else:
            now = max(now, p.next_wake)
