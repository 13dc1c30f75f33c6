"""What a press or a command asked for, done off the update loop: full text, attachments,
flags, moves and undo, forwards, searches.

A handler writes a `job` row and returns, so the update is confirmed only once the request is
stored, and a 40 MB upload or a slow search never holds up other updates. The runner does up
to CONCURRENCY jobs at once, each on its own short-lived IMAP connection (bridge/actions.py);
a job a crash interrupted is done after the restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import logging
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TypeVar

from telegram import Bot, InputFile, LinkPreviewOptions, Message
from telegram.constants import ParseMode
from telegram.error import BadRequest, TelegramError

from bridge import actions
from bridge.chat_to_mail import Outbox
from bridge.config import AccountSettings, TelegramSettings
from bridge.db import store
from bridge.db.engine import UNAVAILABLE, Database, unavailable_reason
from bridge.delivery import ChatLocks
from bridge.errors import BridgeError, ConfigError, DatabaseError
from bridge.mail.compose import InvalidMail, OutgoingMail, forward_subject, parse_addresses
from bridge.mail.summary import MAX_MESSAGE, format_size, split_text
from bridge.retry import Stopped
from bridge.telegram.errors import call_through_floods
from bridge.telegram.keyboards import STATE_LINES, attachment_keyboard, summary_keyboard

if TYPE_CHECKING:
    from bridge.mail.auth import TokenSource
    from bridge.oauth import AccessTokens

logger = logging.getLogger(__name__)
T = TypeVar("T")

CONCURRENCY = 4
FEW_MESSAGES = 3  # a longer full text goes as a document
IDLE_CHECK = 30.0
MOVES: dict[str, tuple[Literal["archive", "trash", "junk"], str]] = {
    "archive": ("archive", "archived"),
    "delete": ("trash", "deleted"),
    "spam": ("junk", "spam"),
}


class JobRunner:
    """Runs stored jobs, a few at a time, and tells the chat the outcome."""

    def __init__(
        self,
        accounts: Sequence[AccountSettings],
        telegram: TelegramSettings,
        db: Database,
        bot: Bot,
        outbox: Outbox,
        locks: ChatLocks,
        tokens: AccessTokens | None = None,
    ) -> None:
        self.accounts = {a.name: a for a in accounts}
        self.locks = locks  # held while a message with buttons is sent and recorded
        self.tokens = tokens  # OAuth2 accounts' tokens, by account name
        self.upload_limit = telegram.upload_limit_mb * 1024 * 1024
        self.db, self.bot, self.outbox = db, bot, outbox
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(CONCURRENCY)
        self.idle = asyncio.Event()  # nothing pending or running (tests)
        self._stop = asyncio.Event()  # run()'s: ends the flood waits of the jobs

    def wake(self) -> None:
        """A job was stored."""
        self.idle.clear()
        self._wakeup.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Do jobs until stop is set; the ones running then are finished first (or given
        back, when one waits out a Telegram flood wait: it runs again after the restart)."""
        self._stop = stop
        try:
            await self.db.run(store.requeue_running_jobs)
        except UNAVAILABLE as exc:  # a dead process's jobs are taken when their claim ends
            logger.warning("jobs: database unusable at start (%s)", unavailable_reason(exc))
        running: set[asyncio.Task[None]] = set()
        while not stop.is_set():
            self._wakeup.clear()
            try:
                free = CONCURRENCY - len(running)
                jobs = await self.db.run(store.claim_jobs, free) if free > 0 else []
            except UNAVAILABLE as exc:
                logger.error("jobs: database unusable (%s); retrying", unavailable_reason(exc))
                jobs = []
            for job in jobs:
                task = asyncio.create_task(self._do(job))
                running.add(task)
                task.add_done_callback(running.discard)
                task.add_done_callback(lambda _task: self._wakeup.set())
            if not running and not jobs and not self._wakeup.is_set():
                self.idle.set()
            waiters = {
                asyncio.ensure_future(self._wakeup.wait()),
                asyncio.ensure_future(stop.wait()),
            }
            try:
                await asyncio.wait(waiters, timeout=IDLE_CHECK, return_when="FIRST_COMPLETED")
            finally:
                for waiter in waiters:
                    waiter.cancel()
        if running:
            await asyncio.wait(running)

    async def _do(self, job: store.JobRecord) -> None:
        """One job; a BridgeError becomes one line in the chat, anything else is logged (with
        its traceback); a job stopped in a flood wait is given back, to run again."""
        status, error = "done", ""
        try:
            await self._dispatch(job)
        except Stopped:
            status = "pending"
            logger.info("job %d (%s) stopped in a flood wait; it runs again", job.id, job.kind)
        except BridgeError as exc:
            status, error = "failed", str(exc)
            with contextlib.suppress(Stopped):
                await self._say(job, f"⚠️ {exc}")
        except Exception:
            status, error = "failed", "internal error"
            logger.exception("job %d (%s) failed", job.id, job.kind)
            with contextlib.suppress(Stopped):
                await self._say(job, "⚠️ That did not work; the bridge's log has the details.")
        try:
            if status == "pending":
                await self.db.persist(store.give_back_job, job.id)
            else:
                await self.db.persist(store.finish_job, job.id, status, error)
        except DatabaseError:
            logger.exception("could not record the end of job %d", job.id)

    async def _dispatch(self, job: store.JobRecord) -> None:
        if job.kind in ("search", "inbox"):
            from bridge.search import run_search  # the search job lives with /search

            await run_search(self, job)
            return
        if job.posted_mail_id is None:
            raise BridgeError(f"job {job.id} names no mail")
        shown = await self.db.run(store.find_in_chat, job.chat_id, job.posted_mail_id)
        if shown is None:
            raise BridgeError("That mail is no longer known here.")
        account = self.account(shown.account)
        here = _location(shown)
        if job.kind == "text":
            await self._full_text(job, account, here)
        elif job.kind in ("att", "part"):
            await self._attachments(job, account, here, shown)
        elif job.kind in ("read", "unread"):
            moved = await actions.set_seen(
                account.imap, here, job.kind == "read", tokens=self.tokens_for(account)
            )
            await self._relocated(shown, moved, shown.state)
            await self.db.run(store.set_seen, shown.posted_mail_id, job.kind == "read")
            await self._refresh(job, shown, seen=job.kind == "read", state=shown.state)
        elif job.kind in MOVES:
            role, state = MOVES[job.kind]
            moved = await actions.move(account.imap, here, role, tokens=self.tokens_for(account))
            await self._relocated(shown, moved, state)
            await self._refresh(job, shown, seen=shown.seen, state=state, note=moved.folder)
        elif job.kind == "undo":
            if not shown.state:
                raise BridgeError("Nothing to undo: the mail is where it was.")
            back = await actions.move_to(
                account.imap, here, shown.folder, tokens=self.tokens_for(account)
            )
            await self._relocated(shown, back, "")
            await self._refresh(job, shown, seen=shown.seen, state="")
        elif job.kind == "forward":
            await self._forward(job, account, here, shown)
        else:
            raise BridgeError(f"unknown job kind {job.kind!r}")

    async def through_floods(self, call: Callable[[], Awaitable[T]]) -> T:
        """A Bot API call, its flood waits (429) waited out; Stopped when run()'s stop is set
        meanwhile (_do gives the job back)."""
        return await call_through_floods(call, self._stop)

    def tokens_for(self, account: AccountSettings) -> TokenSource | None:
        """The account's OAuth2 tokens (None for a password login)."""
        return self.tokens.source(account.name) if self.tokens is not None else None

    def account(self, name: str) -> AccountSettings:
        """The account a mail came to; gone from the configuration is a clear answer."""
        account = self.accounts.get(name)
        if account is None:
            raise ConfigError(f"The account {name!r} is no longer configured.")
        return account

    async def _relocated(
        self, shown: store.ShownMail, where: actions.MailLocation, state: str
    ) -> None:
        """Remember where the mail is now (and that a watched folder must not post it)."""
        await self.db.persist(
            store.set_location,
            shown.posted_mail_id,
            where.folder,
            where.uidvalidity,
            where.uid,
            state,
        )

    async def _refresh(
        self,
        job: store.JobRecord,
        shown: store.ShownMail,
        *,
        seen: bool,
        state: str,
        note: str = "",
    ) -> None:
        """Show the mail's new state on the summary that was pressed, with fitting buttons."""
        if job.message_id is None:
            return
        keyboard = summary_keyboard(
            shown.posted_mail_id, attachments=shown.record.attachments, seen=seen, state=state
        )
        text = shown.record.summary
        if state and text:
            line = STATE_LINES.get(state, state) + (f" ({html.escape(note)})" if note else "")
            text = f"{text}\n\n<b>{line}</b>" if len(text) + len(line) < MAX_MESSAGE - 20 else text
        try:
            if text and (state or shown.state):
                await self.through_floods(
                    lambda: self.bot.edit_message_text(
                        text,
                        chat_id=job.chat_id,
                        message_id=job.message_id,
                        parse_mode=ParseMode.HTML,
                        reply_markup=keyboard,
                        link_preview_options=LinkPreviewOptions(is_disabled=True),
                    )
                )
            else:
                await self.through_floods(
                    lambda: self.bot.edit_message_reply_markup(
                        chat_id=job.chat_id, message_id=job.message_id, reply_markup=keyboard
                    )
                )
        except BadRequest as exc:
            if "not modified" not in exc.message.lower():
                logger.warning("could not update the summary: %s", exc.message)

    async def _full_text(
        self, job: store.JobRecord, account: AccountSettings, here: actions.MailLocation
    ) -> None:
        text = await actions.full_text(account.imap, here, tokens=self.tokens_for(account))
        chunks = split_text(text.text) if text.text.strip() else []
        if not chunks:
            await self._say(job, "This mail has no text.")
            return
        if len(chunks) <= FEW_MESSAGES:
            for chunk in chunks:
                await self._say(job, chunk, parse_mode=ParseMode.HTML)
            return
        await self._document(job, text.text.encode("utf-8"), "mail.txt", "The whole text")
        if text.html:
            await self._document(job, text.html.encode("utf-8"), "mail.html", "The original HTML")

    async def _attachments(
        self,
        job: store.JobRecord,
        account: AccountSettings,
        here: actions.MailLocation,
        shown: store.ShownMail,
    ) -> None:
        parts = await actions.attachment_parts(account.imap, here, tokens=self.tokens_for(account))
        if not parts:
            await self._say(job, "This mail has no attachments.")
            return
        if job.kind == "att" and len(parts) > 1:
            labels = [f"{p.filename or p.content_type} ({format_size(p.size)})" for p in parts]
            await self._say(
                job,
                f"{len(parts)} attachments: which one?",
                markup=attachment_keyboard(shown.posted_mail_id, labels[:50]),
            )
            return
        number = int(job.args or 0) if job.kind == "part" else 0
        if number >= len(parts):
            raise BridgeError("That attachment is no longer in the mail.")
        part = parts[number]
        name = part.filename or f"attachment-{number + 1}"
        if part.size > self.upload_limit:
            await self._say(
                job,
                f"📎 {name} is {format_size(part.size)}: over the {format_size(self.upload_limit)}"
                " that a bot may upload, so it stays in the mailbox.",
            )
            return
        with tempfile.TemporaryDirectory(prefix="mailbridge-") as folder:
            path = Path(folder) / "part"
            with path.open("w+b") as handle:
                await actions.save_part(
                    account.imap, here, part, handle, tokens=self.tokens_for(account)
                )

                async def upload() -> Message:
                    handle.seek(0)  # again after a flood wait: the last try read it
                    # read_file_handle=False: PTB streams the file instead of reading it whole.
                    document = InputFile(handle, filename=name, read_file_handle=False)
                    return await self.bot.send_document(
                        job.chat_id,
                        document,
                        reply_to_message_id=job.message_id,
                        message_thread_id=job.thread_id,
                        read_timeout=600,
                        write_timeout=600,
                    )

                await self.through_floods(upload)

    async def _forward(
        self,
        job: store.JobRecord,
        account: AccountSettings,
        here: actions.MailLocation,
        shown: store.ShownMail,
    ) -> None:
        try:
            to = parse_addresses(job.args)
        except InvalidMail as exc:
            raise BridgeError(f"Not forwarded: {exc}") from None
        with tempfile.TemporaryFile() as handle:
            await actions.save_raw(account.imap, here, handle, tokens=self.tokens_for(account))
            handle.seek(0)
            raw = handle.read()
        mail = OutgoingMail(
            to=to,
            subject=forward_subject(shown.record.subject),
            body="Forwarded mail attached.",
            forwarded=raw,
            forwarded_name=(shown.record.subject or "forwarded")[:60] + ".eml",
        )
        await self.outbox.submit(
            mail,
            account=shown.account,
            chat_id=job.chat_id,
            user_id=job.user_id,
            source_message_id=job.message_id,
        )

    async def _document(self, job: store.JobRecord, data: bytes, name: str, caption: str) -> None:
        await self.through_floods(
            lambda: self.bot.send_document(
                job.chat_id,
                InputFile(data, filename=name),
                caption=caption,
                reply_to_message_id=job.message_id,
                message_thread_id=job.thread_id,
            )
        )

    async def _say(
        self,
        job: store.JobRecord,
        text: str,
        *,
        parse_mode: str | None = None,
        markup: object = None,
    ) -> None:
        """A reply to the message the job came from; a chat that fails is only logged (a
        flood wait is waited out: Stopped when the service stops meanwhile)."""
        try:
            await self.through_floods(
                lambda: self.bot.send_message(
                    job.chat_id,
                    text,
                    parse_mode=parse_mode,
                    reply_to_message_id=job.message_id,
                    message_thread_id=job.thread_id,
                    reply_markup=markup,  # type: ignore[arg-type]
                    allow_sending_without_reply=True,
                    link_preview_options=LinkPreviewOptions(is_disabled=True),
                )
            )
        except TelegramError as exc:
            logger.warning("could not answer job %d in chat %s: %s", job.id, job.chat_id, exc)


def _location(shown: store.ShownMail) -> actions.MailLocation:
    folder, uidvalidity, uid = shown.where
    return actions.MailLocation(folder, uidvalidity, uid, shown.record.message_id)
