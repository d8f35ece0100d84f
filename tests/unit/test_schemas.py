"""JSON Schema helpers: checking schemas at registration and validating data against them."""

from __future__ import annotations

import datetime
from typing import Any

import pytest

from flowledger.domain import schemas
from flowledger.domain.schemas import check_schema, validate_instance

DRAFT_07 = "http://json-schema.org/draft-07/schema#"
APPROVAL = {
    "type": "object",
    "required": ["approved"],
    "properties": {"approved": {"type": "boolean"}, "notes": {"type": "string"}},
}


@pytest.mark.parametrize("schema", [APPROVAL, {}, True, False, {"$schema": DRAFT_07}])
def test_valid_schemas_have_no_problem(schema: Any) -> None:
    assert check_schema(schema) is None


@pytest.mark.parametrize("schema", [["type", "object"], "object", 5, None])
def test_a_schema_must_be_a_mapping_or_a_boolean(schema: Any) -> None:
    problem = check_schema(schema)
    assert problem is not None
    assert problem.startswith("a schema must be a mapping or a boolean")


def test_invalid_keyword_value_names_its_place_in_the_schema() -> None:
    problem = check_schema({"properties": {"age": {"minimum": "ten"}}})
    assert problem == "at $.properties.age.minimum: 'ten' is not of type 'number'"


def test_unknown_type_name_is_rejected() -> None:
    problem = check_schema({"type": "bool"})
    assert problem is not None
    assert problem.startswith("at $.type:")


def test_unknown_dialect_is_rejected() -> None:
    assert check_schema({"$schema": "https://example.com/my-draft"}) == (
        "at $.$schema: unknown dialect 'https://example.com/my-draft'"
    )


def test_dollar_schema_selects_the_draft() -> None:
    tuple_items = {"type": "array", "items": [{"type": "string"}, {"type": "integer"}]}
    assert check_schema(tuple_items) is not None  # not a schema in 2020-12
    assert check_schema({"$schema": DRAFT_07, **tuple_items}) is None
    problem = validate_instance({"$schema": DRAFT_07, **tuple_items}, ["a", "b"])
    assert problem == "at $[1]: 'b' is not of type 'integer'"


@pytest.mark.parametrize(
    ("schema", "where"),
    [
        ({"default": datetime.date(2024, 1, 1)}, "at $.default"),
        ({"maximum": float("nan")}, "at $.maximum"),
        ({"properties": {1: {}}}, "at $.properties: key 1"),
    ],
)
def test_values_that_are_not_json_are_rejected(schema: dict[str, Any], where: str) -> None:
    problem = check_schema(schema)
    assert problem is not None
    assert problem.startswith(where)


def test_local_ref_that_does_not_resolve_is_rejected() -> None:
    schema = {
        "$defs": {"address": {"type": "string"}},
        "properties": {"a": {"$ref": "#/$defs/adress"}},
    }
    assert check_schema(schema) == "$ref '#/$defs/adress' does not resolve within the schema"


def test_local_ref_that_resolves_is_accepted() -> None:
    schema = {
        "$defs": {"address": {"type": "string"}},
        "properties": {"a": {"$ref": "#/$defs/address"}},
    }
    assert check_schema(schema) is None
    assert validate_instance(schema, {"a": 5}) == "at $.a: 5 is not of type 'string'"


def test_valid_instance_has_no_problem() -> None:
    assert validate_instance(APPROVAL, {"approved": True}) is None


def test_wrong_type_names_the_json_path() -> None:
    problem = validate_instance(APPROVAL, {"approved": "yes"})
    assert problem == "at $.approved: 'yes' is not of type 'boolean'"


def test_missing_required_property_is_named() -> None:
    assert validate_instance(APPROVAL, {}) == "'approved' is a required property"


def test_paths_into_arrays_and_odd_keys_are_quoted() -> None:
    schema = {"properties": {"line items": {"items": {"type": "integer"}}}}
    problem = validate_instance(schema, {"line items": [1, "two"]})
    assert problem == "at $[\"line items\"][1]: 'two' is not of type 'integer'"


def test_boolean_schemas_accept_everything_or_nothing() -> None:
    assert validate_instance(True, {"any": "thing"}) is None
    assert validate_instance(False, 1) == "False schema does not allow 1"


def test_long_messages_are_shortened_to_one_line() -> None:
    problem = validate_instance({"type": "string"}, {"text": "line\n" * 500})
    assert problem is not None
    assert "\n" not in problem
    assert len(problem) <= 300


def test_remote_refs_are_never_fetched() -> None:
    problem = validate_instance({"$ref": "https://example.com/schema.json"}, 1)
    assert problem is not None
    assert problem.startswith("the schema cannot be used: ")


def test_compiled_validators_are_reused_for_equal_schemas() -> None:
    schemas._validator.cache_clear()
    validate_instance({"type": "object", "required": ["a"]}, {"a": 1})
    validate_instance({"required": ["a"], "type": "object"}, {})
    info = schemas._validator.cache_info()
    assert (info.misses, info.hits) == (1, 1)
