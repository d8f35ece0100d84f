"""The HTTP status code of each error of the FlowledgerError hierarchy, for the API and the
console alike."""

from __future__ import annotations

from flowledger.domain.errors import (
    ActionNotFound,
    ConfigurationError,
    DefinitionConflict,
    DefinitionInvalid,
    ExecutionNotFound,
    ExpressionError,
    FlowledgerError,
    IdempotencyConflict,
    InputInvalid,
    InvalidTransition,
    RecommendationNotFound,
    StepNotFound,
    StoreUnavailable,
    WorkflowNotFound,
)

STATUS_OF: dict[type[FlowledgerError], int] = {
    DefinitionInvalid: 422,
    InputInvalid: 422,
    ActionNotFound: 422,
    ExpressionError: 422,
    ExecutionNotFound: 404,
    WorkflowNotFound: 404,
    StepNotFound: 404,
    RecommendationNotFound: 404,
    InvalidTransition: 409,
    DefinitionConflict: 409,
    IdempotencyConflict: 409,
    StoreUnavailable: 503,
    ConfigurationError: 500,
}


def status_of(exc: FlowledgerError) -> int:
    """The status code of an error: its class's, or the nearest base class's (else 400)."""
    for cls in type(exc).__mro__:
        if cls in STATUS_OF:
            return STATUS_OF[cls]
    return 400
