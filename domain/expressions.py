"""JMESPath expressions over an execution's data: compile once, check at registration, evaluate."""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from functools import lru_cache
from typing import Any

import jmespath
from jmespath.exceptions import (
    EmptyExpressionError,
    IncompleteExpressionError,
    JMESPathError,
    LexerError,
    ParseError,
)
from jmespath.functions import Functions
from jmespath.parser import ParsedResult

from flowledger.domain.errors import ExpressionError

MAX_EXPRESSION_LENGTH = 4096

# name -> (number of declared arguments, variadic): JMESPath only checks arity when it calls.
_FUNCTIONS: dict[str, tuple[int, bool]] = {
    name: (len(spec["signature"]), any(arg.get("variadic", False) for arg in spec["signature"]))
    for name, spec in Functions.FUNCTION_TABLE.items()
}


@lru_cache(maxsize=4096)
def compile_expression(expr: str) -> ParsedResult:
    """Compile a JMESPath expression, rejecting syntax errors and unknown functions."""
    if len(expr) > MAX_EXPRESSION_LENGTH:
        raise ValueError(f"expression is {len(expr)} characters; at most {MAX_EXPRESSION_LENGTH}")
    try:
        parsed = jmespath.compile(expr)
    except JMESPathError as exc:
        raise ValueError(_syntax_message(exc)) from None
    except RecursionError:
        raise ValueError("expression is nested too deeply") from None
    for node in _walk(parsed.parsed):
        if node.get("type") == "function_expression":
            _check_call(str(node.get("value")), len(node.get("children", [])))
    return parsed


def check_expression(expr: str) -> str | None:
    """Return why `expr` is not a usable expression, or None if it is."""
    try:
        compile_expression(expr)
    except ValueError as exc:
        return str(exc)
    return None


def evaluate(expr: str, data: Any) -> Any:
    """Evaluate `expr` against `data`; a compile or runtime failure raises ExpressionError."""
    try:
        return compile_expression(expr).search(data)
    # Besides JMESPathError (a ValueError), built-in functions can overflow or recurse.
    except (ValueError, TypeError, ArithmeticError, RecursionError) as exc:
        raise ExpressionError(f"expression {expr!r}: {_one_line(str(exc))}") from None


def truthy(value: Any) -> bool:
    """JMESPath truthiness: false, null, "", [] and {} are false; 0 is true."""
    if value is None or value is False:
        return False
    if isinstance(value, str | list | tuple | dict):
        return len(value) > 0
    return True


def _check_call(name: str, arg_count: int) -> None:
    if name not in _FUNCTIONS:
        message = f"unknown function '{name}()'"
        close = difflib.get_close_matches(name, list(_FUNCTIONS), n=1)
        if close:
            message += f"; did you mean '{close[0]}()'?"
        raise ValueError(message)
    expected, variadic = _FUNCTIONS[name]
    if arg_count < expected or (arg_count > expected and not variadic):
        wanted = f"at least {expected}" if variadic else str(expected)
        plural = "" if expected == 1 else "s"
        raise ValueError(f"function '{name}()' takes {wanted} argument{plural}, got {arg_count}")


def _walk(node: Any) -> Iterator[dict[str, Any]]:
    stack = [node]
    while stack:
        current = stack.pop()
        if isinstance(current, dict):
            yield current
            stack.extend(current.get("children", []))


def _syntax_message(exc: JMESPathError) -> str:
    if isinstance(exc, EmptyExpressionError):
        return "expression is empty"
    if not isinstance(exc, ParseError):
        return _one_line(str(exc))
    if isinstance(exc, LexerError):
        detail = exc.message
    elif isinstance(exc, IncompleteExpressionError):
        detail = "incomplete expression"
    else:
        detail = exc.msg
    return f"syntax error at position {exc.lex_position}: {_one_line(detail)}"


def _one_line(message: str) -> str:
    return " ".join(message.split())
