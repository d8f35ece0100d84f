"""Bounds on untrusted JSON: inputs and answers that are not plain, bounded JSON are refused."""

from __future__ import annotations

import math

import pytest
import support

from flowledger.domain.errors import InputInvalid
from flowledger.domain.limits import MAX_JSON_DEPTH, json_depth
from flowledger.domain.workflow import Workflow
from flowledger.services.app import check_input

WF = Workflow(support.workflow({"steps": [{"step_id": "a", "type": "wait", "duration": 0}]}))


def nested(levels: int) -> dict[str, object]:
    """An object whose lists nest `levels` deep in all (built without recursion)."""
    inner: list[object] = []
    for _ in range(levels - 2):
        inner = [inner]
    return {"a": inner}


def test_json_depth_counts_objects_and_lists() -> None:
    assert json_depth(1) == 0
    assert json_depth({"a": [1, {"b": 2}]}) == 3
    assert json_depth(nested(MAX_JSON_DEPTH)) == MAX_JSON_DEPTH


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"a": math.nan}, "not JSON"),
        ({"a": math.inf}, "not JSON"),
        (nested(MAX_JSON_DEPTH + 1), f"deeper than {MAX_JSON_DEPTH} levels"),
        (nested(5000), f"deeper than {MAX_JSON_DEPTH} levels"),
        ({"a": "x" * (2**20 + 1)}, "at most 1048576"),
        (["not", "an", "object"], "must be a JSON object"),
    ],
    ids=["nan", "infinity", "one-level-too-deep", "far-too-deep", "too-large", "not-an-object"],
)
def test_an_input_that_is_not_bounded_json_is_refused(data: object, message: str) -> None:
    with pytest.raises(InputInvalid, match=message):
        check_input(WF, data)


def test_an_input_at_the_bounds_is_accepted() -> None:
    check_input(WF, nested(MAX_JSON_DEPTH))
