"""Fixtures for driving the real engine: run a definition, wait for a condition, a local server."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import support

from flowledger.domain.execution import Execution
from flowledger.services.engine import Engine

SETTLE_TIMEOUT = 10.0  # a bound so a broken engine fails a test instead of hanging it

Run = Callable[..., Awaitable[tuple[Any, Any, Execution]]]
Until = Callable[[Any, Callable[[Execution], bool]], Awaitable[Execution]]


@pytest.fixture
def run(engine: Engine) -> Run:
    """Register a definition (a dict), start it and wait until it settles."""

    async def _run(
        doc: dict[str, Any], data: dict[str, Any] | None = None, **start: Any
    ) -> tuple[Any, Any, Execution]:
        wf = await engine.register(support.workflow(doc))
        eid = await engine.start(wf, data if data is not None else {}, **start)
        ex = await asyncio.wait_for(engine.wait_settled(eid), SETTLE_TIMEOUT)
        return wf, eid, ex

    return _run


@pytest.fixture
def until(engine: Engine) -> Until:
    """Wait until an execution (as the engine commits it) satisfies a predicate."""

    async def _until(eid: Any, predicate: Callable[[Execution], bool]) -> Execution:
        loop = asyncio.get_running_loop()
        reached: asyncio.Future[Execution] = loop.create_future()

        def listener(ex: Execution) -> None:
            if ex.id == eid and not reached.done() and predicate(ex):
                reached.set_result(ex)

        engine.add_listener(listener)
        try:
            current = await engine.execution(eid)
            if predicate(current):
                return current
            return await asyncio.wait_for(reached, SETTLE_TIMEOUT)
        finally:
            engine._listeners.remove(listener)  # the engine offers no public way to remove one

    return _until


# -- a real HTTP server ---------------------------------------------------------------------


@dataclass
class Request:
    """One request the server received."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any


@dataclass
class Server:
    """A local HTTP server; `script[path]` is the list of (status, body) to answer in turn.

    A status of "hold" keeps the request open without an answer until the test ends.
    """

    base: str
    script: dict[str, list[tuple[int | str, Any]]] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    release: threading.Event = field(default_factory=threading.Event)  # ends "hold" answers

    def url(self, path: str) -> str:
        return self.base + path

    def on(self, path: str, *answers: tuple[int | str, Any]) -> str:
        """Answer `path` with these responses in order (the last one repeats); returns its URL."""
        self.script[path] = list(answers)
        return self.url(path)

    def hits(self, path: str) -> list[Request]:
        with self.lock:
            return [r for r in self.requests if r.path == path]

    def answer(self, request: Request) -> tuple[int | str, Any]:
        with self.lock:
            self.requests.append(request)
            answers = self.script.get(request.path) or [(404, {"error": "not scripted"})]
            return answers.pop(0) if len(answers) > 1 else answers[0]


def _handler(server: Server) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            body = json.loads(raw) if raw else None
            request = Request(self.command, self.path, dict(self.headers.items()), body)
            status, payload = server.answer(request)
            if status == "hold":  # never answer in time: the client's timeout must end it
                server.release.wait(SETTLE_TIMEOUT)
                return
            data = (
                payload
                if isinstance(payload, bytes)
                else b""
                if payload is None
                else json.dumps(payload).encode()
            )
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _serve

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


@pytest.fixture
def http_server() -> Iterator[Server]:
    """A ThreadingHTTPServer on 127.0.0.1, an ephemeral port, in a thread."""
    server = Server(base="")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(server))
    httpd.daemon_threads = True
    server.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.release.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)
