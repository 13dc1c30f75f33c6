"""parse_query: the /search syntax to a SearchQuery, an account and a folder."""

from __future__ import annotations

from datetime import date

import pytest

from bridge.actions import SearchQuery, parse_query
from bridge.errors import UsageError


def test_words_only() -> None:
    assert parse_query("invoice  march") == (SearchQuery(words=("invoice", "march")), None, None)


def test_empty() -> None:
    assert parse_query("   ") == (SearchQuery(), None, None)


def test_every_key() -> None:
    query, account, folder = parse_query(
        "report from:ann@example.org to:bob@example.org subject:Q3 since:2024-05-01 "
        "before:2024-06-01 account:home folder:Lists"
    )
    assert query == SearchQuery(
        words=("report",),
        from_="ann@example.org",
        to="bob@example.org",
        subject="Q3",
        since=date(2024, 5, 1),
        before=date(2024, 6, 1),
    )
    assert (account, folder) == ("home", "Lists")


def test_quotes_keep_spaces() -> None:
    query, _, folder = parse_query('subject:"two words" "exact phrase" folder:"Old mail" x')
    assert query.subject == "two words"
    assert query.words == ("exact phrase", "x")
    assert folder == "Old mail"


def test_keys_are_case_insensitive_and_unknown_keys_are_words() -> None:
    query, _, _ = parse_query("From:ann re:meeting https://example.org/x")
    assert query.from_ == "ann"
    assert query.words == ("re:meeting", "https://example.org/x")


def test_utf8_words() -> None:
    query, _, _ = parse_query("Grüße subject:Köln 東京")
    assert query.words == ("Grüße", "東京")
    assert query.subject == "Köln"


def test_unclosed_quote_runs_to_the_end() -> None:
    query, _, _ = parse_query('subject:"never closed')
    assert query.subject == "never closed"


@pytest.mark.parametrize("bad", ["since:2024-13-01", "since:yesterday", "before:2024-5-1"])
def test_bad_date_names_the_right_form(bad: str) -> None:
    key = bad.split(":")[0]
    with pytest.raises(UsageError) as error:
        parse_query(f"x {bad}")
    assert str(error.value) == f"{key}: takes a date as YYYY-MM-DD, e.g. {key}:2024-05-31"


def test_a_key_without_value_is_refused() -> None:
    with pytest.raises(UsageError, match="from: needs a value"):
        parse_query("from: ann")
