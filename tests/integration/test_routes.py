"""Several accounts and folders, routed to chats and forum topics; chats that fail for good."""

from __future__ import annotations

import asyncio
import secrets
from email.message import EmailMessage
from pathlib import Path

from alembic import command
from sqlalchemy import text

from bridge.db.engine import make_engine
from bridge.db.migrate import alembic_config
from tests.conftest import SECRETS
from tests.integration.chat import wait_for_log
from tests.integration.conftest import OWNER, make_account, make_settings, running
from tests.servers.dovecot import MailUser

GROUP = -1001000000001  # a forum supergroup
TEAM = -1001000000002
OTHER = 5151  # another private chat


def message(subject: str, sender: str = "ann@example.org", to: str = "me@example.org") -> bytes:
    """A small plain-text mail."""
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = subject
    msg["Message-ID"] = f"<{secrets.token_hex(8)}@example.org>"
    msg.set_content("Hello.\n")
    return msg.as_bytes()


def second_user(dovecot) -> MailUser:
    """Another mailbox on the session Dovecot."""
    user = MailUser(f"other{secrets.token_hex(4)}", secrets.token_urlsafe(12))
    dovecot.add_user(user.name, user.password)
    SECRETS.add(user.password)
    return user


def received(botapi, chat_id: int) -> str:
    """Everything a chat was sent (summaries and combined messages), as one text."""
    return "\n".join(
        str(c.params["text"])
        for c in botapi.calls("sendMessage", ok_only=True)
        if int(c.params["chat_id"]) == chat_id
    )


async def wait_received(botapi, chat_id: int, *subjects: str, timeout: float = 15) -> str:
    """Wait (bounded) until every subject was received in the chat."""
    async with asyncio.timeout(timeout):
        while not all(s in received(botapi, chat_id) for s in subjects):
            await botapi.next_call("sendMessage", timeout=timeout, ok_only=True)
    return received(botapi, chat_id)


async def test_each_matcher_routes_to_its_chat_and_topic(
    tmp_path: Path, dovecot, mail_user, botapi, ca
) -> None:
    work = second_user(dovecot)
    ca_file = Path(ca.ca_file)
    home = make_account(
        "home", dovecot=dovecot, user=mail_user, ca_file=ca_file, folders=["INBOX", "Lists"]
    )
    office = make_account("work", dovecot=dovecot, user=work, ca_file=ca_file)
    for folder in ("Lists",):
        dovecot.append(mail_user.name, mail_user.password, message("setup"), mailbox=folder)
    botapi.make_forum(GROUP)
    routes = [
        {"subject": "*SPAM*", "mute": True},
        {"account": "home", "folder": "lists", "from": "*@GitHub.com", "chats": [GROUP]}
        | {"topic": "GitHub"},
        {"account": "work", "chats": [TEAM]},
        {"to": "Boss*", "chats": [OTHER]},
    ]
    settings = make_settings(
        tmp_path,
        dovecot=dovecot,
        user=mail_user,
        botapi=botapi,
        ca_file=ca_file,
        accounts=[home, office],
        routes=routes,
    )
    async with running(settings) as bridge:
        await bridge.ready()
        dovecot.append(
            mail_user.name,
            mail_user.password,
            message("PR merged", "GitHub <notifications@github.com>"),
            mailbox="Lists",
        )
        dovecot.append(mail_user.name, mail_user.password, message("List chatter"), "Lists")
        dovecot.append(work.name, work.password, message("Standup notes"))
        dovecot.append(
            mail_user.name, mail_user.password, message("Budget", to="Boss Person <b@x.org>")
        )
        dovecot.append(mail_user.name, mail_user.password, message("Buy now SPAM"))
        dovecot.append(mail_user.name, mail_user.password, message("Hello home"))
        await wait_received(botapi, GROUP, "PR merged")
        await wait_received(botapi, TEAM, "Standup notes")
        await wait_received(botapi, OTHER, "Budget")
        await wait_received(botapi, OWNER, "List chatter", "Hello home")
        await bridge.ready()
    # Each stream in its place, and only there; the spam route posted nowhere.
    assert "PR merged" not in received(botapi, OWNER) + received(botapi, TEAM)
    assert "Standup notes" not in received(botapi, OWNER) + received(botapi, GROUP)
    assert "Budget" not in received(botapi, OWNER)
    assert all("SPAM" not in str(c.params["text"]) for c in botapi.calls("sendMessage"))
    # The topic was created once and the GitHub mail went into it.
    (created,) = botapi.calls("createForumTopic", ok_only=True)
    assert created.params["name"] == "GitHub"
    thread = next(iter(botapi.topics(GROUP)))
    (post,) = [
        c for c in botapi.calls("sendMessage", ok_only=True) if "PR merged" in str(c.params)
    ]
    assert int(post.params["message_thread_id"]) == thread
    # Two accounts: the summaries name theirs.
    assert "work" in received(botapi, TEAM)
    assert "home" in received(botapi, OWNER)

    # After a restart the topic is reused, not created again.
    async with running(settings) as bridge:
        await bridge.ready()
        dovecot.append(
            mail_user.name,
            mail_user.password,
            message("Issue opened", "notifications@github.com"),
            mailbox="Lists",
        )
        await wait_received(botapi, GROUP, "Issue opened")
    assert len(botapi.calls("createForumTopic")) == 1
    later = [
        c for c in botapi.calls("sendMessage", ok_only=True) if "Issue opened" in str(c.params)
    ]
    assert int(later[0].params["message_thread_id"]) == thread


async def test_deleted_topic_is_created_again(settings_for, dovecot, mail_user, botapi) -> None:
    botapi.make_forum(GROUP)
    routes = [{"chats": [GROUP], "topic": "Mail"}]
    settings = settings_for(routes=routes)
    async with running(settings) as bridge:
        await bridge.ready()
        dovecot.append(mail_user.name, mail_user.password, message("Before"))
        await wait_received(botapi, GROUP, "Before")
        (old,) = botapi.topics(GROUP)
        botapi.delete_topic(GROUP, old)
        dovecot.append(mail_user.name, mail_user.password, message("After"))
        await wait_received(botapi, GROUP, "After")
    assert len(botapi.calls("createForumTopic", ok_only=True)) == 2
    assert list(botapi.topics(GROUP).values()) == ["Mail"]


async def test_migrated_group_is_followed_and_remembered(
    settings_for, dovecot, mail_user, botapi, caplog
) -> None:
    old, new = -4001, -1004001
    settings = settings_for(telegram={"notify_chat_ids": [old, OWNER]})
    botapi.migrate_chat(old, new)
    async with running(settings) as bridge:
        await bridge.ready()
        dovecot.append(mail_user.name, mail_user.password, message("First after upgrade"))
        await wait_received(botapi, new, "First after upgrade")
        await wait_received(botapi, OWNER, "First after upgrade")
    followed = [
        r for r in caplog.records if r.name.startswith("bridge") and "migrated" in r.getMessage()
    ]
    assert len(followed) == 1  # logged once
    tries_at_old = len([c for c in botapi.calls("sendMessage") if int(c.params["chat_id"]) == old])
    async with running(settings) as bridge:
        await bridge.ready()
        dovecot.append(mail_user.name, mail_user.password, message("Second"))
        await wait_received(botapi, new, "Second")
    # The new id is remembered: the old one is not tried again.
    assert tries_at_old == len(
        [c for c in botapi.calls("sendMessage") if int(c.params["chat_id"]) == old]
    )
    assert received(botapi, new).count("First after upgrade") == 1


async def test_forbidden_chat_waits_while_the_others_get_their_mail(
    settings_for, dovecot, mail_user, botapi, caplog
) -> None:
    settings = settings_for(
        telegram={"notify_chat_ids": [TEAM, OWNER], "chat_retry": 0.5},
    )
    botapi.forbid_chat(TEAM)
    async with running(settings) as bridge:
        await bridge.ready()
        dovecot.append(mail_user.name, mail_user.password, message("For everyone"))
        await wait_received(botapi, OWNER, "For everyone")
        # /status names the chat Telegram refuses (once the refusal was met).
        await wait_for_log(caplog, lambda r: "refused chat" in r.getMessage(), 10)
        botapi.send_user_message(OWNER, OWNER, "/status")
        status = await asyncio.wait_for(_reply_containing(botapi, "refuses"), 10)
        assert str(TEAM) in status
        assert "kicked" in status
        assert "For everyone" not in received(botapi, TEAM)
        # The bot is let back in: the waiting mail arrives, once.
        botapi.unforbid_chat(TEAM)
        await wait_received(botapi, TEAM, "For everyone")
    assert received(botapi, TEAM).count("For everyone") == 1
    assert received(botapi, OWNER).count("For everyone") == 1


async def _reply_containing(botapi, needle: str) -> str:
    while True:
        call = await botapi.next_call("sendMessage", timeout=10, ok_only=True)
        if needle in str(call.params["text"]):
            return str(call.params["text"])


async def test_folders_beyond_the_connection_budget_are_polled(
    settings_for, dovecot, mail_user, botapi
) -> None:
    for folder in ("Alpha", "Beta", "Gamma"):
        dovecot.append(mail_user.name, mail_user.password, message("old"), mailbox=folder)
    settings = settings_for(
        folders=["INBOX", "Alpha", "Beta", "Gamma"],
        imap={"max_connections": 2, "poll_interval": 0.3},
    )
    async with running(settings) as bridge:
        await bridge.ready()
        dovecot.append(mail_user.name, mail_user.password, message("In Gamma"), mailbox="Gamma")
        dovecot.append(mail_user.name, mail_user.password, message("In Alpha"), mailbox="Alpha")
        dovecot.append(mail_user.name, mail_user.password, message("In Inbox"))
        text_all = await wait_received(botapi, OWNER, "In Gamma", "In Alpha", "In Inbox")
        botapi.send_user_message(OWNER, OWNER, "/status")
        status = await asyncio.wait_for(_reply_containing(botapi, "Folders"), 10)
    assert "default/INBOX: connected (IDLE)" in status
    assert "default/Beta: connected (polled (STATUS))" in status
    assert "default/Gamma: connected (polled (STATUS))" in status
    assert "old" not in text_all.replace("folder", "")
    # Several folders: a summary says which one.
    assert "Gamma" in text_all


async def test_group_bursts_stay_within_telegrams_limit(
    settings_for, dovecot, mail_user, botapi
) -> None:
    settings = settings_for(telegram={"notify_chat_ids": [TEAM], "chat_interval": 1.0})
    subjects = [f"Burst {n:02}" for n in range(24)]
    async with running(settings) as bridge:
        await bridge.ready()
        for subject in subjects:
            dovecot.append(mail_user.name, mail_user.password, message(subject))
            await asyncio.sleep(0.25)  # the arrival rate under test, not a synchronisation
        await wait_received(botapi, TEAM, *subjects, timeout=40)
    assert botapi.flood_refusals(TEAM) == 0
    assert botapi.max_sends_in_window(TEAM, 0.95) <= 1
    sent = len(botapi.calls("sendMessage", ok_only=True))
    assert sent < len(subjects)  # what waited went out together
    for subject in subjects:
        assert received(botapi, TEAM).count(subject) == 1


async def test_upgrade_from_an_env_only_database_loses_nothing(
    tmp_path: Path, settings_for, dovecot, mail_user, botapi
) -> None:
    """A database of the single-account days: its cursor is kept under the account `default`."""
    seen = dovecot.append(mail_user.name, mail_user.password, message("Seen before upgrade"))
    engine = make_engine(f"sqlite:///{tmp_path}/bridge.db")
    command.upgrade(alembic_config(engine), "0003")
    client = dovecot.connect(mail_user.name, mail_user.password)
    try:
        uidvalidity = int(client.select_folder("INBOX", readonly=True)[b"UIDVALIDITY"])
    finally:
        client.logout()
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO mailbox (account, name, uidvalidity, last_uid, updated_at) "
                "VALUES (:account, 'INBOX', :v, :uid, CURRENT_TIMESTAMP)"
            ),
            {
                "account": f"{mail_user.name}@127.0.0.1:{dovecot.port}",
                "v": uidvalidity,
                "uid": seen,
            },
        )
    engine.dispose()
    dovecot.append(mail_user.name, mail_user.password, message("Arrived during upgrade"))
    async with running(settings_for()) as bridge:
        await bridge.ready()
        await wait_received(botapi, OWNER, "Arrived during upgrade")
    assert "Seen before upgrade" not in received(botapi, OWNER)


async def test_host_written_differently_is_not_a_first_contact(
    settings_for, dovecot, mail_user, botapi
) -> None:
    async with running(settings_for(imap={"host": "127.0.0.1"})) as bridge:
        await bridge.ready()
    dovecot.append(mail_user.name, mail_user.password, message("While renamed"))
    async with running(settings_for(imap={"host": "localhost"})) as bridge:
        await bridge.ready()
        await wait_received(botapi, OWNER, "While renamed")
