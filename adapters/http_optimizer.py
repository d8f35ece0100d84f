"""The optimizer over HTTP: a workflow version's report, and applying a recommendation."""

from __future__ import annotations

from typing import Annotated

from fastapi import FastAPI, Query, Response
from pydantic import BaseModel, ConfigDict, Field

from flowledger.adapters.http_models import error_responses
from flowledger.adapters.http_service import ApiService
from flowledger.services.optimizer import Applied
from flowledger.services.optimizer_model import OptimizerReport

MAX_NAME = 256


class ApplyRequest(BaseModel):
    """Which recommendation to apply, to which version (the newest when none is named)."""

    model_config = ConfigDict(extra="forbid")

    recommendation_id: str = Field(min_length=1, max_length=MAX_NAME)
    version: str | None = Field(default=None, min_length=1, max_length=MAX_NAME)


def add_optimizer_routes(app: FastAPI, service: ApiService, *, token: bool) -> None:
    """Add GET /workflows/{id}/optimizer and POST /workflows/{id}/optimizer/apply."""
    writes = (
        error_responses(401, 404, 409, 413, 422, 503)
        if token
        else error_responses(404, 409, 413, 422, 503)
    )

    @app.get(
        "/workflows/{workflow_id}/optimizer",
        response_model=OptimizerReport,
        responses=error_responses(404, 422, 503),
    )
    async def optimizer_report(
        workflow_id: str,
        version: Annotated[str | None, Query(min_length=1, max_length=MAX_NAME)] = None,
    ) -> OptimizerReport:
        """Critical path, bottlenecks and recommendations (each with its evidence, a JSON
        Patch, a risk note and a simulated gain) from the version's own runs."""
        return await service.optimizer_report(workflow_id, version)

    @app.post(
        "/workflows/{workflow_id}/optimizer/apply",
        status_code=201,
        response_model=Applied,
        responses={200: {"model": Applied}, **writes},
    )
    async def apply_recommendation(
        workflow_id: str, body: ApplyRequest, response: Response
    ) -> Applied:
        """Register a new version with the recommendation's change (201; 200 if that version
        was already registered). Running executions stay on their version."""
        applied = await service.apply_recommendation(
            workflow_id, body.recommendation_id, body.version
        )
        response.status_code = 201 if applied.created else 200
        return applied
