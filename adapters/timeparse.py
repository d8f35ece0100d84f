"""Times and durations as users type them: `24h`, `7d`, `all`, or an ISO 8601 time."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from flowledger.domain.errors import InputInvalid

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}


def _duration(text: str) -> timedelta | None:
    """A number and a unit (s, m, h, d or w) as a timedelta; None if `text` is not one."""
    found = _DURATION.match(text.lower())
    if found is None:
        return None
    try:
        return timedelta(seconds=float(found[1]) * _UNITS[found[2]])
    except OverflowError:
        raise InputInvalid(f"{text!r} is longer than any time flowledger can count") from None


def parse_window(text: str, what: str = "--window") -> timedelta | None:
    """`all` (None), or a duration longer than zero: 1h, 24h, 7d ..."""
    if text.strip().lower() == "all":
        return None
    window = _duration(text)
    if window is None or window <= timedelta(0):
        raise InputInvalid(f"{what} {text!r}: give all, or a duration such as 1h, 24h or 7d")
    return window


def parse_moment(text: str, what: str, now: datetime) -> datetime:
    """An ISO 8601 time (UTC when it names no zone), or a duration before `now` (`24h`)."""
    ago = _duration(text)
    if ago is not None:
        try:
            return now - ago
        except OverflowError:
            raise InputInvalid(f"{what} {text!r} reaches back before the year 1") from None
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise InputInvalid(
            f"{what} {text!r} is neither an ISO time (2024-05-01T12:00:00Z) nor a duration (24h)"
        ) from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
