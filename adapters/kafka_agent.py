"""Remote agents over Kafka, the agent side (`AgentService`, `flowledger agent`): tasks in
from `<prefix>.tasks.<capability>` and the agent's inbox `<prefix>.agent.<agent_id>`, results
back on `<prefix>.task-results` (the messages are in `kafka_messages`, the worker side in
`kafka_tasks`).

One consumer per capability, in the consumer group `<prefix>-agents-<capability>`, so the
agents offering a capability share its tasks, and one for its inbox in a group of its own,
`<prefix>-agent-<agent_id>`, so a restarted agent resumes its inbox. An agent commits a
task's offset only after it published the result: if it dies mid-task, a shared task is
delivered to another agent of the group (and an inbox task is failed over by the worker).
It announces itself on `<prefix>.agents` every few seconds (capabilities, actions, tasks in
flight, concurrency), and workers keep the roster.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Literal

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord
from aiokafka.errors import KafkaError

from flowledger.adapters.agents import ActionContext, AgentRegistry, InProcessRunner
from flowledger.adapters.kafka import (
    METADATA_MAX_AGE_MS,
    KafkaSettings,
    commit,
    ensure_topics,
    keep_topics,
    recover,
    stop_client,
)
from flowledger.adapters.kafka_messages import (
    FETCH_WAIT_MS,
    HEARTBEAT_EVERY,
    MAX_TASK_BYTES,
    MAX_TOPIC_NAME,
    Heartbeat,
    Task,
    TaskResult,
    inbox_topic,
    parse,
    task_topic,
)
from flowledger.domain.errors import ConfigurationError
from flowledger.services.ports import AttemptFailed

log = logging.getLogger(__name__)


class AgentService:
    """`flowledger agent`: runs the tasks of the capabilities its registry offers."""

    def __init__(
        self,
        settings: KafkaSettings,
        registry: AgentRegistry,
        agent_id: str,
        *,
        concurrency: int = 16,
        say: Callable[[str], object] = lambda _: None,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.agent_id = agent_id
        self.concurrency = concurrency
        self.say = say
        self.runner = InProcessRunner(registry, threads=concurrency)
        self.capabilities = registry.capabilities()
        try:
            self._topics = [task_topic(settings, c) for c in self.capabilities]
        except AttemptFailed as exc:
            raise ConfigurationError(exc.message) from None
        inbox = inbox_topic(settings, agent_id)
        if inbox is None:
            raise ConfigurationError(
                f"agent id {agent_id!r} cannot name a Kafka topic: use letters, digits, "
                f"'.', '_' or '-', at most {MAX_TOPIC_NAME} characters with the topic's prefix"
            )
        self.inbox = inbox
        # Workers route tasks to the inbox only once it is read: a task sent before its
        # consumer joined its group waits for the join, and that wait would count as the
        # agent's latency.
        self.inbox_ready = False
        self.done = 0  # results published
        self.in_flight = 0

    async def run(self, stop: asyncio.Event) -> None:
        """Consume and run tasks until `stop`; a consumer that fails stops the agent."""
        # Each capability's shared topic in the capability's group; the inbox in its own.
        groups = {
            topic: f"{self.settings.prefix}-agents-{capability}"
            for capability, topic in zip(self.capabilities, self._topics, strict=True)
        }
        groups[self.inbox] = f"{self.settings.prefix}-agent-{self.agent_id}"
        self._topics.append(self.inbox)
        await ensure_topics(self.settings, self._topics)
        producer = AIOKafkaProducer(
            bootstrap_servers=self.settings.bootstrap,
            client_id=f"flowledger-agent-{self.agent_id}",
            acks="all",
            linger_ms=1,
            max_request_size=MAX_TASK_BYTES + 65_536,
        )
        await producer.start()
        try:
            await self._announce(producer, "up")
            tasks = [
                asyncio.create_task(self._consume(topic, group, producer, stop))
                for topic, group in groups.items()
            ]
            tasks.append(asyncio.create_task(self._heartbeats(producer, stop)))
            tasks.append(asyncio.create_task(keep_topics(self.settings, self._topics.copy, stop)))
            self.say(
                f"agent {self.agent_id}: taking tasks for {', '.join(self.capabilities)} "
                f"at {self.settings.bootstrap}"
            )
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
            for task in done:
                task.result()  # raises the first failure
            with contextlib.suppress(KafkaError, TimeoutError):
                await asyncio.wait_for(self._announce(producer, "down"), 5)
        finally:
            await stop_client(producer)
            self.runner.close()

    async def _heartbeats(self, producer: AIOKafkaProducer, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), HEARTBEAT_EVERY)
            if stop.is_set():
                return
            try:
                await self._announce(producer, "up")
            except KafkaError as exc:  # the broker is away: the next one tells
                log.warning("heartbeat not sent: %s", exc)
                await recover(self.settings, self._topics, "heartbeat")

    async def _announce(self, producer: AIOKafkaProducer, state: Literal["up", "down"]) -> None:
        heartbeat = Heartbeat(
            agent_id=self.agent_id,
            capabilities=list(self.capabilities),
            actions=self.registry.names(),
            in_flight=self.in_flight,
            at=datetime.now(UTC),
            state=state,
            concurrency=self.concurrency,
            inbox=self.inbox_ready,
        )
        await producer.send_and_wait(
            self.settings.agents,
            key=self.agent_id.encode(),
            value=heartbeat.model_dump_json().encode(),
        )

    async def _consume(
        self, topic: str, group: str, producer: AIOKafkaProducer, stop: asyncio.Event
    ) -> None:
        consumer = AIOKafkaConsumer(
            topic,
            bootstrap_servers=self.settings.bootstrap,
            group_id=group,
            metadata_max_age_ms=METADATA_MAX_AGE_MS,
            client_id=f"flowledger-agent-{self.agent_id}",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=MAX_TASK_BYTES + 65_536,
            fetch_max_wait_ms=FETCH_WAIT_MS,
        )
        await consumer.start()
        try:
            while not stop.is_set():
                try:
                    batches = await consumer.getmany(timeout_ms=200, max_records=self.concurrency)
                except KafkaError as exc:  # the broker went away: wait for it
                    log.warning("tasks not read: %s", exc)
                    await recover(self.settings, [topic], "tasks")
                    continue
                if topic == self.inbox and not self.inbox_ready and consumer.assignment():
                    self.inbox_ready = True
                    with contextlib.suppress(KafkaError):  # else the next heartbeat says so
                        await self._announce(producer, "up")
                if not batches:
                    continue
                messages = [m for ms in batches.values() for m in ms]
                await asyncio.gather(*(self._handle(m, producer, stop) for m in messages))
                # Only now: every task of the batch has its result published. Not
                # committed (moved to another agent, a broker away): they run again there,
                # and the worker keeps the first result of the attempt it waits for.
                await commit(consumer, {tp: ms[-1].offset + 1 for tp, ms in batches.items()})
        finally:
            await stop_client(consumer)

    async def _handle(
        self, message: ConsumerRecord[bytes, bytes], producer: AIOKafkaProducer, stop: asyncio.Event
    ) -> None:
        task = parse(Task, message)
        if task is None:
            return  # nothing to answer: the worker's timeout covers it
        now = datetime.now(UTC)
        if task.deadline is not None and task.deadline <= now:
            log.info("task %s expired before it was taken: not run", task.attempt_id)
            return
        self.in_flight += 1
        try:
            result = await self._run(task, now)
        finally:
            self.in_flight -= 1
        await self._publish(result, producer, stop)

    async def _run(self, task: Task, now: datetime) -> TaskResult:
        answer = {"attempt_id": task.attempt_id, "execution_id": task.execution_id}
        answer["agent_id"] = self.agent_id
        spec = self.registry.get(task.action)
        if spec is None or task.action not in self.capabilities.get(task.capability, []):
            return TaskResult(
                **answer,
                ok=False,
                error_type="ActionNotFound",
                message=f"agent {self.agent_id} does not offer action {task.action!r} "
                f"for capability {task.capability!r}",
                retryable=True,  # another agent of the capability may
            )
        context = ActionContext(
            task.execution_id, task.step_key, task.step_id, task.attempt, task.attempt_id
        )
        budget = (task.deadline - now).total_seconds() if task.deadline is not None else None
        try:
            async with asyncio.timeout(budget):
                output = await self.runner.call(spec, task.input, context)
        except TimeoutError:
            return TaskResult(
                **answer,
                ok=False,
                error_type="TimeoutError",
                message=f"attempt {task.attempt} passed its deadline on agent {self.agent_id}",
                retryable=True,
            )
        except AttemptFailed as exc:
            return TaskResult(
                **answer,
                ok=False,
                error_type=exc.error_type,
                message=exc.message[:8000],
                retryable=exc.retryable,
            )
        except Exception as exc:  # noqa: BLE001 - any error of user code fails the attempt
            return TaskResult(
                **answer,
                ok=False,
                error_type=type(exc).__name__[:512],
                message=(str(exc) or repr(exc))[:8000],
            )
        return TaskResult(**answer, ok=True, output=output)

    async def _publish(
        self, result: TaskResult, producer: AIOKafkaProducer, stop: asyncio.Event
    ) -> None:
        """Publish the result, trying again while the broker is away (the work is done)."""
        value = result.model_dump_json().encode()
        while True:
            try:
                await producer.send_and_wait(
                    self.settings.task_results, key=result.execution_id.encode(), value=value
                )
                self.done += 1
                return
            except KafkaError as exc:
                if stop.is_set():
                    raise
                log.warning("result of %s not published yet: %s", result.attempt_id, exc)
                await recover(self.settings, what="results")
