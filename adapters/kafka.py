"""Kafka: commands in from `<prefix>.commands` (shared/spec/commands.md), poison to the DLQ.

`CommandIntake` consumes the command topic in one consumer group (`<prefix>-workers`), in
partition order. Each command is stored with a record of its id in one transaction
(services/follow.py, `CommandRef`), so a redelivered command finds its record and
changes nothing; offsets are committed only after that transaction. A message that is not
a command flowledger can take (not JSON, wrong schema, too large, an unknown workflow, a
command the execution refuses) goes to `<prefix>.commands.dlq` with its reason in headers,
and the consumer moves on. When the store cannot be reached, the message is kept (not
committed) and tried again, so nothing is lost and nothing is skipped.

The engine of the same process is nudged after each batch so that what the commands
stored is driven at once, not at its next look at the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

from aiokafka import (
    AIOKafkaConsumer,
    AIOKafkaProducer,
    ConsumerRebalanceListener,
    ConsumerRecord,
    TopicPartition,
)
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import (
    CommitFailedError,
    IllegalStateError,
    KafkaError,
    TopicAlreadyExistsError,
)
from aiokafka.partitioner import murmur2
from eventsourcing.persistence import IntegrityError, PersistenceError

from flowledger.adapters.kafka_commands import (
    MAX_COMMAND_BYTES,
    CancelExecution,
    Command,
    CommandRejected,
    CompleteHumanTask,
    RegisterWorkflow,
    StartExecution,
    parse_command,
)
from flowledger.domain.definitions import parse_definition
from flowledger.domain.errors import ConfigurationError, FlowledgerError, StoreUnavailable
from flowledger.services.app import CommandRef, FlowledgerApp
from flowledger.services.follow import (
    submit_cancel,
    submit_completion,
    submit_retry,
    submit_start,
)

log = logging.getLogger(__name__)
BOOTSTRAP = "KAFKA_BOOTSTRAP_SERVERS"
PREFIX = "FLOWLEDGER_TOPIC_PREFIX"
PARTITIONS = "FLOWLEDGER_KAFKA_PARTITIONS"
_TOPIC_NAME = re.compile(r"^[A-Za-z0-9._-]{1,200}$")
RETRY_AFTER = 1.0  # seconds before a message the store could not take is tried again
MAX_MESSAGE_BYTES = 16 * 1_048_576  # the largest message flowledger's topics take
COMMIT_TIMEOUT = 10.0  # seconds an offset commit may take before it is given up on
# How often clients read the cluster's metadata again: how soon a topic made again (after a
# broker lost its data) is consumed again. Kafka's default is 5 minutes.
METADATA_MAX_AGE_MS = 5_000
KEEP_TOPICS_EVERY = 10.0  # seconds between checks that the topics still exist
Nudge = Callable[[], Awaitable[None]]
# Called with the partitions of the command topic this consumer now has, and their total.
Assigned = Callable[[set[int], int], Awaitable[None]]


def partition_of(key: str, partitions: int) -> int:
    """The partition Kafka's default (murmur2) partitioner gives a key: which worker owns an
    execution is decided by its id this way, the same in every worker."""
    return int(murmur2(key.encode()) & 0x7FFFFFFF) % partitions


@dataclass(frozen=True)
class KafkaSettings:
    """Where the broker is and what the topics are called."""

    bootstrap: str
    prefix: str = "flowledger"
    partitions: int = 4

    @property
    def commands(self) -> str:
        return f"{self.prefix}.commands"

    @property
    def dlq(self) -> str:
        return f"{self.prefix}.commands.dlq"

    @property
    def events(self) -> str:
        return f"{self.prefix}.events"

    @property
    def task_results(self) -> str:
        return f"{self.prefix}.task-results"

    @property
    def agents(self) -> str:
        return f"{self.prefix}.agents"

    @property
    def group(self) -> str:
        return f"{self.prefix}-workers"


def kafka_settings(env: Mapping[str, str]) -> KafkaSettings | None:
    """The Kafka settings from the environment; None when KAFKA_BOOTSTRAP_SERVERS is unset."""
    bootstrap = env.get(BOOTSTRAP, "").strip()
    if not bootstrap:
        return None
    servers = [s.strip() for s in bootstrap.split(",")]
    if any(not s or ":" not in s for s in servers):
        raise ConfigurationError(f"{BOOTSTRAP}={bootstrap!r}: give host:port[,host:port...]")
    prefix = env.get(PREFIX, "").strip() or "flowledger"
    if not _TOPIC_NAME.match(prefix):
        raise ConfigurationError(
            f"{PREFIX}={prefix!r}: use letters, digits, '.', '_' or '-' (at most 200)"
        )
    raw = env.get(PARTITIONS, "").strip() or "4"
    if not raw.isdigit() or not 1 <= int(raw) <= 1000:
        raise ConfigurationError(f"{PARTITIONS}={raw!r}: give a whole number from 1 to 1000")
    return KafkaSettings(",".join(servers), prefix, int(raw))


async def ensure_topics(settings: KafkaSettings, more: Sequence[str] = ()) -> None:
    """Create the topics flowledger uses (and `more`) if they are missing."""
    wanted = (
        settings.commands,
        settings.dlq,
        settings.events,
        settings.task_results,
        settings.agents,
        *more,
    )
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        # An event carries a step's result and the data it writes (each up to 1 MiB): more
        # than a broker's default largest message (1 MiB).
        big = {"max.message.bytes": str(MAX_MESSAGE_BYTES)}
        missing = [t for t in wanted if t not in existing]
        if missing:
            with contextlib.suppress(TopicAlreadyExistsError):  # another worker was first
                await admin.create_topics(
                    [
                        NewTopic(t, settings.partitions, replication_factor=1, topic_configs=big)
                        for t in missing
                    ]
                )
    finally:
        await admin.close()


async def stop_client(client: AIOKafkaConsumer | AIOKafkaProducer) -> None:
    """Stop a client. A consumer stopped while its fetcher waits out a broker error raises
    the CancelledError of its own fetch task (aiokafka's fetcher awaits the tasks it
    cancels): that one is not ours, and must not be taken for a cancellation of the caller."""
    try:
        await client.stop()
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
        log.info("the Kafka client stopped while its fetch was being retried")


async def keep_topics(
    settings: KafkaSettings, more: Callable[[], Sequence[str]], stop: asyncio.Event
) -> None:
    """Until `stop`, make the topics again whenever they are gone: a broker restarted
    without its data (Tansu on memory storage) comes back empty, and a topic nobody
    produces to would then never come back for its consumers."""
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), KEEP_TOPICS_EVERY)
        if stop.is_set():
            return
        try:
            await ensure_topics(settings, more())
        except Exception as exc:  # noqa: BLE001 - the broker may be away: try again later
            log.info("topics not checked: %s", exc)


async def recover(settings: KafkaSettings, more: Sequence[str] = (), what: str = "") -> None:
    """After a broker error: make the topics again if they are gone (a broker that lost its
    data, such as one restarted on memory storage), then pause before going on."""
    try:
        await ensure_topics(settings, more)
    except Exception as exc:  # noqa: BLE001 - the broker may still be away: try again later
        log.info("%stopics not checked: %s", f"{what}: " if what else "", exc)
    await asyncio.sleep(RETRY_AFTER)


async def commit(consumer: AIOKafkaConsumer, offsets: dict[TopicPartition, int]) -> bool:
    """Commit offsets; False when they could not be (the partitions moved, the broker is
    away or lost them): the messages are then delivered again, and found handled."""
    try:
        await asyncio.wait_for(consumer.commit(offsets), COMMIT_TIMEOUT)
    except (CommitFailedError, IllegalStateError, KafkaError, TimeoutError) as exc:
        log.info("offsets not committed: %s", exc or type(exc).__name__)
        return False
    return True


def take(app: FlowledgerApp, command: Command) -> bool:
    """Store what a command asks for, with the record of its id; False when that id was
    handled before (nothing changes). A command the domain refuses raises its error."""
    ref = CommandRef(command.command_id, command.type)
    if app.handled(command.command_id):
        return False
    try:
        if isinstance(command, RegisterWorkflow):
            source = f"command {command.command_id}"
            app.register(parse_definition(command.definition, source), ref)
        elif isinstance(command, StartExecution):
            wf = app.workflow(command.workflow_id, command.version)
            submit_start(app, wf, command.input, command.idempotency_key, command=ref)
        elif isinstance(command, CompleteHumanTask):
            submit_completion(app, command.execution_id, command.step_id, command.data, command=ref)
        elif isinstance(command, CancelExecution):
            reason = command.reason or f"cancelled by command {command.command_id}"
            submit_cancel(app, command.execution_id, reason, command=ref)
        else:
            submit_retry(app, command.execution_id, command=ref)
    except IntegrityError:
        if app.handled(command.command_id):
            return False  # another worker handled the same command just now
        raise
    return True


class CommandIntake:
    """Consumes the command topic until stopped; see the module's docstring."""

    def __init__(
        self,
        app: FlowledgerApp,
        settings: KafkaSettings,
        nudge: Nudge | None = None,
        *,
        client_id: str = "flowledger",
        on_assigned: Assigned | None = None,
    ) -> None:
        self.app = app
        self.settings = settings
        self.nudge = nudge
        self.client_id = client_id
        self.on_assigned = on_assigned
        self.handled = 0  # commands stored
        self.duplicates = 0  # commands whose id was handled before
        self.rejected = 0  # messages sent to the DLQ

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until `stop` is set."""
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.settings.bootstrap,
            metadata_max_age_ms=METADATA_MAX_AGE_MS,
            group_id=self.settings.group,
            client_id=self.client_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            # Fetch an oversized message whole, so it can be sent on to the DLQ.
            max_partition_fetch_bytes=4 * MAX_COMMAND_BYTES,
            fetch_max_bytes=8 * MAX_COMMAND_BYTES,
            fetch_max_wait_ms=20,  # a command waits at most this long for a held fetch
        )
        producer = AIOKafkaProducer(
            bootstrap_servers=self.settings.bootstrap,
            client_id=self.client_id,
            acks="all",
            max_request_size=8 * MAX_COMMAND_BYTES,
        )
        await producer.start()
        try:
            await consumer.start()
            consumer.subscribe([self.settings.commands], listener=_Rebalance(self, consumer))
            try:
                while not stop.is_set():
                    try:
                        await self._poll(consumer, producer)
                    except KafkaError as exc:  # the broker went away: wait for it
                        log.warning("commands not consumed: %s", exc)
                        await recover(self.settings, what="commands")
            finally:
                await stop_client(consumer)
        finally:
            await stop_client(producer)

    async def _poll(self, consumer: AIOKafkaConsumer, producer: AIOKafkaProducer) -> None:
        batches = await consumer.getmany(timeout_ms=200, max_records=200)
        # Partitions side by side, each in its order (the order Kafka keeps): one
        # execution's commands are on one partition.
        taken = await asyncio.gather(
            *(self._partition(consumer, producer, tp, ms) for tp, ms in batches.items())
        )
        done = {tp: offset for tp, (offset, _) in zip(batches, taken, strict=True) if offset}
        stored = any(new for _, new in taken)
        if done:
            # Only now: every command up to these offsets is stored or in the DLQ. If the
            # commit fails (say the partitions moved to another worker meanwhile), the
            # messages come again and are found handled (their records are stored).
            await commit(consumer, done)
        if stored and self.nudge is not None:
            await self.nudge()

    async def _partition(
        self,
        consumer: AIOKafkaConsumer,
        producer: AIOKafkaProducer,
        tp: TopicPartition,
        messages: list[ConsumerRecord[bytes, bytes]],
    ) -> tuple[int | None, bool]:
        """Take a partition's messages in order: the offset to commit (None: none taken)
        and whether any was stored."""
        offset, stored = None, False
        for message in messages:
            outcome = await self._one(message, producer)
            if outcome is None:  # the store is unavailable: again from this message
                consumer.seek(tp, message.offset)
                await asyncio.sleep(RETRY_AFTER)
                break
            stored = stored or outcome
            offset = message.offset + 1
        return offset, stored

    async def _one(
        self, message: ConsumerRecord[bytes, bytes], producer: AIOKafkaProducer
    ) -> bool | None:
        """True: stored; False: a duplicate or sent to the DLQ; None: try again later."""
        try:
            command = parse_command(message.value)
            new = await asyncio.to_thread(take, self.app, command)
        except CommandRejected as exc:
            return await self._reject(message, producer, exc.error_type, exc.reason)
        except (StoreUnavailable, PersistenceError, OSError) as exc:
            log.warning(
                "command at %s:%s:%s not stored yet: %s",
                message.topic,
                message.partition,
                message.offset,
                exc,
            )
            return None
        except FlowledgerError as exc:
            return await self._reject(message, producer, type(exc).__name__, str(exc))
        if new:
            self.handled += 1
        else:
            self.duplicates += 1
        return new

    async def _reject(
        self,
        message: ConsumerRecord[bytes, bytes],
        producer: AIOKafkaProducer,
        error_type: str,
        reason: str,
    ) -> bool | None:
        """Send the message to the DLQ: False once it is there, None if the broker did not
        take it (the message is tried again)."""
        headers = [
            ("error", reason[:4000].encode("utf-8", "replace")),
            ("error-type", error_type.encode()),
            ("original-topic", message.topic.encode()),
            ("original-partition", str(message.partition).encode()),
            ("original-offset", str(message.offset).encode()),
        ]
        try:
            await producer.send_and_wait(
                self.settings.dlq, value=message.value, key=message.key, headers=headers
            )
        except KafkaError as exc:
            log.warning(
                "the DLQ did not take the message at %s:%s:%s: %s",
                message.topic,
                message.partition,
                message.offset,
                exc,
            )
            return None
        self.rejected += 1
        log.warning(
            "command at %s:%s:%s sent to %s: %s: %s",
            message.topic,
            message.partition,
            message.offset,
            self.settings.dlq,
            error_type,
            reason,
        )
        return False


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    """Tells the intake's owner which command partitions it has after each rebalance."""

    def __init__(self, intake: CommandIntake, consumer: AIOKafkaConsumer) -> None:
        self.intake = intake
        self.consumer = consumer

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        """Nothing to do: ownership changes with the next assignment."""

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        if self.intake.on_assigned is None:
            return
        topic = self.intake.settings.commands
        total = len(self.consumer.partitions_for_topic(topic) or ())
        mine = {tp.partition for tp in assigned if tp.topic == topic}
        await self.intake.on_assigned(mine, max(total, 1))
