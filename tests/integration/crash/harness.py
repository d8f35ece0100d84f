"""The crash lab: `flowledger` subprocesses on a temporary store, killed with SIGKILL.

The store is a SQLite file in the lab's FLOWLEDGER_HOME, or a PostgreSQL database whose
settings (PERSISTENCE_MODULE and POSTGRES_*) the subprocesses get through the environment.

After each kill the lab snapshots the store and the agents' ledger; `check` then proves,
from the final store, the ledger and every snapshot, that nothing was lost, duplicated or
run again. Importable as `integration.crash.harness`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID

from integration.crash.agents import marker_name

from flowledger.adapters.files import load_definition_file
from flowledger.adapters.lock import DriverLock
from flowledger.domain.states import ExecutionStatus, StepStatus
from flowledger.domain.workflow import DISPATCHED_TYPES
from flowledger.services.app import FlowledgerApp, execution_id_for
from flowledger.services.follow import submit_start

HERE = Path(__file__).resolve().parent
AGENTS = HERE / "agents.py"
PROCESS_TIMEOUT = 60.0  # a subprocess that takes longer is stuck: the test fails
DONE = frozenset({StepStatus.COMPLETED, StepStatus.COMPENSATED})
FINISHED = frozenset(
    {
        StepStatus.COMPLETED,
        StepStatus.COMPENSATED,
        StepStatus.FAILED,
        StepStatus.SKIPPED,
        StepStatus.CANCELLED,
    }
)
ATTEMPT_STARTS = ("StepStarted", "StepWaiting")
OUTCOMES = ("StepSucceeded", "HumanTaskCompleted", "StepRetryScheduled", "StepFailed")


def flowledger_executable() -> str:
    """The `flowledger` console script of the interpreter running the tests."""
    beside = Path(sys.executable).parent / "flowledger"
    found = str(beside) if beside.exists() else shutil.which("flowledger")
    if found is None:
        raise RuntimeError("the flowledger console script is not installed (pip install -e .)")
    return found


def workflow_file(name: str) -> Path:
    """A workflow definition of the crash tests, by stem: `sequence`, `saga`, ..."""
    return HERE / f"{name}.yaml"


@dataclass
class Snapshot:
    """The store and the ledger as a kill left them."""

    label: str
    events: dict[UUID, list[tuple[int, str, bytes]]]
    execution_status: dict[UUID, ExecutionStatus]
    steps: dict[tuple[UUID, str], tuple[StepStatus, int]]  # status and attempt
    running: set[tuple[UUID, str, int]]  # dispatched attempts recorded as running
    fired: set[tuple[UUID, str]]
    ledger_lines: int
    killed_at: datetime  # when SIGKILL was sent (or the self-kill was seen)

    def step(self, eid: UUID, key: str) -> StepStatus | None:
        """The status a step instance had at the kill (None: not started)."""
        found = self.steps.get((eid, key))
        return found[0] if found else None


@dataclass
class Lab:
    """Processes, store and ledger of one crash test."""

    root: Path
    # The store's settings (a PostgreSQL database's); None: SQLite in the lab's home.
    store: dict[str, str] | None = None
    snapshots: list[Snapshot] = field(default_factory=list)
    kills: int = 0
    _procs: list[tuple[str, subprocess.Popen[bytes], Path]] = field(default_factory=list)
    _reader: FlowledgerApp | None = None

    def __post_init__(self) -> None:
        self.home = self.root / "home"
        self.ledger = self.root / "ledger.jsonl"
        self.markers = self.root / "markers"
        self.logs = self.root / "logs"
        for folder in (self.home, self.markers, self.logs):
            folder.mkdir(parents=True, exist_ok=True)
        self.db = self.home / "flowledger.db"

    @property
    def store_name(self) -> str:
        """The kind of store: "sqlite" or "postgres"."""
        return "sqlite" if self.store is None else "postgres"

    # -- processes -------------------------------------------------------------------------

    def spawn(
        self, args: list[str], *, hold: Iterable[str] = (), crash_at: str | None = None
    ) -> subprocess.Popen[bytes]:
        """Start `flowledger ARGS` on the lab's store; its output goes to logs/."""
        scrubbed = ("FLOWLEDGER_", "CRASH_", "PERSISTENCE_MODULE", "SQLITE_", "POSTGRES_")
        env = {k: v for k, v in os.environ.items() if not k.startswith(scrubbed)}
        env.update(
            FLOWLEDGER_HOME=str(self.home),
            CRASH_LEDGER=str(self.ledger),
            CRASH_MARKERS=str(self.markers),
            CRASH_HOLD=",".join(hold),
        )
        env.update(self.store or {})
        if crash_at is not None:
            env["FLOWLEDGER_CRASH_AT"] = crash_at
        log = self.logs / f"{len(self._procs):02d}-{args[0]}"
        with open(log.with_suffix(".out"), "wb") as out, open(log.with_suffix(".err"), "wb") as err:
            proc = subprocess.Popen(
                [flowledger_executable(), *args], env=env, stdout=out, stderr=err, cwd=self.root
            )
        self._procs.append((args[0], proc, log))
        return proc

    def run(
        self, workflow: str, data: Mapping[str, Any], key: str, **kw: Any
    ) -> tuple[subprocess.Popen[bytes], UUID]:
        """`flowledger run`: start an execution (id from `key`) and drive it."""
        args = ["run", str(workflow_file(workflow)), "--agents", str(AGENTS)]
        args += ["--input", json.dumps(dict(data)), "--idempotency-key", key, "--json"]
        return self.spawn(args, **kw), execution_id_for(key)

    def command(self, name: str, eid: UUID, *args: str, **kw: Any) -> subprocess.Popen[bytes]:
        """`flowledger complete|cancel EXECUTION_ID ...`: store a command and drive on."""
        return self.spawn([name, str(eid), *args, "--agents", str(AGENTS), "--json"], **kw)

    def worker(self, **kw: Any) -> subprocess.Popen[bytes]:
        """`flowledger worker --until-idle`: resume every execution and drive it."""
        return self.spawn(["worker", "--until-idle", "--agents", str(AGENTS)], **kw)

    def kill(self, proc: subprocess.Popen[bytes], label: str) -> None:
        """SIGKILL the process now; snapshot what it left."""
        killed_at = datetime.now(UTC)
        proc.send_signal(signal.SIGKILL)
        self._reap_killed(proc, label, killed_at)

    def died(self, proc: subprocess.Popen[bytes], label: str) -> None:
        """Wait for a process that kills itself (FLOWLEDGER_CRASH_AT); snapshot what it left."""
        self._reap_killed(proc, label)

    def kill_after(self, proc: subprocess.Popen[bytes], delay: float, label: str) -> bool:
        """SIGKILL the process after `delay` seconds unless it ends first; True if killed."""
        try:
            code = proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            killed_at = datetime.now(UTC)
            proc.send_signal(signal.SIGKILL)
            # It may have ended by itself just before the signal: then it was not killed.
            code = self._wait_dead(proc, label)
            if code == -signal.SIGKILL:
                self._killed(label, killed_at)
                return True
        assert code in (0, 1), self.describe(proc, f"{label}: exit code {code}")
        return False

    def finish(self, proc: subprocess.Popen[bytes], codes: Iterable[int] = (0,)) -> int:
        """Wait for a process to end by itself with one of `codes`."""
        try:
            code = proc.wait(timeout=PROCESS_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError(self.describe(proc, "did not end in time")) from None
        assert code in set(codes), self.describe(proc, f"exit code {code}")
        return code

    def recover(self, *, cycles: int = 1) -> None:
        """Run `worker --until-idle` to the end (`cycles` times; later ones find nothing)."""
        for _ in range(cycles):
            self.finish(self.worker())

    def _reap_killed(
        self, proc: subprocess.Popen[bytes], label: str, killed_at: datetime | None = None
    ) -> None:
        code = self._wait_dead(proc, label)
        assert code == -signal.SIGKILL, self.describe(proc, f"{label}: exit code {code}")
        self._killed(label, killed_at or datetime.now(UTC))

    def _wait_dead(self, proc: subprocess.Popen[bytes], label: str) -> int:
        try:
            return proc.wait(timeout=PROCESS_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError(self.describe(proc, f"{label}: did not die")) from None

    def _killed(self, label: str, killed_at: datetime) -> None:
        self.kills += 1
        self.snapshots.append(self.snapshot(label, killed_at))

    def close(self) -> None:
        """Kill whatever is still running (a failed test) and close the reader."""
        for _, proc, _ in self._procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def output(self, proc: subprocess.Popen[bytes], stream: str = "out") -> str:
        """What a process wrote to stdout ("out") or stderr ("err") so far."""
        for _, p, log in self._procs:
            if p is proc:
                return log.with_suffix(f".{stream}").read_text(errors="replace")
        raise KeyError(proc)

    def describe(self, proc: subprocess.Popen[bytes], problem: str) -> str:
        """A failure message with the process's command and the tail of its output."""
        for name, p, log in self._procs:
            if p is proc:
                err = log.with_suffix(".err").read_text(errors="replace")[-3000:]
                out = log.with_suffix(".out").read_text(errors="replace")[-1000:]
                return f"flowledger {name}: {problem}\n--- stderr\n{err}\n--- stdout\n{out}"
        return problem

    def lock_holder(self) -> tuple[int, str] | None:
        """The (pid, role) the process driving the store wrote in its lock file (SQLite)."""
        return DriverLock(self.home).holder()

    # -- waiting for a point -----------------------------------------------------------------

    def wait_for(
        self,
        condition: Callable[[], bool],
        what: str,
        proc: subprocess.Popen[bytes] | None = None,
        timeout: float = 30.0,
    ) -> None:
        """Poll `condition` until it holds; fail if `proc` ends first or time runs out."""
        deadline = time.monotonic() + timeout
        while not condition():
            if proc is not None and proc.poll() is not None:
                raise AssertionError(self.describe(proc, f"ended before {what}"))
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            time.sleep(0.01)

    def reached(self, key: str, attempt: int = 1) -> Callable[[], bool]:
        """A condition: a held attempt of `key` is running (its marker exists)."""
        path = self.markers / marker_name(key, attempt)
        return path.exists

    def stored(self, eid: UUID, event: str, **fields: Any) -> Callable[[], bool]:
        """A condition: the store holds an `event` of the execution with these fields."""

        def check() -> bool:
            return any(
                type(e).__name__ == event and all(getattr(e, k) == v for k, v in fields.items())
                for e in self.reader().repository.event_store.get(eid)
            )

        return check

    def event(self, eid: UUID, event: str, **fields: Any) -> Any:
        """The first stored `event` of the execution with these fields."""
        for e in self.reader().repository.event_store.get(eid):
            if type(e).__name__ == event and all(getattr(e, k) == v for k, v in fields.items()):
                return e
        raise AssertionError(f"no {event} {fields} in execution {eid}")

    # -- the store ---------------------------------------------------------------------------

    def reader(self) -> FlowledgerApp:
        """An application on the lab's store, as another process would open it."""
        if self._reader is None:
            sqlite = {
                "PERSISTENCE_MODULE": "eventsourcing.sqlite",
                "SQLITE_DBNAME": str(self.db),
                "SQLITE_LOCK_TIMEOUT": "30",
            }
            self._reader = FlowledgerApp(env=self.store or sqlite)
        return self._reader

    def submit(self, workflow: str, data: Mapping[str, Any], key: str) -> UUID:
        """Store a new execution without driving it (the next worker picks it up)."""
        app = self.reader()
        wf, _ = app.register(load_definition_file(workflow_file(workflow)))
        return submit_start(app, wf, dict(data), key)

    def snapshot(self, label: str, killed_at: datetime) -> Snapshot:
        """What the store and the ledger hold now (no process may be running)."""
        app = self.reader()
        ledger_lines = len(read_ledger(self.ledger))
        snap = Snapshot(label, {}, {}, {}, set(), set(), ledger_lines, killed_at)
        for eid in app.execution_ids():
            snap.events[eid] = _raw(app, eid)
            ex = app.execution(eid)
            wf = app.workflow(ex.workflow_id, ex.workflow_version)
            snap.execution_status[eid] = ex.status
            for record in ex.steps.values():
                snap.steps[(eid, record.key)] = (record.status, record.attempt)
                dispatched = wf.node(record.step_id).step.type in DISPATCHED_TYPES
                if record.status is StepStatus.RUNNING and dispatched:
                    snap.running.add((eid, record.key, record.attempt))
            snap.fired |= {(eid, t.timer_id) for t in ex.timers.values() if t.fired}
        return snap

    # -- the proof -------------------------------------------------------------------------------

    def check(self, expected: Mapping[UUID, ExecutionStatus]) -> dict[UUID, list[Any]]:
        """Assert every invariant of the bar; returns each execution's events."""
        app = self.reader()
        ids = app.execution_ids()
        assert sorted(ids) == sorted(expected), "the store holds other executions than expected"
        events = {eid: list(app.repository.event_store.get(eid)) for eid in ids}
        raw = {eid: _raw(app, eid) for eid in ids}
        final = {eid: app.execution(eid) for eid in ids}
        ledger = read_ledger(self.ledger)
        assert app.execution_ids(live_only=True) == [], "an execution has not ended"
        dispatched: set[tuple[str, str]] = set()
        for eid in ids:
            ex = final[eid]
            assert ex.status is expected[eid], f"{eid} ended {ex.status}, not {expected[eid]}"
            _check_versions(eid, events[eid])
            _check_attempts(eid, events[eid])
            statuses = {key: record.status for key, record in ex.steps.items()}
            _check_timers(eid, events[eid], statuses)
            wf = app.workflow(ex.workflow_id, ex.workflow_version)
            dispatched |= {
                (str(eid), key)
                for key, record in ex.steps.items()
                if wf.node(record.step_id).step.type in DISPATCHED_TYPES
            }
        _check_ledger(ledger, events, dispatched)
        for snap in self.snapshots:
            _check_after_kill(snap, raw, events, ledger)
        return events


# -- the ledger ------------------------------------------------------------------------------


def read_ledger(path: Path) -> list[dict[str, Any]]:
    """Every line the agents wrote, in order (each is written with one write(), then
    fsynced). A SIGKILL can still cut a write short where the line crosses a page of the
    file; such a torn line records an attempt killed as it began, as if it had not written:
    it is left out (the next writer ends it with a newline first)."""
    if not path.exists():
        return []
    lines = []
    for text in path.read_text().splitlines():
        try:
            lines.append(json.loads(text))
        except json.JSONDecodeError:
            continue
    return lines


def _raw(app: FlowledgerApp, eid: UUID) -> list[tuple[int, str, bytes]]:
    return [(e.originator_version, e.topic, e.state) for e in app.recorder.select_events(eid)]


# -- invariants ------------------------------------------------------------------------------


def _name(e: Any) -> str:
    return type(e).__name__


def _check_versions(eid: UUID, events: list[Any]) -> None:
    """Nothing duplicated: versions 1..n, one start, one end (the last event)."""
    versions = [e.originator_version for e in events]
    assert versions == list(range(1, len(events) + 1)), f"{eid}: versions {versions}"
    names = [_name(e) for e in events]
    assert names[0] == "ExecutionStarted", names
    assert names.count("ExecutionStarted") == 1, names
    ends = [n for n in names if n in _END_EVENTS]
    assert len(ends) == 1, f"{eid}: ends {ends}"
    assert names[-1] == ends[0], f"{eid}: events after the end: {names}"


_END_EVENTS = ("ExecutionCompleted", "ExecutionFailed", "ExecutionTimedOut", "ExecutionCancelled")


def _check_attempts(eid: UUID, events: list[Any]) -> None:
    """Attempts are 1..n per step instance; a retry starts only after its timer fired;
    nothing starts or ends twice, and nothing starts after the step succeeded."""
    attempt: dict[str, int] = defaultdict(int)
    open_: dict[str, bool] = defaultdict(bool)
    succeeded: set[str] = set()
    retry_timer: dict[str, str] = {}
    fired: set[str] = set()
    for e in events:
        name = _name(e)
        key = getattr(e, "key", None)
        where = f"{eid} v{e.originator_version} {name} {key!r}"
        if name == "TimerFired":
            fired.add(e.timer_id)
        elif name in ATTEMPT_STARTS:
            assert key not in succeeded, f"{where}: started again after it succeeded"
            assert not open_[key], f"{where}: attempt {attempt[key]} had no outcome"
            assert e.attempt == attempt[key] + 1, (
                f"{where}: attempt {e.attempt} after {attempt[key]}"
            )
            if attempt[key]:
                timer = retry_timer.pop(key, None)
                assert timer is not None, f"{where}: a new attempt without a retry"
                assert timer in fired, f"{where}: retried before its timer {timer} fired"
            attempt[key] = e.attempt
            open_[key] = True
        elif name in OUTCOMES:
            assert open_[key], f"{where}: an outcome for no running attempt"
            open_[key] = False
            if name in ("StepSucceeded", "HumanTaskCompleted"):
                succeeded.add(key)
            elif name == "StepRetryScheduled":
                retry_timer[key] = e.timer_id
        elif name == "StepRecovered":
            assert key not in succeeded, f"{where}: recovered after it succeeded"
            succeeded.add(key)
        elif name == "StepCancelled":
            open_[key] = False


def _check_timers(eid: UUID, events: list[Any], statuses: Mapping[str, StepStatus]) -> None:
    """A timer fires at most once, never early; the retry and wait timers of a step that
    got done fired exactly once."""
    timers: dict[str, tuple[str, str, datetime]] = {}  # id -> (key, purpose, fire_at)
    fired: Counter[str] = Counter()
    for e in events:
        name = _name(e)
        if name == "StepRetryScheduled":
            timers[e.timer_id] = (e.key, "retry", e.fire_at)
        elif name == "StepWaiting" and e.timer_id is not None:
            timers[e.timer_id] = (e.key, e.purpose, e.fire_at)
        elif name == "TimerFired":
            assert e.timer_id in timers, f"{eid}: timer {e.timer_id} fired before it was set"
            fired[e.timer_id] += 1
            assert e.at >= timers[e.timer_id][2], f"{eid}: timer {e.timer_id} fired early"
    assert all(n == 1 for n in fired.values()), f"{eid}: timers fired twice: {fired}"
    for timer_id, (key, purpose, _) in timers.items():
        if purpose in ("retry", "wait") and statuses.get(key) in DONE:
            assert fired[timer_id] == 1, f"{eid}: timer {timer_id} of done step {key} never fired"


def _outcomes(events: list[Any]) -> dict[tuple[str, int], Any]:
    """The stored outcome event of each (step key, attempt)."""
    current: dict[str, int] = {}
    found: dict[tuple[str, int], Any] = {}
    for e in events:
        name = _name(e)
        if name in ATTEMPT_STARTS:
            current[e.key] = e.attempt
        elif name in OUTCOMES and e.key in current:
            found[(e.key, current[e.key])] = e
        elif name == "StepCancelled" and e.key in current:
            found.setdefault((e.key, current[e.key]), e)
    return found


def _is_worker_lost(outcome: Any) -> bool:
    return (
        outcome is not None and (getattr(outcome, "error", None) or {}).get("type") == "WorkerLost"
    )


def _check_ledger(
    ledger: list[dict[str, Any]],
    events: Mapping[UUID, list[Any]],
    dispatched: set[tuple[str, str]],
) -> None:
    """What the actions saw agrees with the store: each attempt called at most once, only
    after its start was stored, never after its step's success; a result the store lacks
    was lost in a kill (WorkerLost); a stored result comes from a call that returned it."""
    starts = Counter(
        (line["eid"], line["key"], line["attempt"]) for line in ledger if line["phase"] == "start"
    )
    ends = Counter(
        (line["eid"], line["key"], line["attempt"]) for line in ledger if line["phase"] == "end"
    )
    twice = sorted({a for a, n in starts.items() if n > 1} | {a for a, n in ends.items() if n > 1})
    assert not twice, f"attempts called more than once: {twice}"
    assert set(ends) <= set(starts), "an attempt ended that never started"
    stored_starts: set[tuple[str, str, int]] = set()
    success_at: dict[tuple[str, str], datetime] = {}
    outcomes: dict[tuple[str, str, int], Any] = {}
    for eid, evs in events.items():
        for e in evs:
            if _name(e) == "StepStarted":
                stored_starts.add((str(eid), e.key, e.attempt))
            elif _name(e) == "StepSucceeded":
                success_at[(str(eid), e.key)] = e.at
        for (key, attempt), outcome in _outcomes(evs).items():
            outcomes[(str(eid), key, attempt)] = outcome
    ended = {
        (line["eid"], line["key"], line["attempt"]): line
        for line in ledger
        if line["phase"] == "end"
    }
    for line in ledger:
        attempt = (line["eid"], line["key"], line["attempt"])
        assert attempt in stored_starts, f"{attempt} ran without a stored StepStarted"
        done = success_at.get((line["eid"], line["key"]))
        if line["phase"] == "start" and done is not None:
            assert line["t"] < done.timestamp(), f"{attempt} started after its step succeeded"
        if line["phase"] != "end":
            continue
        outcome = outcomes.get(attempt)
        agrees = (line["outcome"] == "ok") == (
            outcome is not None and _name(outcome) == "StepSucceeded"
        )
        cancelled = outcome is not None and _name(outcome) == "StepCancelled"
        assert agrees or cancelled or _is_worker_lost(outcome), (
            f"{attempt} returned {line['outcome']} but the store says {_name(outcome)} "
            f"{getattr(outcome, 'error', None)}"
        )
    for attempt, outcome in outcomes.items():
        if _name(outcome) == "StepSucceeded" and attempt[:2] in dispatched:
            line = ended.get(attempt)
            assert line is not None, f"{attempt}: a stored result from a call that never ended"
            assert line["outcome"] == "ok", f"{attempt}: a stored result no call returned"


def _check_after_kill(
    snap: Snapshot,
    raw: Mapping[UUID, list[tuple[int, str, bytes]]],
    events: Mapping[UUID, list[Any]],
    ledger: list[dict[str, Any]],
) -> None:
    """Each kill lost nothing stored, re-ran nothing finished, and counted each attempt it
    cut as failed (WorkerLost) before trying again."""
    for eid, before in snap.events.items():
        assert raw[eid][: len(before)] == before, f"{snap.label}: {eid}: stored events changed"
    for line in ledger[snap.ledger_lines :]:
        eid = UUID(line["eid"])
        if line["phase"] != "start":
            continue
        assert snap.execution_status.get(eid) not in _ENDED, (
            f"{snap.label}: {line['key']} ran after its execution ended"
        )
        status = snap.step(eid, line["key"])
        assert status not in FINISHED, (
            f"{snap.label}: {line['key']} ran again although it was {status} at the kill"
        )
    for eid, key, attempt in snap.running:
        outcome = _outcomes(events[eid]).get((key, attempt))
        assert _is_worker_lost(outcome), (
            f"{snap.label}: {key} attempt {attempt} was cut by the kill, but its outcome is "
            f"{outcome!r}, not WorkerLost"
        )
        if _name(outcome) == "StepRetryScheduled":
            assert any(
                (_name(e) == "StepStarted" and e.key == key and e.attempt == attempt + 1)
                or (_name(e) == "StepCancelled" and e.key == key)
                for e in events[eid]
            ), f"{snap.label}: {key} was neither tried again after attempt {attempt} nor cancelled"


_ENDED = frozenset(
    {
        ExecutionStatus.COMPLETED,
        ExecutionStatus.FAILED,
        ExecutionStatus.TIMED_OUT,
        ExecutionStatus.CANCELLED,
    }
)
