"""Human-task forms of the console: fields generated from a task's `form_schema`, the
submitted strings read back into a JSON answer, and the problems shown beside each field.

The schema stays the authority: a value that cannot be read as its field's type is kept as
the text typed, so the schema check names the problem in its own words.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from flowledger.domain.schemas import field_problems

WHOLE = "_answer"  # the one field of a form whose schema names no properties
MAX_FIELDS = 50
MAX_VALUE_CHARS = 65_536


@dataclass(frozen=True)
class Field:
    """One input of a task form."""

    name: str
    label: str
    widget: str  # text, number, integer, boolean, choice, json
    required: bool
    description: str | None = None
    choices: list[tuple[str, str]] = field(default_factory=list)  # (value, label)


@dataclass
class TaskForm:
    """A waiting human task's form, with what was typed and what was wrong with it."""

    execution_id: str
    key: str
    step_id: str
    assignee: str | None
    fields: list[Field]
    values: dict[str, str] = field(default_factory=dict)
    errors: dict[str, list[str]] = field(default_factory=dict)
    form_errors: list[str] = field(default_factory=list)

    def fail(self, name: str | None, message: str) -> None:
        """Record a problem beside its field (or above the form when it has none)."""
        if name is not None and any(f.name == name for f in self.fields):
            self.errors.setdefault(name, []).append(message)
        else:
            self.form_errors.append(f"{name}: {message}" if name else message)

    @property
    def failed(self) -> bool:
        """Whether any problem was recorded."""
        return bool(self.errors or self.form_errors)


def form_fields(schema: dict[str, Any] | bool | None) -> list[Field]:
    """The inputs a schema asks for: one per top-level property, else one JSON box."""
    props = schema.get("properties") if isinstance(schema, dict) else None
    if not isinstance(props, dict) or not props:
        return [Field(WHOLE, "answer (JSON)", "json", required=True)]
    required = schema.get("required", []) if isinstance(schema, dict) else []
    fields = []
    for name, spec in list(props.items())[:MAX_FIELDS]:
        spec = spec if isinstance(spec, dict) else {}
        title = spec.get("title")
        description = spec.get("description")
        fields.append(
            Field(
                name=str(name),
                label=str(title) if isinstance(title, str) else str(name),
                widget=_widget(spec),
                required=isinstance(required, list) and name in required,
                description=str(description) if isinstance(description, str) else None,
                choices=_choices(spec),
            )
        )
    return fields


def _widget(spec: dict[str, Any]) -> str:
    if isinstance(spec.get("enum"), list):
        return "choice"
    kind = spec.get("type")
    if kind in ("string", "number", "integer", "boolean"):
        return str(kind) if kind != "string" else "text"
    return "json"  # objects, arrays, unions: typed as JSON


def _choices(spec: dict[str, Any]) -> list[tuple[str, str]]:
    values = spec.get("enum")
    if not isinstance(values, list):
        return []
    return [(json.dumps(v), v if isinstance(v, str) else json.dumps(v)) for v in values]


def read_answer(form: TaskForm, submitted: Mapping[str, str]) -> dict[str, Any] | None:
    """The answer the submitted strings make; problems go on `form` (None if unreadable)."""
    form.values = {f.name: submitted.get(f.name, "")[:MAX_VALUE_CHARS] for f in form.fields}
    if len(form.fields) == 1 and form.fields[0].name == WHOLE:
        whole = _parse_json(form, WHOLE, form.values[WHOLE])
        if whole is not None and not isinstance(whole, dict):
            form.fail(WHOLE, "the answer must be a JSON object")
        return whole if isinstance(whole, dict) and not form.failed else None
    answer: dict[str, Any] = {}
    for f in form.fields:
        text = form.values[f.name]
        if text.strip() == "":
            continue  # left empty: not answered (the schema says whether it must be)
        value = _read(form, f, text)
        if value is not _UNREADABLE:
            answer[f.name] = value
    return None if form.failed else answer


_UNREADABLE = object()


def _read(form: TaskForm, f: Field, text: str) -> Any:
    if f.widget == "text":
        return text
    if f.widget == "boolean":
        if text in ("true", "false"):
            return text == "true"
        form.fail(f.name, "choose yes or no")
        return _UNREADABLE
    if f.widget in ("choice", "json"):
        value = _parse_json(form, f.name, text)
        return _UNREADABLE if form.errors.get(f.name) else value
    try:
        number = int(text) if f.widget == "integer" else float(text)
    except ValueError:
        return text  # the schema names the type it wants
    if isinstance(number, float) and not math.isfinite(number):
        form.fail(f.name, "a finite number is required")
        return _UNREADABLE
    return number


def _parse_json(form: TaskForm, name: str, text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        form.fail(name, f"not valid JSON: {exc}")
        return None
    except RecursionError:
        form.fail(name, "the JSON is nested too deeply")
        return None


def check_answer(form: TaskForm, schema: dict[str, Any] | bool | None, answer: Any) -> None:
    """Put every way `answer` fails `schema` beside the field it concerns."""
    if schema is None:
        return
    for name, message in field_problems(schema, answer):
        form.fail(name, message)
