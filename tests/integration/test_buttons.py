"""The buttons under a summary, pressed as Telegram would: read, file, fetch, forward, mute."""

from __future__ import annotations

import asyncio
import email
import email.policy
import secrets
from collections.abc import Iterator
from email.message import EmailMessage
from typing import Any

import pytest

from tests.conftest import SECRETS
from tests.integration.conftest import OWNER, running
from tests.servers.dovecot import DovecotServer, MailUser

STRANGER = 666


def message(
    subject: str,
    body: str = "Hello.\n",
    *,
    sender: str = "Ann <ann@example.org>",
    attachments: list[tuple[str, str, bytes]] | None = None,
    html: str | None = None,
) -> bytes:
    """A mail with optional attachments (name, type, data) and an HTML alternative."""
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = "me@example.org"
    msg["Subject"] = subject
    msg["Message-ID"] = f"<{secrets.token_hex(8)}@example.org>"
    msg.set_content(body)
    if html is not None:
        msg.add_alternative(html, subtype="html")
    for name, ctype, data in attachments or []:
        maintype, subtype = ctype.split("/")
        msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=name)
    return msg.as_bytes()


def keyboard(call_or_message: Any) -> dict[str, str]:
    """Button label -> callback_data of a sendMessage call or a stored message."""
    params = getattr(call_or_message, "params", call_or_message)
    markup = params.get("reply_markup") or {}
    return {
        b["text"]: b["callback_data"] for row in markup.get("inline_keyboard", []) for b in row
    }


def button(buttons: dict[str, str], word: str) -> str:
    """The callback data of the button whose label contains `word` (case-insensitive)."""
    found = [data for label, data in buttons.items() if word.lower() in label.lower()]
    assert len(found) == 1, f"no single {word!r} button in {list(buttons)}"
    return found[0]


async def summary_of(botapi, subject: str, timeout: float = 15) -> Any:
    """The sendMessage call that posted the summary of `subject` (bounded wait)."""
    async with asyncio.timeout(timeout):
        while True:
            for call in botapi.calls("sendMessage", ok_only=True):
                if f"<b>{subject}</b>" in str(call.params["text"]):
                    return call
            await botapi.next_call("sendMessage", timeout=timeout, ok_only=True)


async def answer_of(botapi, query_id: str, timeout: float = 10) -> str:
    """The text answerCallbackQuery gave this press (bounded wait)."""
    async with asyncio.timeout(timeout):
        while True:
            for call in botapi.calls("answerCallbackQuery"):
                if call.params.get("callback_query_id") == query_id:
                    return str(call.params.get("text", ""))
            await botapi.next_call("answerCallbackQuery", timeout=timeout)


async def next_after(botapi, method: str, count_before: int, timeout: float = 15) -> Any:
    """The first `method` call after the first `count_before` ones (bounded wait)."""
    async with asyncio.timeout(timeout):
        while len(botapi.calls(method, ok_only=True)) <= count_before:
            await botapi.next_call(method, timeout=timeout, ok_only=True)
    return botapi.calls(method, ok_only=True)[count_before]


async def deliver_and_show(bridge, botapi, dovecot, user, raw: bytes, subject: str) -> tuple:
    """Append a mail, wait for its summary; (uid, the summary call, its message id)."""
    uid = dovecot.append(user.name, user.password, raw)
    call = await summary_of(botapi, subject)
    return uid, call, int(call.result["message_id"])


def replied_to(call: Any) -> int:
    """The message a bot message answers (PTB sends reply_parameters)."""
    params = call.params.get("reply_parameters") or {}
    return int(params.get("message_id") or call.params.get("reply_to_message_id") or 0)


def press(botapi, message_id: int, data: str, user: int = OWNER) -> str:
    return botapi.press_button(user, OWNER, message_id, data)


async def test_summary_buttons_and_more(settings_for, dovecot, mail_user, botapi) -> None:
    async with running(settings_for()) as bridge:
        await bridge.ready()
        raw = message("With buttons", attachments=[("a.pdf", "application/pdf", b"%PDF-1")])
        _uid, call, message_id = await deliver_and_show(
            bridge, botapi, dovecot, mail_user, raw, "With buttons"
        )
        buttons = keyboard(call)
        for word in ("Full text", "Attachments", "Mark read", "Archive", "Delete", "More"):
            button(buttons, word)
        assert all(len(data.encode()) <= 64 for data in buttons.values())
        assert not any(str(mail_user.name) in data for data in buttons.values())
        edits = len(botapi.calls("editMessageReplyMarkup", ok_only=True))
        query = press(botapi, message_id, button(buttons, "More"))
        await answer_of(botapi, query)
        await next_after(botapi, "editMessageReplyMarkup", edits)
        more = keyboard(botapi.message(OWNER, message_id))
        for word in ("Spam", "Forward", "Mute sender", "Less"):
            button(more, word)


async def test_mark_read_and_unread_set_the_flag_on_the_server(
    settings_for, dovecot, mail_user, botapi
) -> None:
    async with running(settings_for()) as bridge:
        await bridge.ready()
        uid, call, message_id = await deliver_and_show(
            bridge, botapi, dovecot, mail_user, message("Flag me"), "Flag me"
        )
        assert b"\\Seen" not in dovecot.flags(mail_user.name, mail_user.password, uid)
        edits = len(botapi.calls("editMessageReplyMarkup", ok_only=True))
        press(botapi, message_id, button(keyboard(call), "Mark read"))
        await next_after(botapi, "editMessageReplyMarkup", edits)
        assert b"\\Seen" in dovecot.flags(mail_user.name, mail_user.password, uid)
        unread = button(keyboard(botapi.message(OWNER, message_id)), "Mark unread")
        press(botapi, message_id, unread)
        await next_after(botapi, "editMessageReplyMarkup", edits + 1)
        assert b"\\Seen" not in dovecot.flags(mail_user.name, mail_user.password, uid)
        button(keyboard(botapi.message(OWNER, message_id)), "Mark read")


async def test_full_text_as_replies_then_as_a_document_never_seen(
    settings_for, dovecot, mail_user, botapi
) -> None:
    paragraphs = [f"Paragraph {n}: " + "words & <more> words " * 60 for n in range(6)]
    long_text = "\n\n".join(paragraphs)
    async with running(settings_for()) as bridge:
        await bridge.ready()
        uid, call, message_id = await deliver_and_show(
            bridge, botapi, dovecot, mail_user, message("Long read", long_text), "Long read"
        )
        before = len(botapi.calls("sendMessage", ok_only=True))
        press(botapi, message_id, button(keyboard(call), "Full text"))
        parts = []
        async with asyncio.timeout(15):
            while "Paragraph 5" not in "".join(parts):
                reply = await next_after(botapi, "sendMessage", before + len(parts))
                parts.append(str(reply.params["text"]))
                assert replied_to(reply) == message_id
        assert 1 < len(parts) <= 3
        assert all(len(p.encode("utf-16-le")) // 2 <= 4096 for p in parts)
        assert "words &amp; &lt;more&gt; words" in parts[0]
        assert b"\\Seen" not in dovecot.flags(mail_user.name, mail_user.password, uid)

        huge = "\n\n".join(f"Line {n} " + "x" * 200 for n in range(400))
        _uid, call, message_id = await deliver_and_show(
            bridge,
            botapi,
            dovecot,
            mail_user,
            message("Huge read", huge, html="<p>Huge <b>read</b></p>"),
            "Huge read",
        )
        docs = len(botapi.calls("sendDocument", ok_only=True))
        press(botapi, message_id, button(keyboard(call), "Full text"))
        text_doc = await next_after(botapi, "sendDocument", docs)
        html_doc = await next_after(botapi, "sendDocument", docs + 1)
    assert text_doc.params["document"].filename == "mail.txt"
    assert "Line 399 " in text_doc.params["document"].data.decode()
    assert html_doc.params["document"].filename == "mail.html"


async def test_attachment_on_demand_with_its_decoded_name(
    settings_for, dovecot, mail_user, botapi
) -> None:
    data = secrets.token_bytes(300_000)
    name = "Übersicht café 2026.pdf"
    raw = message("Report", attachments=[(name, "application/pdf", data)])
    async with running(settings_for()) as bridge:
        await bridge.ready()
        uid, call, message_id = await deliver_and_show(
            bridge, botapi, dovecot, mail_user, raw, "Report"
        )
        docs = len(botapi.calls("sendDocument", ok_only=True))
        press(botapi, message_id, button(keyboard(call), "Attachments"))
        sent = await next_after(botapi, "sendDocument", docs)
    assert sent.params["document"].filename == name
    assert sent.params["document"].data == data
    assert replied_to(sent) == message_id
    assert b"\\Seen" not in dovecot.flags(mail_user.name, mail_user.password, uid)


async def test_several_attachments_each_its_button_and_the_limit(
    settings_for, dovecot, mail_user, botapi
) -> None:
    small, big = b"small file", secrets.token_bytes(1_500_000)
    raw = message(
        "Two files",
        attachments=[("small.txt", "text/plain", small), ("big.bin", "application/zip", big)],
    )
    async with running(settings_for(telegram={"upload_limit_mb": 1})) as bridge:
        await bridge.ready()
        _uid, call, message_id = await deliver_and_show(
            bridge, botapi, dovecot, mail_user, raw, "Two files"
        )
        before = len(botapi.calls("sendMessage", ok_only=True))
        press(botapi, message_id, button(keyboard(call), "Attachments"))
        choice = await next_after(botapi, "sendMessage", before)
        choices = keyboard(choice)
        assert len(choices) == 2
        assert all("📎" in label for label in choices)
        choice_id = int(choice.result["message_id"])
        press(botapi, choice_id, button(choices, "big.bin"))
        refusal = await next_after(botapi, "sendMessage", before + 1)
        docs = len(botapi.calls("sendDocument", ok_only=True))
        press(botapi, choice_id, button(choices, "small.txt"))
        sent = await next_after(botapi, "sendDocument", docs)
    assert "big.bin" in refusal.params["text"]
    assert "1.4 MB" in refusal.params["text"]
    assert sent.params["document"].data == small
    assert len(botapi.calls("sendDocument", ok_only=True)) == docs + 1  # the big one never


async def test_archive_then_undo_moves_and_is_not_posted_again(
    settings_for, dovecot, mail_user, botapi
) -> None:
    dovecot.create_folders(mail_user.name, mail_user.password, "Archive", "Trash", "Junk")
    async with running(settings_for()) as bridge:
        await bridge.ready()
        _uid, call, message_id = await deliver_and_show(
            bridge, botapi, dovecot, mail_user, message("File me"), "File me"
        )
        edits = len(botapi.calls("editMessageText", ok_only=True))
        press(botapi, message_id, button(keyboard(call), "Archive"))
        await next_after(botapi, "editMessageText", edits)
        shown = botapi.message(OWNER, message_id)
        assert "Archived" in shown["text"]
        assert dovecot.uids(mail_user.name, mail_user.password, "INBOX") == []
        assert len(dovecot.uids(mail_user.name, mail_user.password, "Archive")) == 1
        press(botapi, message_id, button(keyboard(shown), "Undo"))
        await next_after(botapi, "editMessageText", edits + 1)
        assert "Archived" not in botapi.message(OWNER, message_id)["text"]
        assert len(dovecot.uids(mail_user.name, mail_user.password, "INBOX")) == 1
        assert dovecot.uids(mail_user.name, mail_user.password, "Archive") == []
        # The mail that came back is no new mail.
        dovecot.append(mail_user.name, mail_user.password, message("Next one"))
        await summary_of(botapi, "Next one")
        await bridge.ready()
    posts = [c for c in botapi.calls("sendMessage", ok_only=True) if "File me" in c.params["text"]]
    assert len(posts) == 1


@pytest.mark.parametrize(("word", "folder", "state"), [("Delete", "Trash", "trash")])
async def test_delete_moves_to_the_trash_never_destroys(
    settings_for, dovecot, mail_user, botapi, word, folder, state
) -> None:
    dovecot.create_folders(mail_user.name, mail_user.password, "Archive", "Trash", "Junk")
    async with running(settings_for()) as bridge:
        await bridge.ready()
        _uid, call, message_id = await deliver_and_show(
            bridge, botapi, dovecot, mail_user, message("Bin me"), "Bin me"
        )
        edits = len(botapi.calls("editMessageText", ok_only=True))
        press(botapi, message_id, button(keyboard(call), word))
        await next_after(botapi, "editMessageText", edits)
    assert state in botapi.message(OWNER, message_id)["text"].lower()
    assert len(dovecot.uids(mail_user.name, mail_user.password, folder)) == 1


async def test_strangers_forgeries_and_stale_buttons_change_nothing(
    settings_for, dovecot, mail_user, botapi
) -> None:
    dovecot.create_folders(mail_user.name, mail_user.password, "Archive")
    async with running(settings_for()) as bridge:
        await bridge.ready()
        uid, call, message_id = await deliver_and_show(
            bridge, botapi, dovecot, mail_user, message("Guarded"), "Guarded"
        )
        archive = button(keyboard(call), "Archive")
        # A stranger pressing the owner's button (e.g. in a shared group): nothing happens.
        stranger = press(botapi, message_id, archive, user=STRANGER)
        assert "not allowed" in (await answer_of(botapi, stranger)).lower()
        # Forged data: another mail id, nonsense, an action we do not have.
        _action, mail_id = archive.split(":")
        for data in (f"archive:{int(mail_id) + 999}", "archive:abc", "rm:1", "x" * 64):
            reply = await answer_of(botapi, press(botapi, message_id, data))
            assert "not valid" in reply.lower() or "no longer" in reply.lower()
        assert dovecot.uids(mail_user.name, mail_user.password, "INBOX") == [uid]
        # Another client deletes the mail: the button says so and changes nothing.
        dovecot.expunge(mail_user.name, mail_user.password, uid)
        before = len(botapi.calls("sendMessage", ok_only=True))
        press(botapi, message_id, archive)
        stale = await next_after(botapi, "sendMessage", before)
    assert "no longer" in stale.params["text"].lower()
    assert dovecot.uids(mail_user.name, mail_user.password, "Archive") == []


async def test_forward_asks_for_addresses_and_sends_the_original(
    settings_for, dovecot, mail_user, botapi, smtpd
) -> None:
    raw = message("Pass it on", attachments=[("notes.txt", "text/plain", b"the notes")])
    async with running(settings_for(smtpd=smtpd)) as bridge:
        await bridge.ready()
        _uid, call, message_id = await deliver_and_show(
            bridge, botapi, dovecot, mail_user, raw, "Pass it on"
        )
        edits = len(botapi.calls("editMessageReplyMarkup", ok_only=True))
        press(botapi, message_id, button(keyboard(call), "More"))
        await next_after(botapi, "editMessageReplyMarkup", edits)
        before = len(botapi.calls("sendMessage", ok_only=True))
        press(botapi, message_id, button(keyboard(botapi.message(OWNER, message_id)), "Forward"))
        prompt = await next_after(botapi, "sendMessage", before)
        assert "force_reply" in prompt.params["reply_markup"]
        prompt_id = int(prompt.result["message_id"])
        botapi.send_user_message(OWNER, OWNER, "not an address", reply_to_message_id=prompt_id)
        refused = await next_after(botapi, "sendMessage", before + 1)
        assert "not forwarded" in refused.params["text"].lower()
        botapi.send_user_message(OWNER, OWNER, "bob@example.net", reply_to_message_id=prompt_id)
        received = await smtpd.next_message(20)
    assert received.rcpt_tos == ["bob@example.net"]
    mail = email.message_from_bytes(received.data, policy=email.policy.default)
    assert mail["Subject"] == "Fwd: Pass it on"
    inner = [p for p in mail.walk() if p.get_content_type() == "message/rfc822"]
    assert len(inner) == 1
    original = inner[0].get_content()
    assert original["Subject"] == "Pass it on"
    names = [p.get_filename() for p in original.walk() if p.get_filename()]
    assert names == ["notes.txt"]


async def test_mute_sender_then_unmute(settings_for, dovecot, mail_user, botapi) -> None:
    async with running(settings_for()) as bridge:
        await bridge.ready()
        _uid, call, message_id = await deliver_and_show(
            bridge,
            botapi,
            dovecot,
            mail_user,
            message("Newsletter 1", sender="news@shop.example"),
            "Newsletter 1",
        )
        edits = len(botapi.calls("editMessageReplyMarkup", ok_only=True))
        press(botapi, message_id, button(keyboard(call), "More"))
        await next_after(botapi, "editMessageReplyMarkup", edits)
        before = len(botapi.calls("sendMessage", ok_only=True))
        press(botapi, message_id, button(keyboard(botapi.message(OWNER, message_id)), "Mute"))
        note = await next_after(botapi, "sendMessage", before)
        assert "news@shop.example" in note.params["text"]
        dovecot.append(
            mail_user.name, mail_user.password, message("Newsletter 2", sender="news@shop.example")
        )
        dovecot.append(mail_user.name, mail_user.password, message("From a friend"))
        await summary_of(botapi, "From a friend")
        botapi.send_user_message(OWNER, OWNER, "/mutes")
        listed = await next_after(botapi, "sendMessage", before + 2)
        assert "news@shop.example" in listed.params["text"]
        botapi.send_user_message(OWNER, OWNER, "/unmute news@shop.example")
        await next_after(botapi, "sendMessage", before + 3)
        dovecot.append(
            mail_user.name, mail_user.password, message("Newsletter 3", sender="news@shop.example")
        )
        await summary_of(botapi, "Newsletter 3")
    texts = " ".join(str(c.params["text"]) for c in botapi.calls("sendMessage", ok_only=True))
    assert "Newsletter 2" not in texts


async def test_search_lists_matches_with_buttons_that_post_summaries(
    settings_for, dovecot, mail_user, botapi
) -> None:
    for n in range(12):
        dovecot.append(mail_user.name, mail_user.password, message(f"Invoice {n:02}"))
    dovecot.append(mail_user.name, mail_user.password, message("Holiday photos"))
    async with running(settings_for()) as bridge:
        await bridge.ready()
        before = len(botapi.calls("sendMessage", ok_only=True))
        botapi.send_user_message(OWNER, OWNER, "/search subject:invoice")
        results = await next_after(botapi, "sendMessage", before)
        text = str(results.params["text"])
        assert "Invoice 11" in text
        assert "Invoice 02" in text
        assert "Invoice 01" not in text  # at most 10, newest first
        assert "Holiday" not in text
        buttons = keyboard(results)
        assert len(buttons) == 10
        press(botapi, int(results.result["message_id"]), next(iter(buttons.values())))
        summary = await next_after(botapi, "sendMessage", before + 1)
        assert "<b>Invoice 11</b>" in summary.params["text"]
        button(keyboard(summary), "Archive")
        botapi.send_user_message(OWNER, OWNER, "/search since:2026-13-01")
        bad = await next_after(botapi, "sendMessage", before + 2)
    assert "YYYY-MM-DD" in bad.params["text"]


async def test_inbox_of_50_long_subjects_fits_one_message(
    settings_for, dovecot, mail_user, botapi
) -> None:
    dovecot.fill(mail_user.name, 50, message("A rather long subject that goes on " * 4))
    async with running(settings_for()) as bridge:
        await bridge.ready()
        before = len(botapi.calls("sendMessage", ok_only=True))
        botapi.send_user_message(OWNER, OWNER, "/inbox 50")
        listed = await next_after(botapi, "sendMessage", before)
    assert str(listed.params["text"]).count("\n") == 50
    assert len(keyboard(listed)) == 50


async def test_a_slow_upload_holds_up_no_other_command(
    settings_for, dovecot, mail_user, botapi
) -> None:
    raw = message("Slow file", attachments=[("big.bin", "application/zip", b"z" * 200_000)])
    async with running(settings_for()) as bridge:
        await bridge.ready()
        _uid, call, message_id = await deliver_and_show(
            bridge, botapi, dovecot, mail_user, raw, "Slow file"
        )
        botapi.delay("sendDocument", 6.0)  # the upload takes 6 s to be answered
        docs = len(botapi.calls("sendDocument", ok_only=True))
        query = press(botapi, message_id, button(keyboard(call), "Attachments"))
        await answer_of(botapi, query)  # the press was answered: the upload is under way
        before = len(botapi.calls("sendMessage", ok_only=True))
        botapi.send_user_message(OWNER, OWNER, "/help")
        helped = await next_after(botapi, "sendMessage", before, timeout=4)
        assert "Commands" in helped.params["text"]
        assert len(botapi.calls("sendDocument", ok_only=True)) == docs  # still uploading
        await next_after(botapi, "sendDocument", docs, timeout=15)


@pytest.fixture(scope="module")
def dovecot_no_move(ca) -> Iterator[DovecotServer]:
    """A server that does not offer MOVE (RFC 6851): the buttons must COPY + UID EXPUNGE."""
    with DovecotServer(ca, without_capabilities=("MOVE",)) as server:
        yield server


async def test_archive_and_undo_without_move_copy_and_expunge_only_that_mail(
    settings_for, dovecot_no_move, botapi
) -> None:
    user = MailUser(f"nomove{secrets.token_hex(3)}", secrets.token_urlsafe(12))
    dovecot_no_move.add_user(user.name, user.password)
    SECRETS.add(user.password)
    dovecot_no_move.create_folders(user.name, user.password, "Archive")
    other = dovecot_no_move.append(
        user.name, user.password, message("Someone else's"), flags=[b"\\Deleted"]
    )
    settings = settings_for(dovecot=dovecot_no_move, user=user)
    async with running(settings) as bridge:
        await bridge.ready()
        _uid, call, message_id = await deliver_and_show(
            bridge, botapi, dovecot_no_move, user, message("No move here"), "No move here"
        )
        edits = len(botapi.calls("editMessageText", ok_only=True))
        press(botapi, message_id, button(keyboard(call), "Archive"))
        await next_after(botapi, "editMessageText", edits)
        assert "Archived" in botapi.message(OWNER, message_id)["text"]
        assert len(dovecot_no_move.uids(user.name, user.password, "Archive")) == 1
        press(botapi, message_id, button(keyboard(botapi.message(OWNER, message_id)), "Undo"))
        await next_after(botapi, "editMessageText", edits + 1)
        assert dovecot_no_move.uids(user.name, user.password, "Archive") == []
    # Another client's \Deleted mail was not expunged along with ours.
    assert b"\\Deleted" in dovecot_no_move.flags(user.name, user.password, other)
