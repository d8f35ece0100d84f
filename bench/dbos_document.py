"""W3 on DBOS: examples/document_processing.yaml written as a DBOS workflow, step for step.

The same demo agents (examples/agents.py, FLOWLEDGER_DEMO_LATENCY=0) do the work, called
with the same context flowledger gives them: the workflow id is flowledger's execution id
for the same idempotency key, and step keys and attempt numbers are flowledger's, so each
agent draws the same failures (and the same retries) in both systems.

Mirrored: every step of the example (fetch; OCR and metadata in parallel; the route on the
document type; per page line items, at most 4 at once; the contract review and the
unknown document's human fallback as `DBOS.recv_async`; quality validation with its input
check; the notify webhook with its bearer token; unpublish as compensation when a later
step fails), each step's retry policy (attempts, first delay, backoff) and timeout.

Not mirrored exactly (DBOS has no such thing): the retry delays' jitter (flowledger adds
+/- 10%), `max_delay` (never reached here), the workflow's two-day timeout and
`max_parallel_steps` (never reached: at most 4 steps of a document run at once). DBOS
checkpoints a step once, after its last attempt; flowledger records every attempt.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import sys
import time
from collections.abc import Awaitable
from types import ModuleType
from typing import Any, TypeVar

import httpx
from dbos import DBOS, SetWorkflowID
from dbos import error as dbos_error
from dbos_common import REPO, WorkloadFailed
from dbos_workloads import launch, status_counts

from flowledger.adapters.agents import ActionContext

T = TypeVar("T")


def _load_demo() -> ModuleType:
    """examples/agents.py, under a stable module name (DBOS pickles the errors it raises)."""
    spec = importlib.util.spec_from_file_location("demo_agents", REPO / "examples" / "agents.py")
    if spec is None or spec.loader is None:
        raise SystemExit("cannot load examples/agents.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["demo_agents"] = module
    spec.loader.exec_module(module)
    return module


demo = _load_demo()
_http: httpx.AsyncClient | None = None
_retries = 0  # attempts after a step's first (flowledger's StepRetryScheduled)


def _context(key: str, step_id: str) -> ActionContext:
    """What flowledger would pass the agent for this attempt (attempts count from 1)."""
    global _retries
    status = DBOS.step_status
    attempt = 1 + ((status.current_attempt or 0) if status is not None else 0)
    _retries += attempt > 1
    wid = DBOS.workflow_id or ""
    return ActionContext(wid, key, step_id, attempt, f"{wid}:{key}:{attempt}")


# -- steps (retry policies as the example's: the workflow's unless the step sets one) -----

_WF_RETRY: dict[str, Any] = {
    "retries_allowed": True,
    "max_attempts": 4,  # max_retries 3
    "interval_seconds": 0.2,
    "backoff_rate": 2.0,
    "timeout_seconds": 300.0,  # the contract's default step timeout
}


@DBOS.step(**_WF_RETRY)
async def fetch(url: str) -> dict[str, Any]:
    """documents.fetch."""
    result: dict[str, Any] = await demo.fetch({"url": url}, _context("fetch", "fetch"))
    return result


@DBOS.step(**(_WF_RETRY | {"timeout_seconds": 60.0}))
async def ocr(document: dict[str, Any], language: Any) -> dict[str, Any]:
    """documents.ocr (timeout 60 s)."""
    data = {"document": document, "language": language}
    result: dict[str, Any] = await demo.ocr(data, _context("ocr", "ocr"))
    return result


@DBOS.step(**_WF_RETRY)
async def metadata(document: dict[str, Any]) -> dict[str, Any]:
    """documents.metadata."""
    result: dict[str, Any] = await demo.metadata(
        {"document": document}, _context("metadata", "metadata")
    )
    return result


@DBOS.step(**_WF_RETRY)
async def line_items(index: int, page: Any, document: dict[str, Any]) -> dict[str, Any]:
    """invoices.line_items for one page (the loop body)."""
    key = f"invoice_pages[{index}]/extract_line_items"
    data = {"page": page, "document": document}
    result: dict[str, Any] = await demo.line_items(data, _context(key, "extract_line_items"))
    return result


@DBOS.step(
    **(
        _WF_RETRY
        | {
            "max_attempts": 2,  # max_retries 1
            "should_retry": lambda exc: not isinstance(exc, demo.LowConfidenceError),
        }
    )
)
async def classify(data: dict[str, Any]) -> dict[str, Any]:
    """documents.classify (LowConfidenceError is not retried)."""
    result: dict[str, Any] = await demo.classify(data, _context("classify_unknown", "classify"))
    return result


@DBOS.step(**(_WF_RETRY | {"interval_seconds": 0.5}))
async def validate_quality(text: Any, confidence: Any) -> dict[str, Any]:
    """documents.validate_quality (first retry after 0.5 s)."""
    data = {"text": text, "confidence": confidence}
    result: dict[str, Any] = await demo.validate_quality(data, _context("validate", "validate"))
    return result


class WebhookFailed(Exception):
    """The notify webhook answered with an error (retryable or not, as the contract says)."""

    def __init__(self, message: str, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


@DBOS.step(
    **(
        _WF_RETRY
        | {
            "timeout_seconds": 10.0,
            "should_retry": lambda exc: getattr(exc, "retryable", True),
        }
    )
)
async def notify(url: str, body: dict[str, Any]) -> dict[str, Any]:
    """The notify webhook: POST the input as JSON with the bearer token (read at call time)."""
    if _http is None:
        raise WebhookFailed("no HTTP client", False)
    headers = {"Authorization": f"Bearer {os.environ.get('NOTIFY_TOKEN', '')}"}
    try:
        response = await _http.post(url, json=body, headers=headers)
    except httpx.TransportError as exc:
        raise WebhookFailed(f"POST {url}: {type(exc).__name__}", True) from None
    code = response.status_code
    if code >= 300:
        raise WebhookFailed(f"POST {url} answered {code}", code >= 500 or code in (408, 429))
    payload: dict[str, Any] = response.json()
    return payload


@DBOS.step(**_WF_RETRY)
async def unpublish(step_id: str, step_input: Any, step_result: Any) -> dict[str, Any]:
    """documents.unpublish: the compensation of validate."""
    data = {"step_id": step_id, "input": step_input, "result": step_result}
    result: dict[str, Any] = await demo.unpublish(
        data, _context(f"{step_id}:rollback", "unpublish")
    )
    return result


async def _bounded(limit: asyncio.Semaphore, step: Awaitable[T]) -> T:
    async with limit:
        return await step


@DBOS.workflow()
async def document_processing(data: dict[str, Any], notify_url: str) -> dict[str, Any]:
    """The example's control flow over `data` (the execution's document)."""
    data = dict(data)
    fetched = await fetch(data["document_url"])
    data |= {"document": fetched["document"], "pages": fetched["pages"]}
    # extract: OCR and metadata in parallel.
    text, meta = await asyncio.gather(
        ocr(data["document"], data.get("language")), metadata(data["document"])
    )
    data |= {"text": text["text"], "ocr_confidence": text["confidence"]}
    data |= {"doc_type": meta["doc_type"], "metadata": meta}
    # route
    if data["doc_type"] == "invoice":
        # The loop: one step per page, at most 4 at once. Each step is called (its step id
        # taken) in page order before any runs, so ids are the same on a recovery.
        limit = asyncio.Semaphore(4)
        calls = [line_items(i, page, data["document"]) for i, page in enumerate(data["pages"])]
        pages = await asyncio.gather(*(_bounded(limit, c) for c in calls))
        data["invoice_pages"] = {"iterations": len(pages), "results": pages}
    elif data["doc_type"] == "contract":
        answer = await DBOS.recv_async("contract_review", timeout_seconds=86400)
        if not isinstance(answer, dict) or not isinstance(answer.get("approved"), bool):
            raise ValueError("contract_review: the answer does not fit the form")
        data["contract_review"] = answer
    else:
        try:
            classified = await classify(data)
        except (demo.LowConfidenceError, dbos_error.DBOSMaxStepRetriesExceeded):
            # The error handler human_review: its answer recovers the step.
            classified = await DBOS.recv_async("human_review", timeout_seconds=172800)
            if not isinstance(classified, dict) or "doc_type" not in classified:
                raise ValueError("human_review: the answer does not fit the form") from None
        data["doc_type"] = classified["doc_type"]
    # validate (input_validation: the input needs `text`)
    if data.get("text") is None:
        raise ValueError("validate: input has no text")
    validated = await validate_quality(data["text"], data.get("ocr_confidence"))
    data["validate"] = validated
    try:
        data["notify"] = await notify(
            notify_url, {"document_url": data["document_url"], "doc_type": data["doc_type"]}
        )
    except (WebhookFailed, dbos_error.DBOSMaxStepRetriesExceeded):
        # The run fails: compensate the completed step that has a rollback action.
        inputs = {"text": data["text"], "confidence": data.get("ocr_confidence")}
        await unpublish("validate", inputs, validated)
        raise
    return data


async def _run(jobs: list[dict[str, str]], notify_url: str, concurrency: int) -> dict[str, Any]:
    global _http
    _http = httpx.AsyncClient(follow_redirects=False)
    pending = iter(jobs)
    latencies: list[float] = []
    completed = 0

    async def worker() -> None:
        nonlocal completed
        for job in pending:
            t0 = time.perf_counter()
            with SetWorkflowID(job["id"]):
                handle = await DBOS.start_workflow_async(
                    document_processing, {"document_url": job["url"]}, notify_url
                )
            result = await handle.get_result()
            latencies.append(time.perf_counter() - t0)
            completed += result.get("notify", {}).get("received") is True

    try:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(min(concurrency, len(jobs)))))
        wall = time.perf_counter() - t0
    finally:
        await _http.aclose()
    return {"wall": wall, "latencies": latencies, "completed": completed}


def run_w3(spec: dict[str, Any]) -> dict[str, Any]:
    """W3: the jobs (idempotency key, execution id, document URL), `concurrency` at once."""
    if demo.SCALE != 0:
        raise WorkloadFailed(f"FLOWLEDGER_DEMO_LATENCY is {demo.SCALE}, not 0")
    jobs: list[dict[str, str]] = spec["jobs"]
    launch(spec["dbname"])
    try:
        out = asyncio.run(_run(jobs, spec["notify_url"], int(spec["concurrency"])))
    finally:
        DBOS.destroy()
    n = len(jobs)
    counts = status_counts(spec["dbname"])
    if out["completed"] != n or counts.get("SUCCESS", 0) != n or sum(counts.values()) != n:
        raise WorkloadFailed(f"DBOS w3: {out['completed']} of {n} completed, statuses {counts}")
    lat = out["latencies"]
    return {
        "wall": out["wall"],
        "n": n,
        "completed": out["completed"],
        "latencies": lat,
        "retries": _retries,
    }
