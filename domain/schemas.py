"""JSON Schema checks for definitions and validation of user data against them."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from functools import lru_cache
from typing import Any

from jsonschema.exceptions import SchemaError, best_match
from jsonschema.protocols import Validator
from jsonschema.validators import Draft202012Validator, validator_for
from referencing.exceptions import Unresolvable
from referencing.jsonschema import DRAFT202012, EMPTY_REGISTRY, specification_with

_MESSAGE_LIMIT = 300


def check_schema(schema: Any) -> str | None:
    """Return a one-line reason why `schema` is not a valid JSON Schema, or None."""
    if isinstance(schema, bool):
        return None
    if not isinstance(schema, dict):
        return f"a schema must be a mapping or a boolean, got {type(schema).__name__}"
    try:
        problem = _json_problem(schema, "$")
        if problem:
            return problem
        dialect = schema.get("$schema")
        if dialect is not None and not _known_dialect(dialect):
            return f"at $.$schema: unknown dialect {dialect!r}"
        cls = validator_for(schema, default=Draft202012Validator)
        cls.check_schema(schema)
        return _ref_problem(schema, cls)
    except SchemaError as exc:
        return _message(exc.message, list(exc.absolute_path))
    except RecursionError:
        return "the schema is nested too deeply"


def validate_instance(schema: dict[str, Any] | bool, instance: Any) -> str | None:
    """Return a one-line reason why `instance` does not satisfy `schema`, or None."""
    validator = _validator(json.dumps(schema, sort_keys=True))
    try:
        error = best_match(validator.iter_errors(instance))
    except Unresolvable as exc:
        return f"the schema cannot be used: {_shorten(str(exc))}"
    if error is None:
        return None
    return _message(error.message, list(error.absolute_path))


def field_problems(
    schema: dict[str, Any] | bool, instance: Any, limit: int = 20
) -> list[tuple[str | None, str]]:
    """Every reason `instance` fails `schema` (at most `limit`), each with the top-level
    property it concerns (None: the instance as a whole), for a form to show beside its
    fields."""
    validator = _validator(json.dumps(schema, sort_keys=True))
    found: list[tuple[str | None, str]] = []
    try:
        for error in validator.iter_errors(instance):
            path = list(error.absolute_path)
            if error.validator == "required" and not path and isinstance(instance, dict):
                names = error.validator_value if isinstance(error.validator_value, list) else []
                # jsonschema reports each missing property as its own error of the list.
                for name in names:
                    problem = (str(name), "a value is required")
                    if name not in instance and problem not in found:
                        found.append(problem)
            elif path:
                found.append((str(path[0]), _message(error.message, path[1:])))
            else:
                found.append((None, _shorten(error.message)))
            if len(found) >= limit:
                break
    except Unresolvable as exc:
        return [(None, f"the schema cannot be used: {_shorten(str(exc))}")]
    return found[:limit]


@lru_cache(maxsize=1024)
def _validator(key: str) -> Validator:
    schema = json.loads(key)
    # An empty registry: never fetch a remote $ref (no I/O in the domain, no SSRF).
    return validator_for(schema, default=Draft202012Validator)(schema, registry=EMPTY_REGISTRY)


def _known_dialect(dialect: Any) -> bool:
    if not isinstance(dialect, str):
        return False
    cls = validator_for({"$schema": dialect}, default=Draft202012Validator)
    if cls is not Draft202012Validator:
        return True
    return dialect.rstrip("#") == str(Draft202012Validator.META_SCHEMA["$id"]).rstrip("#")


def _ref_problem(schema: dict[str, Any], cls: type[Validator]) -> str | None:
    """Catch a local `$ref` typo at registration instead of at the first execution."""
    refs = list(_refs(schema))
    # Nested $id changes the base URI; resolving from the root would then be wrong.
    nested = (sub for sub in _subschemas(schema) if sub is not schema)
    if not refs or any(isinstance(sub.get("$id", sub.get("id")), str) for sub in nested):
        return None
    spec = specification_with(str(cls.META_SCHEMA.get("$schema", "")), default=DRAFT202012)
    resolver = EMPTY_REGISTRY.with_resource("", spec.create_resource(schema)).resolver()
    for ref in refs:
        if ref.startswith("#"):
            try:
                resolver.lookup(ref)
            except Unresolvable:
                return f"$ref {ref!r} does not resolve within the schema"
    return None


def _refs(schema: dict[str, Any]) -> Iterator[str]:
    for sub in _subschemas(schema):
        ref = sub.get("$ref")
        if isinstance(ref, str):
            yield ref


def _subschemas(value: Any) -> Iterator[dict[str, Any]]:
    stack = [value]
    while stack:
        current = stack.pop()
        if isinstance(current, dict):
            yield current
            stack.extend(current.values())
        elif isinstance(current, list):
            stack.extend(current)


def _json_problem(value: Any, path: str) -> str | None:
    """Schemas are stored in events as JSON: YAML dates, odd keys or NaN would not survive."""
    if value is None or isinstance(value, str | bool | int):
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else f"at {path}: {value} is not a JSON number"
    if isinstance(value, list):
        for index, item in enumerate(value):
            problem = _json_problem(item, f"{path}[{index}]")
            if problem:
                return problem
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                return f"at {path}: key {key!r} is not a string"
            problem = _json_problem(item, _json_path_join(path, key))
            if problem:
                return problem
        return None
    return f"at {path}: {type(value).__name__} value {value!r} is not JSON"


def _message(message: str, path: list[str | int]) -> str:
    text = _shorten(message)
    if not path:
        return text
    json_path = "$"
    for part in path:
        json_path = (
            f"{json_path}[{part}]" if isinstance(part, int) else _json_path_join(json_path, part)
        )
    return f"at {json_path}: {text}"


def _json_path_join(path: str, key: str) -> str:
    return f"{path}.{key}" if key.isidentifier() else f"{path}[{json.dumps(key)}]"


def _shorten(message: str) -> str:
    text = " ".join(message.split())
    return text if len(text) <= _MESSAGE_LIMIT else text[: _MESSAGE_LIMIT - 3] + "..."
