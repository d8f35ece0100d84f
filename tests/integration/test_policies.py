"""Every policy of the contract (retries, handlers, trigger rules, compensation, timeouts,
idempotency, input schema), driven through the real asyncio engine."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
import support

from flowledger.domain.definitions import RetryPolicy
from flowledger.domain.errors import InputInvalid, InvalidTransition
from flowledger.domain.retry import retry_delay
from flowledger.domain.states import ExecutionStatus, StepStatus

FAST = {"max_retries": 0, "retry_delay": 0.01}


@pytest.fixture
def ok(registry):
    ran = []

    @registry.action("ok")
    def _ok(inp, ctx):
        ran.append(ctx.step_key)
        return {"ok": ctx.step_id}

    return ran


@pytest.fixture
def boom(registry):
    calls = []

    @registry.action("boom")
    def _boom(inp, ctx):
        calls.append(ctx.attempt)
        raise RuntimeError(f"{ctx.step_id} broke on attempt {ctx.attempt}")

    return calls


def flaky(registry, name, failures, exc=RuntimeError):
    """An action failing its first `failures` attempts; returns the list of attempts seen."""
    attempts = []

    @registry.action(name)
    def _flaky(inp, ctx):
        attempts.append(ctx.attempt)
        if ctx.attempt <= failures:
            raise exc(f"attempt {ctx.attempt} failed")
        return {"attempt": ctx.attempt}

    return attempts


# -- trigger rules ---------------------------------------------------------------------------


def _after_failure(rule):
    """`a` fails (continue_on_failure), `b` succeeds; `join` depends on both with `rule`."""
    return {
        "retry_policy": FAST,
        "steps": [
            {
                "step_id": "a",
                "type": "action",
                "action": "boom",
                "retry_policy": {**FAST, "continue_on_failure": True},
            },
            {"step_id": "b", "type": "action", "action": "ok"},
            {
                "step_id": "join",
                "type": "action",
                "action": "ok",
                "dependencies": ["a", "b"],
                "trigger_rule": rule,
            },
        ],
    }


@pytest.mark.parametrize(
    ("rule", "join_status"),
    [
        ("all_success", StepStatus.SKIPPED),
        ("none_failed", StepStatus.SKIPPED),
        ("all_done", StepStatus.COMPLETED),
        ("one_success", StepStatus.COMPLETED),
    ],
)
async def test_trigger_rules_after_a_failed_dependency(run, ok, boom, rule, join_status):
    _, _, ex = await run(_after_failure(rule))

    assert ex.status is ExecutionStatus.COMPLETED
    assert ex.steps["a"].status is StepStatus.FAILED
    assert ex.steps["b"].status is StepStatus.COMPLETED
    assert ex.steps["join"].status is join_status
    assert ("join" in ok) is (join_status is StepStatus.COMPLETED)


def _after_skip(rule):
    """`gate` selects `taken` and skips `not_taken`; `join` depends on both with `rule`."""
    return {
        "steps": [
            {
                "step_id": "gate",
                "type": "condition",
                "conditions": [{"expression": "`true`", "steps": ["taken"]}],
                "else_steps": ["not_taken"],
            },
            {"step_id": "taken", "type": "action", "action": "ok"},
            {"step_id": "not_taken", "type": "action", "action": "ok"},
            {
                "step_id": "join",
                "type": "action",
                "action": "ok",
                "dependencies": ["taken", "not_taken"],
                "trigger_rule": rule,
            },
        ]
    }


@pytest.mark.parametrize(
    ("rule", "join_status"),
    [
        ("all_success", StepStatus.SKIPPED),
        ("none_failed", StepStatus.COMPLETED),
        ("all_done", StepStatus.COMPLETED),
        ("one_success", StepStatus.COMPLETED),
    ],
)
async def test_trigger_rules_after_a_skipped_dependency(run, ok, rule, join_status):
    _, _, ex = await run(_after_skip(rule))

    assert ex.status is ExecutionStatus.COMPLETED
    assert ex.steps["not_taken"].status is StepStatus.SKIPPED
    assert ex.steps["join"].status is join_status


async def test_none_failed_skips_when_every_dependency_was_skipped(run, ok):
    _, _, ex = await run(
        {
            "steps": [
                {
                    "step_id": "gate",
                    "type": "condition",
                    "conditions": [{"expression": "`false`", "steps": ["x"]}],
                    "else_steps": ["y"],
                },
                {"step_id": "x", "type": "action", "action": "ok"},
                {"step_id": "y", "type": "action", "action": "ok"},
                {
                    "step_id": "join_x",
                    "type": "action",
                    "action": "ok",
                    "dependencies": ["x"],
                    "trigger_rule": "none_failed",
                },
            ]
        }
    )

    assert ex.status is ExecutionStatus.COMPLETED
    assert ex.steps["join_x"].status is StepStatus.SKIPPED
    assert ok == ["y"]


async def test_one_success_runs_as_soon_as_one_dependency_succeeds(run, registry):
    release = asyncio.Event()
    order = []

    @registry.action("slow")
    async def slow(inp):
        await asyncio.wait_for(release.wait(), 5)
        order.append("slow")
        return {}

    @registry.action("fast")
    def fast(inp):
        order.append("fast")
        return {}

    @registry.action("first")
    def first(inp):
        order.append("first")
        release.set()  # only now may `slow` finish: `first` ran while it was still running
        return {}

    _, _, ex = await run(
        {
            "steps": [
                {"step_id": "slow", "type": "action", "action": "slow"},
                {"step_id": "fast", "type": "action", "action": "fast"},
                {
                    "step_id": "first",
                    "type": "action",
                    "action": "first",
                    "dependencies": ["slow", "fast"],
                    "trigger_rule": "one_success",
                },
            ]
        }
    )

    assert ex.status is ExecutionStatus.COMPLETED
    assert order == ["fast", "first", "slow"]


async def test_one_success_is_skipped_when_no_dependency_succeeds(run, ok, boom):
    lenient = {**FAST, "continue_on_failure": True}
    _, _, ex = await run(
        {
            "steps": [
                {"step_id": "a", "type": "action", "action": "boom", "retry_policy": lenient},
                {"step_id": "b", "type": "action", "action": "boom", "retry_policy": lenient},
                {
                    "step_id": "c",
                    "type": "action",
                    "action": "ok",
                    "dependencies": ["a", "b"],
                    "trigger_rule": "one_success",
                },
            ]
        }
    )

    assert ex.status is ExecutionStatus.COMPLETED
    assert ex.steps["c"].status is StepStatus.SKIPPED
    assert ok == []


# -- concurrency ------------------------------------------------------------------------------


async def test_max_parallel_steps_bounds_independent_steps(run, registry):
    in_flight = 0
    peak = 0

    @registry.action("work")
    async def work(inp):
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.01)
        in_flight -= 1
        return {}

    _, _, ex = await run(
        {
            "max_parallel_steps": 2,
            "steps": [{"step_id": f"s{i}", "type": "action", "action": "work"} for i in range(5)],
        }
    )

    assert ex.status is ExecutionStatus.COMPLETED
    assert peak == 2


async def test_independent_ready_steps_run_concurrently(run, registry):
    arrived = 0
    both = asyncio.Event()

    @registry.action("meet")
    async def meet(inp):
        nonlocal arrived
        arrived += 1
        if arrived == 2:
            both.set()
        await asyncio.wait_for(both.wait(), 5)
        return {}

    _, _, ex = await run(
        {
            "steps": [
                {"step_id": "a", "type": "action", "action": "meet"},
                {"step_id": "b", "type": "action", "action": "meet"},
            ]
        }
    )

    assert ex.status is ExecutionStatus.COMPLETED


# -- retries ----------------------------------------------------------------------------------


async def test_retry_delays_are_exponential_with_seeded_jitter(run, app, boom):
    policy = {
        "max_retries": 4,
        "retry_delay": 0.01,
        "backoff_multiplier": 2.0,
        "max_delay": 0.05,
        "jitter": 0.5,
    }
    wf, eid, ex = await run(
        {"steps": [{"step_id": "a", "type": "action", "action": "boom", "retry_policy": policy}]}
    )

    assert ex.status is ExecutionStatus.FAILED
    assert boom == [1, 2, 3, 4, 5]
    scheduled = support.events_of(app, eid, "StepRetryScheduled")
    assert len(scheduled) == 4
    parsed = RetryPolicy(**policy)
    assert wf.node("a").policy == parsed
    for attempt, event in enumerate(scheduled, start=1):
        assert event.delay == retry_delay(parsed, ex.seed, "a", attempt)
        base = min(0.05, 0.01 * 2.0 ** (attempt - 1))  # 0.01, 0.02, 0.04, then capped at 0.05
        assert base * 0.5 <= event.delay <= min(0.05, base * 1.5)
        assert (event.fire_at - event.at).total_seconds() == pytest.approx(event.delay, abs=1e-6)
        assert event.error["type"] == "RuntimeError"
        assert event.error["retryable"] is True
    # The seed makes the jitter differ between attempts (not one constant factor).
    assert len({round(e.delay / min(0.05, 0.01 * 2**i), 9) for i, e in enumerate(scheduled)}) > 1
    assert support.event_types(app, eid) == [
        "ExecutionStarted",
        *["StepStarted", "StepRetryScheduled", "TimerFired"] * 4,
        "StepStarted",
        "StepFailed",
        "ExecutionFailed",
    ]


async def test_retry_waits_at_least_the_recorded_delay(run, app, registry):
    flaky(registry, "flaky", failures=1)
    _, eid, ex = await run(
        {
            "steps": [
                {
                    "step_id": "a",
                    "type": "action",
                    "action": "flaky",
                    "retry_policy": {"max_retries": 1, "retry_delay": 0.05, "jitter": 0},
                }
            ]
        }
    )

    assert ex.status is ExecutionStatus.COMPLETED
    started = support.events_of(app, eid, "StepStarted")
    assert (started[1].at - started[0].at).total_seconds() >= 0.05
    assert support.events_of(app, eid, "StepRetryScheduled")[0].delay == 0.05
    assert ex.data["a"] == {"attempt": 2}
    assert ex.steps["a"].attempt == 2


@pytest.mark.parametrize("max_retries", [0, 2])
async def test_max_retries_bounds_the_attempts(run, app, boom, max_retries):
    _, eid, ex = await run(
        {
            "steps": [
                {
                    "step_id": "a",
                    "type": "action",
                    "action": "boom",
                    "retry_policy": {"max_retries": max_retries, "retry_delay": 0.01},
                }
            ]
        }
    )

    assert ex.status is ExecutionStatus.FAILED
    assert boom == list(range(1, max_retries + 2))
    assert ex.steps["a"].attempt == max_retries + 1
    assert len(support.events_of(app, eid, "StepRetryScheduled")) == max_retries
    assert len(support.events_of(app, eid, "StepStarted")) == max_retries + 1
    failed = support.events_of(app, eid, "StepFailed")
    assert len(failed) == 1
    assert failed[0].error["message"] == f"a broke on attempt {max_retries + 1}"


async def test_a_step_recovers_on_a_later_attempt(run, app, registry):
    attempts = flaky(registry, "flaky", failures=2)
    _, eid, ex = await run(
        {
            "steps": [
                {
                    "step_id": "a",
                    "type": "action",
                    "action": "flaky",
                    "retry_policy": {"max_retries": 3, "retry_delay": 0.01},
                }
            ]
        }
    )

    assert ex.status is ExecutionStatus.COMPLETED
    assert attempts == [1, 2, 3]
    assert ex.data["a"] == {"attempt": 3}
    # A retry runs with the input of the first attempt.
    inputs = [e.input for e in support.events_of(app, eid, "StepStarted")]
    assert inputs == [{}, {}, {}]


class ValidationError(Exception):
    """Shares its name with the default non-retryable ValidationError."""


class PaymentDeclined(Exception):
    """A user's own error type, made non-retryable by name."""


@pytest.mark.parametrize(
    ("exc", "non_retryable"),
    [
        (ValueError, None),
        (TypeError, None),
        (ValidationError, None),
        (PaymentDeclined, ["PaymentDeclined"]),
    ],
    ids=["ValueError", "TypeError", "ValidationError", "custom"],
)
async def test_non_retryable_errors_are_not_retried(run, app, registry, exc, non_retryable):
    attempts = flaky(registry, "flaky", failures=99, exc=exc)
    policy = {"max_retries": 3, "retry_delay": 0.01}
    if non_retryable is not None:
        policy["non_retryable_errors"] = non_retryable
    _, eid, ex = await run(
        {"steps": [{"step_id": "a", "type": "action", "action": "flaky", "retry_policy": policy}]}
    )

    assert ex.status is ExecutionStatus.FAILED
    assert attempts == [1]
    assert support.event_types(app, eid) == [
        "ExecutionStarted",
        "StepStarted",
        "StepFailed",
        "ExecutionFailed",
    ]
    assert ex.steps["a"].error == {
        "type": exc.__name__,
        "message": "attempt 1 failed",
        "retryable": False,
    }


async def test_replacing_non_retryable_errors_makes_value_error_retryable(run, registry):
    attempts = flaky(registry, "flaky", failures=1, exc=ValueError)
    policy = {"max_retries": 1, "retry_delay": 0.01, "non_retryable_errors": ["PaymentDeclined"]}
    _, _, ex = await run(
        {"steps": [{"step_id": "a", "type": "action", "action": "flaky", "retry_policy": policy}]}
    )

    assert ex.status is ExecutionStatus.COMPLETED
    assert attempts == [1, 2]


async def test_step_policy_overrides_the_workflow_policy(run, app, boom):
    _, _, ex = await run(
        {
            "retry_policy": {"max_retries": 5, "retry_delay": 0.01},
            "steps": [
                {"step_id": "a", "type": "action", "action": "boom", "retry_policy": FAST},
            ],
        }
    )

    assert ex.status is ExecutionStatus.FAILED
    assert boom == [1]


async def test_workflow_policy_is_the_default(run, boom):
    _, _, ex = await run(
        {
            "retry_policy": {"max_retries": 2, "retry_delay": 0.01},
            "steps": [{"step_id": "a", "type": "action", "action": "boom"}],
        }
    )

    assert ex.status is ExecutionStatus.FAILED
    assert boom == [1, 2, 3]


async def test_attempt_timeout_is_a_retryable_failure(run, app, registry):
    cancelled = []

    @registry.action("sleepy")
    async def sleepy(inp, ctx):
        if ctx.attempt == 1:
            try:
                await asyncio.sleep(1)
            except asyncio.CancelledError:
                cancelled.append(ctx.attempt)
                raise
        return {"attempt": ctx.attempt}

    _, eid, ex = await run(
        {
            "steps": [
                {
                    "step_id": "a",
                    "type": "action",
                    "action": "sleepy",
                    "timeout": 0.05,
                    "retry_policy": {"max_retries": 1, "retry_delay": 0.01},
                }
            ]
        }
    )

    assert ex.status is ExecutionStatus.COMPLETED
    assert cancelled == [1]
    assert ex.data["a"] == {"attempt": 2}
    retry = support.events_of(app, eid, "StepRetryScheduled")[0]
    assert retry.error["type"] == "TimeoutError"
    assert retry.error["retryable"] is True
    assert "0.05" in retry.error["message"]
    assert support.event_types(app, eid) == [
        "ExecutionStarted",
        "StepStarted",
        "StepRetryScheduled",
        "TimerFired",
        "StepStarted",
        "StepSucceeded",
        "ExecutionCompleted",
    ]


async def test_attempt_timeouts_exhaust_the_retries(run, registry):
    @registry.action("sleepy")
    async def sleepy(inp):
        await asyncio.sleep(1)
        return {}

    _, _, ex = await run(
        {
            "steps": [
                {
                    "step_id": "a",
                    "type": "action",
                    "action": "sleepy",
                    "timeout": 0.05,
                    "retry_policy": {"max_retries": 1, "retry_delay": 0.01},
                }
            ]
        }
    )

    assert ex.status is ExecutionStatus.FAILED
    assert ex.steps["a"].attempt == 2
    assert ex.steps["a"].error["type"] == "TimeoutError"


async def test_execution_stays_running_during_a_retry_delay(engine, app, registry, until):
    flaky(registry, "flaky", failures=1)
    wf = await engine.register(
        support.workflow(
            {
                "steps": [
                    {
                        "step_id": "a",
                        "type": "action",
                        "action": "flaky",
                        "retry_policy": {"max_retries": 1, "retry_delay": 0.05},
                    }
                ]
            }
        )
    )
    eid = await engine.start(wf, {})
    retrying = await until(eid, lambda e: e.step_status("a") is StepStatus.RETRYING)
    assert retrying.status is ExecutionStatus.RUNNING

    ex = await asyncio.wait_for(engine.wait_settled(eid), 5)

    assert ex.status is ExecutionStatus.COMPLETED
    assert "ExecutionWaiting" not in support.event_types(app, eid)


# -- error handlers --------------------------------------------------------------------------


def _handled(handlers):
    return {
        "retry_policy": FAST,
        "steps": [
            {
                "step_id": "charge",
                "type": "action",
                "action": "boom",
                "retry_policy": {"max_retries": 1, "retry_delay": 0.01},
                "input_mapping": {"amount": "amount"},
                "output_mapping": {"receipt": "receipt_id"},
                "error_handlers": [h["step_id"] for h in handlers],
            }
        ],
        "handlers": handlers,
    }


async def test_error_handlers_run_in_order_and_the_first_success_recovers(run, app, registry, boom):
    seen = []

    @registry.action("fallback_fails")
    def fallback_fails(inp, ctx):
        seen.append((ctx.step_key, inp))
        raise RuntimeError("fallback down too")

    @registry.action("fallback_works")
    def fallback_works(inp, ctx):
        seen.append((ctx.step_key, inp))
        return {"receipt_id": "manual-42"}

    handlers = [
        {"step_id": "h1", "type": "action", "action": "fallback_fails"},
        {"step_id": "h2", "type": "action", "action": "fallback_works"},
        {"step_id": "h3", "type": "action", "action": "fallback_works"},
    ]
    _, eid, ex = await run(_handled(handlers), {"amount": 9})

    assert ex.status is ExecutionStatus.COMPLETED
    assert boom == [1, 2]  # every attempt ran before any handler
    record = ex.steps["charge"]
    assert record.status is StepStatus.COMPLETED
    assert record.recovered_by == "h2"
    assert record.result == {"receipt_id": "manual-42"}
    # The handler's result goes through the handled step's output_mapping.
    assert ex.data["receipt"] == "manual-42"
    assert "charge" not in ex.data
    assert [key for key, _ in seen] == ["charge:on_error:h1", "charge:on_error:h2"]
    assert "charge:on_error:h3" not in ex.steps
    handler_input = seen[0][1]
    assert handler_input["step_id"] == "charge"
    assert handler_input["key"] == "charge"
    assert handler_input["input"] == {"amount": 9}
    assert handler_input["error"]["message"] == "charge broke on attempt 2"
    assert support.event_types(app, eid) == [
        "ExecutionStarted",
        "StepStarted",  # charge, attempt 1
        "StepRetryScheduled",
        "TimerFired",
        "StepStarted",  # charge, attempt 2
        "StepFailed",
        "StepStarted",  # h1
        "StepFailed",
        "StepStarted",  # h2
        "StepSucceeded",
        "StepRecovered",
        "ExecutionCompleted",
    ]
    recovered = support.events_of(app, eid, "StepRecovered")[0]
    assert recovered.handler_id == "h2"
    assert recovered.handler_key == "charge:on_error:h2"
    assert recovered.patch == {"receipt": "manual-42"}


async def test_all_error_handlers_failing_fails_the_execution(run, app, registry, boom):
    @registry.action("fallback_fails")
    def fallback_fails(inp):
        raise RuntimeError("fallback down too")

    handlers = [
        {"step_id": "h1", "type": "action", "action": "fallback_fails"},
        {"step_id": "h2", "type": "action", "action": "fallback_fails"},
    ]
    _, eid, ex = await run(_handled(handlers), {"amount": 9})

    assert ex.status is ExecutionStatus.FAILED
    assert ex.steps["charge"].status is StepStatus.FAILED
    assert ex.steps["charge:on_error:h1"].status is StepStatus.FAILED
    assert ex.steps["charge:on_error:h2"].status is StepStatus.FAILED
    assert "charge" in ex.reason
    assert support.event_types(app, eid)[5:] == [
        "StepFailed",  # charge
        "StepStarted",  # h1
        "StepFailed",
        "StepStarted",  # h2
        "StepFailed",
        "ExecutionFailed",
    ]


async def test_recovered_step_lets_its_dependents_run(run, registry, boom, ok):
    @registry.action("fallback")
    def fallback(inp):
        return {"receipt_id": "fallback"}

    doc = _handled([{"step_id": "h", "type": "action", "action": "fallback"}])
    doc["steps"].append(
        {"step_id": "ship", "type": "action", "action": "ok", "dependencies": ["charge"]}
    )
    _, _, ex = await run(doc, {"amount": 1})

    assert ex.status is ExecutionStatus.COMPLETED
    assert ex.steps["ship"].status is StepStatus.COMPLETED


async def test_a_human_task_handler_escalates_to_a_person(engine, app, registry, boom):
    wf = await engine.register(
        support.workflow(
            {
                "retry_policy": FAST,
                "steps": [
                    {
                        "step_id": "classify",
                        "type": "action",
                        "action": "boom",
                        "error_handlers": ["human_review"],
                    }
                ],
                "handlers": [{"step_id": "human_review", "type": "human_task"}],
            }
        )
    )
    eid = await engine.start(wf, {})
    ex = await asyncio.wait_for(engine.wait_settled(eid), 5)
    assert ex.status is ExecutionStatus.WAITING
    assert ex.steps["classify:on_error:human_review"].status is StepStatus.WAITING

    await engine.complete_human_task(eid, "human_review", {"kind": "invoice"})
    ex = await asyncio.wait_for(engine.wait_settled(eid), 5)

    assert ex.status is ExecutionStatus.COMPLETED
    assert ex.steps["classify"].recovered_by == "human_review"
    assert ex.data["classify"] == {"kind": "invoice"}


async def test_an_error_handler_with_input_mapping_sees_its_context_under_underscore(
    run, registry, boom
):
    seen = []

    @registry.action("page")
    def page(inp):
        seen.append(inp)
        return {"paged": True}

    _, _, ex = await run(
        {
            "retry_policy": FAST,
            "steps": [
                {"step_id": "a", "type": "action", "action": "boom", "error_handlers": ["page"]}
            ],
            "handlers": [
                {
                    "step_id": "page",
                    "type": "action",
                    "action": "page",
                    "input_mapping": {
                        "failed": "_.step_id",
                        "why": "_.error.message",
                        "order": "order_id",
                    },
                }
            ],
        },
        {"order_id": "o-7"},
    )

    assert ex.status is ExecutionStatus.COMPLETED
    assert seen == [{"failed": "a", "why": "a broke on attempt 1", "order": "o-7"}]


# -- continue_on_failure ---------------------------------------------------------------------


async def test_continue_on_failure_keeps_the_execution_going(run, app, ok, boom):
    _, eid, ex = await run(
        {
            "steps": [
                {
                    "step_id": "optional",
                    "type": "action",
                    "action": "boom",
                    "retry_policy": {
                        "max_retries": 1,
                        "retry_delay": 0.01,
                        "continue_on_failure": True,
                    },
                },
                {
                    "step_id": "needs_it",
                    "type": "action",
                    "action": "ok",
                    "dependencies": ["optional"],
                },
                {
                    "step_id": "cleanup",
                    "type": "action",
                    "action": "ok",
                    "dependencies": ["optional"],
                    "trigger_rule": "all_done",
                },
                {"step_id": "independent", "type": "action", "action": "ok"},
            ]
        }
    )

    assert ex.status is ExecutionStatus.COMPLETED
    assert boom == [1, 2]
    assert ex.steps["optional"].status is StepStatus.FAILED
    assert ex.steps["optional"].error["type"] == "RuntimeError"
    assert ex.steps["needs_it"].status is StepStatus.SKIPPED
    assert ex.steps["cleanup"].status is StepStatus.COMPLETED
    assert ex.steps["independent"].status is StepStatus.COMPLETED
    assert "optional" not in ex.data
    assert sorted(ok) == ["cleanup", "independent"]
    types = support.event_types(app, eid)
    assert types.count("StepSkipped") == 1
    assert types[-1] == "ExecutionCompleted"


async def test_continue_on_failure_inside_a_loop_body(run, registry):
    @registry.action("maybe")
    def maybe(inp):
        if inp["item"] % 2:
            raise RuntimeError("odd")
        return {"even": inp["item"]}

    _, _, ex = await run(
        {
            "steps": [
                {
                    "step_id": "each",
                    "type": "loop",
                    "for_each": "items",
                    "steps": [
                        {
                            "step_id": "m",
                            "type": "action",
                            "action": "maybe",
                            "input_mapping": {"item": "_.item"},
                            "retry_policy": {**FAST, "continue_on_failure": True},
                        }
                    ],
                }
            ]
        },
        {"items": [0, 1, 2]},
    )

    assert ex.status is ExecutionStatus.COMPLETED
    assert ex.data["each"]["results"] == [{"m": {"even": 0}}, {"m": None}, {"m": {"even": 2}}]


# -- compensation ----------------------------------------------------------------------------


@pytest.fixture
def undo(registry):
    calls = []

    @registry.action("undo")
    def _undo(inp, ctx):
        calls.append((ctx.step_key, inp))
        return {"undone": inp["step_id"]}

    return calls


def _saga(last):
    # Declared out of completion order, so "reverse completion" differs from "reverse list".
    return {
        "retry_policy": FAST,
        "steps": [
            {
                "step_id": "ship",
                "type": "action",
                "action": "ok",
                "dependencies": ["reserve"],
                "rollback_actions": ["unship"],
            },
            {
                "step_id": "reserve",
                "type": "action",
                "action": "ok",
                "input_mapping": {"sku": "sku"},
                "rollback_actions": ["release", "notify"],
            },
            {"step_id": "audit", "type": "action", "action": "ok", "dependencies": ["ship"]},
            {**last, "dependencies": ["audit"]},
        ],
        "handlers": [
            {"step_id": "unship", "type": "action", "action": "undo"},
            {"step_id": "release", "type": "action", "action": "undo"},
            {"step_id": "notify", "type": "action", "action": "undo"},
        ],
    }


async def test_compensation_runs_rollbacks_in_reverse_completion_order(
    engine, run, app, ok, boom, undo
):
    statuses = []
    engine.add_listener(lambda ex: statuses.append(ex.status))

    _, eid, ex = await run(
        _saga({"step_id": "pay", "type": "action", "action": "boom"}), {"sku": "X-1"}
    )

    assert ex.status is ExecutionStatus.FAILED
    assert [key for key, _ in undo] == [
        "ship:rollback:unship",
        "reserve:rollback:release",
        "reserve:rollback:notify",
    ]
    # A rollback action receives the step's input and result.
    assert undo[1][1] == {
        "step_id": "reserve",
        "key": "reserve",
        "input": {"sku": "X-1"},
        "result": {"ok": "reserve"},
    }
    assert undo[0][1]["result"] == {"ok": "ship"}
    assert ex.steps["reserve"].status is StepStatus.COMPENSATED
    assert ex.steps["ship"].status is StepStatus.COMPENSATED
    assert ex.steps["audit"].status is StepStatus.COMPLETED  # no rollback actions: nothing to do
    assert ex.steps["pay"].status is StepStatus.FAILED
    assert "pay" in ex.reason

    compensation = support.events_of(app, eid, "CompensationStarted")[0]
    assert compensation.final_status == "failed"
    assert compensation.plan == [["ship", ["unship"]], ["reserve", ["release", "notify"]]]
    rollback_starts = [
        e.key for e in support.events_of(app, eid, "StepStarted") if ":rollback:" in e.key
    ]
    assert rollback_starts == [
        "ship:rollback:unship",
        "reserve:rollback:release",
        "reserve:rollback:notify",
    ]
    assert [e.key for e in support.events_of(app, eid, "StepCompensated")] == ["ship", "reserve"]
    assert support.event_types(app, eid)[-11:] == [
        "StepFailed",  # pay
        "CompensationStarted",
        "StepStarted",  # ship:rollback:unship
        "StepSucceeded",
        "StepCompensated",  # ship
        "StepStarted",  # reserve:rollback:release
        "StepSucceeded",
        "StepStarted",  # reserve:rollback:notify
        "StepSucceeded",
        "StepCompensated",  # reserve
        "ExecutionFailed",
    ]
    assert list(dict.fromkeys(statuses)) == [
        ExecutionStatus.RUNNING,
        ExecutionStatus.COMPENSATING,
        ExecutionStatus.FAILED,
    ]


async def test_rollback_actions_do_not_write_data(run, ok, boom, undo):
    _, _, ex = await run(
        _saga({"step_id": "pay", "type": "action", "action": "boom"}), {"sku": "X"}
    )

    assert ex.data == {
        "sku": "X",
        "reserve": {"ok": "reserve"},
        "ship": {"ok": "ship"},
        "audit": {"ok": "audit"},
    }


async def test_a_failing_rollback_is_reported_and_the_rest_still_run(run, app, registry, ok, boom):
    undone = []

    @registry.action("undo")
    def _undo(inp, ctx):
        undone.append(ctx.step_key)
        if inp["step_id"] == "ship":
            raise RuntimeError("cannot unship")
        return {}

    _, _, ex = await run(
        _saga({"step_id": "pay", "type": "action", "action": "boom"}), {"sku": "X"}
    )

    assert ex.status is ExecutionStatus.FAILED
    assert undone == ["ship:rollback:unship", "reserve:rollback:release", "reserve:rollback:notify"]
    assert ex.steps["ship"].status is StepStatus.COMPLETED  # not compensated
    assert ex.steps["reserve"].status is StepStatus.COMPENSATED
    assert "compensation failed for ship" in ex.reason


async def test_no_compensation_when_the_execution_completes(run, app, ok, undo):
    _, eid, ex = await run(
        _saga({"step_id": "pay", "type": "action", "action": "ok"}), {"sku": "X"}
    )

    assert ex.status is ExecutionStatus.COMPLETED
    assert undo == []
    assert "CompensationStarted" not in support.event_types(app, eid)


async def test_cancel_compensates_and_ends_cancelled(engine, app, ok, undo):
    statuses = []
    engine.add_listener(lambda ex: statuses.append(ex.status))
    wf = await engine.register(
        support.workflow(
            {
                "steps": [
                    {
                        "step_id": "reserve",
                        "type": "action",
                        "action": "ok",
                        "rollback_actions": ["release"],
                    },
                    {"step_id": "approve", "type": "human_task", "dependencies": ["reserve"]},
                ],
                "handlers": [{"step_id": "release", "type": "action", "action": "undo"}],
            }
        )
    )
    eid = await engine.start(wf, {})
    ex = await asyncio.wait_for(engine.wait_settled(eid), 5)
    assert ex.status is ExecutionStatus.WAITING

    await engine.cancel(eid, "customer changed their mind")
    ex = await asyncio.wait_for(engine.wait_settled(eid), 5)

    assert ex.status is ExecutionStatus.CANCELLED
    assert ex.reason == "customer changed their mind"
    assert ex.steps["approve"].status is StepStatus.CANCELLED
    assert ex.steps["reserve"].status is StepStatus.COMPENSATED
    assert [key for key, _ in undo] == ["reserve:rollback:release"]
    assert support.event_types(app, eid)[-6:] == [
        "StepCancelled",  # approve
        "CompensationStarted",
        "StepStarted",  # reserve:rollback:release
        "StepSucceeded",
        "StepCompensated",
        "ExecutionCancelled",
    ]
    assert list(dict.fromkeys(statuses)) == [
        ExecutionStatus.RUNNING,
        ExecutionStatus.WAITING,
        ExecutionStatus.COMPENSATING,
        ExecutionStatus.CANCELLED,
    ]


async def test_cancel_stops_running_attempts(engine, app, registry):
    started = asyncio.Event()
    stopped = asyncio.Event()

    @registry.action("long")
    async def long(inp):
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            stopped.set()
            raise
        return {}

    wf = await engine.register(
        support.workflow({"steps": [{"step_id": "l", "type": "action", "action": "long"}]})
    )
    eid = await engine.start(wf, {})
    await asyncio.wait_for(started.wait(), 5)

    await engine.cancel(eid, "stop")
    ex = await asyncio.wait_for(engine.wait_settled(eid), 5)

    assert ex.status is ExecutionStatus.CANCELLED
    assert ex.steps["l"].status is StepStatus.CANCELLED
    await asyncio.wait_for(stopped.wait(), 5)
    assert support.event_types(app, eid) == [
        "ExecutionStarted",
        "StepStarted",
        "StepCancelled",
        "ExecutionCancelled",
    ]


async def test_workflow_timeout_times_out_and_compensates(run, app, ok, undo):
    _, eid, ex = await run(
        {
            "timeout": 0.3,
            "steps": [
                {
                    "step_id": "reserve",
                    "type": "action",
                    "action": "ok",
                    "rollback_actions": ["release"],
                },
                {"step_id": "pause", "type": "wait", "duration": 60, "dependencies": ["reserve"]},
            ],
            "handlers": [{"step_id": "release", "type": "action", "action": "undo"}],
        }
    )

    assert ex.status is ExecutionStatus.TIMED_OUT
    assert ex.reason == "workflow timeout of 0.3s reached"
    assert ex.steps["pause"].status is StepStatus.CANCELLED
    assert ex.steps["reserve"].status is StepStatus.COMPENSATED
    assert [key for key, _ in undo] == ["reserve:rollback:release"]
    assert ex.finished_at - ex.started_at >= timedelta(seconds=0.3)
    assert support.event_types(app, eid) == [
        "ExecutionStarted",
        "StepStarted",
        "StepSucceeded",
        "StepWaiting",
        "ExecutionWaiting",
        "StepCancelled",  # pause
        "CompensationStarted",
        "StepStarted",  # reserve:rollback:release
        "StepSucceeded",
        "StepCompensated",
        "ExecutionTimedOut",
    ]
    assert support.events_of(app, eid, "CompensationStarted")[0].final_status == "timed_out"
    assert support.events_of(app, eid, "TimerFired") == []


async def test_workflow_timeout_stops_a_running_attempt(run, app, registry):
    @registry.action("long")
    async def long(inp):
        await asyncio.sleep(30)
        return {}

    _, _, ex = await run(
        {"timeout": 0.1, "steps": [{"step_id": "l", "type": "action", "action": "long"}]}
    )

    assert ex.status is ExecutionStatus.TIMED_OUT
    assert ex.steps["l"].status is StepStatus.CANCELLED


async def test_rollbacks_of_loop_iterations_run_in_reverse(run, registry, ok, boom, undo):
    _, _, ex = await run(
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
                            "step_id": "book",
                            "type": "action",
                            "action": "ok",
                            "input_mapping": {"item": "_.item"},
                            "rollback_actions": ["unbook"],
                        }
                    ],
                },
                {"step_id": "pay", "type": "action", "action": "boom", "dependencies": ["each"]},
            ],
            "handlers": [{"step_id": "unbook", "type": "action", "action": "undo"}],
        },
        {"items": ["a", "b", "c"]},
    )

    assert ex.status is ExecutionStatus.FAILED
    assert [key for key, _ in undo] == [
        "each[2]/book:rollback:unbook",
        "each[1]/book:rollback:unbook",
        "each[0]/book:rollback:unbook",
    ]
    assert [inp["input"] for _, inp in undo] == [{"item": "c"}, {"item": "b"}, {"item": "a"}]


async def test_workflow_timeout_while_a_person_is_awaited(engine, app, until):
    wf = await engine.register(
        support.workflow({"timeout": 0.1, "steps": [{"step_id": "ask", "type": "human_task"}]})
    )
    eid = await engine.start(wf, {})

    ex = await until(eid, lambda e: e.is_terminal)

    assert ex.status is ExecutionStatus.TIMED_OUT
    assert ex.steps["ask"].status is StepStatus.CANCELLED
    assert support.event_types(app, eid) == [
        "ExecutionStarted",
        "StepWaiting",
        "ExecutionWaiting",
        "StepCancelled",
        "ExecutionTimedOut",
    ]


async def test_cancel_during_a_retry_delay(engine, app, boom, until):
    wf = await engine.register(
        support.workflow(
            {
                "steps": [
                    {
                        "step_id": "a",
                        "type": "action",
                        "action": "boom",
                        "retry_policy": {"max_retries": 3, "retry_delay": 30},
                    }
                ]
            }
        )
    )
    eid = await engine.start(wf, {})
    await until(eid, lambda e: e.step_status("a") is StepStatus.RETRYING)

    await engine.cancel(eid, "no more")
    ex = await asyncio.wait_for(engine.wait_settled(eid), 5)

    assert ex.status is ExecutionStatus.CANCELLED
    assert boom == [1]
    assert support.event_types(app, eid) == [
        "ExecutionStarted",
        "StepStarted",
        "StepRetryScheduled",
        "StepCancelled",
        "ExecutionCancelled",
    ]
    before = support.event_types(app, eid)
    with pytest.raises(InvalidTransition):
        await engine.cancel(eid, "again")
    assert support.event_types(app, eid) == before


# -- idempotent start and input schema -------------------------------------------------------


async def test_start_with_the_same_idempotency_key_is_one_execution(engine, app, ok):
    wf = await engine.register(
        support.workflow({"steps": [{"step_id": "a", "type": "action", "action": "ok"}]})
    )

    first = await engine.start(wf, {"n": 1}, idempotency_key="order-17")
    second = await engine.start(wf, {"n": 1}, idempotency_key="order-17")
    ex = await asyncio.wait_for(engine.wait_settled(first), 5)
    third = await engine.start(wf, {"n": 2}, idempotency_key="order-17")  # after it ended

    assert first == second == third
    assert ex.status is ExecutionStatus.COMPLETED
    assert ok == ["a"]
    assert support.event_types(app, first).count("ExecutionStarted") == 1
    assert app.execution_ids() == [first]
    other = await engine.start(wf, {"n": 1}, idempotency_key="order-18")
    assert other != first


async def test_bad_input_is_rejected_before_anything_is_stored(engine, app, ok):
    wf = await engine.register(
        support.workflow(
            {
                "input_schema": {
                    "type": "object",
                    "properties": {"amount": {"type": "number"}},
                    "required": ["amount"],
                },
                "steps": [{"step_id": "a", "type": "action", "action": "ok"}],
            }
        )
    )
    stored = app.recorder.max_notification_id()

    with pytest.raises(InputInvalid, match="amount"):
        await engine.start(wf, {"amount": "ten"})
    with pytest.raises(InputInvalid):
        await engine.start(wf, {}, idempotency_key="k1")

    assert app.recorder.max_notification_id() == stored
    assert app.execution_ids() == []
    assert ok == []
    eid = await engine.start(wf, {"amount": 10}, idempotency_key="k1")
    ex = await asyncio.wait_for(engine.wait_settled(eid), 5)
    assert ex.status is ExecutionStatus.COMPLETED


async def test_concurrent_starts_with_one_idempotency_key_are_one_execution(engine, app, ok):
    wf = await engine.register(
        support.workflow({"steps": [{"step_id": "a", "type": "action", "action": "ok"}]})
    )

    ids = await asyncio.gather(
        *(engine.start(wf, {"n": 1}, idempotency_key="order-99") for _ in range(3))
    )
    ex = await asyncio.wait_for(engine.wait_settled(ids[0]), 5)

    assert len(set(ids)) == 1
    assert ex.status is ExecutionStatus.COMPLETED
    assert ok == ["a"]
    assert support.event_types(app, ids[0]).count("ExecutionStarted") == 1
