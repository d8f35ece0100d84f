"""The console's error answers: a page, a fragment, or nothing to swap for a part that
refreshes itself through a passing outage of the store."""

from __future__ import annotations

from starlette.requests import Request

from flowledger.adapters.console.pages import Pages, seconds, when
from flowledger.domain.errors import ExecutionNotFound, StoreUnavailable


def request(method: str = "GET") -> Request:
    return Request({"type": "http", "method": method, "path": "/", "headers": []})


def test_a_self_refreshing_part_keeps_what_it_shows_while_the_store_is_down() -> None:
    pages = Pages(token_required=False)
    answer = pages.error(request(), StoreUnavailable("down"), fragment=True)
    assert answer.status_code == 204
    assert pages.error(request(), StoreUnavailable("down")).status_code == 503  # a page says so


def test_an_error_a_user_can_act_on_is_shown_where_it_was_asked() -> None:
    pages = Pages(token_required=False)
    fragment = pages.error(request("POST"), ExecutionNotFound("no execution x"), fragment=True)
    assert fragment.status_code == 404
    assert b'class="form-error"' in fragment.body
    assert b"no execution x" in fragment.body
    page = pages.error(request(), ExecutionNotFound("no execution <x>"))
    assert b"no execution &lt;x&gt;" in page.body
    assert b"<!doctype html>" in page.body


def test_durations_and_times_read_as_people_write_them() -> None:
    assert [seconds(v) for v in (None, 0.414, 12.34, 245, 7380)] == [
        "\u2013",
        "0.41 s",
        "12.3 s",
        "4 m 05 s",
        "2 h 03 m",
    ]
    assert when("2026-11-27T22:40:01.5+00:00") == "2026-11-27 22:40:01 UTC"
