"""A Telegram reply to a posted mail becomes a threaded email reply to the right person."""

from __future__ import annotations

import asyncio
from email.message import EmailMessage

import pytest

from bridge.db import store
from bridge.db.engine import Database, make_engine
from tests.integration.chat import answer, answer_containing, buttons, outbox_counts
from tests.integration.conftest import OWNER, WORK_SENDER, running

STRANGER = 999


def original(
    subject: str,
    *,
    reply_to: str | None = "List <list@example.org>",
    message_id: str = "<orig-1@example.org>",
) -> bytes:
    msg = EmailMessage()
    msg["From"] = "Ann Sender <ann@example.org>"
    msg["To"] = "me@example.org"
    if reply_to:
        msg["Reply-To"] = reply_to
    msg["Subject"] = subject
    msg["Message-ID"] = message_id
    msg["References"] = "<root@example.org> <middle@example.org>"
    msg.set_content("What do you think?")
    return bytes(msg)


async def posted_summary(botapi) -> int:
    call = await botapi.next_call("sendMessage", timeout=15, ok_only=True)
    return int(call.result["message_id"])


async def shown_mails(settings, chat_id: int, message_id: int) -> list[store.ShownMail]:
    """The mails a Telegram message shows, once the bridge has recorded them (bounded poll)."""
    db = Database(make_engine(settings.core.database_url))
    try:
        async with asyncio.timeout(10):  # recorded right after Telegram accepted the message
            while True:
                shown = await db.run(store.find_by_summary, chat_id, message_id)
                if shown:
                    return shown
                await asyncio.sleep(0.05)
    finally:
        db.engine.dispose()


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


async def test_reply_leaves_through_the_account_the_mail_came_to(
    two_accounts, botapi, smtpd, work_smtpd, dovecot, work_user
) -> None:
    async with running(two_accounts()) as bridge:
        await bridge.ready()
        dovecot.append(work_user.name, work_user.password, original("Budget"))
        summary_id = await posted_summary(botapi)
        botapi.send_user_message(OWNER, OWNER, "Approved.", reply_to_message_id=summary_id)
        received = await work_smtpd.next_message(timeout=20)
        await answer_containing(botapi, "Sent to")
    assert received.login == work_smtpd.username
    msg = received.message()
    assert msg["From"] == WORK_SENDER
    assert msg["Subject"] == "Re: Budget"
    assert msg["In-Reply-To"] == "<orig-1@example.org>"
    assert smtpd.received == []


async def test_reply_to_a_combined_message_asks_which_mail(
    reply_settings, botapi, smtpd, dovecot, mail_user
) -> None:
    async with running(reply_settings) as bridge:
        await bridge.ready()
        dovecot.append(
            mail_user.name, mail_user.password, original("Lunch", message_id="<lunch@example.org>")
        )
        combined_id = await posted_summary(botapi)
        dovecot.append(
            mail_user.name,
            mail_user.password,
            original("Dinner", message_id="<dinner@example.org>", reply_to=None),
        )
        second_id = await posted_summary(botapi)
        (lunch,) = await shown_mails(reply_settings, OWNER, combined_id)
        (dinner,) = await shown_mails(reply_settings, OWNER, second_id)
        # The first message now shows both mails, as a combined message does.
        db = Database(make_engine(reply_settings.core.database_url))
        try:
            await db.run(store.record_summary, dinner.posted_mail_id, OWNER, combined_id)
        finally:
            db.engine.dispose()

        botapi.send_user_message(OWNER, OWNER, "Yes!", reply_to_message_id=combined_id)
        question = await botapi.next_call("sendMessage", timeout=15, ok_only=True)
        assert "several" in question.params["text"]
        assert "\n" not in question.params["text"]
        choices = buttons(question)
        assert [data for _, data in choices] == [
            f"open:{lunch.posted_mail_id}",
            f"open:{dinner.posted_mail_id}",
        ]
        assert "Lunch" in choices[0][0]
        assert "Ann Sender" in choices[0][0]
        assert "Dinner" in choices[1][0]
        assert await outbox_counts(reply_settings) == {}  # nothing was sent

        question_id = question.result["message_id"]
        query_id = botapi.press_button(OWNER, OWNER, question_id, f"open:{dinner.posted_mail_id}")
        opened = await botapi.next_call("sendMessage", timeout=15, ok_only=True)
        answered = await botapi.next_call("answerCallbackQuery", timeout=15, ok_only=True)
        assert answered.params["callback_query_id"] == query_id
        assert opened.params["text"] == dinner.record.summary
        assert opened.params["reply_parameters"]["message_id"] == question_id

        botapi.send_user_message(
            OWNER, OWNER, "Dinner it is.", reply_to_message_id=opened.result["message_id"]
        )
        received = await smtpd.next_message(timeout=20)
        await answer_containing(botapi, "Sent to")
    msg = received.message()
    assert msg["In-Reply-To"] == "<dinner@example.org>"
    assert msg["Subject"] == "Re: Dinner"
    assert received.rcpt_tos == ["ann@example.org"]
    assert len(smtpd.received) == 1


async def test_in_a_forum_topic_only_real_replies_count(
    settings_for, smtpd, botapi, dovecot, mail_user
) -> None:
    group = -100881
    botapi.make_forum(group)
    thread = botapi.add_topic(group, "Mail")  # created by the bot, as routes do
    settings = settings_for(
        smtpd=smtpd, imap={"save_sent": False}, routes=[{"chats": [group], "topic": thread}]
    )
    async with running(settings) as bridge:
        await bridge.ready()
        dovecot.append(mail_user.name, mail_user.password, original("In a topic"))
        summary = await botapi.next_call("sendMessage", timeout=15, ok_only=True)
        assert int(summary.params["chat_id"]) == group
        assert int(summary.params["message_thread_id"]) == thread

        # Telegram gives a message that replies to nothing the topic's first message as
        # reply_to_message: that is not a reply, and gets no answer.
        botapi.send_user_message(OWNER, group, "Morning, everyone", thread_id=thread)
        botapi.send_user_message(OWNER, group, "/help", thread_id=thread)
        help_call = await botapi.next_call("sendMessage", timeout=15, ok_only=True)
        assert "/inbox" in help_call.params["text"]  # the first answer is the one to /help

        botapi.send_user_message(
            OWNER, group, "Replied in the topic.", reply_to_message_id=summary.result["message_id"]
        )
        received = await smtpd.next_message(timeout=20)
        sending = await botapi.next_call("sendMessage", timeout=15, ok_only=True)
        await answer_containing(botapi, "Sent to", group)
    assert "Sending" in sending.params["text"]
    assert int(sending.params["message_thread_id"]) == thread
    assert received.message()["Subject"] == "Re: In a topic"
    assert len(smtpd.received) == 1


async def test_open_buttons_cannot_be_forged(
    reply_settings, botapi, smtpd, dovecot, mail_user
) -> None:
    group = -100556
    async with running(reply_settings) as bridge:
        await bridge.ready()
        dovecot.append(mail_user.name, mail_user.password, original("Private"))
        summary_id = await posted_summary(botapi)
        (mail,) = await shown_mails(reply_settings, OWNER, summary_id)
        botapi.send_user_message(OWNER, group, "/help", chat_type="group")
        help_id = (await botapi.next_call("sendMessage", timeout=15, ok_only=True)).result[
            "message_id"
        ]
        presses = [
            (group, help_id, f"open:{mail.posted_mail_id}", "no longer here"),  # another chat's
            (OWNER, summary_id, "open:999999", "no longer here"),  # no such mail
            (OWNER, summary_id, f"open:{mail.posted_mail_id} ", "not valid"),
            (OWNER, summary_id, "open:-1", "not valid"),
            (OWNER, summary_id, "open:\u0663", "not valid"),  # an Arabic-Indic digit
            (OWNER, summary_id, "open:" + "9" * 30, "not valid"),
            (OWNER, summary_id, "open:", "not valid"),
        ]
        for chat_id, message_id, data, expected in presses:
            query_id = botapi.press_button(OWNER, chat_id, message_id, data)
            answered = await botapi.next_call("answerCallbackQuery", timeout=15, ok_only=True)
            assert answered.params["callback_query_id"] == query_id
            assert expected in answered.params["text"], data
        # A stranger's press of a real button is refused by the gate.
        botapi.press_button(STRANGER, OWNER, summary_id, f"open:{mail.posted_mail_id}")
        refused = await botapi.next_call("answerCallbackQuery", timeout=15, ok_only=True)
        assert "Not allowed" in refused.params["text"]
        botapi.send_user_message(OWNER, OWNER, "/help")
        assert "/inbox" in await answer(botapi)  # nothing was posted before this answer
        db = Database(make_engine(reply_settings.core.database_url))
        try:
            assert await db.run(store.find_in_chat, group, mail.posted_mail_id) is None
        finally:
            db.engine.dispose()
    assert len(botapi.sent_messages(group)) == 1  # only the /help answer
    assert smtpd.received == []
