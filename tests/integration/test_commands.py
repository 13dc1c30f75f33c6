"""Chat commands and the allow-list, against real Dovecot and the fake Bot API, in-process."""

from __future__ import annotations

import io
import logging
import re
import sys
from collections.abc import Iterator

import pytest

from bridge.logs import setup_logging
from tests.integration.chat import answer, mail, texts
from tests.integration.conftest import OWNER, running

STRANGER = 777_001
GROUP = -100_555
COMMANDS = [
    "send",
    "search",
    "inbox",
    "mutes",
    "unmute",
    "status",
    "connect",
    "help",
    "start",
    "cancel",
]


def dated(n: int) -> str:
    """A Date header value on the n-th of June 2026."""
    return f"Mon, 0{n} Jun 2026 10:00:00 +0000"


def calls_to(botapi, chat_id: int) -> list[str]:
    """Every Bot API method called with `chat_id` (sends, edits, actions, ...)."""
    return [
        c.method
        for c in botapi.calls()
        if "chat_id" in c.params and int(c.params["chat_id"]) == chat_id
    ]


async def test_start_tells_the_owner_their_ids(settings_for, botapi) -> None:
    async with running(settings_for()) as bridge:
        await bridge.ready()
        botapi.send_user_message(OWNER, OWNER, "/start")
        text = await answer(botapi, OWNER)
    assert f"user id is {OWNER}" in text
    assert f"this chat is {OWNER}" in text
    assert "you are on the allow-list" in text


async def test_help_lists_every_command(settings_for, botapi) -> None:
    async with running(settings_for()) as bridge:
        await bridge.ready()
        botapi.send_user_message(OWNER, OWNER, "/help")
        text = await answer(botapi, OWNER)
    for name in COMMANDS:
        assert f"/{name} " in text or f"/{name}\n" in text or text.endswith(f"/{name}"), name


async def test_set_my_commands_matches_the_help_table(settings_for, botapi) -> None:
    async with running(settings_for()) as bridge:
        await bridge.ready()
        botapi.send_user_message(OWNER, OWNER, "/help")
        await answer(botapi, OWNER)
    assert [c["command"] for c in botapi.commands()] == COMMANDS


async def test_status_shows_idle_last_uid_and_posted_count(
    settings_for, dovecot, mail_user, botapi
) -> None:
    async with running(settings_for()) as bridge:
        await bridge.ready()
        uid = dovecot.append(mail_user.name, mail_user.password, mail("Status probe"))
        # The watcher records the mail and its status (last UID, count) before delivery can
        # post it: once it is in the chat, /status must show it.
        assert "Status probe" in await answer(botapi, OWNER)
        botapi.send_user_message(OWNER, OWNER, "/status")
        text = await answer(botapi, OWNER)
    assert "• default/INBOX: connected (IDLE), checked " in text
    assert f", last UID {uid}, 1 posted" in text
    assert "Mails posted: 1 in all" in text


async def test_inbox_lists_newest_first_decoded_and_sets_no_seen(
    settings_for, dovecot, mail_user, botapi
) -> None:
    subjects = [
        ("Oldest plain", "Oldest plain"),
        ("=?UTF-8?Q?Gr=C3=BC=C3=9Fe_aus_M=C3=BCnchen?=", "Grüße aus München"),
        ("=?UTF-8?B?5Lya6K6u57qq6KaB?=", "会议纪要"),
        ("Newest plain", "Newest plain"),
    ]
    uids = [
        dovecot.append(mail_user.name, mail_user.password, mail(raw, f"Body {n}.", date=dated(n)))
        for n, (raw, _) in enumerate(subjects, start=1)
    ]
    async with running(settings_for()) as bridge:
        await bridge.ready()
        botapi.send_user_message(OWNER, OWNER, "/inbox 3")
        listing = await answer(botapi, OWNER)
        botapi.send_user_message(OWNER, OWNER, "/inbox abc")
        bad_word = await answer(botapi, OWNER)
        botapi.send_user_message(OWNER, OWNER, "/inbox 999")
        too_many = await answer(botapi, OWNER)
    lines = [line for line in listing.splitlines() if re.match(r"\d+\. ", line)]
    assert len(lines) == 3
    expected = [decoded for _, decoded in subjects[::-1][:3]]
    for line, subject in zip(lines, expected, strict=True):
        assert subject in line
    assert "Oldest plain" not in listing
    assert "=?" not in listing
    for text in (bad_word, too_many):
        assert "\n" not in text
        assert "Usage: /inbox" in text
    for uid in uids:
        assert b"\\Seen" not in dovecot.flags(mail_user.name, mail_user.password, uid)


async def test_unknown_command_points_to_help(settings_for, botapi) -> None:
    async with running(settings_for()) as bridge:
        await bridge.ready()
        botapi.send_user_message(OWNER, OWNER, "/foo")
        text = await answer(botapi, OWNER)
    assert "\n" not in text
    assert "/help" in text


def _logins(dovecot, user) -> int:
    return dovecot.log_text().count(f"Login: user=<{user.name}>")


async def test_stranger_gets_one_refusal_and_nothing_else(
    settings_for, dovecot, mail_user, botapi
) -> None:
    async with running(settings_for()) as bridge:
        await bridge.ready()
        logins = _logins(dovecot, mail_user)
        for text in ("/start", "/status", "/inbox", "/send", "/send a@example.org Hi\nbody", "hi"):
            botapi.send_user_message(STRANGER, STRANGER, text)
        # Updates are handled in order: once the owner is answered, the stranger's are done.
        botapi.send_user_message(OWNER, OWNER, "/help")
        await answer(botapi, OWNER)
        refusals = texts(botapi, STRANGER)
        assert len(refusals) == 1
        assert str(STRANGER) in refusals[0]
        assert "not on its allow-list" in refusals[0]
        assert calls_to(botapi, STRANGER) == ["sendMessage"]
        assert not any("Newest" in t or "Status" in t for t in texts(botapi, OWNER))
        assert _logins(dovecot, mail_user) == logins  # no IMAP session for /inbox


async def test_group_strangers_chatter_ignored_commands_refused_owner_served(
    settings_for, botapi
) -> None:
    async with running(settings_for()) as bridge:
        await bridge.ready()
        # A stranger chatting in the group is not talking to the bot: no answer, and that
        # must not use up the one refusal their first command gets.
        botapi.send_user_message(STRANGER, GROUP, "hello everyone", chat_type="group")
        botapi.send_user_message(STRANGER, GROUP, "/status", chat_type="group")
        refusal = await answer(botapi, GROUP)
        botapi.send_user_message(OWNER, GROUP, "/status", chat_type="group")
        served = await answer(botapi, GROUP)
    assert str(STRANGER) in refusal
    assert "not on its allow-list" in refusal
    assert "default/INBOX: connected" in served
    assert len(texts(botapi, GROUP)) == 2


async def test_group_stranger_plain_message_gets_no_answer(settings_for, botapi) -> None:
    async with running(settings_for()) as bridge:
        await bridge.ready()
        botapi.send_user_message(STRANGER, GROUP, "hello everyone", chat_type="group")
        botapi.send_user_message(OWNER, GROUP, "/help", chat_type="group")
        assert "/inbox" in await answer(botapi, GROUP)
    assert len(texts(botapi, GROUP)) == 1


async def test_empty_allow_list_serves_nobody(settings_for, botapi) -> None:
    async with running(settings_for(telegram={"allowed_user_ids": []})) as bridge:
        await bridge.ready()
        botapi.send_user_message(OWNER, OWNER, "/start")
        refusal = await answer(botapi, OWNER)
        botapi.send_user_message(OWNER, OWNER, "/status")
        botapi.send_user_message(STRANGER, STRANGER, "/start")
        await answer(botapi, STRANGER)  # handled after the owner's /status
    assert str(OWNER) in refusal
    assert "not on its allow-list" in refusal
    assert len(texts(botapi, OWNER)) == 1  # the /status got nothing


async def test_command_sent_while_down_is_answered_after_start(settings_for, botapi) -> None:
    botapi.send_user_message(OWNER, OWNER, "/status")
    assert botapi.pending_updates == 1
    async with running(settings_for()) as bridge:
        text = await answer(botapi, OWNER, timeout=15)
        await bridge.ready()
    assert "Status" in text
    assert botapi.pending_updates == 0


@pytest.fixture
def cli_logging() -> Iterator[None]:
    """Undo setup_logging() after the test (it replaces the root logger's handlers)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    names = ("httpx", "httpcore", "apscheduler")
    levels = {name: logging.getLogger(name).level for name in names}
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)
    for name, old in levels.items():
        logging.getLogger(name).setLevel(old)


async def test_logs_never_contain_the_token_or_passwords(
    settings_for, dovecot, mail_user, botapi, caplog, monkeypatch, cli_logging
) -> None:
    settings = settings_for()
    stderr = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    # What `mailbridge run` does (BRIDGE_LOG_LEVEL=DEBUG) ...
    setup_logging("DEBUG", settings.secrets())
    # ... made harder: httpx logs every URL (with bot<TOKEN>), so the masking filter must work.
    logging.getLogger("httpx").setLevel(logging.DEBUG)
    logging.getLogger("httpcore").setLevel(logging.DEBUG)
    caplog.set_level(logging.DEBUG)
    logging.getLogger().addHandler(caplog.handler)  # after the masking handler
    async with running(settings) as bridge:
        await bridge.ready()
        dovecot.append(mail_user.name, mail_user.password, mail("Log probe"))
        assert "Log probe" in await answer(botapi, OWNER)
        botapi.send_user_message(OWNER, OWNER, "/inbox 1")
        assert "Log probe" in await answer(botapi, OWNER)
        botapi.send_user_message(STRANGER, STRANGER, "/start")
        await answer(botapi, STRANGER)
    output = stderr.getvalue()
    assert "HTTP Request" in output  # httpx did log URLs ...
    assert "/bot***/" in output  # ... masked
    assert f"refused user {STRANGER}" in output
    for secret in (botapi.token, mail_user.password, botapi.token.split(":", 1)[1]):
        assert secret not in output
        assert secret not in caplog.text
