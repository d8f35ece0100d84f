"""Demo agents for examples/document_processing.yaml.

Latencies and failure rates are realistic for the services they stand for, and drawn
from a PRNG seeded by FLOWLEDGER_DEMO_SEED (default 7), the execution, the step and the
attempt: the same run fails the same way every time. FLOWLEDGER_DEMO_LATENCY scales the
latencies (0 makes every agent instant, as the benchmarks do).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
from typing import Any

from flowledger.adapters.agents import ActionContext, action

SEED = os.environ.get("FLOWLEDGER_DEMO_SEED", "7")
SCALE = float(os.environ.get("FLOWLEDGER_DEMO_LATENCY", "1"))


class TransientStorageError(Exception):
    """The document store timed out; a retry usually works."""


class OCRServiceUnavailable(Exception):
    """The OCR backend answered 503; a retry usually works."""


class QualityServiceBusy(Exception):
    """The quality checker is overloaded; a retry usually works."""


class LowConfidenceError(Exception):
    """The classifier cannot tell what the document is; a person has to."""


def _rng(ctx: ActionContext) -> random.Random:
    return random.Random(f"{SEED}:{ctx.execution_id}:{ctx.step_key}:{ctx.attempt}")


async def _work(rng: random.Random, low: float, high: float) -> None:
    if SCALE > 0:
        await asyncio.sleep(rng.uniform(low, high) * SCALE)


def _kind(url: str) -> str:
    for kind in ("invoice", "contract"):
        if kind in url.lower():
            return kind
    return "unknown"


@action("documents.fetch", capability="storage")
async def fetch(data: dict[str, Any], ctx: ActionContext) -> dict[str, Any]:
    """Download the document: 50-150 ms, 5% transient storage errors."""
    rng = _rng(ctx)
    await _work(rng, 0.05, 0.15)
    if rng.random() < 0.05:
        raise TransientStorageError("storage read timed out")
    url = data["url"]
    digest = hashlib.sha256(url.encode()).hexdigest()
    pages = 1 + int(digest[:2], 16) % 5
    return {
        "document": {"url": url, "sha256": digest, "kind": _kind(url)},
        "pages": [{"number": n + 1} for n in range(pages)],
    }


@action("documents.ocr", capability="ocr")
async def ocr(data: dict[str, Any], ctx: ActionContext) -> dict[str, Any]:
    """Recognise the text: 150-400 ms, 10% transient backend errors."""
    rng = _rng(ctx)
    await _work(rng, 0.15, 0.4)
    if rng.random() < 0.10:
        raise OCRServiceUnavailable("OCR backend answered 503")
    kind = data["document"]["kind"]
    return {
        "text": f"{kind} text of {data['document']['url']}",
        "confidence": round(rng.uniform(0.82, 0.99), 3),
    }


@action("documents.metadata", capability="nlp")
async def metadata(data: dict[str, Any], ctx: ActionContext) -> dict[str, Any]:
    """Extract metadata and the document type: 50-200 ms."""
    rng = _rng(ctx)
    await _work(rng, 0.05, 0.2)
    return {
        "doc_type": data["document"]["kind"],
        "language": "en",
        "sha256": data["document"]["sha256"],
    }


@action("invoices.line_items", capability="nlp")
async def line_items(data: dict[str, Any], ctx: ActionContext) -> dict[str, Any]:
    """Extract the line items of one invoice page: 30-120 ms."""
    rng = _rng(ctx)
    await _work(rng, 0.03, 0.12)
    page = data["page"]["number"]
    return {
        "page": page,
        "items": [
            {"line": i + 1, "amount": round(rng.uniform(5, 500), 2)}
            for i in range(rng.randint(1, 4))
        ],
    }


@action("documents.classify", capability="nlp")
async def classify(data: dict[str, Any], ctx: ActionContext) -> dict[str, Any]:
    """Classify an unknown document: 100-300 ms; it is never sure enough (a person is)."""
    rng = _rng(ctx)
    await _work(rng, 0.1, 0.3)
    raise LowConfidenceError(f"best guess at {rng.uniform(0.3, 0.6):.2f} confidence")


@action("documents.validate_quality")
async def validate_quality(data: dict[str, Any], ctx: ActionContext) -> dict[str, Any]:
    """Check the extraction's quality: 50-150 ms, 25% busy on a first attempt."""
    rng = _rng(ctx)
    await _work(rng, 0.05, 0.15)
    if ctx.attempt == 1 and rng.random() < 0.25:
        raise QualityServiceBusy("quality checker busy, try again")
    confidence = data.get("confidence") or 0.0
    return {"quality": "good" if confidence >= 0.85 else "acceptable", "checked": True}


@action("documents.unpublish")
async def unpublish(data: dict[str, Any], ctx: ActionContext) -> dict[str, Any]:
    """Compensation: withdraw a published result: 20-60 ms."""
    await _work(_rng(ctx), 0.02, 0.06)
    return {"unpublished": data["step_id"]}
