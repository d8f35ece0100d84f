"""The PostgreSQL recorder that saves in one round trip (adapters/postgres_recorder.py):
the same table, ids and guarantees as eventsourcing's."""

from __future__ import annotations

import threading
from typing import Any
from uuid import uuid4

import pytest
from eventsourcing.persistence import IntegrityError, StoredEvent

from flowledger.adapters.postgres_recorder import OneTripRecorder
from flowledger.services.app import FlowledgerApp


def _event(originator: Any, version: int) -> StoredEvent:
    return StoredEvent(originator, version, "test:Event", b"{}")


def test_a_save_returns_its_notification_ids_and_a_conflict_stores_nothing(
    postgres_env: dict[str, str],
) -> None:
    app = FlowledgerApp(env=postgres_env)
    try:
        recorder = app.recorder
        assert isinstance(recorder, OneTripRecorder)
        a, b = uuid4(), uuid4()
        assert list(recorder.insert_events([_event(a, 1), _event(a, 2)])) == [1, 2]

        with pytest.raises(IntegrityError):  # b's row is new, a's version 2 is not
            recorder.insert_events([_event(b, 1), _event(a, 2)])

        assert recorder.select_events(b) == []
        assert [e.originator_version for e in recorder.select_events(a)] == [1, 2]
        (later,) = recorder.insert_events([_event(b, 1)])
        assert later > 2
    finally:
        app.close()


def test_concurrent_writers_leave_a_log_in_commit_order(postgres_env: dict[str, str]) -> None:
    """Each writer's saves appear in its own order, and no id shows up below one already
    read (the table lock makes commit order the id order)."""
    writers, saves = 4, 40
    apps = [FlowledgerApp(env=postgres_env) for _ in range(writers)]
    originators = [uuid4() for _ in range(writers)]
    seen: list[int] = []
    done = threading.Event()

    def write(n: int) -> None:
        for version in range(1, saves + 1):
            apps[n].recorder.insert_events([_event(originators[n], version)])

    def read() -> None:  # tails the log while the writers write, as a projection does
        position = 0
        while True:
            finished = done.is_set()
            for notification in apps[0].recorder.select_notifications(position + 1, 100):
                seen.append(notification.id)
                position = notification.id
            if finished:
                return

    try:
        threads = [threading.Thread(target=write, args=(n,)) for n in range(writers)]
        reader = threading.Thread(target=read)
        reader.start()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        done.set()
        reader.join()

        log = apps[0].recorder.select_notifications(1, writers * saves + 1)
        assert [n.id for n in log] == list(range(1, writers * saves + 1))  # gapless
        for originator in originators:
            versions = [n.originator_version for n in log if n.originator_id == originator]
            assert versions == list(range(1, saves + 1))
        assert seen == list(range(1, writers * saves + 1))  # the tail missed nothing
    finally:
        for app in apps:
            app.close()


def test_applications_opened_at_once_create_the_tables_once(
    postgres_env: dict[str, str],
) -> None:
    errors: list[BaseException] = []
    apps: list[FlowledgerApp] = []

    def open_app() -> None:
        try:
            apps.append(FlowledgerApp(env=postgres_env))
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=open_app) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert errors == []
        assert list(apps[0].recorder.insert_events([_event(uuid4(), 1)])) == [1]
    finally:
        for app in apps:
            app.close()
