"""Bad input to `flowledger`: exit 2, a message on stderr naming what is wrong, nothing stored."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cli_driver import (
    AGENTS,
    DATA,
    EXIT_BAD_INPUT,
    EXIT_OK,
    EXIT_WAITING,
    Cli,
    Result,
    store_state,
)

ORDERS = DATA / "orders.yaml"
NO_SUCH_EXECUTION = "00000000-0000-4000-8000-000000000000"


@dataclass(frozen=True)
class Store:
    """A store holding an order that waits for approval and one that completed."""

    cli: Cli
    waiting: str
    completed: str


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    """One store for the module: every test here leaves it as it found it (and checks so)."""
    cli = Cli(tmp_path_factory.mktemp("store"))
    ids = []
    for order in ("o-1", "o-2"):
        result = cli("run", ORDERS, "--input", json.dumps({"order": order}), "--agents", AGENTS)
        assert result.code == EXIT_WAITING, str(result)
        ids.append(cli.executions()[0]["execution_id"])
    done = cli("complete", ids[1], "approve", "--data", '{"approved": true}', "--agents", AGENTS)
    assert done.code == EXIT_OK, str(done)
    # Listed last: the listing catches the run views up, which writes their rows. From here
    # on each test leaves every byte of the store as it was (`refused` checks), and the
    # listing reads nothing else, so one more listing at the end is proof enough for all.
    listed = cli.executions()
    yield Store(cli, waiting=ids[0], completed=ids[1])
    assert cli.executions() == listed


def refused(store: Store, *args: str | Path, naming: list[str]) -> Result:
    """Run a command that must be refused: exit 2, every text of `naming` on stderr, and the
    store (its events, its bytes on disk, and so its listing) exactly as before."""
    before = store_state(store.cli.home)
    result = store.cli(*args)
    assert result.code == EXIT_BAD_INPUT, str(result)
    assert result.out == "", str(result)
    assert result.message.startswith("error: "), str(result)
    for text in naming:
        assert text in result.message, f"{text!r} is not named:\n{result}"
    after = store_state(store.cli.home)
    assert after.max_notification_id == before.max_notification_id
    assert after == before
    return result


# -- definitions ---------------------------------------------------------------------------

DEFINITIONS = {
    "invalid YAML": ("invalid_yaml.yaml", ["invalid_yaml.yaml", "YAML syntax error at line"]),
    "an unknown key": (
        "unknown_key.yaml",
        ["unknown_key.yaml", "step 'reserve'", "field 'retires'", "unknown field"],
    ),
    "a JMESPath that does not compile": (
        "bad_expression.yaml",
        ["bad_expression.yaml", "step 'count'", "field 'input_mapping.n'", "syntax error"],
    ),
    "an unknown JMESPath function": (
        "unknown_function.yaml",
        [
            "unknown_function.yaml",
            "step 'count'",
            "field 'input_mapping.n'",
            "unknown function 'lenght()'",
            "did you mean 'length()'",
        ],
    ),
}


@pytest.mark.parametrize(("file", "naming"), DEFINITIONS.values(), ids=DEFINITIONS.keys())
def test_run_refuses_a_bad_definition(store: Store, file: str, naming: list[str]) -> None:
    refused(
        store, "run", DATA / file, "--input", '{"order": "o-9"}', "--agents", AGENTS, naming=naming
    )


@pytest.mark.parametrize(("file", "naming"), DEFINITIONS.values(), ids=DEFINITIONS.keys())
def test_validate_refuses_a_bad_definition(store: Store, file: str, naming: list[str]) -> None:
    refused(store, "validate", DATA / file, naming=naming)


@pytest.mark.parametrize("command", ["run", "validate"])
def test_a_missing_definition_file_is_named(store: Store, command: str) -> None:
    extra = ["--input", "{}"] if command == "run" else []
    refused(
        store,
        command,
        "no_such_workflow.yaml",
        *extra,
        naming=["no_such_workflow.yaml", "cannot read"],
    )


def test_a_file_name_that_looks_like_terminal_markup_is_printed_as_it_is(store: Store) -> None:
    refused(store, "validate", "[/orders].yaml", naming=["[/orders].yaml", "cannot read"])


def test_run_refuses_an_action_no_agent_offers(store: Store) -> None:
    result = refused(
        store,
        "run",
        DATA / "unknown_action.yaml",
        "--input",
        "{}",
        "--agents",
        AGENTS,
        naming=["'e2e-unknown-action'", "e2e.teleport", "--agents"],
    )
    assert "e2e.reserve" not in result.message  # offered: only the missing one is named


# -- inputs --------------------------------------------------------------------------------

INPUTS = {
    "failing input_schema": (
        '{"order": 7}',
        ["input_schema", "$.order", "7 is not of type 'string'"],
    ),
    "missing a required field": ("{}", ["input_schema", "'order' is a required property"]),
    "not JSON": ('{"order": ', ["--input is not valid JSON"]),
    "not an object": ('["o-9"]', ["--input must be a JSON object", "list"]),
}


@pytest.mark.parametrize(("data", "naming"), INPUTS.values(), ids=INPUTS.keys())
def test_run_refuses_a_bad_input(store: Store, data: str, naming: list[str]) -> None:
    refused(store, "run", ORDERS, "--input", data, "--agents", AGENTS, naming=naming)


@pytest.mark.parametrize(
    "args",
    [
        ("run", DATA / "invalid_yaml.yaml", "--input", "{}"),
        ("run", ORDERS, "--input", '{"order": 7}'),
        ("run", ORDERS, "--input", "{}", "--agents", "e2e_no_such_agents"),
    ],
    ids=["bad definition", "bad input", "missing agents"],
)
def test_a_refused_run_creates_no_store(tmp_path: Path, args: tuple[str | Path, ...]) -> None:
    home = tmp_path / "home"
    cli = Cli(tmp_path)
    cli.env["FLOWLEDGER_HOME"] = str(home)

    result = cli(*args)

    assert result.code == EXIT_BAD_INPUT, str(result)
    assert not list(home.glob("flowledger.db*"))


# -- --agents --------------------------------------------------------------------------------


def test_agents_naming_a_missing_module(store: Store) -> None:
    refused(
        store,
        "run",
        ORDERS,
        "--input",
        '{"order": "o-9"}',
        "--agents",
        "e2e_no_such_agents",
        naming=["--agents e2e_no_such_agents", "No module named 'e2e_no_such_agents'"],
    )


def test_agents_naming_a_missing_file(store: Store) -> None:
    refused(
        store,
        "run",
        ORDERS,
        "--input",
        '{"order": "o-9"}',
        "--agents",
        "./no_such_agents.py",
        naming=["--agents ./no_such_agents.py", "no such file"],
    )


# -- answers to human tasks ----------------------------------------------------------------


def test_complete_refuses_a_step_that_already_completed(store: Store) -> None:
    refused(
        store,
        "complete",
        store.waiting,
        "reserve",
        "--data",
        '{"approved": true}',
        "--agents",
        AGENTS,
        naming=["'reserve' is completed", "not a human task waiting for an answer"],
    )


def test_complete_refuses_a_step_that_has_not_started(store: Store) -> None:
    refused(
        store,
        "complete",
        store.waiting,
        "ship",
        "--data",
        '{"approved": true}',
        "--agents",
        AGENTS,
        naming=[store.waiting, "no step 'ship' waiting for an answer"],
    )


def test_complete_refuses_an_execution_that_ended(store: Store) -> None:
    refused(
        store,
        "complete",
        store.completed,
        "approve",
        "--data",
        '{"approved": true}',
        "--agents",
        AGENTS,
        naming=[store.completed, "is completed", "waits for no answer"],
    )


ANSWERS = {
    "failing form_schema": (
        '{"approved": "yes"}',
        ["'approve'", "form_schema", "$.approved", "'yes' is not of type 'boolean'"],
    ),
    "missing a required field": ("{}", ["'approve'", "form_schema", "'approved' is a required"]),
    "not JSON": ("{approved: true}", ["--data is not valid JSON"]),
    "not an object": ("[true]", ["--data must be a JSON object", "list"]),
}


@pytest.mark.parametrize(("data", "naming"), ANSWERS.values(), ids=ANSWERS.keys())
def test_complete_refuses_a_bad_answer(store: Store, data: str, naming: list[str]) -> None:
    refused(
        store,
        "complete",
        store.waiting,
        "approve",
        "--data",
        data,
        "--agents",
        AGENTS,
        naming=naming,
    )


# -- execution ids ---------------------------------------------------------------------------

COMMANDS = {
    "complete": ("complete", "{id}", "approve", "--data", "{{}}", "--agents", str(AGENTS)),
    "cancel": ("cancel", "{id}", "--agents", str(AGENTS)),
    "show": ("executions", "show", "{id}", "--json"),
}


@pytest.mark.parametrize("command", COMMANDS.values(), ids=COMMANDS.keys())
def test_an_unknown_execution_id(store: Store, command: tuple[str, ...]) -> None:
    args = [a.format(id=NO_SUCH_EXECUTION) for a in command]
    refused(store, *args, naming=[f"no execution {NO_SUCH_EXECUTION}"])


@pytest.mark.parametrize("command", COMMANDS.values(), ids=COMMANDS.keys())
def test_a_malformed_execution_id(store: Store, command: tuple[str, ...]) -> None:
    args = [a.format(id="order-o-1") for a in command]
    refused(store, *args, naming=["'order-o-1' is not an execution id"])


# -- cancel ------------------------------------------------------------------------------------


def test_cancel_refuses_an_execution_that_ended(store: Store) -> None:
    refused(
        store,
        "cancel",
        store.completed,
        "--agents",
        AGENTS,
        naming=[store.completed, "is completed", "cannot be cancelled"],
    )


def test_cancel_refuses_without_the_agents_that_compensate(store: Store) -> None:
    # The waiting order's reservation must be released by e2e.release: without the module
    # that offers it nothing is cancelled (a half-compensated order is worse than none).
    refused(store, "cancel", store.waiting, naming=["e2e.release", "--agents"])
