"""The `open:<id>` button: post one mail's summary (from a combined message or a choice)."""

from __future__ import annotations

import logging
import re
from typing import Any

from telegram import MaybeInaccessibleMessage, Message, ReplyParameters, Update
from telegram.constants import ParseMode
from telegram.error import TelegramError
from telegram.ext import CallbackQueryHandler, ContextTypes

from bridge.db import store
from bridge.mail.summary import plain_text
from bridge.telegram.deps import deps
from bridge.telegram.errors import Verdict, classify
from bridge.telegram.keyboards import summary_keyboard

logger = logging.getLogger(__name__)

# Callback data comes back from the client: a row id, nothing else (at most 18 digits, so it
# fits a 64-bit column).
_OPEN = re.compile(r"open:([0-9]{1,18})", re.ASCII)
NOT_VALID = "This button is not valid."
GONE = "That mail is no longer here."


def plain_line(mail: store.ShownMail) -> str:
    """The short line shown for a mail whose summary was not kept."""
    record = mail.record
    sender = record.sender_name or record.sender or "unknown sender"
    if record.sender_name and record.sender:
        sender = f"{record.sender_name} <{record.sender}>"
    return f"✉️ {sender}: {record.subject or '(no subject)'}"


async def open_mail(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Post the pressed mail's summary as a reply to the pressed message, in its topic."""
    query, chat = update.callback_query, update.effective_chat
    if query is None:
        return
    match = _OPEN.fullmatch(query.data or "")
    pressed = query.message
    if match is None or chat is None or pressed is None:
        await query.answer(NOT_VALID)
        return
    d = deps(context)
    # The row must belong to the chat the press came from: ids from elsewhere show nothing.
    # Under the chat's lock: the message pressed may still be being recorded.
    async with d.chat_locks[chat.id]:
        shown = await d.db.run(store.find_in_chat, chat.id, int(match.group(1)))
    if shown is None:
        await query.answer(GONE)
        return
    async with d.chat_locks[chat.id]:  # a reply to the new message waits until it is recorded
        try:
            posted = await _post(context, pressed, shown)
        except TelegramError as exc:
            logger.warning("could not post the summary of mail %d: %s", shown.posted_mail_id, exc)
            await query.answer("Could not post that mail; try again.")
            return
        # Replies to the new message resolve to this mail like replies to a delivered summary.
        await d.db.persist(store.record_summary, shown.posted_mail_id, chat.id, posted.message_id)
    await query.answer()


async def _post(
    context: ContextTypes.DEFAULT_TYPE, pressed: MaybeInaccessibleMessage, shown: store.ShownMail
) -> Message:
    """Send the stored summary (Telegram HTML), or a plain line when there is none."""
    # A message older than 48 hours comes without its content (InaccessibleMessage): its
    # topic is unknown, the reply still finds it.
    thread = None
    if isinstance(pressed, Message) and pressed.is_topic_message:
        thread = pressed.message_thread_id
    reply_to = ReplyParameters(pressed.message_id, allow_sending_without_reply=True)
    summary = shown.record.summary
    text = plain_line(shown)
    keyboard = summary_keyboard(
        shown.posted_mail_id,
        attachments=shown.record.attachments,
        seen=shown.seen,
        state=shown.state,
    )
    if summary:
        try:
            return await context.bot.send_message(
                pressed.chat.id,
                summary,
                parse_mode=ParseMode.HTML,
                message_thread_id=thread,
                reply_parameters=reply_to,
                reply_markup=keyboard,
            )
        except TelegramError as exc:
            if classify(exc).verdict is not Verdict.BAD_HTML:
                raise
            logger.warning("Telegram refused a stored summary's HTML; sending its plain text")
            text = plain_text(summary)
    return await context.bot.send_message(
        pressed.chat.id,
        text,
        message_thread_id=thread,
        reply_parameters=reply_to,
        reply_markup=keyboard,
    )


def handler() -> CallbackQueryHandler[Any, None]:
    """Every `open:` button; malformed data is answered as not valid."""
    return CallbackQueryHandler(open_mail, pattern=r"^open:")
