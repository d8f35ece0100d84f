"""Human-task forms of the console: fields from a form_schema, typed values read back, and
each problem put beside the field it concerns."""

from __future__ import annotations

from typing import Any

import pytest

from flowledger.adapters.console.forms import (
    WHOLE,
    TaskForm,
    check_answer,
    form_fields,
    read_answer,
)
from flowledger.domain.schemas import field_problems

SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["approved", "amount"],
    "additionalProperties": False,
    "properties": {
        "approved": {"type": "boolean", "title": "Approve?"},
        "amount": {"type": "integer", "minimum": 1},
        "ratio": {"type": "number"},
        "notes": {"type": "string", "maxLength": 5, "description": "short"},
        "tier": {"enum": ["gold", "silver", 3]},
        "lines": {"type": "array", "items": {"type": "string"}},
    },
}


def form(schema: Any = SCHEMA) -> TaskForm:
    return TaskForm("e-1", "review", "review", "legal", form_fields(schema))


def submit(values: dict[str, str], schema: Any = SCHEMA) -> tuple[TaskForm, Any]:
    f = form(schema)
    answer = read_answer(f, values)
    if answer is not None:
        check_answer(f, schema, answer)
    return f, answer


def test_each_property_gets_a_widget_of_its_type() -> None:
    fields = {f.name: f for f in form_fields(SCHEMA)}
    assert {n: f.widget for n, f in fields.items()} == {
        "approved": "boolean",
        "amount": "integer",
        "ratio": "number",
        "notes": "text",
        "tier": "choice",
        "lines": "json",
    }
    assert fields["approved"].label == "Approve?"
    assert fields["approved"].required
    assert not fields["notes"].required
    assert fields["notes"].description == "short"
    assert fields["tier"].choices == [('"gold"', "gold"), ('"silver"', "silver"), ("3", "3")]


def test_a_schema_without_properties_asks_for_the_whole_answer_as_json() -> None:
    assert [f.name for f in form_fields({"type": "object"})] == [WHOLE]
    f, answer = submit({WHOLE: '{"ok": true}'}, {"type": "object"})
    assert answer == {"ok": True}
    assert not f.failed
    f, answer = submit({WHOLE: "[1]"}, {"type": "object"})
    assert answer is None
    assert f.errors == {WHOLE: ["the answer must be a JSON object"]}


def test_a_good_answer_is_read_with_its_types() -> None:
    f, answer = submit(
        {
            "approved": "true",
            "amount": "12",
            "ratio": "0.5",
            "notes": "ok",
            "tier": "3",
            "lines": '["a"]',
        }
    )
    assert not f.failed, (f.errors, f.form_errors)
    assert answer == {
        "approved": True,
        "amount": 12,
        "ratio": 0.5,
        "notes": "ok",
        "tier": 3,
        "lines": ["a"],
    }


def test_empty_fields_are_left_out_and_a_missing_required_one_is_named() -> None:
    f, answer = submit({"approved": "", "amount": "", "notes": ""})
    assert answer == {}
    assert f.errors == {"approved": ["a value is required"], "amount": ["a value is required"]}


@pytest.mark.parametrize(
    ("values", "field", "says"),
    [
        ({"amount": "1.5"}, "amount", "is not of type 'integer'"),
        ({"amount": "0"}, "amount", "less than the minimum of 1"),
        ({"ratio": "nan"}, "ratio", "a finite number is required"),
        ({"notes": "too long"}, "notes", "is too long"),
        ({"tier": '"bronze"'}, "tier", "is not one of"),
        ({"lines": "[1"}, "lines", "not valid JSON"),
        ({"lines": "[1]"}, "lines", "at $[0]: 1 is not of type 'string'"),
    ],
)
def test_a_bad_value_is_refused_beside_its_field(
    values: dict[str, str], field: str, says: str
) -> None:
    f, _ = submit({"approved": "false", "amount": "3", **values})
    assert list(f.errors) == [field], f.errors
    assert says in f.errors[field][0]


def test_problems_of_the_whole_answer_go_above_the_form() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string"}}, "minProperties": 1}
    f, answer = submit({"a": ""}, schema)
    assert answer == {}
    assert f.errors == {}
    assert len(f.form_errors) == 1
    assert "should be non-empty" in f.form_errors[0], f.form_errors


def test_field_problems_lists_every_problem_not_only_the_best() -> None:
    found = field_problems(SCHEMA, {"amount": "x", "extra": 1})
    named = {name for name, _ in found}
    assert {"approved", "amount"} <= named
    assert any("extra" in message for _, message in found)
