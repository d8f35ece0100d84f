"""The step graph of one workflow version as SVG: layered left to right, each step's status.

`layout` places the boxes (pure geometry, unit-testable); `render_graph` writes the markup.
Colours come from the console's stylesheet by class (`status-<status>`), never from a
`style` attribute: the pages' Content-Security-Policy allows stylesheets only.
"""

from __future__ import annotations

import html
import math
import re
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace

from flowledger.domain.definitions import ConditionStep, Step, WorkflowDefinition, children
from flowledger.projections.runs import StepView

NODE_W, NODE_H = 168.0, 44.0
COL_GAP, ROW_GAP = 56.0, 16.0
PAD = 12.0  # inside a container, around its body
HEADER = 44.0  # a container's own label and status, above its body
MARGIN = 16.0
HANDLER_GAP = 56.0  # between the graph and the handlers row: room for the edge labels
HANDLER_SPACING = 24.0
CHAR_W = 7.0  # a 12px sans-serif character, near enough to size labels
TEXT_PAD = 8.0

Sizes = dict[str, tuple[float, float]]  # step_id -> width, height of its box

# Of the instances of one step (loop iterations), the one the graph shows.
_ACTIVE = ("running", "retrying", "waiting")


@dataclass(frozen=True)
class Edge:
    """A line between two steps: kind "dependency", "branch", "on_error" or "rollback"."""

    source: str
    target: str
    kind: str
    x1: float
    y1: float
    x2: float
    y2: float


@dataclass(frozen=True)
class Node:
    """A step's box; a parallel or loop step's box holds its body (children and their edges)."""

    step_id: str
    name: str
    type: str
    layer: int  # columns from the left within its own list of steps; 0 for handlers
    x: float
    y: float
    width: float
    height: float
    children: tuple[Node, ...] = ()
    edges: tuple[Edge, ...] = ()


@dataclass(frozen=True)
class GraphLayout:
    """Where everything goes: the top-level steps, the handlers row, and the edges."""

    nodes: tuple[Node, ...]
    edges: tuple[Edge, ...]
    handlers: tuple[Node, ...]
    handler_edges: tuple[Edge, ...]
    width: float
    height: float

    def iter_nodes(self) -> Iterator[Node]:
        """Every node, nested bodies depth first, then the handlers."""

        def walk(nodes: Iterable[Node]) -> Iterator[Node]:
            for node in nodes:
                yield node
                yield from walk(node.children)

        yield from walk(self.nodes)
        yield from self.handlers

    def node(self, step_id: str) -> Node:
        """The node of a step, wherever it is; KeyError if there is none."""
        for node in self.iter_nodes():
            if node.step_id == step_id:
                return node
        raise KeyError(step_id)

    def all_edges(self) -> list[Edge]:
        """Every edge: top level, inside bodies, and to the handlers."""
        return [
            *self.edges,
            *(e for n in self.iter_nodes() for e in n.edges),
            *self.handler_edges,
        ]


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


def layout(definition: WorkflowDefinition) -> GraphLayout:
    """Place every step of the definition; coordinates are the SVG's."""
    sizes = _sizes(definition)
    nodes, edges, width, height = _place_block(definition.steps, MARGIN, MARGIN, sizes)
    graph = GraphLayout(tuple(nodes), tuple(edges), (), (), 0.0, 0.0)
    graph = replace(
        graph, handlers=_place_handlers(definition, graph, MARGIN + height + HANDLER_GAP)
    )
    right = max([MARGIN + width, *(n.x + n.width for n in graph.handlers)])
    bottom = MARGIN + height + (HANDLER_GAP + NODE_H if graph.handlers else 0.0)
    return replace(
        graph,
        handler_edges=tuple(_handler_edges(definition, graph)),
        width=right + MARGIN,
        height=bottom + MARGIN,
    )


def _place_handlers(
    definition: WorkflowDefinition, graph: GraphLayout, y: float
) -> tuple[Node, ...]:
    """The handlers in a row at `y`, each as near as it fits under the steps that name it."""
    under: dict[str, list[float]] = {h.step_id: [] for h in definition.handlers}
    for step in definition.iter_steps():
        for name in [*step.error_handlers, *step.rollback_actions]:
            if name in under:
                source = graph.node(step.step_id)
                under[name].append(source.x + source.width / 2 - NODE_W / 2)
    # Where each would like to be; handlers no step names go last (sorted() is stable).
    wanted = {name: sum(xs) / len(xs) if xs else math.inf for name, xs in under.items()}
    placed: list[Node] = []
    x = MARGIN
    for handler in sorted(definition.handlers, key=lambda h: wanted[h.step_id]):
        if wanted[handler.step_id] != math.inf:
            x = max(x, wanted[handler.step_id])
        placed.append(
            Node(handler.step_id, handler.display_name, handler.type, 0, x, y, NODE_W, NODE_H)
        )
        x += NODE_W + HANDLER_SPACING
    return tuple(placed)


def layers(steps: Sequence[Step]) -> dict[str, int]:
    """Each step's column: the longest path to it from a root of its list of steps."""
    preds = _predecessors(steps)
    succs: dict[str, list[str]] = {s: [] for s in preds}
    for step_id, names in preds.items():
        for name in names:
            succs[name].append(step_id)
    unmet = {s: len(names) for s, names in preds.items()}
    # In topological order (Kahn), not by recursion: a definition may chain 1000 steps.
    ready = deque(s for s, count in unmet.items() if count == 0)
    found: dict[str, int] = {}
    while ready:
        step_id = ready.popleft()
        found[step_id] = max((found[p] + 1 for p in preds[step_id]), default=0)
        for name in succs[step_id]:
            unmet[name] -= 1
            if unmet[name] == 0:
                ready.append(name)
    for step_id in preds:  # left over only by a cycle, which registration refuses
        known = [found[p] + 1 for p in preds[step_id] if p in found]
        found.setdefault(step_id, max(known, default=0))
    return found


def _predecessors(steps: Sequence[Step]) -> dict[str, list[str]]:
    """Dependencies plus the implicit one of a branch target on its condition."""
    ids = {s.step_id for s in steps}
    preds = {s.step_id: [d for d in s.dependencies if d in ids] for s in steps}
    for source, target in _branch_pairs(steps):
        if source not in preds[target]:
            preds[target].append(source)
    return preds


def _branch_pairs(steps: Sequence[Step]) -> Iterator[tuple[str, str]]:
    ids = {s.step_id for s in steps}
    for step in steps:
        if isinstance(step, ConditionStep):
            targets = [name for branch in step.conditions for name in branch.steps]
            for name in dict.fromkeys([*targets, *step.else_steps]):
                if name in ids:
                    yield step.step_id, name


def _columns(steps: Sequence[Step]) -> list[list[Step]]:
    found = layers(steps)
    columns: list[list[Step]] = [[] for _ in range(max(found.values(), default=-1) + 1)]
    for step in steps:  # definition order within a column: stable from one render to the next
        columns[found[step.step_id]].append(step)
    return columns


def _sizes(definition: WorkflowDefinition) -> Sizes:
    """Width and height of every step's box, bodies measured before their containers."""
    sizes: Sizes = {}

    def measure(step: Step) -> tuple[float, float]:
        body = children(step)
        for child in body:
            measure(child)
        if body:
            w, h = _block_size(body, sizes)
            sizes[step.step_id] = (max(NODE_W, w + 2 * PAD), HEADER + h + PAD)
        else:
            sizes[step.step_id] = (NODE_W, NODE_H)
        return sizes[step.step_id]

    for step in definition.steps:
        measure(step)
    return sizes


def _block_size(steps: Sequence[Step], sizes: Sizes) -> tuple[float, float]:
    columns = _columns(steps)
    widths = [max(sizes[s.step_id][0] for s in col) for col in columns]
    heights = [_column_height(col, sizes) for col in columns]
    return sum(widths) + COL_GAP * (len(columns) - 1), max(heights)


def _column_height(column: list[Step], sizes: Sizes) -> float:
    return sum(sizes[s.step_id][1] for s in column) + ROW_GAP * (len(column) - 1)


def _place_block(
    steps: Sequence[Step], x0: float, y0: float, sizes: Sizes
) -> tuple[list[Node], list[Edge], float, float]:
    """Nodes and edges of one list of steps with its top left corner at (x0, y0)."""
    width, height = _block_size(steps, sizes)
    found = layers(steps)
    placed: dict[str, Node] = {}
    x = x0
    for column in _columns(steps):
        col_w = max(sizes[s.step_id][0] for s in column)
        y = y0 + (height - _column_height(column, sizes)) / 2  # columns centred on each other
        for step in column:
            w, h = sizes[step.step_id]
            node_x = x + (col_w - w) / 2
            inner: list[Node] = []
            inner_edges: list[Edge] = []
            if children(step):
                body_w, _ = _block_size(children(step), sizes)
                body_x = node_x + (w - body_w) / 2  # the body centred in its container
                inner, inner_edges, _, _ = _place_block(children(step), body_x, y + HEADER, sizes)
            placed[step.step_id] = Node(
                step.step_id,
                step.display_name,
                step.type,
                found[step.step_id],
                node_x,
                y,
                w,
                h,
                tuple(inner),
                tuple(inner_edges),
            )
            y += h + ROW_GAP
        x += col_w + COL_GAP
    nodes = [placed[s.step_id] for s in steps]
    return nodes, _scope_edges(steps, placed), width, height


def _scope_edges(steps: Sequence[Step], placed: Mapping[str, Node]) -> list[Edge]:
    branch = set(_branch_pairs(steps))
    edges = [_across(placed[s], placed[t], "branch") for s, t in branch]
    for step in steps:
        for dep in dict.fromkeys(step.dependencies):
            # A branch target that also names its condition gets the one (branch) edge.
            if dep in placed and (dep, step.step_id) not in branch:
                edges.append(_across(placed[dep], placed[step.step_id], "dependency"))
    return sorted(edges, key=lambda e: (e.x1, e.y1, e.x2, e.y2, e.source, e.target))


def _across(source: Node, target: Node, kind: str) -> Edge:
    """From the right side of `source` to the left side of `target`."""
    return Edge(
        source.step_id,
        target.step_id,
        kind,
        source.x + source.width,
        source.y + min(source.height, NODE_H) / 2,
        target.x,
        target.y + min(target.height, NODE_H) / 2,
    )


def _handler_edges(definition: WorkflowDefinition, graph: GraphLayout) -> Iterator[Edge]:
    handlers = {n.step_id: n for n in graph.handlers}
    for step in definition.iter_steps():
        for kind, names in (("on_error", step.error_handlers), ("rollback", step.rollback_actions)):
            for name in names:
                if name not in handlers:
                    continue
                source, target = graph.node(step.step_id), handlers[name]
                yield Edge(
                    step.step_id,
                    name,
                    kind,
                    source.x + source.width / 2,
                    source.y + source.height,
                    target.x + target.width / 2,
                    target.y,
                )


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


# -- markup helpers (the Gantt chart uses them too) ----------------------------------------


def esc(text: object) -> str:
    """Text escaped for SVG content or a quoted attribute: ids and names are user data."""
    return html.escape(str(text), quote=True)


def attrs(values: Mapping[str, str | None]) -> str:
    """` name="value"` for each attribute whose value is not None, values escaped."""
    return "".join(f' {name}="{esc(value)}"' for name, value in values.items() if value is not None)


def num(value: float) -> str:
    """A coordinate: at most one decimal, no trailing zeros."""
    text = f"{value:.1f}".rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


def token(value: str) -> str:
    """A value made safe as one class name: anything else than [A-Za-z0-9_-] becomes "-"."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", value) or "-"


def truncate(text: str, chars: int) -> str:
    """`text` cut to `chars` characters, the last an ellipsis when something was cut."""
    chars = max(chars, 2)
    return text if len(text) <= chars else text[: chars - 1] + "\u2026"
