"""The one error hierarchy of flowledger; the edges map each class to an exit code or status."""

from __future__ import annotations


class FlowledgerError(Exception):
    """Base of every error flowledger raises on purpose."""


class DefinitionInvalid(FlowledgerError):
    """A workflow definition breaks the contract; `problems` names file, step and field."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: invalid workflow definition:\n{lines}")


class DefinitionConflict(FlowledgerError):
    """A (workflow_id, version) is already registered with a different document."""


class WorkflowNotFound(FlowledgerError):
    """No workflow (or no such version) is registered under that id."""


class InputInvalid(FlowledgerError):
    """An execution input, command body or completion fails its schema."""


class ExecutionNotFound(FlowledgerError):
    """No execution is stored under that id."""


class RecommendationNotFound(FlowledgerError):
    """The optimizer has no recommendation by that id for the workflow version (now)."""


class StepNotFound(FlowledgerError):
    """The execution has no step (instance) by that id."""


class InvalidTransition(FlowledgerError):
    """The transition table does not allow this move from the current status."""


class IdempotencyConflict(FlowledgerError):
    """An idempotency key already started an execution of another workflow or input."""


class ActionNotFound(FlowledgerError):
    """No agent offers the action a step names."""


class ExpressionError(FlowledgerError):
    """A JMESPath expression failed while it was evaluated against the data."""


class StoreUnavailable(FlowledgerError):
    """The event store could not be opened or written (bad settings, server down)."""


class ConfigurationError(FlowledgerError):
    """A required setting is missing or malformed."""
