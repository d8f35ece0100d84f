"""flowledger against DBOS Transact on the same PostgreSQL server, in the same run.

The peer a Python user would pick instead of flowledger is DBOS Transact (PyPI `dbos`, the
`bench` extra), which also keeps its state in PostgreSQL. Workloads, each run on both:

- W1: a 5-step sequential workflow of no-op actions, at concurrency 1 and 100;
- W2: a fan-out of 20 parallel no-op steps (DBOS: `asyncio.gather`), then a join step;
- W3: examples/document_processing.yaml with its demo agents at zero latency (invoices);
- W4: 10,000 executions waiting on a human task: the RSS of the process that holds them,
  and the time to answer them all (flowledger: `flowledger serve` and its HTTP API;
  DBOS: `DBOS.recv_async` / `DBOS.send_async` in one process);

and, as the limit reference, raw psycopg on one connection: one INSERT per transaction
(commits/s) and ten rows per transaction (rows/s).

Every measurement runs in a child process of its own (fl_workloads.py, dbos_workloads.py)
on a database created for it and dropped after it (flowledger_bench_dbos_fl,
flowledger_bench_dbos_dbos, flowledger_bench_dbos_raw), with synchronous_commit on. In
each round every measurement runs once; the order of the workloads rotates from round to
round and which system goes first alternates. Figures are medians across rounds with
(min-max) ranges; ratios (flowledger ÷ DBOS) are taken per round, then the median.
Raw results go to bench/results/, the report to docs/benchmarks.md (between markers).

    .venv/bin/python bench/bench_dbos.py [--rounds 5] [--w4-rounds N] [--only W1,W4]
        [--quick] [--no-doc] [--no-profile] [--resume RESULTS_JSON] [--report-from RESULTS_JSON]

A full run (the sizes of the issue, every workload in every round) takes about 20 minutes
on a quiet machine here (2 cores), most of it DBOS's; twice that when the machine is busy.
`--w4-rounds 1` runs W4 in the first round only (it is about half of the run), and
`--quick` is a one-minute smoke check.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench_engine import code_revision, cpu_model, filesystem, loadavg
from dbos_common import (
    REPO,
    RESULT_PREFIX,
    connect,
    die_with_parent,
    drop_database,
    fresh_database,
    percentile,
)
from dbos_report import DOC, report, thread_profile, write_doc
from dbos_summary import (
    RAW_PAYLOAD,
    WORKLOADS,
    Target,
    Variant,
    check_mirror,
    plan,
    rate,
    scaled_down,
    summarize,
    targets,
    w3_jobs,
)

if TYPE_CHECKING:
    # Not imported at run time (each runs in a child process): named so that
    # `mypy --strict bench/bench_dbos.py` checks them too.
    import dbos_document  # noqa: F401
    import dbos_workloads  # noqa: F401
    import fl_workloads  # noqa: F401

RESULTS = REPO / "bench" / "results"
DATABASES = {
    "flowledger": "flowledger_bench_dbos_fl",
    "dbos": "flowledger_bench_dbos_dbos",
    "raw": "flowledger_bench_dbos_raw",
}
CHILDREN = {"flowledger": "fl_workloads.py", "dbos": "dbos_workloads.py"}
NOTIFY_TOKEN = "bench-token"
LOCAL_OPTIONS = ("report_from", "resume")  # options of this invocation, not of the run
CHILD_TIMEOUT = 1800  # seconds: a child still running then has hung, and fails the run


@dataclass
class Run:
    """The run's settings and what it has measured so far."""

    args: argparse.Namespace
    notify_url: str = ""
    rounds: list[dict[str, dict[str, Any]]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    logs: Path = RESULTS
    meta: dict[str, Any] = field(default_factory=dict)
    started: float = 0.0  # perf_counter at the start of this process's measuring

    def save(self, summary: dict[str, Any] | None = None, profiles: Any = None) -> Path:
        """Keep what was measured so far in results.json (after every round: a run that is
        stopped keeps its finished rounds, and `--report-from` can show them)."""
        path = self.logs / "results.json"
        if self.started:
            self.meta["run_s_so_far"] = time.perf_counter() - self.started
        path.write_text(
            json.dumps(
                {
                    "meta": self.meta,
                    "args": {k: v for k, v in vars(self.args).items() if k not in LOCAL_OPTIONS},
                    "rounds": self.rounds,
                    "summary": summary,
                    "profiles": profiles or {},
                    "problems": self.problems,
                    "finished": summary is not None,
                },
                indent=1,
            )
        )
        return path


# -- children ------------------------------------------------------------------------------


def child_env() -> dict[str, str]:
    """The environment of every child: demo agents at zero latency, the webhook's token."""
    env = dict(os.environ)
    env |= {
        "FLOWLEDGER_DEMO_LATENCY": "0",
        "FLOWLEDGER_DEMO_SEED": os.environ.get("FLOWLEDGER_DEMO_SEED", "7"),
        "NOTIFY_TOKEN": NOTIFY_TOKEN,
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    return env


def run_child(run: Run, variant: Variant, spec: dict[str, Any], label: str) -> dict[str, Any]:
    """Run one measurement in a child process on a fresh database; its result."""
    dbname = DATABASES[variant.system]
    fresh_database(dbname)
    spec = spec | {"dbname": dbname}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    try:
        proc = subprocess.run(
            [sys.executable, str(REPO / "bench" / CHILDREN[variant.system]), "@" + f.name],
            capture_output=True,
            text=True,
            cwd=REPO,
            env=child_env(),
            timeout=CHILD_TIMEOUT,
            check=False,
            preexec_fn=die_with_parent,
        )
    except subprocess.TimeoutExpired:
        raise SystemExit(f"{label}: still running after {CHILD_TIMEOUT} s; stopped") from None
    finally:
        os.unlink(f.name)
        drop_database(dbname)
    log = run.logs / f"{label.replace(' ', '_').replace('=', '')}.log"
    log.write_text(f"$ {spec}\n-- stdout\n{proc.stdout}\n-- stderr\n{proc.stderr}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    result: dict[str, Any] = json.loads(lines[-1][len(RESULT_PREFIX) :]) if lines else {}
    if proc.returncode != 0 or "failed" in result or not result:
        why = result.get("failed") or proc.stderr.strip().splitlines()[-1:] or ["no result"]
        raise SystemExit(f"{label}: FAILED ({why}); output in {os.path.relpath(log, REPO)}")
    return result


def spec_of(run: Run, v: Variant, profile: str | None = None) -> dict[str, Any]:
    """What the child is asked to run."""
    spec: dict[str, Any] = {"workload": v.workload.lower(), "n": v.n, "concurrency": v.concurrency}
    if v.workload == "W3":
        spec |= {"jobs": w3_jobs(v.n), "notify_url": run.notify_url}
    if profile:
        spec["profile"] = profile
    return spec


# -- the raw ceilings ---------------------------------------------------------------------


def raw_ceilings(commits: int, batches: int) -> dict[str, Any]:
    """One connection: `commits` transactions of one INSERT, `batches` of ten rows."""
    dbname = DATABASES["raw"]
    fresh_database(dbname)
    try:
        with connect(dbname) as conn:
            conn.execute("CREATE TABLE rows (id bigserial PRIMARY KEY, payload text NOT NULL)")
            t0 = time.perf_counter()
            for _ in range(commits):
                with conn.transaction():
                    conn.execute("INSERT INTO rows (payload) VALUES (%s)", (RAW_PAYLOAD,))
            one = time.perf_counter() - t0
            t0 = time.perf_counter()
            for _ in range(batches):
                with conn.transaction(), conn.cursor() as cur:
                    cur.executemany("INSERT INTO rows (payload) VALUES (%s)", [(RAW_PAYLOAD,)] * 10)
            ten = time.perf_counter() - t0
            row = conn.execute("SELECT count(*) FROM rows").fetchone()
        stored = int(row[0]) if row else 0
    finally:
        drop_database(dbname)
    if stored != commits + 10 * batches:
        raise SystemExit(f"raw ceilings: {stored} rows stored, {commits + 10 * batches} written")
    return {"commits": commits, "one_wall": one, "batches": batches, "ten_wall": ten}


# -- rounds --------------------------------------------------------------------------------


def run_rounds(run: Run) -> None:
    """Every measurement once per round; workload order rotated, system order alternated.

    What is measured is saved at once: a resumed run (`--resume`) skips what it has.
    """
    args = run.args
    pairs = plan(args)
    items: list[list[Variant] | None] = [*pairs, *([None] if "RAW" in args.only else [])]
    for i in range(args.rounds):
        k = i % len(items)
        if i == len(run.rounds):
            run.rounds.append({})
        results = run.rounds[i]
        for item in items[k:] + items[:k]:
            if item is None:
                if "RAW" not in results:
                    t0 = time.perf_counter()
                    results["RAW"] = raw_ceilings(args.raw_commits, args.raw_batches)
                    took = time.perf_counter() - t0
                    print(f"round {i + 1}/{args.rounds} raw psycopg ceilings ({took:.0f} s)")
                    run.save()
                continue
            if item[0].workload == "W4" and i >= args.w4_rounds:
                continue
            for v in item if i % 2 == 0 else item[::-1]:
                if v.key in results:
                    continue
                label = f"round{i + 1} {v.key}"
                t0 = time.perf_counter()
                results[v.key] = run_child(run, v, spec_of(run, v), label)
                took = time.perf_counter() - t0
                line = describe(v, results[v.key])
                print(f"round {i + 1}/{args.rounds} {v.key:<24} {line} ({took:.0f} s)")
                run.save()


def describe(v: Variant, r: dict[str, Any]) -> str:
    """One line about a result, for the console."""
    if v.workload == "W4":
        return (
            f"RSS {r['rss'] / 2**20:,.0f} MB, all waiting in {r['all_waiting_s']:.1f} s, "
            f"all completed in {r['complete_s']:.1f} s"
        )
    p50 = percentile(r["latencies"], 50) * 1e3
    return f"{r['wall']:8.3f} s, {rate(v, r):8,.0f} steps/s, p50 {p50:.1f} ms"


# -- where the time goes -------------------------------------------------------------------


def run_profiles(run: Run, missed: list[Target]) -> dict[str, Any]:
    """One flowledger round of each workload whose target was missed, under cProfile."""
    out: dict[str, Any] = {}
    for target in missed:
        workload, _, conc = target.workload.partition(" c=")
        if workload == "W4":
            continue  # a memory target: RSS, not time (see the report)
        n = {"W1": run.args.executions, "W2": run.args.w2_executions}[workload]
        if workload == "W1" and conc == "1":
            n = run.args.w1_c1_executions
        v = Variant(workload, "flowledger", int(conc), n)
        prefix = str(run.logs / f"profile-{workload}-c{conc}")
        r = run_child(run, v, spec_of(run, v, profile=prefix), f"profile {v.key}")
        threads = {"loop": thread_profile(Path(prefix + ".loop"))}
        if Path(prefix + ".store").exists():
            threads["store"] = thread_profile(Path(prefix + ".store"))
        out[target.workload] = {"n": v.n, "wall": r["wall"], "threads": threads}
        print(f"profiled {v.key}: {r['wall']:.2f} s under cProfile")
    return out


# -- where and how -------------------------------------------------------------------------


def machine(argv: list[str]) -> dict[str, Any]:
    """Where and how the figures were taken."""
    cpu = cpu_model()
    nproc = subprocess.run(["nproc"], capture_output=True, text=True, check=False).stdout.strip()
    settings = {}
    with connect("postgres") as admin:
        for name in (
            "server_version",
            "synchronous_commit",
            "fsync",
            "wal_sync_method",
            "shared_buffers",
            "max_connections",
            "data_directory",
        ):
            row = admin.execute(f"SHOW {name}").fetchone()
            settings[name] = str(row[0]) if row else "?"
    versions = {
        name: importlib.metadata.version(name)
        for name in ("dbos", "sqlalchemy", "eventsourcing", "psycopg", "httpx", "uvicorn")
    }
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": nproc,
        "cpu": cpu,
        "python": platform.python_version(),
        "postgres": settings,
        "data_fs": filesystem(settings["data_directory"]),
        "versions": versions,
        "code": code_revision(),
        "loadavg_at_start": loadavg(),
        "command": " ".join([".venv/bin/python bench/bench_dbos.py", shlex.join(argv)]).strip(),
    }


@contextlib.contextmanager
def receiver() -> Iterator[str]:
    """examples/receiver.py (the example's webhook receiver) on a free port; its hook URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "examples" / "receiver.py"), str(port)],
        env=child_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=die_with_parent,
    )
    try:
        t0 = time.perf_counter()
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                if proc.poll() is not None or time.perf_counter() - t0 > 30:
                    raise SystemExit("the webhook receiver did not start") from None
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}/hooks/document-processed"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# -- main ----------------------------------------------------------------------------------


def parse(argv: list[str]) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--only",
        default=",".join(WORKLOADS),
        help=f"comma-separated workloads to run, of {','.join(WORKLOADS)} (RAW: the psycopg "
        "ceilings)",
    )
    parser.add_argument("--executions", type=int, default=1000, help="W1 at concurrency 100")
    parser.add_argument(
        "--w1-c1-executions",
        type=int,
        default=1000,
        help="W1 at concurrency 1",
    )
    parser.add_argument("--w2-executions", type=int, default=200)
    parser.add_argument("--w2-concurrency", type=int, default=1)
    parser.add_argument("--w3-executions", type=int, default=200)
    parser.add_argument("--w3-concurrency", type=int, default=50)
    parser.add_argument("--w4-executions", type=int, default=10_000)
    parser.add_argument("--w4-concurrency", type=int, default=50, help="requests in flight")
    parser.add_argument(
        "--w4-rounds",
        type=int,
        default=None,
        help="W4 runs in the first N rounds (default: all; one takes 2-10 minutes here)",
    )
    parser.add_argument("--raw-commits", type=int, default=2000)
    parser.add_argument("--raw-batches", type=int, default=1000)
    parser.add_argument(
        "--quick", action="store_true", help="smoke check: tiny sizes, 1 round, no doc"
    )
    parser.add_argument("--no-doc", action="store_true", help="leave docs/benchmarks.md alone")
    parser.add_argument("--no-profile", action="store_true", help="skip the cProfile rounds")
    parser.add_argument(
        "--resume",
        metavar="RESULTS_JSON",
        help="go on with a stopped run from its results.json (its settings; what it measured "
        "is kept)",
    )
    parser.add_argument(
        "--report-from",
        metavar="RESULTS_JSON",
        help="measure nothing: write the report again from a run's results.json",
    )
    args = parser.parse_args(argv)
    args.only = [w.strip().upper() for w in args.only.split(",") if w.strip()]
    unknown = [w for w in args.only if w not in WORKLOADS]
    if unknown:
        parser.error(f"--only: unknown workloads {unknown}; choose from {', '.join(WORKLOADS)}")
    if args.quick:
        args.rounds, args.w4_rounds = 1, 1
        args.executions, args.w1_c1_executions = 50, 20
        args.w2_executions, args.w3_executions, args.w4_executions = 10, 20, 200
        args.raw_commits, args.raw_batches = 100, 50
    if args.w4_rounds is None:
        args.w4_rounds = args.rounds
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the rounds, print the summary, keep the raw results, write the report."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    if args.report_from:
        return rerender(Path(args.report_from), args)
    if args.resume:
        return resume(Path(args.resume))
    meta = machine(argv)
    print(
        f"PostgreSQL {meta['postgres']['server_version']}: synchronous_commit = "
        f"{meta['postgres']['synchronous_commit']}"
    )
    if meta["postgres"]["synchronous_commit"] != "on":
        raise SystemExit("synchronous_commit must be on: the figures are for durable commits")
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    run = Run(args, logs=RESULTS / f"dbos-{stamp}{'-quick' if args.quick else ''}", meta=meta)
    run.logs.mkdir(parents=True, exist_ok=True)
    return measure(run)


def resume(path: Path) -> int:
    """Go on with a run that was stopped, from its results.json (its own settings)."""
    saved = json.loads(path.read_text())
    if saved.get("finished"):
        raise SystemExit(f"{path}: that run finished; nothing to resume")
    args = argparse.Namespace(**saved["args"], report_from=None, resume=None)
    meta = saved["meta"]
    meta.setdefault("resumed", []).append(datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"))
    meta["run_s_before"] = meta.get("run_s_before", 0.0) + float(meta.get("run_s_so_far", 0.0))
    run = Run(args, rounds=saved["rounds"], logs=path.parent, meta=meta)
    print(f"resuming {path.parent}: {sum(len(r) for r in run.rounds)} measurements kept")
    return measure(run)


def measure(run: Run) -> int:
    """Measure (what is not measured yet), then report."""
    args, meta = run.args, run.meta
    started = time.perf_counter()
    run.started = started
    with receiver() as url:
        run.notify_url = url
        run_rounds(run)
        summary = summarize(args, run.rounds)
        run.problems += check_mirror(run.rounds)
        missed = [t for t in targets(args) if t.met(summary) is False]
        profiles = {} if args.no_profile else run_profiles(run, missed)
    meta["run_s"] = meta.get("run_s_before", 0.0) + time.perf_counter() - started
    meta["loadavg_at_end"] = loadavg()
    generated = report(meta, args, summary, profiles, scaled_down(args), run.problems)
    print()
    print(generated)
    run.save(summary, profiles)
    print(f"raw results and child logs: {os.path.relpath(run.logs, REPO)}")
    if args.quick or args.no_doc:
        print("docs/benchmarks.md left as it is")
    else:
        write_doc(generated)
        print(f"report: {os.path.relpath(DOC, REPO)}")
    return 0


def rerender(path: Path, given: argparse.Namespace) -> int:
    """Write the report again from a run's results.json (the figures as measured then)."""
    saved = json.loads(path.read_text())
    args = argparse.Namespace(**saved["args"])
    if not saved.get("finished"):
        # A run stopped early: report the rounds it finished, as many as there are.
        args.rounds = len(saved["rounds"])
        saved["meta"].setdefault("run_s", 0.0)
        saved["meta"].setdefault("loadavg_at_end", "unknown")
    run = Run(args, rounds=saved["rounds"])
    run.problems = check_mirror(run.rounds)
    summary = summarize(args, run.rounds)
    generated = report(
        saved["meta"], args, summary, saved["profiles"], scaled_down(args), run.problems
    )
    print(generated)
    if given.no_doc:
        print("docs/benchmarks.md left as it is")
    else:
        write_doc(generated)
        print(f"report: {os.path.relpath(DOC, REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
