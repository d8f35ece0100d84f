"""Driving the installed `flowledger` console script as a user does, and looking at its store.

Every command runs as a subprocess with FLOWLEDGER_HOME and the working directory set to
one folder, the store's. A plain module (not conftest) so test modules can import it.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import pytest
import support

FLOWLEDGER = Path(sys.executable).parent / "flowledger"
DATA = Path(__file__).parent / "data"
AGENTS = DATA / "agents.py"
EXAMPLE = DATA / "document_processing.yaml"
EXAMPLE_AGENTS = support.EXAMPLES / "agents.py"
# The bearer token of the example's `notify` webhook: sent on every call, never stored.
NOTIFY_TOKEN = "e2e-notify-token-5b1f0c2e9d"
COMMAND_TIMEOUT = 120.0
EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_WAITING = 0, 1, 2, 3
# Settings of the developer's shell that would point the CLI at another store or agents.
_SCRUBBED = (
    "FLOWLEDGER_",
    "PERSISTENCE_MODULE",
    "SQLITE_",
    "POSTGRES_",
    "NOTIFY_",
    "E2E_",
    "KAFKA_",
)

T = TypeVar("T")


@dataclass(frozen=True)
class Result:
    """What one command did: its exit code and output."""

    args: tuple[str, ...]
    code: int
    out: str
    err: str

    def json(self) -> Any:
        """Stdout parsed as JSON (with --json it must hold the document and nothing else)."""
        try:
            return json.loads(self.out)
        except ValueError:
            pytest.fail(f"stdout of {self} is not JSON")

    @property
    def message(self) -> str:
        """Stderr with runs of whitespace made one space (terminal wrapping undone)."""
        return " ".join(self.err.split())

    def __str__(self) -> str:
        return (
            f"`flowledger {' '.join(self.args)}` (exit {self.code})\n"
            f"--- stdout\n{self.out}\n--- stderr\n{self.err}"
        )


@dataclass
class Cli:
    """Runs `flowledger` on one store."""

    home: Path
    env: dict[str, str] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not FLOWLEDGER.is_file():
            pytest.fail(f"the console script {FLOWLEDGER} is missing: pip install -e .")
        self.markers.mkdir(parents=True, exist_ok=True)
        base = {k: v for k, v in os.environ.items() if not k.startswith(_SCRUBBED)}
        self.env = {
            **base,
            "FLOWLEDGER_HOME": str(self.home),
            "FLOWLEDGER_DEMO_LATENCY": "0",
            "FLOWLEDGER_DEMO_SEED": "7",
            "NOTIFY_TOKEN": NOTIFY_TOKEN,
            "E2E_MARKER_DIR": str(self.markers),
            **self.env,
        }

    @property
    def markers(self) -> Path:
        """Where the e2e agents leave files the tests look for."""
        return self.home / "markers"

    def __call__(self, *args: str | Path, timeout: float = COMMAND_TIMEOUT) -> Result:
        """Run one command to its end."""
        argv = tuple(str(a) for a in args)
        try:
            done = subprocess.run(
                [str(FLOWLEDGER), *argv],
                cwd=self.home,
                env=self.env,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            pytest.fail(f"`flowledger {' '.join(argv)}` did not end within {timeout}s: {exc}")
        result = Result(argv, done.returncode, done.stdout, done.stderr)
        assert "Traceback" not in result.err, str(result)
        return result

    def start(self, *args: str | Path, stderr: Path) -> subprocess.Popen[str]:
        """Start a command in the background, its stderr to a file (stdout discarded)."""
        with stderr.open("w") as sink:
            return subprocess.Popen(
                [str(FLOWLEDGER), *(str(a) for a in args)],
                cwd=self.home,
                env=self.env,
                stdout=subprocess.DEVNULL,
                stderr=sink,
                text=True,
            )

    def show(self, execution_id: str) -> dict[str, Any]:
        """`executions show ID --json`."""
        result = self("executions", "show", execution_id, "--json")
        assert result.code == EXIT_OK, str(result)
        doc: dict[str, Any] = result.json()
        return doc

    def executions(self, *options: str) -> list[dict[str, Any]]:
        """`executions list --json [options]`."""
        result = self("executions", "list", "--json", *options)
        assert result.code == EXIT_OK, str(result)
        rows: list[dict[str, Any]] = result.json()
        return rows


@dataclass(frozen=True)
class StoreState:
    """Everything a command could have written to the store."""

    files: dict[str, bytes]
    events: int
    max_notification_id: int


def store_state(home: Path) -> StoreState:
    """The store's bytes on disk and its events (read-only: this writes nothing)."""
    db = home / "flowledger.db"
    # The -shm file is SQLite's shared-memory index, rewritten by readers; the WAL holds
    # committed events not yet copied into the main file. An empty WAL counts as none.
    files = {
        p.name: p.read_bytes()
        for p in (db, home / "flowledger.db-wal")
        if p.is_file() and p.stat().st_size > 0
    }
    if not db.is_file():
        return StoreState(files, 0, 0)
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        count, top = conn.execute(
            "SELECT count(*), coalesce(max(rowid), 0) FROM stored_events"
        ).fetchone()
    conn.close()
    return StoreState(files, int(count), int(top))


def stored_bytes(home: Path) -> bytes:
    """Every byte of the SQLite store, WAL and index included."""
    return b"".join(p.read_bytes() for p in sorted(home.glob("flowledger.db*")) if p.is_file())


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = 30.0) -> T:
    """Poll `probe` until it returns something other than None or False; fail at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value is not None and value is not False:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


@dataclass(frozen=True)
class Request:
    """One call the receiver accepted."""

    path: str
    authorization: str | None
    body: Any


class Receiver:
    """A webhook receiver on a free port: accepts POSTs bearing NOTIFY_TOKEN, 401 otherwise."""

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.refused = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"null")
                auth = self.headers.get("Authorization")
                if auth != f"Bearer {NOTIFY_TOKEN}":
                    receiver.refused += 1
                    self._answer(401, {"error": "bad token"})
                    return
                receiver.requests.append(Request(self.path, auth, body))
                self._answer(200, {"received": True, "path": self.path})

            def _answer(self, code: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                """Quiet."""

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        host, port = self.server.server_address[:2]
        self.addr = f"{host!s}:{port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop serving and free the port."""
        self.server.shutdown()
        self.server.server_close()
        self._thread.join()
