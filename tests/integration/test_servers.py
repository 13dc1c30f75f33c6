"""Smoke tests: the loopback servers behave as the bridge's integration tests rely on."""

from __future__ import annotations

import asyncio
import datetime as dtm
import ssl
import time
from collections.abc import Iterator
from email.message import EmailMessage

import aiosmtplib
import pytest
import telegram
from imapclient import IMAPClient
from telegram.error import (
    BadRequest,
    ChatMigrated,
    Forbidden,
    InvalidToken,
    NetworkError,
    RetryAfter,
)

from bridge.logs import mask_secrets
from bridge.retry import retry_delay
from bridge.telegram.errors import Verdict, classify
from tests.servers.botapi import DEFAULT_TOKEN, FakeBotApi
from tests.servers.certs import CA
from tests.servers.dovecot import DovecotServer, MailUser
from tests.servers.smtpd import SmtpServer

RAW = b"From: Alice <alice@example.test>\r\nTo: bob@example.test\r\nSubject: hello\r\n\r\nHi\r\n"


def _imap(dovecot: DovecotServer, context: ssl.SSLContext) -> IMAPClient:
    """An IMAPS connection to the test Dovecot using `context`."""
    return IMAPClient(dovecot.host, dovecot.port, ssl=True, ssl_context=context, timeout=10)


# Dovecot


def test_imaps_login_verifies_certificate(
    dovecot: DovecotServer, mail_user: MailUser, ca: CA
) -> None:
    """A client trusting only the test CA logs in over IMAPS and sees IDLE."""
    client = _imap(dovecot, ssl.create_default_context(cafile=str(ca.ca_file)))
    try:
        client.login(mail_user.name, mail_user.password)
        assert b"IDLE" in client.capabilities()
        assert client.select_folder("INBOX", readonly=True)[b"EXISTS"] == 0
    finally:
        client.logout()


def test_imaps_without_the_ca_is_refused(dovecot: DovecotServer) -> None:
    """The system trust store does not know the test CA: verification fails."""
    with pytest.raises(ssl.SSLCertVerificationError):
        _imap(dovecot, ssl.create_default_context())


def test_wrong_password_fails_without_slowing_later_logins(
    dovecot: DovecotServer, mail_user: MailUser
) -> None:
    """Failed logins are refused, and Dovecot's per-IP auth penalty is off."""
    started = time.monotonic()
    for _ in range(3):
        with pytest.raises(IMAPClient.Error):
            dovecot.connect(mail_user.name, "wrong password")
    dovecot.connect(mail_user.name, mail_user.password).logout()
    # With the penalty this takes 2 + 4 + 8 s; without it ~0.5 s per failure.
    assert time.monotonic() - started < 5


def test_append_returns_uid_and_leaves_message_unseen(
    dovecot: DovecotServer, mail_user: MailUser
) -> None:
    """APPEND gives consecutive UIDs; flags() reads them without setting \\Seen."""
    first = dovecot.append(mail_user.name, mail_user.password, RAW)
    second = dovecot.append(mail_user.name, mail_user.password, RAW, flags=[b"\\Flagged"])
    assert second == first + 1
    assert b"\\Seen" not in dovecot.flags(mail_user.name, mail_user.password, first)
    assert b"\\Seen" not in dovecot.flags(mail_user.name, mail_user.password, first)
    assert b"\\Flagged" in dovecot.flags(mail_user.name, mail_user.password, second)


def test_append_to_other_mailbox(dovecot: DovecotServer, mail_user: MailUser) -> None:
    """append() creates a missing mailbox."""
    uid = dovecot.append(mail_user.name, mail_user.password, RAW, mailbox="Archive")
    assert dovecot.flags(mail_user.name, mail_user.password, uid, mailbox="Archive") is not None


def test_idle_session_is_woken_by_append(dovecot: DovecotServer, mail_user: MailUser) -> None:
    """An IDLEing session hears EXISTS after another connection's APPEND (bounded wait)."""
    client = dovecot.connect(mail_user.name, mail_user.password)
    try:
        client.select_folder("INBOX")
        client.idle()
        dovecot.append(mail_user.name, mail_user.password, RAW)
        deadline = time.monotonic() + 5
        exists: list[int] = []
        while not exists and (remaining := deadline - time.monotonic()) > 0:
            responses = client.idle_check(timeout=remaining)
            exists = [n for n, kind, *_ in responses if kind == b"EXISTS"]
        client.idle_done()
        assert exists == [1]
    finally:
        client.logout()


def test_fill_creates_messages_dovecot_sees_in_order(
    dovecot: DovecotServer, mail_user: MailUser
) -> None:
    """fill() writes 500 maildir files that Dovecot lists, unseen, with UIDs in order."""
    template = b"From: a@example.test\r\nSubject: message {i}\r\n\r\nbody {i}\r\n"
    dovecot.fill(mail_user.name, 500, template)
    client = dovecot.connect(mail_user.name, mail_user.password)
    try:
        assert client.select_folder("INBOX", readonly=True)[b"EXISTS"] == 500
        assert len(client.search("UNSEEN")) == 500
        uids = client.search("ALL")
        fetched = client.fetch([uids[0], uids[-1]], ["BODY.PEEK[HEADER.FIELDS (SUBJECT)]"])
        subjects = [fetched[uid][b"BODY[HEADER.FIELDS (SUBJECT)]"].strip() for uid in fetched]
    finally:
        client.logout()
    assert sorted(subjects) == [b"Subject: message 1", b"Subject: message 500"]
    assert fetched[uids[-1]][b"BODY[HEADER.FIELDS (SUBJECT)]"].strip().endswith(b"500")


def test_restart_keeps_port_users_and_mail(ca: CA) -> None:
    """restart() comes back on the same port with the same users and messages."""
    with DovecotServer(ca) as server:
        server.add_user("keeper", "pw-keeper")
        uid = server.append("keeper", "pw-keeper", RAW)
        port = server.port
        server.restart()
        assert server.port == port
        assert b"\\Seen" not in server.flags("keeper", "pw-keeper", uid)
        server.stop()
        assert not server.running
        with pytest.raises(ConnectionRefusedError):
            server.connect("keeper", "pw-keeper", timeout=2)


# SMTP


def _mail() -> EmailMessage:
    """A small message with a non-ASCII subject."""
    message = EmailMessage()
    message["From"] = "bridge@example.test"
    message["To"] = "friend@example.test"
    message["Subject"] = "Grüße"
    message.set_content("Hallo")
    return message


async def _send(smtpd: SmtpServer, ca: CA, **overrides: object) -> object:
    """Submit _mail() with aiosmtplib the way the bridge would for this server variant."""
    options: dict[str, object] = {
        "hostname": smtpd.host,
        "port": smtpd.port,
        "username": smtpd.username,
        "password": smtpd.password,
        "tls_context": ca.client_ssl_context(),
        "timeout": 10,
    }
    options["use_tls" if smtpd.tls == "ssl" else "start_tls"] = True
    options.update(overrides)
    return await aiosmtplib.send(_mail(), **options)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "tls",
    [
        pytest.param("ssl", marks=pytest.mark.smtpd(tls="ssl")),
        pytest.param("starttls", marks=pytest.mark.smtpd(tls="starttls")),
    ],
)
async def test_smtp_delivers_and_records(smtpd: SmtpServer, ca: CA, tls: str) -> None:
    """aiosmtplib submits over TLS with AUTH; the recorder has envelope and message."""
    assert smtpd.tls == tls
    await _send(smtpd, ca)
    received = await smtpd.next_message(timeout=5)
    assert received.mail_from == "bridge@example.test"
    assert received.rcpt_tos == ["friend@example.test"]
    assert received.login == smtpd.username
    assert received.message()["Subject"] == "Grüße"


@pytest.mark.smtpd(tls="starttls")
async def test_smtp_starttls_required_before_auth(smtpd: SmtpServer, ca: CA) -> None:
    """Without STARTTLS the server offers no AUTH, so nothing can be sent."""
    with pytest.raises(aiosmtplib.SMTPException):
        await _send(smtpd, ca, start_tls=False)
    assert smtpd.received == []


async def test_smtp_fail_next_gives_the_error_once(smtpd: SmtpServer, ca: CA) -> None:
    """fail_next() answers DATA (or RCPT) with the given reply, then accepts again."""
    smtpd.fail_next(451, "4.3.0 try later")
    with pytest.raises(aiosmtplib.SMTPDataError) as data_error:
        await _send(smtpd, ca)
    assert data_error.value.code == 451
    smtpd.fail_next(550, "5.7.1 rejected", command="RCPT")
    with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as rcpt_error:
        await _send(smtpd, ca)
    assert rcpt_error.value.recipients[0].code == 550
    assert smtpd.received == []
    await _send(smtpd, ca)
    assert (await smtpd.next_message()).rcpt_tos == ["friend@example.test"]


async def test_smtp_wrong_password_is_refused(smtpd: SmtpServer, ca: CA) -> None:
    """AUTH with a wrong password gets 535."""
    with pytest.raises(aiosmtplib.SMTPAuthenticationError) as error:
        await _send(smtpd, ca, password="wrong")
    assert error.value.code == 535


async def test_smtp_stop_and_start_on_the_same_port(smtpd: SmtpServer, ca: CA) -> None:
    """A stopped server refuses connections; start() brings it back on the same port."""
    smtpd.stop()
    with pytest.raises(aiosmtplib.SMTPConnectError):
        await _send(smtpd, ca)
    smtpd.start()
    await _send(smtpd, ca)
    assert len(smtpd.received) == 1


async def test_smtp_next_message_is_bounded(smtpd: SmtpServer) -> None:
    """Waiting for mail that never comes raises TimeoutError."""
    with pytest.raises(TimeoutError):
        await smtpd.next_message(timeout=0.2)


# Bot API


@pytest.fixture(autouse=True)
def _masked_tokens() -> Iterator[None]:
    """httpx logs URLs with the token; mask it as the bridge does (the suite audits the log)."""
    undo = mask_secrets([DEFAULT_TOKEN, "42:OtherTokenForThisTestOnly"])
    yield
    undo()


def _bot(botapi: FakeBotApi, token: str | None = None) -> telegram.Bot:
    """A PTB Bot pointed at the fake server, as the bridge's API_URL setting does."""
    return telegram.Bot(
        token or botapi.token, base_url=f"{botapi.url}/bot", base_file_url=f"{botapi.url}/file/bot"
    )


async def test_bot_get_me_and_send_message(botapi: FakeBotApi) -> None:
    """getMe and sendMessage work; the call is recorded and awaitable."""
    async with _bot(botapi) as bot:
        assert bot.username == "mailbridge_test_bot"
        sent = await bot.send_message(1001, "<b>New mail</b> from A &amp; B", parse_mode="HTML")
        call = await botapi.next_call("sendMessage", timeout=5)
    assert call.params["chat_id"] == 1001
    assert call.params["parse_mode"] == "HTML"
    assert sent.text == "New mail from A & B"
    assert sent.from_user is not None
    assert sent.from_user.is_bot
    assert botapi.sent_messages(1001) == ["<b>New mail</b> from A &amp; B"]
    assert botapi.max_sends_in_window(1001, 1.0) == 1


async def test_bot_get_updates_receives_user_message(botapi: FakeBotApi) -> None:
    """A queued user message arrives through getUpdates, also waking a waiting long poll."""
    async with _bot(botapi) as bot:
        first_id = botapi.send_user_message(7, 7, "/start")
        updates = await bot.get_updates(timeout=5)
        assert [u.message.text for u in updates if u.message] == ["/start"]
        first = updates[0].message
        assert first is not None
        assert first.message_id == first_id
        assert [(e.type, e.offset, e.length) for e in first.entities] == [("bot_command", 0, 6)]

        poll = asyncio.create_task(bot.get_updates(offset=updates[-1].update_id + 1, timeout=10))
        await botapi.next_call("getUpdates", timeout=5)  # the first poll, answered at once
        started = time.monotonic()
        botapi.send_user_message(7, 7, "hello")
        later = await asyncio.wait_for(poll, timeout=5)
        assert time.monotonic() - started < 2
        assert [u.message.text for u in later if u.message] == ["hello"]


async def test_bot_reply_and_button(botapi: FakeBotApi) -> None:
    """A user reply carries the bot's message; a button press arrives as a callback query."""
    async with _bot(botapi) as bot:
        sent = await bot.send_message(5, "Mail #1")
        botapi.send_user_message(5, 5, "my answer", reply_to_message_id=sent.message_id)
        query_id = botapi.press_button(5, 5, sent.message_id, "archive:1")
        updates = await bot.get_updates(timeout=5)
        reply, press = updates[0].message, updates[1].callback_query
        assert reply is not None
        assert reply.reply_to_message is not None
        assert reply.reply_to_message.text == "Mail #1"
        assert press is not None
        assert (press.id, press.data) == (query_id, "archive:1")
        assert await press.answer("Archived")


@pytest.mark.botapi(token="42:OtherTokenForThisTestOnly")
async def test_bot_429_surfaces_as_retry_after(
    botapi: FakeBotApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fail(429) gives PTB's RetryAfter; the next call succeeds; faults are not sends."""
    # PTB 22.2+ warns about int retry_after unless timedelta mode is chosen.
    monkeypatch.setenv("PTB_TIMEDELTA", "true")
    botapi.fail("sendMessage", 429, retry_after=1)
    async with _bot(botapi) as bot:
        with pytest.raises(RetryAfter) as error:
            await bot.send_message(9, "x")
        assert error.value.retry_after == dtm.timedelta(seconds=1)
        await bot.send_message(9, "y")
    assert [c.status for c in botapi.calls("sendMessage")] == [429, 200]
    assert botapi.sent_messages(9) == ["y"]


async def test_bot_down_and_wrong_token(botapi: FakeBotApi) -> None:
    """down() answers 502 (PTB: NetworkError); a wrong token gets 401 (InvalidToken)."""
    async with _bot(botapi) as bot:
        botapi.down()
        with pytest.raises(NetworkError):
            await bot.send_message(3, "x")
        botapi.up()
        await bot.send_message(3, "y")
    with pytest.raises(InvalidToken):
        async with _bot(botapi, token="1:wrong") as wrong:
            await wrong.get_me()


# FakeBotApi: forums, flood limit, migration and refused chats, as PTB sees them


async def test_bot_forum_topics(botapi: FakeBotApi) -> None:
    """createForumTopic needs a forum; sends name an existing topic and land in it."""
    forum, plain = -100500, -100501
    botapi.make_forum(forum)
    async with _bot(botapi) as bot:
        topic = await bot.create_forum_topic(forum, "Inbox")
        thread = topic.message_thread_id
        assert botapi.topics(forum) == {thread: "Inbox"}
        created = botapi.message(forum, thread)  # the service message's id is the thread id
        assert created["forum_topic_created"]["name"] == "Inbox"
        sent = await bot.send_message(forum, "New mail", message_thread_id=thread)
        assert (sent.message_thread_id, sent.is_topic_message) == (thread, True)
        assert sent.reply_to_message is not None
        assert sent.reply_to_message.forum_topic_created is not None
        assert botapi.message(forum, sent.message_id)["message_thread_id"] == thread

        with pytest.raises(BadRequest, match="not a forum") as not_forum:
            await bot.create_forum_topic(plain, "Inbox")
        assert classify(not_forum.value).verdict is Verdict.BUG
        with pytest.raises(BadRequest, match="Message thread not found"):
            await bot.send_message(forum, "x", message_thread_id=thread + 100)
        botapi.delete_topic(forum, thread)
        assert botapi.topics(forum) == {}
        with pytest.raises(BadRequest, match="Message thread not found") as gone:
            await bot.send_document(forum, b"data", filename="a.txt", message_thread_id=thread)
    assert classify(gone.value).verdict is Verdict.TOPIC_GONE


async def test_user_message_in_topic_replies_to_its_creation(botapi: FakeBotApi) -> None:
    """A user's message in a topic carries the thread and, like Telegram, the creation message."""
    forum = -100502
    botapi.make_forum(forum)
    async with _bot(botapi) as bot:
        by_bot = (await bot.create_forum_topic(forum, "Mail")).message_thread_id
        by_user = botapi.add_topic(forum, "Chat", user_id=8)
        botapi.send_user_message(8, forum, "first", thread_id=by_bot)
        botapi.send_user_message(8, forum, "second", thread_id=by_user)
        sent = await bot.send_message(forum, "from the bot", message_thread_id=by_user)
        botapi.send_user_message(8, forum, "answer", reply_to_message_id=sent.message_id)
        updates = await bot.get_updates(timeout=5)
    first, second, answer = (u.message for u in updates)
    assert first is not None
    assert second is not None
    assert answer is not None
    assert (first.message_thread_id, first.is_topic_message) == (by_bot, True)
    assert first.reply_to_message is not None
    assert first.reply_to_message.message_id == by_bot
    assert first.reply_to_message.forum_topic_created is not None
    assert first.reply_to_message.from_user is not None
    assert first.reply_to_message.from_user.is_bot
    assert second.reply_to_message is not None
    assert second.reply_to_message.from_user is not None
    assert second.reply_to_message.from_user.id == 8
    # A reply stays in the replied message's topic and keeps its own reply_to_message.
    assert (answer.message_thread_id, answer.is_topic_message) == (by_user, True)
    assert answer.reply_to_message is not None
    assert answer.reply_to_message.message_id == sent.message_id
    with pytest.raises(ValueError, match="no topic"):
        botapi.send_user_message(8, forum, "lost", thread_id=by_user + 100)


async def test_group_flood_limit(botapi: FakeBotApi, monkeypatch: pytest.MonkeyPatch) -> None:
    """The 21st message to a group within 60 s gets RetryAfter; private chats and edits don't."""
    monkeypatch.setenv("PTB_TIMEDELTA", "true")  # PTB 22.2+ warns about int retry_after
    group, private = -100503, 503
    async with _bot(botapi) as bot:
        sent = [await bot.send_message(group, f"m{n}") for n in range(20)]
        with pytest.raises(RetryAfter) as error:
            await bot.send_message(group, "one too many")
        await bot.edit_message_text("edited", group, sent[0].message_id)
        for n in range(25):
            await bot.send_message(private, f"p{n}")
    assert 59 <= retry_delay(error.value) <= 60
    assert classify(error.value).verdict is Verdict.RETRY_AFTER
    assert botapi.flood_refusals(group) == 1
    assert botapi.flood_refusals(private) == 0
    assert len(botapi.sent_messages(group)) == 20
    assert botapi.calls("sendMessage")[20].status == 429


@pytest.mark.botapi(group_limit=2, group_window=1.0)
async def test_group_flood_window_frees(
    botapi: FakeBotApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After the retry_after Telegram gave, the group accepts messages again."""
    monkeypatch.setenv("PTB_TIMEDELTA", "true")
    group = -100504
    async with _bot(botapi) as bot:
        await bot.send_message(group, "a")
        await bot.send_message(group, "b")
        with pytest.raises(RetryAfter) as error:
            await bot.send_message(group, "c")
        assert retry_delay(error.value) == 1
        await asyncio.sleep(retry_delay(error.value))  # the wait under test is Telegram's own
        await bot.send_message(group, "c")
    assert botapi.sent_messages(group) == ["a", "b", "c"]
    assert botapi.flood_refusals(group) == 1


@pytest.mark.botapi(group_limit=None)
async def test_group_flood_limit_off(botapi: FakeBotApi) -> None:
    """group_limit=None lets a test post any number of messages to a group."""
    async with _bot(botapi) as bot:
        for n in range(25):
            await bot.send_message(-100505, f"m{n}")
    assert len(botapi.sent_messages(-100505)) == 25


async def test_migrated_chat_raises_chat_migrated(botapi: FakeBotApi) -> None:
    """A send to an upgraded group gives ChatMigrated with the supergroup's id."""
    old, new = -505, -100506
    botapi.migrate_chat(old, new)
    async with _bot(botapi) as bot:
        with pytest.raises(ChatMigrated) as error:
            await bot.send_message(old, "x")
        assert error.value.new_chat_id == new
        sent = await bot.send_message(new, "y")
    assert sent.chat.type == "supergroup"
    failure = classify(error.value)
    assert (failure.verdict, failure.new_chat_id) == (Verdict.MIGRATED, new)
    assert botapi.sent_messages(old) == []


async def test_forbidden_and_lost_chats(botapi: FakeBotApi) -> None:
    """forbid_chat() gives Forbidden until unforbid_chat(); lose_chat() gives chat not found."""
    group, user, lost = -100507, 507, -100508
    botapi.forbid_chat(group)
    botapi.forbid_chat(user, "Forbidden: bot was blocked by the user")
    botapi.lose_chat(lost)
    async with _bot(botapi) as bot:
        with pytest.raises(Forbidden, match="kicked from the group chat") as kicked:
            await bot.send_message(group, "x")
        with pytest.raises(Forbidden, match="blocked by the user"):
            await bot.send_photo(user, b"\xff\xd8jpeg")
        with pytest.raises(BadRequest, match="Chat not found") as missing:
            await bot.send_message(lost, "x")
        botapi.unforbid_chat(group)
        await bot.send_message(group, "back")
    assert classify(kicked.value).verdict is Verdict.CHAT_GONE
    assert classify(missing.value).verdict is Verdict.CHAT_GONE
    assert botapi.sent_messages(group) == ["back"]
    assert [c.status for c in botapi.calls("sendMessage")] == [403, 400, 200]
