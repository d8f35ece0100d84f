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
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import (
    CommitFailedError,
    IllegalStateError,
    KafkaError,
    TopicAlreadyExistsError,
)
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
Nudge = Callable[[], Awaitable[None]]


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


async def ensure_topics(settings: KafkaSettings) -> None:
    """Create the topics flowledger uses if they are missing."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [t for t in (settings.commands, settings.dlq) if t not in existing]
        if missing:
            with contextlib.suppress(TopicAlreadyExistsError):  # another worker was first
                await admin.create_topics(
                    [NewTopic(t, settings.partitions, replication_factor=1) for t in missing]
                )
    finally:
        await admin.close()


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
    ) -> None:
        self.app = app
        self.settings = settings
        self.nudge = nudge
        self.client_id = client_id
        self.handled = 0  # commands stored
        self.duplicates = 0  # commands whose id was handled before
        self.rejected = 0  # messages sent to the DLQ

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until `stop` is set."""
        consumer = AIOKafkaConsumer(
            self.settings.commands,
            bootstrap_servers=self.settings.bootstrap,
            group_id=self.settings.group,
            client_id=self.client_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            # Fetch an oversized message whole, so it can be sent on to the DLQ.
            max_partition_fetch_bytes=4 * MAX_COMMAND_BYTES,
            fetch_max_bytes=8 * MAX_COMMAND_BYTES,
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
            try:
                while not stop.is_set():
                    await self._poll(consumer, producer)
            finally:
                await consumer.stop()
        finally:
            await producer.stop()

    async def _poll(self, consumer: AIOKafkaConsumer, producer: AIOKafkaProducer) -> None:
        batches = await consumer.getmany(timeout_ms=200, max_records=200)
        done: dict[TopicPartition, int] = {}
        stored = False
        for tp, messages in batches.items():
            for message in messages:
                outcome = await self._one(message, producer)
                if outcome is None:  # the store is unavailable: again from this message
                    consumer.seek(tp, message.offset)
                    await asyncio.sleep(RETRY_AFTER)
                    break
                stored = stored or outcome
                done[tp] = message.offset + 1
        if done:
            # Only now: every command up to these offsets is stored or in the DLQ.
            try:
                await consumer.commit(done)
            except (CommitFailedError, IllegalStateError) as exc:
                # The partitions moved to another worker meanwhile: it gets these
                # messages again, and finds them handled (their records are stored).
                log.info("offsets not committed (partitions reassigned): %s", exc)
        if stored and self.nudge is not None:
            await self.nudge()

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
