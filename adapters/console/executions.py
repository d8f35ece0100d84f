"""The console's execution pages: the list (filters, search, live rows), one execution
(graph, timeline, document, history with its audit, actions) and the human-task inbox."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode
from uuid import UUID

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from markupsafe import Markup

from flowledger.adapters.console.forms import TaskForm, check_answer, form_fields, read_answer
from flowledger.adapters.console.gantt import gantt_bars, render_gantt
from flowledger.adapters.console.graph import render_graph, statuses_by_step
from flowledger.adapters.console.pages import TERMINAL, Pages, form_data
from flowledger.adapters.http_service import ApiService
from flowledger.adapters.http_status import status_of
from flowledger.domain.definitions import WorkflowDefinition, parse_definition
from flowledger.domain.errors import ExecutionNotFound, FlowledgerError, InputInvalid
from flowledger.domain.states import ExecutionStatus
from flowledger.domain.workflow import Workflow
from flowledger.projections.runs import ExecutionFilter

PAGE_SIZE = 50
MAX_PARAM = 256
MAX_REASON = 500
LIVE_EVENTS = 200  # the newest events the live part shows (it is redrawn every second)
MAX_EVENTS = 10_000  # the history page's, as the API's limit
FILTERS = ("workflow", "version", "status", "tag", "since", "until", "order")
STATUSES = [s.value for s in ExecutionStatus]


@dataclass(frozen=True)
class Filters:
    """The list's filters as typed (to fill the form again) and as the query they make."""

    values: dict[str, str]
    where: ExecutionFilter
    cursor: str | None

    @property
    def query(self) -> str:
        """The filters as a query string (for the live rows and the next page)."""
        return urlencode({k: v for k, v in self.values.items() if v})


def read_filters(params: Mapping[str, str]) -> Filters:
    """The filters of the list from its query string (InputInvalid names a bad one)."""
    values = {name: params.get(name, "").strip() for name in FILTERS}
    for name, value in values.items():
        if len(value) > MAX_PARAM:
            raise InputInvalid(f"{name}: at most {MAX_PARAM} characters")
    status = values["status"] or None
    if status is not None and status not in STATUSES:
        raise InputInvalid(f"status: {status!r} is not one of {', '.join(STATUSES)}")
    order = values["order"] or "newest"
    if order not in ("newest", "oldest"):
        raise InputInvalid(f"order: {order!r} is not newest or oldest")
    cursor = params.get("cursor") or None
    if cursor is not None and len(cursor) > 512:
        raise InputInvalid("cursor: too long")
    where = ExecutionFilter(
        workflow_id=values["workflow"] or None,
        version=values["version"] or None,
        status=status,
        tag=values["tag"] or None,
        since=_moment(values["since"], "since"),
        until=_moment(values["until"], "until"),
        newest_first=order == "newest",
    )
    return Filters(values, where, cursor)


def _moment(text: str, name: str) -> datetime | None:
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise InputInvalid(f"{name}: {text!r} is not a date and time (ISO 8601)") from None
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)  # the form's times are UTC, as its labels say
    return moment.astimezone(UTC)


def _definition(doc: dict[str, Any]) -> WorkflowDefinition:
    return parse_definition(doc, "stored definition")


def add_execution_pages(app: FastAPI, service: ApiService, pages: Pages) -> None:
    """Add the executions list, execution page and inbox to `app`."""

    async def listing(request: Request, fragment: bool) -> Response:
        problem, status = None, 200
        try:
            filters = read_filters(request.query_params)
            page = await service.executions(filters.where, PAGE_SIZE, filters.cursor)
            rows, next_cursor = page.executions, page.next_cursor
        except FlowledgerError as exc:
            if fragment:
                return pages.error(request, exc, fragment=True)
            problem, status = str(exc), status_of(exc)
            filters = Filters(
                {k: request.query_params.get(k, "")[:MAX_PARAM] for k in FILTERS},
                ExecutionFilter(),
                None,
            )
            rows, next_cursor = [], None
        template = "execution_rows.html" if fragment else "executions.html"
        return pages.render(
            request,
            template,
            status_code=status,
            rows=rows,
            next_cursor=next_cursor,
            filters=filters,
            workflows=sorted((await service.workflows()).keys()) if not fragment else [],
            statuses=STATUSES,
            problem=problem,
            message=request.query_params.get("message", "")[:MAX_PARAM],
        )

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def executions_page(request: Request) -> Response:
        return await listing(request, fragment=False)

    @app.get("/ui/executions/rows", response_class=HTMLResponse, include_in_schema=False)
    async def execution_rows(request: Request) -> Response:
        return await listing(request, fragment=True)

    @app.get("/ui/search", include_in_schema=False)
    async def search(request: Request, q: str = "") -> Response:
        text = q.strip()
        if not text:
            return RedirectResponse("/", status_code=303)
        try:
            found = await service.find_execution(text)
        except FlowledgerError as exc:
            return pages.error(request, exc)
        if found is None:
            message = f"no execution has the id or idempotency key {text[:MAX_PARAM]!r}"
            return RedirectResponse("/?" + urlencode({"message": message}), status_code=303)
        return RedirectResponse(f"/ui/executions/{found}", status_code=303)

    async def read(execution_id: UUID) -> tuple[dict[str, Any], WorkflowDefinition]:
        doc = await service.execution(execution_id)
        return doc, _definition(await service.definition(doc["workflow_id"], doc["version"]))

    async def live_context(
        execution_id: UUID, doc: dict[str, Any], definition: WorkflowDefinition
    ) -> dict[str, Any]:
        detail = await service.execution_steps(execution_id)
        timeline = await service.timeline(execution_id)
        newest = max(doc["event_count"] - LIVE_EVENTS, 0)
        events = await service.events(execution_id, newest, LIVE_EVENTS)
        audit = await service.audit(execution_id)
        graph = render_graph(definition, statuses_by_step(detail.steps))
        gantt = render_gantt(gantt_bars(timeline, datetime.now(UTC)))
        return {
            "doc": doc,
            "detail": detail,
            "events": events,
            "audit": audit,
            "graph": Markup(graph),
            "gantt": Markup(gantt),
            "terminal": doc["status"] in TERMINAL,
            "actions_key": _actions_key(doc),
        }

    def actions_context(doc: dict[str, Any], definition: WorkflowDefinition) -> dict[str, Any]:
        return {
            "doc": doc,
            "tasks": task_forms(doc, Workflow(definition)),
            "can_cancel": doc["status"] not in TERMINAL,
            "can_retry": doc["status"] in ("failed", "timed_out"),
        }

    @app.get("/ui/executions/{execution_id}", response_class=HTMLResponse, include_in_schema=False)
    async def execution_page(request: Request, execution_id: str) -> Response:
        try:
            eid = _uuid(execution_id)
            doc, definition = await read(eid)
            context = {
                **await live_context(eid, doc, definition),
                **actions_context(doc, definition),
            }
        except FlowledgerError as exc:
            return pages.error(request, exc)
        return pages.render(request, "execution.html", **context)

    @app.get(
        "/ui/executions/{execution_id}/live", response_class=HTMLResponse, include_in_schema=False
    )
    async def execution_live(request: Request, execution_id: str, actions: str = "") -> Response:
        try:
            eid = _uuid(execution_id)
            context = await live_context(eid, *await read(eid))
        except FlowledgerError as exc:
            return pages.error(request, exc, fragment=True)
        # The actions (forms) are not redrawn every second, or typing would be lost: only
        # when what can be done changed does the page fetch them again.
        changed = actions != context["actions_key"]
        headers = {"HX-Trigger": "actions-changed"} if changed else {}
        return pages.render(request, "execution_live.html", headers=headers, **context)

    @app.get(
        "/ui/executions/{execution_id}/history",
        response_class=HTMLResponse,
        include_in_schema=False,
    )
    async def history(request: Request, execution_id: str) -> Response:
        try:
            eid = _uuid(execution_id)
            doc = await service.execution(eid)
            events = await service.events(eid, 0, MAX_EVENTS)
            audit = await service.audit(eid)
        except FlowledgerError as exc:
            return pages.error(request, exc)
        return pages.render(request, "history.html", doc=doc, events=events, audit=audit)

    @app.get(
        "/ui/executions/{execution_id}/events/{version}",
        response_class=HTMLResponse,
        include_in_schema=False,
    )
    async def event_attributes(request: Request, execution_id: str, version: int) -> Response:
        # Fetched when a reader opens an event: the live part stays small (it is redrawn
        # every second, and the attributes of a long history weigh megabytes).
        try:
            events = await service.events(_uuid(execution_id), max(version - 1, 0), 1)
        except FlowledgerError as exc:
            return pages.error(request, exc, fragment=True)
        if not events or events[0]["version"] != version:
            missing = ExecutionNotFound(f"execution {execution_id} has no event {version}")
            return pages.error(request, missing, fragment=True)
        return pages.render(request, "event_attributes.html", event=events[0])

    @app.get(
        "/ui/executions/{execution_id}/actions",
        response_class=HTMLResponse,
        include_in_schema=False,
    )
    async def execution_actions(request: Request, execution_id: str) -> Response:
        try:
            context = actions_context(*await read(_uuid(execution_id)))
        except FlowledgerError as exc:
            return pages.error(request, exc, fragment=True)
        return pages.render(request, "execution_actions.html", **context)

    @app.post("/ui/executions/{execution_id}/cancel", include_in_schema=False)
    async def cancel(request: Request, execution_id: str) -> Response:
        try:
            form = await form_data(request)
            reason = form.get("reason", "").strip()[:MAX_REASON] or "cancelled from the console"
            doc = await service.cancel(_uuid(execution_id), reason)
        except FlowledgerError as exc:
            return pages.error(request, exc, fragment=True)
        return pages.render(request, "flash.html", text=f"Execution {doc['status']}.")

    @app.post("/ui/executions/{execution_id}/retry", include_in_schema=False)
    async def retry(request: Request, execution_id: str) -> Response:
        try:
            await service.retry(_uuid(execution_id))
        except FlowledgerError as exc:
            return pages.error(request, exc, fragment=True)
        # The page stopped following the ended execution: load it again to follow the retry.
        return Response(status_code=204, headers={"HX-Refresh": "true"})

    @app.post("/ui/executions/{execution_id}/complete", include_in_schema=False)
    async def complete(request: Request, execution_id: str) -> Response:
        try:
            submitted = await form_data(request)
            key = submitted.get("_key", "")[:MAX_PARAM]
            eid = _uuid(execution_id)
            doc = await service.execution(eid)
            definition = _definition(await service.definition(doc["workflow_id"], doc["version"]))
            form = _task_form(doc, Workflow(definition), key)
        except FlowledgerError as exc:
            return pages.error(request, exc, fragment=True)
        schema = _form_schema(Workflow(definition), form.step_id)
        answer = read_answer(form, submitted)
        if answer is not None:
            check_answer(form, schema, answer)
        if answer is not None and not form.failed:
            try:
                await service.complete(eid, key, answer)
            except FlowledgerError as exc:
                form.fail(None, str(exc))
            else:
                return pages.render(request, "task_done.html", form=form)
        return pages.render(request, "task_form.html", status_code=422, form=form)

    @app.get("/ui/inbox", response_class=HTMLResponse, include_in_schema=False)
    async def inbox(request: Request, assignee: str = "") -> HTMLResponse:
        who = assignee.strip()[:MAX_PARAM] or None
        everyone = await service.inbox(None)
        tasks = [t for t in everyone if who is None or t.assignee == who]
        forms: list[tuple[Any, TaskForm]] = []
        workflows: dict[tuple[str, str], Workflow] = {}
        for task in tasks:
            ref = (task.workflow_id, task.version)
            if ref not in workflows:
                doc = await service.definition(*ref)
                workflows[ref] = Workflow(_definition(doc))
            wf = workflows[ref]
            form = _new_form(task.execution_id, task.key, task.step_id, task.assignee, wf)
            forms.append((task, form))
        assignees = sorted({t.assignee for t in everyone if t.assignee})
        return pages.render(
            request, "inbox.html", forms=forms, assignee=who or "", assignees=assignees
        )


def _uuid(text: str) -> UUID:
    try:
        return UUID(text)
    except ValueError:
        raise ExecutionNotFound(f"{text[:MAX_PARAM]!r} is not an execution id") from None


def _actions_key(doc: dict[str, Any]) -> str:
    """What the actions depend on: the status and the tasks waiting for a person."""
    return "|".join([doc["status"], *doc.get("waiting_for_person", [])])


def _form_schema(wf: Workflow, step_id: str) -> dict[str, Any] | bool | None:
    node = wf.nodes.get(step_id)
    schema = getattr(node.step, "form_schema", None) if node is not None else None
    return schema if isinstance(schema, dict | bool) else None


def _new_form(
    execution_id: str, key: str, step_id: str, assignee: str | None, wf: Workflow
) -> TaskForm:
    return TaskForm(execution_id, key, step_id, assignee, form_fields(_form_schema(wf, step_id)))


def task_forms(doc: dict[str, Any], wf: Workflow) -> list[TaskForm]:
    """A form for each human task of the execution waiting for an answer."""
    return [_task_form(doc, wf, key) for key in doc.get("waiting_for_person", [])]


def _task_form(doc: dict[str, Any], wf: Workflow, key: str) -> TaskForm:
    step = doc["steps"].get(key)
    if step is None:
        raise ExecutionNotFound(f"execution {doc['execution_id']} has no step instance {key!r}")
    return _new_form(doc["execution_id"], key, step["step_id"], step.get("assignee"), wf)
