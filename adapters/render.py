"""Terminal rendering of executions with rich: tables of steps, colored by status.

Every cell is a `Text`, never a str: rich reads a str as markup, and ids, versions and
error messages are user data (an agent's `[/tmp]` in a message must print, not crash).
"""

from __future__ import annotations

from typing import Any

from rich.table import Table
from rich.text import Text

STYLES = {
    "completed": "green",
    "running": "cyan",
    "retrying": "yellow",
    "waiting": "magenta",
    "failed": "red",
    "timed_out": "red",
    "cancelled": "red",
    "skipped": "dim",
    "compensated": "blue",
    "compensating": "blue",
    "pending": "dim",
}


def status_text(status: str) -> Text:
    """A status word in its color."""
    return Text(status, style=STYLES.get(status, ""))


def steps_table(doc: dict[str, Any]) -> Table:
    """The steps of an execution document as a table."""
    table = Table(
        title=Text(f"{doc['workflow_id']} v{doc['version']}  {doc['execution_id']}"),
        title_justify="left",
    )
    table.add_column("step")
    table.add_column("type")
    table.add_column("status")
    table.add_column("attempts", justify="right")
    table.add_column("seconds", justify="right")
    table.add_column("note", overflow="fold", max_width=60)
    for key, step in doc["steps"].items():
        note = ""
        if step.get("recovered_by"):
            note = f"recovered by {step['recovered_by']}"
        elif step.get("cached_from"):
            source = step["cached_from"]
            note = f"from cache: execution {source['execution_id']} step {source['step_key']}"
        elif step.get("last_error"):
            err = step["last_error"]
            note = f"{err.get('type')}: {err.get('message')}"
        elif step.get("assignee") and step["status"] == "waiting":
            note = f"waiting for {step['assignee']}"
        if step.get("agent"):
            ran = f"on agent {step['agent']}" + (f" ({step['route']})" if step.get("route") else "")
            note = ran + (f"; {note}" if note else "")
        seconds = step.get("duration_seconds")
        table.add_row(
            Text(key),
            Text(step.get("type") or ""),
            status_text(step["status"]),
            Text(str(step["attempts"])),
            Text("" if seconds is None else f"{seconds:.3f}"),
            Text(note),
        )
    return table


def summary(doc: dict[str, Any]) -> Text:
    """One line: the execution's status and why."""
    text = Text("execution ")
    text.append(doc["execution_id"], style="bold")
    text.append(" ")
    text.append_text(status_text(doc["status"]))
    if doc.get("reason"):
        text.append(f": {doc['reason']}")
    if doc["status"] == "waiting" or doc.get("waiting_for_person"):
        waiting = ", ".join(doc.get("waiting_for_person") or [])
        if waiting and doc["status"] not in ("completed", "failed", "cancelled", "timed_out"):
            text.append(
                f" (waiting for a person: {waiting}; answer with `flowledger complete "
                f"{doc['execution_id']} STEP --data JSON`)"
            )
    return text


def executions_table(rows: list[dict[str, Any]]) -> Table:
    """A list of executions."""
    table = Table()
    for column in ("execution_id", "workflow", "version", "status", "started_at", "seconds"):
        table.add_column(column)
    for row in rows:
        seconds = row.get("duration_seconds")
        table.add_row(
            Text(row["execution_id"]),
            Text(row["workflow_id"]),
            Text(row["version"]),
            status_text(row["status"]),
            Text(row["started_at"] or ""),
            Text("" if seconds is None else f"{seconds:.3f}"),
        )
    return table
