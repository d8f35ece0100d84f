"""The composition root: every setting comes from the environment, read once at start."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from flowledger.domain.errors import ConfigurationError
from flowledger.services.app import FlowledgerApp

_SQLITE = ("", "sqlite", "eventsourcing.sqlite")
_MEMORY = ("memory", "popo", "eventsourcing.popo")


@dataclass(frozen=True, slots=True)
class Settings:
    """Where the store lives and how it is reached."""

    home: Path
    persistence: dict[str, str]
    crash_at: str | None = None  # FLOWLEDGER_CRASH_AT: only the crash tests set it

    @property
    def is_sqlite(self) -> bool:
        """Whether the store is the embedded SQLite file."""
        return self.persistence["PERSISTENCE_MODULE"] == "eventsourcing.sqlite"


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from the environment: FLOWLEDGER_HOME, PERSISTENCE_MODULE, SQLITE_DBNAME."""
    env = os.environ if environ is None else environ
    home = Path(env.get("FLOWLEDGER_HOME") or ".flowledger")
    module = env.get("PERSISTENCE_MODULE", "").strip()
    if module in _SQLITE:
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
            f"PERSISTENCE_MODULE={module!r} is not supported; use 'sqlite' (the default) "
            "or 'memory'"
        )
    return Settings(
        home=home, persistence=persistence, crash_at=env.get("FLOWLEDGER_CRASH_AT") or None
    )


def build_app(settings: Settings) -> FlowledgerApp:
    """The application on the configured store (the SQLite folder is made if missing)."""
    if settings.is_sqlite:
        db = Path(settings.persistence["SQLITE_DBNAME"])
        if str(db) != ":memory:" and not str(db).startswith("file:"):
            try:
                db.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ConfigurationError(f"cannot create {db.parent}: {exc}") from None
    return FlowledgerApp(env=dict(settings.persistence))
