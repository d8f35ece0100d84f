"""The `flowledger` command line: validate, run, complete, cancel, retry, executions, worker."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

from rich.console import Console
from rich.live import Live
from rich.markup import escape

from flowledger import __version__
from flowledger.adapters import cli_optimize, cli_projections
from flowledger.adapters.agents import InProcessRunner, default_registry, load_agents
from flowledger.adapters.cli_audit import add_audit_commands
from flowledger.adapters.cli_kafka import KafkaLink, kafka_link, run_agent
from flowledger.adapters.cli_serve import add_serve_parser
from flowledger.adapters.files import load_definition_file
from flowledger.adapters.lock import DriverLock
from flowledger.adapters.render import steps_table, summary
from flowledger.adapters.settings import Settings, build_app, load_settings
from flowledger.adapters.step_cache import StoreStepCache
from flowledger.adapters.webhook import WebhookClient
from flowledger.domain.errors import ActionNotFound, FlowledgerError, InputInvalid
from flowledger.domain.execution import Execution
from flowledger.domain.progress import compensation_actions, require_retryable
from flowledger.domain.states import ExecutionStatus
from flowledger.domain.workflow import Workflow
from flowledger.services.app import FlowledgerApp, check_input
from flowledger.services.documents import execution_document
from flowledger.services.engine import Engine
from flowledger.services.follow import (
    follow_until_settled,
    submit_cancel,
    submit_completion,
    submit_retry,
    submit_start,
)
from flowledger.services.ports import StepRunner

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_WAITING = 0, 1, 2, 3
MAX_JSON_ARG = 1_048_576
# Tables keep a readable width when piped (rich would fall back to 80 columns).
out = Console(highlight=False, width=None if sys.stdout.isatty() else 140)
err = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 140)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `flowledger` console script; returns the exit code."""
    args = _parser().parse_args(argv)
    try:
        code: int = asyncio.run(args.handler(args))
    except FlowledgerError as exc:
        # The message is user data (paths, values, agents' errors): escaped, not markup; one
        # line per problem, not re-wrapped, so scripts can grep it.
        err.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return 130
    return code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flowledger", description=__doc__)
    parser.add_argument("--version", action="version", version=f"flowledger {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="check a workflow definition")
    p.add_argument("file")
    p.set_defaults(handler=cmd_validate)

    p = sub.add_parser("run", help="register a definition, start an execution and drive it")
    p.add_argument("file")
    p.add_argument("--input", default=None, help="the input as a JSON object")
    p.add_argument("--input-file", default=None, help="read the input JSON from a file")
    p.add_argument("--idempotency-key", default=None)
    _agents_and_json(p)
    p.set_defaults(handler=cmd_run)

    p = sub.add_parser("complete", help="answer a waiting human task and drive on")
    p.add_argument("execution_id")
    p.add_argument("step_id")
    p.add_argument("--data", required=True, help="the answer as a JSON object")
    _agents_and_json(p)
    p.set_defaults(handler=cmd_complete)

    p = sub.add_parser("cancel", help="cancel an execution (completed steps are compensated)")
    p.add_argument("execution_id")
    p.add_argument("--reason", default="cancelled by request")
    _agents_and_json(p)
    p.set_defaults(handler=cmd_cancel)

    p = sub.add_parser(
        "retry",
        help="run a failed, timed-out or cancelled execution again from the steps that "
        "did not complete, and drive it on",
    )
    p.add_argument("execution_id")
    p.add_argument("--reason", default="retried by request")
    _agents_and_json(p)
    p.set_defaults(handler=cmd_retry)

    p = sub.add_parser("executions", help="list or show executions")
    esub = p.add_subparsers(dest="executions_command", required=True)
    lp = esub.add_parser("list")
    lp.add_argument("--status", choices=[s.value for s in ExecutionStatus])
    lp.add_argument("--workflow")
    lp.add_argument("--limit", type=int, default=50)
    lp.add_argument("--json", action="store_true")
    cli_projections.add_list_filters(lp)
    lp.set_defaults(handler=cli_projections.cmd_list_views)
    sp = esub.add_parser("show")
    sp.add_argument("execution_id")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(handler=cmd_show)

    p = sub.add_parser("worker", help="resume and drive every execution that has not ended")
    p.add_argument(
        "--until-idle", action="store_true", help="exit once nothing can progress without a person"
    )
    p.add_argument("--agents", action="append", default=[], metavar="MODULE_OR_FILE")
    p.set_defaults(handler=cmd_worker)

    p = sub.add_parser(
        "agent", help="run actions for workers elsewhere: tasks from Kafka, results back"
    )
    p.add_argument(
        "--agents",
        action="append",
        default=[],
        required=True,
        metavar="MODULE_OR_FILE",
        help="a module or .py file whose @action functions this agent offers",
    )
    p.add_argument("--agent-id", default=None, help="the name it announces (default host-pid)")
    p.add_argument(
        "--concurrency", type=int, default=16, help="tasks run at once per capability (16)"
    )
    p.set_defaults(handler=cmd_agent)
    add_serve_parser(sub)
    add_audit_commands(sub)
    cli_projections.register(sub)
    cli_optimize.register(sub)
    return parser


def _agents_and_json(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--agents",
        action="append",
        default=[],
        metavar="MODULE_OR_FILE",
        help="a module or .py file whose @action functions run the steps",
    )
    p.add_argument("--json", action="store_true", help="print only the execution document")


# -- helpers ---------------------------------------------------------------------------


def _json_object(text: str, what: str) -> dict[str, Any]:
    if len(text.encode()) > MAX_JSON_ARG:
        raise InputInvalid(f"{what} is larger than {MAX_JSON_ARG} bytes")
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise InputInvalid(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise InputInvalid(f"{what} must be a JSON object, not {type(value).__name__}")
    return value


def _execution_id(text: str) -> UUID:
    try:
        return UUID(text)
    except ValueError:
        raise InputInvalid(f"{text!r} is not an execution id") from None


def _require_actions(wf: Workflow, runner: InProcessRunner, needed: set[str] | None = None) -> None:
    """Refuse to drive when an action that will run (all of wf's by default) has no agent."""
    if needed is None:
        needed = wf.actions()
    missing = sorted(a for a in needed if not runner.offers(a))
    if missing:
        raise ActionNotFound(
            f"workflow {wf.workflow_id!r} names actions no loaded agent offers: "
            f"{', '.join(missing)} (load the module that offers them with --agents)"
        )


def _exit_code(ex: Execution) -> int:
    if ex.status is ExecutionStatus.COMPLETED:
        return EXIT_OK
    if ex.is_terminal:
        return EXIT_FAILED
    return EXIT_WAITING


def _report(ex: Execution, wf: Workflow | None, as_json: bool) -> int:
    doc = execution_document(ex, wf)
    if as_json:
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
    else:
        out.print(steps_table(doc))
        out.print(summary(doc))
    return _exit_code(ex)


class _Session:
    """Settings, store, and (for commands that drive) the driver lock, agents and engine."""

    def __init__(self, agents: list[str] | None = None) -> None:
        self.settings: Settings = load_settings()
        for spec in agents or []:
            load_agents(spec)
        self.runner = InProcessRunner(default_registry, WebhookClient())
        self.app: FlowledgerApp = build_app(self.settings)
        self.lock = DriverLock(self.settings.home) if self.settings.is_sqlite else None
        self.cache: StoreStepCache | None = None  # made with the first engine

    async def take_lock(self, role: str) -> bool:
        """Become the driver. False when a worker drives this store (follow it instead)."""
        if self.lock is None:
            return True
        told = False
        while not self.lock.acquire(role):
            holder = self.lock.holder()
            if holder is not None and holder[1] == "worker":
                err.print(
                    f"a worker (pid {holder[0]}) drives this store; it takes it from here",
                    markup=False,
                )
                return False
            if not told:
                who = f"pid {holder[0]}" if holder else "another process"
                err.print(
                    f"waiting for {who} to stop driving executions in {self.settings.home} ...",
                    markup=False,
                )
                told = True
            await asyncio.sleep(0.2)
        return True

    def worker_gone(self) -> bool:
        """Whether the worker this process follows stopped (its lock is then ours)."""
        return self.lock is not None and self.lock.acquire("cli")

    def engine(self, runner: StepRunner | None = None) -> Engine:
        """An engine on this session's store and agents (or `runner`), serving cached
        steps from the store's step cache."""
        if self.cache is None:
            self.cache = StoreStepCache(self.app)
        return Engine(
            self.app, runner or self.runner, crash_at=self.settings.crash_at, cache=self.cache
        )

    def close(self) -> None:
        self.runner.close()
        if self.cache is not None:
            self.cache.close()
        if self.lock is not None:
            self.lock.release()
        self.app.close()


@contextlib.contextmanager
def _live_view(
    engine: Engine, execution: list[UUID], wf: list[Workflow], enabled: bool
) -> Iterator[None]:
    if not enabled or not err.is_terminal:
        yield
        return
    with Live(console=err, refresh_per_second=8, transient=True) as live:

        def show(ex: Execution) -> None:
            if execution and ex.id == execution[0]:
                live.update(steps_table(execution_document(ex, wf[0] if wf else None)))

        engine.add_listener(show)
        yield


# -- commands --------------------------------------------------------------------------


async def cmd_validate(args: argparse.Namespace) -> int:
    """flowledger validate FILE"""
    defn = load_definition_file(args.file)
    count = sum(1 for _ in defn.iter_steps())
    out.print(
        f"{args.file}: ok: workflow {defn.workflow_id!r} version {defn.version!r}, {count} steps",
        markup=False,
        soft_wrap=True,
    )
    return EXIT_OK


async def cmd_run(args: argparse.Namespace) -> int:
    """flowledger run FILE --input JSON"""
    if args.input is not None and args.input_file is not None:
        raise InputInvalid("give --input or --input-file, not both")
    if args.input_file is not None:
        try:
            text = Path(args.input_file).read_text()
        except OSError as exc:
            raise InputInvalid(f"--input-file: {exc}") from None
    else:
        text = args.input if args.input is not None else "{}"
    data = _json_object(text, "--input")
    # Everything the user gave is checked before the store is opened: a rejected run leaves
    # no trace, not even a new empty store.
    defn = load_definition_file(args.file)
    local = Workflow(defn)
    check_input(local, data)
    session = _Session(args.agents)
    try:
        if not await session.take_lock("cli"):
            wf, _ = session.app.register(defn)
            eid = submit_start(session.app, wf, data, args.idempotency_key)
            return _report(await _follow(session, eid, wf), wf, args.json)
        _require_actions(local, session.runner)
        engine = session.engine()
        try:
            wf = await engine.register(defn)
            eid_box: list[UUID] = []
            with _live_view(engine, eid_box, [wf], not args.json):
                eid = await engine.start(wf, data, args.idempotency_key)
                eid_box.append(eid)
                ex = await engine.wait_settled(eid)
        finally:
            await engine.close()
        return _report(ex, wf, args.json)
    finally:
        session.close()


async def _follow(session: _Session, eid: UUID, wf: Workflow) -> Execution:
    """Follow the worker that drives the store; if it stops, take over and drive here."""
    ex = await follow_until_settled(session.app, eid, session.worker_gone)
    if ex is not None:
        return ex
    err.print("the worker stopped; this process drives the execution on", markup=False)
    _require_actions(wf, session.runner)
    engine = session.engine()
    try:
        await engine.drive(eid)
        return await engine.wait_settled(eid)
    finally:
        await engine.close()


async def cmd_complete(args: argparse.Namespace) -> int:
    """flowledger complete EXECUTION_ID STEP_ID --data JSON"""
    eid = _execution_id(args.execution_id)
    answer = _json_object(args.data, "--data")
    return await _drive_command(args, eid, "complete", answer)


async def cmd_cancel(args: argparse.Namespace) -> int:
    """flowledger cancel EXECUTION_ID"""
    return await _drive_command(args, _execution_id(args.execution_id), "cancel", None)


async def cmd_retry(args: argparse.Namespace) -> int:
    """flowledger retry EXECUTION_ID"""
    return await _drive_command(args, _execution_id(args.execution_id), "retry", None)


async def _drive_command(
    args: argparse.Namespace, eid: UUID, what: str, answer: dict[str, Any] | None
) -> int:
    session = _Session(args.agents)
    try:
        stored = session.app.execution(eid)
        wf = session.app.workflow(stored.workflow_id, stored.workflow_version)
        if what == "retry":
            require_retryable(stored)  # a refusal says why before agents are asked for
        if not await session.take_lock("cli"):
            if what == "complete":
                submit_completion(session.app, eid, args.step_id, answer)
            elif what == "retry":
                submit_retry(session.app, eid, reason=args.reason)
            else:
                submit_cancel(session.app, eid, args.reason)
            return _report(await _follow(session, eid, wf), wf, args.json)
        if what == "retry":
            _require_actions(wf, session.runner)  # it runs on as a new run would
        elif not stored.is_terminal:
            needed = None if what == "complete" else compensation_actions(stored, wf)
            _require_actions(wf, session.runner, needed)
        engine = session.engine()
        try:
            if what == "complete":
                await engine.complete_human_task(eid, args.step_id, answer)
            elif what == "retry":
                await engine.retry(eid, args.reason)
            else:
                await engine.cancel(eid, args.reason)
            with _live_view(engine, [eid], [wf], not args.json):
                ex = await engine.wait_settled(eid)
        finally:
            await engine.close()
        return _report(ex, wf, args.json)
    finally:
        session.close()


async def cmd_show(args: argparse.Namespace) -> int:
    """flowledger executions show EXECUTION_ID"""
    eid = _execution_id(args.execution_id)
    session = _Session()
    try:
        ex = session.app.execution(eid)
        wf = session.app.workflow(ex.workflow_id, ex.workflow_version)
    finally:
        session.close()
    _report(ex, wf, args.json)
    return EXIT_OK


async def cmd_worker(args: argparse.Namespace) -> int:
    """flowledger worker [--until-idle]"""
    session = _Session(args.agents)
    try:
        if session.lock is not None and not session.lock.acquire("worker"):
            holder = session.lock.holder()
            if holder is not None and holder[1] == "worker":
                raise FlowledgerError(
                    f"a worker (pid {holder[0]}) already drives {session.settings.home}"
                )
            await session.take_lock("worker")
        link = None if args.until_idle else kafka_link(session.app, session.runner, "worker")
        engine = session.engine(link.runner if link is not None else None)
        try:
            if link is None:
                count = await engine.resume_all()
                err.print(f"worker: resumed {count} executions")
            if args.until_idle:
                await engine.wait_idle()
            else:
                await _serve(engine, link)
        finally:
            await engine.close()
        if engine.skipped:
            for eid, missing in engine.skipped.items():
                err.print(
                    f"[yellow]not driven:[/yellow] {eid}: no loaded agent offers "
                    f"{escape(', '.join(sorted(missing)))} (use --agents)",
                    soft_wrap=True,
                )
            return EXIT_BAD_INPUT
        return EXIT_OK
    finally:
        session.close()


async def cmd_agent(args: argparse.Namespace) -> int:
    """flowledger agent --agents MOD"""
    if not 1 <= args.concurrency <= 1000:
        raise InputInvalid("--concurrency: give a whole number from 1 to 1000")
    if args.agent_id is not None and not 1 <= len(args.agent_id) <= 200:
        raise InputInvalid("--agent-id: give 1 to 200 characters")
    for spec in args.agents:
        load_agents(spec)
    return await run_agent(args.agents, args.agent_id, args.concurrency, err.print)


async def _serve(engine: Engine, link: KafkaLink | None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    kafka = await link.start(engine, stop, err.print) if link is not None else None
    try:
        # Returns on SIGINT/SIGTERM; raises if the engine stopped on an error.
        await engine.watch_store(stop)
    finally:
        stop.set()
        if kafka is not None:
            await kafka  # raises if the Kafka side stopped on an error
