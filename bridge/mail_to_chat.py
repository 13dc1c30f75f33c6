"""Mail to chat: watch the folder, summarise each new mail, post it, then remember it."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime

from sqlalchemy.exc import OperationalError
from telegram import Bot, LinkPreviewOptions
from telegram.constants import ParseMode
from telegram.error import BadRequest, Forbidden, NetworkError, RetryAfter, TelegramError

from bridge.config import Settings
from bridge.db import store
from bridge.db.engine import Database
from bridge.errors import DatabaseError, MailError, PermanentMailError
from bridge.mail.imap import FETCH_BATCH, FetchedMail, ImapSession
from bridge.mail.parse import ParsedMail, parse_mail
from bridge.mail.summary import render_digest, render_summary, render_unparseable
from bridge.retry import Backoff, Stopped, retry_delay, wait_or_stop

logger = logging.getLogger(__name__)


@dataclass
class WatchStatus:
    """What /status shows; owned by the watcher, read by the bot."""

    state: str = "starting"
    mode: str = ""
    last_check: datetime | None = None
    last_uid: int = 0
    posted: int = 0
    errors: int = 0
    last_error: str = ""
    since: datetime = field(default_factory=lambda: datetime.now(UTC))


class ChatLocks(defaultdict[int, asyncio.Lock]):
    """One lock per chat, held while a summary is sent and recorded (mautrix PortalSendLock)."""

    def __init__(self) -> None:
        super().__init__(asyncio.Lock)


def record_of(uid: int, mail: ParsedMail | None) -> store.MailRecord:
    """The facts a later reply needs."""
    if mail is None:
        return store.MailRecord(uid, "", "", "", "", ())
    return store.MailRecord(
        uid=uid,
        message_id=mail.message_id,
        subject=mail.subject,
        sender=mail.from_addr,
        reply_to=", ".join(mail.reply_to),
        references=tuple(mail.references),
    )


def summarise(fetched: FetchedMail, preview_chars: int) -> tuple[str, ParsedMail | None]:
    """The summary text and the parsed mail (None when even parsing failed)."""
    try:
        mail = parse_mail(fetched.raw, structure=fetched.structure)
        return render_summary(mail, preview_chars=preview_chars), mail
    except Exception as exc:  # a mail must never stop the watcher
        logger.exception("could not parse mail uid %s", fetched.uid)
        return render_unparseable(fetched.uid, fetched.size, type(exc).__name__), None


class Watcher:
    """The mail-to-chat loop: one IMAPS connection, IDLE or polling, reconnect with backoff."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        bot: Bot,
        status: WatchStatus | None = None,
        checked: asyncio.Event | None = None,
        chat_locks: ChatLocks | None = None,
    ) -> None:
        self.settings = settings
        self.db = db
        self.bot = bot
        self.status = status or WatchStatus()
        self.checked = checked or asyncio.Event()  # set after every check (tests, benchmarks)
        self.chat_locks = chat_locks if chat_locks is not None else ChatLocks()
        self._last_post: dict[int, float] = {}
        self._outage = False

    async def run(self, stop: asyncio.Event) -> None:
        """Watch until stop is set; connection errors never end the loop."""
        backoff = Backoff()
        while not stop.is_set():
            session = ImapSession(self.settings.imap)
            try:
                await self._watch(session, stop, backoff)
            except Stopped:
                break
            except (MailError, DatabaseError, OperationalError) as exc:
                self.status.state, self.status.errors = "disconnected", self.status.errors + 1
                self.status.last_error = str(exc)
                if not self._outage:  # logged once per outage, not once per retry
                    self._outage = True
                    level = (
                        logging.ERROR if isinstance(exc, PermanentMailError) else logging.WARNING
                    )
                    logger.log(level, "%s; retrying with backoff", exc)
                await wait_or_stop(stop, backoff.next())
            finally:
                await session.close()
        self.status.state = "stopped"

    async def _watch(self, session: ImapSession, stop: asyncio.Event, backoff: Backoff) -> None:
        folder = await session.connect()
        if self._outage:
            self._outage = False
            logger.info("IMAP connection restored")
        backoff.reset()
        self.status.mode = "IDLE" if session.can_idle else "polling"
        self.status.state, self.status.last_error = "connected", ""
        mailbox = await self._mailbox_state(session, folder.uidvalidity, folder.uidnext)
        while not stop.is_set():
            mailbox = await self._check(session, mailbox, stop)
            if session.can_idle:
                await session.idle_wait(stop)
            else:
                if await wait_or_stop(stop, self.settings.imap.poll_interval):
                    return
                await session.noop()

    async def _mailbox_state(
        self, session: ImapSession, uidvalidity: int, uidnext: int
    ) -> store.MailboxState:
        """The stored state; on first contact or a new UIDVALIDITY keep only BACKFILL as new."""
        name = self.settings.imap.mailbox
        state = await self.db.run(store.get_mailbox, session.account, name)
        if state is not None and state.uidvalidity == uidvalidity:
            return state
        backfill = self.settings.imap.backfill
        if backfill == 0 and uidnext > 0:
            last = uidnext - 1
        else:
            uids = await session.all_uids()
            last = uids[-backfill - 1] if len(uids) > backfill else 0
        if state is None:
            logger.info("first contact with %s: UIDs up to %d count as seen", name, last)
        else:
            logger.warning("UIDVALIDITY of %s changed; UIDs up to %d count as seen", name, last)
        return await self.db.run(store.reset_mailbox, session.account, name, uidvalidity, last)

    async def _check(
        self, session: ImapSession, mailbox: store.MailboxState, stop: asyncio.Event
    ) -> store.MailboxState:
        """Post every mail above the high-water mark, in UID order."""
        uids = await session.uids_after(mailbox.last_uid)
        self.status.last_check = datetime.now(UTC)
        last = mailbox.last_uid
        if len(uids) >= self.settings.telegram.digest_threshold:
            last = await self._post_digest(session, mailbox, uids, stop)
            uids = []
        for start in range(0, len(uids), FETCH_BATCH):
            batch = uids[start : start + FETCH_BATCH]
            for fetched in await session.fetch(batch):
                if stop.is_set():
                    raise Stopped
                await self._post(mailbox, fetched, stop)
            # A UID expunged between SEARCH and FETCH has nothing to post; don't ask again.
            last = batch[-1]
            await self.db.persist(store.advance, mailbox.id, last)
        self.status.last_uid = max(self.status.last_uid, last)
        self.checked.set()
        return store.MailboxState(mailbox.id, mailbox.uidvalidity, last)

    async def _post(
        self, mailbox: store.MailboxState, fetched: FetchedMail, stop: asyncio.Event
    ) -> None:
        text, mail = summarise(fetched, self.settings.telegram.preview_chars)
        record = record_of(fetched.uid, mail)
        done = await self.db.run(store.posted_chats, mailbox.id, mailbox.uidvalidity, fetched.uid)
        for chat_id in self.settings.telegram.notify_chats:
            if chat_id in done:
                continue
            # Held from send to record: a reply to this summary waits for its row (replies.py).
            async with self.chat_locks[chat_id]:
                message_id = await self.send(chat_id, text, stop)
                if message_id is not None:
                    # Only after Telegram accepted it: a crash before this line posts it again.
                    await self.db.persist(
                        store.record_summary,
                        mailbox.id,
                        mailbox.uidvalidity,
                        record,
                        chat_id,
                        message_id,
                    )
        await self.db.persist(store.advance, mailbox.id, fetched.uid)
        self.status.posted += 1
        logger.info(
            "posted mail uid %d to %d chat(s)",
            fetched.uid,
            len(self.settings.telegram.notify_chats),
        )

    async def _post_digest(
        self,
        session: ImapSession,
        mailbox: store.MailboxState,
        uids: list[int],
        stop: asyncio.Event,
    ) -> int:
        """A burst of new mail becomes one digest message instead of hundreds."""
        headers = await session.headers(uids)
        mails = [(uid, parse_mail(raw)) for uid, raw in headers]
        text = render_digest(mails)
        for chat_id in self.settings.telegram.notify_chats:
            await self.send(chat_id, text, stop)
        last = uids[-1]
        await self.db.persist(store.advance, mailbox.id, last)
        self.status.posted += len(uids)
        logger.info("posted a digest of %d mails", len(uids))
        return last

    async def send(self, chat_id: int, text: str, stop: asyncio.Event) -> int | None:
        """Send one message, retrying transient failures until it is accepted or stop is set.

        Returns the Telegram message id, or None when Telegram refused the chat for good
        (bot removed from the group, chat gone).
        """
        backoff = Backoff()
        parse_mode: str | None = ParseMode.HTML
        # Bot API FAQ: about one message per second per chat; groups are also held to 20 a
        # minute by PTB's AIORateLimiter.
        pause = self._last_post.get(chat_id, -1e9) + self.settings.telegram.chat_interval
        if pause > time.monotonic() and await wait_or_stop(stop, pause - time.monotonic()):
            raise Stopped
        while True:
            try:
                message = await self.bot.send_message(
                    chat_id,
                    text,
                    parse_mode=parse_mode,
                    link_preview_options=LinkPreviewOptions(is_disabled=True),
                )
                self._last_post[chat_id] = time.monotonic()
                return message.message_id
            except RetryAfter as exc:
                delay = retry_delay(exc)
            except BadRequest as exc:
                if "parse entities" in exc.message.lower() and parse_mode is not None:
                    logger.warning(
                        "Telegram refused the HTML of a summary; sending it as plain text"
                    )
                    parse_mode = None
                    continue
                logger.error("Telegram refused a message to chat %s: %s", chat_id, exc.message)
                self.status.errors += 1
                return None
            except Forbidden as exc:
                logger.error("Telegram refused chat %s: %s", chat_id, exc.message)
                self.status.errors += 1
                return None
            except (NetworkError, TelegramError) as exc:
                delay = backoff.next()
                reason = str(exc).splitlines()[0][:100]
                logger.warning("Telegram unavailable (%s); retrying in %.1f s", reason, delay)
            if await wait_or_stop(stop, delay):
                raise Stopped
