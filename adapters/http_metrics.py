"""Prometheus figures for `flowledger serve`: event counts from the store, and the engine's own.

Every figure is counted, none estimated: executions and steps are the events of those types
in the store (all processes, all time, so they survive restarts), commits and driven
executions are what this process's engine did. The text exposition format is written here
(it is a few lines; no client library needed).
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass

from eventsourcing.utils import get_topic

from flowledger.domain.execution import Execution
from flowledger.projections.runner import ProjectionStatus
from flowledger.services.app import FlowledgerApp

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_PAGE = 1000
ENDED = {
    "ExecutionCompleted": "completed",
    "ExecutionFailed": "failed",
    "ExecutionTimedOut": "timed_out",
    "ExecutionCancelled": "cancelled",
}
STEPS = {
    "StepSucceeded": ("flowledger_steps_succeeded_total", "Step attempts that succeeded."),
    "StepFailed": ("flowledger_steps_failed_total", "Step instances that failed for good."),
    "StepRetryScheduled": (
        "flowledger_steps_retried_total",
        "Failed attempts given a retry (StepRetryScheduled events).",
    ),
    "HumanTaskCompleted": (
        "flowledger_human_tasks_completed_total",
        "Human tasks answered by a person.",
    ),
    "StepServedFromCache": (
        "flowledger_steps_served_from_cache_total",
        "Step attempts served an earlier result from the step cache instead of running.",
    ),
}
COUNTED = ("ExecutionStarted", "ExecutionRetried", *ENDED, *STEPS)


class EventCounts:
    """How many events of each counted type the store holds, caught up on each read.

    Only the events stored since the last read are scanned. SQLite (and the in-memory
    store) number events in commit order, so a position, once passed, has no gaps to fill.
    """

    def __init__(self, app: FlowledgerApp) -> None:
        self.app = app
        self.position = 0
        self._counts: Counter[str] = Counter()
        self._topics = {get_topic(getattr(Execution, name)): name for name in COUNTED}
        self._lock = threading.Lock()  # reads run in worker threads, maybe two at once

    def refresh(self) -> dict[str, int]:
        """Count the events stored since the last refresh; returns every count (blocking I/O)."""
        with self._lock:
            while True:
                batch = self.app.recorder.select_notifications(
                    self.position + 1, _PAGE, topics=list(self._topics)
                )
                for n in batch:
                    self._counts[self._topics[n.topic]] += 1
                    self.position = max(self.position, n.id)
                if len(batch) < _PAGE:
                    break
            return {name: self._counts[name] for name in COUNTED}


@dataclass(frozen=True, slots=True)
class EngineFigures:
    """What the in-process engine did since this process started."""

    commits: int  # group commits (Committer.batches)
    driven: int  # executions it holds in memory and drives right now
    dormant: int  # executions waiting for a person or a distant timer, not in memory


def exposition(
    counts: dict[str, int],
    head: int,
    engine: EngineFigures | None,
    projections: list[ProjectionStatus],
) -> str:
    """The Prometheus text format (0.0.4) of the counts, the store head, the engine and the
    projections' positions."""
    lines: list[str] = []

    def metric(name: str, kind: str, doc: str, samples: list[tuple[str, int]]) -> None:
        lines.append(f"# HELP {name} {doc}")
        lines.append(f"# TYPE {name} {kind}")
        lines.extend(f"{name}{labels} {value}" for labels, value in samples)

    started = counts["ExecutionStarted"]
    retried = counts["ExecutionRetried"]
    ended = sum(counts[name] for name in ENDED)  # a retried execution can end more than once
    metric(
        "flowledger_executions_started_total",
        "counter",
        "Executions started (ExecutionStarted events in the store).",
        [("", started)],
    )
    metric(
        "flowledger_executions_ended_total",
        "counter",
        "Executions ended, by final status.",
        [(f'{{status="{status}"}}', counts[name]) for name, status in ENDED.items()],
    )
    metric(
        "flowledger_executions_retried_total",
        "counter",
        "Ended executions run again from their failed steps (ExecutionRetried events).",
        [("", retried)],
    )
    metric(
        "flowledger_executions_live",
        "gauge",
        "Executions started (or retried) and not yet ended.",
        [("", started + retried - ended)],
    )
    for event_name, (name, doc) in STEPS.items():
        metric(name, "counter", doc, [("", counts[event_name])])
    metric(
        "flowledger_store_position",
        "gauge",
        "The position (notification id) of the newest event in the store.",
        [("", head)],
    )
    metric(
        "flowledger_projection_position",
        "gauge",
        "The position (notification id) of the last event each projection applied.",
        [(f'{{projection="{p.name}"}}', p.position) for p in projections],
    )
    metric(
        "flowledger_projection_lag",
        "gauge",
        "Events stored that each projection has not applied yet.",
        [(f'{{projection="{p.name}"}}', p.lag) for p in projections],
    )
    if engine is not None:
        metric(
            "flowledger_engine_commits_total",
            "counter",
            "Group commits this process's engine made.",
            [("", engine.commits)],
        )
        metric(
            "flowledger_engine_executions_driven",
            "gauge",
            "Executions this process's engine drives now.",
            [("", engine.driven)],
        )
        metric(
            "flowledger_engine_executions_dormant",
            "gauge",
            "Executions this process's engine drives but holds out of memory until a person "
            "or a timer acts.",
            [("", engine.dormant)],
        )
    return "\n".join(lines) + "\n"
