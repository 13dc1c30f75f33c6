"""Presses on a summary's buttons: checked, answered at once, and turned into jobs.

The gate (access.py) has already stopped presses by strangers. Here the callback data is
parsed strictly and its mail row must belong to the chat the press came from; anything else
is answered with one line and changes nothing.
"""

from __future__ import annotations

import html
import logging
from typing import Any

from telegram import ForceReply, Message, Update
from telegram.constants import ParseMode
from telegram.ext import CallbackQueryHandler, ContextTypes

from bridge.db import store
from bridge.db.engine import Database
from bridge.telegram.deps import deps
from bridge.telegram.keyboards import parse_callback, summary_keyboard

logger = logging.getLogger(__name__)

ANSWERS = {
    "text": "Fetching the full text…",
    "att": "Fetching the attachments…",
    "part": "Fetching the attachment…",
    "read": "Marking read…",
    "unread": "Marking unread…",
    "archive": "Archiving…",
    "delete": "Moving to the trash…",
    "spam": "Moving to spam…",
    "undo": "Undoing…",
}
NOT_VALID = "This button is not valid."
GONE = "That mail is no longer here."


async def press(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """A summary button: answer at once, then do the work as a job."""
    query, chat, user = update.callback_query, update.effective_chat, update.effective_user
    if query is None or chat is None:
        return
    parsed = parse_callback(query.data)
    if parsed is None or parsed.action == "open":
        await query.answer(NOT_VALID)
        return
    d = deps(context)
    async with d.chat_locks[chat.id]:  # the pressed message may still be being recorded
        shown = await d.db.run(store.find_in_chat, chat.id, parsed.mail_id)
    if shown is None:
        await query.answer(GONE)
        return
    message = query.message if isinstance(query.message, Message) else None
    if parsed.action in ("more", "less"):
        await query.answer()
        if message is not None:
            keyboard = summary_keyboard(
                shown.posted_mail_id,
                attachments=shown.record.attachments,
                seen=shown.seen,
                state=shown.state,
                more=parsed.action == "more",
            )
            await message.edit_reply_markup(keyboard)
        return
    if parsed.action == "mute":
        await _mute(update, d.db, shown, user.id if user else None)
        return
    if parsed.action == "fwd":
        await query.answer()
        await _ask_forward(update, d.db, shown)
        return
    await d.db.run(
        store.add_job,
        update_id=update.update_id,
        kind=parsed.action,
        chat_id=chat.id,
        user_id=user.id if user else None,
        message_id=message.message_id if message else None,
        thread_id=message.message_thread_id if message and message.is_topic_message else None,
        posted_mail_id=shown.posted_mail_id,
        args="" if parsed.number is None else str(parsed.number),
    )
    await query.answer(ANSWERS.get(parsed.action, "Working on it…"))
    d.jobs.wake()


async def _mute(update: Update, db: Database, shown: store.ShownMail, user_id: int | None) -> None:
    query, chat = update.callback_query, update.effective_chat
    if query is None or chat is None:
        return
    sender = shown.record.sender.strip().lower()
    if not sender:
        await query.answer("This mail has no sender address to mute.")
        return
    if len(sender) > store.ADDRESS_MAX:  # a malformed From; no real address is this long
        await query.answer("This sender's address is too long to mute.")
        return
    added = await db.run(store.add_mute, sender, user_id)
    await query.answer("Muted." if added else "Already muted.")
    await chat.send_message(
        f"🔇 Later mail from {html.escape(sender)} is recorded but not posted. "
        f"/unmute {html.escape(sender)} ends it; /mutes lists all.",
        parse_mode=ParseMode.HTML,
    )


async def _ask_forward(update: Update, db: Database, shown: store.ShownMail) -> None:
    """Ask for the addresses; the reply to this question is the forward order (replies.py)."""
    chat = update.effective_chat
    query = update.callback_query
    if chat is None or query is None:
        return
    message = query.message if isinstance(query.message, Message) else None
    subject = shown.record.subject or "(no subject)"
    prompt = await chat.send_message(
        f"↪️ Forward “{html.escape(subject[:100])}” to whom? Reply to this message with the "
        "addresses, separated by commas.",
        parse_mode=ParseMode.HTML,
        reply_markup=ForceReply(selective=True, input_field_placeholder="ann@example.org"),
        message_thread_id=message.message_thread_id
        if message and message.is_topic_message
        else None,
    )
    await db.run(store.record_summary, shown.posted_mail_id, chat.id, prompt.message_id, "forward")


async def mutes(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """List the muted senders."""
    message = update.effective_message
    if message is None:
        return
    addresses = await deps(context).db.run(store.list_mutes)
    if not addresses:
        await message.reply_text("No sender is muted.", do_quote=False)
        return
    lines = ["<b>Muted senders</b> (/unmute ADDRESS ends one)"]
    lines += [f"• {html.escape(a)}" for a in addresses[:100]]
    if len(addresses) > 100:
        lines.append(f"+{len(addresses) - 100} more")
    await message.reply_text("\n".join(lines), parse_mode=ParseMode.HTML, do_quote=False)


async def unmute(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """End a mute: later mail from that address is posted again."""
    message = update.effective_message
    if message is None:
        return
    args = context.args or []
    if len(args) != 1 or "@" not in args[0]:
        await message.reply_text("Usage: /unmute ADDRESS, e.g. /unmute ann@example.org")
        return
    removed = await deps(context).db.run(store.remove_mute, args[0])
    address = args[0].lower()
    await message.reply_text(
        f"🔔 {address} is no longer muted." if removed else f"{address} was not muted.",
        do_quote=False,
    )


def handler() -> CallbackQueryHandler[Any, Any]:
    """The button handler: every callback but `open:`, which open.py serves."""
    return CallbackQueryHandler(press, pattern=r"^(?!open:)")
