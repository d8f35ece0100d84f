"""`flowledger serve` as a real process on a free port, and a client to talk to it.

A plain module (not conftest) so test modules can import it, like cli_driver.
"""

from __future__ import annotations

import itertools
import re
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from cli_driver import COMMAND_TIMEOUT, Cli, wait_for

START_TIMEOUT = 60.0
SETTLE_TIMEOUT = 30.0
_LISTENING = re.compile(r"listening on (http://[^\s;]+)")
_logs = itertools.count(1)


@dataclass
class Server:
    """A running `flowledger serve` and its base URL."""

    proc: subprocess.Popen[str]
    url: str
    log: Path

    def client(self, token: str | None = None) -> httpx.Client:
        """An HTTP client for this server (with the bearer token, if given)."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=COMMAND_TIMEOUT)

    def stop(self) -> int:
        """SIGTERM, as a service manager stops it; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=COMMAND_TIMEOUT)

    def kill(self) -> None:
        """SIGKILL: the process dies wherever it is."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=COMMAND_TIMEOUT)

    @property
    def output(self) -> str:
        """What the server wrote on stderr so far."""
        return self.log.read_text()


def start_server(cli: Cli, *options: str | Path) -> Server:
    """Start `flowledger serve --port 0 OPTIONS` on `cli`'s store; returns once it is ready."""
    log = cli.home / f"serve-{next(_logs)}.err"
    proc = cli.start("serve", "--port", "0", *options, stderr=log)

    def listening() -> str | None:
        if proc.poll() is not None:
            pytest.fail(f"`flowledger serve` exited with {proc.returncode}:\n{log.read_text()}")
        found = _LISTENING.search(log.read_text())
        return found.group(1) if found else None

    url = wait_for("`flowledger serve` to listen", listening, timeout=START_TIMEOUT)
    server = Server(proc, url, log)
    with server.client() as client:
        assert client.get("/readyz").status_code == 200, server.output
    return server


def wait_until(
    client: httpx.Client, execution_id: str, *statuses: str, timeout: float = SETTLE_TIMEOUT
) -> dict[str, Any]:
    """Poll GET /executions/{id} until its status is one of `statuses`; fail at the deadline."""

    def probe() -> dict[str, Any] | None:
        response = client.get(f"/executions/{execution_id}")
        assert response.status_code == 200, response.text
        doc: dict[str, Any] = response.json()
        return doc if doc["status"] in statuses else None

    return wait_for(f"execution {execution_id} to be {' or '.join(statuses)}", probe, timeout)
