"""The PostgreSQL event recorder: eventsourcing's, with each save in one round trip.

eventsourcing's `PostgresApplicationRecorder.insert_events` sends BEGIN, SET LOCAL
lock_timeout, LOCK TABLE ... IN EXCLUSIVE MODE, NOTIFY and the INSERT in psycopg's
pipeline mode, syncs, fetches the notification ids, then sends COMMIT: two round trips and
a good deal of Python in psycopg's pipeline for every save. Measured on one connection to
the local server (bench/bench_pg_insert.py, docs/benchmarks.md), it saves about half as
many events per second as a plain INSERT and COMMIT; this recorder is level with one.

This recorder does the same work in one statement: a PL/pgSQL function that takes the
same table lock, sends the same NOTIFY and inserts the rows, called in autocommit mode, so
the statement is its own transaction and the server commits it before answering. The
table, its columns, the notification ids and the channel are eventsourcing's: readers
(projections, `select_notifications`, `subscribe`) see no difference.

The table lock stays. It is what keeps the notification log gapless for readers: a
transaction takes its notification ids and commits before the next one can take any, so a
reader that has seen id N never later finds an id below N appear. With one writer per
process (the engine's committer) the lock is uncontended; the benchmark measures what it
costs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from eventsourcing.persistence import InterfaceError, OperationalError, StoredEvent
from eventsourcing.postgres import PostgresApplicationRecorder, PostgresDatastore
from eventsourcing.utils import retry
from psycopg.sql import SQL, Composed, Identifier

# Serializes concurrent table creation (CREATE OR REPLACE FUNCTION is not safe to run
# concurrently): any process creating the tables takes it first, in the same transaction.
_CREATE_LOCK = 0x666C6F776C6564  # "flowled"


class OneTripRecorder(PostgresApplicationRecorder):
    """Saves events with one statement (lock, notify, insert, commit) per transaction."""

    def __init__(
        self, datastore: PostgresDatastore, *, events_table_name: str = "stored_events"
    ) -> None:
        super().__init__(datastore, events_table_name=events_table_name)
        function = f"{self.events_table_name}_save"
        self.check_identifier_length(function)
        schema = Identifier(self.datastore.schema)
        # The rows go as four arrays, not as an array of eventsourcing's composite type:
        # psycopg dumps a composite in Python (a regular expression per field), and arrays
        # of uuid, bigint, text and bytea in C, in binary.
        self.sql_create_statements.append(
            SQL(
                "CREATE OR REPLACE FUNCTION {schema}.{function}("
                "ids {id_type}[], versions bigint[], topics text[], states bytea[]) "
                "RETURNS SETOF bigint LANGUAGE plpgsql AS $body$ "
                "BEGIN "
                "SET LOCAL lock_timeout = '{lock_timeout}s'; "
                "LOCK TABLE {schema}.{table} IN EXCLUSIVE MODE; "
                "NOTIFY {channel}; "
                "RETURN QUERY INSERT INTO {schema}.{table} AS t "
                "(originator_id, originator_version, topic, state) "
                "SELECT * FROM unnest(ids, versions, topics, states) "
                "RETURNING notification_id; "
                "END; $body$"
            ).format(
                schema=schema,
                function=Identifier(function),
                id_type=Identifier(self.datastore.originator_id_type),
                lock_timeout=self.datastore.lock_timeout,
                table=Identifier(self.events_table_name),
                channel=Identifier(self.channel_name),
            )
        )
        self._save_statement = SQL("SELECT * FROM {schema}.{function}(%b, %b, %b, %b)").format(
            schema=schema, function=Identifier(function)
        )

    def create_table(self) -> None:
        """Types, table, index and functions in one transaction, under an advisory lock:
        processes opening a new database at once (a worker and the API, say) would
        otherwise race on eventsourcing's CREATE TYPE and CREATE OR REPLACE FUNCTION."""
        with self.datastore.transaction(commit=True) as curs:
            curs.execute(SQL("SELECT pg_advisory_xact_lock({0})").format(_CREATE_LOCK))
            for statement in self.sql_create_statements:
                if "CREATE TYPE" in statement.as_string():
                    curs.execute(
                        "SELECT 1 FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace"
                        " WHERE t.typname = %s AND n.nspname = %s",
                        (self.stored_event_type_name, self.datastore.schema),
                    )
                    if curs.fetchone() is None:
                        curs.execute(statement, prepare=False)
            self._create_table(curs)
        self.datastore.register_type_adapters()

    @retry((InterfaceError, OperationalError), max_attempts=10, wait=0.2)
    def insert_events(self, stored_events: Sequence[StoredEvent], **kwargs: Any) -> Sequence[int]:
        if not stored_events:
            return []
        return self.call_save(self._save_statement, stored_events)

    def call_save(
        self, statement: SQL | Composed, stored_events: Sequence[StoredEvent]
    ) -> list[int]:
        """Call a save function (`statement`, four array parameters) with the events as
        columns; returns its notification ids. bench/bench_pg_insert.py calls it with a
        function without the table lock, to measure what the lock costs."""
        columns = (
            [e.originator_id for e in stored_events],
            [e.originator_version for e in stored_events],
            [e.topic for e in stored_events],
            [e.state for e in stored_events],
        )
        with self.datastore.get_connection() as conn, conn.cursor() as curs:
            # Autocommit (eventsourcing's pool sets it): the statement is the transaction.
            curs.execute(statement, columns, prepare=True)
            return [next(iter(row.values())) for row in curs.fetchall()]
