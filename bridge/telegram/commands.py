"""The everyday commands: /start /help /status /inbox."""

from __future__ import annotations

import html
import logging
from datetime import UTC, datetime

from telegram import Update
from telegram.constants import ParseMode
from telegram.ext import ContextTypes

from bridge.config import Settings
from bridge.db import store
from bridge.errors import MailError
from bridge.mail.imap import newest_headers
from bridge.mail.parse import parse_mail
from bridge.mail_to_chat import FolderStatus
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
        f"<b>{html.escape(_accounts(deps(context).settings))}</b> to Telegram.\n"
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


STATUS_FOLDERS = 30  # /status lists this many folders, then counts the rest


def _accounts(settings: Settings) -> str:
    return ", ".join(a.imap.username for a in settings.accounts)


def _folder_line(f: FolderStatus) -> str:
    state = html.escape(f.state) + (f" ({html.escape(f.mode)})" if f.mode else "")
    line = (
        f"• {html.escape(f.account)}/{html.escape(f.folder)}: {state}, checked "
        f"{_ago(f.last_check)}, last UID {f.last_uid}, {f.posted} posted"
    )
    if f.muted:
        line += f", {f.muted} muted"
    if f.last_error:
        line += f"\n  ⚠️ {html.escape(f.last_error[:200])}"
    return line


async def status(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Each folder's connection and last check, chats Telegram refuses, counts, the outbox."""
    d = deps(context)
    posted_total = await d.db.run(store.count_posted)
    lines = ["<b>Status</b>", "<b>Folders</b>"]
    lines += [_folder_line(f) for f in d.folders[:STATUS_FOLDERS]]
    if len(d.folders) > STATUS_FOLDERS:
        lines.append(f"+{len(d.folders) - STATUS_FOLDERS} more folders")
    sign_ins = await d.tokens.describe()
    if sign_ins:
        lines.append("<b>OAuth2 sign-ins</b>")
        lines += [
            f"• {html.escape(name)}: {'' if ok else '⚠️ '}{html.escape(text)}"
            for name, ok, text in sign_ins
        ]
    problems = [(chat, s) for chat, s in d.delivery.chats.items() if s.problem]
    if problems:
        lines.append("<b>Chats Telegram refuses</b> (their mail waits and is retried)")
        lines += [
            f"• {chat}: {html.escape(s.problem[:200])} (since {_ago(s.since)})"
            for chat, s in problems[:10]
        ]
    lines.append(f"Mails posted: {posted_total} in all")
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
    account = deps(context).settings.account()
    folder = account.folders[0]
    try:
        headers = await newest_headers(account.imap, folder, count)
    except MailError as exc:
        await message.reply_text(f"Could not read the mailbox: {exc}", do_quote=False)
        return
    if not headers:
        await message.reply_text("The mailbox is empty.", do_quote=False)
        return
    lines = [f"<b>Newest {len(headers)} in {html.escape(folder)}</b>"]
    for _uid, raw in headers:
        mail = parse_mail(raw)
        when = mail.date.strftime("%d %b %H:%M") if mail.date else "—"
        sender = mail.from_name or mail.from_addr or "(unknown sender)"
        subject = mail.subject or "(no subject)"
        lines.append(f"• {when} · {html.escape(sender[:40])} · <b>{html.escape(subject[:80])}</b>")
    await message.reply_text("\n".join(lines), parse_mode=ParseMode.HTML, do_quote=False)
