"""Decide where a new mail is posted: muted senders, then [[routes]] in order, then defaults."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

from bridge.config import RouteSettings


@dataclass(frozen=True)
class MailFacts:
    """What routing looks at: account, folder and the decoded headers."""

    account: str
    folder: str
    senders: tuple[tuple[str, str], ...]  # (display name, bare address) of From
    recipients: tuple[tuple[str, str], ...]  # (display name, bare address) of To and Cc
    subject: str


@dataclass(frozen=True)
class Destination:
    """A chat, and the forum topic in it (None: the chat itself)."""

    chat_id: int
    topic: str | int | None = None


@dataclass(frozen=True)
class Decision:
    """Where a mail goes; no destinations and muted=True means recorded as seen, posted nowhere."""

    destinations: tuple[Destination, ...]
    muted: bool
    reason: (
        str  # for the log: "route 2", "default chats", "muted sender ann@x.org", "mute route 1"
    )


def route(
    mail: MailFacts,
    routes: Sequence[RouteSettings],
    default_chats: Sequence[int],
    muted: Collection[str] = (),
) -> Decision:
    """Return where `mail` goes: a muted sender first, then the first matching route."""
    # "Mute sender" and mute routes are one rule: a muted sender is never posted, whatever route.
    for _, address in mail.senders:
        if address.lower() in muted:
            return Decision((), muted=True, reason=f"muted sender {address.lower()}")
    for number, entry in enumerate(routes, start=1):
        if not matches(entry, mail):
            continue
        if entry.mute:
            return Decision((), muted=True, reason=f"mute route {number}")
        chats = default_chats if entry.chats is None else entry.chats
        return Decision(_destinations(chats, entry.topic), muted=False, reason=f"route {number}")
    return Decision(_destinations(default_chats, None), muted=False, reason="default chats")


def matches(route: RouteSettings, mail: MailFacts) -> bool:
    """Return True if every matcher the route gives matches the mail."""
    return (
        _match(route.account, (mail.account,))
        and _match(route.folder, (mail.folder,))
        and _match(route.from_, _names_and_addresses(mail.senders))
        and _match(route.to, _names_and_addresses(mail.recipients))
        and _match(route.subject, (mail.subject,))
    )


def _match(pattern: str | None, texts: Iterable[str]) -> bool:
    # fnmatchcase on casefolded text: fnmatch.fnmatch folds case only on Windows.
    if pattern is None:
        return True
    folded = pattern.casefold()
    return any(fnmatchcase(text.casefold(), folded) for text in texts)


def _names_and_addresses(people: tuple[tuple[str, str], ...]) -> tuple[str, ...]:
    # An empty display name is no name; no one at all is matched as "" (only "*" and the like).
    texts = tuple(text for person in people for text in person if text)
    return texts or ("",)


def _destinations(chats: Iterable[int], topic: str | int | None) -> tuple[Destination, ...]:
    # dict.fromkeys drops repeated chats and keeps the order the user wrote.
    return tuple(Destination(chat_id, topic) for chat_id in dict.fromkeys(chats))
