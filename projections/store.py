"""The tables under the views: one schema and one set of statements for SQLite and PostgreSQL.

A view is an eventsourcing `TrackingRecorder`: its rows and the tracking record of the
events they were made from are written in one transaction, so an event is applied once or
not at all. The statements are written once, with `:name` parameters and types both
databases accept (TEXT, BIGINT, INTEGER); a backend class only says how to open a
transaction, how to record tracking, and how to spell parameters. `SQLiteViews` here is
one such class, `projections/postgres.py` the other.

Each view keeps its position in its own tracking table (`<name>_tracking`, as
eventsourcing's PostgreSQL factory names it), so two views in one database never share a
tracking row.
"""

from __future__ import annotations

import threading
import weakref
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from functools import cache
from typing import Any, ClassVar, TypeVar, cast
from uuid import uuid4

from eventsourcing.application import Application
from eventsourcing.persistence import IntegrityError, Tracking, TrackingRecorder
from eventsourcing.sqlite import SQLiteDatastore, SQLiteTrackingRecorder

Row = dict[str, Any]
V = TypeVar("V", bound="ViewRecorder")


class Tx:
    """The statements of one transaction on a view (rows and tracking together)."""

    def __init__(self, view: ViewRecorder, cursor: Any) -> None:
        self._view = view
        self._cursor = cursor
        self._claimed = False
        self._pending: Tracking | None = None

    def execute(self, statement: str, **params: Any) -> None:
        """Run a statement written with `:name` parameters."""
        self._cursor.execute(self._view.spell(statement), params)

    def one(self, statement: str, **params: Any) -> Row | None:
        """The first row of a query, or None."""
        self.execute(statement, **params)
        row = self._cursor.fetchone()
        return dict(row) if row is not None else None

    def all(self, statement: str, **params: Any) -> list[Row]:
        """Every row of a query."""
        self.execute(statement, **params)
        return [dict(row) for row in self._cursor.fetchall()]

    def track(self, tracking: Tracking) -> None:
        """Record the position; IntegrityError if the view already has it (or a later one).

        The first position of a transaction is recorded at once (a runner racing on the
        same view fails here, before it writes anything); later ones, the positions of
        the rest of a batch, only as the transaction ends: one row update, not one each.
        """
        if not self._claimed:
            self._view.record_tracking(self._cursor, tracking)
            self._claimed = True
        else:
            self._pending = tracking

    def flush(self) -> None:
        """Record the last position tracked, if it is not recorded yet."""
        if self._pending is not None:
            self._view.record_tracking(self._cursor, self._pending)
            self._pending = None


class ViewRecorder(TrackingRecorder, ABC):
    """A materialised view: its tables and its tracking record, in one database."""

    name: ClassVar[str]
    """Names the view's tables (`<name>_...`) and its tracking table."""
    schema: ClassVar[tuple[str, ...]]
    """CREATE TABLE / CREATE INDEX statements, each IF NOT EXISTS."""
    tables: ClassVar[tuple[str, ...]]
    """The view's tables, emptied by a rebuild."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._local = threading.local()
        super().__init__(*args, **kwargs)

    @property
    def tracking_table(self) -> str:
        """Where this view records the position it has reached."""
        return f"{self.name}_tracking"

    # -- what a backend provides ---------------------------------------------------------

    @abstractmethod
    def begin(self, *, commit: bool) -> AbstractContextManager[Any]:
        """A transaction's cursor: committed on exit (rolled back if `commit` is False)."""

    @abstractmethod
    def record_tracking(self, cursor: Any, tracking: Tracking) -> None:
        """Insert or advance the tracking row; IntegrityError unless it moves forward."""

    @abstractmethod
    def spell(self, statement: str) -> str:
        """The statement with its `:name` parameters in the driver's style."""

    @abstractmethod
    def create_table(self) -> None:
        """Create the tracking table and the view's tables if they do not exist."""

    # -- transactions --------------------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[Tx]:
        """One write transaction; nested calls (in this thread) join the outer one."""
        current: Tx | None = getattr(self._local, "tx", None)
        if current is not None:
            yield current
            return
        with self.begin(commit=True) as cursor:
            tx = Tx(self, cursor)
            self._local.tx = tx
            try:
                yield tx
                tx.flush()  # before the commit: the rows and their position together
            finally:
                self._local.tx = None

    @contextmanager
    def reading(self) -> Iterator[Tx]:
        """A read-only transaction: one consistent snapshot for several queries."""
        with self.begin(commit=False) as cursor:
            yield Tx(self, cursor)

    def query(self, statement: str, **params: Any) -> list[Row]:
        """Every row of one query."""
        with self.reading() as tx:
            return tx.all(statement, **params)

    # -- TrackingRecorder ----------------------------------------------------------------

    def insert_tracking(self, tracking: Tracking) -> None:
        """Record a position (in the current transaction, if one is open)."""
        with self.transaction() as tx:
            tx.track(tracking)

    def max_tracking_id(self, application_name: str) -> int | None:
        """The position this view has reached in the application's log, if any."""
        rows = self.query(
            f"SELECT notification_id FROM {self.tracking_table} "
            "WHERE application_name = :application_name",
            application_name=application_name,
        )
        return int(rows[0]["notification_id"]) if rows else None

    def clear(self, application_name: str) -> None:
        """Empty the view and forget its position, so it rebuilds from position zero."""
        with self.transaction() as tx:
            for table in self.tables:
                tx.execute(f"DELETE FROM {table}")
            tx.execute(
                f"DELETE FROM {self.tracking_table} WHERE application_name = :application_name",
                application_name=application_name,
            )

    def tracking_schema(self) -> str:
        """The tracking table: one row per upstream application (single-row tracking)."""
        return (
            f"CREATE TABLE IF NOT EXISTS {self.tracking_table} ("
            "application_name TEXT PRIMARY KEY, notification_id BIGINT NOT NULL)"
        )

    def dump(self) -> dict[str, list[tuple[Any, ...]]]:
        """Every row of every table, sorted: what two builds of the view must agree on."""
        with self.reading() as tx:
            return {
                table: sorted(
                    (tuple(row.values()) for row in tx.all(f"SELECT * FROM {table}")),
                    key=repr,
                )
                for table in self.tables
            }


class SQLiteViews(ViewRecorder, SQLiteTrackingRecorder):
    """The SQLite backend: the application's own datastore, so the same file and pool."""

    def __init__(self, datastore: SQLiteDatastore) -> None:
        super().__init__(datastore)
        self._advance = (
            f"INSERT INTO {self.tracking_table} (application_name, notification_id) "
            "VALUES (:application_name, :notification_id) "
            "ON CONFLICT (application_name) DO UPDATE SET notification_id = :notification_id "
            f"WHERE {self.tracking_table}.notification_id < :notification_id "
            "RETURNING notification_id"
        )

    def construct_create_table_statements(self) -> list[str]:
        return []  # create_table below owns the schema (not the library's `tracking` table)

    def create_table(self) -> None:
        with self.datastore.transaction(commit=True) as cursor:
            for statement in (self.tracking_schema(), *self.schema):
                cursor.execute(statement)

    def begin(self, *, commit: bool) -> AbstractContextManager[Any]:
        return self.datastore.transaction(commit=commit)

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
        return statement  # sqlite3 reads :name parameters as they are


@dataclass(frozen=True)
class Backend:
    """Where an application's views live: a backend class and the datastore it writes to."""

    views: type[ViewRecorder]
    datastore: Any


_memory_views: weakref.WeakKeyDictionary[Application[Any], SQLiteDatastore] = (
    weakref.WeakKeyDictionary()
)


def backend_for(app: Application[Any]) -> Backend:
    """The application's own database; for the in-memory store, a private in-memory SQLite
    database (the store lives and dies with the process, so do its views)."""
    recorder: Any = app.recorder
    # By the library's module anywhere in the class's bases (a recorder may subclass one,
    # adapters/postgres_recorder.py), without importing psycopg on SQLite.
    modules = {cls.__module__ for cls in type(recorder).__mro__}
    if "eventsourcing.postgres" in modules:
        from flowledger.projections.postgres import PostgresViews

        return Backend(PostgresViews, recorder.datastore)
    if "eventsourcing.sqlite" in modules:
        return Backend(SQLiteViews, recorder.datastore)
    # One per application: every view (and tracking record) of it in the same database.
    datastore = _memory_views.get(app)
    if datastore is None:
        name = f"file:flowledger-views-{uuid4().hex}?mode=memory&cache=shared"
        datastore = _memory_views[app] = SQLiteDatastore(name)
    return Backend(SQLiteViews, datastore)


def open_view(cls: type[V], backend: Backend) -> V:
    """A view on a backend, its tables created if missing."""
    view = cast(V, compose(cls, backend.views)(backend.datastore))
    view.create_table()
    return view


@cache
def compose(view: type[ViewRecorder], backend: type[ViewRecorder]) -> type[ViewRecorder]:
    """The view's statements on a backend: e.g. `SQLiteRunsView(RunsView, SQLiteViews)`."""
    prefix = backend.__name__.removesuffix("Views")
    return type(f"{prefix}{view.__name__}", (view, backend), {"__module__": view.__module__})
