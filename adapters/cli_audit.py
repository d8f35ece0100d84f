"""`flowledger replay` and `flowledger audit`: an execution as it was, and whether its stored
history is the one that was recorded."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID

from rich.console import Console
from rich.table import Table
from rich.text import Text

from flowledger.adapters.render import status_text, steps_table, summary
from flowledger.adapters.settings import build_app, load_settings
from flowledger.domain.audit import AuditReport
from flowledger.domain.errors import ExecutionNotFound, InputInvalid, WorkflowNotFound
from flowledger.domain.execution import Execution
from flowledger.domain.history import Transition
from flowledger.services.app import FlowledgerApp
from flowledger.services.audit import audit_all, audit_execution, export_history
from flowledger.services.documents import execution_document
from flowledger.services.replay import (
    Divergence,
    RunView,
    events_of,
    execution_as_of,
    timeline,
    transition_document,
    verify_all,
    verify_replay,
)

EXIT_OK, EXIT_FAILED = 0, 1
# As in cli.py: a readable width when piped.
out = Console(highlight=False, width=None if sys.stdout.isatty() else 140)
err = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 140)


def add_audit_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `replay` and `audit` to the `flowledger` parser."""
    p = sub.add_parser(
        "replay",
        help="rebuild an execution as it was, with its timeline; --verify checks replays",
    )
    p.add_argument("execution_id", nargs="?")
    when = p.add_mutually_exclusive_group()
    when.add_argument("--until-version", type=int, metavar="N", help="as it was after event N")
    when.add_argument(
        "--at", metavar="TIMESTAMP", help="as it was at an ISO 8601 moment (no zone: UTC)"
    )
    p.add_argument(
        "--verify",
        action="store_true",
        help="replay the stored history through the current code and check every move",
    )
    p.add_argument("--all", action="store_true", help="with --verify: every stored execution")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_replay)

    p = sub.add_parser("audit", help="check or export the hash chain of stored histories")
    asub = p.add_subparsers(dest="audit_command", required=True)
    vp = asub.add_parser("verify", help="name every edited, deleted, inserted or moved event")
    vp.add_argument("execution_id", nargs="?")
    vp.add_argument("--all", action="store_true", help="every stored execution")
    vp.add_argument(
        "--head",
        metavar="HASH",
        help="a head hash kept from an earlier export: it must still be in the chain "
        "(shows events deleted from the end)",
    )
    vp.add_argument("--json", action="store_true")
    vp.set_defaults(handler=cmd_audit_verify)
    ep = asub.add_parser("export", help="the stored history as JSON Lines, with the hashes")
    ep.add_argument("execution_id")
    ep.add_argument("--output", metavar="FILE", help="write to FILE instead of stdout")
    ep.set_defaults(handler=cmd_audit_export)


# -- helpers ---------------------------------------------------------------------------


def _execution_id(text: str) -> UUID:
    try:
        return UUID(text)
    except ValueError:
        raise InputInvalid(f"{text!r} is not an execution id") from None


def _one_or_all(args: argparse.Namespace) -> UUID | None:
    """The execution named, or None for --all; exactly one of them must be given."""
    if args.all and args.execution_id:
        raise InputInvalid("give an execution id or --all, not both")
    if not args.all and not args.execution_id:
        raise InputInvalid("give an execution id, or --all")
    return None if args.all else _execution_id(args.execution_id)


def _moment(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise InputInvalid(
            f"--at {text!r} is not an ISO 8601 timestamp (say 2024-05-01T12:00:00Z)"
        ) from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


@contextlib.contextmanager
def _store() -> Iterator[FlowledgerApp | None]:
    """The configured store; None when its SQLite file does not exist (nothing is made)."""
    settings = load_settings()
    if settings.is_sqlite and not Path(settings.persistence["SQLITE_DBNAME"]).exists():
        yield None
        return
    app = build_app(settings)
    try:
        yield app
    finally:
        app.close()


@contextlib.contextmanager
def _store_of(execution_id: UUID) -> Iterator[FlowledgerApp]:
    """The configured store, which must exist since it is asked about an execution."""
    with _store() as app:
        if app is None:
            raise ExecutionNotFound(f"no execution {execution_id} (there is no store yet)")
        yield app


def _count(n: int) -> str:
    return f"{n} execution" + ("" if n == 1 else "s")


# -- replay ----------------------------------------------------------------------------


async def cmd_replay(args: argparse.Namespace) -> int:
    """flowledger replay ID [--until-version N | --at TIMESTAMP] [--json] | [ID | --all] --verify"""
    if args.verify:
        if args.until_version is not None or args.at is not None:
            raise InputInvalid("--verify replays whole histories: drop --until-version and --at")
        return _replay_verify(args, _one_or_all(args))
    if args.all:
        raise InputInvalid("--all goes with --verify (replay one execution at a time)")
    if not args.execution_id:
        raise InputInvalid("give the id of the execution to replay")
    eid = _execution_id(args.execution_id)
    moment = _moment(args.at) if args.at is not None else None
    with _store_of(eid) as app:
        ex = execution_as_of(app, eid, version=args.until_version, moment=moment)
        moves = timeline(app, eid, until=ex.version)
        total = len(events_of(app, eid))
        try:
            wf = app.workflow(ex.workflow_id, ex.workflow_version)
        except WorkflowNotFound:
            wf = None
    doc = execution_document(ex, wf)
    if args.json:
        doc["timeline"] = [transition_document(t) for t in moves]
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
        return EXIT_OK
    out.print(_as_of(ex, total, moves))
    out.print(steps_table(doc))
    out.print(timeline_table(moves))
    out.print(summary(doc))
    return EXIT_OK


def _as_of(ex: Execution, total: int, moves: list[Transition]) -> Text:
    text = Text(f"execution {ex.id} as of version {ex.version} of {total}")
    if moves and moves[-1].timestamp is not None:
        text.append(f" ({moves[-1].timestamp.isoformat()})")
    return text


def timeline_table(moves: list[Transition]) -> Table:
    """The timeline: one row per move, in order."""
    table = Table(title=Text("timeline"), title_justify="left")
    for column in ("#", "time", "event", "step", "move", "attempt", "error / note"):
        table.add_column(column, justify="right" if column in ("#", "attempt") else "left")
    for t in moves:
        move = Text()
        if t.before != t.after:
            move.append_text(status_text(t.before or "-"))
            move.append(" → ")
        move.append_text(status_text(t.after or "-"))
        note = t.error or t.note or ""
        table.add_row(
            Text(str(t.version)),
            Text(t.timestamp.strftime("%H:%M:%S.%f")[:-3] if t.timestamp else ""),
            Text(t.event_type),
            Text(t.key or "(execution)"),
            move,
            Text("" if t.attempt is None else str(t.attempt)),
            Text(note, style="red" if t.error else ""),
        )
    return table


def _replay_verify(args: argparse.Namespace, eid: UUID | None) -> int:
    # Each replay is held to the run view, caught up with the store first.
    results: list[tuple[UUID, list[Divergence]]] = []
    if eid is not None:
        with _store_of(eid) as app:
            results = [(eid, verify_replay(app, eid, RunView(app)))]
    else:
        with _store() as every:
            results = list(verify_all(every, RunView(every))) if every is not None else []
    if args.json:
        doc = [
            {
                "execution_id": str(i),
                "ok": not found,
                "divergences": [
                    {"version": d.version, "type": d.event_type, "message": d.message}
                    for d in found
                ],
            }
            for i, found in results
        ]
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
    else:
        for i, found in results:
            if not found:
                out.print(f"ok  execution {i}: replayed, every move allowed, the run view matches")
            for d in found:
                out.print(f"DIVERGES  {d}", markup=False, soft_wrap=True)
        bad = sum(1 for _, found in results if found)
        err.print(f"{_count(len(results))} replayed, {bad or 'none'} diverging", markup=False)
    return EXIT_FAILED if any(found for _, found in results) else EXIT_OK


# -- audit -----------------------------------------------------------------------------


async def cmd_audit_verify(args: argparse.Namespace) -> int:
    """flowledger audit verify [ID | --all] [--json]"""
    eid = _one_or_all(args)
    if args.head is not None and eid is None:
        raise InputInvalid("--head is the head of one execution's chain: give its id")
    reports: list[AuditReport] = []
    if eid is not None:
        with _store_of(eid) as app:
            reports = [audit_execution(app, eid, args.head)]
    else:
        with _store() as every:
            reports = list(audit_all(every)) if every is not None else []
    if args.json:
        sys.stdout.write(json.dumps([report_document(r) for r in reports], indent=2) + "\n")
    else:
        for r in reports:
            for line in report_lines(r):
                out.print(line, markup=False, soft_wrap=True)
        bad = sum(1 for r in reports if not r.ok)
        err.print(f"{_count(len(reports))} audited, {bad or 'none'} tampered", markup=False)
    return EXIT_OK if all(r.ok for r in reports) else EXIT_FAILED


def report_lines(r: AuditReport) -> list[str]:
    """What `audit verify` prints for one execution."""
    lines = []
    if r.ok:
        line = f"ok  execution {r.originator_id}: {r.events} events, hash chain intact"
        if r.unverifiable:
            line += f"; {_unverifiable(r)}"
        if r.anchored_at is not None:
            line += f"; the head kept is version {r.anchored_at}"
        lines.append(line)
    for f in r.findings:
        what = f" ({f.event_type})" if f.event_type else ""
        lines.append(
            f"{f.problem.value.upper()}  execution {r.originator_id} version {f.version}"
            f"{what}: {f.detail}"
        )
    if not r.ok and r.unverifiable:
        lines.append(f"note  execution {r.originator_id}: {_unverifiable(r)}")
    if r.approximate:
        lines.append(
            f"note  execution {r.originator_id}: too much is broken to trace every move; "
            "some moved events may be named as edited"
        )
    return lines


def _unverifiable(r: AuditReport) -> str:
    span = "version 1 was" if r.unverifiable == 1 else f"versions 1 to {r.unverifiable} were"
    return f"{span} recorded before hashing: unverifiable, not tampered"


def report_document(r: AuditReport) -> dict[str, Any]:
    """An audit report as JSON."""
    return {
        "execution_id": r.originator_id,
        "ok": r.ok,
        "events": r.events,
        "verified": r.verified,
        "unverifiable": r.unverifiable,
        "unchecked": r.unchecked,
        "head": r.head,
        "approximate": r.approximate,
        "anchored_at": r.anchored_at,
        "findings": [
            {
                "problem": f.problem.value,
                "version": f.version,
                "type": f.event_type,
                "detail": f.detail,
            }
            for f in r.findings
        ],
    }


async def cmd_audit_export(args: argparse.Namespace) -> int:
    """flowledger audit export ID [--output FILE]"""
    eid = _execution_id(args.execution_id)
    with _store_of(eid) as app:
        lines = [json.dumps(line, ensure_ascii=False) + "\n" for line in export_history(app, eid)]
        head = audit_execution(app, eid).head
    if args.output is None:
        sys.stdout.writelines(lines)
        return EXIT_OK
    try:
        with open(args.output, "w", encoding="utf-8") as sink:
            sink.writelines(lines)
    except OSError as exc:
        raise InputInvalid(f"--output {args.output}: {exc.strerror or exc}") from None
    err.print(f"wrote {len(lines)} events to {args.output}; head hash {head}", markup=False)
    return EXIT_OK
