"""The step graph of one workflow version as SVG, with each step's status.

`graph_layout.layout` places the boxes; `render_graph` writes the markup. Colours come from
the console's stylesheet by class (`status-<status>`), never from a `style` attribute: the
pages' Content-Security-Policy allows stylesheets only.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from flowledger.adapters.console.graph_layout import (
    CHAR_W,
    TEXT_PAD,
    Edge,
    GraphLayout,
    Node,
    layers,
    layout,
)
from flowledger.adapters.console.svg import attrs, esc, num, token, truncate
from flowledger.domain.definitions import WorkflowDefinition
from flowledger.projections.runs import StepView

__all__ = ["Edge", "GraphLayout", "Node", "layers", "layout", "render_graph", "statuses_by_step"]

# Of the instances of one step (loop iterations), the one the graph shows.
_ACTIVE = ("running", "retrying", "waiting")


def statuses_by_step(steps: Iterable[StepView]) -> dict[str, str]:
    """The status to show per step_id when a step has several instances (loop iterations)."""
    seen: dict[str, list[str]] = {}
    for view in steps:
        seen.setdefault(view.step_id, []).append(view.status)
    shown: dict[str, str] = {}
    for step_id, statuses in seen.items():
        active = [s for s in _ACTIVE if s in statuses]
        if active:
            shown[step_id] = active[0]
        elif "failed" in statuses:
            shown[step_id] = "failed"
        else:
            shown[step_id] = statuses[-1]
    return shown


# -- layout ------------------------------------------------------------------------------


# -- SVG -----------------------------------------------------------------------------------

_EDGE_DASH = {"branch": "6 4", "on_error": "2 3", "rollback": "2 3"}
_EDGE_LABEL = {"on_error": "on error", "rollback": "rollback"}


def render_graph(definition: WorkflowDefinition, statuses: Mapping[str, str]) -> str:
    """The step graph as an `<svg class="step-graph">` element, with each step's status."""
    graph = layout(definition)
    parts = [
        "<svg"
        + attrs(
            {
                "class": "step-graph",
                "viewBox": f"0 0 {num(graph.width)} {num(graph.height)}",
                "width": num(graph.width),
                "height": num(graph.height),
                "role": "img",
                "aria-label": "step graph",
                "xmlns": "http://www.w3.org/2000/svg",
                "font-size": "12",
            }
        )
        + ">",
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" '
        'markerHeight="7" orient="auto-start-reverse">'
        '<path class="arrow-head" d="M0,0 L10,5 L0,10 z"/></marker></defs>',
    ]
    # Edges under the boxes they join; handler edges last, as they cross containers.
    parts += [_edge(e) for e in graph.edges]
    parts += [_node_svg(n, statuses) for n in graph.nodes]
    if graph.handlers:
        parts.append('<g class="handlers">')
        parts += [_node_svg(n, statuses) for n in graph.handlers]
        parts.append("</g>")
    parts += [_edge(e) for e in graph.handler_edges]
    parts.append("</svg>")
    return "".join(parts)


def _node_svg(node: Node, statuses: Mapping[str, str]) -> str:
    status = statuses.get(node.step_id, "pending")
    chars = int((node.width - 2 * TEXT_PAD) / CHAR_W)
    title = node.step_id if node.name == node.step_id else f"{node.step_id}: {node.name}"
    parts = [
        "<g"
        + attrs(
            {
                "class": f"node status-{token(status)}",
                "data-step": node.step_id,
                "data-status": status,
                "data-type": node.type,
            }
        )
        + ">",
        f"<title>{esc(f'{title} ({node.type}, {status})')}</title>",
        "<rect"
        + attrs(
            {
                "x": num(node.x),
                "y": num(node.y),
                "width": num(node.width),
                "height": num(node.height),
                "rx": "6",
            }
        )
        + "/>",
        f'<text class="label" x="{num(node.x + TEXT_PAD)}" y="{num(node.y + 18)}">'
        f"{esc(truncate(node.name, chars))}</text>",
        f'<text class="status" x="{num(node.x + TEXT_PAD)}" y="{num(node.y + 35)}">'
        f"{esc(status)}</text>",
    ]
    if node.children:
        parts.append('<g class="body">')
        parts += [_edge(e) for e in node.edges]
        parts += [_node_svg(child, statuses) for child in node.children]
        parts.append("</g>")
    parts.append("</g>")
    return "".join(parts)


def _edge(edge: Edge) -> str:
    handler = edge.kind in _EDGE_LABEL
    if handler:  # down from the step's bottom to the handler's top
        bend = max((edge.y2 - edge.y1) / 2, 12.0)
        d = (
            f"M{num(edge.x1)},{num(edge.y1)} C{num(edge.x1)},{num(edge.y1 + bend)} "
            f"{num(edge.x2)},{num(edge.y2 - bend)} {num(edge.x2)},{num(edge.y2)}"
        )
    else:  # right from the source's side to the target's
        bend = max((edge.x2 - edge.x1) / 2, 12.0)
        d = (
            f"M{num(edge.x1)},{num(edge.y1)} C{num(edge.x1 + bend)},{num(edge.y1)} "
            f"{num(edge.x2 - bend)},{num(edge.y2)} {num(edge.x2)},{num(edge.y2)}"
        )
    classes = {"dependency": "edge", "branch": "edge branch"}.get(
        edge.kind, f"edge handler {edge.kind.replace('_', '-')}"
    )
    path = (
        "<path"
        + attrs(
            {
                "class": classes,
                "data-from": edge.source,
                "data-to": edge.target,
                "data-kind": edge.kind,
                "d": d,
                "fill": "none",
                "stroke": "currentColor",
                "stroke-width": "1" if handler else "1.5",
                "stroke-dasharray": _EDGE_DASH.get(edge.kind),
                "marker-end": "url(#arrow)",
            }
        )
        + "/>"
    )
    if not handler:
        return path
    label = (
        "<text"
        + attrs(
            {
                "class": "edge-label",
                "data-from": edge.source,
                "data-to": edge.target,
                "x": num((edge.x1 + edge.x2) / 2 + 4),
                "y": num((edge.y1 + edge.y2) / 2),
            }
        )
        + f">{esc(_EDGE_LABEL[edge.kind])}</text>"
    )
    return path + label
