"""`flowledger optimize WORKFLOW [--version V] [--json] [--apply REC_ID]`: the optimizer's
report on a workflow version as readable tables or JSON, and applying a recommendation as
a new version."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import asdict
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from flowledger.adapters.settings import build_app, load_settings
from flowledger.services.optimizer import Applied, Optimizer
from flowledger.services.optimizer_model import OptimizerReport, Recommendation
from flowledger.services.queries import Queries

EXIT_OK = 0
out = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 160)


def register(sub: Any) -> None:
    """Add `optimize` to the `flowledger` subcommands."""
    p = sub.add_parser(
        "optimize",
        help="critical path, bottlenecks and recommendations from a workflow's own runs",
    )
    p.add_argument("workflow")
    p.add_argument("--version", dest="workflow_version", default=None, help="newest by default")
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "--apply", metavar="REC_ID", default=None, help="register a new version with this change"
    )
    p.set_defaults(handler=cmd_optimize)


def _optimizer_do(fn: Any) -> Any:
    app = build_app(load_settings())
    try:
        return fn(Optimizer(app, Queries(app)))
    finally:
        app.close()


async def cmd_optimize(args: argparse.Namespace) -> int:
    """flowledger optimize WORKFLOW [--version V] [--json] [--apply REC_ID]"""
    if args.apply is not None:
        applied: Applied = await asyncio.to_thread(
            _optimizer_do,
            lambda o: o.apply(args.workflow, args.apply, args.workflow_version),
        )
        if args.json:
            sys.stdout.write(json.dumps(asdict(applied), indent=2) + "\n")
        else:
            verb = "registered" if applied.created else "already registered as"
            out.print(
                f"{verb} {applied.workflow_id} version {applied.version} (from "
                f"{applied.based_on}, {applied.recommendation.id}): "
                f"{applied.recommendation.title}",
                markup=False,
            )
            out.print(
                "new executions start on it; running ones finish on the version they began",
                markup=False,
            )
        return EXIT_OK
    report: OptimizerReport = await asyncio.to_thread(
        _optimizer_do, lambda o: o.report(args.workflow, args.workflow_version)
    )
    if args.json:
        sys.stdout.write(json.dumps(asdict(report), indent=2) + "\n")
        return EXIT_OK
    render_report(report, out)
    return EXIT_OK


def render_report(report: OptimizerReport, console: Console) -> None:
    """The report as tables: steps on the critical path, bottlenecks, recommendations."""
    p50 = "-" if report.end_to_end_p50 is None else f"{report.end_to_end_p50:.3f} s"
    p95 = "-" if report.end_to_end_p95 is None else f"{report.end_to_end_p95:.3f} s"
    console.print(
        Text(
            f"optimizer: {report.workflow_id} version {report.version} - "
            f"{report.executions_completed} completed, {report.executions_failed} failed "
            f"executions; end to end p50 {p50}, p95 {p95}",
            style="bold",
        )
    )
    if report.critical_path is not None:
        cp = report.critical_path
        console.print(
            f"critical path (in {cp.frequency:.0%} of {cp.executions}): " + " -> ".join(cp.steps),
            markup=False,
        )
    table = Table(title=Text("top-level steps"))
    for column in ("step", "type", "runs", "p50 s", "mean s", "cv", "critical", "share"):
        table.add_column(column, justify="left" if column in ("step", "type") else "right")
    for s in report.steps:
        cells = (
            s.step_id,
            s.type,
            str(s.runs),
            _num(s.p50),
            _num(s.mean),
            _num(s.cv, 2),
            f"{s.on_critical_path:.0%}",
            f"{s.share:.0%}",
        )
        table.add_row(*(Text(c) for c in cells))
    console.print(table)
    if report.bottlenecks:
        bt = Table(title=Text("bottlenecks"))
        for column in ("kind", "step", "detail"):
            bt.add_column(column)
        for b in report.bottlenecks:
            bt.add_row(Text(b.kind), Text(b.step_id or "(workflow)"), Text(b.detail))
        console.print(bt)
    if report.recommendations:
        for rec in report.recommendations:
            _render_recommendation(rec, console)
        console.print(
            f"apply one: flowledger optimize {report.workflow_id} --version {report.version} "
            "--apply ID",
            markup=False,
        )
    elif any(n.check == "any recommendation" for n in report.more_data):
        console.print("no recommendation yet: too few runs to go by (below)", markup=False)
    else:
        console.print("no recommendation: nothing in these runs calls for a change", markup=False)
    for note in report.more_data:
        what = note.check + (f" on {note.step_id}" if note.step_id else "")
        console.print(
            f"needs more data: {what}: {note.have} of {note.need} runs, {note.more_runs} more",
            markup=False,
            style="dim",
        )


def _render_recommendation(rec: Recommendation, console: Console) -> None:
    p = rec.prediction
    lo, hi = p.interval_p50
    table = Table(title=Text(f"{rec.id}: {rec.title}", style="bold"), show_header=False)
    table.add_column("", style="dim")
    table.add_column("")
    table.add_row(
        "predicted",
        Text(
            f"p50 {p.baseline_p50:.3f} s -> {p.predicted_p50:.3f} s ({p.change_p50_pct:+.1f}%, "
            f"90% interval {lo:+.3f} .. {hi:+.3f} s); mean {p.change_mean_pct:+.1f}%; "
            f"{p.metric}, {p.simulated_runs} simulated runs from {p.executions}"
        ),
    )
    if rec.note:
        table.add_row("note", Text(rec.note))
    table.add_row("evidence", Text(json.dumps(rec.evidence)))
    table.add_row("change", Text(json.dumps(rec.patch)))
    table.add_row("risk", Text(rec.risk))
    console.print(table)


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
