"""The console's step graph: layered layout, edges, nested bodies, handlers, escaping."""

from __future__ import annotations

import itertools
import xml.etree.ElementTree as ET
from typing import Any

import pytest
import support

from flowledger.adapters.console.graph import (
    GraphLayout,
    layers,
    layout,
    render_graph,
    statuses_by_step,
)
from flowledger.domain.definitions import WorkflowDefinition, load_definition, parse_definition
from flowledger.projections.runs import StepView

NS = "{http://www.w3.org/2000/svg}"


def action(step_id: str, **fields: Any) -> dict[str, Any]:
    return {"step_id": step_id, "type": "action", "action": "do", **fields}


def definition(steps: list[dict[str, Any]], **fields: Any) -> WorkflowDefinition:
    return parse_definition({"workflow_id": "graph", "steps": steps, **fields}, "test")


@pytest.fixture(scope="module")
def example() -> WorkflowDefinition:
    path = support.EXAMPLES / "document_processing.yaml"
    return load_definition(path.read_text(), str(path))


def parse(svg: str) -> ET.Element:
    """The SVG as XML: parsing it at all shows every text and attribute was escaped."""
    return ET.fromstring(svg)


def node_element(root: ET.Element, step_id: str) -> ET.Element:
    (found,) = [g for g in root.iter(f"{NS}g") if g.get("data-step") == step_id]
    return found


def edge_elements(root: ET.Element) -> dict[tuple[str, str], ET.Element]:
    return {
        (p.get("data-from", ""), p.get("data-to", "")): p
        for p in root.iter(f"{NS}path")
        if "edge" in (p.get("class") or "").split()
    }


def view(key: str, step_id: str, status: str) -> StepView:
    return StepView(
        key=key,
        step_id=step_id,
        type="action",
        kind="step",
        handles=None,
        status=status,
        attempts=1,
        agent=None,
        started_at=None,
        last_attempt_started_at=None,
        finished_at=None,
        duration_seconds=None,
        last_attempt_seconds=None,
        last_error=None,
        recovered_by=None,
        assignee=None,
    )


# -- layout --------------------------------------------------------------------------------


def test_a_step_s_layer_is_its_longest_path_from_a_root(example: WorkflowDefinition) -> None:
    assert layers(example.steps) == {
        "fetch": 0,
        "extract": 1,
        "route": 2,
        # branch targets depend on their condition implicitly
        "invoice_pages": 3,
        "contract_review": 3,
        "classify_unknown": 3,
        "validate": 4,
        "notify": 5,
    }
    diamond = definition(
        [action("a"), action("b", dependencies=["a"]), action("c", dependencies=["a", "b"])]
    )
    assert layers(diamond.steps) == {"a": 0, "b": 1, "c": 2}


def test_a_chain_as_long_as_a_definition_may_be_is_laid_out() -> None:
    steps = [action("s0")] + [action(f"s{i}", dependencies=[f"s{i - 1}"]) for i in range(1, 999)]
    graph = layout(definition(steps))
    assert graph.node("s998").layer == 998
    assert render_graph(definition(steps), {}).count('class="edge"') == 998


def test_layers_run_left_to_right_and_a_layer_stacks_in_definition_order(
    example: WorkflowDefinition,
) -> None:
    graph = layout(example)
    tops = [graph.node(s) for s in ("fetch", "extract", "route", "validate", "notify")]
    assert [n.x for n in tops] == sorted(n.x for n in tops)
    assert len({n.x for n in tops}) == len(tops)
    column = [graph.node(s) for s in ("invoice_pages", "contract_review", "classify_unknown")]
    assert [n.y for n in column] == sorted(n.y for n in column)
    for upper, lower in itertools.pairwise(column):
        assert upper.y + upper.height < lower.y  # no overlap
    assert layout(example) == graph  # the same picture every time


def test_dependency_edges_go_from_right_side_to_left_side(example: WorkflowDefinition) -> None:
    graph = layout(example)
    deps = {(e.source, e.target) for e in graph.edges if e.kind == "dependency"}
    assert deps == {
        ("fetch", "extract"),
        ("extract", "route"),
        ("invoice_pages", "validate"),
        ("contract_review", "validate"),
        ("classify_unknown", "validate"),
        ("validate", "notify"),
    }
    for edge in graph.all_edges():
        if edge.kind in ("dependency", "branch"):
            assert edge.x2 > edge.x1


def test_branch_targets_hang_off_their_condition_on_dashed_edges(
    example: WorkflowDefinition,
) -> None:
    graph = layout(example)
    branches = {(e.source, e.target) for e in graph.edges if e.kind == "branch"}
    assert branches == {
        ("route", "invoice_pages"),
        ("route", "contract_review"),
        ("route", "classify_unknown"),
    }
    edges = edge_elements(parse(render_graph(example, {})))
    branch = edges[("route", "contract_review")]
    assert branch.get("class") == "edge branch"
    assert branch.get("stroke-dasharray")
    assert branch.get("marker-end") == "url(#arrow)"
    plain = edges[("validate", "notify")]
    assert plain.get("class") == "edge"
    assert plain.get("stroke-dasharray") is None


def test_a_branch_target_that_also_names_its_condition_gets_one_branch_edge() -> None:
    defn = definition(
        [
            {
                "step_id": "pick",
                "type": "condition",
                "conditions": [{"expression": "x", "steps": ["yes"]}],
            },
            action("yes", dependencies=["pick"]),
        ]
    )
    assert [(e.source, e.target, e.kind) for e in layout(defn).edges] == [("pick", "yes", "branch")]


def test_parallel_children_are_stacked_inside_their_container(
    example: WorkflowDefinition,
) -> None:
    graph = layout(example)
    extract = graph.node("extract")
    ocr, metadata = extract.children
    assert (ocr.step_id, metadata.step_id) == ("ocr", "metadata")
    assert ocr.x == metadata.x
    assert ocr.y + ocr.height < metadata.y
    for child in extract.children:
        assert extract.x < child.x
        assert child.x + child.width < extract.x + extract.width
        assert extract.y < child.y
        assert child.y + child.height < extract.y + extract.height
    element = node_element(parse(render_graph(example, {})), "extract")
    nested = [g.get("data-step") for g in element.iter(f"{NS}g") if g.get("data-step")]
    assert nested == ["extract", "ocr", "metadata"]
    assert element.get("data-type") == "parallel"


def test_a_loop_body_is_laid_out_in_its_own_dependency_order() -> None:
    defn = definition(
        [
            action("start"),
            {
                "step_id": "pages",
                "type": "loop",
                "for_each": "items",
                "dependencies": ["start"],
                "steps": [action("read"), action("store", dependencies=["read"])],
            },
        ]
    )
    graph = layout(defn)
    loop = graph.node("pages")
    read, store = loop.children
    assert (read.layer, store.layer) == (0, 1)
    assert read.x + read.width < store.x
    assert [(e.source, e.target) for e in loop.edges] == [("read", "store")]
    root = parse(render_graph(defn, {}))
    assert ("read", "store") in edge_elements(node_element(root, "pages"))
    assert graph.width >= loop.x + loop.width


def test_handlers_sit_in_a_row_below_with_labelled_dotted_edges(
    example: WorkflowDefinition,
) -> None:
    graph = layout(example)
    assert {h.step_id for h in graph.handlers} == {"human_review", "unpublish"}
    bottom = max(n.y + n.height for n in graph.nodes)
    row = {h.y for h in graph.handlers}
    assert len(row) == 1
    assert row.pop() > bottom
    assert {(e.source, e.target, e.kind) for e in graph.handler_edges} == {
        ("classify_unknown", "human_review", "on_error"),
        ("validate", "unpublish", "rollback"),
    }
    root = parse(render_graph(example, {}))
    edges = edge_elements(root)
    assert edges[("classify_unknown", "human_review")].get("data-kind") == "on_error"
    assert edges[("validate", "unpublish")].get("data-kind") == "rollback"
    assert "handler" in (edges[("validate", "unpublish")].get("class") or "")
    labels = {
        (t.get("data-from"), t.text)
        for t in root.iter(f"{NS}text")
        if t.get("class") == "edge-label"
    }
    assert labels == {("classify_unknown", "on error"), ("validate", "rollback")}
    assert node_element(root, "unpublish").get("data-status") == "pending"


def test_nested_steps_can_name_handlers_too() -> None:
    defn = definition(
        [
            {
                "step_id": "both",
                "type": "parallel",
                "parallel_steps": [action("left", error_handlers=["fix"]), action("right")],
            }
        ],
        handlers=[action("fix")],
    )
    graph = layout(defn)
    (edge,) = graph.handler_edges
    assert (edge.source, edge.target) == ("left", "fix")
    assert graph.node("fix").y > graph.node("both").y + graph.node("both").height


# -- the SVG -------------------------------------------------------------------------------


def test_the_root_and_the_arrow_marker_follow_the_contract(example: WorkflowDefinition) -> None:
    graph = layout(example)
    root = parse(render_graph(example, {}))
    assert root.tag == f"{NS}svg"
    assert root.get("class") == "step-graph"
    assert root.get("role") == "img"
    assert root.get("aria-label") == "step graph"
    assert root.get("viewBox") == f"0 0 {graph.width:g} {graph.height:g}"
    assert (root.get("width"), root.get("height")) == (f"{graph.width:g}", f"{graph.height:g}")
    (marker,) = root.iter(f"{NS}marker")
    assert marker.get("id") == "arrow"
    for path in edge_elements(root).values():
        assert path.get("marker-end") == "url(#arrow)"


def test_every_step_has_a_node_with_its_status_and_unreached_steps_are_pending(
    example: WorkflowDefinition,
) -> None:
    statuses = {"fetch": "completed", "ocr": "failed", "extract": "running"}
    root = parse(render_graph(example, statuses))
    ids = [s.step_id for s in example.iter_steps()]
    assert sorted(g.get("data-step", "") for g in root.iter(f"{NS}g") if g.get("data-step")) == (
        sorted(ids)
    )
    for step in example.iter_steps():
        element = node_element(root, step.step_id)
        status = statuses.get(step.step_id, "pending")
        assert element.get("class") == f"node status-{status}"
        assert element.get("data-status") == status
        assert element.get("data-type") == step.type
        own = list(element)  # its own parts, before any nested body
        assert [e.tag for e in own[:4]] == [f"{NS}title", f"{NS}rect", f"{NS}text", f"{NS}text"]
        assert own[2].get("class") == "label"
        assert own[3].get("class") == "status"
        assert own[3].text == status


def test_untrusted_names_and_statuses_are_escaped() -> None:
    name = "<script>alert(\"x\")</script> & 'quoted'"
    defn = definition([action("a", name=name), action("b", dependencies=["a"])])
    svg = render_graph(defn, {"a": 'done" onload="evil()', "b": "<b>"})
    assert "<script" not in svg
    assert "onload=" not in svg.replace("onload=&quot;", "")
    root = parse(svg)
    a = node_element(root, "a")
    title, _, label, _ = list(a)[:4]
    assert title.text is not None
    assert name in title.text
    assert label.text is not None
    assert label.text.startswith("<script>")
    assert a.get("data-status") == 'done" onload="evil()'
    assert a.get("class") == "node status-done--onload--evil--"  # one safe class token
    assert node_element(root, "b").get("class") == "node status--b-"


def test_long_names_are_cut_with_an_ellipsis_and_the_title_has_the_whole(
    example: WorkflowDefinition,
) -> None:
    long = "extract_every_line_item_from_the_page_and_its_totals"
    defn = definition([action(long)])
    root = parse(render_graph(defn, {}))
    title, _, label, _ = list(node_element(root, long))[:4]
    assert label.text is not None
    assert label.text.endswith("\u2026")
    assert len(label.text) < len(long)
    assert long.startswith(label.text[:-1])
    assert title.text is not None
    assert long in title.text


def test_no_inline_styles_or_scripts(example: WorkflowDefinition) -> None:
    svg = render_graph(example, {"fetch": "completed"})
    assert "style=" not in svg
    assert "<style" not in svg
    assert "<script" not in svg


def test_the_layout_is_a_plain_value(example: WorkflowDefinition) -> None:
    graph = layout(example)
    assert isinstance(graph, GraphLayout)
    assert {n.step_id for n in graph.iter_nodes()} == {s.step_id for s in example.iter_steps()}
    with pytest.raises(KeyError):
        graph.node("nope")


# -- statuses per step ---------------------------------------------------------------------


def test_one_status_per_step_from_its_instances() -> None:
    views = [
        view("a", "a", "completed"),
        # loop iterations: an active one wins
        view("l[0]/body", "body", "completed"),
        view("l[1]/body", "body", "waiting"),
        view("l[2]/body", "body", "running"),
        # else a failed one
        view("m[0]/x", "x", "failed"),
        view("m[1]/x", "x", "completed"),
        # else the last
        view("n[0]/y", "y", "completed"),
        view("n[1]/y", "y", "skipped"),
        view("a:on_error:fix", "fix", "completed"),
    ]
    assert statuses_by_step(views) == {
        "a": "completed",
        "body": "running",
        "x": "failed",
        "y": "skipped",
        "fix": "completed",
    }
