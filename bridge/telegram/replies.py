"""A Telegram reply to a posted mail becomes an email reply to its sender."""

from __future__ import annotations

import logging
from typing import Any

from telegram import Update
from telegram.ext import ContextTypes, MessageHandler, filters

from bridge.db import store
from bridge.mail.compose import (
    InvalidMail,
    OutgoingMail,
    parse_addresses,
    reply_references,
    reply_subject,
)
from bridge.telegram.deps import deps
from bridge.telegram.send import AttachmentError, attachments_of, submit, text_of

logger = logging.getLogger(__name__)

NOT_A_MAIL = (
    "I can only answer mail by a reply to one of my new-mail messages in this chat; "
    "this one is not. Use /send to write a new mail."
)


async def reply(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Resolve the replied-to summary to its mail and send the text as an email reply."""
    message, chat = update.effective_message, update.effective_chat
    if message is None or chat is None or message.reply_to_message is None:
        return
    original = message.reply_to_message
    if original.from_user is None or original.from_user.id != context.bot.id:
        return  # people answering each other in a group: not for us
    d = deps(context)
    async with d.chat_locks[chat.id]:  # a summary being recorded right now is found
        record = await d.db.run(store.find_by_summary, chat.id, original.message_id)
    if record is None:
        await message.reply_text(NOT_A_MAIL, do_quote=False)
        return
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
    await submit(update, context, mail, message.message_id)


def handler() -> MessageHandler[Any, Any]:
    """Replies (text, photo or document) that are not commands."""
    content = filters.TEXT | filters.PHOTO | filters.Document.ALL
    return MessageHandler(filters.REPLY & content & ~filters.COMMAND, reply)
