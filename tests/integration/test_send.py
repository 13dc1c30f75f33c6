"""Chat to mail: /send and its dialogue, through the outbox, to a real SMTP server with TLS."""

from __future__ import annotations

import asyncio
import secrets
import time

import pytest

from bridge.db import store
from bridge.db.engine import Database, make_engine
from bridge.db.migrate import upgrade_to_head
from tests.integration.chat import buttons, outbox_counts
from tests.integration.conftest import OWNER, WORK_SENDER, running

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
        # The quoted display name is a name, not an address: the mail goes to Ann alone.
        assert "Sending to" in reply
        received = await smtpd.next_message(timeout=20)
        await answer_containing(botapi, "Sent to")
    assert received.rcpt_tos == ["ann@example.org"]
    msg = received.message()
    assert "Bcc" not in msg  # the second line is the body, never a header
    assert [a.addr_spec for a in msg["To"].addresses] == ["ann@example.org"]
    assert "Bcc: x@evil.org" in msg.get_content()
    assert len(smtpd.received) == 1


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
        botapi.send_user_message(OWNER, OWNER, "/help")
        # Updates are handled in order: had the address been a step, "Subject?" came first.
        assert "/inbox" in await answer(botapi)
        assert await outbox_counts(bridge.settings) == {}
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
        answers, reports = [], 0
        while len(answers) < 3:  # one answer per /send, in order; the outbox reports between
            text = await answer(botapi)
            if text.startswith("✅ Sent to"):
                reports += 1
            else:
                answers.append(text)
        # Each /send is stored before it is answered: the count is final now.
        assert sum((await outbox_counts(bridge.settings)).values()) == 2
        received = [await smtpd.next_message(timeout=20) for _ in range(2)]
        for _ in range(reports, 2):
            await answer_containing(botapi, "Sent to")
    assert [a.startswith("📤 Sending") for a in answers] == [True, True, False]
    assert "limit 2" in answers[2]
    assert sorted(r.message()["Subject"] for r in received) == ["Mail 0", "Mail 1"]
    assert len(smtpd.received) == 2


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


# Several accounts: /send picks one, and the mail leaves through that account's SMTP login.


async def test_send_at_name_leaves_through_that_account(
    two_accounts, botapi, smtpd, work_smtpd
) -> None:
    async with running(two_accounts()) as bridge:
        await bridge.ready()
        botapi.send_user_message(OWNER, OWNER, "/send @work ann@example.org Quarterly\nFigures.")
        assert "Sending to" in await answer(botapi)
        received = await work_smtpd.next_message(timeout=20)
        await answer_containing(botapi, "Sent to")
    assert received.login == work_smtpd.username
    assert received.mail_from == "desk@work.example"
    msg = received.message()
    assert msg["From"] == WORK_SENDER
    assert msg["Message-ID"].endswith("@work.example>")
    assert msg["Subject"] == "Quarterly"
    assert smtpd.received == []


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ("/send ann@example.org Hi\nbody", ["Which account", "/send @home", "/send @work"]),
        ("/send @play ann@example.org Hi\nbody", ["No account named @play", "@home", "@work"]),
    ],
)
async def test_send_without_a_known_account_asks_and_sends_nothing(
    two_accounts, botapi, smtpd, work_smtpd, text, needles
) -> None:
    async with running(two_accounts()) as bridge:
        await bridge.ready()
        botapi.send_user_message(OWNER, OWNER, text)
        reply = await answer(botapi)
        # A stored mail is answered "Sending"; this answer means nothing was stored.
        assert await outbox_counts(bridge.settings) == {}
    for needle in needles:
        assert needle in reply
    assert "\n" not in reply
    assert smtpd.received == []
    assert work_smtpd.received == []


async def test_dialogue_asks_for_the_account_first(
    two_accounts, botapi, smtpd, work_smtpd
) -> None:
    async with running(two_accounts()) as bridge:
        await bridge.ready()
        botapi.send_user_message(OWNER, OWNER, "/send")
        prompt = await botapi.next_call("sendMessage", timeout=15, ok_only=True)
        assert "account" in prompt.params["text"].lower()
        assert [data for _, data in buttons(prompt)] == [
            "send:account:home",
            "send:account:work",
        ]
        prompt_id = prompt.result["message_id"]

        botapi.send_user_message(OWNER, OWNER, "play")  # typed, but no such account
        assert "No account named @play" in await answer(botapi)
        forged = botapi.press_button(OWNER, OWNER, prompt_id, "send:account:evil")
        refusal = await botapi.next_call("answerCallbackQuery", timeout=15, ok_only=True)
        assert refusal.params["callback_query_id"] == forged
        assert "not valid" in refusal.params["text"]

        botapi.press_button(OWNER, OWNER, prompt_id, "send:account:work")
        assert "To whom" in await answer(botapi)
        assert "reply_markup" not in botapi.message(OWNER, prompt_id)  # one press only
        botapi.send_user_message(OWNER, OWNER, "ann@example.org")
        assert "Subject" in await answer(botapi)
        botapi.send_user_message(OWNER, OWNER, "From work")
        assert "text" in await answer(botapi)
        botapi.send_user_message(OWNER, OWNER, "Sent from the work account.")
        draft = await botapi.next_call("sendMessage", timeout=15, ok_only=True)
        assert "desk@work.example" in draft.params["text"]
        botapi.press_button(OWNER, OWNER, draft.result["message_id"], "send:yes")
        received = await work_smtpd.next_message(timeout=20)
        await answer_containing(botapi, "Sent to")

        # Typing the name works too, and picks that account.
        botapi.send_user_message(OWNER, OWNER, "/send")
        assert "account" in (await answer(botapi)).lower()
        botapi.send_user_message(OWNER, OWNER, "@home")
        assert "To whom" in await answer(botapi)
        botapi.send_user_message(OWNER, OWNER, "bob@example.org")
        assert "Subject" in await answer(botapi)
        botapi.send_user_message(OWNER, OWNER, "From home")
        assert "text" in await answer(botapi)
        botapi.send_user_message(OWNER, OWNER, "Sent from home.")
        draft = await botapi.next_call("sendMessage", timeout=15, ok_only=True)
        botapi.press_button(OWNER, OWNER, draft.result["message_id"], "send:yes")
        home_received = await smtpd.next_message(timeout=20)
        await answer_containing(botapi, "Sent to")
    assert received.login == work_smtpd.username
    assert received.message()["Subject"] == "From work"
    assert received.rcpt_tos == ["ann@example.org"]
    assert home_received.login == smtpd.username
    assert home_received.message()["Subject"] == "From home"
    assert len(smtpd.received) == 1
    assert len(work_smtpd.received) == 1


async def test_dialogue_account_step_can_be_cancelled(two_accounts, botapi, smtpd, work_smtpd):
    async with running(two_accounts()) as bridge:
        await bridge.ready()
        botapi.send_user_message(OWNER, OWNER, "/send")
        prompt = await botapi.next_call("sendMessage", timeout=15, ok_only=True)
        botapi.send_user_message(OWNER, OWNER, "/cancel")
        assert "Cancelled" in await answer(botapi)
        # The dialogue is over: its button no longer starts anything.
        botapi.press_button(OWNER, OWNER, prompt.result["message_id"], "send:account:work")
        botapi.send_user_message(OWNER, OWNER, "ann@example.org")
        botapi.send_user_message(OWNER, OWNER, "/help")
        assert "/inbox" in await answer(botapi)  # nothing answered the press or the address
        assert await outbox_counts(bridge.settings) == {}


async def test_outbox_items_keep_their_account_across_a_restart(
    two_accounts, botapi, smtpd, work_smtpd
) -> None:
    settings = two_accounts()
    # An item stored before accounts existed (no account): it leaves through the first one.
    db = Database(make_engine(settings.core.database_url))
    try:
        await asyncio.to_thread(upgrade_to_head, db.engine)
        raw = (
            b"From: bridge@example.test\r\nTo: old@example.org\r\nSubject: From before\r\n"
            b"Message-ID: <old-1@example.test>\r\n\r\nOld body.\r\n"
        )
        await db.run(
            store.add_outbox,
            chat_id=OWNER,
            user_id=OWNER,
            message_id="<old-1@example.test>",
            recipients=["old@example.org"],
            subject="From before",
            raw=raw,
        )
    finally:
        db.engine.dispose()
    smtpd.stop()
    work_smtpd.stop()
    async with running(settings) as bridge:
        await bridge.ready()
        botapi.send_user_message(OWNER, OWNER, "/send @work ann@example.org Restarted\nStill.")
        await answer_containing(botapi, "Not sent yet")
        await answer_containing(botapi, "Not sent yet")
    smtpd.start()
    work_smtpd.start()
    async with running(settings):
        work_received = await work_smtpd.next_message(timeout=30)
        home_received = await smtpd.next_message(timeout=30)
        await answer_containing(botapi, "Sent to")
        await answer_containing(botapi, "Sent to")
    assert work_received.message()["Subject"] == "Restarted"
    assert work_received.login == work_smtpd.username
    assert home_received.message()["Subject"] == "From before"
    assert home_received.login == smtpd.username
    assert len(smtpd.received) == 1
    assert len(work_smtpd.received) == 1


async def test_a_big_attachment_is_built_off_the_event_loop(tmp_path, botapi) -> None:
    """Building a 20 MB outgoing mail takes a second of CPU: it must not stall the bot."""

    from bridge.chat_to_mail import Outbox, _flatten
    from bridge.config import AccountSettings, ImapSettings, SmtpSettings, TelegramSettings
    from bridge.mail.compose import OutgoingAttachment, OutgoingMail

    engine = make_engine(f"sqlite:///{tmp_path}/out.db")
    upgrade_to_head(engine)
    account = AccountSettings(
        name="default",
        imap=ImapSettings(host="127.0.0.1", username="me@example.org", password="x"),
        smtp=SmtpSettings(host="127.0.0.1"),
    )
    telegram = TelegramSettings(token=botapi.token, api_url=botapi.url)
    outbox = Outbox([account], telegram, Database(engine), None)  # submit never posts
    data = secrets.token_bytes(20 * 1024 * 1024)
    mail = OutgoingMail(
        to=("ann@example.org",),
        subject="Big one",
        body="Attached.",
        attachments=(OutgoingAttachment("big.bin", "application/octet-stream", data),),
    )
    # What an inline build would stall the loop for, on this machine under its current load.
    started = time.perf_counter()
    _flatten(mail, account.smtp.sender, "<measure@example.org>")
    inline = time.perf_counter() - started
    lags: list[float] = []
    done = asyncio.Event()

    async def heartbeat() -> None:
        loop = asyncio.get_running_loop()
        while not done.is_set():
            before = loop.time()
            await asyncio.sleep(0.01)  # the measurement itself, not a synchronisation
            lags.append(loop.time() - before - 0.01)

    beat = asyncio.create_task(heartbeat())
    await asyncio.sleep(0.05)  # the heartbeat is ticking before the work starts
    item = await outbox.submit(mail, account="default")
    done.set()
    await beat
    engine.dispose()
    assert item is not None
    # Off the loop, the loop ticks on; inline, it would stall for the whole build.
    bound = max(0.3, inline / 2)
    assert max(lags) < bound, f"loop stalled {max(lags):.2f} s (inline {inline:.2f} s)"
