"""JMESPath expressions: compile-time checks, evaluation errors and truthiness."""

from __future__ import annotations

from typing import Any

import pytest

from flowledger.domain.errors import ExpressionError
from flowledger.domain.expressions import (
    MAX_EXPRESSION_LENGTH,
    check_expression,
    compile_expression,
    evaluate,
    truthy,
)


def test_compiled_expressions_are_cached() -> None:
    assert compile_expression("a.b") is compile_expression("a.b")


def test_unknown_function_is_rejected_with_a_suggestion() -> None:
    with pytest.raises(
        ValueError, match=r"unknown function 'lenght\(\)'; did you mean 'length\(\)'\?"
    ):
        compile_expression("lenght(items)")


def test_unknown_function_nested_deep_in_the_expression_is_rejected() -> None:
    problem = check_expression("items[?contains(tags, 'x')].{n: name, s: sumof(prices)}")
    assert problem is not None
    assert "unknown function 'sumof()'" in problem


def test_unknown_function_without_a_close_name_has_no_suggestion() -> None:
    assert check_expression("frobnicate(a)") == "unknown function 'frobnicate()'"


@pytest.mark.parametrize(
    ("expr", "message"),
    [
        ("length(a, b)", "function 'length()' takes 1 argument, got 2"),
        ("merge()", "function 'merge()' takes at least 1 argument, got 0"),
        ("starts_with(a)", "function 'starts_with()' takes 2 arguments, got 1"),
    ],
)
def test_wrong_number_of_arguments_is_rejected_at_compile_time(expr: str, message: str) -> None:
    assert check_expression(expr) == message


def test_variadic_functions_accept_more_arguments() -> None:
    assert check_expression("not_null(a, b, c)") is None
    assert check_expression("merge(a, b, c)") is None


@pytest.mark.parametrize(
    ("expr", "message"),
    [
        ("a[", "syntax error at position 2: incomplete expression"),
        ("foo bar", "syntax error at position 4: Unexpected token: bar"),
        ("a ~ b", "syntax error at position 2: Unknown token ~"),
        ("", "expression is empty"),
    ],
)
def test_syntax_errors_are_reported_with_their_position(expr: str, message: str) -> None:
    assert check_expression(expr) == message
    with pytest.raises(ValueError, match=r"syntax error|empty"):
        compile_expression(expr)


def test_overlong_expression_is_rejected() -> None:
    problem = check_expression("a" * (MAX_EXPRESSION_LENGTH + 1))
    assert problem == f"expression is {MAX_EXPRESSION_LENGTH + 1} characters; at most 4096"


def test_valid_expressions_have_no_problem() -> None:
    for expr in ["doc_type == 'invoice'", "_.item", "@", "sort_by(items, &price)[0].name"]:
        assert check_expression(expr) is None


def test_evaluate_searches_the_data() -> None:
    data = {"items": [{"price": 3}, {"price": 1}], "_": {"item": "page-1", "index": 0}}
    assert evaluate("length(items)", data) == 2
    assert evaluate("sort_by(items, &price)[0].price", data) == 1
    assert evaluate("_.item", data) == "page-1"
    assert evaluate("missing.key", data) is None


def test_runtime_type_error_becomes_expression_error_naming_the_expression() -> None:
    with pytest.raises(ExpressionError, match=r"expression 'length\(n\)': .*invalid type"):
        evaluate("length(n)", {"n": 5})


def test_arithmetic_overflow_in_a_function_becomes_expression_error() -> None:
    with pytest.raises(ExpressionError, match="infinity"):
        evaluate("floor(to_number('1e999'))", {})


def test_evaluating_an_invalid_expression_raises_expression_error() -> None:
    with pytest.raises(ExpressionError, match="unknown function 'lenght\\(\\)'"):
        evaluate("lenght(items)", {"items": []})


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, False),
        (False, False),
        ("", False),
        ([], False),
        ({}, False),
        (0, True),
        (0.0, True),
        (True, True),
        ("false", True),
        ([0], True),
        ({"a": None}, True),
    ],
)
def test_truthiness_follows_jmespath(value: Any, expected: bool) -> None:
    assert truthy(value) is expected


def test_truthiness_agrees_with_jmespath_filters() -> None:
    data = {"xs": [None, False, "", [], {}, 0, "a", [1], {"k": 1}, True]}
    kept = evaluate("xs[?@]", data)
    assert kept == [x for x in data["xs"] if truthy(x)]
