"""The CLI's query commands on the projections: `projections`, `inbox`, `performance`, and
`executions list` with the filters only the run views answer.

Each command catches the projections up with the store, then reads them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from flowledger.adapters.render import executions_table
from flowledger.adapters.settings import build_app, load_settings
from flowledger.adapters.timeparse import parse_moment, parse_window
from flowledger.domain.errors import InputInvalid
from flowledger.projections.performance import AgentFigures, Performance, StepFigures
from flowledger.projections.runner import DEFAULT_BATCH, runner_for
from flowledger.projections.runs import ExecutionFilter
from flowledger.projections.stats import Durations
from flowledger.services.queries import Queries

EXIT_OK = 0
# Tables keep a readable width when piped (as in adapters/cli.py).
out = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 160)


def register(sub: Any) -> None:
    """Add `projections`, `inbox` and `performance` to the `flowledger` subcommands."""
    p = sub.add_parser("projections", help="status and rebuild of the run and performance views")
    psub = p.add_subparsers(dest="projections_command", required=True)
    sp = psub.add_parser("status", help="each projection's position against the store's head")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(handler=cmd_status)
    rp = psub.add_parser("rebuild", help="rebuild projections from position zero")
    rp.add_argument("name", nargs="?", help="one projection (all by default)")
    rp.set_defaults(handler=cmd_rebuild)
    fp = psub.add_parser("follow", help="keep the projections caught up until stopped")
    fp.add_argument("--interval", type=float, default=0.5, help="seconds between looks")
    fp.add_argument("--batch-size", type=int, default=DEFAULT_BATCH)
    fp.set_defaults(handler=cmd_follow)

    p = sub.add_parser("inbox", help="human tasks waiting for an answer")
    p.add_argument("assignee", nargs="?", help="only this assignee's tasks")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_inbox)

    p = sub.add_parser("performance", help="a workflow's performance history, per step and agent")
    p.add_argument("workflow")
    p.add_argument("--version", dest="workflow_version", default=None)
    p.add_argument("--window", default="all", help="all (default), or e.g. 1h, 24h, 7d")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_performance)


def add_list_filters(p: argparse.ArgumentParser) -> None:
    """The `executions list` filters beyond --status and --workflow (all read the run views)."""
    p.add_argument("--version", dest="workflow_version", default=None)
    p.add_argument("--tag", default=None)
    p.add_argument("--since", default=None, help="started at or after: ISO time, or e.g. 24h ago")
    p.add_argument("--until", default=None, help="started before: ISO time, or e.g. 1h ago")
    p.add_argument("--cursor", default=None, help="the next page (printed after a full page)")
    p.add_argument("--oldest", action="store_true", help="oldest first (newest first by default)")


# -- commands ------------------------------------------------------------------------------


@contextlib.contextmanager
def _queries() -> Iterator[Queries]:
    app = build_app(load_settings())
    try:
        yield Queries(app)
    finally:
        app.close()


async def _run(fn: Callable[[Queries], Any]) -> Any:
    """Open the store, run `fn` on its queries in a thread (the store is synchronous)."""

    def work() -> Any:
        with _queries() as queries:
            return fn(queries)

    return await asyncio.to_thread(work)


async def cmd_list_views(args: argparse.Namespace) -> int:
    """flowledger executions list [--status] [--workflow] [--version] [--tag] [--since]
    [--until] [--oldest] [--cursor] [--limit] [--json], from the run views"""
    if args.limit < 1:
        raise InputInvalid("--limit must be at least 1")
    now = datetime.now(UTC)
    where = ExecutionFilter(
        workflow_id=args.workflow,
        version=args.workflow_version,
        status=args.status,
        tag=args.tag,
        since=parse_moment(args.since, "--since", now) if args.since else None,
        until=parse_moment(args.until, "--until", now) if args.until else None,
        newest_first=not args.oldest,
    )
    page = await _run(lambda q: q.executions(where, args.limit, args.cursor))
    rows = [e.as_row() for e in page.executions]
    if args.json:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
    else:
        out.print(executions_table(rows))
    if page.next_cursor is not None:
        err.print(f"next page: --cursor {page.next_cursor}", markup=False, soft_wrap=True)
    return EXIT_OK


async def cmd_status(args: argparse.Namespace) -> int:
    """flowledger projections status"""
    found = await _run(lambda q: q.status())
    if args.json:
        sys.stdout.write(json.dumps([asdict(s) for s in found], indent=2) + "\n")
        return EXIT_OK
    table = Table()
    for column in ("projection", "position", "head", "lag"):
        table.add_column(column, justify="left" if column == "projection" else "right")
    for s in found:
        table.add_row(Text(s.name), Text(str(s.position)), Text(str(s.head)), Text(str(s.lag)))
    out.print(table)
    return EXIT_OK


async def cmd_rebuild(args: argparse.Namespace) -> int:
    """flowledger projections rebuild [NAME]"""
    names = [args.name] if args.name else None
    started = time.perf_counter()
    applied: dict[str, int] = await _run(lambda q: q.rebuild(names))
    seconds = time.perf_counter() - started
    done = ", ".join(f"{name} ({count} events)" for name, count in applied.items())
    out.print(f"rebuilt from position zero in {seconds:.2f}s: {done}", markup=False)
    return EXIT_OK


async def cmd_follow(args: argparse.Namespace) -> int:
    """flowledger projections follow: a runner process, until SIGINT or SIGTERM."""
    if args.interval <= 0:
        raise InputInvalid("--interval must be more than zero")
    app = build_app(load_settings())
    try:
        runner = runner_for(app, batch_size=args.batch_size)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        err.print("following the store; stop with Ctrl-C", markup=False)
        await runner.follow(stop, args.interval)
    finally:
        app.close()
    return EXIT_OK


async def cmd_inbox(args: argparse.Namespace) -> int:
    """flowledger inbox [ASSIGNEE]"""
    tasks = await _run(lambda q: q.inbox(args.assignee))
    if args.json:
        sys.stdout.write(json.dumps([asdict(t) for t in tasks], indent=2) + "\n")
        return EXIT_OK
    table = Table(title=Text(f"inbox of {args.assignee}" if args.assignee else "inbox"))
    for column in ("assignee", "execution_id", "workflow", "version", "step", "since", "deadline"):
        table.add_column(column)
    for t in tasks:
        table.add_row(
            Text(t.assignee or "-"),
            Text(t.execution_id),
            Text(t.workflow_id),
            Text(t.version),
            Text(t.key),
            Text(t.waiting_since),
            Text(t.deadline or ""),
        )
    out.print(table)
    if tasks:
        err.print("answer with `flowledger complete EXECUTION_ID STEP --data JSON`", markup=False)
    return EXIT_OK


async def cmd_performance(args: argparse.Namespace) -> int:
    """flowledger performance WORKFLOW [--version V] [--window 24h]"""
    window = parse_window(args.window)
    perf = await _run(lambda q: q.performance(args.workflow, args.workflow_version, window))
    if args.json:
        sys.stdout.write(json.dumps({"window": args.window, **asdict(perf)}, indent=2) + "\n")
        return EXIT_OK
    scope = f"version {perf.version}" if perf.version else "all versions"
    since = f"since {perf.since} (last {args.window})" if perf.since else "all time"
    out.print(Text(f"{perf.workflow_id}, {scope}, {since}", style="bold"))
    out.print(_executions_table(perf))
    if any(v.sla for v in perf.versions):
        out.print(_sla_table(perf))
    out.print(_steps_table(perf.steps))
    out.print(_agents_table(perf.agents))
    return EXIT_OK


# -- rendering -----------------------------------------------------------------------------


def _pct(value: float | None) -> Text:
    return Text("-" if value is None else f"{value * 100:.1f}%")


def _sec(value: float | None) -> Text:
    return Text("-" if value is None else f"{value:.3f}")


def _duration_columns(table: Table) -> None:
    for column in ("p50 s", "p95 s", "p99 s", "mean s", "var s²"):  # seconds, seconds²
        table.add_column(column, justify="right")


def _duration_cells(d: Durations) -> list[Text]:
    variance = Text("-" if d.variance is None else f"{d.variance:.3g}")
    return [_sec(d.p50), _sec(d.p95), _sec(d.p99), _sec(d.mean), variance]


def _executions_table(perf: Performance) -> Table:
    table = Table(title=Text("executions (durations: completed ones, end to end)"))
    table.add_column("version")
    for column in ("ended", "completed", "failed", "timed out", "cancelled", "running"):
        table.add_column(column, justify="right")
    table.add_column("success", justify="right")
    _duration_columns(table)
    rows = [(v.version, v.executions) for v in perf.versions]
    if len(rows) > 1:
        rows.append(("all", perf.executions))
    for name, x in rows:
        counts = (x.ended, x.completed, x.failed, x.timed_out, x.cancelled, x.in_progress)
        table.add_row(
            Text(name),
            *(Text(str(c)) for c in counts),
            _pct(x.success_rate),
            *_duration_cells(x.duration),
        )
    return table


def _sla_table(perf: Performance) -> Table:
    table = Table(title=Text("SLA targets"))
    for column in ("version", "target", "goal", "actual", "met"):
        table.add_column(column)
    for v in perf.versions:
        for check in v.sla:
            show = _pct if check.target == "success_rate" else _sec
            if check.met is None:
                met = Text("no executions yet", style="dim")
            else:
                met = Text("met", style="green") if check.met else Text("missed", style="red")
            table.add_row(
                Text(v.version), Text(check.target), show(check.goal), show(check.actual), met
            )
    return table


def _steps_table(steps: list[StepFigures]) -> Table:
    table = Table(
        title=Text(
            "steps (durations: first start to end, of runs that succeeded or failed; "
            "repeats: inputs seen in more than one run, = same output, ≠ different outputs)"
        )
    )
    table.add_column("step")
    table.add_column("type")
    for column in ("runs", "ok", "failed", "recov", "cancel", "skip", "cached", "retries"):
        table.add_column(column, justify="right")
    table.add_column("success", justify="right")
    table.add_column("retry", justify="right")
    _duration_columns(table)
    table.add_column("repeats", justify="right")
    for s in steps:
        counts = (
            *(s.runs, s.succeeded, s.failed, s.recovered, s.cancelled, s.skipped),
            *(s.cache_hits, s.retries),
        )
        r = s.repeated
        table.add_row(
            Text(s.step_id),
            Text(s.type or ""),
            *(Text(str(c)) for c in counts),
            _pct(s.success_rate),
            _pct(s.retry_rate),
            *_duration_cells(s.duration),
            Text(f"{r.repeated_inputs} ({r.outputs_matched}= {r.outputs_differed}≠)"),
        )
    return table


def _agents_table(agents: list[AgentFigures]) -> Table:
    table = Table(title=Text("agents (attempts)"))
    table.add_column("agent")
    for column in ("attempts", "ok", "failed", "retried", "lost", "cancelled"):
        table.add_column(column, justify="right")
    table.add_column("success", justify="right")
    table.add_column("retry", justify="right")
    _duration_columns(table)
    for a in agents:
        counts = (a.attempts, a.succeeded, a.failed, a.retried, a.lost, a.cancelled)
        table.add_row(
            Text(a.agent),
            *(Text(str(c)) for c in counts),
            _pct(a.success_rate),
            _pct(a.retry_rate),
            *_duration_cells(a.duration),
        )
    return table
