"""Starting the Kafka command intake in a long-running command (`worker`, `serve`).

aiokafka is imported only when KAFKA_BOOTSTRAP_SERVERS is set: the other commands start
without it.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable

from flowledger.domain.errors import FlowledgerError
from flowledger.services.app import FlowledgerApp


async def start_intake(
    app: FlowledgerApp,
    stop: asyncio.Event,
    nudge: Callable[[], Awaitable[None]] | None,
    role: str,
    say: Callable[[str], object],
) -> asyncio.Task[None] | None:
    """With KAFKA_BOOTSTRAP_SERVERS set: the topics made if missing, and a task consuming
    commands until `stop` (which it sets if it fails, so the process stops loudly)."""
    if not os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "").strip():
        return None
    from flowledger.adapters import kafka

    settings = kafka.kafka_settings(os.environ)
    assert settings is not None
    try:
        await kafka.ensure_topics(settings)
    except Exception as exc:  # noqa: BLE001 - any client error: the broker is not usable
        raise FlowledgerError(
            f"cannot use Kafka at {settings.bootstrap}: {type(exc).__name__}: {exc}"
        ) from None
    intake = kafka.CommandIntake(app, settings, nudge, client_id=f"flowledger-{role}")
    task = asyncio.create_task(intake.run(stop))
    task.add_done_callback(lambda _: stop.set())
    say(f"{role}: consuming commands from {settings.commands} at {settings.bootstrap}")
    return task
