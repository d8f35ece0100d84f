"""Every step type of the contract, driven through the real asyncio engine."""

from __future__ import annotations

import asyncio
import threading
from datetime import UTC, datetime, timedelta

import pytest
import support

from flowledger.domain.errors import InputInvalid, InvalidTransition, StepNotFound
from flowledger.domain.states import ExecutionStatus, StepStatus

FAST = {"max_retries": 0, "retry_delay": 0.01}


def started_keys(app, eid):
    return [e.key for e in support.events_of(app, eid, "StepStarted")]


# -- action --------------------------------------------------------------------------------


async def test_action_result_is_stored_under_its_step_id(run, app, registry):
    @registry.action("greet")
    def greet(inp):
        return {"greeting": f"hello {inp['name']}"}

    _, eid, ex = await run(
        {"steps": [{"step_id": "hi", "type": "action", "action": "greet"}]}, {"name": "ada"}
    )

    assert ex.status is ExecutionStatus.COMPLETED
    assert support.event_types(app, eid) == [
        "ExecutionStarted",
        "StepStarted",
        "StepSucceeded",
        "ExecutionCompleted",
    ]
    assert ex.data == {"name": "ada", "hi": {"greeting": "hello ada"}}
    assert ex.steps["hi"].result == {"greeting": "hello ada"}
    # Without input_mapping the step receives the whole data document.
    assert support.events_of(app, eid, "StepStarted")[0].input == {"name": "ada"}


async def test_action_input_mapping_and_output_mapping(run, app, registry):
    seen = []

    @registry.action("total")
    def total(inp):
        seen.append(inp)
        return {"sum": sum(inp["values"]), "count": len(inp["values"])}

    _, eid, ex = await run(
        {
            "steps": [
                {
                    "step_id": "add",
                    "type": "action",
                    "action": "total",
                    "input_mapping": {"values": "order.lines[*].amount"},
                    "output_mapping": {"order_total": "sum", "lines": "count"},
                }
            ]
        },
        {"order": {"lines": [{"amount": 3}, {"amount": 4}]}},
    )

    assert ex.status is ExecutionStatus.COMPLETED
    assert seen == [{"values": [3, 4]}]
    assert ex.data["order_total"] == 7
    assert ex.data["lines"] == 2
    assert "add" not in ex.data  # output_mapping replaces the default data[step_id]
    assert support.events_of(app, eid, "StepSucceeded")[0].patch == {"order_total": 7, "lines": 2}


async def test_action_results_flow_to_dependents(run, registry):
    @registry.action("double")
    def double(inp):
        return {"value": inp["x"] * 2}

    _, _, ex = await run(
        {
            "steps": [
                {"step_id": "a", "type": "action", "action": "double"},
                {
                    "step_id": "b",
                    "type": "action",
                    "action": "double",
                    "dependencies": ["a"],
                    "input_mapping": {"x": "a.value"},
                },
            ]
        },
        {"x": 3},
    )

    assert ex.data["a"] == {"value": 6}
    assert ex.data["b"] == {"value": 12}


async def test_action_input_validation_failure_runs_no_attempt(run, app, registry):
    calls = []

    @registry.action("charge")
    def charge(inp):
        calls.append(inp)
        return {}

    _, eid, ex = await run(
        {
            "retry_policy": {"max_retries": 3, "retry_delay": 0.01},
            "steps": [
                {
                    "step_id": "pay",
                    "type": "action",
                    "action": "charge",
                    "input_mapping": {"amount": "amount"},
                    "input_validation": {
                        "type": "object",
                        "properties": {"amount": {"type": "number", "minimum": 0}},
                        "required": ["amount"],
                    },
                }
            ],
        },
        {"amount": -5},
    )

    assert calls == []
    assert ex.status is ExecutionStatus.FAILED
    assert support.event_types(app, eid) == [
        "ExecutionStarted",
        "StepStarted",
        "StepFailed",
        "ExecutionFailed",
    ]
    error = ex.steps["pay"].error
    assert error["type"] == "ValidationError"
    assert error["retryable"] is False
    assert "amount" in error["message"]


async def test_action_non_object_result_is_invalid_and_not_retried(run, app, registry):
    @registry.action("listy")
    def listy(inp):
        return [1, 2, 3]

    _, eid, ex = await run(
        {
            "retry_policy": {"max_retries": 3, "retry_delay": 0.01},
            "steps": [{"step_id": "a", "type": "action", "action": "listy"}],
        }
    )

    assert ex.status is ExecutionStatus.FAILED
    assert support.event_types(app, eid) == [
        "ExecutionStarted",
        "StepStarted",
        "StepFailed",
        "ExecutionFailed",
    ]
    assert ex.steps["a"].error["type"] == "InvalidResult"
    assert ex.steps["a"].attempt == 1


async def test_action_sync_and_async_agents(run, registry):
    threads = {}

    @registry.action("sync_one")
    def sync_one(inp):
        threads["sync"] = threading.current_thread().name
        return {"kind": "sync"}

    @registry.action("async_one")
    async def async_one(inp, ctx):
        await asyncio.sleep(0)
        threads["async"] = threading.current_thread().name
        return {"kind": "async", "step": ctx.step_id, "attempt": ctx.attempt}

    _, _, ex = await run(
        {
            "steps": [
                {"step_id": "s", "type": "action", "action": "sync_one"},
                {"step_id": "a", "type": "action", "action": "async_one"},
            ]
        }
    )

    assert ex.status is ExecutionStatus.COMPLETED
    assert ex.data["s"] == {"kind": "sync"}
    assert ex.data["a"] == {"kind": "async", "step": "a", "attempt": 1}
    assert threads["sync"].startswith("flowledger-agent")  # sync agents run in the pool
    assert threads["async"] == threading.main_thread().name  # async ones on the loop


async def test_action_unknown_at_run_time_fails_without_retry(run, app):
    _, eid, ex = await run(
        {
            "retry_policy": {"max_retries": 3, "retry_delay": 0.01},
            "steps": [{"step_id": "a", "type": "action", "action": "nobody_offers_this"}],
        }
    )

    assert ex.status is ExecutionStatus.FAILED
    assert support.event_types(app, eid) == [
        "ExecutionStarted",
        "StepStarted",
        "StepFailed",
        "ExecutionFailed",
    ]
    assert ex.steps["a"].error["type"] == "ActionNotFound"
    assert "nobody_offers_this" in ex.reason


# -- condition -----------------------------------------------------------------------------


def _routing(extra_steps=()):
    return {
        "steps": [
            {
                "step_id": "route",
                "type": "condition",
                "conditions": [
                    {"expression": "amount > `100`", "steps": ["big"]},
                    {"expression": "amount > `10`", "steps": ["medium"]},
                ],
                "else_steps": ["small"],
            },
            {"step_id": "big", "type": "action", "action": "mark"},
            {"step_id": "medium", "type": "action", "action": "mark"},
            {"step_id": "small", "type": "action", "action": "mark"},
            *extra_steps,
        ]
    }


@pytest.fixture
def mark(registry):
    ran = []

    @registry.action("mark")
    def _mark(inp, ctx):
        ran.append(ctx.step_id)
        return {"ran": ctx.step_id}

    return ran


async def test_condition_first_true_branch_wins(run, app, mark):
    _, eid, ex = await run(_routing(), {"amount": 500})  # both expressions are true

    assert ex.status is ExecutionStatus.COMPLETED
    assert mark == ["big"]
    assert support.event_types(app, eid) == [
        "ExecutionStarted",
        "BranchSelected",
        "StepStarted",
        "StepSucceeded",
        "ExecutionCompleted",
    ]
    selected = support.events_of(app, eid, "BranchSelected")[0]
    assert selected.branch == 0
    assert selected.selected == ["big"]
    assert sorted(k for k, _ in selected.skipped) == ["medium", "small"]
    assert ex.data["route"] == {"branch": 0, "selected": ["big"]}
    assert ex.steps["medium"].status is StepStatus.SKIPPED
    assert ex.steps["small"].status is StepStatus.SKIPPED


async def test_condition_second_branch(run, mark):
    _, _, ex = await run(_routing(), {"amount": 50})

    assert mark == ["medium"]
    assert ex.data["route"] == {"branch": 1, "selected": ["medium"]}
    assert ex.steps["big"].status is StepStatus.SKIPPED
    assert ex.steps["small"].status is StepStatus.SKIPPED


async def test_condition_else_steps_when_nothing_is_true(run, mark):
    _, _, ex = await run(_routing(), {"amount": 1})

    assert ex.status is ExecutionStatus.COMPLETED
    assert mark == ["small"]
    assert ex.data["route"] == {"branch": "else", "selected": ["small"]}
    assert ex.steps["big"].status is StepStatus.SKIPPED
    assert ex.steps["medium"].status is StepStatus.SKIPPED


async def test_condition_without_else_skips_every_target(run, app, mark):
    _, eid, ex = await run(
        {
            "steps": [
                {
                    "step_id": "route",
                    "type": "condition",
                    "conditions": [{"expression": "flag", "steps": ["yes"]}],
                },
                {"step_id": "yes", "type": "action", "action": "mark"},
            ]
        },
        {"flag": False},
    )

    assert ex.status is ExecutionStatus.COMPLETED
    assert mark == []
    assert ex.data["route"] == {"branch": "else", "selected": []}
    assert support.event_types(app, eid) == [
        "ExecutionStarted",
        "BranchSelected",
        "ExecutionCompleted",
    ]


async def test_condition_skipping_flows_to_dependents_per_trigger_rule(run, mark):
    extra = [
        # all_success: its dependency was skipped, so it is skipped too
        {"step_id": "after_medium", "type": "action", "action": "mark", "dependencies": ["medium"]},
        # ... and so is a step that depends on that one
        {
            "step_id": "after_after",
            "type": "action",
            "action": "mark",
            "dependencies": ["after_medium"],
        },
        # none_failed: the join after the branch runs
        {
            "step_id": "join",
            "type": "action",
            "action": "mark",
            "dependencies": ["big", "medium", "small"],
            "trigger_rule": "none_failed",
        },
        # all_success on the same join would be skipped
        {
            "step_id": "strict_join",
            "type": "action",
            "action": "mark",
            "dependencies": ["big", "medium", "small"],
        },
    ]
    _, _, ex = await run(_routing(extra), {"amount": 500})

    assert ex.status is ExecutionStatus.COMPLETED
    assert mark == ["big", "join"]
    assert ex.steps["after_medium"].status is StepStatus.SKIPPED
    assert ex.steps["after_after"].status is StepStatus.SKIPPED
    assert ex.steps["strict_join"].status is StepStatus.SKIPPED
    assert ex.steps["join"].status is StepStatus.COMPLETED


async def test_condition_expressions_see_data_written_by_earlier_steps(run, registry, mark):
    @registry.action("classify")
    def classify(inp):
        return {"kind": "invoice", "pages": len(inp["pages"])}

    _, _, ex = await run(
        {
            "steps": [
                {
                    "step_id": "classify",
                    "type": "action",
                    "action": "classify",
                    "output_mapping": {"doc": "@"},
                },
                {
                    "step_id": "route",
                    "type": "condition",
                    "dependencies": ["classify"],
                    "conditions": [
                        {"expression": "doc.kind == 'receipt'", "steps": ["receipt"]},
                        {
                            "expression": "doc.kind == 'invoice' && length(pages) > `2`",
                            "steps": ["long_invoice"],
                        },
                        {"expression": "doc.kind == 'invoice'", "steps": ["short_invoice"]},
                    ],
                },
                {"step_id": "receipt", "type": "action", "action": "mark"},
                {"step_id": "long_invoice", "type": "action", "action": "mark"},
                {"step_id": "short_invoice", "type": "action", "action": "mark"},
            ]
        },
        {"pages": ["p1", "p2", "p3"]},
    )

    assert ex.status is ExecutionStatus.COMPLETED
    assert mark == ["long_invoice"]
    assert ex.data["route"]["branch"] == 1


# -- parallel ------------------------------------------------------------------------------


async def test_parallel_children_run_concurrently(run, app, registry):
    arrived = 0
    both = asyncio.Event()

    @registry.action("meet")
    async def meet(inp, ctx):
        nonlocal arrived
        arrived += 1
        if arrived == 2:
            both.set()
        # Only returns if the other child runs at the same time.
        await asyncio.wait_for(both.wait(), 5)
        return {"child": ctx.step_id}

    _, eid, ex = await run(
        {
            "steps": [
                {
                    "step_id": "fan",
                    "type": "parallel",
                    "parallel_steps": [
                        {"step_id": "left", "type": "action", "action": "meet"},
                        {"step_id": "right", "type": "action", "action": "meet"},
                    ],
                }
            ]
        }
    )

    assert ex.status is ExecutionStatus.COMPLETED
    assert ex.data["fan"] == {"left": {"child": "left"}, "right": {"child": "right"}}
    types = support.event_types(app, eid)
    assert types[:4] == ["ExecutionStarted", "StepStarted", "StepStarted", "StepStarted"]
    assert types[-2:] == ["StepSucceeded", "ExecutionCompleted"]
    assert started_keys(app, eid) == ["fan", "left", "right"]


async def test_parallel_max_concurrency_is_respected(run, registry):
    in_flight = 0
    peak = 0

    @registry.action("work")
    async def work(inp, ctx):
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.01)
        in_flight -= 1
        return {"done": ctx.step_id}

    children = [{"step_id": f"c{i}", "type": "action", "action": "work"} for i in range(5)]
    _, _, ex = await run(
        {
            "steps": [
                {
                    "step_id": "fan",
                    "type": "parallel",
                    "max_concurrency": 2,
                    "parallel_steps": children,
                }
            ]
        }
    )

    assert ex.status is ExecutionStatus.COMPLETED
    assert peak == 2
    assert ex.data["fan"] == {f"c{i}": {"done": f"c{i}"} for i in range(5)}


async def test_parallel_failure_threshold_met_completes(run, app, registry):
    @registry.action("ok")
    def ok(inp):
        return {"ok": True}

    @registry.action("boom")
    def boom(inp):
        raise RuntimeError("broken")

    _, _, ex = await run(
        {
            "retry_policy": FAST,
            "steps": [
                {
                    "step_id": "fan",
                    "type": "parallel",
                    "parallel_failure_threshold": 0.5,
                    "parallel_steps": [
                        {"step_id": "good", "type": "action", "action": "ok"},
                        {"step_id": "bad", "type": "action", "action": "boom"},
                    ],
                },
                {"step_id": "after", "type": "action", "action": "ok", "dependencies": ["fan"]},
            ],
        }
    )

    assert ex.status is ExecutionStatus.COMPLETED
    assert ex.steps["bad"].status is StepStatus.FAILED
    assert ex.steps["fan"].status is StepStatus.COMPLETED
    assert ex.data["fan"] == {"good": {"ok": True}, "bad": None}
    assert ex.steps["after"].status is StepStatus.COMPLETED


async def test_parallel_fails_fast_and_cancels_siblings(run, app, registry):
    started = asyncio.Event()
    cancelled = asyncio.Event()

    @registry.action("slow")
    async def slow(inp):
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return {}

    @registry.action("boom")
    async def boom(inp):
        await asyncio.wait_for(started.wait(), 5)  # fail only once the sibling runs
        raise RuntimeError("broken")

    _, eid, ex = await run(
        {
            "retry_policy": FAST,
            "steps": [
                {
                    "step_id": "fan",
                    "type": "parallel",
                    "parallel_steps": [
                        {"step_id": "slow", "type": "action", "action": "slow"},
                        {"step_id": "bad", "type": "action", "action": "boom"},
                    ],
                }
            ],
        }
    )

    assert ex.status is ExecutionStatus.FAILED
    assert ex.steps["bad"].status is StepStatus.FAILED
    assert ex.steps["slow"].status is StepStatus.CANCELLED
    assert ex.steps["fan"].status is StepStatus.FAILED
    assert ex.steps["fan"].error["type"] == "ParallelFailed"
    # The running attempt is stopped, not left to finish.
    await asyncio.wait_for(cancelled.wait(), 5)
    assert support.event_types(app, eid) == [
        "ExecutionStarted",
        "StepStarted",
        "StepStarted",
        "StepStarted",
        "StepFailed",  # bad
        "StepCancelled",  # slow
        "StepFailed",  # fan
        "ExecutionFailed",
    ]


async def test_parallel_child_retries_within_max_concurrency(run, app, registry):
    # A retrying child holds its own slot: it must be able to run its next attempt.
    @registry.action("flaky")
    def flaky(inp, ctx):
        if ctx.attempt == 1:
            raise RuntimeError("first attempt fails")
        return {"attempt": ctx.attempt}

    retry = {"max_retries": 1, "retry_delay": 0.01}
    _, eid, ex = await run(
        {
            "steps": [
                {
                    "step_id": "fan",
                    "type": "parallel",
                    "max_concurrency": 1,
                    "parallel_steps": [
                        {
                            "step_id": "a",
                            "type": "action",
                            "action": "flaky",
                            "retry_policy": retry,
                        },
                        {
                            "step_id": "b",
                            "type": "action",
                            "action": "flaky",
                            "retry_policy": retry,
                        },
                    ],
                }
            ]
        }
    )

    assert ex.status is ExecutionStatus.COMPLETED
    assert ex.data["fan"] == {"a": {"attempt": 2}, "b": {"attempt": 2}}
    # One child at a time: b starts only once a has finished, retry included.
    assert started_keys(app, eid) == ["fan", "a", "a", "b", "b"]


async def test_parallel_child_recovered_by_its_error_handler(run, registry):
    @registry.action("boom")
    def boom(inp):
        raise RuntimeError("down")

    @registry.action("fix")
    def fix(inp):
        return {"fixed": inp["key"]}

    _, _, ex = await run(
        {
            "retry_policy": FAST,
            "steps": [
                {
                    "step_id": "fan",
                    "type": "parallel",
                    "parallel_steps": [
                        {
                            "step_id": "c",
                            "type": "action",
                            "action": "boom",
                            "error_handlers": ["h"],
                        }
                    ],
                }
            ],
            "handlers": [{"step_id": "h", "type": "action", "action": "fix"}],
        }
    )

    assert ex.status is ExecutionStatus.COMPLETED
    assert ex.steps["c"].recovered_by == "h"
    assert ex.data["fan"] == {"c": {"fixed": "c"}}


# -- loop ----------------------------------------------------------------------------------


@pytest.fixture
def inc(registry):
    @registry.action("inc")
    def _inc(inp):
        return {"n": inp["n"] + 1}


async def test_while_loop_checks_condition_against_data_the_body_leaves(run, app, inc):
    _, eid, ex = await run(
        {
            "steps": [
                {
                    "step_id": "count",
                    "type": "loop",
                    "loop_condition": "counter < `3`",
                    "steps": [
                        {
                            "step_id": "bump",
                            "type": "action",
                            "action": "inc",
                            "input_mapping": {"n": "counter"},
                            "output_mapping": {"counter": "n"},
                        }
                    ],
                }
            ]
        },
        {"counter": 0},
    )

    assert ex.status is ExecutionStatus.COMPLETED
    assert ex.data["counter"] == 3
    assert ex.data["count"] == {
        "iterations": 3,
        "max_iterations_reached": False,
        "results": [{"bump": {"n": 1}}, {"bump": {"n": 2}}, {"bump": {"n": 3}}],
    }
    assert started_keys(app, eid) == ["count", "count[0]/bump", "count[1]/bump", "count[2]/bump"]
    iterations = support.events_of(app, eid, "LoopIterationStarted")
    assert [e.index for e in iterations] == [0, 1, 2]


async def test_while_loop_false_at_start_runs_no_iteration(run, app, inc):
    _, eid, ex = await run(
        {
            "steps": [
                {
                    "step_id": "count",
                    "type": "loop",
                    "loop_condition": "counter < `3`",
                    "steps": [{"step_id": "bump", "type": "action", "action": "inc"}],
                }
            ]
        },
        {"counter": 5},
    )

    assert ex.status is ExecutionStatus.COMPLETED
    assert ex.data["count"] == {"iterations": 0, "max_iterations_reached": False, "results": []}
    assert support.event_types(app, eid) == [
        "ExecutionStarted",
        "StepStarted",
        "StepSucceeded",
        "ExecutionCompleted",
    ]


async def test_while_loop_max_iterations_caps_it(run, inc):
    _, _, ex = await run(
        {
            "steps": [
                {
                    "step_id": "forever",
                    "type": "loop",
                    "loop_condition": "`true`",
                    "loop_max_iterations": 4,
                    "steps": [
                        {
                            "step_id": "bump",
                            "type": "action",
                            "action": "inc",
                            "input_mapping": {"n": "counter"},
                            "output_mapping": {"counter": "n"},
                        }
                    ],
                }
            ]
        },
        {"counter": 0},
    )

    assert ex.status is ExecutionStatus.COMPLETED
    assert ex.data["counter"] == 4
    assert ex.data["forever"]["iterations"] == 4
    assert ex.data["forever"]["max_iterations_reached"] is True


async def test_while_loop_that_stops_on_its_last_allowed_iteration_is_not_capped(run, inc):
    loop = {
        "step_id": "count",
        "type": "loop",
        "loop_condition": "counter < `3`",
        "loop_max_iterations": 3,
        "steps": [
            {
                "step_id": "bump",
                "type": "action",
                "action": "inc",
                "input_mapping": {"n": "counter"},
                "output_mapping": {"counter": "n"},
            }
        ],
    }
    _, _, ex = await run({"steps": [loop]}, {"counter": 0})

    assert ex.data["count"]["iterations"] == 3
    assert ex.data["count"]["max_iterations_reached"] is False


async def test_loop_body_runs_in_order_of_its_own_dependencies(run, registry):
    order = []

    @registry.action("note")
    def note(inp, ctx):
        order.append(ctx.step_key)
        return {"at": ctx.step_key}

    _, _, ex = await run(
        {
            "steps": [
                {
                    "step_id": "twice",
                    "type": "loop",
                    "loop_condition": "_.iteration < `2`",
                    "steps": [
                        {
                            "step_id": "second",
                            "type": "action",
                            "action": "note",
                            "dependencies": ["first"],
                        },
                        {"step_id": "first", "type": "action", "action": "note"},
                    ],
                }
            ]
        }
    )

    assert ex.status is ExecutionStatus.COMPLETED
    assert order == ["twice[0]/first", "twice[0]/second", "twice[1]/first", "twice[1]/second"]
    assert ex.data["twice"]["results"][1] == {
        "second": {"at": "twice[1]/second"},
        "first": {"at": "twice[1]/first"},
    }


async def test_for_each_gives_item_and_index(run, app, registry):
    @registry.action("label")
    def label(inp):
        return {"label": f"{inp['index']}:{inp['item']['name']}"}

    _, eid, ex = await run(
        {
            "steps": [
                {
                    "step_id": "pages",
                    "type": "loop",
                    "for_each": "doc.pages",
                    "steps": [
                        {
                            "step_id": "tag",
                            "type": "action",
                            "action": "label",
                            "input_mapping": {"item": "_.item", "index": "_.index"},
                        }
                    ],
                }
            ]
        },
        {"doc": {"pages": [{"name": "a"}, {"name": "b"}, {"name": "c"}]}},
    )

    assert ex.status is ExecutionStatus.COMPLETED
    assert ex.data["pages"] == {
        "iterations": 3,
        "max_iterations_reached": False,
        "results": [
            {"tag": {"label": "0:a"}},
            {"tag": {"label": "1:b"}},
            {"tag": {"label": "2:c"}},
        ],
    }
    loop_started = support.events_of(app, eid, "StepStarted")[0]
    assert loop_started.items == [{"name": "a"}, {"name": "b"}, {"name": "c"}]


async def test_for_each_over_an_empty_list_completes(run, registry):
    @registry.action("never")
    def never(inp):
        raise AssertionError("no items, no iterations")

    _, _, ex = await run(
        {
            "steps": [
                {
                    "step_id": "each",
                    "type": "loop",
                    "for_each": "items",
                    "steps": [{"step_id": "x", "type": "action", "action": "never"}],
                }
            ]
        },
        {"items": []},
    )

    assert ex.status is ExecutionStatus.COMPLETED
    assert ex.data["each"] == {"iterations": 0, "max_iterations_reached": False, "results": []}


async def test_for_each_max_concurrency_of_iterations(run, registry):
    in_flight = 0
    peak = 0

    @registry.action("work")
    async def work(inp):
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.01)
        in_flight -= 1
        return {"v": inp["v"] * 10}

    _, _, ex = await run(
        {
            "steps": [
                {
                    "step_id": "each",
                    "type": "loop",
                    "for_each": "values",
                    "max_concurrency": 2,
                    "steps": [
                        {
                            "step_id": "w",
                            "type": "action",
                            "action": "work",
                            "input_mapping": {"v": "_.item"},
                        }
                    ],
                }
            ]
        },
        {"values": [1, 2, 3, 4, 5]},
    )

    assert ex.status is ExecutionStatus.COMPLETED
    assert peak == 2
    assert [r["w"]["v"] for r in ex.data["each"]["results"]] == [10, 20, 30, 40, 50]


async def test_for_each_capped_by_loop_max_iterations(run, registry):
    @registry.action("echo")
    def echo(inp):
        return {"item": inp["item"]}

    _, _, ex = await run(
        {
            "steps": [
                {
                    "step_id": "each",
                    "type": "loop",
                    "for_each": "values",
                    "loop_max_iterations": 2,
                    "steps": [
                        {
                            "step_id": "e",
                            "type": "action",
                            "action": "echo",
                            "input_mapping": {"item": "_.item"},
                        }
                    ],
                }
            ]
        },
        {"values": ["a", "b", "c"]},
    )

    assert ex.data["each"] == {
        "iterations": 2,
        "max_iterations_reached": True,
        "results": [{"e": {"item": "a"}}, {"e": {"item": "b"}}],
    }


async def test_failing_body_step_fails_the_loop(run, app, registry):
    @registry.action("check")
    def check(inp):
        if inp["item"] == "bad":
            raise RuntimeError(f"item {inp['index']} is bad")
        return {"checked": inp["item"]}

    _, eid, ex = await run(
        {
            "retry_policy": FAST,
            "steps": [
                {
                    "step_id": "each",
                    "type": "loop",
                    "for_each": "items",
                    "max_concurrency": 1,
                    "steps": [
                        {
                            "step_id": "c",
                            "type": "action",
                            "action": "check",
                            "input_mapping": {"item": "_.item", "index": "_.index"},
                        }
                    ],
                }
            ],
        },
        {"items": ["ok", "bad", "never"]},
    )

    assert ex.status is ExecutionStatus.FAILED
    assert ex.steps["each"].status is StepStatus.FAILED
    assert ex.steps["each"].error["type"] == "LoopFailed"
    assert ex.steps["each[1]/c"].error["message"] == "item 1 is bad"
    assert "each[2]/c" not in ex.steps  # no iteration starts after the failure
    assert support.event_types(app, eid)[-2:] == ["StepFailed", "ExecutionFailed"]


async def test_for_each_failure_stops_the_iterations_still_running(run, app, registry):
    started = asyncio.Event()
    stopped = asyncio.Event()

    @registry.action("check")
    async def check(inp):
        if inp["index"] == 0:
            started.set()
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                stopped.set()
                raise
        await asyncio.wait_for(started.wait(), 5)
        raise RuntimeError("bad item")

    _, eid, ex = await run(
        {
            "retry_policy": FAST,
            "steps": [
                {
                    "step_id": "each",
                    "type": "loop",
                    "for_each": "items",
                    "steps": [
                        {
                            "step_id": "c",
                            "type": "action",
                            "action": "check",
                            "input_mapping": {"index": "_.index"},
                        }
                    ],
                }
            ],
        },
        {"items": ["slow", "bad"]},
    )

    assert ex.status is ExecutionStatus.FAILED
    assert ex.steps["each"].error == {
        "type": "LoopFailed",
        "message": "iteration 1 failed",
        "retryable": False,
    }
    assert ex.steps["each[0]/c"].status is StepStatus.CANCELLED
    await asyncio.wait_for(stopped.wait(), 5)
    assert support.event_types(app, eid)[-4:] == [
        "StepFailed",  # each[1]/c
        "StepCancelled",  # each[0]/c
        "StepFailed",  # each
        "ExecutionFailed",
    ]


async def test_condition_inside_a_loop_body(run, registry):
    @registry.action("mark")
    def mark(inp, ctx):
        return {"at": ctx.step_key}

    _, _, ex = await run(
        {
            "steps": [
                {
                    "step_id": "each",
                    "type": "loop",
                    "for_each": "items",
                    "steps": [
                        {
                            "step_id": "gate",
                            "type": "condition",
                            "conditions": [{"expression": "_.item > `1`", "steps": ["big"]}],
                            "else_steps": ["small"],
                        },
                        {"step_id": "big", "type": "action", "action": "mark"},
                        {"step_id": "small", "type": "action", "action": "mark"},
                        {
                            "step_id": "join",
                            "type": "action",
                            "action": "mark",
                            "dependencies": ["big", "small"],
                            "trigger_rule": "none_failed",
                        },
                    ],
                }
            ]
        },
        {"items": [1, 2]},
    )

    assert ex.status is ExecutionStatus.COMPLETED
    first, second = ex.data["each"]["results"]
    assert first["big"] is None
    assert first["small"] == {"at": "each[0]/small"}
    assert second["big"] == {"at": "each[1]/big"}
    assert second["small"] is None
    assert [first["join"], second["join"]] == [{"at": "each[0]/join"}, {"at": "each[1]/join"}]
    assert ex.steps["each[0]/big"].status is StepStatus.SKIPPED
    assert ex.steps["each[1]/small"].status is StepStatus.SKIPPED


async def test_nested_parallel_and_loops(run, registry):
    @registry.action("mark")
    def mark(inp, ctx):
        return {"at": ctx.step_key}

    _, _, ex = await run(
        {
            "steps": [
                {
                    "step_id": "each",
                    "type": "loop",
                    "for_each": "items",
                    "steps": [
                        {
                            "step_id": "fan",
                            "type": "parallel",
                            "parallel_steps": [
                                {"step_id": "p", "type": "action", "action": "mark"},
                                {
                                    "step_id": "inner",
                                    "type": "loop",
                                    "loop_condition": "_.iteration < `2`",
                                    "steps": [{"step_id": "q", "type": "action", "action": "mark"}],
                                },
                            ],
                        }
                    ],
                }
            ]
        },
        {"items": ["x", "y"]},
    )

    assert ex.status is ExecutionStatus.COMPLETED
    second = ex.data["each"]["results"][1]["fan"]
    assert second["p"] == {"at": "each[1]/p"}
    assert second["inner"] == {
        "iterations": 2,
        "max_iterations_reached": False,
        "results": [{"q": {"at": "each[1]/inner[0]/q"}}, {"q": {"at": "each[1]/inner[1]/q"}}],
    }


# -- wait ----------------------------------------------------------------------------------


async def test_wait_duration_waits_and_execution_is_waiting_meanwhile(engine, app, until):
    wf = await engine.register(
        support.workflow({"steps": [{"step_id": "pause", "type": "wait", "duration": 0.05}]})
    )
    eid = await engine.start(wf, {})

    during = await engine.execution(eid)
    assert during.status is ExecutionStatus.WAITING
    assert during.steps["pause"].status is StepStatus.WAITING

    ex = await asyncio.wait_for(engine.wait_settled(eid), 5)

    assert ex.status is ExecutionStatus.COMPLETED
    assert support.event_types(app, eid) == [
        "ExecutionStarted",
        "StepWaiting",
        "ExecutionWaiting",
        "TimerFired",
        "StepSucceeded",
        "ExecutionResumed",
        "ExecutionCompleted",
    ]
    record = ex.steps["pause"]
    assert record.finished_at - record.started_at >= timedelta(seconds=0.05)
    waiting = support.events_of(app, eid, "StepWaiting")[0]
    assert waiting.fire_at == waiting.at + timedelta(seconds=0.05)
    assert ex.data["pause"] == {"waited_until": waiting.fire_at.isoformat()}


async def test_wait_longer_than_its_timeout_fails_when_the_timeout_is_reached(run, app):
    wait = {"step_id": "pause", "type": "wait", "duration": 30, "timeout": 0.05}
    _, eid, ex = await run({"steps": [wait]})

    assert ex.status is ExecutionStatus.FAILED
    assert ex.steps["pause"].status is StepStatus.FAILED
    assert ex.steps["pause"].error is not None
    assert ex.steps["pause"].error["type"] == "TimeoutError"
    fired = support.events_of(app, eid, "TimerFired")
    assert len(fired) == 1


async def test_wait_until_an_iso_time_from_data(run, app):
    target = datetime.now(UTC) + timedelta(seconds=0.05)
    _, eid, ex = await run(
        {"steps": [{"step_id": "pause", "type": "wait", "until": "resume_at"}]},
        {"resume_at": target.isoformat()},
    )

    assert ex.status is ExecutionStatus.COMPLETED
    assert len(support.events_of(app, eid, "TimerFired")) == 1
    assert support.events_of(app, eid, "StepWaiting")[0].fire_at == target
    assert ex.steps["pause"].finished_at >= target


async def test_wait_until_in_the_past_fires_at_once(run, app):
    _, eid, ex = await run(
        {"steps": [{"step_id": "pause", "type": "wait", "until": "resume_at"}]},
        {"resume_at": "2000-01-01T00:00:00+00:00"},
    )

    assert ex.status is ExecutionStatus.COMPLETED
    assert len(support.events_of(app, eid, "TimerFired")) == 1


async def test_wait_until_that_is_not_a_time_fails_the_step(run):
    _, _, ex = await run(
        {"steps": [{"step_id": "pause", "type": "wait", "until": "resume_at"}]},
        {"resume_at": "next tuesday"},
    )

    assert ex.status is ExecutionStatus.FAILED
    assert ex.steps["pause"].error["type"] == "ExpressionError"


# -- human_task ----------------------------------------------------------------------------

REVIEW = {
    "step_id": "review",
    "type": "human_task",
    "assignee": "alice",
    "form_schema": {
        "type": "object",
        "properties": {"approved": {"type": "boolean"}},
        "required": ["approved"],
    },
}


async def test_human_task_waits_for_an_answer(engine, app, run, registry):
    @registry.action("publish")
    def publish(inp):
        return {"published": inp["approved"]}

    _, eid, ex = await run(
        {
            "steps": [
                REVIEW,
                {
                    "step_id": "publish",
                    "type": "action",
                    "action": "publish",
                    "dependencies": ["review"],
                    "input_mapping": {"approved": "review.approved"},
                },
            ]
        }
    )

    assert ex.status is ExecutionStatus.WAITING
    assert ex.steps["review"].status is StepStatus.WAITING
    assert ex.steps["review"].assignee == "alice"
    assert support.event_types(app, eid) == [
        "ExecutionStarted",
        "StepWaiting",
        "ExecutionWaiting",
    ]

    key = await engine.complete_human_task(eid, "review", {"approved": True})
    ex = await asyncio.wait_for(engine.wait_settled(eid), 5)

    assert key == "review"
    assert ex.status is ExecutionStatus.COMPLETED
    assert ex.data["review"] == {"approved": True}
    assert ex.data["publish"] == {"published": True}
    assert support.event_types(app, eid) == [
        "ExecutionStarted",
        "StepWaiting",
        "ExecutionWaiting",
        "HumanTaskCompleted",
        "ExecutionResumed",
        "StepStarted",
        "StepSucceeded",
        "ExecutionCompleted",
    ]


@pytest.mark.parametrize(
    "answer",
    [{"approved": "yes"}, {}, ["not", "an", "object"], {"approved": True, "notes": "x" * 2**20}],
    ids=["wrong-type", "missing-field", "not-an-object", "over-1-MiB"],
)
async def test_human_task_answer_must_match_form_schema(engine, app, run, answer):
    _, eid, ex = await run({"steps": [REVIEW]})
    before = support.event_types(app, eid)

    with pytest.raises(InputInvalid):
        await engine.complete_human_task(eid, "review", answer)

    assert support.event_types(app, eid) == before
    assert (await engine.execution(eid)).steps["review"].status is StepStatus.WAITING
    # A good answer is still accepted afterwards.
    await engine.complete_human_task(eid, "review", {"approved": False})
    ex = await asyncio.wait_for(engine.wait_settled(eid), 5)
    assert ex.status is ExecutionStatus.COMPLETED
    assert ex.data["review"] == {"approved": False}


async def test_completing_a_step_that_does_not_wait_stores_nothing(engine, app, until):
    second = {**REVIEW, "step_id": "second", "dependencies": ["review"]}
    wf = await engine.register(
        support.workflow(
            {"steps": [REVIEW, second, {"step_id": "pause", "type": "wait", "duration": 30}]}
        )
    )
    eid = await engine.start(wf, {})
    await until(eid, lambda e: e.step_status("review") is StepStatus.WAITING)
    await engine.complete_human_task(eid, "review", {"approved": True})
    await until(eid, lambda e: e.step_status("second") is StepStatus.WAITING)
    before = support.event_types(app, eid)

    with pytest.raises(InvalidTransition):
        await engine.complete_human_task(eid, "review", {"approved": True})  # already answered
    with pytest.raises(InvalidTransition):
        await engine.complete_human_task(eid, "pause", {"approved": True})  # a wait, not a task
    with pytest.raises(StepNotFound):
        await engine.complete_human_task(eid, "no_such_step", {"approved": True})

    assert support.event_types(app, eid) == before
    await engine.cancel(eid, "done with the test")
    ex = await asyncio.wait_for(engine.wait_settled(eid), 5)
    assert ex.status is ExecutionStatus.CANCELLED
    assert ex.steps["pause"].status is StepStatus.CANCELLED
    assert ex.steps["second"].status is StepStatus.CANCELLED


async def test_completing_a_task_of_an_ended_execution_is_refused(engine, app, run):
    _, eid, _ = await run({"steps": [REVIEW]})
    await engine.complete_human_task(eid, "review", {"approved": True})
    ex = await asyncio.wait_for(engine.wait_settled(eid), 5)
    assert ex.status is ExecutionStatus.COMPLETED
    before = support.event_types(app, eid)

    with pytest.raises(InvalidTransition):
        await engine.complete_human_task(eid, "review", {"approved": True})

    assert support.event_types(app, eid) == before


async def test_human_task_timeout_fails_the_step_and_runs_its_error_handlers(
    engine, app, registry, until
):
    handled = []

    @registry.action("escalate")
    def escalate(inp):
        handled.append(inp)
        return {"approved": False, "by": "escalation"}

    wf = await engine.register(
        support.workflow(
            {
                "retry_policy": FAST,
                "steps": [{**REVIEW, "timeout": 0.05, "error_handlers": ["escalate"]}],
                "handlers": [{"step_id": "escalate", "type": "action", "action": "escalate"}],
            }
        )
    )
    eid = await engine.start(wf, {})

    # wait_settled returns as soon as the task waits for a person; the deadline is a timer.
    ex = await until(eid, lambda e: e.is_terminal)

    assert ex.status is ExecutionStatus.COMPLETED
    record = ex.steps["review"]
    assert record.status is StepStatus.COMPLETED
    assert record.recovered_by == "escalate"
    assert ex.data["review"] == {"approved": False, "by": "escalation"}
    assert handled[0]["error"]["type"] == "TimeoutError"
    assert handled[0]["key"] == "review"
    assert support.event_types(app, eid) == [
        "ExecutionStarted",
        "StepWaiting",
        "ExecutionWaiting",
        "TimerFired",
        "StepFailed",  # review: no answer within its timeout
        "ExecutionResumed",  # a handler runs: the execution no longer waits
        "StepStarted",  # review:on_error:escalate
        "StepSucceeded",
        "StepRecovered",
        "ExecutionCompleted",
    ]
    failed = support.events_of(app, eid, "StepFailed")[0]
    assert failed.error["type"] == "TimeoutError"
    assert failed.error["retryable"] is False


async def test_human_task_timeout_without_handler_fails_the_execution(engine, until):
    wf = await engine.register(support.workflow({"steps": [{**REVIEW, "timeout": 0.05}]}))
    eid = await engine.start(wf, {})

    ex = await until(eid, lambda e: e.is_terminal)

    assert ex.status is ExecutionStatus.FAILED
    assert ex.steps["review"].error["type"] == "TimeoutError"


async def test_human_tasks_in_a_loop_are_answered_by_key(engine, app, run):
    _, eid, ex = await run(
        {
            "steps": [
                {
                    "step_id": "each",
                    "type": "loop",
                    "for_each": "items",
                    "steps": [{"step_id": "ask", "type": "human_task"}],
                }
            ]
        },
        {"items": ["a", "b"]},
    )
    assert ex.status is ExecutionStatus.WAITING
    before = support.event_types(app, eid)

    with pytest.raises(StepNotFound, match="several waiting instances"):
        await engine.complete_human_task(eid, "ask", {"ok": True})
    assert support.event_types(app, eid) == before

    assert await engine.complete_human_task(eid, "each[1]/ask", {"answer": "b"}) == "each[1]/ask"
    assert await engine.complete_human_task(eid, "ask", {"answer": "a"}) == "each[0]/ask"
    ex = await asyncio.wait_for(engine.wait_settled(eid), 5)

    assert ex.status is ExecutionStatus.COMPLETED
    assert ex.data["each"]["results"] == [{"ask": {"answer": "a"}}, {"ask": {"answer": "b"}}]


async def test_human_task_answer_goes_through_output_mapping(engine, run):
    _, eid, _ = await run({"steps": [{**REVIEW, "output_mapping": {"approved": "approved"}}]})

    await engine.complete_human_task(eid, "review", {"approved": True})
    ex = await asyncio.wait_for(engine.wait_settled(eid), 5)

    assert ex.data == {"approved": True}
    assert ex.steps["review"].result == {"approved": True}
