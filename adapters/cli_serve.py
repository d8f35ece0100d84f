"""`flowledger serve`: the HTTP API, and (unless --no-engine) the engine, in one process."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
from typing import TYPE_CHECKING

from flowledger.adapters.cli_kafka import KafkaLink, kafka_link
from flowledger.domain.errors import ConfigurationError, FlowledgerError
from flowledger.services.engine import Engine

if TYPE_CHECKING:
    from rich.console import Console

    from flowledger.adapters.cli import _Session
    from flowledger.adapters.http_service import ApiService

TOKEN_VARIABLE = "FLOWLEDGER_API_TOKEN"
EXIT_OK, EXIT_FAILED = 0, 1


def add_serve_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the `serve` subcommand to the `flowledger` parser."""
    p = sub.add_parser("serve", help="serve the HTTP API (the engine runs in the same process)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080, help="0 picks a free port")
    p.add_argument(
        "--agents",
        action="append",
        default=[],
        metavar="MODULE_OR_FILE",
        help="a module or .py file whose @action functions run the steps",
    )
    p.add_argument(
        "--no-engine",
        action="store_true",
        help="drive nothing: commands are stored for a `flowledger worker` to carry out",
    )
    p.set_defaults(handler=cmd_serve)


async def cmd_serve(args: argparse.Namespace) -> int:
    """flowledger serve [--host H] [--port P] [--agents MOD]... [--no-engine]"""
    # Imported here: cli.py imports this module to register the command.
    from flowledger.adapters.cli import _Session, err

    if not 0 <= args.port <= 65535:
        raise ConfigurationError(f"--port {args.port}: a port is 0 to 65535")
    token = os.environ.get(TOKEN_VARIABLE) or None
    session = _Session(args.agents)
    try:
        engine: Engine | None = None
        link: KafkaLink | None = None
        if not args.no_engine:
            await _become_driver(session)
            # With Kafka: commands from the topic, events to it, remote agents, and a share
            # of the executions (serve is then one of the workers).
            link = kafka_link(session.app, session.runner, "serve")
            engine = session.engine(link.runner if link is not None else None)
        sock = _listen(args.host, args.port)
        # Imported here: FastAPI and uvicorn take a fifth of every other command's start.
        from flowledger.adapters.http_service import ApiService

        service = ApiService(session.app, engine, link.runner if link else session.runner)
        try:
            return await _serve(sock, service, engine, link, token, err)
        finally:
            service.close()
            if engine is not None:
                await engine.close()
            sock.close()
    finally:
        session.close()


async def _become_driver(session: _Session) -> None:
    """Take the driver lock as the store's worker (waiting out a `run` that holds it)."""
    if session.lock is None or session.lock.acquire("worker"):
        return
    holder = session.lock.holder()
    if (holder is None or holder[1] != "worker") and await session.take_lock("worker"):
        return
    who = f"a worker (pid {holder[0]})" if holder is not None else "a worker"
    raise FlowledgerError(
        f"{who} already drives {session.settings.home}; serve beside it with --no-engine"
    )


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named, not left 0: asyncio sets TCP_NODELAY only on the connections of a
    # socket it can tell is TCP, and without it every answer on a kept-alive connection
    # waited 40 ms for the client's delayed ACK (Nagle), a browser's included.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigurationError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


async def _serve(
    sock: socket.socket,
    service: ApiService,
    engine: Engine | None,
    link: KafkaLink | None,
    token: str | None,
    err: Console,
) -> int:
    import uvicorn

    from flowledger.adapters.http import create_app

    config = uvicorn.Config(
        create_app(service, token=token),
        lifespan="off",
        log_level="info",
        timeout_graceful_shutdown=10,
    )
    server = uvicorn.Server(config)
    # uvicorn restores the handlers it found and then re-raises the signal it caught: with
    # these, that lands on the server again, not on a default handler that would kill the
    # process before the engine and the lock are closed. SIGTERM before serving starts also
    # stops it cleanly.
    handlers = {sig: signal.signal(sig, server.handle_exit) for sig in _SIGNALS}
    stop = asyncio.Event()
    watcher: asyncio.Task[None] | None = None
    views: asyncio.Task[None] | None = None
    intake: asyncio.Task[None] | None = None
    try:
        resumed = ""
        if engine is not None:
            if link is not None:  # executions come with the partitions the group assigns
                intake = await link.start(engine, stop, err.print)
                # The Kafka side stopped on an error: stop serving, loudly (below).
                intake.add_done_callback(lambda _: setattr(server, "should_exit", True))
                resumed = "; the engine drives the executions of its Kafka partitions"
            else:
                count = await engine.resume_all()
                resumed = f"; the engine resumed {count} executions"
            watcher = asyncio.create_task(engine.watch_store(stop))
            # The engine stopped on an error: stop serving too, loudly (below).
            watcher.add_done_callback(lambda _: setattr(server, "should_exit", True))
        # Started once the engine is: a Kafka that cannot be used leaves nothing running.
        views = asyncio.create_task(service.follow_views(stop))
        # The views stopped on an error (a broken projection): stop serving too, loudly.
        views.add_done_callback(lambda _: setattr(server, "should_exit", True))
        serving = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started and not serving.done():
            await asyncio.sleep(0.02)
        if server.started:
            host, port = sock.getsockname()[:2]
            where = f"[{host}]" if ":" in host else host
            mode = resumed if engine is not None else "; no engine: a worker drives executions"
            err.print(f"flowledger serve: listening on http://{where}:{port}{mode}", markup=False)
        await serving
    finally:
        stop.set()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    stopped = ((watcher, "the engine"), (views, "the projections"), (intake, "the commands"))
    for task, what in stopped:
        if task is None:
            continue
        try:
            await task
        except Exception as exc:  # noqa: BLE001 - the task's error, reported as the exit
            err.print(f"error: {what} stopped: {type(exc).__name__}: {exc}", markup=False)
            return EXIT_FAILED
    return EXIT_OK if server.started else EXIT_FAILED


_SIGNALS = (signal.SIGINT, signal.SIGTERM)
