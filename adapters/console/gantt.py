"""The timeline of one execution as a Gantt chart: one lane per step instance, a bar per
attempt, retry delay, wait and compensation, folded from the run view's timeline rows.

A bar starts when its step instance enters an active status (running, retrying, waiting)
and ends at the instance's next move; the bar's status is the one that move led to, except
that an attempt a retry follows is "failed", and a bar nothing ended yet keeps the status
it is in (running, retrying or waiting) and is marked open.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from flowledger.adapters.console.svg import attrs, esc, num, token
from flowledger.projections.runs import TimelineEntry

LABEL_W = 240.0  # the lane labels' column
CHART_W = 900.0
AXIS_H = 28.0
LANE_H = 22.0
BAR_H = 14.0
MIN_BAR_W = 2.0  # an instant still shows
MARGIN = 8.0
LABEL_CHARS = 32
TICKS = 5

_KINDS = {"running": "attempt", "retrying": "retry_delay", "waiting": "waiting"}
# Events drawn as a dot: instant ends (skipped, chosen, cached, recovered, compensated).
_MARKS = frozenset(
    {"StepSkipped", "BranchSelected", "StepServedFromCache", "StepRecovered", "StepCompensated"}
)
_ENDED = frozenset({"completed", "failed", "timed_out", "cancelled"})


@dataclass(frozen=True)
class Bar:
    """A stretch of one step instance's life, in seconds from the execution's start."""

    key: str
    kind: str  # "attempt", "retry_delay", "waiting" or "compensation"
    start: float
    end: float
    status: str  # the status the instance moved to when the bar ended; while open, its own
    attempt: int | None  # None for a retry delay (it lies between two attempts)
    open: bool = False  # nothing ended it yet: it runs to `now`


@dataclass(frozen=True)
class Mark:
    """An instant move of a step instance, drawn as a dot."""

    key: str
    at: float
    event: str
    status: str


@dataclass(frozen=True)
class Lane:
    """One step instance (a step key) and what happened to it."""

    key: str
    role: str  # "step", "on_error" (an error handler) or "rollback" (a compensation)
    bars: tuple[Bar, ...]
    marks: tuple[Mark, ...]


@dataclass(frozen=True)
class GanttChart:
    """The lanes of an execution, in order of first appearance, over `span` seconds."""

    lanes: tuple[Lane, ...]
    span: float

    def lane(self, key: str) -> Lane:
        """The lane of a step key; KeyError if there is none."""
        for lane in self.lanes:
            if lane.key == key:
                return lane
        raise KeyError(key)

    @property
    def bars(self) -> list[Bar]:
        """Every bar, lane by lane."""
        return [bar for lane in self.lanes for bar in lane.bars]


@dataclass
class _Segment:
    kind: str
    start: float
    attempt: int | None
    entered: str  # the status that opened it


@dataclass
class _LaneFold:
    """A lane while the entries are folded in: at most one segment open at a time."""

    key: str
    role: str = "step"
    attempt: int = 0
    current: _Segment | None = None
    bars: list[Bar] = field(default_factory=list)
    marks: list[Mark] = field(default_factory=list)

    def enter(self, status: str, at: float, attempt: object) -> None:
        kind = _KINDS.get(status)
        if kind is None:
            return
        if kind != "retry_delay":
            # The events number attempts (on across an execution retry); count if not.
            self.attempt = attempt if isinstance(attempt, int) else self.attempt + 1
        if kind == "attempt" and self.role == "rollback":
            kind = "compensation"
        number = None if kind == "retry_delay" else self.attempt
        self.current = _Segment(kind, at, number, status)

    def leave(self, status: str, at: float) -> None:
        segment, self.current = self.current, None
        if segment is None:
            return
        if status == "retrying" and segment.kind != "retry_delay":
            status = "failed"  # the attempt failed; the retry delay that follows says the rest
        self.bars.append(Bar(self.key, segment.kind, segment.start, at, status, segment.attempt))

    def close_open(self, at: float) -> None:
        segment, self.current = self.current, None
        if segment is not None:
            end = max(at, segment.start)
            bar = Bar(self.key, segment.kind, segment.start, end, segment.entered, segment.attempt)
            self.bars.append(replace(bar, open=True))


def gantt_bars(entries: Sequence[TimelineEntry], now: datetime) -> GanttChart:
    """Fold an execution's timeline into lanes of bars; bars still open end at `now`."""
    if not entries:
        return GanttChart((), 0.0)
    start = min(_moment(e.at) for e in entries)
    lanes: dict[str, _LaneFold] = {}
    ended: float | None = None
    last = 0.0
    for entry in entries:
        at = (_moment(entry.at) - start).total_seconds()
        last = max(last, at)
        if entry.step_key is None:
            if entry.status_to is not None:
                ended = at if entry.status_to in _ENDED else None
            if entry.event == "ExecutionRetried":
                # A resumed container runs on without a step event of its own.
                for key in entry.detail.get("resumed") or []:
                    lane = lanes.setdefault(key, _LaneFold(key))
                    lane.enter("running", at, lane.attempt)
            continue
        lane = lanes.setdefault(entry.step_key, _LaneFold(entry.step_key))
        _apply(lane, entry, at)
        if entry.event == "BranchSelected":
            # The branches not taken are skipped by the condition's event, not their own.
            for skipped_key, *_ in entry.detail.get("skipped") or []:
                other = lanes.setdefault(skipped_key, _LaneFold(skipped_key))
                other.marks.append(Mark(skipped_key, at, entry.event, "skipped"))
    # An execution that ended stopped its steps then, whatever the clock says now.
    close_at = ended if ended is not None else max((_moment(now) - start).total_seconds(), last)
    for lane in lanes.values():
        lane.close_open(close_at)
    span = max([last, *(b.end for lane in lanes.values() for b in lane.bars)])
    return GanttChart(
        tuple(Lane(k, f.role, tuple(f.bars), tuple(f.marks)) for k, f in lanes.items()), span
    )


def _apply(lane: _LaneFold, entry: TimelineEntry, at: float) -> None:
    if entry.event == "StepStarted" and entry.detail.get("kind") in ("on_error", "rollback"):
        lane.role = str(entry.detail["kind"])
    if entry.event in _MARKS:
        failed = entry.detail.get("ok") is False  # a rollback action failed for good
        status = entry.status_to or ("failed" if failed else "")
        lane.marks.append(Mark(lane.key, at, entry.event, status))
    if entry.status_to is None:
        return  # timers firing, loop iterations: no move of the instance itself
    lane.leave(entry.status_to, at)
    lane.enter(entry.status_to, at, entry.detail.get("attempt"))


def _moment(value: str | datetime) -> datetime:
    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


# -- SVG -----------------------------------------------------------------------------------


def render_gantt(chart: GanttChart) -> str:
    """The chart as an `<svg class="gantt">` element."""
    span = chart.span if chart.span > 0 else 1.0
    width = LABEL_W + CHART_W + 2 * MARGIN
    height = AXIS_H + LANE_H * len(chart.lanes) + MARGIN

    def x(seconds: float) -> float:
        return MARGIN + LABEL_W + seconds / span * CHART_W

    parts = [
        "<svg"
        + attrs(
            {
                "class": "gantt",
                "viewBox": f"0 0 {num(width)} {num(height)}",
                "width": num(width),
                "height": num(height),
                "role": "img",
                "aria-label": "execution timeline",
                "xmlns": "http://www.w3.org/2000/svg",
                "font-size": "12",
            }
        )
        + ">",
        '<g class="axis">',
    ]
    step = _tick_step(span)
    decimals = max(0, -math.floor(math.log10(step)))
    for tick in [i * step for i in range(int(span / step + 1e-9) + 1)]:
        parts.append(
            f'<line class="tick" x1="{num(x(tick))}" y1="{num(AXIS_H - 4)}" '
            f'x2="{num(x(tick))}" y2="{num(height - MARGIN)}" stroke="currentColor" '
            'stroke-width="0.5"/>'
            f'<text class="tick-label" x="{num(x(tick))}" y="{num(AXIS_H - 8)}" '
            f'text-anchor="middle">{tick:.{decimals}f} s</text>'
        )
    parts.append("</g>")
    for index, lane in enumerate(chart.lanes):
        top = AXIS_H + index * LANE_H
        parts.append(_lane(lane, top, x))
    parts.append("</svg>")
    return "".join(parts)


def _lane(lane: Lane, top: float, x: Callable[[float], float]) -> str:
    label = lane.key if len(lane.key) <= LABEL_CHARS else _tail(lane.key)
    parts = [
        "<g" + attrs({"class": f"lane role-{token(lane.role)}", "data-key": lane.key}) + ">",
        f'<text class="lane-label" x="{num(MARGIN)}" y="{num(top + LANE_H / 2 + 4)}">'
        + (f"<title>{esc(lane.key)}</title>" if label != lane.key else "")
        + f"{esc(label)}</text>",
    ]
    y = top + (LANE_H - BAR_H) / 2
    for bar in lane.bars:
        left = x(bar.start)
        classes = f"bar kind-{token(bar.kind)} status-{token(bar.status)}"
        parts.append(
            "<rect"
            + attrs(
                {
                    "class": classes + (" open" if bar.open else ""),
                    "data-key": bar.key,
                    "data-kind": bar.kind,
                    "data-status": bar.status,
                    "data-attempt": "" if bar.attempt is None else str(bar.attempt),
                    "x": num(left),
                    "y": num(y),
                    "width": num(max(x(bar.end) - left, MIN_BAR_W)),
                    "height": num(BAR_H),
                    "rx": "2",
                }
            )
            + f"><title>{esc(bar_title(bar))}</title></rect>"
        )
    for mark in lane.marks:
        parts.append(
            "<circle"
            + attrs(
                {
                    "class": f"mark status-{token(mark.status or 'none')}",
                    "data-key": mark.key,
                    "data-event": mark.event,
                    "data-status": mark.status,
                    "cx": num(x(mark.at)),
                    "cy": num(top + LANE_H / 2),
                    "r": "4",
                }
            )
            + f"><title>{esc(f'{mark.event} of {mark.key} at {seconds(mark.at)}')}</title>"
            "</circle>"
        )
    parts.append("</g>")
    return "".join(parts)


def bar_title(bar: Bar) -> str:
    """What a bar's tooltip says, e.g. "attempt 2 of ocr: 0.41 s from +1.20 s, completed"."""
    what = {
        "attempt": f"attempt {bar.attempt}",
        "retry_delay": "retry delay",
        "waiting": f"waiting (attempt {bar.attempt})",
        "compensation": f"compensation (attempt {bar.attempt})",
    }.get(bar.kind, bar.kind)
    still = ", so far" if bar.open else ""
    return (
        f"{what} of {bar.key}: {seconds(bar.end - bar.start)}{still} "
        f"from +{seconds(bar.start)}, {bar.status}"
    )


def seconds(value: float) -> str:
    """A duration for people: "0.41 s", "125 s", "0.3 ms"."""
    if value >= 100:
        return f"{value:.0f} s"
    if value >= 0.01 or value == 0:
        return f"{value:.2f} s"
    return f"{value * 1000:.1f} ms"


def _tick_step(span: float) -> float:
    """About TICKS ticks over `span`, each a round step: 1, 2 or 5 times a power of ten."""
    raw = span / TICKS
    power = 10.0 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= raw)


def _tail(text: str) -> str:
    # A long key's end names the step (the start is its loop or owner): keep the end.
    return "\u2026" + text[-(LABEL_CHARS - 1) :]
