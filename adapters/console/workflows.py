"""The console's workflow pages: the list, and one workflow with its versions side by side,
duration percentiles over time, per-step figures, SLA compliance and the optimizer's
recommendations (with an apply button that registers the new version)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, Response

from flowledger.adapters.console.pages import Pages, form_data
from flowledger.adapters.http_service import ApiService
from flowledger.domain.errors import FlowledgerError, InputInvalid, WorkflowNotFound

MAX_PARAM = 256
SIDE_BY_SIDE = 4  # the newest versions shown next to each other
# What a version column shows of the definition, beside its steps.
SETTINGS = ("timeout", "max_parallel_steps", "retry_policy", "sla_targets", "tags")
STEP_SETTINGS = (
    "type", "dependencies", "trigger_rule", "action", "timeout", "retry_policy", "cache",
    "avoid_agents", "assignee", "for_each", "max_concurrency", "url",
)  # fmt: skip


DEFAULTS = {"trigger_rule": "all_success"}  # not worth a line in every step


@dataclass(frozen=True)
class StepColumn:
    """A step as one version defines it, and how it differs from the version before."""

    step_id: str
    settings: list[tuple[str, str, bool]]  # (name, value, changed since the version before)
    change: str  # "", "added" or "changed"


@dataclass(frozen=True)
class VersionColumn:
    """One version of a workflow, as a column of the side-by-side view."""

    version: str
    settings: dict[str, str]
    steps: list[StepColumn]
    removed: list[str]


def _flat_steps(steps: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for step in steps:
        found[str(step.get("step_id"))] = step
        for inner in ("parallel_steps", "steps"):
            if isinstance(step.get(inner), list):
                found.update(_flat_steps(step[inner]))
    return found


def _shown(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def version_columns(definitions: list[tuple[str, dict[str, Any]]]) -> list[VersionColumn]:
    """Columns for the versions given (oldest first), each compared with the one before."""
    columns: list[VersionColumn] = []
    before: dict[str, dict[str, Any]] | None = None
    for version, doc in definitions:
        steps = _flat_steps([*doc.get("steps", []), *doc.get("handlers", [])])
        column_steps = []
        for step_id, step in steps.items():
            old = before.get(step_id) if before is not None else None
            change = ""
            if before is not None:
                change = "added" if old is None else ("changed" if old != step else "")
            settings = [
                (k, _shown(step[k]), old is not None and old.get(k) != step[k])
                for k in STEP_SETTINGS
                if step.get(k) not in (None, []) and DEFAULTS.get(k) != step[k]
            ]
            column_steps.append(StepColumn(step_id, settings, change))
        removed = sorted(set(before) - set(steps)) if before is not None else []
        shown = {k: _shown(doc[k]) for k in SETTINGS if doc.get(k) not in (None, [], {})}
        columns.append(VersionColumn(version, shown, column_steps, removed))
        before = steps
    return columns


def add_workflow_pages(app: FastAPI, service: ApiService, pages: Pages) -> None:
    """Add the workflows list and the workflow page to `app`."""

    @app.get("/ui/workflows", response_class=HTMLResponse, include_in_schema=False)
    async def workflows_page(request: Request) -> HTMLResponse:
        found = await service.workflows()
        rows = []
        for workflow_id, versions in sorted(found.items()):
            perf = await service.performance(workflow_id, None, None)
            rows.append((workflow_id, versions, perf.executions))
        return pages.render(request, "workflows.html", rows=rows)

    @app.get("/ui/workflows/{workflow_id}", response_class=HTMLResponse, include_in_schema=False)
    async def workflow_page(request: Request, workflow_id: str, version: str = "") -> Response:
        try:
            versions = await service.versions(workflow_id[:MAX_PARAM])
            chosen = _chosen(version, versions)
            shown = versions[-SIDE_BY_SIDE:]
            docs = [(v, await service.definition(workflow_id, v)) for v in shown]
            perf = await service.performance(workflow_id, chosen, None)
            every = await service.performance(workflow_id, None, None)  # SLA of each version
            series = await service.duration_series(workflow_id, chosen)
        except FlowledgerError as exc:
            return pages.error(request, exc)
        return pages.render(
            request,
            "workflow.html",
            workflow_id=workflow_id,
            versions=versions,
            version=chosen,
            columns=version_columns(docs),
            perf=perf,
            sla=every.versions,
            series=asdict(series),
        )

    @app.get(
        "/ui/workflows/{workflow_id}/recommendations",
        response_class=HTMLResponse,
        include_in_schema=False,
    )
    async def recommendations(request: Request, workflow_id: str, version: str = "") -> Response:
        try:
            versions = await service.versions(workflow_id[:MAX_PARAM])
            report = await service.optimizer_report(workflow_id, _chosen(version, versions))
        except FlowledgerError as exc:
            return pages.error(request, exc, fragment=True)
        return pages.render(request, "recommendations.html", report=report)

    @app.post("/ui/workflows/{workflow_id}/apply", include_in_schema=False)
    async def apply(request: Request, workflow_id: str) -> Response:
        try:
            form = await form_data(request)
            rec_id = form.get("recommendation_id", "")[:MAX_PARAM]
            version = form.get("version", "")[:MAX_PARAM] or None
            if not rec_id:
                raise InputInvalid("recommendation_id: which recommendation to apply")
            applied = await service.apply_recommendation(workflow_id, rec_id, version)
        except FlowledgerError as exc:
            return pages.error(request, exc, fragment=True)
        return pages.render(request, "applied.html", applied=applied)


def _chosen(version: str, versions: list[str]) -> str | None:
    """The version asked for (it must exist), else the newest."""
    version = version.strip()[:MAX_PARAM]
    if not version:
        return versions[-1] if versions else None
    if version not in versions:
        raise WorkflowNotFound(f"the workflow has no version {version!r}")
    return version
