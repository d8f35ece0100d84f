"""The PostgreSQL backend of the views: the application's datastore, the same statements.

Imported only when the application's store is PostgreSQL (it needs psycopg).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

from eventsourcing.persistence import IntegrityError, Tracking
from eventsourcing.postgres import PostgresDatastore, PostgresTrackingRecorder
from psycopg.sql import SQL, Identifier

from flowledger.projections.store import ViewRecorder

_PARAMETER = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")


class PostgresViews(ViewRecorder, PostgresTrackingRecorder):
    """The PostgreSQL backend: tables in the store's schema, psycopg's parameter style."""

    def __init__(self, datastore: PostgresDatastore, **_: Any) -> None:
        # eventsourcing's PostgresFactory passes tracking_table_name="<projection>_tracking":
        # the name this view gives its tracking table anyway.
        super().__init__(datastore, tracking_table_name=f"{self.name}_tracking")
        self._spelled: dict[str, str] = {}
        self._search_path = SQL("SET LOCAL search_path TO {}").format(Identifier(datastore.schema))
        self._advance = self.spell(
            f"INSERT INTO {self.tracking_table} (application_name, notification_id) "
            "VALUES (:application_name, :notification_id) "
            "ON CONFLICT (application_name) DO UPDATE SET notification_id = :notification_id "
            f"WHERE {self.tracking_table}.notification_id < :notification_id "
            "RETURNING notification_id"
        )

    def create_table(self) -> None:
        with self.begin(commit=True) as cursor:
            for statement in (self.tracking_schema(), *self.schema):
                cursor.execute(statement)

    @contextmanager
    def _transaction(self, commit: bool) -> Iterator[Any]:
        # Unqualified table names resolve in the store's schema (POSTGRES_SCHEMA).
        with self.datastore.transaction(commit=commit) as cursor:
            cursor.execute(self._search_path)
            yield cursor

    def begin(self, *, commit: bool) -> AbstractContextManager[Any]:
        return self._transaction(commit)

    def record_tracking(self, cursor: Any, tracking: Tracking) -> None:
        cursor.execute(
            self._advance,
            {
                "application_name": tracking.application_name,
                "notification_id": tracking.notification_id,
            },
        )
        if cursor.fetchone() is None:
            raise IntegrityError(
                f"{self.name} has already recorded {tracking.application_name} "
                f"position {tracking.notification_id}"
            )

    def spell(self, statement: str) -> str:
        spelled = self._spelled.get(statement)
        if spelled is None:
            spelled = _PARAMETER.sub(r"%(\1)s", statement)
            self._spelled[statement] = spelled
        return spelled
