"""Telegram faults and bursts: nothing lost, nothing doubled, order kept, flood limits kept."""

from __future__ import annotations

import asyncio
import re
import sqlite3

from tests.integration.conftest import OWNER, running
from tests.integration.test_mail_to_chat import mail

TEMPLATE = (
    b"From: Sender {i} <s{i}@example.org>\r\nTo: me@example.org\r\n"
    b"Subject: Burst mail {i}\r\nMessage-ID: <burst-{i}@example.org>\r\n\r\nBody {i}\r\n"
)


def posted(botapi, chat_id: int = OWNER) -> list[str]:
    """Texts Telegram accepted for a chat, in order."""
    return [
        str(c.params["text"])
        for c in botapi.calls("sendMessage", ok_only=True)
        if int(c.params["chat_id"]) == chat_id
    ]


async def wait_posted(botapi, count: int, chat_id: int = OWNER, timeout: float = 30) -> list[str]:
    """Wait (bounded) until `count` messages were accepted for the chat."""
    async with asyncio.timeout(timeout):
        while len(posted(botapi, chat_id)) < count:
            await botapi.next_call("sendMessage", timeout=timeout, ok_only=True)
    return posted(botapi, chat_id)


async def test_burst_of_300_becomes_one_digest(settings_for, dovecot, mail_user, botapi) -> None:
    settings = settings_for()
    async with running(settings) as bridge:
        await bridge.ready()  # first contact: the (empty) mailbox is known
    # 300 mails land at once (here: while the bridge is down, so they are one burst).
    dovecot.fill(mail_user.name, 300, TEMPLATE)
    async with running(settings) as bridge:
        (digest,) = await wait_posted(botapi, 1)
        # The burst is handled; the next single mail is posted on its own, once.
        dovecot.append(mail_user.name, mail_user.password, mail("After the burst"))
        texts = await wait_posted(botapi, 2)
    assert "300 new mails" in digest
    assert "Sender 1" in digest
    assert len(digest) <= 4096
    assert "+" in digest  # not all 300 fit: the rest is counted
    assert len(texts) == 2
    assert "After the burst" in texts[1]


async def test_faults_keep_order_and_lose_nothing(settings_for, dovecot, mail_user, botapi):
    async with running(settings_for()) as bridge:
        await bridge.ready()
        botapi.fail("sendMessage", 502, count=2)
        botapi.fail("sendMessage", 429, count=1, retry_after=1)
        botapi.fail("sendMessage", 500, count=1)
        for n in range(6):
            dovecot.append(mail_user.name, mail_user.password, mail(f"Ordered {n}"))
        texts = await wait_posted(botapi, 6, timeout=60)
    numbers = [int(m.group(1)) for t in texts if (m := re.search(r"Ordered (\d)", t))]
    assert numbers == list(range(6))  # every mail once, in delivery order


async def test_slow_bot_api_still_posts_once(settings_for, dovecot, mail_user, botapi) -> None:
    async with running(settings_for()) as bridge:
        await bridge.ready()
        botapi.delay("sendMessage", 2.0, count=1)  # slow, but within PTB's write timeout
        dovecot.append(mail_user.name, mail_user.password, mail("Slowly"))
        texts = await wait_posted(botapi, 1, timeout=30)
    assert len(texts) == 1


async def test_one_message_a_second_per_chat(settings_for, dovecot, mail_user, botapi) -> None:
    group = -100123
    settings = settings_for(telegram={"chat_interval": 1.0, "notify_chat_ids": [OWNER, group]})
    async with running(settings) as bridge:
        await bridge.ready()
        for n in range(4):
            dovecot.append(mail_user.name, mail_user.password, mail(f"Paced {n}"))
        await wait_posted(botapi, 4, chat_id=group, timeout=30)
    for chat in (OWNER, group):
        assert botapi.max_sends_in_window(chat, 0.95) <= 1
        assert len(posted(botapi, chat)) == 4


async def test_locked_database_delays_but_loses_nothing(
    settings_for, dovecot, mail_user, botapi, tmp_path
) -> None:
    settings = settings_for()
    url = f"{settings.core.database_url}?timeout=0.2"
    settings = settings.__class__(
        core=settings.core.model_copy(update={"database_url": url}),
        telegram=settings.telegram,
        imap=settings.imap,
        smtp=settings.smtp,
    )
    async with running(settings) as bridge:
        await bridge.ready()
        blocker = sqlite3.connect(tmp_path / "bridge.db", isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")
        try:
            dovecot.append(mail_user.name, mail_user.password, mail("Locked out"))
            # Telegram gets the summary; recording it waits for the lock.
            await wait_posted(botapi, 1)
            await asyncio.sleep(1.0)  # hold the lock across several retries
        finally:
            blocker.execute("COMMIT")
            blocker.close()
        dovecot.append(mail_user.name, mail_user.password, mail("Unlocked"))
        texts = await wait_posted(botapi, 2)
    async with running(settings) as bridge:  # a restart posts neither again
        await bridge.ready()
    assert len(posted(botapi)) == 2
    assert "Locked out" in texts[0]
    assert "Unlocked" in texts[1]
