"""The everyday commands: /start /help /status /inbox."""

from __future__ import annotations

import html
import logging
from datetime import UTC, datetime

from telegram import Update
from telegram.constants import ParseMode
from telegram.ext import ContextTypes

from bridge.db import store
from bridge.errors import MailError
from bridge.mail.imap import ImapSession
from bridge.mail.parse import parse_mail
from bridge.telegram.deps import deps

logger = logging.getLogger(__name__)

INBOX_DEFAULT = 10
INBOX_MAX = 50


async def start(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Greet the user with their ids (only allowed users get this far)."""
    user, chat, message = update.effective_user, update.effective_chat, update.effective_message
    if user is None or chat is None or message is None:
        return
    await message.reply_text(
        f"👋 Hello {html.escape(user.first_name)}. This bot brings the mail of "
        f"<b>{html.escape(deps(context).settings.imap.username)}</b> to Telegram.\n"
        f"Your user id is <code>{user.id}</code>, this chat is <code>{chat.id}</code>; "
        "you are on the allow-list.\n/help lists the commands.",
        parse_mode=ParseMode.HTML,
        do_quote=False,
    )


async def help_(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """List the commands (generated from the command table)."""
    if update.effective_message is not None:
        await update.effective_message.reply_text(
            context.bot_data["help"], parse_mode=ParseMode.HTML, do_quote=False
        )


def _ago(moment: datetime | None) -> str:
    if moment is None:
        return "never"
    seconds = int((datetime.now(UTC) - moment).total_seconds())
    if seconds < 120:
        return f"{seconds} s ago"
    if seconds < 7200:
        return f"{seconds // 60} min ago"
    return f"{seconds // 3600} h ago"


async def status(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Connection state, last check, last UID, mails posted, errors."""
    d = deps(context)
    s = d.status
    posted_total = await d.db.run(store.count_posted)
    lines = [
        "<b>Status</b>",
        f"IMAP: {html.escape(s.state)}" + (f" ({html.escape(s.mode)})" if s.mode else ""),
        f"Mailbox: {html.escape(d.settings.imap.mailbox)}",
        f"Last check: {_ago(s.last_check)}",
        f"Last UID: {s.last_uid}",
        f"Mails posted: {s.posted} since start, {posted_total} in all",
        f"Errors: {s.errors}",
    ]
    if s.last_error:
        lines.append(f"Last error: {html.escape(s.last_error)}")
    if d.outbox is not None:
        lines.append(f"Outbox: {await d.outbox.describe()}")
    if update.effective_message is not None:
        await update.effective_message.reply_text(
            "\n".join(lines), parse_mode=ParseMode.HTML, do_quote=False
        )


async def inbox(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """The newest N mails of the mailbox, one line each (read-only)."""
    message = update.effective_message
    if message is None:
        return
    args = context.args or []
    if len(args) > 1 or (args and not (args[0].isdigit() and 1 <= int(args[0]) <= INBOX_MAX)):
        await message.reply_text(
            f"Usage: /inbox [N] with N from 1 to {INBOX_MAX}, e.g. /inbox 5", do_quote=False
        )
        return
    count = int(args[0]) if args else INBOX_DEFAULT
    settings = deps(context).settings
    session = ImapSession(settings.imap)
    try:
        await session.connect()
        headers = await session.newest_headers(count)
    except MailError as exc:
        await message.reply_text(f"Could not read the mailbox: {exc}", do_quote=False)
        return
    finally:
        await session.close()
    if not headers:
        await message.reply_text("The mailbox is empty.", do_quote=False)
        return
    lines = [f"<b>Newest {len(headers)} in {html.escape(settings.imap.mailbox)}</b>"]
    for _uid, raw in headers:
        mail = parse_mail(raw)
        when = mail.date.strftime("%d %b %H:%M") if mail.date else "—"
        sender = mail.from_name or mail.from_addr or "(unknown sender)"
        subject = mail.subject or "(no subject)"
        lines.append(f"• {when} · {html.escape(sender[:40])} · <b>{html.escape(subject[:80])}</b>")
    await message.reply_text("\n".join(lines), parse_mode=ParseMode.HTML, do_quote=False)
