"""Telegram faults and bursts: nothing lost, nothing doubled, order kept, flood limits kept.

Mails that wait for the same chat may arrive combined in one message, so these tests count the
mails a chat received (tests/integration/chat.py), not the messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import sqlite3
import time
from pathlib import Path

from tests.integration.chat import (
    accepted,
    buttons,
    carried,
    mail,
    received_subjects,
    visible,
    wait_for_log,
    wait_mails,
    wait_until,
)
from tests.integration.conftest import OWNER, running
from tests.servers.botapi import MAX_TEXT, Call

TEMPLATE = (
    b"From: Sender {i} <s{i}@example.org>\r\nTo: me@example.org\r\n"
    b"Subject: Burst mail {i}\r\nMessage-ID: <burst-{i}@example.org>\r\n\r\nBody {i}\r\n"
)
NEWS = "News <news@example.org>"
STORY = "The whole story, in the mail's text."
FLOOD_WAIT = 60  # seconds a 429 asks for: far longer than a stop may take
STOP_BOUND = 5.0  # seconds a stop may take


async def test_burst_of_300_becomes_one_digest(settings_for, dovecot, mail_user, botapi) -> None:
    settings = settings_for()
    async with running(settings) as bridge:
        await bridge.ready()  # first contact: the (empty) mailbox is known
    # 300 mails land at once (here: while the bridge is down, so they are one burst): 280
    # from as many senders, then 20 from one newsletter.
    dovecot.fill(mail_user.name, 280, TEMPLATE)
    client = dovecot.connect(mail_user.name, mail_user.password)
    try:
        client.select_folder("INBOX", readonly=True)  # UIDs for the 280 first, then for these
        for n in range(1, 21):
            client.append("INBOX", mail(f"Newsletter {n}", sender=NEWS))
    finally:
        client.logout()
    async with running(settings) as bridge:
        await bridge.ready()  # checked, and everything it found delivered
        digests = accepted(botapi)
        # The burst is handled; the next single mail is posted on its own, once.
        dovecot.append(mail_user.name, mail_user.password, mail("After the burst"))
        await wait_mails(botapi, ["After the burst"])
    assert [carried(visible(call))[0] for call in digests] == [300]  # one message for all
    (digest,) = digests
    text = visible(digest)
    assert "300 new mails" in text
    assert len(text) <= MAX_TEXT
    # A backlog shows its newest mails, in order, and who sent most of it: not the oldest.
    assert carried(text) == (300, [f"Newsletter {n}" for n in range(11, 21)])
    assert "Burst mail" not in text
    assert "news@example.org (20)" in text
    buttons = [b for row in digest.params["reply_markup"]["inline_keyboard"] for b in row]
    assert len({b["callback_data"] for b in buttons}) == 10
    assert all(b["callback_data"].startswith("open:") for b in buttons)
    assert received_subjects(botapi)[-1:] == ["After the burst"]
    assert len(accepted(botapi)) == 2


async def test_faults_keep_order_and_lose_nothing(settings_for, dovecot, mail_user, botapi):
    subjects = [f"Ordered {n}" for n in range(6)]
    async with running(settings_for()) as bridge:
        await bridge.ready()
        botapi.fail("sendMessage", 502, count=2)
        botapi.fail("sendMessage", 429, count=1, retry_after=1)
        botapi.fail("sendMessage", 500, count=1)
        for subject in subjects:
            dovecot.append(mail_user.name, mail_user.password, mail(subject))
        await wait_mails(botapi, subjects, timeout=60)
    assert len(botapi.calls("sendMessage")) > len(accepted(botapi))  # the faults did happen
    # Every mail once, in UID order, however the retries combined them into messages.
    assert received_subjects(botapi) == subjects


async def test_slow_bot_api_still_posts_once(settings_for, dovecot, mail_user, botapi) -> None:
    async with running(settings_for()) as bridge:
        await bridge.ready()
        botapi.delay("sendMessage", 2.0, count=1)  # slow, but within PTB's write timeout
        dovecot.append(mail_user.name, mail_user.password, mail("Slowly"))
        await wait_mails(botapi, ["Slowly"])
    assert received_subjects(botapi) == ["Slowly"]
    assert len(botapi.calls("sendMessage")) == 1  # not sent again while the answer was slow


async def test_one_message_a_second_per_chat(settings_for, dovecot, mail_user, botapi) -> None:
    group = -100123
    subjects = [f"Paced {n}" for n in range(4)]
    settings = settings_for(telegram={"chat_interval": 1.0, "notify_chat_ids": [OWNER, group]})
    async with running(settings) as bridge:
        await bridge.ready()
        for subject in subjects:
            # Each mail arrives just after the one before reached both chats: it is due well
            # within a second of the last message, so only the pacing holds it back.
            dovecot.append(mail_user.name, mail_user.password, mail(subject))
            for chat in (OWNER, group):
                await wait_mails(botapi, [subject], chat_id=chat)
    for chat in (OWNER, group):
        assert received_subjects(botapi, chat) == subjects
        assert len(accepted(botapi, chat)) == 4  # one message a mail: three paced gaps
        assert botapi.max_sends_in_window(chat, 0.95) <= 1


def _recorded(database: Path, subject: str) -> bool:
    """Whether the watcher has recorded the mail for delivery (read-only look)."""
    with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
        row = db.execute("SELECT 1 FROM posted_mail WHERE subject = ?", (subject,)).fetchone()
    return row is not None


async def test_locked_database_delays_but_loses_nothing(
    settings_for, dovecot, mail_user, botapi, tmp_path, caplog
) -> None:
    settings = settings_for()
    url = f"{settings.core.database_url}?timeout=0.2"
    core = settings.core.model_copy(update={"database_url": url})
    settings = dataclasses.replace(settings, core=core)
    database = tmp_path / "bridge.db"

    def lock() -> sqlite3.Connection:
        blocker = sqlite3.connect(database, isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")
        return blocker

    def unlock(blocker: sqlite3.Connection) -> None:
        blocker.execute("COMMIT")
        blocker.close()

    def write_failure(record: logging.LogRecord) -> bool:
        return record.name == "bridge.db.engine" and "database unusable" in record.getMessage()

    async with running(settings) as bridge:
        await bridge.ready()
        # 1. Locked when the mail arrives: the watcher cannot record it (with its cursor).
        blocker = lock()
        try:
            dovecot.append(mail_user.name, mail_user.password, mail("Locked out"))
            await wait_for_log(caplog, write_failure, 10)
            await asyncio.sleep(1.0)  # the lock's length, not a wait for something: retries fail
            assert received_subjects(botapi) == []
        finally:
            unlock(blocker)
        await wait_mails(botapi, ["Locked out"])

        # 2. Locked after the mail was recorded and while its message is on the way: Telegram
        # accepts it, and recording that it was delivered waits for the lock.
        botapi.delay("sendMessage", 1.5)  # the answer comes 1.5 s after the request
        dovecot.append(mail_user.name, mail_user.password, mail("Accepted, then locked"))
        await wait_until(
            lambda: _recorded(database, "Accepted, then locked"),
            10,
            lambda: f"not recorded; received {received_subjects(botapi)}",
        )
        earlier = [r for r in caplog.records if write_failure(r)]
        blocker = lock()
        try:
            await wait_mails(botapi, ["Accepted, then locked"])
            await wait_for_log(caplog, lambda r: write_failure(r) and r not in earlier, 10)
            await asyncio.sleep(1.0)  # the lock's length: retries fail
        finally:
            unlock(blocker)

        dovecot.append(mail_user.name, mail_user.password, mail("Unlocked"))
        await wait_mails(botapi, ["Unlocked"])
    async with running(settings) as bridge:  # a restart posts none of them again
        await bridge.ready()
    assert received_subjects(botapi) == ["Locked out", "Accepted, then locked", "Unlocked"]


async def refused_call(botapi, needle: str = "", timeout: float = 15.0) -> Call:
    """The next sendMessage (with `needle` in its text) that flood control refused (bounded)."""
    async with asyncio.timeout(timeout):
        while True:
            call = await botapi.next_call("sendMessage", timeout=timeout)
            if call.status == 429 and needle in str(call.params.get("text", "")):
                return call


def replies_to(botapi, message_id: int) -> list[Call]:
    """The accepted messages that answer message `message_id`."""
    found = []
    for call in accepted(botapi):
        reply = call.params.get("reply_parameters") or {}
        answered = reply.get("message_id") or call.params.get("reply_to_message_id")
        if answered is not None and int(answered) == message_id:
            found.append(call)
    return found


async def first_reply(botapi, message_id: int, timeout: float = 15.0) -> Call:
    """The first accepted message that answers message `message_id` (bounded wait)."""
    async with asyncio.timeout(timeout):
        while not replies_to(botapi, message_id):
            await botapi.next_call("sendMessage", timeout=timeout, ok_only=True)
    return replies_to(botapi, message_id)[0]


async def full_text_button(botapi, dovecot, mail_user, subject: str) -> tuple[int, str]:
    """Deliver a mail; its summary's message id and the callback data of its Full text button."""
    dovecot.append(mail_user.name, mail_user.password, mail(subject, body=STORY))
    await wait_mails(botapi, [subject])
    (summary,) = [c for c in accepted(botapi) if carried(visible(c))[1] == [subject]]
    (data,) = [data for label, data in buttons(summary) if "Full text" in label]
    return int(summary.result["message_id"]), data


async def test_a_short_flood_wait_on_a_buttons_answer_is_waited_out(
    settings_for, dovecot, mail_user, botapi
) -> None:
    async with running(settings_for()) as bridge:
        await bridge.ready()
        message_id, full_text = await full_text_button(botapi, dovecot, mail_user, "Short wait")
        botapi.fail("sendMessage", 429, retry_after=1)
        botapi.press_button(OWNER, OWNER, message_id, full_text)
        refused = await refused_call(botapi, STORY)
        answer = await first_reply(botapi, message_id)
    assert STORY in str(answer.params["text"])
    assert answer.time - refused.time >= 1.0  # after the wait Telegram asked for
    assert len(replies_to(botapi, message_id)) == 1


async def test_a_long_flood_wait_on_a_buttons_answer_holds_up_no_stop(
    settings_for, dovecot, mail_user, botapi
) -> None:
    settings = settings_for()
    async with running(settings) as bridge:
        await bridge.ready()
        message_id, full_text = await full_text_button(botapi, dovecot, mail_user, "Long wait")
        botapi.fail("sendMessage", 429, retry_after=FLOOD_WAIT)
        botapi.press_button(OWNER, OWNER, message_id, full_text)
        await refused_call(botapi, STORY)
        started = time.monotonic()
        await bridge.stop()
        took = time.monotonic() - started
    assert took < STOP_BOUND, f"the stop took {took:.1f} s during a {FLOOD_WAIT} s flood wait"
    assert replies_to(botapi, message_id) == []
    async with running(settings) as bridge:  # the job was given back: it is done now
        answer = await first_reply(botapi, message_id)
    assert STORY in str(answer.params["text"])
    assert len(replies_to(botapi, message_id)) == 1


async def test_a_long_flood_wait_on_an_outbox_report_holds_up_no_stop(
    settings_for, botapi, smtpd
) -> None:
    async with running(settings_for(smtpd=smtpd, imap={"save_sent": False})) as bridge:
        await bridge.ready()
        botapi.fail("sendMessage", 429, count=1000, retry_after=FLOOD_WAIT)
        botapi.send_user_message(OWNER, OWNER, "/send ann@example.org Flooded\nStill sent.")
        await smtpd.next_message(timeout=15)
        await refused_call(botapi, "Sent to")  # the outbox's report meets the flood
        started = time.monotonic()
        await bridge.stop()
        took = time.monotonic() - started
    assert took < STOP_BOUND, f"the stop took {took:.1f} s during a {FLOOD_WAIT} s flood wait"
    assert len(smtpd.received) == 1
