"""End-to-end fixtures: a store per test, the `flowledger` CLI on it, a webhook receiver."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_driver import COMMAND_TIMEOUT, Cli, Receiver


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    """`flowledger` on a fresh store in the test's folder."""
    return Cli(tmp_path)


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[str]]]:
    """Background commands a test starts; whatever still runs at the end is killed."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=COMMAND_TIMEOUT)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """A webhook receiver on a free port of 127.0.0.1, serving while the test runs."""
    server = Receiver()
    yield server
    server.close()


@pytest.fixture
def example(cli: Cli, receiver: Receiver) -> Cli:
    """`flowledger` set up for the document-processing example: its `notify` reaches `receiver`."""
    cli.env["NOTIFY_ADDR"] = receiver.addr
    return cli
