"""Workflow definitions: the contract of workflows.md as pydantic models, loaded and checked."""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Iterable, Iterator
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import ErrorDetails

from flowledger.domain.errors import DefinitionInvalid
from flowledger.domain.expressions import check_expression
from flowledger.domain.schemas import check_schema

DEFAULT_STEP_TIMEOUT = 300.0
MAX_DEFINITION_BYTES = 1_048_576
MAX_STEPS = 1000
MAX_DEPTH = 8
MAX_CONDITIONS = 100
MAX_HEADERS = 100
MAX_CACHE_TTL = 366 * 86_400.0  # a year (a leap one): a longer ttl is surely a typo
HANDLERS_SCOPE = "<handlers>"
STEP_TYPES = ("action", "condition", "parallel", "loop", "wait", "human_task", "webhook")
SLA_TARGETS = ("duration_p50", "duration_p95", "duration_p99", "success_rate")

# YAML aliases can expand a small file into a huge tree; bound the work before validating it.
_MAX_VALUES = 1_000_000
_MAX_NESTING = 100

TriggerRule = Literal["all_success", "none_failed", "all_done", "one_success"]
StepId = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=128)]
Seconds = Annotated[float, Field(gt=0)]
Scope = tuple[str, ...]  # () the top-level steps, ("x",) the body of "x", ("<handlers>",)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class RetryPolicy(_Model):
    """How often, and after how long, a failed step attempt is tried again."""

    max_retries: int = Field(default=3, ge=0, le=100)
    retry_delay: float = Field(default=1.0, ge=0)
    backoff_multiplier: float = Field(default=2.0, ge=1)
    max_delay: float = Field(default=60.0, ge=0)
    jitter: float = Field(default=0.1, ge=0, le=1)
    non_retryable_errors: list[str] = ["ValueError", "TypeError", "ValidationError"]
    continue_on_failure: bool = False


class CachePolicy(_Model):
    """Serve a step's result from an earlier success with the same key, for `ttl` seconds."""

    ttl: float = Field(gt=0, le=MAX_CACHE_TTL)
    key: str | None = Field(default=None, min_length=1)  # JMESPath over the step's input


class StepBase(_Model):
    """Fields common to every step type."""

    step_id: StepId
    name: str = ""
    type: str
    dependencies: list[str] = []
    trigger_rule: TriggerRule = "all_success"
    timeout: Seconds | None = None
    retry_policy: RetryPolicy | None = None
    error_handlers: list[str] = []
    rollback_actions: list[str] = []
    input_mapping: dict[str, str] | None = None
    output_mapping: dict[str, str] | None = None
    input_validation: dict[str, Any] | None = None

    @property
    def display_name(self) -> str:
        """The name to show: `name`, or the step_id when there is none."""
        return self.name or self.step_id


class ActionStep(StepBase):
    """Runs `action` on an agent that offers it."""

    type: Literal["action"]
    action: str = Field(min_length=1)
    agent_capability: str | None = None
    # An extension: remote agents the router passes over while another live agent offers
    # the capability (docs/architecture.md, "Kafka: who does what").
    avoid_agents: list[Annotated[str, Field(min_length=1, max_length=512)]] = []
    cache: CachePolicy | None = None


class ConditionBranch(_Model):
    """One branch of a condition: its steps run when `expression` is the first true one."""

    expression: str
    steps: list[str] = Field(min_length=1)


class ConditionStep(StepBase):
    """Selects the steps of the first true branch; the other branch targets are skipped."""

    type: Literal["condition"]
    conditions: list[ConditionBranch] = Field(min_length=1)
    else_steps: list[str] = []


class ParallelStep(StepBase):
    """Runs its inline children concurrently."""

    type: Literal["parallel"]
    parallel_steps: list[Step] = Field(min_length=1)
    max_concurrency: int | None = Field(default=None, ge=1)
    parallel_failure_threshold: float = Field(default=1.0, ge=0, le=1)


class LoopStep(StepBase):
    """Runs its body while `loop_condition` holds, or once per item of `for_each`."""

    type: Literal["loop"]
    steps: list[Step] = Field(min_length=1)
    loop_condition: str | None = None
    loop_max_iterations: int = Field(default=100, ge=1, le=10_000)
    for_each: str | None = None
    max_concurrency: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _one_kind_of_loop(self) -> LoopStep:
        if (self.loop_condition is None) == (self.for_each is None):
            raise ValueError("exactly one of 'loop_condition' and 'for_each' must be set")
        if self.max_concurrency is not None and self.for_each is None:
            raise ValueError("'max_concurrency' applies to 'for_each' loops only")
        return self


class WaitStep(StepBase):
    """Waits durably for `duration` seconds or until the time `until` evaluates to."""

    type: Literal["wait"]
    duration: float | None = Field(default=None, ge=0)
    until: str | None = None

    @model_validator(mode="after")
    def _one_kind_of_wait(self) -> WaitStep:
        if (self.duration is None) == (self.until is None):
            raise ValueError("exactly one of 'duration' and 'until' must be set")
        return self


class HumanTaskStep(StepBase):
    """Waits for a person's answer, validated against `form_schema`."""

    type: Literal["human_task"]
    assignee: str | None = None
    form_schema: dict[str, Any] | None = None


class WebhookStep(StepBase):
    """Sends the step input as JSON to `url`; the JSON response is the result."""

    type: Literal["webhook"]
    url: str
    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE"] = "POST"
    headers: dict[str, str] = {}
    cache: CachePolicy | None = None

    @field_validator("method", mode="before")
    @classmethod
    def _upper_method(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        # A URL may also come whole from the environment, resolved at call time.
        if not value.lower().startswith(("http://", "https://", "${env:")):
            raise ValueError("must start with http://, https:// or ${env:NAME}")
        return value


Step = Annotated[
    ActionStep | ConditionStep | ParallelStep | LoopStep | WaitStep | HumanTaskStep | WebhookStep,
    Field(discriminator="type"),
]
ParallelStep.model_rebuild()
LoopStep.model_rebuild()


class WorkflowDefinition(_Model):
    """A registered workflow: its steps, handlers and execution-wide settings."""

    workflow_id: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$", max_length=128)
    name: str = ""
    description: str = ""
    version: str = Field(default="1.0", min_length=1, max_length=64)
    timeout: Seconds = 3600.0
    max_parallel_steps: int = Field(default=10, ge=1, le=1000)
    input_schema: dict[str, Any] | None = None
    retry_policy: RetryPolicy = RetryPolicy()
    sla_targets: dict[str, float] = {}
    tags: list[str] = []
    steps: list[Step] = Field(min_length=1)
    handlers: list[Step] = []

    @field_validator("version", mode="before")
    @classmethod
    def _version_as_text(cls, value: Any) -> Any:
        # YAML reads `version: 1.0` as a float; the contract's version is text.
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        return value

    def retry_policy_for(self, step: StepBase) -> RetryPolicy:
        """The step's own retry policy, else the workflow's."""
        return step.retry_policy or self.retry_policy

    def attempt_timeout(self, step: StepBase) -> float | None:
        """Seconds one attempt of `step` may take; None when only the workflow timeout bounds it."""
        if step.timeout is not None:
            return step.timeout
        if isinstance(step, WaitStep | HumanTaskStep):
            return None
        return DEFAULT_STEP_TIMEOUT

    def iter_steps(self) -> Iterator[Step]:
        """Every step: top-level and nested bodies depth first, then the handlers."""
        for step, _ in _scoped_steps(self):
            yield step

    def to_document(self) -> dict[str, Any]:
        """The canonical JSON document; `parse_definition` reads it back to an equal definition."""
        return self.model_dump(mode="json")


def children(step: StepBase) -> list[Step]:
    """The inline body of a parallel or loop step; empty for other steps."""
    if isinstance(step, ParallelStep):
        return step.parallel_steps
    if isinstance(step, LoopStep):
        return step.steps
    return []


def step_scopes(defn: WorkflowDefinition) -> dict[str, Scope]:
    """Map each step_id to its scope: () top level, ('x',) the body of 'x', ('<handlers>',)."""
    scopes: dict[str, Scope] = {}
    for step, scope in _scoped_steps(defn):
        scopes.setdefault(step.step_id, scope)
    return scopes


def load_definition(text: str | bytes, source: str = "<definition>") -> WorkflowDefinition:
    """Parse and check a YAML or JSON definition; all problems raise as one DefinitionInvalid."""
    size = len(text.encode("utf-8", "surrogatepass")) if isinstance(text, str) else len(text)
    if size > MAX_DEFINITION_BYTES:
        raise DefinitionInvalid(
            source, [f"the definition is larger than {MAX_DEFINITION_BYTES} bytes"]
        )
    try:
        doc = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        detail = exc.problem or exc.context or "invalid YAML"
        raise DefinitionInvalid(source, [f"YAML syntax error{where}: {detail}"]) from None
    except yaml.YAMLError as exc:
        raise DefinitionInvalid(
            source, [f"cannot read YAML: {' '.join(str(exc).split())}"]
        ) from None
    except RecursionError:
        raise DefinitionInvalid(source, ["the document is nested too deeply"]) from None
    return parse_definition(doc, source)


def parse_definition(doc: Any, source: str = "<definition>") -> WorkflowDefinition:
    """Check a parsed document against the contract; all problems raise as one DefinitionInvalid."""
    if doc is None:
        raise DefinitionInvalid(source, ["the definition is empty"])
    if not isinstance(doc, dict):
        kind = type(doc).__name__
        raise DefinitionInvalid(source, [f"the definition must be a mapping, got {kind}"])
    shape = _shape_problem(doc)
    if shape:
        raise DefinitionInvalid(source, [shape])
    try:
        defn = WorkflowDefinition.model_validate(doc)
    except ValidationError as exc:
        problems = [_pydantic_problem(doc, error) for error in exc.errors(include_url=False)]
        raise DefinitionInvalid(source, problems) from None
    problems = list(_semantic_problems(defn))
    if problems:
        raise DefinitionInvalid(source, problems)
    return defn


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load, except that a key given twice in one mapping is an error, not last-wins."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: set[Hashable] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"duplicate key {key!r}",
                    key_node.start_mark,
                )
            if isinstance(key, Hashable):
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _shape_problem(doc: dict[str, Any]) -> str | None:
    count = 0
    stack: list[tuple[Any, int]] = [(doc, 1)]
    while stack:
        value, depth = stack.pop()
        count += 1
        if count > _MAX_VALUES:
            return f"the definition expands to more than {_MAX_VALUES} values"
        if depth > _MAX_NESTING:
            return f"the definition is nested deeper than {_MAX_NESTING} levels"
        if isinstance(value, dict):
            stack.extend((item, depth + 1) for item in value.values())
        elif isinstance(value, list):
            stack.extend((item, depth + 1) for item in value)
    return None


# -- pydantic errors, named by step and field ---------------------------------------------------


def _pydantic_problem(doc: dict[str, Any], error: ErrorDetails) -> str:
    label, field = _locate(doc, error["loc"])
    kind = error["type"]
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        field = [*field, "type"]
    return _problem(label, _dotted(field), _error_message(error))


def _locate(doc: dict[str, Any], loc: tuple[int | str, ...]) -> tuple[str, list[int | str]]:
    """Split a pydantic loc into the innermost step (by step_id) and the field within it."""
    label, step_type = "workflow", ""
    node: Any = doc
    path: list[int | str] = []
    field: list[int | str] = []
    in_step_list = False
    parts = list(loc)
    i = 0
    while i < len(parts):
        part = parts[i]
        path.append(part)
        if in_step_list and isinstance(part, int):
            node = node[part] if isinstance(node, list) and 0 <= part < len(node) else None
            if i + 1 < len(parts) and parts[i + 1] in STEP_TYPES:
                i += 1  # pydantic's discriminator tag: not a key of the document
                step_type = str(parts[i])
            step_id = node.get("step_id") if isinstance(node, dict) else None
            label = f"step {step_id!r}" if isinstance(step_id, str) and step_id else _dotted(path)
            field, in_step_list = [], False
        else:
            field.append(part)
            node = _child(node, part)
            if len(field) == 1:
                if step_type:
                    in_step_list = part == "parallel_steps" or (
                        part == "steps" and step_type == "loop"
                    )
                else:
                    in_step_list = part in ("steps", "handlers")
            else:
                in_step_list = False
        i += 1
    return label, field


def _child(node: Any, part: int | str) -> Any:
    if isinstance(node, dict):
        return node.get(part)
    if isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
        return node[part]
    return None


def _error_message(error: ErrorDetails) -> str:
    kind, message, value = error["type"], error["msg"], error.get("input")
    if kind == "missing":
        return "required"
    if kind == "extra_forbidden":
        return "unknown field (extra inputs are not permitted)"
    if kind == "union_tag_invalid":
        tag = (error.get("ctx") or {}).get("tag", value)
        return f"{tag!r} is not one of {', '.join(STEP_TYPES)}"
    if kind == "union_tag_not_found":
        return f"required (one of {', '.join(STEP_TYPES)})"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"expected a mapping, got {type(value).__name__}"
    if kind == "value_error":
        return message.removeprefix("Value error, ")
    message = message[:1].lower() + message[1:]
    if isinstance(value, dict | list):
        return message
    shown = repr(value)
    return f"{message} (got {shown if len(shown) <= 60 else shown[:57] + '...'})"


# -- semantic checks ----------------------------------------------------------------------------

_Scoped = list[tuple[Step, Scope]]
_ScopeOf = dict[str, Scope]


def _semantic_problems(defn: WorkflowDefinition) -> Iterator[str]:
    scoped = list(_scoped_steps(defn))
    scope_of = step_scopes(defn)
    yield from _bound_problems(defn, scoped)
    yield from _duplicate_problems(scoped)
    yield from _dependency_problems(scoped, scope_of)
    yield from _handler_problems(defn, scoped, scope_of)
    yield from _branch_problems(scoped, scope_of)
    yield from _cycle_problems(scoped, scope_of)
    yield from _expression_problems(scoped)
    yield from _cache_problems(scoped)
    yield from _schema_problems(defn, scoped)
    yield from _sla_problems(defn)


def _scoped_steps(defn: WorkflowDefinition) -> Iterator[tuple[Step, Scope]]:
    def walk(steps: Iterable[Step], scope: Scope) -> Iterator[tuple[Step, Scope]]:
        for step in steps:
            yield step, scope
            yield from walk(children(step), (*scope, step.step_id))

    yield from walk(defn.steps, ())
    yield from walk(defn.handlers, (HANDLERS_SCOPE,))


def _bound_problems(defn: WorkflowDefinition, scoped: _Scoped) -> Iterator[str]:
    if len(scoped) > MAX_STEPS:
        yield _problem(
            "workflow",
            "steps",
            f"{len(scoped)} steps (nested and handlers included); at most {MAX_STEPS}",
        )
    for step, scope in scoped:
        depth = len(scope) - (scope[:1] == (HANDLERS_SCOPE,))
        if children(step) and depth == MAX_DEPTH:
            body = "parallel_steps" if isinstance(step, ParallelStep) else "steps"
            yield _problem(
                _label(step), body, f"parallel and loop steps nest at most {MAX_DEPTH} deep"
            )
        if isinstance(step, ConditionStep) and len(step.conditions) > MAX_CONDITIONS:
            yield _problem(_label(step), "conditions", f"at most {MAX_CONDITIONS} conditions")
        if isinstance(step, WebhookStep) and len(step.headers) > MAX_HEADERS:
            yield _problem(_label(step), "headers", f"at most {MAX_HEADERS} headers")


def _duplicate_problems(scoped: _Scoped) -> Iterator[str]:
    counts: dict[str, int] = {}
    for step, _ in scoped:
        counts[step.step_id] = counts.get(step.step_id, 0) + 1
    for step_id, count in counts.items():
        if count > 1:
            yield _problem(
                f"step '{step_id}'", "step_id", f"defined {count} times; step ids are unique"
            )


def _dependency_problems(scoped: _Scoped, scope_of: _ScopeOf) -> Iterator[str]:
    for step, scope in scoped:
        if scope == (HANDLERS_SCOPE,):
            continue  # handlers may not have dependencies at all: see _handler_problems
        for name in step.dependencies:
            if name == step.step_id:
                yield _problem(_label(step), "dependencies", "a step cannot depend on itself")
                continue
            problem = _scope_problem(name, scope, scope_of)
            if problem:
                yield _problem(_label(step), "dependencies", problem)


def _handler_problems(
    defn: WorkflowDefinition,
    scoped: _Scoped,
    scope_of: _ScopeOf,
) -> Iterator[str]:
    handler_ids = {handler.step_id for handler in defn.handlers}
    for step, _ in scoped:
        for field in ("error_handlers", "rollback_actions"):
            for name in getattr(step, field):
                if name in handler_ids:
                    continue
                if name in scope_of:
                    problem = f"'{name}' is a step, not a handler (declare it under 'handlers')"
                else:
                    problem = f"unknown handler '{name}'"
                yield _problem(_label(step), field, problem)
    for handler in defn.handlers:
        if handler.dependencies:
            yield _problem(_label(handler), "dependencies", "a handler cannot have dependencies")
        if isinstance(handler, ConditionStep | ParallelStep | LoopStep):
            yield _problem(
                _label(handler),
                "type",
                f"a handler cannot be a {handler.type} step; use action, wait, human_task, webhook",
            )
        for field in ("error_handlers", "rollback_actions"):
            if getattr(handler, field):
                yield _problem(
                    _label(handler),
                    field,
                    f"a handler cannot have {field} (compensation is one level deep)",
                )


def _branch_problems(scoped: _Scoped, scope_of: _ScopeOf) -> Iterator[str]:
    claimed: dict[str, tuple[str, str]] = {}
    for step, scope in scoped:
        if not isinstance(step, ConditionStep) or scope[:1] == (HANDLERS_SCOPE,):
            continue
        for field, name in _branch_targets(step):
            if name == step.step_id:
                yield _problem(_label(step), field, "a condition cannot name itself")
                continue
            problem = _scope_problem(name, scope, scope_of)
            if problem:
                yield _problem(_label(step), field, problem)
                continue
            if name not in claimed:
                claimed[name] = (step.step_id, field)
                continue
            other, other_field = claimed[name]
            if other != step.step_id:
                problem = (
                    f"branch target '{name}' is named by conditions '{other}' and '{step.step_id}'"
                )
            elif other_field == field:
                problem = f"branch target '{name}' is named twice"
            else:
                problem = (
                    f"branch target '{name}' is named by two branches of '{other}'"
                    f" ({other_field} and {field})"
                )
            yield _problem(_label(step), field, problem)


def _branch_targets(step: ConditionStep) -> Iterator[tuple[str, str]]:
    for index, branch in enumerate(step.conditions):
        for name in branch.steps:
            yield f"conditions[{index}].steps", name
    for name in step.else_steps:
        yield "else_steps", name


def _scope_problem(name: str, scope: Scope, scope_of: _ScopeOf) -> str | None:
    where = scope_of.get(name)
    if where is None:
        return f"unknown step '{name}'"
    if where == scope:
        return None
    if where[:1] == (HANDLERS_SCOPE,):
        return f"'{name}' is a handler; only error_handlers and rollback_actions name handlers"
    place = f"the body of '{where[-1]}'" if where else "the top-level steps"
    return f"step '{name}' is in another scope ({place}); only steps of the same list can be named"


def _cycle_problems(scoped: _Scoped, scope_of: _ScopeOf) -> Iterator[str]:
    graphs: dict[Scope, dict[str, list[str]]] = {}
    explicit: set[tuple[str, str]] = set()
    for step, scope in scoped:
        if scope[:1] == (HANDLERS_SCOPE,):
            continue
        graph = graphs.setdefault(scope, {})
        for name in step.dependencies:
            if name != step.step_id and scope_of.get(name) == scope:
                graph.setdefault(step.step_id, []).append(name)
                explicit.add((step.step_id, name))
        if isinstance(step, ConditionStep):
            for _, name in _branch_targets(step):
                if name != step.step_id and scope_of.get(name) == scope:
                    graph.setdefault(name, []).append(step.step_id)
    for graph in graphs.values():
        for cycle in _find_cycles(graph):
            yield _cycle_problem(cycle, explicit)


def _find_cycles(graph: dict[str, list[str]]) -> Iterator[list[str]]:
    """Depth-first search without recursion; yields each cycle found as [a, b, ..., a]."""
    on_path: dict[str, bool] = {}  # True while on the DFS path, False once finished
    seen: set[frozenset[str]] = set()
    for root in graph:
        if root in on_path:
            continue
        on_path[root] = True
        path, pending = [root], [iter(graph[root])]
        while pending:
            nxt = next(pending[-1], None)
            if nxt is None:
                on_path[path.pop()] = False
                pending.pop()
            elif nxt not in on_path:
                on_path[nxt] = True
                path.append(nxt)
                pending.append(iter(graph.get(nxt, [])))
            elif on_path[nxt]:
                cycle = path[path.index(nxt) :]
                if frozenset(cycle) not in seen:
                    seen.add(frozenset(cycle))
                    yield [*cycle, nxt]


def _cycle_problem(cycle: list[str], explicit: set[tuple[str, str]]) -> str:
    nodes = cycle[:-1]
    edges = [i for i, edge in enumerate(itertools.pairwise(cycle)) if edge in explicit]
    branch = len(edges) < len(nodes)
    note = " (a branch target runs after its condition step)" if branch else ""
    if not edges:  # only branch edges: name the condition that names the first step
        return _problem(
            f"step '{nodes[1]}'", "conditions", f"dependency cycle {' -> '.join(cycle)}{note}"
        )
    # Start at an explicit dependency so the named step and field hold an edge to break.
    nodes = nodes[edges[0] :] + nodes[: edges[0]]
    text = " -> ".join([*nodes, nodes[0]])
    return _problem(f"step '{nodes[0]}'", "dependencies", f"dependency cycle {text}{note}")


def _expression_problems(scoped: _Scoped) -> Iterator[str]:
    for step, _ in scoped:
        expressions: list[tuple[str, str | None]] = []
        for field in ("input_mapping", "output_mapping"):
            mapping: dict[str, str] = getattr(step, field) or {}
            expressions += [(_dotted([field, key]), expr) for key, expr in mapping.items()]
        if isinstance(step, ConditionStep):
            expressions += [
                (f"conditions[{i}].expression", branch.expression)
                for i, branch in enumerate(step.conditions)
            ]
        if isinstance(step, LoopStep):
            expressions += [("loop_condition", step.loop_condition), ("for_each", step.for_each)]
        if isinstance(step, WaitStep):
            expressions.append(("until", step.until))
        if isinstance(step, ActionStep | WebhookStep) and step.cache is not None:
            expressions.append(("cache.key", step.cache.key))
        for field, expr in expressions:
            problem = None if expr is None else check_expression(expr)
            if problem:
                yield _problem(_label(step), field, problem)


def _cache_problems(scoped: _Scoped) -> Iterator[str]:
    for step, scope in scoped:
        if not isinstance(step, ActionStep | WebhookStep) or step.cache is None:
            continue
        if scope == (HANDLERS_SCOPE,):
            # A handler compensates or recovers *this* execution: another's result is no
            # substitute for running it.
            yield _problem(_label(step), "cache", "a handler cannot be served from the cache")
        elif step.rollback_actions:
            # Compensation would undo the effects of the execution the result came from.
            yield _problem(
                _label(step),
                "cache",
                "a step with rollback_actions cannot be served from the cache "
                "(its rollback would undo another execution's effects)",
            )


def _schema_problems(defn: WorkflowDefinition, scoped: _Scoped) -> Iterator[str]:
    schemas: list[tuple[str, str, dict[str, Any] | None]] = [
        ("workflow", "input_schema", defn.input_schema)
    ]
    for step, _ in scoped:
        schemas.append((_label(step), "input_validation", step.input_validation))
        if isinstance(step, HumanTaskStep):
            schemas.append((_label(step), "form_schema", step.form_schema))
    for label, field, schema in schemas:
        problem = None if schema is None else check_schema(schema)
        if problem:
            yield _problem(label, field, f"invalid JSON Schema: {problem}")


def _sla_problems(defn: WorkflowDefinition) -> Iterator[str]:
    for key, value in defn.sla_targets.items():
        field = _dotted(["sla_targets", key])
        if key not in SLA_TARGETS:
            yield _problem(
                "workflow", field, f"unknown SLA target (known: {', '.join(SLA_TARGETS)})"
            )
        elif key == "success_rate" and not 0 <= value <= 1:
            yield _problem("workflow", field, f"must be between 0 and 1 (got {value})")
        elif key != "success_rate" and value <= 0:
            yield _problem("workflow", field, f"must be a positive number of seconds (got {value})")


def _problem(label: str, field: str, message: str) -> str:
    return f"{label}: field '{field}': {message}" if field else f"{label}: {message}"


def _label(step: StepBase) -> str:
    return f"step '{step.step_id}'"


def _dotted(parts: Iterable[int | str]) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text
