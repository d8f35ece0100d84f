"""The optimizer's pure parts: data flow from mappings, JSON Patch, the graph simulation."""

from __future__ import annotations

import random

import pytest
import support
from hypothesis import given
from hypothesis import strategies as st

from flowledger.domain.dataflow import EVERYTHING, data_flow
from flowledger.domain.errors import InputInvalid
from flowledger.domain.patch import apply_patch
from flowledger.services.simulation import Run, longest_path, predict, topological


def step(doc: dict) -> object:
    wf = support.workflow({"steps": [doc]})
    return wf.steps[0]


# -- data flow -------------------------------------------------------------------------------


def test_a_step_reads_the_fields_its_input_mapping_names_and_writes_its_output_keys():
    flow = data_flow(
        step(
            {
                "step_id": "s",
                "type": "action",
                "action": "a",
                "input_mapping": {"x": "order.lines[?qty > `1`].sku", "y": "length(items)"},
                "output_mapping": {"total": "sum", "count": "n"},
            }
        )
    )
    assert flow.reads == {"order", "lines", "qty", "sku", "items"}
    assert flow.writes == {"total", "count"}


def test_without_input_mapping_or_with_at_a_step_reads_everything():
    assert data_flow(step({"step_id": "s", "type": "action", "action": "a"})).reads == {EVERYTHING}
    at = step({"step_id": "s", "type": "action", "action": "a", "input_mapping": {"x": "@"}})
    assert data_flow(at).reads_any_of(frozenset({"anything"}))


def test_a_parallel_step_reads_and_writes_what_its_children_do():
    flow = data_flow(
        step(
            {
                "step_id": "p",
                "type": "parallel",
                "input_mapping": {},
                "parallel_steps": [
                    {
                        "step_id": "c1",
                        "type": "action",
                        "action": "a",
                        "input_mapping": {"u": "url"},
                    },
                    {
                        "step_id": "c2",
                        "type": "action",
                        "action": "a",
                        "input_mapping": {"d": "doc"},
                        "output_mapping": {"meta": "m"},
                    },
                ],
            }
        )
    )
    assert flow.reads == {"url", "doc"}
    assert flow.writes == {"p", "c1", "meta"}


# -- JSON Patch ------------------------------------------------------------------------------


def test_patch_adds_replaces_removes_and_leaves_the_original_alone():
    doc = {"steps": [{"step_id": "a", "dependencies": ["x"]}, {"step_id": "b"}]}
    patched = apply_patch(
        doc,
        [
            {"op": "test", "path": "/steps/0/step_id", "value": "a"},
            {"op": "replace", "path": "/steps/0/dependencies", "value": []},
            {"op": "add", "path": "/steps/1/cache", "value": {"ttl": 60}},
            {"op": "add", "path": "/steps/-", "value": {"step_id": "c"}},
            {"op": "remove", "path": "/steps/1/step_id"},
        ],
    )
    assert patched == {
        "steps": [{"step_id": "a", "dependencies": []}, {"cache": {"ttl": 60}}, {"step_id": "c"}]
    }
    assert doc == {"steps": [{"step_id": "a", "dependencies": ["x"]}, {"step_id": "b"}]}


@pytest.mark.parametrize(
    ("op", "message"),
    [
        ({"op": "replace", "path": "/nope", "value": 1}, "does not exist"),
        ({"op": "add", "path": "/steps/7", "value": 1}, "out of range"),
        ({"op": "add", "path": "/steps/x", "value": 1}, "not an array index"),
        ({"op": "move", "path": "/steps/0"}, "unknown op"),
        ({"op": "add", "path": "steps"}, "must start with '/'"),
        ({"op": "add", "path": "/steps/0"}, "needs a 'value'"),
        ({"op": "test", "path": "/steps/0", "value": 2}, "does not hold"),
        ({"op": "add", "path": "", "value": {}}, "whole document"),
    ],
)
def test_a_bad_patch_operation_is_refused_by_number(op, message):
    with pytest.raises(InputInvalid, match=f"patch operation 1: .*{message}"):
        apply_patch({"steps": [1]}, [op])


# -- simulation ------------------------------------------------------------------------------


def test_the_longest_path_follows_the_dependencies_that_end_last():
    graph = {"a": [], "b": ["a"], "c": ["a"], "d": ["b", "c"]}
    span, path = longest_path(graph, topological(graph), {"a": 1, "b": 5, "c": 2, "d": 1})
    assert (span, path) == (7, ["a", "b", "d"])


def test_a_cycle_is_refused():
    with pytest.raises(ValueError, match="cycle"):
        topological({"a": ["b"], "b": ["a"]})


durations = st.dictionaries(
    st.sampled_from("abcde"), st.floats(min_value=0, max_value=10), min_size=5, max_size=5
)


@given(durations)
def test_a_path_is_no_shorter_than_its_slowest_step_and_no_longer_than_all_of_them(d):
    graph = {"a": [], "b": ["a"], "c": [], "d": ["b", "c"], "e": ["a"]}
    span, path = longest_path(graph, topological(graph), d)
    assert max(d.values()) <= span + 1e-9
    assert span <= sum(d.values()) + 1e-9
    assert sum(d[s] for s in path) == pytest.approx(span)


def test_no_change_predicts_no_change_and_side_by_side_predicts_the_saving():
    graph = {"a": [], "b": ["a"]}
    rng = random.Random(1)
    runs = [Run(str(i), 0.3 + 0.01 * i, {"a": 0.1, "b": 0.15}) for i in range(30)]
    same = predict(runs, graph, rng)
    assert same.change_p50 == 0
    assert same.baseline_p50 == same.observed_p50
    side = predict(runs, graph, rng, new_graph={"a": [], "b": []})
    assert side.change_p50 == pytest.approx(-0.1)  # the shorter of the two no longer waits
    assert side.interval_p50[0] <= side.change_p50 <= side.interval_p50[1]
