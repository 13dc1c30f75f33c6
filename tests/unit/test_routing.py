"""Routing: each matcher, first match wins, defaults, chats and topics, mutes, de-duplication."""

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.config import RouteSettings
from bridge.routing import Decision, Destination, MailFacts, matches, route

DEFAULTS = [100, 200]


def mail(
    *,
    account: str = "work",
    folder: str = "INBOX",
    senders: tuple[tuple[str, str], ...] = (("Ann Smith", "ann@example.org"),),
    recipients: tuple[tuple[str, str], ...] = (("Me", "me@example.net"),),
    subject: str = "Quarterly report",
) -> MailFacts:
    """A mail with plain defaults; each test changes only what it is about."""
    return MailFacts(account, folder, senders, recipients, subject)


def rule(**fields: Any) -> RouteSettings:
    """A route as the user writes it; `from` goes in as from_ since it is a Python keyword."""
    if "from_" in fields:
        fields["from"] = fields.pop("from_")
    return RouteSettings.model_validate(fields)


@pytest.mark.parametrize(
    ("fields", "hit", "miss"),
    [
        ({"account": "work"}, mail(account="work"), mail(account="home")),
        ({"account": "w*"}, mail(account="work"), mail(account="home")),
        ({"folder": "INBOX"}, mail(folder="INBOX"), mail(folder="Archive")),
        ({"folder": "lists/*"}, mail(folder="Lists/python"), mail(folder="INBOX")),
        ({"from_": "*@example.org"}, mail(), mail(senders=(("Ann", "ann@example.com"),))),
        ({"to": "me@*"}, mail(), mail(recipients=(("You", "you@example.net"),))),
        ({"subject": "*report*"}, mail(), mail(subject="Lunch?")),
        ({"subject": "[[]ci] *"}, mail(subject="[CI] build failed"), mail(subject="CI build")),
    ],
)
def test_each_matcher_alone(fields: dict[str, Any], hit: MailFacts, miss: MailFacts) -> None:
    assert matches(rule(**fields), hit)
    assert not matches(rule(**fields), miss)


def test_a_route_without_matchers_matches_everything() -> None:
    assert matches(rule(), mail(senders=(), recipients=(), subject=""))


def test_every_given_matcher_must_match() -> None:
    both = rule(account="work", subject="*invoice*")
    assert matches(both, mail(subject="Invoice 42"))
    assert not matches(both, mail(subject="Quarterly report"))
    assert not matches(both, mail(account="home", subject="Invoice 42"))


@pytest.mark.parametrize(
    "fields",
    [
        {"account": "WORK"},
        {"folder": "inbox"},
        {"from_": "ANN@EXAMPLE.ORG"},
        {"from_": "ann smith"},
        {"to": "ME@Example.Net"},
        {"subject": "QUARTERLY *"},
    ],
)
def test_matching_ignores_case(fields: dict[str, Any]) -> None:
    assert matches(rule(**fields), mail())


def test_casefold_matches_beyond_ascii() -> None:
    assert matches(rule(subject="STRASSE*"), mail(subject="Straße 5"))


@pytest.mark.parametrize("pattern", ["ann smith", "ann@example.org", "Ann*", "*@example.org"])
def test_from_matches_display_name_or_address(pattern: str) -> None:
    assert matches(rule(from_=pattern), mail())


def test_from_does_not_match_name_and_address_together() -> None:
    # Each is matched on its own, never the "Name <address>" form.
    assert not matches(rule(from_="Ann Smith <ann@example.org>"), mail())
    assert not matches(rule(from_="*smith*example*"), mail())


def test_from_matches_if_any_sender_matches() -> None:
    two = mail(senders=(("Bob", "bob@example.com"), ("Ann", "ann@example.org")))
    assert matches(rule(from_="ann@*"), two)
    assert not matches(rule(from_="carl@*"), two)


def test_to_counts_every_recipient_including_cc() -> None:
    # routing receives To and Cc together; the second one stands for a Cc address.
    to_and_cc = mail(recipients=(("Me", "me@example.net"), ("Team", "team@lists.example.net")))
    assert matches(rule(to="team@lists.*"), to_and_cc)
    assert matches(rule(to="team"), to_and_cc)
    assert not matches(rule(to="team@lists.*"), mail())


def test_from_does_not_look_at_recipients_nor_to_at_senders() -> None:
    assert not matches(rule(from_="me@example.net"), mail())
    assert not matches(rule(to="ann@example.org"), mail())


def test_mail_without_from_matches_only_patterns_for_the_empty_string() -> None:
    nobody = mail(senders=())
    assert matches(rule(from_="*"), nobody)
    assert not matches(rule(from_="?*"), nobody)
    assert not matches(rule(from_="*@*"), nobody)


def test_empty_display_name_is_not_matched_as_a_name() -> None:
    assert not matches(rule(from_=""), mail(senders=(("", "ann@example.org"),)))


def test_first_matching_route_wins() -> None:
    routes = [
        rule(subject="*lunch*", chats=[1]),
        rule(from_="ann@*", chats=[2]),
        rule(chats=[3]),
    ]
    assert route(mail(), routes, DEFAULTS) == Decision((Destination(2),), False, "route 2")
    assert route(mail(subject="lunch"), routes, DEFAULTS).reason == "route 1"
    assert route(mail(senders=()), routes, DEFAULTS).reason == "route 3"


def test_no_match_goes_to_the_default_chats_without_topic() -> None:
    decision = route(mail(), [rule(account="home", chats=[1], topic="Home")], DEFAULTS)
    assert decision == Decision((Destination(100), Destination(200)), False, "default chats")


def test_no_routes_goes_to_the_default_chats() -> None:
    assert route(mail(), [], [7]) == Decision((Destination(7),), False, "default chats")


def test_route_with_chats_and_topic_applies_topic_to_every_chat() -> None:
    decision = route(mail(), [rule(chats=[5, 6], topic="Work")], DEFAULTS)
    assert decision == Decision((Destination(5, "Work"), Destination(6, "Work")), False, "route 1")


def test_route_without_chats_uses_default_chats_with_its_topic() -> None:
    decision = route(mail(), [rule(topic=42)], DEFAULTS)
    assert decision.destinations == (Destination(100, 42), Destination(200, 42))


def test_mute_route_posts_nowhere() -> None:
    routes = [rule(subject="*lunch*", chats=[1]), rule(from_="ann@*", mute=True, chats=[2])]
    assert route(mail(), routes, DEFAULTS) == Decision((), True, "mute route 2")


def test_mute_route_that_does_not_match_is_skipped() -> None:
    routes = [rule(from_="bob@*", mute=True), rule(chats=[3])]
    assert route(mail(), routes, DEFAULTS) == Decision((Destination(3),), False, "route 2")


def test_muted_sender_beats_routes() -> None:
    routes = [rule(from_="ann@*", chats=[1])]
    decision = route(mail(), routes, DEFAULTS, muted={"ann@example.org"})
    assert decision == Decision((), True, "muted sender ann@example.org")


def test_muted_sender_compares_address_in_lower_case() -> None:
    shouting = mail(senders=(("Ann", "Ann@Example.ORG"),))
    decision = route(shouting, [], DEFAULTS, muted={"ann@example.org"})
    assert decision == Decision((), True, "muted sender ann@example.org")


def test_muted_set_is_about_from_only() -> None:
    muted = {"me@example.net", "ann smith"}
    assert route(mail(), [], DEFAULTS, muted=muted).reason == "default chats"


def test_destinations_are_deduplicated_in_order() -> None:
    decision = route(mail(), [rule(chats=[3, 1, 3, 2, 1])], DEFAULTS)
    assert [d.chat_id for d in decision.destinations] == [3, 1, 2]
    assert route(mail(), [], [9, 8, 9]).destinations == (Destination(9), Destination(8))


people = st.lists(st.tuples(st.text(), st.text()), max_size=3).map(tuple)
patterns = (
    st.none()
    | st.text(max_size=20)
    | st.sampled_from(["[", "[!", "[]", "[z-a]", "\\", "*[", "**?**", "[!]]"])
)


@settings(max_examples=300, deadline=None)
@given(
    facts=st.builds(MailFacts, st.text(), st.text(), people, people, st.text()),
    matchers=st.lists(
        st.fixed_dictionaries(
            {
                "account": patterns,
                "folder": patterns,
                "from": patterns,
                "to": patterns,
                "subject": patterns,
                "mute": st.booleans(),
            }
        ),
        max_size=4,
    ),
    muted=st.frozensets(st.text(max_size=10), max_size=3),
)
def test_route_never_raises(
    facts: MailFacts, matchers: list[dict[str, Any]], muted: frozenset[str]
) -> None:
    routes = [RouteSettings.model_validate(fields) for fields in matchers]
    decision = route(facts, routes, DEFAULTS, muted=muted)
    assert decision.muted or decision.destinations
    assert not (decision.muted and decision.destinations)
