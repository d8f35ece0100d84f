"""Kafka in the long-running commands: `worker` and `serve` (commands in, events out,
remote agents, scale-out) and `agent`.

aiokafka is imported only when KAFKA_BOOTSTRAP_SERVERS is set: the other commands start
without it.

A worker joins the consumer group of the command topic. The partitions the group gives it
decide which executions it drives: those whose id the default partitioner puts on one of
them (`kafka.partition_of`), so every execution has one driver while the group is stable,
and when a worker dies its partitions, and with them its executions, move to the others,
which resume them from their events. The worker holding partition 0 also publishes the
store's events. Any worker takes any command (it only stores it); the owner drives what
the command changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING
from uuid import UUID

from flowledger.adapters.agents import InProcessRunner
from flowledger.domain.errors import FlowledgerError
from flowledger.services.app import FlowledgerApp
from flowledger.services.engine import Engine

if TYPE_CHECKING:
    from flowledger.adapters.kafka import CommandIntake, KafkaSettings
    from flowledger.adapters.kafka_tasks import RemoteRunner
    from flowledger.services.router import Sample

Say = Callable[[str], object]


def kafka_configured() -> bool:
    """Whether KAFKA_BOOTSTRAP_SERVERS is set."""
    return bool(os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "").strip())


def _settings() -> KafkaSettings:
    from flowledger.adapters import kafka

    settings = kafka.kafka_settings(os.environ)
    assert settings is not None
    return settings


def _unusable(settings: KafkaSettings, exc: BaseException) -> FlowledgerError:
    return FlowledgerError(f"cannot use Kafka at {settings.bootstrap}: {type(exc).__name__}: {exc}")


class KafkaLink:
    """One worker's (or serve's) part in a Kafka deployment; see the module's docstring."""

    def __init__(self, app: FlowledgerApp, local: InProcessRunner, role: str) -> None:
        from flowledger.adapters.kafka_messages import agent_id_default
        from flowledger.adapters.kafka_tasks import RemoteRunner

        self.app = app
        self.role = role
        self.settings = _settings()
        self.runner: RemoteRunner = RemoteRunner(
            self.settings, local, f"{role}-{agent_id_default()}", history=_history(app)
        )
        self._publisher: tuple[asyncio.Task[None], asyncio.Event] | None = None
        self._failure: BaseException | None = None  # the event publisher's
        self._nudge: Callable[[], None] | None = None  # the event publisher's, if leading

    async def start(self, engine: Engine, stop: asyncio.Event, say: Say) -> asyncio.Task[None]:
        """Connect (a FlowledgerError if the broker cannot be used), then run until `stop`
        in the returned task; it sets `stop` when it ends, so a failure stops the process."""
        from flowledger.adapters import kafka

        await engine.set_owner(lambda _: False)  # nothing until the group assigns partitions
        # What this engine commits is published at once, not at the publisher's next look.
        engine.add_listener(lambda _: self._nudge() if self._nudge is not None else None)
        try:
            await kafka.ensure_topics(self.settings)
            reader = await self.runner.start(stop)
        except Exception as exc:  # noqa: BLE001 - any client error: the broker is not usable
            raise _unusable(self.settings, exc) from None

        async def assigned(partitions: set[int], total: int) -> None:
            def owner(eid: UUID) -> bool:
                return kafka.partition_of(str(eid), total) in partitions

            count = await engine.set_owner(owner)
            say(
                f"{self.role}: drives the executions of partitions {sorted(partitions)} of "
                f"{total}; took up {count}"
            )
            self._lead(0 in partitions, stop, say)

        intake = kafka.CommandIntake(
            self.app,
            self.settings,
            engine.poll_store,
            client_id=f"flowledger-{self.role}",
            on_assigned=assigned,
        )
        task = asyncio.create_task(self._run(intake, reader, stop))
        task.add_done_callback(lambda _: stop.set())
        where = f"{self.settings.commands} at {self.settings.bootstrap}"
        say(f"{self.role}: consuming commands from {where}")
        return task

    def _lead(self, leader: bool, stop: asyncio.Event, say: Say) -> None:
        """Publish the store's events while this worker holds partition 0."""
        from flowledger.adapters.kafka_events import EventPublisher

        if leader and self._publisher is None:
            own = asyncio.Event()
            publisher = EventPublisher(self.app, self.settings, f"flowledger-{self.role}")
            task = asyncio.create_task(publisher.run(own))
            task.add_done_callback(lambda t: self._failed(t, stop))
            self._publisher = (task, own)
            self._nudge = publisher.nudge
            say(f"{self.role}: publishing events to {self.settings.events}")
        elif not leader and self._publisher is not None:
            self._publisher[1].set()
            self._publisher = None
            self._nudge = None

    def _failed(self, task: asyncio.Task[None], stop: asyncio.Event) -> None:
        """The event publisher stopped on an error: so does the process, with that error."""
        if task.cancelled() or task.exception() is None:
            return
        self._failure = task.exception()
        stop.set()

    async def _run(
        self, intake: CommandIntake, reader: asyncio.Task[None], stop: asyncio.Event
    ) -> None:
        from flowledger.adapters.kafka import keep_topics

        commands = asyncio.create_task(intake.run(stop))
        keeper = asyncio.create_task(keep_topics(self.settings, self.runner.task_topics, stop))
        try:
            done, _ = await asyncio.wait(
                [commands, reader, keeper], return_when=asyncio.FIRST_COMPLETED
            )
            stop.set()
            for task in done:
                task.result()  # the first failure, if any
        finally:
            stop.set()
            if self._publisher is not None:
                self._publisher[1].set()
                with contextlib.suppress(Exception):
                    await self._publisher[0]
            await asyncio.gather(commands, reader, keeper, return_exceptions=True)
            await self.runner.close()
        if self._failure is not None:
            raise self._failure


def _history(app: FlowledgerApp) -> Callable[[datetime], list[Sample]]:
    """The recent attempts of each agent, from the performance view as it stands (`serve`
    keeps it caught up; a worker alone routes by the results it receives itself)."""
    from flowledger.projections.performance import PerformanceView
    from flowledger.projections.store import backend_for, open_view
    from flowledger.services.router import Sample

    views: list[PerformanceView] = []  # opened on first use, in the reading thread

    def recent(since: datetime) -> list[Sample]:
        if not views:
            views.append(open_view(PerformanceView, backend_for(app)))  # type: ignore[type-abstract]
        return [
            Sample(a.agent, a.succeeded, a.seconds, a.ended) for a in views[0].agent_attempts(since)
        ]

    return recent


def kafka_link(app: FlowledgerApp, local: InProcessRunner, role: str) -> KafkaLink | None:
    """The process's link to Kafka when KAFKA_BOOTSTRAP_SERVERS is set, else None."""
    return KafkaLink(app, local, role) if kafka_configured() else None


async def run_agent(
    registry_names: list[str], agent_id: str | None, concurrency: int, say: Say
) -> int:
    """`flowledger agent`: run tasks until SIGINT/SIGTERM."""
    import signal

    from flowledger.adapters.agents import default_registry
    from flowledger.adapters.kafka_agent import AgentService
    from flowledger.adapters.kafka_messages import agent_id_default

    if not kafka_configured():
        raise FlowledgerError("flowledger agent needs KAFKA_BOOTSTRAP_SERVERS (host:port)")
    if not registry_names:
        raise FlowledgerError("no action offered: give --agents MODULE_OR_FILE")
    settings = _settings()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    service = AgentService(
        settings, default_registry, agent_id or agent_id_default(), concurrency=concurrency, say=say
    )
    try:
        await service.run(stop)
    except FlowledgerError:
        raise
    except Exception as exc:  # noqa: BLE001 - any client error: the broker is not usable
        raise _unusable(settings, exc) from None
    return 0
