"""Helpers for tests: definitions from dicts, stored events. Importable as `support`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flowledger.domain.definitions import WorkflowDefinition, parse_definition
from flowledger.services.app import FlowledgerApp

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
EXAMPLES = REPO / "examples"


def workflow(doc: dict[str, Any]) -> WorkflowDefinition:
    """A definition from a dict, with a default workflow_id."""
    return parse_definition({"workflow_id": "test-wf", **doc}, "<test>")


def event_types(app: FlowledgerApp, execution_id: Any) -> list[str]:
    """The class names of an execution's stored events, in order."""
    return [type(e).__name__ for e in app.repository.event_store.get(execution_id)]


def events_of(app: FlowledgerApp, execution_id: Any, kind: str | None = None) -> list[Any]:
    """An execution's stored events (only those of class `kind` if given)."""
    events = list(app.repository.event_store.get(execution_id))
    return [e for e in events if kind is None or type(e).__name__ == kind]
