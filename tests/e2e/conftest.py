"""End-to-end fixtures: a store per test, the `flowledger` CLI on it, a webhook receiver,
`flowledger serve` on it and a client of that."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cli_driver import AGENTS, COMMAND_TIMEOUT, DATA, Cli, Receiver
from http_driver import Server, start_server


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


@pytest.fixture
def server(cli: Cli, processes: list[subprocess.Popen[str]]) -> Iterator[Server]:
    """`flowledger serve` with the e2e agents and the gate agent on the test's fresh SQLite
    store; it must stop cleanly, with no traceback in its output."""
    srv = start_server(cli, "--agents", AGENTS, "--agents", DATA / "gate.py")
    processes.append(srv.proc)
    yield srv
    assert srv.stop() == 0, srv.output
    assert "Traceback" not in srv.output, srv.output


@pytest.fixture
def api(server: Server) -> Iterator[httpx.Client]:
    """A client of `server`."""
    with server.client() as client:
        yield client
