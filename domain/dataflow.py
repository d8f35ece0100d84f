"""What each step reads from and writes to the execution's data document, from its mappings.

The optimizer may run two steps side by side only when the later one reads nothing the
earlier one writes. Reads are the field names a step's expressions mention (any field, at
any depth: an over-approximation, so a doubt keeps the steps in order); a step without an
`input_mapping` receives the whole document, and an expression that uses `@` may read any
of it: both read EVERYTHING. Writes are the `output_mapping` keys, or the step id without
one. A parallel or loop step reads and writes what its body does, and its own result.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final

from flowledger.domain.definitions import (
    ConditionStep,
    LoopStep,
    StepBase,
    WaitStep,
    children,
)
from flowledger.domain.expressions import compile_expression

EVERYTHING: Final = "*"  # a read of the whole document


@dataclass(frozen=True, slots=True)
class DataFlow:
    """The top-level data keys a step (with its body) may read, and the keys it writes."""

    reads: frozenset[str]
    writes: frozenset[str]

    def reads_any_of(self, keys: frozenset[str]) -> bool:
        """Whether the step may read one of `keys` (always, if it reads everything)."""
        return EVERYTHING in self.reads or bool(self.reads & keys)


def data_flow(step: StepBase) -> DataFlow:
    """The reads and writes of a step and everything nested in it."""
    reads: set[str] = set()
    writes: set[str] = set()
    for s in _with_body(step):
        reads |= _reads(s)
        writes |= set(s.output_mapping) if s.output_mapping is not None else {s.step_id}
    return DataFlow(frozenset(reads), frozenset(writes))


def _with_body(step: StepBase) -> Iterator[StepBase]:
    yield step
    for child in children(step):
        yield from _with_body(child)


def _reads(step: StepBase) -> set[str]:
    exprs: list[str] = []
    if step.input_mapping is None:
        if not isinstance(step, ConditionStep | LoopStep | WaitStep):
            return {EVERYTHING}
    else:
        exprs.extend(step.input_mapping.values())
    if isinstance(step, ConditionStep):
        exprs.extend(c.expression for c in step.conditions)
    elif isinstance(step, LoopStep):
        exprs.extend(e for e in (step.loop_condition, step.for_each) if e is not None)
    elif isinstance(step, WaitStep) and step.until is not None:
        exprs.append(step.until)
    names: set[str] = set()
    for expr in exprs:
        names |= _names(compile_expression(expr).parsed)
    return names


def _names(node: Any) -> set[str]:
    found: set[str] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if isinstance(n, dict):
            kind = n.get("type")
            if kind == "field":
                found.add(str(n.get("value")))
            elif kind == "current":
                return {EVERYTHING}
            stack.extend(n.get("children", []))
        elif isinstance(n, list):
            stack.extend(n)
    return found
