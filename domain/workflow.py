"""A registered definition compiled once for the planner: step index, scopes and edges."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from flowledger.domain.definitions import (
    ActionStep,
    ConditionStep,
    HumanTaskStep,
    LoopStep,
    ParallelStep,
    RetryPolicy,
    WaitStep,
    WebhookStep,
    WorkflowDefinition,
)

AnyStep = (
    ActionStep | ConditionStep | ParallelStep | LoopStep | WaitStep | HumanTaskStep | WebhookStep
)
TOP: Final = ""  # the scope id of the top-level steps
HANDLERS: Final = "<handlers>"
LEAF_TYPES: Final = frozenset({"action", "webhook", "wait", "human_task"})
DISPATCHED_TYPES: Final = frozenset({"action", "webhook"})  # run outside the domain


@dataclass(frozen=True, slots=True)
class Node:
    """One step of the definition with what the planner needs about it."""

    step: AnyStep
    scope: str  # TOP, HANDLERS, or the id of the parallel or loop step that holds it
    deps: tuple[str, ...]  # explicit dependencies, plus the condition for a branch target
    policy: RetryPolicy
    timeout: float | None
    branch_of: str | None = None  # the condition step whose branch names this step

    @property
    def step_id(self) -> str:
        """The step's id."""
        return self.step.step_id

    @property
    def is_leaf(self) -> bool:
        """Whether the step does work itself rather than holding other steps."""
        return self.step.type in LEAF_TYPES


class Workflow:
    """A workflow version ready to plan with; built once per (id, version) and shared."""

    def __init__(self, definition: WorkflowDefinition) -> None:
        self.definition = definition
        self.nodes: dict[str, Node] = {}
        self.members: dict[str, tuple[str, ...]] = {}
        branch_owner: dict[str, str] = {}
        self._index(definition.steps, TOP, branch_owner)
        self._index(definition.handlers, HANDLERS, branch_owner)
        for step_id, owner in branch_owner.items():
            node = self.nodes[step_id]
            deps = node.deps if owner in node.deps else (*node.deps, owner)
            self.nodes[step_id] = Node(
                node.step, node.scope, deps, node.policy, node.timeout, branch_of=owner
            )

    def _index(self, steps: list[Any], scope: str, branch_owner: dict[str, str]) -> None:
        self.members[scope] = tuple(s.step_id for s in steps)
        for step in steps:
            self.nodes[step.step_id] = Node(
                step,
                scope,
                tuple(step.dependencies),
                self.definition.retry_policy_for(step),
                self.definition.attempt_timeout(step),
            )
            if isinstance(step, ConditionStep):
                for branch in step.conditions:
                    for target in branch.steps:
                        branch_owner[target] = step.step_id
                for target in step.else_steps:
                    branch_owner[target] = step.step_id
            elif isinstance(step, ParallelStep):
                self._index(step.parallel_steps, step.step_id, branch_owner)
            elif isinstance(step, LoopStep):
                self._index(step.steps, step.step_id, branch_owner)

    @property
    def workflow_id(self) -> str:
        """The workflow's id."""
        return self.definition.workflow_id

    @property
    def version(self) -> str:
        """The workflow's version."""
        return self.definition.version

    def node(self, step_id: str) -> Node:
        """The node of a step id (steps, nested bodies and handlers)."""
        return self.nodes[step_id]

    def actions(self) -> set[str]:
        """Every action name the definition's steps and handlers name."""
        return {n.step.action for n in self.nodes.values() if isinstance(n.step, ActionStep)}
