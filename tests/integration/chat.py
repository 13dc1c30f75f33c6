"""What the integration tests share: a test mail, and what a chat received from the bot.

A mail counts as received in a chat when Telegram accepted a message carrying it: its summary
("📧 Subject", after an origin line "📥 ..." when there is one) or a line "N. Sender: Subject"
of a combined message ("📬 N new mails"). A combined message lists only its newest mails
(COMBINED_LISTED); the others are counted in its title, not named.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from email.utils import make_msgid

from bridge.db import store
from bridge.db.engine import Database, make_engine
from tests.integration.conftest import OWNER
from tests.servers.botapi import Call, html_to_text

_COMBINED = re.compile(r"📬 (\d+) new mails?(?: · .*)?")
# "N. Sender: Subject"; a sender name with ": " in it would be misread (no test uses one).
_COMBINED_LINE = re.compile(r"\d+\. .+?: (.*)")


def mail(
    subject: str,
    body: str = "Hello there.",
    sender: str = "Ann <ann@example.org>",
    *,
    date: str | None = None,
) -> bytes:
    """A small UTF-8 mail with a unique Message-ID; `subject` goes on the wire as given (an
    RFC 2047 encoded word stays encoded)."""
    headers = [f"From: {sender}", "To: me@example.org"]
    if date is not None:
        headers.append(f"Date: {date}")
    headers += [
        f"Subject: {subject}",
        f"Message-ID: {make_msgid(domain='example.org')}",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: 8bit",
    ]
    return ("\r\n".join([*headers, "", body, ""])).encode()


def accepted(botapi, chat_id: int | None = None) -> list[Call]:
    """The sendMessage calls Telegram accepted (for one chat, if given), oldest first."""
    return [
        call
        for call in botapi.calls("sendMessage", ok_only=True)
        if chat_id is None or int(call.params["chat_id"]) == chat_id
    ]


def texts(botapi, chat_id: int | None = None) -> list[str]:
    """The texts of the accepted messages, as sent (Telegram HTML for summaries)."""
    return [str(call.params["text"]) for call in accepted(botapi, chat_id)]


def visible(call: Call) -> str:
    """What the user reads of a sendMessage: its text with the HTML rendered."""
    text = str(call.params.get("text", ""))
    return html_to_text(text) if call.params.get("parse_mode") == "HTML" else text


def carried(text: str) -> tuple[int, list[str]]:
    """How many mails a message (its visible text) carries, and the subjects it names.

    (1, [subject]) for a summary, (N, newest subjects) for a combined message, (0, []) for
    anything else (command answers, outbox reports).
    """
    lines = text.splitlines()
    if lines and lines[0].startswith("📥 "):  # the account/folder a summary came to
        lines = lines[1:]
    if not lines:
        return 0, []
    if lines[0].startswith("📧 "):
        return 1, [lines[0].removeprefix("📧 ")]
    title = _COMBINED.fullmatch(lines[0])
    if title is None:
        return 0, []
    return int(title.group(1)), [m.group(1) for m in map(_COMBINED_LINE.fullmatch, lines) if m]


def received_subjects(botapi, chat_id: int = OWNER) -> list[str]:
    """The subjects of the mails a chat received, in the order it received them (a mail
    received twice appears twice)."""
    return [subject for call in accepted(botapi, chat_id) for subject in carried(visible(call))[1]]


def times_posted(botapi, subject: str, chat_id: int = OWNER) -> int:
    """How often the mail with exactly this subject reached the chat."""
    return received_subjects(botapi, chat_id).count(subject)


def times_carried(
    botapi, recorded: Mapping[int, Iterable[str]], chat_id: int = OWNER
) -> Counter[str]:
    """How many accepted messages carried each mail, counting the mails a combined message
    does not name (it names only its newest COMBINED_LISTED).

    `recorded` maps a Telegram message id to the mails (subjects) the bridge's database
    recorded as delivered by that message: what a combined message carried beyond the names.
    """
    counts: Counter[str] = Counter()
    for call in accepted(botapi, chat_id):
        _count, named = carried(visible(call))
        if named:
            counts.update({*named, *recorded.get(int(call.result["message_id"]), ())})
    return counts


async def next_text(botapi, timeout: float = 10.0) -> str:
    """The text of the next accepted sendMessage, as sent (bounded wait)."""
    call = await botapi.next_call("sendMessage", timeout=timeout, ok_only=True)
    return str(call.params["text"])


async def wait_mails(
    botapi, subjects: Iterable[str], chat_id: int = OWNER, timeout: float = 30.0
) -> list[str]:
    """Wait (bounded) until the chat received every one of `subjects`; returns what it
    received so far, in order."""
    wanted = set(subjects)
    try:
        async with asyncio.timeout(timeout):
            while not wanted <= set(received_subjects(botapi, chat_id)):
                await botapi.next_call("sendMessage", timeout=timeout, ok_only=True)
    except TimeoutError:
        received = received_subjects(botapi, chat_id)
        missing = sorted(wanted - set(received))
        raise AssertionError(
            f"chat {chat_id} did not receive {missing} within {timeout} s; it got {received}"
        ) from None
    return received_subjects(botapi, chat_id)


async def answer(botapi, chat_id: int = OWNER, timeout: float = 15.0) -> str:
    """The visible text of the bot's next accepted message to `chat_id` (bounded wait)."""
    async with asyncio.timeout(timeout):
        while True:
            call = await botapi.next_call("sendMessage", timeout=timeout, ok_only=True)
            if int(call.params["chat_id"]) == chat_id:
                return visible(call)


async def answer_containing(
    botapi, needle: str, chat_id: int = OWNER, timeout: float = 30.0
) -> str:
    """Skip the bot's messages to `chat_id` until one contains `needle` (bounded)."""
    async with asyncio.timeout(timeout):
        while True:
            text = await answer(botapi, chat_id, timeout)
            if needle in text:
                return text


async def wait_for_log(
    caplog, predicate: Callable[[logging.LogRecord], bool], timeout: float
) -> logging.LogRecord:
    """The first captured record matching predicate, waiting (bounded) for it to appear."""
    async with asyncio.timeout(timeout):
        while True:
            for record in caplog.records:
                if predicate(record):
                    return record
            await asyncio.sleep(0.05)  # caplog has no event to wait on; the bound is above


async def wait_until(
    condition: Callable[[], bool],
    bound: float,
    describe: Callable[[], str],
    interval: float = 0.05,
) -> None:
    """Poll `condition()` (bounded) until it is true, for state that has no event to wait on
    (a database row, another process); the poll interval is not a synchroniser."""
    deadline = time.monotonic() + bound
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {bound} s: {describe()}")
        await asyncio.sleep(interval)


def buttons(call) -> list[tuple[str, str]]:
    """(label, callback_data) of every inline button of a sendMessage call."""
    markup = call.params.get("reply_markup") or {}
    return [(b["text"], b["callback_data"]) for row in markup["inline_keyboard"] for b in row]


async def outbox_counts(settings) -> dict[str, int]:
    """The outbox's items per status, read from the bridge's database."""
    db = Database(make_engine(settings.core.database_url))
    try:
        return await db.run(store.outbox_counts)
    finally:
        db.engine.dispose()
