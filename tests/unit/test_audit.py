"""The hash chain (domain/audit.py): computed as events are made, and the pure verifier that
names each edited, deleted, inserted or reordered event."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import pytest
import test_execution_properties as properties
from eventsourcing.utils import get_topic
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowledger.domain.audit import (
    GENESIS,
    Finding,
    Problem,
    StoredRecord,
    canonical_content,
    event_hash,
    verify_chain,
)
from flowledger.domain.execution import Execution
from flowledger.domain.states import ExecutionStatus
from flowledger.domain.workflow import Workflow
from flowledger.services.app import FlowledgerApp
from flowledger.services.audit import audit_execution

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
EID = UUID("00000000-0000-0000-0000-00000000a0d1")
Records = list[StoredRecord]


def begin() -> Execution:
    return Execution.begin(EID, "wf", "1", {"k": 1}, None, 7, T0 + timedelta(hours=1), T0)


def run(ex: Execution, keys: str = "abc", finish: bool = True) -> Execution:
    for key in keys:
        ex.start_step(key, key, "", {"k": 1}, T0)
        ex.succeed_step(key, {"v": key, "score": 0.1 + 0.2}, {key: "é✓"}, T0)
    if finish:
        ex.finish(ExecutionStatus.COMPLETED, None, T0)
    return ex


def record(e: Any) -> StoredRecord:
    """A domain event as the store holds it (what eventsourcing's mapper writes)."""
    state = dict(vars(e))
    originator_id = state.pop("originator_id")
    version = state.pop("originator_version")
    state["class_version"] = type(e).class_version
    return StoredRecord(originator_id, version, get_topic(type(e)), state)


def history(keys: str = "abc") -> Records:
    """ExecutionStarted, (StepStarted, StepSucceeded) per key, ExecutionCompleted."""
    return [record(e) for e in run(begin(), keys).collect_events()]


def at(records: Records, version: int) -> StoredRecord:
    return next(r for r in records if r.version == version)


def edited(records: Records, version: int, **changes: Any) -> Records:
    return [
        dataclasses.replace(r, state={**(r.state or {}), **changes}) if r.version == version else r
        for r in records
    ]


def without(records: Records, *versions: int) -> Records:
    return [r for r in records if r.version not in versions]


def renumbered(records: Records, mapping: dict[int, int]) -> Records:
    return [dataclasses.replace(r, version=mapping.get(r.version, r.version)) for r in records]


def problems(records: Records) -> list[tuple[str, int, str | None]]:
    return [(f.problem.value, f.version, f.event_type) for f in verify_chain(records).findings]


# -- the hash ----------------------------------------------------------------------------


def test_every_event_carries_a_hash_chained_over_the_one_before() -> None:
    records = history()
    previous = GENESIS
    for r in records:
        state = dict(r.state or {})
        attributes = {k: v for k, v in state.items() if k not in ("hash", "class_version")}
        timestamp = attributes.pop("timestamp")
        expected = event_hash(previous, r.topic, r.originator_id, r.version, timestamp, attributes)
        assert r.hash == expected, r.event_type
        previous = expected


def test_the_canonical_content_is_sorted_compact_json_of_the_documented_document() -> None:
    moment = datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)
    attributes = {"z": [1.5, None, True], "a": {"y": "é", "b": 10**20}, "at": moment}
    body = json.dumps(
        {"z": [1.5, None, True], "a": {"y": "é", "b": 10**20}, "at": moment.isoformat()},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    content = canonical_content("m:Execution.X", EID, 3, moment, body)
    document = {
        "attributes": json.loads(body),
        "originator_id": str(EID),
        "originator_version": 3,
        "timestamp": moment.isoformat(),
        "topic": "m:Execution.X",
    }
    assert content == json.dumps(
        document, sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )
    digest = hashlib.sha256(f"{GENESIS}\n{content}".encode()).hexdigest()
    assert event_hash(None, "m:Execution.X", EID, 3, moment, attributes) == digest


def test_the_hash_is_pinned_so_it_is_the_same_in_every_process_and_python() -> None:
    # A known answer: if this changes, every stored chain stops verifying.
    moment = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    attributes = {"key": "a", "result": {"v": 0.1 + 0.2, "name": "Zoë"}, "at": moment}
    assert event_hash(GENESIS, "t:Execution.StepSucceeded", EID, 2, moment, attributes) == (
        "93cf8f2117717cb27c8582238122c0858196235d9e68e16ef01a056b2ee12648"
    )


def test_the_hash_does_not_depend_on_the_order_keys_were_inserted() -> None:
    one = event_hash(None, "t", EID, 1, T0, {"a": 1, "b": {"x": 1, "y": 2}})
    two = event_hash(None, "t", EID, 1, T0, {"b": {"y": 2, "x": 1}, "a": 1})
    assert one == two


def test_replaying_the_events_rebuilds_the_last_hash() -> None:
    ex = run(begin())
    events = ex.collect_events()
    rebuilt: Any = None
    for e in events:
        rebuilt = e.mutate(rebuilt)
    assert rebuilt.last_hash == ex.last_hash == events[-1].hash  # type: ignore[attr-defined]


def test_a_refused_command_computes_and_records_nothing() -> None:
    ex = run(begin())
    before = ex.last_hash
    with pytest.raises(Exception, match="execution is completed"):
        ex.start_step("x", "x", "", {}, T0)
    assert ex.last_hash == before


def test_the_hash_survives_the_stores_json_round_trip() -> None:
    app = FlowledgerApp(env={"PERSISTENCE_MODULE": "eventsourcing.popo"})
    try:
        app.save(run(begin()))
        stored = app.recorder.select_events(EID)
        records = [
            StoredRecord(
                s.originator_id,
                s.originator_version,
                s.topic,
                app.mapper.transcoder.decode(s.state),
            )
            for s in stored
        ]
    finally:
        app.close()
    report = verify_chain(records)
    assert report.ok, report.findings
    assert report.verified == len(records) == 8


def test_version_1_events_upcast_to_no_hash() -> None:
    state: dict[str, Any] = {"key": "a"}
    Execution.StepStarted.upcast_v1_v2(state)  # type: ignore[attr-defined]
    assert state == {"key": "a", "hash": None}


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(properties.workflows(), properties.inputs, st.integers(0, 2**63 - 1), st.data())
def test_every_history_the_commands_can_make_verifies_as_stored(
    wf: Workflow, data_in: dict[str, Any], seed: int, data: st.DataObject
) -> None:
    """Whatever commands ran, each stored as it was made (so nothing recorded is aliased
    and changed later), the stored chain verifies: through memory and through SQLite."""
    with properties.stores() as (memory, sqlite):
        run = properties.Run(wf, data_in, seed, (memory,))
        properties.explore(run, data, illegal=True)
        properties.drain(run, data)
        properties.retries(run, data)
        sqlite.save(*memory.repository.event_store.get(run.ex.id))
        for app in (memory, sqlite):
            report = audit_execution(app, run.ex.id)
            assert report.ok, report.findings
            assert report.verified == run.ex.version
            assert report.head == run.ex.last_hash


# -- the verifier ------------------------------------------------------------------------


def test_an_untouched_history_verifies() -> None:
    records = history()
    report = verify_chain(records)
    assert report.ok
    assert (report.events, report.verified, report.unverifiable) == (8, 8, 0)
    assert report.head == records[-1].hash


def test_an_edited_event_is_named() -> None:
    records = edited(history(), 3, result={"v": "forged"})
    assert problems(records) == [("edited", 3, "StepSucceeded")]
    assert "content does not match its hash" in verify_chain(records).findings[0].detail


def test_an_edited_last_event_is_named() -> None:
    records = edited(history(), 8, reason="forged")
    assert problems(records) == [("edited", 8, "ExecutionCompleted")]


def test_an_event_whose_hash_was_changed_is_named() -> None:
    records = edited(history(), 4, hash="f" * 64)
    [finding] = verify_chain(records).findings
    assert (finding.problem, finding.version, finding.detail) == (
        Problem.EDITED,
        4,
        "its hash was changed",
    )


def test_an_event_whose_hash_was_removed_is_named() -> None:
    records = history()
    state = {k: v for k, v in (at(records, 5).state or {}).items() if k != "hash"}
    records = [dataclasses.replace(r, state=state) if r.version == 5 else r for r in records]
    [finding] = verify_chain(records).findings
    assert (finding.problem, finding.version, finding.detail) == (
        Problem.EDITED,
        5,
        "its hash was removed",
    )


def test_an_unreadable_event_is_named_and_the_rest_still_checked() -> None:
    records = [dataclasses.replace(r, state=None) if r.version == 3 else r for r in history()]
    report = verify_chain(records)
    assert problems(records) == [("edited", 3, "StepSucceeded")]
    assert report.unchecked == [4]  # its predecessor cannot be read; 5 onwards verify
    assert report.verified == 6


def test_a_deleted_event_is_named_by_its_version() -> None:
    records = without(history(), 4)
    report = verify_chain(records)
    assert problems(records) == [("deleted", 4, None)]
    assert report.findings[0].detail == "version 4 is missing (deleted)"
    assert report.unchecked == [5]


def test_deleting_the_first_event_is_seen() -> None:
    assert problems(without(history(), 1)) == [("deleted", 1, None)]


def test_deleted_events_are_named_as_one_gap() -> None:
    [finding] = verify_chain(without(history(), 3, 4, 5)).findings
    assert (finding.problem, finding.version) == (Problem.DELETED, 3)
    assert finding.detail == "versions 3 to 5 are missing (deleted)"


def test_a_deletion_hidden_by_renumbering_the_rest_is_seen() -> None:
    records = renumbered(without(history(), 3), {4: 3, 5: 4, 6: 5, 7: 6, 8: 7})
    assert problems(records) == [
        ("deleted", 3, None),
        ("reordered", 3, "StepStarted"),
        ("reordered", 4, "StepSucceeded"),
        ("reordered", 5, "StepStarted"),
        ("reordered", 6, "StepSucceeded"),
        ("reordered", 7, "ExecutionCompleted"),
    ]


def test_an_inserted_copy_is_named_with_the_event_it_copies() -> None:
    records = history()
    records.append(dataclasses.replace(at(records, 2), version=9))
    [finding] = verify_chain(records).findings
    assert (finding.problem, finding.version, finding.event_type) == (
        Problem.INSERTED,
        9,
        "StepStarted",
    )
    assert finding.detail == "a copy of version 2"


def test_a_copy_inserted_in_the_middle_is_named_and_the_shift_shown() -> None:
    records = renumbered(history(), {v: v + 1 for v in range(4, 9)})
    records.append(dataclasses.replace(at(history(), 2), version=4))
    assert problems(records) == [
        ("inserted", 4, "StepStarted"),
        ("reordered", 5, "StepStarted"),
        ("reordered", 6, "StepSucceeded"),
        ("reordered", 7, "StepStarted"),
        ("reordered", 8, "StepSucceeded"),
        ("reordered", 9, "ExecutionCompleted"),
    ]


def test_a_fabricated_last_event_is_named() -> None:
    records = history()
    forged = dataclasses.replace(
        at(records, 8), version=9, state={**(at(records, 8).state or {}), "hash": "0" * 64}
    )
    assert problems([*records, forged]) == [("edited", 9, "ExecutionCompleted")]


def test_swapped_events_are_named_as_reordered() -> None:
    records = renumbered(history(), {4: 5, 5: 4})
    assert verify_chain(records).findings == [
        Finding(
            Problem.REORDERED, 4, "StepSucceeded", "stored as version 4, recorded as version 5"
        ),
        Finding(Problem.REORDERED, 5, "StepStarted", "stored as version 5, recorded as version 4"),
    ]


def test_events_moved_further_are_named_as_reordered() -> None:
    records = renumbered(history(), {2: 6, 6: 2})
    assert problems(records) == [
        ("reordered", 2, "StepStarted"),
        ("reordered", 6, "StepStarted"),
    ]


def test_several_kinds_of_tampering_in_one_history_are_each_named() -> None:
    records = edited(without(history("abcde"), 6), 3, result={"v": "forged"})
    records = renumbered(records, {9: 10, 10: 9})
    assert problems(records) == [
        ("edited", 3, "StepSucceeded"),
        ("deleted", 6, None),
        ("reordered", 9, "StepStarted"),
        ("reordered", 10, "StepSucceeded"),
    ]


# -- events recorded before hashing (class_version 1) ------------------------------------


def unhashed(r: StoredRecord) -> StoredRecord:
    """A record as version 1 stored it: no hash, no class_version."""
    state = {k: v for k, v in (r.state or {}).items() if k not in ("hash", "class_version")}
    return dataclasses.replace(r, state=state)


def v1_then_hashed() -> Records:
    """Three events stored before hashing, then the same execution carried on today."""
    old = run(begin(), "a", finish=False).collect_events()
    # What loading them does: the upcast gives each event hash None.
    ex: Any = None
    for e in old:
        ex = dataclasses.replace(e, hash=None).mutate(ex)
    assert ex.last_hash is None
    run(ex, "bc")
    return [*(unhashed(record(e)) for e in old), *(record(e) for e in ex.collect_events())]


def test_a_prefix_recorded_before_hashing_is_unverifiable_not_tampered() -> None:
    records = v1_then_hashed()
    report = verify_chain(records)
    assert report.ok, report.findings
    assert (report.unverifiable, report.verified, report.events) == (3, 5, 8)


def test_an_edit_in_the_unverifiable_prefix_cannot_be_seen_but_is_said_to_be_unverifiable() -> None:
    records = edited(v1_then_hashed(), 3, result={"v": "forged"})
    report = verify_chain(records)
    assert report.ok
    assert report.unverifiable == 3


def test_tampering_after_an_unverifiable_prefix_is_named() -> None:
    records = edited(without(v1_then_hashed(), 2), 5, result={"v": "forged"})
    assert problems(records) == [("deleted", 2, None), ("edited", 5, "StepSucceeded")]


def test_an_unhashed_event_after_hashed_ones_is_named() -> None:
    records = history()
    records[4] = unhashed(records[4])
    assert problems(records) == [("edited", 5, "StepSucceeded")]
    assert verify_chain(records).findings[0].detail == "its hash was removed"


@pytest.mark.parametrize(
    "tamper",
    [
        lambda rs: edited(rs, 2, key="zzz"),
        lambda rs: without(rs, 6),
        lambda rs: renumbered(rs, {3: 4, 4: 3}),
        lambda rs: [*rs, dataclasses.replace(rs[3], version=9)],
    ],
    ids=["edited", "deleted", "reordered", "inserted"],
)
def test_no_tampering_goes_unnamed(tamper: Callable[[Records], Records]) -> None:
    assert not verify_chain(tamper(history())).ok


def test_deleting_the_last_events_is_only_seen_against_a_head_kept_from_earlier() -> None:
    records = history()
    kept = records[-1].hash
    truncated = without(records, 7, 8)
    assert verify_chain(truncated).ok  # nothing after them vouches for them
    report = verify_chain(truncated, anchor=kept)
    assert [(f.problem, f.version) for f in report.findings] == [(Problem.DELETED, 7)]
    assert "kept from earlier is not in the chain" in report.findings[0].detail


def test_a_head_kept_from_earlier_is_found_in_a_longer_chain() -> None:
    records = history()
    report = verify_chain(records, anchor=records[4].hash)
    assert report.ok
    assert report.anchored_at == 5


def test_an_empty_history_has_nothing_to_verify() -> None:
    report = verify_chain([])
    assert report.ok
    assert report.events == 0
