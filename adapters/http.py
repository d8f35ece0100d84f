"""The HTTP API of `flowledger serve`: FastAPI routes over the engine and the store.

Errors of the FlowledgerError hierarchy map to status codes (STATUS_OF); every error body
is {"error": type, "detail": message, "problems": [...]}. Bodies are bounded (413) and,
when a token is set, every POST needs it as a bearer token (401); reads stay open.
"""

from __future__ import annotations

import hmac
import json
from typing import Annotated, Any
from urllib.parse import urlsplit
from uuid import UUID

from eventsourcing.persistence import IntegrityError, PersistenceError
from fastapi import FastAPI, Header, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from flowledger import __version__
from flowledger.adapters.console import add_console
from flowledger.adapters.http_metrics import CONTENT_TYPE
from flowledger.adapters.http_models import (
    AgentList,
    CancelRequest,
    CompleteRequest,
    ErrorBody,
    EventList,
    ExecutionDocument,
    Health,
    Ready,
    Registered,
    StartRequest,
    WorkflowList,
    WorkflowVersions,
    error_responses,
)
from flowledger.adapters.http_optimizer import add_optimizer_routes
from flowledger.adapters.http_service import ApiService
from flowledger.adapters.http_status import status_of
from flowledger.adapters.http_views import add_view_routes
from flowledger.domain.definitions import WorkflowDefinition, load_definition, parse_definition
from flowledger.domain.errors import (
    DefinitionInvalid,
    FlowledgerError,
)

MAX_BODY_BYTES = 1_048_576
MAX_VERSION = 2**63 - 1  # a 64-bit integer, as the stores keep versions
BODY = "request body"  # the source DefinitionInvalid names for a posted definition
_HTTP_ERRORS = {
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    413: "PayloadTooLarge",
    422: "InputInvalid",
}
_READS = ("GET", "HEAD", "OPTIONS")


# -- middleware ---------------------------------------------------------------------------


async def _send_error(
    send: Send, status: int, error: str, detail: str, headers: dict[str, str] | None = None
) -> None:
    body = ErrorBody(error=error, detail=detail).model_dump_json().encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value).decode("latin-1")
    return None


class BodyLimit:
    """Refuse request bodies over `limit` bytes (413): by Content-Length, and by counting
    what arrives, so a chunked body cannot slip past."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > self.limit:
            await _send_error(send, 413, "PayloadTooLarge", self._detail(int(declared)))
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    # Raised inside the route's body read: FastAPI passes HTTPException on.
                    raise HTTPException(413, self._detail(seen))
            return message

        await self.app(scope, limited, send)

    def _detail(self, size: int) -> str:
        return f"the request body is over {self.limit} bytes ({size} sent)"


class BearerAuth:
    """When a token is set, every call but a read needs `Authorization: Bearer <token>`."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.token = token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] not in _READS and not self._allowed(scope):
            await _send_error(
                send,
                401,
                "Unauthorized",
                "this call needs the API token: Authorization: Bearer <token>",
                {"WWW-Authenticate": "Bearer"},
            )
            return
        await self.app(scope, receive, send)

    def _allowed(self, scope: Scope) -> bool:
        scheme, _, credentials = (_header(scope, b"authorization") or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            credentials.strip().encode("latin-1"), self.token
        )


class SameOrigin:
    """Refuse a change a browser sends from another site (cross-site request forgery): a
    call but a read whose Origin names another host than the one it was sent to. Browsers
    send Origin with such calls; other clients send none and are not concerned."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] not in _READS:
            origin = _header(scope, b"origin")
            if origin is not None and not _same_site(origin, _header(scope, b"host")):
                detail = f"a change sent from another site ({origin[:200]}) is refused"
                await _send_error(send, 403, "Forbidden", detail)
                return
        await self.app(scope, receive, send)


def _same_site(origin: str, host: str | None) -> bool:
    parts = urlsplit(origin)  # "null" (a sandboxed page) has no host: refused
    return parts.scheme in ("http", "https") and parts.netloc.lower() == (host or "").lower()


# -- errors -------------------------------------------------------------------------------


def _error(status: int, error: str, detail: str, problems: list[str] | None = None) -> JSONResponse:
    body = ErrorBody(error=error, detail=detail, problems=problems or [])
    return JSONResponse(body.model_dump(), status_code=status)


async def _flowledger_error(request: Request, exc: Exception) -> JSONResponse:
    if not isinstance(exc, FlowledgerError):
        raise exc
    if isinstance(exc, DefinitionInvalid):
        detail = f"{exc.source}: invalid workflow definition"
        return _error(status_of(exc), type(exc).__name__, detail, exc.problems)
    return _error(status_of(exc), type(exc).__name__, str(exc))


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    if not isinstance(exc, RequestValidationError):
        raise exc
    problems = []
    for error in exc.errors():
        loc = [str(part) for part in error.get("loc", ())]
        message = error.get("msg", "invalid")
        if error.get("type") == "json_invalid":  # loc is ("body", offset)
            reason = error.get("ctx", {}).get("error", message)
            loc, message = loc[:1], f"not valid JSON: {reason} (at character {loc[-1]})"
        problems.append(f"{'.'.join(loc)}: {message}")
    return _error(422, "InputInvalid", "the request is invalid", problems)


async def _http_error(request: Request, exc: Exception) -> Response:
    if not isinstance(exc, HTTPException):
        raise exc
    status, detail = exc.status_code, str(exc.detail)
    if status == 400:  # FastAPI could not read the body (not UTF-8, nested too deeply, ...)
        status, detail = 422, "the request body is not valid JSON"
    response = _error(status, _HTTP_ERRORS.get(status, "HTTPError"), detail)
    response.headers.update(exc.headers or {})
    return response


async def _store_error(request: Request, exc: Exception) -> JSONResponse:
    if isinstance(exc, IntegrityError):
        return _error(409, "Conflict", "another writer changed this just now; try again")
    return _error(503, "StoreUnavailable", f"the store failed: {type(exc).__name__}")


_errors = error_responses


def _document(model: type[BaseModel]) -> dict[str, Any]:
    # Documents hold user data of any depth: they are sent as they are (json.dumps), not
    # re-validated through the model, which documents them (and schemathesis checks).
    return {"model": model, "description": "Successful Response"}


def _parse_definition(request: Request, body: bytes) -> WorkflowDefinition:
    if "yaml" in request.headers.get("content-type", ""):
        return load_definition(body, BODY)

    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj: dict[str, Any] = {}
        for key, value in pairs:
            if key in obj:
                raise DefinitionInvalid(BODY, [f"key {key!r} is given twice in one object"])
            obj[key] = value
        return obj

    def no_constant(name: str) -> Any:
        raise DefinitionInvalid(BODY, [f"{name} is not a JSON number"])

    try:
        doc = json.loads(body, object_pairs_hook=unique, parse_constant=no_constant)
    except ValueError as exc:  # JSONDecodeError, or bytes that are not UTF-8
        raise DefinitionInvalid(BODY, [f"the body is not valid JSON: {exc}"]) from None
    except RecursionError:
        raise DefinitionInvalid(BODY, ["the document is nested too deeply"]) from None
    return parse_definition(doc, BODY)


# -- the application ---------------------------------------------------------------------


class _Api(FastAPI):
    bearer = False  # whether POSTs need the token (then the document says so)

    def openapi(self) -> dict[str, Any]:
        """FastAPI's document, plus the workflow definition's schema (the POST body)."""
        if self.openapi_schema is None:
            schema = get_openapi(
                title=self.title,
                version=self.version,
                description=self.description,
                routes=self.routes,
            )
            defn = WorkflowDefinition.model_json_schema(ref_template="#/components/schemas/{model}")
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components.update(defn.pop("$defs", {}))
            components["WorkflowDefinition"] = defn
            if self.bearer:
                schema["components"]["securitySchemes"] = {
                    "bearer": {"type": "http", "scheme": "bearer"}
                }
                for operations in schema["paths"].values():
                    if "post" in operations:
                        operations["post"]["security"] = [{"bearer": []}]
            self.openapi_schema = schema
        return self.openapi_schema


_DEFINITION = {"$ref": "#/components/schemas/WorkflowDefinition"}
_DEFINITION_BODY = {
    "requestBody": {
        "required": True,
        "description": "A workflow definition (shared/spec/workflows.md), as JSON or YAML.",
        "content": {
            "application/json": {"schema": _DEFINITION},
            "application/yaml": {"schema": _DEFINITION},
        },
    }
}


def create_app(
    service: ApiService, *, token: str | None = None, max_body_bytes: int = MAX_BODY_BYTES
) -> FastAPI:
    """The API over `service`; with `token`, every POST needs it as a bearer token."""
    app = _Api(
        title="flowledger",
        version=__version__,
        description="Durable event-sourced workflows: definitions, executions, human tasks.",
    )
    app.add_exception_handler(FlowledgerError, _flowledger_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(PersistenceError, _store_error)
    app.add_middleware(BodyLimit, limit=max_body_bytes)
    if token:
        app.add_middleware(BearerAuth, token=token)  # no body is read without it
        app.bearer = True
    app.add_middleware(SameOrigin)  # outermost
    writes = _errors(401, 413, 422, 503) if token else _errors(413, 422, 503)
    add_view_routes(app, service)  # first: its fixed paths go before the parameters'

    @app.post(
        "/workflows",
        status_code=201,
        response_model=Registered,
        responses={200: {"model": Registered}, **writes, **_errors(409)},
        openapi_extra=_DEFINITION_BODY,
    )
    async def register_workflow(request: Request, response: Response) -> Registered:
        """Register a workflow version (201); the same document again is 200, another 409."""
        definition = _parse_definition(request, await request.body())
        wf, created = await service.register(definition)
        response.status_code = 201 if created else 200
        return Registered(workflow_id=wf.workflow_id, version=wf.version, created=created)

    @app.get("/workflows", response_model=WorkflowList, responses=_errors(503))
    async def list_workflows() -> WorkflowList:
        """Every registered workflow and its versions."""
        found = await service.workflows()
        return WorkflowList(
            workflows=[WorkflowVersions(workflow_id=k, versions=v) for k, v in found.items()]
        )

    @app.get(
        "/workflows/{workflow_id}",
        response_model=WorkflowVersions,
        responses=_errors(404, 422, 503),
    )
    async def workflow_versions(workflow_id: str) -> WorkflowVersions:
        """The versions of a workflow, in registration order."""
        versions = await service.versions(workflow_id)
        return WorkflowVersions(workflow_id=workflow_id, versions=versions)

    @app.get(
        "/workflows/{workflow_id}/versions/{version}",
        response_model=None,
        responses={
            200: {"content": {"application/json": {"schema": _DEFINITION}}},
            **_errors(404, 422, 503),
        },
    )
    async def workflow_definition(workflow_id: str, version: str) -> JSONResponse:
        """The registered definition of a version."""
        return JSONResponse(await service.definition(workflow_id, version))

    @app.post(
        "/workflows/{workflow_id}/executions",
        status_code=201,
        response_model=None,
        responses={
            201: {"model": ExecutionDocument, "description": "Started"},
            200: {"model": ExecutionDocument, "description": "The execution the key started"},
            **writes,
            **_errors(404, 409),
        },
    )
    async def start_execution(
        workflow_id: str,
        body: StartRequest | None = None,
        idempotency_key: Annotated[
            str | None, Header(alias="Idempotency-Key", min_length=1, max_length=256)
        ] = None,
    ) -> JSONResponse:
        """Start an execution (201). A reused Idempotency-Key returns its execution (200),
        or 409 if it started another workflow or input."""
        body = body or StartRequest()
        doc, created = await service.start(workflow_id, body.version, body.input, idempotency_key)
        return JSONResponse(doc, status_code=201 if created else 200)

    @app.get(
        "/executions/{execution_id}",
        response_model=None,
        responses={200: _document(ExecutionDocument), **_errors(404, 422, 503)},
    )
    async def get_execution(execution_id: UUID) -> JSONResponse:
        """The execution document: every step with status, attempts, timings, last error."""
        return JSONResponse(await service.execution(execution_id))

    @app.get(
        "/executions/{execution_id}/events",
        response_model=None,
        responses={200: _document(EventList), **_errors(404, 422, 503)},
    )
    async def execution_events(
        execution_id: UUID,
        after: Annotated[
            int, Query(ge=0, le=MAX_VERSION, description="only events after this version")
        ] = 0,
        limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
    ) -> JSONResponse:
        """The stored events of an execution, in order."""
        events = await service.events(execution_id, after, limit)
        return JSONResponse({"execution_id": str(execution_id), "events": events})

    @app.post(
        "/executions/{execution_id}/steps/{step_id}/complete",
        response_model=None,
        responses={200: _document(ExecutionDocument), **writes, **_errors(404, 409)},
    )
    async def complete_step(
        execution_id: UUID, step_id: str, body: CompleteRequest
    ) -> JSONResponse:
        """Answer a waiting human task: 422 if it fails the form_schema, 409 if not waiting."""
        return JSONResponse(await service.complete(execution_id, step_id, body.data))

    @app.post(
        "/executions/{execution_id}/cancel",
        response_model=None,
        responses={200: _document(ExecutionDocument), **writes, **_errors(404, 409)},
    )
    async def cancel_execution(
        execution_id: UUID, body: CancelRequest | None = None
    ) -> JSONResponse:
        """Cancel: running steps stop, completed steps are compensated (409 if it ended)."""
        reason = (body or CancelRequest()).reason
        return JSONResponse(await service.cancel(execution_id, reason))

    @app.post(
        "/executions/{execution_id}/retry",
        response_model=None,
        responses={200: _document(ExecutionDocument), **writes, **_errors(404, 409)},
    )
    async def retry_execution(execution_id: UUID) -> JSONResponse:
        """Run a failed or timed-out execution again from the steps that failed; completed
        steps keep their results (409 if it is not failed, or was compensated)."""
        return JSONResponse(await service.retry(execution_id))

    add_optimizer_routes(app, service, token=bool(token))

    @app.get("/healthz", response_model=Health)
    async def healthz() -> Health:
        """The process is up."""
        return Health(status="ok")

    @app.get("/readyz", response_model=Ready, responses=_errors(503))
    async def readyz() -> Ready:
        """The store answers a cheap read."""
        position = await service.store_position()
        return Ready(status="ready", store_position=position, engine=service.engine is not None)

    @app.get("/agents", response_model=AgentList)
    async def agents() -> AgentList:
        """The remote agents heard from over Kafka: capabilities, load, whether live."""
        return service.agents()

    @app.get("/metrics", response_class=PlainTextResponse, responses=_errors(503))
    async def metrics() -> PlainTextResponse:
        """Prometheus text format: executions, steps, commits, live executions."""
        return PlainTextResponse(await service.metrics(), media_type=CONTENT_TYPE)

    add_console(app, service, token_required=bool(token))
    return app
