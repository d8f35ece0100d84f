"""The geometry of the step graph: steps layered left to right by their longest path from
a root, containers (parallel, loop) around their bodies, handlers in a row below. Pure:
`graph.py` writes the markup from it."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace

from flowledger.domain.definitions import ConditionStep, Step, WorkflowDefinition, children

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
