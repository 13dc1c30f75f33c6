"""A Telegram reply to a posted mail becomes a threaded email reply to the right person."""

from __future__ import annotations

from email.message import EmailMessage

import pytest

from tests.integration.conftest import OWNER, running
from tests.integration.test_send import answer


def original(subject: str, *, reply_to: str | None = "List <list@example.org>") -> bytes:
    msg = EmailMessage()
    msg["From"] = "Ann Sender <ann@example.org>"
    msg["To"] = "me@example.org"
    if reply_to:
        msg["Reply-To"] = reply_to
    msg["Subject"] = subject
    msg["Message-ID"] = "<orig-1@example.org>"
    msg["References"] = "<root@example.org> <middle@example.org>"
    msg.set_content("What do you think?")
    return bytes(msg)


async def posted_summary(botapi) -> int:
    call = await botapi.next_call("sendMessage", timeout=15, ok_only=True)
    return int(call.result["message_id"])


@pytest.fixture
def reply_settings(settings_for, smtpd):
    return settings_for(smtpd=smtpd, imap={"save_sent": False})


@pytest.mark.parametrize(
    ("subject", "reply_to", "expected_subject", "expected_rcpt"),
    [
        (
            "Plans für Freitag",
            "List <list@example.org>",
            "Re: Plans für Freitag",
            "list@example.org",
        ),
        ("Re: Plans", None, "Re: Plans", "ann@example.org"),
        ("AW: Termin", None, "AW: Termin", "ann@example.org"),
    ],
)
async def test_reply_threads_and_goes_to_reply_to_else_from(
    reply_settings,
    botapi,
    smtpd,
    dovecot,
    mail_user,
    subject,
    reply_to,
    expected_subject,
    expected_rcpt,
) -> None:
    async with running(reply_settings) as bridge:
        await bridge.ready()
        dovecot.append(mail_user.name, mail_user.password, original(subject, reply_to=reply_to))
        summary_id = await posted_summary(botapi)
        botapi.send_user_message(OWNER, OWNER, "Sounds good 👍", reply_to_message_id=summary_id)
        received = await smtpd.next_message(timeout=20)
    msg = received.message()
    assert received.rcpt_tos == [expected_rcpt]
    assert msg["Subject"] == expected_subject
    assert msg["In-Reply-To"] == "<orig-1@example.org>"
    assert msg["References"].split() == [
        "<root@example.org>",
        "<middle@example.org>",
        "<orig-1@example.org>",
    ]
    assert msg.get_content().strip() == "Sounds good 👍"


async def test_reply_with_a_document_attaches_it(
    reply_settings, botapi, smtpd, dovecot, mail_user
) -> None:
    data = b"%PDF-1.4\n" + b"x" * 5000
    async with running(reply_settings) as bridge:
        await bridge.ready()
        dovecot.append(mail_user.name, mail_user.password, original("Contract"))
        summary_id = await posted_summary(botapi)
        botapi.send_user_message(
            OWNER,
            OWNER,
            document=("Vertrag – signiert.pdf", data, "application/pdf"),
            caption="Signed, see attachment.",
            reply_to_message_id=summary_id,
        )
        received = await smtpd.next_message(timeout=20)
    msg = received.message()
    (attachment,) = list(msg.iter_attachments())
    assert attachment.get_filename() == "Vertrag – signiert.pdf"
    assert attachment.get_content_type() == "application/pdf"
    assert attachment.get_content() == data
    assert msg["Subject"] == "Re: Contract"


async def test_reply_to_something_else_is_explained_and_sends_nothing(
    reply_settings, botapi, smtpd
) -> None:
    async with running(reply_settings) as bridge:
        await bridge.ready()
        botapi.send_user_message(OWNER, OWNER, "/help")
        help_call = await botapi.next_call("sendMessage", timeout=15, ok_only=True)
        botapi.send_user_message(
            OWNER, OWNER, "answer this", reply_to_message_id=int(help_call.result["message_id"])
        )
        text = await answer(botapi)
    assert "not" in text
    assert "/send" in text
    assert smtpd.received == []


async def test_reply_from_another_chat_does_not_resolve(
    reply_settings, botapi, smtpd, dovecot, mail_user
) -> None:
    """A summary's message id means something only in the chat it was posted to."""
    group = -100555
    async with running(reply_settings) as bridge:
        await bridge.ready()
        summary_ids = set()
        for subject in ("One", "Two"):  # one at a time: mails that wait together are combined
            dovecot.append(mail_user.name, mail_user.password, original(subject))
            summary_ids.add(await posted_summary(botapi))
        botapi.send_user_message(OWNER, group, "/help", chat_type="group")
        help_call = await botapi.next_call("sendMessage", timeout=15, ok_only=True)
        foreign_id = int(help_call.result["message_id"])
        assert foreign_id in summary_ids  # same number, other chat
        botapi.send_user_message(
            OWNER, group, "leak?", chat_type="group", reply_to_message_id=foreign_id
        )
        text = await answer(botapi, group)
    assert "not" in text
    assert "/send" in text
    assert smtpd.received == []
