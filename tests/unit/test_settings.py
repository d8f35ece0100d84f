"""The composition root reads the store's settings from the environment, once, and names
what is missing or malformed."""

from __future__ import annotations

from pathlib import Path

import pytest

from flowledger.adapters.settings import RECORDER_TOPIC, load_settings
from flowledger.domain.errors import ConfigurationError

PG = {"POSTGRES_DBNAME": "flow", "POSTGRES_HOST": "db.internal", "POSTGRES_USER": "engine"}


def test_sqlite_in_the_home_folder_is_the_default() -> None:
    settings = load_settings({"FLOWLEDGER_HOME": "/srv/flow"})
    assert settings.is_sqlite
    assert settings.persistence["SQLITE_DBNAME"] == str(Path("/srv/flow/flowledger.db"))


@pytest.mark.parametrize("module", ["memory", "popo", "eventsourcing.popo"])
def test_memory_is_named_by_any_of_its_names(module: str) -> None:
    settings = load_settings({"PERSISTENCE_MODULE": module})
    assert settings.persistence == {"PERSISTENCE_MODULE": "eventsourcing.popo"}


@pytest.mark.parametrize("module", ["postgres", "postgresql", "eventsourcing.postgres"])
def test_postgres_takes_eventsourcing_s_own_variables(module: str) -> None:
    settings = load_settings(
        {"PERSISTENCE_MODULE": module, **PG, "POSTGRES_PORT": "6432", "POSTGRES_PASSWORD": "pw"}
    )
    assert settings.is_postgres
    assert not settings.is_sqlite
    assert settings.persistence == {
        "PERSISTENCE_MODULE": "eventsourcing.postgres",
        "APPLICATION_RECORDER_TOPIC": RECORDER_TOPIC,
        **PG,
        "POSTGRES_PORT": "6432",
        "POSTGRES_PASSWORD": "pw",
    }


@pytest.mark.parametrize("missing", ["POSTGRES_DBNAME", "POSTGRES_HOST", "POSTGRES_USER"])
def test_a_missing_postgres_setting_is_named(missing: str) -> None:
    env = {"PERSISTENCE_MODULE": "postgres", **PG}
    del env[missing]
    with pytest.raises(ConfigurationError, match=f"{missing} is not set"):
        load_settings(env)


def test_no_password_means_none_is_sent() -> None:
    settings = load_settings({"PERSISTENCE_MODULE": "postgres", **PG})
    assert settings.persistence["POSTGRES_PASSWORD"] == ""


def test_eventsourcing_s_tuning_variables_are_passed_on() -> None:
    tuning = {
        "POSTGRES_SCHEMA": "flow",
        "POSTGRES_POOL_SIZE": "3",
        "POSTGRES_MAX_OVERFLOW": "2",
        "POSTGRES_CONNECT_TIMEOUT": "7",
        "POSTGRES_LOCK_TIMEOUT": "5",
        "POSTGRES_IDLE_IN_TRANSACTION_SESSION_TIMEOUT": "10",
        "POSTGRES_CONN_MAX_AGE": "600.5",
        "POSTGRES_PRE_PING": "y",
        "POSTGRES_MAX_WAITING": "8",
    }
    settings = load_settings({"PERSISTENCE_MODULE": "postgres", **PG, **tuning})
    assert tuning.items() <= settings.persistence.items()


@pytest.mark.parametrize(
    ("key", "value"), [("POSTGRES_POOL_SIZE", "five"), ("POSTGRES_CONN_MAX_AGE", "1h")]
)
def test_a_malformed_number_is_named(key: str, value: str) -> None:
    with pytest.raises(ConfigurationError, match=key):
        load_settings({"PERSISTENCE_MODULE": "postgres", **PG, key: value})


def test_one_database_url_gives_every_connection_setting_and_implies_postgres() -> None:
    url = "postgresql://engine:p%40ss%3Aword@db.internal:6432/flow"
    settings = load_settings({"FLOWLEDGER_DATABASE_URL": url, "POSTGRES_POOL_SIZE": "4"})
    assert settings.persistence == {
        "PERSISTENCE_MODULE": "eventsourcing.postgres",
        "APPLICATION_RECORDER_TOPIC": RECORDER_TOPIC,
        **PG,
        "POSTGRES_PORT": "6432",
        "POSTGRES_PASSWORD": "p@ss:word",
        "POSTGRES_POOL_SIZE": "4",
    }


def test_the_url_wins_over_postgres_variables_for_where_to_connect() -> None:
    env = {
        "FLOWLEDGER_DATABASE_URL": "postgres://engine@db.internal/flow",
        "POSTGRES_HOST": "elsewhere",
        "POSTGRES_PORT": "1111",
        "POSTGRES_PASSWORD": "other",
    }
    persistence = load_settings(env).persistence
    assert persistence["POSTGRES_HOST"] == "db.internal"
    assert "POSTGRES_PORT" not in persistence  # the URL's default, 5432
    assert persistence["POSTGRES_PASSWORD"] == ""


def test_a_url_may_name_a_unix_socket_folder_as_its_host() -> None:
    url = "postgresql://engine@/flow?host=/var/run/postgresql&port=5433"
    persistence = load_settings({"FLOWLEDGER_DATABASE_URL": url}).persistence
    assert persistence["POSTGRES_HOST"] == "/var/run/postgresql"
    assert persistence["POSTGRES_PORT"] == "5433"


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("postgresql://engine@db.internal/", "has no database name"),
        ("postgresql://db.internal/flow", "has no user"),
        ("postgresql://engine@/flow", "has no host"),
        ("mysql://engine@db.internal/flow", "must start with postgresql://"),
        ("postgresql://engine@db.internal:port/flow", "is not a URL"),
        ("postgresql://engine@db.internal/flow?sslmode=require", "'sslmode' is not supported"),
    ],
)
def test_a_bad_database_url_is_refused_with_what_is_wrong(url: str, problem: str) -> None:
    with pytest.raises(ConfigurationError, match=problem) as caught:
        load_settings({"FLOWLEDGER_DATABASE_URL": url})
    assert "FLOWLEDGER_DATABASE_URL" in str(caught.value)


def test_a_url_and_another_persistence_module_contradict_each_other() -> None:
    env = {"FLOWLEDGER_DATABASE_URL": "postgresql://e@h/d", "PERSISTENCE_MODULE": "sqlite"}
    with pytest.raises(ConfigurationError, match="PERSISTENCE_MODULE='sqlite'"):
        load_settings(env)


def test_an_unknown_persistence_module_lists_the_supported_ones() -> None:
    with pytest.raises(ConfigurationError, match="'postgres'"):
        load_settings({"PERSISTENCE_MODULE": "mongodb"})


def test_the_password_stays_out_of_the_settings_repr_and_description() -> None:
    settings = load_settings({"FLOWLEDGER_DATABASE_URL": "postgresql://e:s3cret@h:5/d"})
    assert "s3cret" not in repr(settings)
    assert "s3cret" not in settings.describe()
    assert settings.describe() == "PostgreSQL database 'd' on h:5"


def test_the_postgres_recorder_topic_names_the_one_trip_recorder() -> None:
    from eventsourcing.postgres import PostgresApplicationRecorder
    from eventsourcing.utils import resolve_topic

    from flowledger.adapters.postgres_recorder import OneTripRecorder

    assert resolve_topic(RECORDER_TOPIC) is OneTripRecorder
    assert issubclass(OneTripRecorder, PostgresApplicationRecorder)
