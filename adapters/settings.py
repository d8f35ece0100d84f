"""The composition root: every setting comes from the environment, read once at start."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from eventsourcing.persistence import PersistenceError

from flowledger.domain.errors import ConfigurationError, StoreUnavailable
from flowledger.services.app import FlowledgerApp

_SQLITE = ("", "sqlite", "eventsourcing.sqlite")
_MEMORY = ("memory", "popo", "eventsourcing.popo")
_POSTGRES = ("postgres", "postgresql", "eventsourcing.postgres")
DATABASE_URL = "FLOWLEDGER_DATABASE_URL"
# eventsourcing's APPLICATION_RECORDER_TOPIC on PostgreSQL: each save in one round trip.
# A string, so a process on SQLite does not import psycopg.
RECORDER_TOPIC = "flowledger.adapters.postgres_recorder:OneTripRecorder"
POSTGRES_REQUIRED = ("POSTGRES_DBNAME", "POSTGRES_HOST", "POSTGRES_USER")
# Read by eventsourcing.postgres; passed on as given. The value is the kind it must parse as.
POSTGRES_OPTIONAL = {
    "POSTGRES_PORT": int,
    "POSTGRES_CONNECT_TIMEOUT": int,
    "POSTGRES_POOL_SIZE": int,
    "POSTGRES_MAX_OVERFLOW": int,
    "POSTGRES_MAX_WAITING": int,
    "POSTGRES_CONN_MAX_AGE": float,
    "POSTGRES_LOCK_TIMEOUT": int,
    "POSTGRES_IDLE_IN_TRANSACTION_SESSION_TIMEOUT": int,
    "POSTGRES_PRE_PING": str,
    "POSTGRES_SCHEMA": str,
}
_URL_PARTS = ("POSTGRES_DBNAME", "POSTGRES_HOST", "POSTGRES_PORT", "POSTGRES_USER")


@dataclass(frozen=True, slots=True)
class Settings:
    """Where the store lives and how it is reached."""

    home: Path
    persistence: dict[str, str] = field(repr=False)  # may hold a password
    crash_at: str | None = None  # FLOWLEDGER_CRASH_AT: only the crash tests set it

    @property
    def is_sqlite(self) -> bool:
        """Whether the store is the embedded SQLite file."""
        return self.persistence["PERSISTENCE_MODULE"] == "eventsourcing.sqlite"

    @property
    def is_postgres(self) -> bool:
        """Whether the store is a PostgreSQL database."""
        return self.persistence["PERSISTENCE_MODULE"] == "eventsourcing.postgres"

    def describe(self) -> str:
        """Where the store is, for messages (never the password)."""
        p = self.persistence
        if self.is_postgres:
            port = p.get("POSTGRES_PORT", "5432")
            return f"PostgreSQL database {p['POSTGRES_DBNAME']!r} on {p['POSTGRES_HOST']}:{port}"
        if self.is_sqlite:
            return f"SQLite file {p['SQLITE_DBNAME']}"
        return "the in-memory store"


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from the environment: FLOWLEDGER_HOME, PERSISTENCE_MODULE, SQLITE_DBNAME,
    POSTGRES_* or FLOWLEDGER_DATABASE_URL (which implies PERSISTENCE_MODULE=postgres)."""
    env = os.environ if environ is None else environ
    home = Path(env.get("FLOWLEDGER_HOME") or ".flowledger")
    module = env.get("PERSISTENCE_MODULE", "").strip()
    url = env.get(DATABASE_URL, "").strip()
    if url and module not in ("", *_POSTGRES):
        raise ConfigurationError(
            f"{DATABASE_URL} names a PostgreSQL database but PERSISTENCE_MODULE={module!r}; "
            "unset one of them"
        )
    persistence: dict[str, str]
    if url or module in _POSTGRES:
        persistence = _postgres(env, url)
    elif module in _SQLITE:
        dbname = env.get("SQLITE_DBNAME") or str(home / "flowledger.db")
        persistence = {
            "PERSISTENCE_MODULE": "eventsourcing.sqlite",
            "SQLITE_DBNAME": dbname,
            "SQLITE_LOCK_TIMEOUT": env.get("SQLITE_LOCK_TIMEOUT", "30"),
        }
    elif module in _MEMORY:
        persistence = {"PERSISTENCE_MODULE": "eventsourcing.popo"}
    else:
        raise ConfigurationError(
            f"PERSISTENCE_MODULE={module!r} is not supported; use 'sqlite' (the default), "
            "'postgres' or 'memory'"
        )
    return Settings(
        home=home, persistence=persistence, crash_at=env.get("FLOWLEDGER_CRASH_AT") or None
    )


def _postgres(env: Mapping[str, str], url: str) -> dict[str, str]:
    """eventsourcing.postgres's settings: where from the URL (or POSTGRES_*), tuning from
    POSTGRES_*."""
    if url:
        given = _parse_url(url)
    else:
        given = {k: env[k] for k in (*_URL_PARTS, "POSTGRES_PASSWORD") if k in env}
    persistence = {
        "PERSISTENCE_MODULE": "eventsourcing.postgres",
        "APPLICATION_RECORDER_TOPIC": RECORDER_TOPIC,
    }
    for key in POSTGRES_REQUIRED:
        value = given.get(key, "").strip()
        if not value:
            where = f"{DATABASE_URL} has no {_URL_NAMES[key]}" if url else f"{key} is not set"
            raise ConfigurationError(f"PostgreSQL store: {where} (required)")
        persistence[key] = value
    # An empty password is no password: trust or peer authentication, or ~/.pgpass.
    persistence["POSTGRES_PASSWORD"] = given.get("POSTGRES_PASSWORD", "")
    for key, kind in POSTGRES_OPTIONAL.items():
        value = (given if key in _URL_PARTS else env).get(key, "").strip()
        if not value:
            continue
        try:
            kind(value)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise ConfigurationError(f"{key}={value!r} is not {what}") from None
        persistence[key] = value
    return persistence


_URL_NAMES = {"POSTGRES_DBNAME": "database name", "POSTGRES_HOST": "host", "POSTGRES_USER": "user"}


def _parse_url(url: str) -> dict[str, str]:
    """postgresql://user:password@host:port/dbname (host may instead be ?host=/socket/dir)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigurationError(f"{DATABASE_URL} is not a URL: {exc}") from None
    if parts.scheme not in ("postgresql", "postgres"):
        raise ConfigurationError(
            f"{DATABASE_URL} must start with postgresql://, not {parts.scheme or '(nothing)'}://"
        )
    found: dict[str, str] = {}
    if parts.hostname:
        found["POSTGRES_HOST"] = unquote(parts.hostname)
    if port is not None:
        found["POSTGRES_PORT"] = str(port)
    if parts.username:
        found["POSTGRES_USER"] = unquote(parts.username)
    if parts.password:
        found["POSTGRES_PASSWORD"] = unquote(parts.password)
    dbname = unquote(parts.path.lstrip("/"))
    if dbname:
        found["POSTGRES_DBNAME"] = dbname
    for name, values in parse_qs(parts.query, keep_blank_values=True).items():
        if name in ("host", "port") and len(values) == 1:
            found[f"POSTGRES_{name.upper()}"] = values[0]
        else:
            raise ConfigurationError(
                f"{DATABASE_URL}: the query parameter {name!r} is not supported (only host and "
                "port; libpq's other settings are read from PG* variables, e.g. PGSSLMODE)"
            )
    return found


def build_app(settings: Settings) -> FlowledgerApp:
    """The application on the configured store (the SQLite folder is made if missing)."""
    if settings.is_sqlite:
        db = Path(settings.persistence["SQLITE_DBNAME"])
        if str(db) != ":memory:" and not str(db).startswith("file:"):
            try:
                db.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ConfigurationError(f"cannot create {db.parent}: {exc}") from None
    env = dict(settings.persistence)
    # eventsourcing also reads the process environment, where a key prefixed with the
    # application's name (FLOWLEDGER_POSTGRES_HOST) would win: what was decided here wins.
    env.update({f"{FlowledgerApp.name.upper()}_{k}": v for k, v in settings.persistence.items()})
    try:
        return FlowledgerApp(env=env)
    except PersistenceError as exc:
        raise StoreUnavailable(f"cannot open {settings.describe()}: {exc}") from None
