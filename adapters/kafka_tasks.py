"""Remote agents over Kafka, the worker side: tasks out to an agent's inbox
`<prefix>.agent.<agent_id>` or to `<prefix>.tasks.<capability>`, results back (the messages
are in `kafka_messages`, the agent side in `kafka_agent`).

Engine side (`RemoteRunner`): a step whose action no in-process agent offers is published
as a task, keyed by execution id. When live agents offer its `agent_capability` (else its
action's name), the router (`services.router`, policy in `services.routing`) chooses one
by recent latency, failure rate and load, and the task goes to that agent's inbox; with no
live agent known it goes to the capability's shared topic. The attempt then waits for the
result that names its attempt id on `<prefix>.task-results`. While it waits, an agent that
stops sending heartbeats (or says it stopped) loses the attempt: it fails as `AgentLost`
(retryable), and the retry is routed among the agents still live. Every worker reads every
partition of the results topic from where it stood when it started (no consumer group: a
result must reach the worker whose attempt waits for it) and drops results for attempts it
does not wait for, so a late or a duplicate result changes nothing; only the current
attempt of a step can be recorded (domain.progress). A task not answered within the
step's timeout is a failed attempt (TimeoutError) and is retried under the step's policy,
possibly on another agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError

from flowledger.adapters.agents import InProcessRunner
from flowledger.adapters.kafka import (
    METADATA_MAX_AGE_MS,
    KafkaSettings,
    ensure_topics,
    recover,
    stop_client,
)
from flowledger.adapters.kafka_messages import (
    FETCH_WAIT_MS,
    HEARTBEAT_EVERY,
    MAX_TASK_BYTES,
    Heartbeat,
    Task,
    TaskResult,
    inbox_topic,
    parse,
    task_topic,
)
from flowledger.domain.definitions import WebhookStep
from flowledger.domain.progress import Dispatch
from flowledger.services.ports import AttemptFailed, Ran
from flowledger.services.router import AgentState, Router, Sample
from flowledger.services.routing import Route

log = logging.getLogger(__name__)
AGENT_GONE_AFTER = 10.0  # an agent not heard from for this long is taken to be gone
REWIND_CHECK_EVERY = 2.0  # seconds between checks that a results partition was not reset
LOST_CHECK_EVERY = 0.5  # seconds between looks for attempts waiting on a lost agent
FIGURES_EVERY = 10.0  # seconds between reads of the performance history's recent attempts
FIGURES_WINDOW = timedelta(minutes=15)  # how far back those recent attempts go
TIMED_OUT_KEPT = 4096  # routes of attempts cut short, kept for the engine to ask about


@dataclass
class AgentSeen:
    """The last announcement of an agent, and when it came."""

    heartbeat: Heartbeat
    seen: datetime


@dataclass(frozen=True, slots=True)
class _Waiting:
    """A routed attempt waiting for its result."""

    route: Route
    step: tuple[str, str]  # execution id, step key


def _router() -> Router:
    return Router(heartbeat_every=HEARTBEAT_EVERY, gone_after=AGENT_GONE_AFTER)


@dataclass
class RemoteRunner:
    """Runs attempts in process when an agent here offers the action, else on a remote
    agent over Kafka (see the module's docstring). `start` before the engine runs.

    `history`, when given, returns the attempts that ended since a time, from the
    performance history (a blocking read, run in a thread every FIGURES_EVERY): they seed
    the router's figures, which the results received here keep current."""

    settings: KafkaSettings
    local: InProcessRunner
    worker: str
    history: Callable[[datetime], list[Sample]] | None = None
    router: Router = field(default_factory=_router)
    agents: dict[str, AgentSeen] = field(default_factory=dict)
    results: int = 0  # results received for an attempt this worker waited for
    ignored: int = 0  # results for attempts nobody here waits for (late, duplicate)
    lost: int = 0  # attempts taken from an agent that went silent
    _pending: dict[str, asyncio.Future[TaskResult]] = field(default_factory=dict)
    _waiting: dict[str, _Waiting] = field(default_factory=dict)  # by attempt id
    # Routes of attempts cut short (their timeout): the engine asks where they went.
    _timed_out: OrderedDict[str, Route] = field(default_factory=OrderedDict)
    _producer: AIOKafkaProducer | None = None
    _topics: set[str] = field(default_factory=set)
    # The end of each results partition at the last check (see _rewind_if_reset).
    _ends: dict[TopicPartition, int] = field(default_factory=dict)

    def offers(self, action: str) -> bool:
        """Every action: one no agent here offers may be offered by a remote agent (a task
        nobody takes fails on the step's timeout, as it would in Step Functions)."""
        return True

    def agent_for(self, dispatch: Dispatch) -> str | None:
        """None in process; for a remote task that timed out, the agent it was routed to,
        else the capability's agents as a whole (an answer names the one that ran it)."""
        if self._local(dispatch):
            return None
        route = self._timed_out.get(dispatch.attempt_id)
        if route is not None and route.agent is not None:
            return route.agent
        return f"remote:{self._capability(dispatch)}"

    def route_for(self, dispatch: Dispatch) -> str | None:
        """Why a remote task that timed out went where it went; None otherwise."""
        route = self._timed_out.get(dispatch.attempt_id)
        return route.reason if route is not None else None

    def task_topics(self) -> list[str]:
        """The task topics this runner has sent to."""
        return sorted(self._topics)

    def roster(self) -> list[dict[str, Any]]:
        """Every agent heard from, as its last heartbeat said, and whether it is live
        (heard from lately, it did not say it stopped, and the router does not take it for
        lost: an agent whose tasks are being failed over is not shown as live)."""
        now = datetime.now(UTC)
        clock = time.monotonic()
        return [
            {
                "agent_id": a.heartbeat.agent_id,
                "capabilities": a.heartbeat.capabilities,
                "actions": a.heartbeat.actions,
                "in_flight": a.heartbeat.in_flight,
                "concurrency": a.heartbeat.concurrency,
                "inbox": a.heartbeat.inbox,
                "last_seen": a.seen.isoformat(),
                "live": a.heartbeat.state == "up"
                and now - a.seen < timedelta(seconds=AGENT_GONE_AFTER)
                and self.router.lost(a.heartbeat.agent_id, clock) is None,
            }
            for a in sorted(self.agents.values(), key=lambda a: a.heartbeat.agent_id)
        ]

    async def start(self, stop: asyncio.Event) -> asyncio.Task[None]:
        """Connect, position the results consumer at the end, and return the task that
        reads results and heartbeats until `stop`."""
        await ensure_topics(self.settings)
        self._producer = AIOKafkaProducer(
            bootstrap_servers=self.settings.bootstrap,
            client_id=f"flowledger-{self.worker}",
            acks="all",
            linger_ms=1,
            max_request_size=MAX_TASK_BYTES + 65_536,
        )
        await self._producer.start()
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.settings.bootstrap,
            client_id=f"flowledger-{self.worker}",
            group_id=None,
            metadata_max_age_ms=METADATA_MAX_AGE_MS,
            enable_auto_commit=False,
            auto_offset_reset="latest",
            max_partition_fetch_bytes=MAX_TASK_BYTES + 65_536,
            fetch_max_wait_ms=FETCH_WAIT_MS,
        )
        await consumer.start()
        try:
            wanted = (self.settings.task_results, self.settings.agents)
            partitions = [
                TopicPartition(topic, p)
                for topic in wanted
                for p in sorted(await _partitions(consumer, topic))
            ]
            consumer.assign(partitions)
            await consumer.seek_to_end(*partitions)
            for tp in partitions:  # resolved now: a result sent from here on is read
                await consumer.position(tp)
        except BaseException:
            await stop_client(consumer)
            await stop_client(self._producer)
            raise
        return asyncio.create_task(self._read(consumer, stop))

    async def close(self) -> None:
        """Stop the producer (the reading task stops with `stop`; the local runner is its
        owner's to close)."""
        if self._producer is not None:
            await stop_client(self._producer)

    async def run(self, dispatch: Dispatch) -> dict[str, Any] | Ran:
        """Run in process, or publish the task and wait for its result."""
        if self._local(dispatch):
            return await self.local.run(dispatch)
        assert self._producer is not None, "RemoteRunner.start first"
        step = dispatch.step
        assert not isinstance(step, WebhookStep)
        capability = self._capability(dispatch)
        topic = task_topic(self.settings, capability)
        step_ref = (dispatch.execution_id, dispatch.key)
        route = self.router.route(
            capability, step.action, step_ref, time.monotonic(), step.avoid_agents
        )
        if route.agent is not None:
            topic = inbox_topic(self.settings, route.agent) or topic  # live: it has one
        if topic not in self._topics:
            await ensure_topics(self.settings, [topic])
            self._topics.add(topic)
        deadline = None
        if dispatch.timeout is not None:
            deadline = datetime.now(UTC) + timedelta(seconds=dispatch.timeout)
        task = Task(
            attempt_id=dispatch.attempt_id,
            execution_id=dispatch.execution_id,
            step_key=dispatch.key,
            step_id=dispatch.step_id,
            attempt=dispatch.attempt,
            action=step.action,
            capability=capability,
            input=dispatch.input,
            deadline=deadline,
            worker=self.worker,
        )
        future: asyncio.Future[TaskResult] = asyncio.get_running_loop().create_future()
        self._pending[dispatch.attempt_id] = future
        if route.agent is not None:
            self._waiting[dispatch.attempt_id] = _Waiting(route, step_ref)
            self.router.sent(route.agent)
        sent = time.monotonic()
        try:
            try:
                await self._producer.send_and_wait(
                    topic,
                    key=dispatch.execution_id.encode(),
                    value=task.model_dump_json().encode(),
                )
            except KafkaError:
                self._topics.discard(topic)  # made again before the retry (a lost broker)
                raise
            result = await future
        except asyncio.CancelledError:
            self._cut_short(route, dispatch.attempt_id, deadline)
            raise
        finally:
            self._pending.pop(dispatch.attempt_id, None)
            if self._waiting.pop(dispatch.attempt_id, None) is not None and route.agent:
                self.router.settled(route.agent)
        seconds = time.monotonic() - sent if result.ok else None
        self.router.observed(Sample(result.agent_id, result.ok, seconds, datetime.now(UTC)))
        if result.ok:
            return Ran(result.output or {}, result.agent_id, route.reason)
        raise AttemptFailed(
            result.error_type or "AgentError",
            result.message,
            result.retryable,
            agent=result.agent_id,
            route=route.reason,
        )

    def _cut_short(self, route: Route, attempt_id: str, deadline: datetime | None) -> None:
        """The attempt was cancelled: on its timeout (the engine then asks where it went,
        and the agent counts a failure), or because the engine let go of it."""
        if route.agent is None or deadline is None:
            return
        now = datetime.now(UTC)
        if now < deadline - timedelta(seconds=0.05):
            return  # let go of: no fault of the agent's
        self.router.observed(Sample(route.agent, False, None, now))
        self._timed_out[attempt_id] = route
        while len(self._timed_out) > TIMED_OUT_KEPT:
            self._timed_out.popitem(last=False)

    def _take_from_lost(self) -> None:
        """Fail the attempts waiting on an agent that went silent or said it stopped, as
        `AgentLost` (retryable): their retries are routed among the agents still live."""
        now = time.monotonic()
        for attempt_id, waiting in list(self._waiting.items()):
            agent = waiting.route.agent
            future = self._pending.get(attempt_id)
            if agent is None or future is None or future.done():
                continue
            why = self.router.lost(agent, now)
            if why is None:
                continue
            log.warning("attempt %s: agent %s %s: failing over", attempt_id, agent, why)
            self.lost += 1
            self.router.observed(Sample(agent, False, None, datetime.now(UTC)))
            self.router.failed_over(waiting.step, agent, why)
            future.set_exception(
                AttemptFailed(
                    "AgentLost",
                    f"agent {agent} {why}; its task is given up",
                    True,
                    agent=agent,
                    route=waiting.route.reason,
                )
            )

    async def _refresh_figures(self, stop: asyncio.Event) -> None:
        """Seed the router from the performance history now and then (see the class)."""
        history = self.history
        if history is None:
            return
        while not stop.is_set():
            since = datetime.now(UTC) - FIGURES_WINDOW
            try:
                self.router.seed(await asyncio.to_thread(history, since))
            except Exception as exc:  # noqa: BLE001 - the live figures still route; say so
                log.warning("performance history not read for routing: %r", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), FIGURES_EVERY)

    def _local(self, dispatch: Dispatch) -> bool:
        step = dispatch.step
        return isinstance(step, WebhookStep) or self.local.offers(step.action)

    @staticmethod
    def _capability(dispatch: Dispatch) -> str:
        step = dispatch.step
        assert not isinstance(step, WebhookStep)
        return step.agent_capability or step.action

    async def _read(self, consumer: AIOKafkaConsumer, stop: asyncio.Event) -> None:
        checked = looked = time.monotonic()
        figures = asyncio.create_task(self._refresh_figures(stop))
        try:
            while not stop.is_set():
                if time.monotonic() - checked > REWIND_CHECK_EVERY:
                    checked = time.monotonic()
                    await self._rewind_if_reset(consumer)
                if time.monotonic() - looked > LOST_CHECK_EVERY:
                    looked = time.monotonic()
                    self._take_from_lost()
                try:
                    batches = await consumer.getmany(timeout_ms=200, max_records=500)
                except KafkaError as exc:  # the broker went away: wait for it
                    log.warning("results not read: %s", exc)
                    await recover(self.settings, what="results")
                    continue
                for messages in batches.values():
                    for message in messages:
                        if message.topic == self.settings.agents:
                            self._heard(message)
                        else:
                            self._answered(message)
        finally:
            figures.cancel()
            await asyncio.gather(figures, return_exceptions=True)
            await stop_client(consumer)

    async def _rewind_if_reset(self, consumer: AIOKafkaConsumer) -> None:
        """A partition whose end went back, and that now ends before where this reader
        stands, was made again (the broker lost its data): read it from its start, or the
        results written since would wait for offsets the new partition may never reach.
        (An end before the reader's position alone says nothing: Tansu can report an end
        that lags what it already served by a batch; but a partition's end never goes back
        unless it was made again.)"""
        try:
            partitions = list(consumer.assignment())
            ends = await consumer.end_offsets(partitions)
            for tp in partitions:
                end, before = ends[tp], self._ends.get(tp, 0)
                self._ends[tp] = end
                if end < before and end < await consumer.position(tp):
                    log.warning("%s was made again: reading it from its start", tp)
                    consumer.seek(tp, 0)
        except KafkaError as exc:
            log.info("partition ends not checked: %s", exc)

    def _answered(self, message: ConsumerRecord[bytes, bytes]) -> None:
        result = parse(TaskResult, message)
        if result is None:
            return
        future = self._pending.get(result.attempt_id)
        if future is None or future.done():
            self.ignored += 1  # late (the attempt timed out), a duplicate, or another's
            return
        self.results += 1
        future.set_result(result)

    def _heard(self, message: ConsumerRecord[bytes, bytes]) -> None:
        heartbeat = parse(Heartbeat, message)
        if heartbeat is None:
            return
        known = self.agents.get(heartbeat.agent_id)
        if known is None or known.heartbeat.state != heartbeat.state:
            log.info(
                "agent %s is %s: %s",
                heartbeat.agent_id,
                heartbeat.state,
                ", ".join(heartbeat.capabilities),
            )
        self.agents[heartbeat.agent_id] = AgentSeen(heartbeat, datetime.now(UTC))
        addressable = inbox_topic(self.settings, heartbeat.agent_id) is not None
        self.router.heard(
            AgentState(
                agent=heartbeat.agent_id,
                capabilities=frozenset(heartbeat.capabilities),
                actions=frozenset(heartbeat.actions),
                in_flight=heartbeat.in_flight,
                concurrency=heartbeat.concurrency,
                up=heartbeat.state == "up",
                inbox=heartbeat.inbox and addressable,
                seen=time.monotonic(),
            )
        )


async def _partitions(consumer: AIOKafkaConsumer, topic: str) -> set[int]:
    """The topic's partitions, once the consumer's metadata has them."""
    for _ in range(100):
        found = consumer.partitions_for_topic(topic)
        if found:
            return set(found)
        await consumer.topics()  # fetches the cluster's metadata again
        await asyncio.sleep(0.1)
    raise KafkaError(f"no partitions found for topic {topic}")
