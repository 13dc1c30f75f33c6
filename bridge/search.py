"""/search and /inbox: mails found on the server, one line each, a button per mail that posts
its summary (with its buttons). Read-only; done as a job so a slow server holds up nothing."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from telegram import Update
from telegram.constants import ParseMode
from telegram.ext import ContextTypes

from bridge import actions
from bridge.config import AccountSettings
from bridge.db import store
from bridge.errors import UsageError
from bridge.mail.parse import ParsedMail, parse_mail
from bridge.mail.summary import BatchLine, ListLine, batch_line_label, render_list, with_origin
from bridge.mail_to_chat import record_of, summarise
from bridge.telegram.deps import deps
from bridge.telegram.keyboards import open_keyboard

if TYPE_CHECKING:
    from bridge.jobs import JobRunner

logger = logging.getLogger(__name__)

SEARCH_LIMIT = 10
INBOX_DEFAULT, INBOX_MAX = 10, 50
SEARCH_USAGE = (
    "Usage: /search WORDS [from:ADDR] [to:ADDR] [subject:TEXT] [since:YYYY-MM-DD] "
    "[before:YYYY-MM-DD] [account:NAME] [folder:NAME], e.g. /search invoice from:shop.example"
)


async def search(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Search the watched folders on the server: the newest 10 matches."""
    await _queue(update, context, "search", " ".join(context.args or []))


async def inbox(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """The newest N mails of the first watched folder, one line each (read-only)."""
    args = context.args or []
    if len(args) > 1 or (args and not (args[0].isdigit() and 1 <= int(args[0]) <= INBOX_MAX)):
        if update.effective_message is not None:
            await update.effective_message.reply_text(
                f"Usage: /inbox [N] with N from 1 to {INBOX_MAX}, e.g. /inbox 5", do_quote=False
            )
        return
    await _queue(update, context, "inbox", args[0] if args else str(INBOX_DEFAULT))


async def _queue(update: Update, context: ContextTypes.DEFAULT_TYPE, kind: str, args: str) -> None:
    """Check the form now (a wrong one gets the usage line), do the work as a job."""
    message, chat = update.effective_message, update.effective_chat
    if message is None or chat is None:
        return
    if kind == "search":
        try:
            query, _account, _folder = actions.parse_query(args)
        except UsageError as exc:
            await message.reply_text(f"{exc}\n{SEARCH_USAGE}", do_quote=False)
            return
        if query == actions.SearchQuery() and not (_account or _folder):
            await message.reply_text(SEARCH_USAGE, do_quote=False)
            return
    d = deps(context)
    await d.db.run(
        store.add_job,
        update_id=update.update_id,
        kind=kind,
        chat_id=chat.id,
        user_id=update.effective_user.id if update.effective_user else None,
        message_id=message.message_id,
        thread_id=message.message_thread_id if message.is_topic_message else None,
        args=args,
    )
    d.jobs.wake()


async def run_search(runner: JobRunner, job: store.JobRecord) -> None:
    """The job: search each account's folders, render up to 10 lines, remember the hits."""
    if job.kind == "inbox":
        account = next(iter(runner.accounts.values()))
        targets = [(account, [account.folders[0]])]
        query, limit = actions.SearchQuery(), int(job.args or INBOX_DEFAULT)
        title = f"Newest {{n}} in {account.folders[0]}"
    else:
        query, account_name, folder = actions.parse_query(job.args)
        chosen = [runner.account(account_name)] if account_name else list(runner.accounts.values())
        targets = [(a, [folder] if folder else list(a.folders)) for a in chosen]
        limit, title = SEARCH_LIMIT, f"{{n}} newest matches for “{job.args}”"
    found = await asyncio.gather(
        *(
            actions.search(a.imap, folders, query, limit=limit, tokens=runner.tokens_for(a))
            for a, folders in targets
        )
    )
    hits = [(a, hit) for (a, _), hits in zip(targets, found, strict=True) for hit in hits]
    mails = [(a, hit, parse_mail(hit.header)) for a, hit in hits]
    mails.sort(key=lambda item: _when(item[2]), reverse=True)
    mails = mails[:limit]
    if not mails:
        await runner._say(
            job, "Nothing found." if job.kind == "search" else "The folder is empty."
        )
        return
    several = len(runner.accounts) > 1
    ids = [await _remember(runner, a, hit, several) for a, hit, _ in mails]
    lines = [ListLine(m.date, m.from_name or m.from_addr, m.subject) for _, _, m in mails]
    text = render_list(title.format(n=len(mails)), lines)
    buttons = [
        (mail_id, batch_line_label(n, BatchLine(m.from_name, m.from_addr, m.subject)))
        for n, (mail_id, (_, _, m)) in enumerate(zip(ids, mails, strict=True), 1)
        if mail_id is not None
    ]
    # Held from send to record: a press on a result button waits for its rows (open.py).
    async with runner.locks[job.chat_id]:
        sent = await runner.through_floods(
            lambda: runner.bot.send_message(
                job.chat_id,
                text,
                parse_mode=ParseMode.HTML,
                reply_to_message_id=job.message_id,
                message_thread_id=job.thread_id,
                allow_sending_without_reply=True,
                reply_markup=open_keyboard(buttons) if buttons else None,
            )
        )
        for mail_id, _label in buttons:
            await runner.db.run(
                store.record_summary, mail_id, job.chat_id, sent.message_id, "list"
            )


async def _remember(
    runner: JobRunner, account: AccountSettings, hit: actions.SearchHit, several: bool
) -> int | None:
    """The hit's row with a rendered summary, so that its button can post it."""
    where = hit.location
    # Fetched with the search itself, on its connection; only a hit that vanished meanwhile
    # is asked for again.
    fetched = hit.fetched or await actions.fetch_summary_source(
        account.imap, where, tokens=runner.tokens_for(account)
    )
    text, parsed = summarise(fetched, preview_chars=1200)
    origin = " · ".join(([account.name] if several else []) + [where.folder])
    record = record_of(where.uid, parsed, with_origin(text, origin))
    mail_id = await runner.db.run(
        store.ensure_mail, account.name, where.folder, where.uidvalidity, record
    )
    if mail_id is not None:
        await runner.db.run(store.set_summary, mail_id, record.summary, record.attachments)
    return mail_id


def _when(mail: ParsedMail) -> datetime:
    return mail.date.astimezone(UTC) if mail.date else datetime.min.replace(tzinfo=UTC)
