"""Chat to mail: /send and its dialogue, through the outbox, to a real SMTP server with TLS."""

from __future__ import annotations

import asyncio

import pytest

from tests.integration.conftest import OWNER, running

STRANGER = 999


async def answer(botapi, chat_id: int = OWNER) -> str:
    """The bot's next message to the chat (bounded wait)."""
    while True:
        call = await botapi.next_call("sendMessage", timeout=15, ok_only=True)
        if int(call.params["chat_id"]) == chat_id:
            return str(call.params["text"])


async def answer_containing(botapi, needle: str, chat_id: int = OWNER) -> str:
    """Skip the bot's messages until one contains needle (bounded)."""
    async with asyncio.timeout(30):
        while True:
            text = await answer(botapi, chat_id)
            if needle in text:
                return text


@pytest.fixture
def send_settings(settings_for, smtpd):
    def build(**kw):
        kw.setdefault("imap", {"save_sent": False})
        return settings_for(smtpd=smtpd, **kw)

    return build


@pytest.mark.parametrize(
    ("subject", "body"),
    [
        ("Grüße aus Köln", "Schöne Grüße,\nJürgen — „Zitat“"),
        ("你好，世界", "这是一封测试邮件。\n第二行。"),
        ("こんにちは", "日本語のメールです。"),
        ("Привет", "Съешь ещё этих мягких французских булок."),
        ("مرحبا 👋", "نص عربي مع رمز تعبيري 🎉\n  indented line kept  "),
    ],
)
async def test_send_one_shot_in_any_language(send_settings, botapi, smtpd, subject, body):
    async with running(send_settings()) as bridge:
        await bridge.ready()
        botapi.send_user_message(
            OWNER, OWNER, f"/send ann@example.org,bob@example.org {subject}\n{body}"
        )
        received = await smtpd.next_message(timeout=20)
        assert "✅ Sent" in await answer_containing(botapi, "Sent to")
    msg = received.message()
    assert sorted(received.rcpt_tos) == ["ann@example.org", "bob@example.org"]
    assert msg["Subject"] == subject
    assert msg.get_content().replace("\r\n", "\n").rstrip("\n") == body
    assert msg["Message-ID"].endswith("@example.test>")  # the sender's domain
    assert msg["Date"]
    assert msg["MIME-Version"] == "1.0"


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("/send not-an-address Subject\nbody", "not-an-address"),
        ("/send ann@example.org\nbody", "subject"),
        ("/send ann@example.org Subject", "Usage"),
        ("/send ann@example.org Subject\n   ", "No text"),
        ("/send ann@example.org,\u202eevil@example.org Hi\nbody", "evil"),
    ],
)
async def test_bad_send_gets_one_line_and_sends_nothing(
    send_settings, botapi, smtpd, text, reason
) -> None:
    async with running(send_settings()) as bridge:
        await bridge.ready()
        if text.count("\n") == 0 and len(text.split()) < 3:
            pytest.fail("case needs a subject-less form")  # guard against typos in the table
        botapi.send_user_message(OWNER, OWNER, text)
        reply = await answer(botapi)
    assert reason.lower() in reply.lower()
    assert "\n" not in reply.strip() or reply.startswith("Usage")
    assert smtpd.received == []


async def test_display_name_tricks_add_no_recipient(send_settings, botapi, smtpd) -> None:
    async with running(send_settings()) as bridge:
        await bridge.ready()
        botapi.send_user_message(
            OWNER, OWNER, '/send "victim@evil.org,"<ann@example.org> Hi\r\nBcc: x@evil.org\nbody'
        )
        reply = await answer(botapi)
        if "Sending" in reply:
            received = await smtpd.next_message(timeout=20)
            assert received.rcpt_tos == ["ann@example.org"]
            assert "Bcc" not in received.message()
            to = received.message()["To"].addresses
            assert [a.addr_spec for a in to] == ["ann@example.org"]
    assert all("evil" not in r for m in smtpd.received for r in m.rcpt_tos)


async def test_dialogue_send_and_cancel(send_settings, botapi, smtpd) -> None:
    async with running(send_settings()) as bridge:
        await bridge.ready()
        botapi.send_user_message(OWNER, OWNER, "/send")
        assert "To whom" in await answer(botapi)
        botapi.send_user_message(OWNER, OWNER, "bad address")
        assert "Try again" in await answer(botapi)
        botapi.send_user_message(OWNER, OWNER, "Ann <ann@example.org>, bob@example.org")
        assert "Subject" in await answer(botapi)
        botapi.send_user_message(OWNER, OWNER, "Dialogue 💬")
        assert "text" in await answer(botapi)
        botapi.send_user_message(OWNER, OWNER, "Line one\nLine two")
        draft = await botapi.next_call("sendMessage", timeout=10, ok_only=True)
        assert "Dialogue 💬" in draft.params["text"]
        message_id = draft.result["message_id"]
        botapi.press_button(OWNER, OWNER, message_id, "send:yes")
        received = await smtpd.next_message(timeout=20)
        assert received.message()["Subject"] == "Dialogue 💬"
        assert sorted(received.rcpt_tos) == ["ann@example.org", "bob@example.org"]
        assert "Ann" in received.message()["To"]

        await answer_containing(botapi, "Sent to")  # the outbox reports on its own time

        botapi.send_user_message(OWNER, OWNER, "/send")
        assert "To whom" in await answer(botapi)
        botapi.send_user_message(OWNER, OWNER, "/cancel")
        assert "Cancelled" in await answer(botapi)
    assert len(smtpd.received) == 1


async def test_dialogue_expires(send_settings, botapi, smtpd) -> None:
    async with running(send_settings(telegram={"send_dialogue_timeout": 1})) as bridge:
        await bridge.ready()
        botapi.send_user_message(OWNER, OWNER, "/send")
        assert "To whom" in await answer(botapi)
        assert "expired" in await answer(botapi)
        botapi.send_user_message(OWNER, OWNER, "ann@example.org")  # no longer a dialogue step
        await asyncio.sleep(0)  # let nothing happen; asserted below
    assert smtpd.received == []


async def test_photo_with_send_caption_is_attached(send_settings, botapi, smtpd) -> None:
    jpeg = b"\xff\xd8\xff\xe0" + bytes(range(256)) * 40
    async with running(send_settings()) as bridge:
        await bridge.ready()
        botapi.send_user_message(
            OWNER, OWNER, photo=jpeg, caption="/send ann@example.org Holiday\nLook at this!"
        )
        received = await smtpd.next_message(timeout=20)
    msg = received.message()
    (attachment,) = list(msg.iter_attachments())
    assert attachment.get_content_type() == "image/jpeg"
    assert attachment.get_content() == jpeg
    assert "Look at this!" in msg.get_body(("plain",)).get_content()


async def test_smtp_down_then_up_sends_exactly_once(send_settings, botapi, smtpd) -> None:
    smtpd.stop()
    async with running(send_settings()) as bridge:
        await bridge.ready()
        botapi.send_user_message(OWNER, OWNER, "/send ann@example.org Patience\nWill arrive.")
        assert "keep trying" in await answer_containing(botapi, "Not sent yet")
        smtpd.start()
        received = await smtpd.next_message(timeout=30)
        assert "Sent to" in await answer_containing(botapi, "Sent to")
    assert received.message()["Subject"] == "Patience"
    assert len(smtpd.received) == 1


async def test_smtp_permanent_failure_is_reported(send_settings, botapi, smtpd) -> None:
    smtpd.fail_next(550, "5.7.1 Relaying denied for this sender")
    async with running(send_settings()) as bridge:
        await bridge.ready()
        botapi.send_user_message(OWNER, OWNER, "/send ann@example.org Nope\nbody")
        text = await answer_containing(botapi, "Not sent")
    assert "Relaying denied" in text
    assert smtpd.received == []


async def test_pending_outbox_survives_a_restart(send_settings, botapi, smtpd) -> None:
    smtpd.stop()
    settings = send_settings()
    async with running(settings) as bridge:
        await bridge.ready()
        botapi.send_user_message(OWNER, OWNER, "/send ann@example.org Restarted\nStill here.")
        await answer_containing(botapi, "Not sent yet")
    smtpd.start()
    async with running(settings) as bridge:
        received = await smtpd.next_message(timeout=30)
        await answer_containing(botapi, "Sent to")
    assert received.message()["Subject"] == "Restarted"
    assert len(smtpd.received) == 1


async def test_rate_limit_per_user(send_settings, botapi, smtpd) -> None:
    async with running(send_settings(telegram={"send_rate_limit": 2})) as bridge:
        await bridge.ready()
        for n in range(3):
            botapi.send_user_message(OWNER, OWNER, f"/send ann@example.org Mail {n}\nbody")
        text = await answer_containing(botapi, "limit")
    assert "2" in text
    assert len(smtpd.received) <= 2


@pytest.mark.parametrize("chat_type", ["private", "group"])
async def test_stranger_cannot_send(send_settings, botapi, smtpd, chat_type) -> None:
    chat = STRANGER if chat_type == "private" else -100777
    async with running(send_settings()) as bridge:
        await bridge.ready()
        botapi.send_user_message(
            STRANGER, chat, "/send ann@example.org Spam\nbuy now", chat_type=chat_type
        )
        text = await answer(botapi, chat)
        # The owner's next command is still served: the stranger's was dropped, not queued.
        botapi.send_user_message(OWNER, OWNER, "/help")
        await answer(botapi)
    assert "not on its allow-list" in text
    assert str(STRANGER) in text
    assert smtpd.received == []


async def test_copy_saved_to_sent_folder(settings_for, botapi, smtpd, dovecot, mail_user):
    settings = settings_for(smtpd=smtpd, imap={"sent_mailbox": "Sent"})
    async with running(settings) as bridge:
        await bridge.ready()
        botapi.send_user_message(OWNER, OWNER, "/send ann@example.org Keep a copy\nbody")
        await smtpd.next_message(timeout=20)
        await answer_containing(botapi, "Sent to")
        for _ in range(100):  # the copy is appended after the chat is told; bounded poll
            client = dovecot.connect(mail_user.name, mail_user.password)
            try:
                if client.folder_exists("Sent"):
                    client.select_folder("Sent", readonly=True)
                    found = client.search(["SUBJECT", "Keep a copy"])
                    if found:
                        break
            finally:
                client.logout()
            await asyncio.sleep(0.1)
        else:
            pytest.fail("no copy in Sent")


async def test_file_over_telegrams_download_limit_is_explained(send_settings, botapi, smtpd):
    big = b"\0" * (20 * 1024 * 1024 + 1)  # Bot API getFile: at most 20 MB
    async with running(send_settings()) as bridge:
        await bridge.ready()
        botapi.send_user_message(
            OWNER,
            OWNER,
            document=("backup.zip", big, "application/zip"),
            caption="/send ann@example.org Backup\nHere it is.",
        )
        text = await answer(botapi)
    assert "backup.zip" in text
    assert "20 MB" in text
    assert smtpd.received == []


async def test_copy_goes_to_the_special_use_sent_folder(
    settings_for, botapi, smtpd, dovecot, mail_user
) -> None:
    """With no folder configured, the copy goes to the folder the server marks \\Sent."""
    client = dovecot.connect(mail_user.name, mail_user.password)
    try:  # RFC 6154 CREATE-SPECIAL-USE, as a mail client would set the folder up
        typ, _ = client._imap._simple_command("CREATE", '"Sent Items"', "(USE (\\Sent))")
        assert typ == "OK"
    finally:
        client.logout()
    async with running(settings_for(smtpd=smtpd)) as bridge:
        await bridge.ready()
        botapi.send_user_message(OWNER, OWNER, "/send ann@example.org Filed\nbody")
        await smtpd.next_message(timeout=20)
        await answer_containing(botapi, "Sent to")
        async with asyncio.timeout(10):  # the copy is appended after the chat is told
            while True:
                client = dovecot.connect(mail_user.name, mail_user.password)
                try:
                    client.select_folder("Sent Items", readonly=True)
                    if client.search(["SUBJECT", "Filed"]):
                        break
                finally:
                    client.logout()
                await asyncio.sleep(0.1)
