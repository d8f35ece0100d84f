"""The query commands on the projections, driven as a user does: `projections status` and
`rebuild`, `executions list` with the run views' filters, `inbox` and `performance`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cli_driver import AGENTS, DATA, EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, EXIT_WAITING, Cli

ORDERS = DATA / "orders.yaml"
FAILING = DATA / "failing.yaml"


@dataclass(frozen=True)
class Shop:
    """A store with orders of two versions, answered, cancelled, waiting, and failures."""

    cli: Cli
    waiting: list[str]  # version 1, waiting for sales (oldest first)
    completed: str
    cancelled: str
    tagged: str  # version 2 (tagged "shop"), waiting
    failed: list[str]


def run(cli: Cli, definition: Path, data: dict[str, Any], expect: int) -> str:
    result = cli("run", definition, "--input", json.dumps(data), "--agents", AGENTS, "--json")
    assert result.code == expect, str(result)
    execution_id: str = result.json()["execution_id"]
    return execution_id


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Shop:
    cli = Cli(tmp_path_factory.mktemp("shop"))
    tagged = cli.home / "orders-v2.yaml"
    tagged.write_text(ORDERS.read_text().replace('version: "1"', 'version: "2"\ntags: [shop]'))
    orders = [run(cli, ORDERS, {"order": f"o-{i}"}, EXIT_WAITING) for i in range(4)]
    failed = [run(cli, FAILING, {"message": f"no {i}"}, EXIT_FAILED) for i in range(2)]
    v2 = run(cli, tagged, {"order": "o-9"}, EXIT_WAITING)
    answer = ("--data", '{"approved": true}', "--agents", AGENTS)
    assert cli("complete", orders[0], "approve", *answer).code == EXIT_OK
    assert cli("cancel", orders[1], "--agents", AGENTS).code == EXIT_FAILED
    return Shop(cli, orders[2:], orders[0], orders[1], v2, failed)


def listed(cli: Cli, *options: str) -> tuple[list[str], str | None]:
    """Ids of `executions list --json OPTIONS`, and the next page's cursor if one is given."""
    result = cli("executions", "list", "--json", *options)
    assert result.code == EXIT_OK, str(result)
    cursor = None
    for line in result.err.splitlines():
        if line.startswith("next page: --cursor "):
            cursor = line.removeprefix("next page: --cursor ").strip()
    return [row["execution_id"] for row in result.json()], cursor


def test_status_shows_the_lag_until_a_query_catches_up(cli: Cli) -> None:
    run(cli, ORDERS, {"order": "o-1"}, EXIT_WAITING)

    before = cli("projections", "status", "--json")
    assert before.code == EXIT_OK, str(before)
    head = before.json()[0]["head"]
    assert head > 0
    assert [(s["name"], s["position"], s["lag"]) for s in before.json()] == [
        ("runs", 0, head),
        ("performance", 0, head),
        ("step_cache", 0, head),
    ]
    assert cli("inbox").code == EXIT_OK  # a query catches up first

    after = cli("projections", "status")
    assert after.code == EXIT_OK, str(after)
    for name in ("runs", "performance", "step_cache"):
        line = next(line for line in after.out.splitlines() if name in line)
        assert line.split("│")[2:5] == [f" {head:>8} ", f" {head:>4} ", "   0 "], line


def test_the_list_through_the_run_views_is_the_list_users_know(shop: Shop) -> None:
    plain = shop.cli("executions", "list", "--json")
    assert plain.code == EXIT_OK, str(plain)

    viewed = shop.cli("executions", "list", "--json", "--since", "1d")

    assert viewed.code == EXIT_OK, str(viewed)
    assert viewed.json() == plain.json()  # same rows, same fields, newest first
    assert len(viewed.json()) == 7
    table = shop.cli("executions", "list", "--tag", "shop")
    assert table.code == EXIT_OK, str(table)
    assert shop.tagged in table.out
    assert shop.completed not in table.out


def test_executions_are_filtered_by_version_tag_status_and_start(shop: Shop) -> None:
    orders_v1 = [*shop.waiting[::-1], shop.cancelled, shop.completed]

    assert listed(shop.cli, "--workflow", "e2e-orders", "--version", "1")[0] == orders_v1
    assert listed(shop.cli, "--version", "2")[0] == [shop.tagged]
    assert listed(shop.cli, "--tag", "shop")[0] == [shop.tagged]
    assert listed(shop.cli, "--tag", "shop", "--status", "completed")[0] == []
    assert listed(shop.cli, "--since", "1h", "--status", "failed")[0] == shop.failed[::-1]
    assert listed(shop.cli, "--until", "2000-01-01T00:00:00")[0] == []
    assert listed(shop.cli, "--since", "2000-01-01T00:00:00+00:00", "--limit", "1")[0] == [
        shop.tagged
    ]
    newest_first = listed(shop.cli)[0]
    assert listed(shop.cli, "--oldest")[0] == newest_first[::-1]
    assert listed(shop.cli, "--oldest", "--workflow", "e2e-failing")[0] == shop.failed


def test_pages_follow_each_other_with_the_cursor_printed_after_each(shop: Shop) -> None:
    everything, last = listed(shop.cli, "--since", "1d")
    assert last is None

    seen: list[str] = []
    ids, cursor = listed(shop.cli, "--since", "1d", "--limit", "3")
    pages = 1
    while cursor is not None:
        seen += ids
        ids, cursor = listed(shop.cli, "--since", "1d", "--limit", "3", "--cursor", cursor)
        pages += 1
    seen += ids

    assert seen == everything
    assert pages == 3


def test_the_inbox_lists_the_tasks_waiting_per_assignee(shop: Shop) -> None:
    mine = shop.cli("inbox", "sales", "--json")

    assert mine.code == EXIT_OK, str(mine)
    assert [(t["execution_id"], t["key"], t["assignee"]) for t in mine.json()] == [
        (eid, "approve", "sales") for eid in [*shop.waiting, shop.tagged]
    ]
    assert shop.cli("inbox", "nobody", "--json").json() == []
    table = shop.cli("inbox")
    assert table.code == EXIT_OK, str(table)
    assert all(eid in table.out for eid in shop.waiting)
    assert shop.completed not in table.out
    assert "flowledger complete" in table.err


def test_performance_per_step_and_per_agent(shop: Shop) -> None:
    result = shop.cli("performance", "e2e-orders", "--json")

    assert result.code == EXIT_OK, str(result)
    perf = result.json()
    assert (perf["workflow_id"], perf["version"], perf["window"]) == ("e2e-orders", None, "all")
    x = perf["executions"]
    assert (x["ended"], x["completed"], x["cancelled"], x["in_progress"]) == (2, 1, 1, 3)
    steps = {s["step_id"]: s for s in perf["steps"]}
    assert (steps["reserve"]["runs"], steps["reserve"]["succeeded"]) == (5, 5)
    assert (steps["approve"]["succeeded"], steps["approve"]["cancelled"]) == (1, 1)
    assert (steps["ship"]["runs"], steps["release"]["runs"]) == (1, 1)
    (local,) = perf["agents"]
    assert (local["agent"], local["attempts"], local["succeeded"]) == ("local", 7, 7)
    assert [v["version"] for v in perf["versions"]] == ["1", "2"]

    one = shop.cli("performance", "e2e-orders", "--version", "2", "--window", "24h", "--json")
    assert one.code == EXIT_OK, str(one)
    assert one.json()["version"] == "2"
    assert one.json()["since"] is not None
    assert [s["step_id"] for s in one.json()["steps"]] == ["reserve"]

    table = shop.cli("performance", "e2e-failing", "--window", "7d")
    assert table.code == EXIT_OK, str(table)
    text = " ".join(table.out.split())
    assert "e2e-failing, all versions, since" in text
    for title in ("executions", "steps", "agents (attempts)", "boom", "local"):
        assert title in text


def test_a_rebuild_gives_the_same_answers(shop: Shop) -> None:
    before = shop.cli("performance", "e2e-orders", "--json").json()
    listing = listed(shop.cli, "--since", "1d")

    result = shop.cli("projections", "rebuild")

    assert result.code == EXIT_OK, str(result)
    assert "rebuilt from position zero" in result.out
    assert "runs (" in result.out
    assert "performance (" in result.out
    assert shop.cli("performance", "e2e-orders", "--json").json() == before
    assert listed(shop.cli, "--since", "1d") == listing
    one = shop.cli("projections", "rebuild", "runs")
    assert one.code == EXIT_OK, str(one)
    assert "performance" not in one.out


@pytest.mark.parametrize(
    ("args", "naming"),
    [
        (
            ("projections", "rebuild", "nope"),
            ["no projection 'nope'", "runs, performance, step_cache"],
        ),
        (("performance", "e2e-orders", "--window", "5x"), ["--window '5x'", "24h"]),
        (("performance", "e2e-orders", "--window", "99999999999d"), ["longer than any time"]),
        (("executions", "list", "--since", "9999999w"), ["before the year 1"]),
        (("performance", "nope"), ["no workflow 'nope'"]),
        (("performance", "e2e-orders", "--version", "9"), ["has no version '9'"]),
        (("executions", "list", "--since", "yesterday"), ["--since 'yesterday'", "ISO"]),
        (("executions", "list", "--tag", "x", "--cursor", "zz"), ["'zz' is not a cursor"]),
        (("executions", "list", "--tag", "x", "--limit", "0"), ["--limit must be at least 1"]),
    ],
)
def test_bad_queries_are_refused(shop: Shop, args: tuple[str, ...], naming: list[str]) -> None:
    result = shop.cli(*args)

    assert result.code == EXIT_BAD_INPUT, str(result)
    assert result.out == ""
    for text in naming:
        assert text in result.message, str(result)
