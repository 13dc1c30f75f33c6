"""A Telegram reply to a posted mail becomes an email reply to its sender, through its account."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from telegram import InlineKeyboardButton, InlineKeyboardMarkup, Message, Update
from telegram.ext import ContextTypes, MessageHandler, filters

from bridge.db import store
from bridge.mail.compose import (
    InvalidMail,
    OutgoingMail,
    parse_addresses,
    reply_references,
    reply_subject,
)
from bridge.telegram.deps import Deps, deps
from bridge.telegram.send import AttachmentError, attachments_of, submit, text_of

logger = logging.getLogger(__name__)

NOT_A_MAIL = (
    "I can only answer mail by a reply to one of my new-mail messages in this chat; "
    "this one is not. Use /send to write a new mail."
)
WHICH_MAIL = "This message shows several mails: open the one you answer, then reply to it."
OPEN_BUTTON = "open:"
# Telegram shows about this many characters of a button; an inline keyboard has at most 100.
BUTTON_LABEL = 60
MAX_CHOICES = 30


def replies_to_topic(message: Message) -> bool:
    """True when a message in a forum topic replied to nothing.

    Telegram gives such a message the topic's creation message as `reply_to_message`.
    """
    original = message.reply_to_message
    if original is None:
        return False
    return original.forum_topic_created is not None or bool(
        message.is_topic_message and original.message_id == message.message_thread_id
    )


def choice_label(mail: store.ShownMail) -> str:
    """A button label: sender and subject, cut to what a phone shows."""
    record = mail.record
    sender = record.sender_name or record.sender or "?"
    label = " ".join(f"{sender}: {record.subject or '(no subject)'}".split())
    return label if len(label) <= BUTTON_LABEL else label[: BUTTON_LABEL - 1] + "…"


def choices(mails: Sequence[store.ShownMail]) -> InlineKeyboardMarkup:
    """One `open:<id>` button per mail (the newest MAX_CHOICES)."""
    shown = list(mails)[-MAX_CHOICES:]
    return InlineKeyboardMarkup(
        [
            [
                InlineKeyboardButton(
                    choice_label(m), callback_data=f"{OPEN_BUTTON}{m.posted_mail_id}"
                )
            ]
            for m in shown
        ]
    )


async def reply(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Resolve the replied-to summary to its mail and send the text as an email reply."""
    message, chat = update.effective_message, update.effective_chat
    if message is None or chat is None or message.reply_to_message is None:
        return
    if replies_to_topic(message):
        return  # a plain message in a forum topic: not a reply at all
    original = message.reply_to_message
    if original.from_user is None or original.from_user.id != context.bot.id:
        return  # people answering each other in a group: not for us
    d = deps(context)
    asked = await d.db.run(store.find_by_summary, chat.id, original.message_id, ("forward",))
    if asked:
        await forward_to(update, d, asked[0])
        return
    async with d.chat_locks[chat.id]:  # a summary being recorded right now is found
        shown = await d.db.run(store.find_by_summary, chat.id, original.message_id)
    if not shown:
        await message.reply_text(NOT_A_MAIL, do_quote=False)
        return
    if len(shown) > 1:
        await message.reply_text(WHICH_MAIL, reply_markup=choices(shown), do_quote=False)
        return
    (mail_shown,) = shown
    record = mail_shown.record
    try:
        to = parse_addresses(record.reply_to or record.sender)
        attachments = await attachments_of(message)
        body = text_of(message)
        if not body.strip() and not attachments:
            raise InvalidMail("Not sent: the reply is empty.")
        mail = OutgoingMail(
            to=to,
            subject=reply_subject(record.subject),
            body=body,
            attachments=attachments,
            in_reply_to=record.message_id,
            references=(
                reply_references(record.references, record.message_id) if record.message_id else ()
            ),
        )
    except InvalidMail as exc:
        await message.reply_text(f"Cannot answer this mail: {exc}", do_quote=False)
        return
    except AttachmentError as exc:
        await message.reply_text(str(exc), do_quote=False)
        return
    await submit(update, context, mail, message.message_id, account=mail_shown.account)


async def forward_to(update: Update, d: Deps, shown: store.ShownMail) -> None:
    """The answer to "forward to whom?": check the addresses like /send, then queue the job
    that fetches the original and hands it to the outbox."""
    message, chat = update.effective_message, update.effective_chat
    if message is None or chat is None:
        return
    try:
        to = parse_addresses(text_of(message))
    except InvalidMail as exc:
        await message.reply_text(f"Not forwarded: {exc} Reply to my question again.")
        return
    job = await d.db.run(
        store.add_job,
        update_id=update.update_id,
        kind="forward",
        chat_id=chat.id,
        user_id=update.effective_user.id if update.effective_user else None,
        message_id=message.message_id,
        thread_id=message.message_thread_id if message.is_topic_message else None,
        posted_mail_id=shown.posted_mail_id,
        args=", ".join(to),
    )
    if job is not None:
        await message.reply_text(f"↪️ Forwarding to {', '.join(to)}…", do_quote=False)
        d.jobs.wake()


def handler() -> MessageHandler[Any, Any]:
    """Replies (text, photo or document) that are not commands."""
    content = filters.TEXT | filters.PHOTO | filters.Document.ALL
    return MessageHandler(filters.REPLY & content & ~filters.COMMAND, reply)
