"""Tamper evidence: the hash chain over an execution's events, and its verifier.

Every event of an execution carries `hash` = sha256(previous hash, "\\n", the event's
canonical content). The first event chains from GENESIS; so does the first hashed event
after a prefix recorded before hashing existed (class_version 1, `hash` None): such a
prefix is unverifiable, not tampered.

The canonical content is one JSON document with sorted keys, no whitespace and no ASCII
escaping (json.dumps's own float formatting), datetimes as ISO strings and UUIDs as
strings:

    {"attributes":{...every attribute but timestamp and hash...},
     "originator_id":"<uuid>","originator_version":N,"timestamp":"<iso>","topic":"<topic>"}

The chain is unkeyed: it shows edits, deletions, insertions and reorderings made without
recomputing the hashes that follow. Removing the last events, or rewriting a history and
rehashing everything after the change, needs an anchor kept elsewhere (the head hash that
`audit export` writes) to be seen.
"""

from __future__ import annotations

import bisect
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from typing import Any, Final
from uuid import UUID

GENESIS: Final = "0" * 64
# How far (in stored versions) the verifier looks for an event that moved; a move further
# than this is reported as the edits, deletions and insertions it looks like.
SEARCH_WINDOW: Final = 64
# Hashes the verifier may spend, beyond one per event, working out what happened where
# the chain breaks: a history rewritten throughout is then reported event by event as
# edited (still every broken link named) instead of searched for moves at length.
DIAGNOSIS_BUDGET: Final = 10_000
DIAGNOSIS_PER_EVENT: Final = 50
# Stored state keys that are not part of the hashed attributes.
_NOT_ATTRIBUTES: Final = frozenset({"hash", "class_version", "timestamp"})


# -- the hash --------------------------------------------------------------------------


def _default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, UUID | Decimal):
        return str(value)
    raise TypeError(f"an event attribute of type {type(value).__name__} cannot be hashed")


# One encoder, made once: json.dumps with options builds a new one on every call, which
# would be most of the cost of hashing an event.
_ENCODER: Final = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_default
)
_dumps: Final = _ENCODER.encode
_string: Final = json.encoder.encode_basestring  # what _ENCODER does to a str


def canonical_attributes(attributes: Mapping[str, Any]) -> str:
    """The attributes as canonical JSON (what the store's JSON round trip preserves)."""
    try:
        return _dumps(attributes)
    except TypeError:
        # Keys of mixed types cannot be sorted; the store keeps them as JSON strings, so
        # hash what the store will hold. Anything else that is not JSON raises again.
        return _dumps(json.loads(json.dumps(attributes, default=_default)))


def canonical_content(
    topic: str, originator_id: UUID | str, version: int, timestamp: datetime, attributes: str
) -> str:
    """The event's canonical content, given its attributes already as canonical JSON.

    Built by hand so the verifier can try other versions without re-encoding the
    attributes; equal to json.dumps of the document in the module docstring.
    """
    return (
        f'{{"attributes":{attributes},"originator_id":{_string(str(originator_id))},'
        f'"originator_version":{int(version)},"timestamp":{_string(timestamp.isoformat())},'
        f'"topic":{_string(topic)}}}'
    )


def chain(previous: str | None, content: str) -> str:
    """sha256 over the previous hash (GENESIS for None) and the canonical content."""
    data = f"{previous or GENESIS}\n{content}".encode("utf-8", "surrogatepass")
    return hashlib.sha256(data).hexdigest()


def event_hash(
    previous: str | None,
    topic: str,
    originator_id: UUID | str,
    version: int,
    timestamp: datetime,
    attributes: Mapping[str, Any],
) -> str:
    """The hash of an event: chained over `previous` and the event's canonical content."""
    body = canonical_attributes(attributes)
    return chain(previous, canonical_content(topic, originator_id, version, timestamp, body))


# -- the records the verifier reads ----------------------------------------------------


@dataclass(frozen=True)
class StoredRecord:
    """One stored event as the store holds it: decoded, not upcast, not trusted.

    `state` is None when the stored bytes could not be decoded at all.
    """

    originator_id: UUID | str
    version: int
    topic: str
    state: Mapping[str, Any] | None

    @property
    def event_type(self) -> str:
        """The event's class name (the last part of its topic)."""
        return self.topic.rpartition(":")[2].rpartition(".")[2] or self.topic

    @property
    def hash(self) -> str | None:
        """The hash the record claims (None: recorded before hashing, or removed)."""
        if self.state is None:
            return None
        value = self.state.get("hash")
        return value if isinstance(value, str) else None

    @property
    def class_version(self) -> int:
        """The class version the record was stored with (1 when absent)."""
        value = self.state.get("class_version", 1) if self.state is not None else 1
        return value if isinstance(value, int) else 1

    @property
    def timestamp(self) -> datetime | None:
        """The record's timestamp, when it is one."""
        value = self.state.get("timestamp") if self.state is not None else None
        return value if isinstance(value, datetime) else None


class Problem(StrEnum):
    """What happened to an event, as far as the chain can tell."""

    EDITED = "edited"
    DELETED = "deleted"
    INSERTED = "inserted"
    REORDERED = "reordered"


@dataclass(frozen=True)
class Finding:
    """One problem, naming the event by its stored version (for `deleted`: the missing one)."""

    problem: Problem
    version: int
    event_type: str | None
    detail: str


@dataclass
class AuditReport:
    """What the chain says about one execution's stored events."""

    originator_id: str
    events: int = 0
    unverifiable: int = 0  # the prefix recorded before hashing (class_version 1)
    verified: int = 0
    unchecked: list[int] = field(default_factory=list)  # right after a gap: no predecessor
    findings: list[Finding] = field(default_factory=list)
    head: str | None = None  # the last hash of the chain as stored
    approximate: bool = False  # the diagnosis budget ran out: some findings are coarser
    anchored_at: int | None = None  # the version whose hash is the anchor given, if any

    @property
    def ok(self) -> bool:
        """No finding."""
        return not self.findings


# -- the verifier ------------------------------------------------------------------------


@dataclass
class _Entry:
    record: StoredRecord
    body: str | None  # the attributes as canonical JSON; None when unreadable
    timestamp: datetime | None

    @property
    def version(self) -> int:
        return self.record.version

    @property
    def hash(self) -> str | None:
        return self.record.hash

    def hash_at(self, previous: str | None, version: int) -> str | None:
        """The hash this record would have as event `version` after `previous`."""
        if self.body is None or self.timestamp is None:
            return None
        content = canonical_content(
            self.record.topic, self.record.originator_id, version, self.timestamp, self.body
        )
        return chain(previous, content)

    def fits(self, previous: str | None, version: int) -> bool:
        """Whether the record's own hash says it is event `version` after `previous`."""
        return self.hash is not None and self.hash_at(previous, version) == self.hash


def _entry(record: StoredRecord) -> _Entry:
    state, body = record.state, None
    timestamp = record.timestamp
    if state is not None and timestamp is not None:
        attributes = {k: v for k, v in state.items() if k not in _NOT_ATTRIBUTES}
        try:
            body = canonical_attributes(attributes)
        except (TypeError, ValueError):
            body = None
    return _Entry(record, body, timestamp)


def verify_chain(records: Iterable[StoredRecord], anchor: str | None = None) -> AuditReport:
    """Check one execution's stored events against their hash chain; name each problem.

    `anchor` is a head hash kept from earlier (an export's last hash): it must still be in
    the chain, which is how events deleted from the end, that no later hash vouches for,
    are seen.
    """
    ordered = sorted(records, key=lambda r: r.version)
    report = AuditReport(str(ordered[0].originator_id) if ordered else "", events=len(ordered))
    if not ordered:
        return report
    prefix = 0
    while prefix < len(ordered) and _unhashed_v1(ordered[prefix]):
        prefix += 1
    report.unverifiable = prefix
    expected = 1
    for record in ordered[:prefix]:
        if record.version != expected:
            _gap(report, expected, record.version)
        expected = record.version + 1
    _Walk(report, [_entry(r) for r in ordered[prefix:]], expected).run()
    hashed = [r.hash for r in ordered if r.hash is not None]
    report.head = hashed[-1] if hashed else None
    if anchor is not None:
        report.anchored_at = next((r.version for r in ordered if r.hash == anchor), None)
        if report.anchored_at is None:
            detail = (
                f"the head {anchor} kept from earlier is not in the chain: events up to it "
                "were deleted, or the history was rewritten"
            )
            report.findings.append(Finding(Problem.DELETED, ordered[-1].version + 1, None, detail))
    report.findings.sort(key=lambda f: (f.version, f.problem.value))
    return report


def _unhashed_v1(record: StoredRecord) -> bool:
    return record.state is not None and record.class_version < 2 and record.hash is None


def _gap(report: AuditReport, first: int, after: int) -> None:
    missing = (
        f"version {first} is missing"
        if after - first == 1
        else f"versions {first} to {after - 1} are missing"
    )
    report.findings.append(Finding(Problem.DELETED, first, None, f"{missing} (deleted)"))


class _Walk:
    """Follow the chain from GENESIS, placing each stored record at the version its hash
    says it was recorded as; where the chain breaks, work out why.

    In an untouched history each record is found where it is stored, with one hash each.
    """

    def __init__(self, report: AuditReport, entries: list[_Entry], start: int) -> None:
        self.report = report
        self.entries = entries
        self.versions = [e.version for e in entries]
        self.unplaced = set(range(len(entries)))
        self.placed_hashes: dict[str, int] = {}  # claimed hash -> the version recorded as
        self.by_hash: dict[str, list[int]] = {}
        for i, entry in enumerate(entries):
            if entry.hash is not None:
                self.by_hash.setdefault(entry.hash, []).append(i)
        self.previous: str | None = GENESIS  # None: unknown (its event cannot be read)
        self.next_version = start
        self.spare = DIAGNOSIS_BUDGET + DIAGNOSIS_PER_EVENT * len(entries)

    def run(self) -> None:
        while self.unplaced:
            u = self.next_version
            found = None
            if self.previous is not None:
                here = self._stored_at(u)
                # The one hash an untouched event costs; searching further is diagnosis.
                if here is not None and self.entries[here].fits(self.previous, u):
                    found = here
                else:
                    found = self._find(self.previous, u, skip=here)
            if found is not None:
                self.report.verified += 1
                self._place(found, u)
            else:
                self._broken(u)

    def _place(self, i: int, version: int, chained: str | None = None) -> None:
        """Record `i` is event `version`; the chain goes on from `chained` (its own hash)."""
        entry = self.entries[i]
        self.unplaced.discard(i)
        if entry.version != version:
            detail = f"stored as version {entry.version}, recorded as version {version}"
            self._finding(Problem.REORDERED, entry, detail)
        if entry.hash is not None:
            self.placed_hashes.setdefault(entry.hash, version)
        self.previous = chained if chained is not None else entry.hash
        self.next_version = version + 1

    # -- where the chain breaks --------------------------------------------------------

    def _broken(self, u: int) -> None:
        """No stored record is event `u` after the current hash."""
        here = self._stored_at(u)
        if here is None or self.previous is None:
            self._resync(u, here)
            return
        entry = self.entries[here]
        if self._holds_its_place(here, u) or self._inserted(here) or self._relocated(here, u):
            return
        if len(self.unplaced) == 1:
            self.unplaced.discard(here)
            detail = f"does not follow from version {u - 1} (edited, or inserted)"
            self._finding(Problem.EDITED, entry, detail)
            return
        # Its successor does not link to it either: this one was edited, and so was the
        # next (or its hash); go on from the hash this one claims.
        self._finding(Problem.EDITED, entry, "its content does not match its hash")
        self._place(here, u)

    def _holds_its_place(self, here: int, u: int) -> bool:
        """The record stored at `u` is event `u`, edited: its successor links to it."""
        entry = self.entries[here]
        if entry.record.state is None:
            self._finding(Problem.EDITED, entry, "its stored state cannot be read")
            self._place(here, u)
            self.previous = None
            return True
        if entry.hash is not None and self._find(entry.hash, u + 1, skip=here) is not None:
            self._finding(Problem.EDITED, entry, "its content does not match its hash")
            self._place(here, u)
            return True
        recomputed = entry.hash_at(self.previous, u)
        if recomputed is None:
            return False
        links = self._find(recomputed, u + 1, skip=here) is not None
        if entry.hash is None and (links or len(self.unplaced) == 1):
            detail = "its hash was removed"
        elif links:
            detail = "its hash was changed"
        else:
            return False
        self._finding(Problem.EDITED, entry, detail)
        self._place(here, u, chained=recomputed)
        return True

    def _inserted(self, i: int) -> bool:
        """Record `i` repeats an event found elsewhere in the chain."""
        entry = self.entries[i]
        copy = self._copy_of(i)
        if copy is None:
            return False
        self.unplaced.discard(i)
        self._finding(Problem.INSERTED, entry, f"a copy of version {copy}")
        return True

    def _relocated(self, i: int, u: int) -> bool:
        """Record `i`, stored at `u`, was recorded later: the events between were deleted."""
        origin = self._origin(i)
        if origin is None or origin <= u:
            return False
        _gap(self.report, u, origin)
        self._place(i, origin)
        self.report.unchecked.append(origin)
        return True

    def _resync(self, u: int, here: int | None) -> None:
        """Nothing is stored at `u`, or what comes before it cannot be read: restart the
        chain at the next stored record, at the version its successor gives it."""
        i = here if here is not None else self._next_stored(u)
        if i is None:
            # Only records stored before `u` are left: none of them is in the chain.
            for j in sorted(self.unplaced):
                if not self._inserted(j):
                    self.unplaced.discard(j)
                    self._finding(Problem.INSERTED, self.entries[j], "not in the chain")
            return
        if self._inserted(i):
            return
        entry = self.entries[i]
        origin = self._origin(i)
        if origin is None or origin < u:
            origin = max(entry.version, u)
        if origin > u:
            _gap(self.report, u, origin)
        self._place(i, origin)
        if entry.record.state is None:
            self._finding(Problem.EDITED, entry, "its stored state cannot be read")
            self.previous = None
        else:
            self.report.unchecked.append(origin)

    # -- lookups -----------------------------------------------------------------------

    def _find(self, previous: str, version: int, skip: int | None = None) -> int | None:
        """The unplaced record whose hash makes it event `version` after `previous`:
        the one stored at `version` first, then its neighbours."""
        if self.spare <= 0:
            self.report.approximate = True
            return None
        for i in self._near(version):
            if i != skip and self._try(i, previous, version):
                return i
        return None

    def _try(self, i: int, previous: str, version: int) -> bool:
        if self.spare <= 0:
            self.report.approximate = True
            return False
        self.spare -= 1
        return self.entries[i].fits(previous, version)

    def _near(self, version: int) -> list[int]:
        centre = bisect.bisect_left(self.versions, version)
        lo, hi = max(0, centre - SEARCH_WINDOW), min(len(self.entries), centre + SEARCH_WINDOW)
        near = [i for i in range(lo, hi) if i in self.unplaced]
        near.sort(key=lambda i: (abs(self.versions[i] - version), self.versions[i]))
        return near

    def _stored_at(self, version: int) -> int | None:
        i = bisect.bisect_left(self.versions, version)
        if i < len(self.versions) and self.versions[i] == version and i in self.unplaced:
            return i
        return None

    def _next_stored(self, version: int) -> int | None:
        later = [i for i in self.unplaced if self.versions[i] >= version]
        return min(later, key=lambda i: self.versions[i]) if later else None

    def _origin(self, i: int) -> int | None:
        """The version record `i` was recorded as, told by the record that links to it."""
        entry = self.entries[i]
        if entry.hash is None:
            return None
        window = range(-SEARCH_WINDOW, SEARCH_WINDOW)
        candidates = dict.fromkeys(
            [
                entry.version,
                *(entry.version + d for d in window),
                *(self.next_version + d for d in window),
            ]
        )
        for version in candidates:
            if version >= 1 and self._find(entry.hash, version + 1, skip=i) is not None:
                return version
        return None

    def _copy_of(self, i: int) -> int | None:
        """The version of the event record `i` duplicates (same hash), if any.

        The original is the one already placed, or the one stored where its hash says."""
        claimed = self.entries[i].hash
        if claimed is None:
            return None
        if claimed in self.placed_hashes:
            return self.placed_hashes[claimed]
        for j in self.by_hash.get(claimed, []):
            if j != i and j in self.unplaced:
                origin = self._origin(j)
                if origin is not None and origin == self.versions[j] != self.versions[i]:
                    return origin
        return None

    def _finding(self, problem: Problem, entry: _Entry, detail: str) -> None:
        self.report.findings.append(
            Finding(problem, entry.version, entry.record.event_type, detail)
        )
