"""What bench_dbos.py measures and how it sums it up: the variants of a round, their
figures, medians and ranges across rounds, ratios flowledger ÷ DBOS, and the issue's targets.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
from dataclasses import dataclass
from typing import Any

from dbos_common import FANOUT, STEPS, percentile

from flowledger.services.app import execution_id_for

SYSTEMS = ("flowledger", "dbos")
NAMES = {"flowledger": "flowledger", "dbos": "DBOS"}
WORKLOADS = ("W1", "W2", "W3", "W4", "RAW")
RAW_PAYLOAD = "x" * 200  # about one stored event


@dataclass(frozen=True)
class Variant:
    """One measurement of a round: a workload on a system at a concurrency."""

    workload: str  # "W1" ... "W4"
    system: str  # "flowledger" or "dbos"
    concurrency: int
    n: int

    @property
    def key(self) -> str:
        """What identifies the variant across rounds."""
        return f"{self.workload} c={self.concurrency} {self.system}"


def plan(args: argparse.Namespace) -> list[list[Variant]]:
    """The measurements of a round in pairs (flowledger, DBOS), in workload order."""
    pairs: list[list[Variant]] = []

    def pair(workload: str, concurrency: int, n: int) -> None:
        pairs.append([Variant(workload, s, concurrency, n) for s in SYSTEMS])

    if "W1" in args.only:
        pair("W1", 1, args.w1_c1_executions)
        pair("W1", 100, args.executions)
    if "W2" in args.only:
        pair("W2", args.w2_concurrency, args.w2_executions)
    if "W3" in args.only:
        pair("W3", args.w3_concurrency, args.w3_executions)
    if "W4" in args.only:
        pair("W4", args.w4_concurrency, args.w4_executions)
    return pairs


def w3_jobs(n: int) -> list[dict[str, str]]:
    """Invoices, each with an idempotency key and the execution id it maps to in flowledger
    (DBOS gets the same id as its workflow id, so the demo agents draw the same failures)."""
    jobs = []
    for i in range(n):
        key = f"bench-w3-{i}"
        url = f"https://example.com/invoice-{i}.pdf"
        jobs.append({"key": key, "id": str(execution_id_for(key)), "url": url})
    return jobs


def w3_steps(n: int) -> int:
    """Steps the W3 invoices run (fetch, ocr, metadata, one per page, validate, notify)."""
    pages = 0
    for job in w3_jobs(n):
        pages += 1 + int(hashlib.sha256(job["url"].encode()).hexdigest()[:2], 16) % 5
    return 5 * n + pages


def rate(v: Variant, r: dict[str, Any]) -> float:
    """Steps per second: W1 5 per execution, W2 the 20 children, W3 every step run."""
    per = {"W1": STEPS, "W2": FANOUT}.get(v.workload)
    steps = r["n"] * per if per is not None else w3_steps(r["n"])
    return float(steps / r["wall"])


# -- summary -------------------------------------------------------------------------------


def check_mirror(rounds: list[dict[str, Any]]) -> list[str]:
    """W3 compares like with like only if both systems retried the same attempts."""
    problems = []
    for i, rnd in enumerate(rounds):
        found = {k: r["retries"] for k, r in rnd.items() if k.startswith("W3 ")}
        if len(set(found.values())) > 1:
            problems.append(f"round {i + 1}: W3 retried different attempts: {found}")
    return problems


def triple(values: list[float]) -> tuple[float, float, float] | None:
    """(median, min, max), or None when there are no values."""
    return (statistics.median(values), min(values), max(values)) if values else None


def metrics(v: Variant, r: dict[str, Any]) -> dict[str, float]:
    """The figures of one result."""
    if v.workload == "W4":
        return {
            "idle_mb": r["idle_rss"] / 2**20,
            "rss_mb": r["rss"] / 2**20,
            "hwm_mb": r["hwm"] / 2**20,
            "threads": r["threads"],
            "start_s": r["all_waiting_s"],
            "complete_s": r["complete_s"],
            "per_s": r["n"] / r["complete_s"],
        }
    lat = r["latencies"]
    out = {
        "wall": r["wall"],
        "steps_per_s": rate(v, r),
        "executions_per_s": r["n"] / r["wall"],
        "p50_ms": percentile(lat, 50) * 1e3,
        "p99_ms": percentile(lat, 99) * 1e3,
    }
    if "commits" in r:
        out["commits_per_execution"] = r["commits"] / r["n"]
    if "retries" in r:
        out["retries"] = r["retries"]
    return out


def summarize(args: argparse.Namespace, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Per variant: medians and ranges across rounds; ratios flowledger ÷ DBOS per round."""
    summary: dict[str, Any] = {"variants": {}, "ratios": {}, "raw": None}
    for pair in plan(args):
        per_round = [rnd for rnd in rounds if all(v.key in rnd for v in pair)]
        for v in pair:
            values = [metrics(v, rnd[v.key]) for rnd in per_round]
            names = values[0].keys() if values else []
            summary["variants"][v.key] = {
                "rounds": len(values),
                "n": v.n,
                **{m: triple([x[m] for x in values]) for m in names},
            }
        fl, db = pair
        ratios: dict[str, list[float]] = {}
        for rnd in per_round:
            a, b = metrics(fl, rnd[fl.key]), metrics(db, rnd[db.key])
            for m in a:
                if b.get(m):
                    ratios.setdefault(m, []).append(a[m] / b[m])
        summary["ratios"][f"{fl.workload} c={fl.concurrency}"] = {
            m: triple(x) for m, x in ratios.items()
        }
    raws = [rnd["RAW"] for rnd in rounds if "RAW" in rnd]
    if raws:
        summary["raw"] = {
            "commits_per_s": triple([r["commits"] / r["one_wall"] for r in raws]),
            "rows_per_s": triple([10 * r["batches"] / r["ten_wall"] for r in raws]),
            "rounds": len(raws),
        }
    return summary


@dataclass(frozen=True)
class Target:
    """A target of the issue, held to the median of the per-round figure."""

    workload: str  # the ratio group, e.g. "W1 c=100"
    metric: str
    text: str
    at_most: float | None = None
    at_least: float | None = None
    absolute: bool = False  # the flowledger figure itself, not its ratio to DBOS

    def value(self, summary: dict[str, Any]) -> float | None:
        """The median the target is held to (None when it was not measured)."""
        if self.absolute:
            var = summary["variants"].get(f"{self.workload} flowledger") or {}
            found = var.get(self.metric)
        else:
            found = summary["ratios"].get(self.workload, {}).get(self.metric)
        return None if found is None else float(found[0])

    def met(self, summary: dict[str, Any]) -> bool | None:
        """Whether the target is met (None when it was not measured)."""
        value = self.value(summary)
        if value is None:
            return None
        if self.at_most is not None:
            return value <= self.at_most
        return self.at_least is None or value >= self.at_least


def targets(args: argparse.Namespace) -> list[Target]:
    """The issue's targets, for the concurrencies this run used."""
    return [
        Target("W1 c=100", "steps_per_s", "steps/s at least 10x DBOS's", at_least=10),
        Target("W1 c=1", "p50_ms", "p50 latency at most half of DBOS's", at_most=0.5),
        Target(
            f"W2 c={args.w2_concurrency}",
            "steps_per_s",
            "child steps/s at least 10x DBOS's",
            at_least=10,
        ),
        Target(
            f"W4 c={args.w4_concurrency}",
            "rss_mb",
            "under 300 MB RSS for the waiting executions",
            at_most=300,
            absolute=True,
        ),
    ]


def scaled_down(args: argparse.Namespace) -> list[str]:
    """What this run measured below the issue's sizes, and by how much."""
    wanted = [
        ("W1 at concurrency 100", args.executions, 1000, "executions"),
        ("W1 at concurrency 1", args.w1_c1_executions, 1000, "executions"),
        ("W2", args.w2_executions, 200, "executions"),
        ("W4", args.w4_executions, 10_000, "executions"),
    ]
    out = [
        f"{what}: {got:,} {unit} a round instead of {want:,} ({got / want:.0%})"
        for what, got, want, unit in wanted
        if got < want
    ]
    if "W4" in args.only and min(args.w4_rounds, args.rounds) < args.rounds:
        out.append(
            f"W4 runs in {min(args.w4_rounds, args.rounds)} of the {args.rounds} rounds: "
            "starting and answering 10,000 executions takes each system 3-10 minutes here"
        )
    return out
