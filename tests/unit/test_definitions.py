"""Workflow definitions: the contract of workflows.md, its defaults and every rejection."""

from __future__ import annotations

import copy
import itertools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from flowledger.adapters.files import load_definition_file
from flowledger.domain.definitions import (
    DEFAULT_STEP_TIMEOUT,
    MAX_DEFINITION_BYTES,
    MAX_DEPTH,
    MAX_STEPS,
    ActionStep,
    RetryPolicy,
    WebhookStep,
    WorkflowDefinition,
    load_definition,
    parse_definition,
    step_scopes,
)
from flowledger.domain.errors import DefinitionInvalid

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
EXAMPLE = SHARED / "examples" / "document_processing.yaml"


@pytest.fixture(scope="module")
def example() -> WorkflowDefinition:
    if not EXAMPLE.is_file():
        pytest.fail(f"{EXAMPLE} is missing: shared/ must sit beside the repository")
    return load_definition_file(EXAMPLE)


def action(step_id: str, **fields: Any) -> dict[str, Any]:
    return {"step_id": step_id, "type": "action", "action": "do.it", **fields}


def workflow(*steps: Any, **fields: Any) -> dict[str, Any]:
    return {"workflow_id": "wf", "steps": list(steps) or [action("a")], **fields}


def problems_of(doc: Any) -> list[str]:
    with pytest.raises(DefinitionInvalid) as caught:
        parse_definition(doc, "wf.yaml")
    assert caught.value.source == "wf.yaml"
    return caught.value.problems


def only_problem(doc: Any) -> str:
    problems = problems_of(doc)
    assert len(problems) == 1, problems
    return problems[0]


# -- the shared example and the defaults -------------------------------------------------------


def test_shared_example_loads_with_every_step_in_its_scope(example: WorkflowDefinition) -> None:
    assert example.workflow_id == "document-processing"
    assert example.version == "1.0"
    assert example.sla_targets == {"duration_p95": 20, "success_rate": 0.98}
    assert step_scopes(example) == {
        "fetch": (),
        "extract": (),
        "ocr": ("extract",),
        "metadata": ("extract",),
        "route": (),
        "invoice_pages": (),
        "extract_line_items": ("invoice_pages",),
        "contract_review": (),
        "classify_unknown": (),
        "validate": (),
        "notify": (),
        "human_review": ("<handlers>",),
        "unpublish": ("<handlers>",),
    }


def test_shared_example_round_trips_through_its_document(example: WorkflowDefinition) -> None:
    document = example.to_document()
    assert json.loads(json.dumps(document)) == document
    assert parse_definition(document) == example
    assert parse_definition(document).to_document() == document


def test_iter_steps_yields_nested_bodies_then_handlers(example: WorkflowDefinition) -> None:
    ids = [step.step_id for step in example.iter_steps()]
    assert ids[:4] == ["fetch", "extract", "ocr", "metadata"]
    assert ids[-2:] == ["human_review", "unpublish"]
    assert len(ids) == len(set(ids)) == 13


def test_defaults_follow_the_contract() -> None:
    defn = parse_definition(workflow())
    assert (defn.name, defn.description, defn.version) == ("", "", "1.0")
    assert (defn.timeout, defn.max_parallel_steps, defn.input_schema) == (3600, 10, None)
    assert defn.retry_policy == RetryPolicy(
        max_retries=3,
        retry_delay=1.0,
        backoff_multiplier=2.0,
        max_delay=60,
        jitter=0.1,
        non_retryable_errors=["ValueError", "TypeError", "ValidationError"],
        continue_on_failure=False,
    )
    step = defn.steps[0]
    assert isinstance(step, ActionStep)
    assert (step.trigger_rule, step.dependencies, step.display_name) == ("all_success", [], "a")


def test_display_name_prefers_the_name() -> None:
    assert (
        parse_definition(workflow(action("a", name="Fetch it"))).steps[0].display_name == "Fetch it"
    )


def test_retry_policy_for_uses_the_step_policy_else_the_workflow_policy() -> None:
    defn = parse_definition(
        workflow(
            action("a", retry_policy={"max_retries": 0}),
            action("b"),
            retry_policy={"max_retries": 7},
        )
    )
    assert defn.retry_policy_for(defn.steps[0]).max_retries == 0
    assert defn.retry_policy_for(defn.steps[1]).max_retries == 7


def test_attempt_timeout_is_300_seconds_except_for_waits_and_human_tasks() -> None:
    defn = parse_definition(
        workflow(
            action("a"),
            action("b", timeout=5),
            {"step_id": "w", "type": "wait", "duration": 10},
            {"step_id": "h", "type": "human_task"},
            {"step_id": "h2", "type": "human_task", "timeout": 60},
        )
    )
    assert [defn.attempt_timeout(s) for s in defn.steps] == [
        DEFAULT_STEP_TIMEOUT,
        5,
        None,
        None,
        60,
    ]


@pytest.mark.parametrize(("given", "expected"), [(1.0, "1.0"), (2, "2"), ("2.1", "2.1")])
def test_version_given_as_a_yaml_number_becomes_text(given: Any, expected: str) -> None:
    assert parse_definition(workflow(version=given)).version == expected
    assert (
        load_definition(
            f"workflow_id: wf\nversion: {given}\nsteps: [{{step_id: a, type: wait, duration: 1}}]"
        ).version
        == expected
    )


def test_webhook_method_is_normalised_to_upper_case() -> None:
    defn = parse_definition(
        workflow({"step_id": "w", "type": "webhook", "url": "https://x.test", "method": "put"})
    )
    step = defn.steps[0]
    assert isinstance(step, WebhookStep)
    assert (step.method, step.headers) == ("PUT", {})


def test_definitions_are_frozen() -> None:
    defn = parse_definition(workflow())
    with pytest.raises(ValidationError):
        defn.workflow_id = "other"  # type: ignore[misc]


# -- shape errors: unknown keys, types, missing fields ------------------------------------------


def _nested(doc: dict[str, Any], step: dict[str, Any]) -> dict[str, Any]:
    doc["steps"] = [{"step_id": "p", "type": "parallel", "parallel_steps": [step]}]
    return doc


UNKNOWN_KEYS: list[tuple[str, Callable[[dict[str, Any]], Any], str]] = [
    ("workflow", lambda d: d.update(timout=5), "workflow: field 'timout'"),
    (
        "workflow retry policy",
        lambda d: d.update(retry_policy={"max_retry": 1}),
        "workflow: field 'retry_policy.max_retry'",
    ),
    ("step", lambda d: d["steps"][0].update(acton="x"), "step 'a': field 'acton'"),
    (
        "step retry policy",
        lambda d: d["steps"][0].update(retry_policy={"jiter": 1}),
        "step 'a': field 'retry_policy.jiter'",
    ),
    ("parallel child", lambda d: _nested(d, action("c", bogus=1)), "step 'c': field 'bogus'"),
    (
        "loop body",
        lambda d: d["steps"].append(
            {"step_id": "l", "type": "loop", "for_each": "xs", "steps": [action("b", x=1)]}
        ),
        "step 'b': field 'x'",
    ),
    (
        "condition branch",
        lambda d: d["steps"].append(
            {
                "step_id": "route",
                "type": "condition",
                "conditions": [{"expresion": "a", "steps": ["a"]}],
            }
        ),
        "step 'route': field 'conditions[0].expresion'",
    ),
    (
        "handler",
        lambda d: d.update(handlers=[action("h", dependences=[])]),
        "step 'h': field 'dependences'",
    ),
]


@pytest.mark.parametrize(
    ("where", "mutate", "named"), UNKNOWN_KEYS, ids=[u[0] for u in UNKNOWN_KEYS]
)
def test_unknown_keys_are_rejected_at_every_level(
    where: str, mutate: Callable[[dict[str, Any]], Any], named: str
) -> None:
    doc = workflow()
    mutate(doc)
    assert f"{named}: unknown field (extra inputs are not permitted)" in problems_of(doc)


def test_unknown_step_type_lists_the_known_types() -> None:
    problem = only_problem(workflow({"step_id": "fetch", "type": "acton", "action": "x"}))
    assert problem == (
        "step 'fetch': field 'type': 'acton' is not one of "
        "action, condition, parallel, loop, wait, human_task, webhook"
    )


def test_missing_required_fields_are_named() -> None:
    assert problems_of({"steps": [action("a")]}) == ["workflow: field 'workflow_id': required"]
    assert (
        only_problem(workflow({"step_id": "a", "type": "action"}))
        == "step 'a': field 'action': required"
    )


def test_a_step_without_an_id_is_named_by_its_position() -> None:
    doc = _nested(workflow(), {"type": "wait", "duration": 1})
    assert only_problem(doc) == "steps[0].parallel_steps[0]: field 'step_id': required"


def test_field_errors_show_the_bad_value() -> None:
    doc = workflow(action("a", timeout=-1), timeout=0, workflow_id="Docs")
    assert problems_of(doc) == [
        "workflow: field 'workflow_id': "
        "string should match pattern '^[a-z0-9][a-z0-9._-]*$' (got 'Docs')",
        "workflow: field 'timeout': input should be greater than 0 (got 0)",
        "step 'a': field 'timeout': input should be greater than 0 (got -1)",
    ]


def test_all_shape_problems_are_reported_together() -> None:
    doc = workflow(action("a", trigger_rule="sometimes"), {"step_id": "b", "type": "wait"}, "c")
    problems = problems_of(doc)
    assert len(problems) == 3
    assert problems[0].startswith("step 'a': field 'trigger_rule': input should be 'all_success'")
    assert problems[1] == "step 'b': exactly one of 'duration' and 'until' must be set"
    assert problems[2] == "steps[2]: expected a mapping, got str"


def test_infinite_numbers_are_rejected() -> None:
    assert only_problem(workflow(timeout=float("inf"))).startswith(
        "workflow: field 'timeout': input should be a finite number"
    )


@pytest.mark.parametrize(
    ("loop", "message"),
    [
        ({}, "exactly one of 'loop_condition' and 'for_each' must be set"),
        (
            {"for_each": "xs", "loop_condition": "go"},
            "exactly one of 'loop_condition' and 'for_each' must be set",
        ),
        (
            {"loop_condition": "go", "max_concurrency": 2},
            "'max_concurrency' applies to 'for_each' loops only",
        ),
    ],
)
def test_a_loop_is_either_conditional_or_for_each(loop: dict[str, Any], message: str) -> None:
    doc = workflow({"step_id": "l", "type": "loop", "steps": [action("b")], **loop})
    assert only_problem(doc) == f"step 'l': {message}"


def test_wait_needs_exactly_one_of_duration_and_until() -> None:
    doc = workflow({"step_id": "w", "type": "wait", "duration": 1, "until": "deadline"})
    assert only_problem(doc) == "step 'w': exactly one of 'duration' and 'until' must be set"


def test_webhook_url_must_be_http() -> None:
    doc = workflow({"step_id": "w", "type": "webhook", "url": "file:///etc/passwd"})
    assert only_problem(doc) == (
        "step 'w': field 'url': must start with http://, https:// or ${env:NAME}"
    )


def test_webhook_url_may_come_whole_from_the_environment() -> None:
    defn = parse_definition(
        workflow({"step_id": "w", "type": "webhook", "url": "${env:HOOK_URL}/done"})
    )
    assert defn.steps[0].url == "${env:HOOK_URL}/done"  # type: ignore[union-attr]


# -- loading text and files ---------------------------------------------------------------------


def test_yaml_syntax_error_names_line_and_column() -> None:
    with pytest.raises(DefinitionInvalid) as caught:
        load_definition("workflow_id: wf\nsteps:\n  - {step_id: a, type: wait\n", "bad.yaml")
    assert caught.value.source == "bad.yaml"
    [problem] = caught.value.problems
    assert problem.startswith("YAML syntax error at line 4, column 1:")


def test_a_key_given_twice_is_an_error_rather_than_last_wins() -> None:
    with pytest.raises(DefinitionInvalid) as caught:
        load_definition(
            "workflow_id: wf\ntimeout: 5\n"
            "steps: [{step_id: a, type: wait, duration: 1}]\n"
            "timeout: 6\n"
        )
    assert caught.value.problems == [
        "YAML syntax error at line 4, column 1: duplicate key 'timeout'"
    ]


def test_yaml_merge_keys_still_work() -> None:
    text = (
        "x-retry: &retry {max_retries: 5}\n"
        "workflow_id: wf\n"
        "steps: [{step_id: a, type: wait, duration: 1,"
        " retry_policy: {<<: *retry, max_retries: 1}}]\n"
    )
    with pytest.raises(DefinitionInvalid) as caught:  # x-retry is an unknown key, the merge is fine
        load_definition(text)
    assert caught.value.problems == [
        "workflow: field 'x-retry': unknown field (extra inputs are not permitted)"
    ]


def test_json_is_accepted_as_yaml() -> None:
    defn = load_definition(json.dumps(workflow()).encode())
    assert defn.workflow_id == "wf"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "the definition is empty"),
        ("- step_id: a\n", "the definition must be a mapping, got list"),
        ("just text", "the definition must be a mapping, got str"),
    ],
)
def test_a_document_that_is_not_a_mapping_is_rejected(text: str, problem: str) -> None:
    with pytest.raises(DefinitionInvalid) as caught:
        load_definition(text)
    assert caught.value.problems == [problem]


@pytest.mark.parametrize("as_bytes", [False, True])
def test_oversize_input_is_rejected_before_parsing(as_bytes: bool) -> None:
    text = "# " + "x" * MAX_DEFINITION_BYTES
    with pytest.raises(DefinitionInvalid) as caught:
        load_definition(text.encode() if as_bytes else text)
    assert caught.value.problems == [f"the definition is larger than {MAX_DEFINITION_BYTES} bytes"]


def test_yaml_alias_bombs_are_rejected() -> None:
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    text = (
        "workflow_id: wf\nsteps: [{step_id: a, type: wait, duration: 1}]\ninput_schema:\n"
        + "".join(f"  {level}\n" for level in levels)
    )
    with pytest.raises(DefinitionInvalid) as caught:
        load_definition(text)
    assert caught.value.problems == ["the definition expands to more than 1000000 values"]


def test_deeply_nested_yaml_is_rejected() -> None:
    with pytest.raises(DefinitionInvalid, match="nested"):
        load_definition("[" * 10_000)
    with pytest.raises(DefinitionInvalid, match="nested deeper than 100 levels"):
        load_definition("a: &a [*a]\n")


def test_load_definition_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "wf.yaml"
    path.write_text("workflow_id: wf\nsteps: [{step_id: a, type: wiat}]\n")
    with pytest.raises(DefinitionInvalid) as caught:
        load_definition_file(path)
    assert caught.value.source == str(path)
    assert str(path) in str(caught.value)


def test_a_missing_file_is_reported_with_the_reason(tmp_path: Path) -> None:
    with pytest.raises(DefinitionInvalid) as caught:
        load_definition_file(tmp_path / "nope.yaml")
    assert caught.value.problems == ["cannot read the file: No such file or directory"]


# -- semantic checks (a-j) ----------------------------------------------------------------------


def test_a_step_ids_are_unique_across_nested_bodies_and_handlers() -> None:
    doc = _nested(workflow(), action("a"))
    doc["steps"].append(action("a"))
    doc["handlers"] = [action("a")]
    assert only_problem(doc) == "step 'a': field 'step_id': defined 3 times; step ids are unique"


def test_b_unknown_dependency_is_named() -> None:
    assert only_problem(workflow(action("a", dependencies=["fetch"]))) == (
        "step 'a': field 'dependencies': unknown step 'fetch'"
    )


def test_b_dependency_in_another_scope_is_named_differently() -> None:
    doc = _nested(workflow(), action("ocr"))
    doc["steps"].append(action("validate", dependencies=["ocr"]))
    assert only_problem(doc) == (
        "step 'validate': field 'dependencies': step 'ocr' is in another scope (the body of 'p'); "
        "only steps of the same list can be named"
    )


def test_b_nested_step_cannot_depend_on_an_outer_step() -> None:
    doc = workflow(
        action("a"),
        {"step_id": "p", "type": "parallel", "parallel_steps": [action("c", dependencies=["a"])]},
    )
    assert (
        "step 'c': field 'dependencies': step 'a' is in another scope (the top-level steps)"
        in only_problem(doc)
    )


def test_b_a_step_cannot_depend_on_itself() -> None:
    assert only_problem(workflow(action("a", dependencies=["a"]))) == (
        "step 'a': field 'dependencies': a step cannot depend on itself"
    )


def test_b_a_step_cannot_depend_on_a_handler() -> None:
    doc = workflow(action("a", dependencies=["h"]), handlers=[action("h")])
    assert only_problem(doc) == (
        "step 'a': field 'dependencies': "
        "'h' is a handler; only error_handlers and rollback_actions name handlers"
    )


def test_c_error_handlers_and_rollback_actions_name_handlers() -> None:
    doc = workflow(action("a"), action("b", error_handlers=["a"], rollback_actions=["undo"]))
    assert problems_of(doc) == [
        "step 'b': field 'error_handlers': "
        "'a' is a step, not a handler (declare it under 'handlers')",
        "step 'b': field 'rollback_actions': unknown handler 'undo'",
    ]


def test_c_a_handler_no_step_names_is_allowed() -> None:
    assert parse_definition(workflow(handlers=[action("spare")])).handlers[0].step_id == "spare"


def _condition(
    step_id: str, *branches: list[str], else_steps: list[str] | None = None, **fields: Any
) -> dict[str, Any]:
    conditions = [{"expression": f"x == `{i}`", "steps": steps} for i, steps in enumerate(branches)]
    return {
        "step_id": step_id,
        "type": "condition",
        "conditions": conditions,
        "else_steps": else_steps or [],
        **fields,
    }


def test_d_branch_targets_are_steps_of_the_same_scope() -> None:
    doc = _nested(workflow(), action("inner"))
    doc["steps"].append(_condition("route", ["inner"], else_steps=["ghost"]))
    assert problems_of(doc) == [
        "step 'route': field 'conditions[0].steps': "
        "step 'inner' is in another scope (the body of 'p'); "
        "only steps of the same list can be named",
        "step 'route': field 'else_steps': unknown step 'ghost'",
    ]


def test_d_a_condition_cannot_name_itself() -> None:
    doc = workflow(_condition("route", ["route"]))
    assert (
        only_problem(doc)
        == "step 'route': field 'conditions[0].steps': a condition cannot name itself"
    )


def test_d_a_target_named_by_two_branches_of_one_condition_is_an_error() -> None:
    doc = workflow(_condition("route", ["a"], else_steps=["a"]), action("a"))
    assert only_problem(doc) == (
        "step 'route': field 'else_steps': branch target 'a' is named by two branches of 'route' "
        "(conditions[0].steps and else_steps)"
    )


def test_d_a_target_named_by_two_conditions_is_an_error() -> None:
    doc = workflow(_condition("r1", ["a"]), _condition("r2", ["a"]), action("a"))
    assert only_problem(doc) == (
        "step 'r2': field 'conditions[0].steps': "
        "branch target 'a' is named by conditions 'r1' and 'r2'"
    )


def test_e_a_dependency_cycle_is_reported_as_a_path() -> None:
    doc = workflow(
        action("a", dependencies=["c"]),
        action("b", dependencies=["a"]),
        action("c", dependencies=["b"]),
    )
    assert only_problem(doc) == "step 'a': field 'dependencies': dependency cycle a -> c -> b -> a"


def test_e_a_cycle_through_a_branch_edge_is_reported() -> None:
    doc = workflow(_condition("route", ["a"], dependencies=["a"]), action("a"))
    assert only_problem(doc) == (
        "step 'route': field 'dependencies': dependency cycle route -> a -> route "
        "(a branch target runs after its condition step)"
    )


def test_e_cycles_are_found_inside_nested_bodies() -> None:
    doc = _nested(workflow(), action("x", dependencies=["y"]))
    doc["steps"][0]["parallel_steps"].append(action("y", dependencies=["x"]))
    assert only_problem(doc) == "step 'x': field 'dependencies': dependency cycle x -> y -> x"


def test_e_a_diamond_is_not_a_cycle() -> None:
    doc = workflow(
        action("a"),
        action("b", dependencies=["a"]),
        action("c", dependencies=["a"]),
        action("d", dependencies=["b", "c"]),
    )
    assert len(parse_definition(doc).steps) == 4


@pytest.mark.parametrize(
    ("step", "field"),
    [
        (action("s", input_mapping={"n": "lenght(items)"}), "input_mapping.n"),
        (action("s", output_mapping={"n": "lenght(items)"}), "output_mapping.n"),
        (
            _condition("s", ["a"])
            | {"conditions": [{"expression": "lenght(items)", "steps": ["a"]}]},
            "conditions[0].expression",
        ),
        (
            {
                "step_id": "s",
                "type": "loop",
                "loop_condition": "lenght(items)",
                "steps": [action("b")],
            },
            "loop_condition",
        ),
        (
            {"step_id": "s", "type": "loop", "for_each": "lenght(items)", "steps": [action("b")]},
            "for_each",
        ),
        ({"step_id": "s", "type": "wait", "until": "lenght(items)"}, "until"),
    ],
)
def test_f_every_expression_must_compile(step: dict[str, Any], field: str) -> None:
    assert only_problem(workflow(step, action("a"))) == (
        f"step 's': field '{field}': unknown function 'lenght()'; did you mean 'length()'?"
    )


def test_f_syntax_errors_in_expressions_are_reported() -> None:
    doc = workflow(action("a", input_mapping={"doc": "document["}))
    assert (
        only_problem(doc)
        == "step 'a': field 'input_mapping.doc': syntax error at position 9: incomplete expression"
    )


@pytest.mark.parametrize(
    ("doc", "where"),
    [
        (workflow(input_schema={"type": "strin"}), "workflow: field 'input_schema'"),
        (
            workflow(action("a", input_validation={"required": "text"})),
            "step 'a': field 'input_validation'",
        ),
        (
            workflow({"step_id": "h", "type": "human_task", "form_schema": {"properties": []}}),
            "step 'h': field 'form_schema'",
        ),
    ],
)
def test_g_json_schemas_must_be_valid(doc: dict[str, Any], where: str) -> None:
    assert only_problem(doc).startswith(f"{where}: invalid JSON Schema: at $.")


def test_h_too_many_steps_counts_nested_steps_and_handlers() -> None:
    children = [action(f"c{i}") for i in range(MAX_STEPS - 1)]
    doc = workflow(
        {"step_id": "p", "type": "parallel", "parallel_steps": children}, handlers=[action("h")]
    )
    assert only_problem(doc) == (
        f"workflow: field 'steps': {MAX_STEPS + 1} steps (nested and handlers included); "
        f"at most {MAX_STEPS}"
    )


def _nesting(levels: int) -> dict[str, Any]:
    step = action("leaf")
    for level in range(levels):
        step = {"step_id": f"p{level}", "type": "parallel", "parallel_steps": [step]}
    return workflow(step)


def test_h_parallel_and_loop_nest_at_most_max_depth() -> None:
    assert parse_definition(_nesting(MAX_DEPTH))
    assert only_problem(_nesting(MAX_DEPTH + 1)) == (
        f"step 'p0': field 'parallel_steps': parallel and loop steps nest at most {MAX_DEPTH} deep"
    )


def test_h_at_most_100_conditions_and_100_headers() -> None:
    conditions = _condition("route", *[["a"]] * 101)
    headers = {f"X-{i}": "v" for i in range(101)}
    doc = workflow(
        action("a"),
        conditions,
        {"step_id": "w", "type": "webhook", "url": "http://x.test", "headers": headers},
    )
    problems = problems_of(doc)
    assert "step 'route': field 'conditions': at most 100 conditions" in problems
    assert "step 'w': field 'headers': at most 100 headers" in problems


@pytest.mark.parametrize(
    ("handler", "field", "message"),
    [
        (action("h", dependencies=["a"]), "dependencies", "a handler cannot have dependencies"),
        (
            {"step_id": "h", "type": "parallel", "parallel_steps": [action("c")]},
            "type",
            "a handler cannot be a parallel step; use action, wait, human_task, webhook",
        ),
        (
            action("h", error_handlers=["h2"]),
            "error_handlers",
            "a handler cannot have error_handlers (compensation is one level deep)",
        ),
        (
            action("h", rollback_actions=["h2"]),
            "rollback_actions",
            "a handler cannot have rollback_actions (compensation is one level deep)",
        ),
    ],
)
def test_i_handlers_are_plain_steps_without_dependencies_or_handlers(
    handler: dict[str, Any], field: str, message: str
) -> None:
    doc = workflow(action("a", error_handlers=["h"]), handlers=[handler, action("h2")])
    assert only_problem(doc) == f"step 'h': field '{field}': {message}"


def test_j_sla_targets_are_known_and_in_range() -> None:
    doc = workflow(
        sla_targets={"duration_p95": 30, "success_rate": 1.5, "durration_p99": 4, "duration_p50": 0}
    )
    assert problems_of(doc) == [
        "workflow: field 'sla_targets.success_rate': must be between 0 and 1 (got 1.5)",
        "workflow: field 'sla_targets.durration_p99': unknown SLA target "
        "(known: duration_p50, duration_p95, duration_p99, success_rate)",
        "workflow: field 'sla_targets.duration_p50': "
        "must be a positive number of seconds (got 0.0)",
    ]


def test_semantic_problems_are_reported_together() -> None:
    doc = workflow(
        action("a", dependencies=["nope"], error_handlers=["none"]), sla_targets={"p42": 1}
    )
    assert len(problems_of(doc)) == 3


# -- the canonical document, as a property --------------------------------------------------------

_seconds = st.floats(min_value=0.001, max_value=1e6, allow_nan=False, allow_infinity=False)
_text = st.text(max_size=12)


@st.composite
def _retry_policies(draw: st.DrawFn) -> dict[str, Any]:
    return draw(
        st.fixed_dictionaries(
            {},
            optional={
                "max_retries": st.integers(0, 100),
                "retry_delay": st.floats(0, 100, allow_nan=False),
                "backoff_multiplier": st.floats(1, 10, allow_nan=False),
                "jitter": st.floats(0, 1, allow_nan=False),
                "non_retryable_errors": st.lists(
                    st.sampled_from(["KeyError", "ValueError", "Timeout"])
                ),
                "continue_on_failure": st.booleans(),
            },
        )
    )


@st.composite
def _definitions(draw: st.DrawFn) -> dict[str, Any]:
    ids = (f"s{i}" for i in itertools.count())

    def leaf() -> dict[str, Any]:
        kind = draw(st.sampled_from(["action", "wait", "human_task", "webhook"]))
        step: dict[str, Any] = {"step_id": next(ids), "type": kind}
        if kind == "action":
            step["action"] = draw(st.sampled_from(["docs.fetch", "ocr"]))
        elif kind == "wait":
            step["duration"] = draw(_seconds)
        elif kind == "webhook":
            step["url"] = "https://hooks.test/" + draw(st.sampled_from(["a", "b"]))
            step["method"] = draw(st.sampled_from(["get", "POST", "Put"]))
        step.update(
            draw(
                st.fixed_dictionaries(
                    {},
                    optional={
                        "name": _text,
                        "timeout": _seconds,
                        "retry_policy": _retry_policies(),
                        "trigger_rule": st.sampled_from(
                            ["all_success", "none_failed", "all_done", "one_success"]
                        ),
                        "input_mapping": st.dictionaries(
                            st.sampled_from(["x", "y"]), st.sampled_from(["a.b", "@", "_.item"])
                        ),
                    },
                )
            )
        )
        return step

    def chain(depth: int) -> list[dict[str, Any]]:
        steps: list[dict[str, Any]] = []
        for _ in range(draw(st.integers(1, 4))):
            step: dict[str, Any]
            if depth < 3 and draw(st.booleans()):
                step = {
                    "step_id": next(ids),
                    "type": "parallel",
                    "parallel_steps": chain(depth + 1),
                }
                if draw(st.booleans()):
                    step["max_concurrency"] = draw(st.integers(1, 8))
            else:
                step = leaf()
            if draw(st.booleans()) and steps:
                step["dependencies"] = [steps[-1]["step_id"]]
            steps.append(step)
        return steps

    doc: dict[str, Any] = {
        "workflow_id": draw(st.from_regex(r"[a-z0-9][a-z0-9._-]{0,10}", fullmatch=True)),
        "steps": chain(0),
    }
    if draw(st.booleans()):
        doc["version"] = draw(st.one_of(st.integers(0, 99), st.sampled_from(["1.0", "2024-01"])))
    if draw(st.booleans()):
        doc["retry_policy"] = draw(_retry_policies())
    if draw(st.booleans()):
        doc["handlers"] = [{"step_id": "undo", "type": "action", "action": "undo"}]
        doc["steps"][0]["rollback_actions"] = ["undo"]
    return doc


@settings(max_examples=150, deadline=None)
@given(_definitions())
def test_valid_definitions_round_trip_through_their_document(doc: dict[str, Any]) -> None:
    original = copy.deepcopy(doc)
    defn = parse_definition(doc)
    assert doc == original  # parsing does not touch the input
    document = defn.to_document()
    again = parse_definition(json.loads(json.dumps(document)))
    assert again == defn
    assert again.to_document() == document
    assert [s.step_id for s in defn.iter_steps()] == list(step_scopes(defn))
