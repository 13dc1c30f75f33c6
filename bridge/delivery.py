"""Mail to chat, the chat side: one paced queue per chat, combining what waits for it.

The watchers write a `delivery` row per mail and chat (with the folder's cursor, in one
transaction) and call wake(). Here one worker per chat with pending rows waits for the chat's
next slot, takes everything that waits for it (oldest topic first), sends it as one message (a
summary, or a combined message when several mails wait) and only after Telegram accepted it
marks those rows delivered. A chat that fails for good is that chat's problem: its rows wait
and are retried later, while the other chats go on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict, deque
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from telegram import Bot, InlineKeyboardMarkup, LinkPreviewOptions
from telegram.constants import ParseMode
from telegram.error import TelegramError

from bridge import metrics
from bridge.config import TelegramSettings
from bridge.db import store
from bridge.db.engine import UNAVAILABLE, Database, unavailable_reason
from bridge.errors import TokenRefused
from bridge.leases import Leases
from bridge.mail.summary import (
    COMBINED_LISTED,
    BatchLine,
    batch_line_label,
    plain_text,
    render_batch,
)
from bridge.retry import Backoff, Stopped, wait_or_stop
from bridge.telegram.errors import TelegramFailure, Verdict, classify, count
from bridge.telegram.keyboards import open_keyboard, summary_keyboard

logger = logging.getLogger(__name__)

# Bot API FAQ: no more than 20 messages a minute to one group.
GROUP_LIMIT = 20
GROUP_WINDOW = 60.0
# Spacing in a group stays at the chat interval until this many went out in the last minute.
GROUP_RELAXED = 10
RECHECK = 30.0  # how often postponed deliveries are looked at again
CONTENDED_RECHECK = 1.0  # a chat another instance serves: asked for again this soon
MAX_POSTPONE = 3600.0
BATCH_LOAD = 2000
TOPIC_PREFIX = "#"  # a topic given by thread id is stored as "#42"; a name as itself


class ChatLocks(defaultdict[int, asyncio.Lock]):
    """One lock per chat, held from send to record: a reply to a summary finds its row."""

    def __init__(self) -> None:
        super().__init__(asyncio.Lock)


@dataclass
class ChatState:
    """What /status shows of one chat."""

    delivered: int = 0
    problem: str = ""
    since: datetime | None = None


class Pacer:
    """When the next message to a chat may go: about one a second per chat, and never more
    than 20 in any minute to a group (spread out once half of that is used). Times are
    wall-clock seconds, so that sends recorded by other instances count too."""

    def __init__(self, interval: float, group_interval: float) -> None:
        self.interval, self.group_interval = interval, group_interval
        self._sent: dict[int, deque[float]] = defaultdict(deque)

    def delay(self, chat_id: int, now: float) -> float:
        """Seconds until a message to chat_id may be sent (0: now)."""
        sent = self._sent[chat_id]
        while sent and sent[0] <= now - GROUP_WINDOW:
            sent.popleft()
        if not sent:
            return 0.0
        spacing = self.interval
        if chat_id < 0:
            if len(sent) >= GROUP_LIMIT:
                return sent[-GROUP_LIMIT] + GROUP_WINDOW - now
            if len(sent) >= GROUP_RELAXED:
                spacing = max(spacing, self.group_interval)
        return max(0.0, sent[-1] + spacing - now)

    def sent(self, chat_id: int, now: float) -> None:
        """Count a message Telegram accepted."""
        self._sent[chat_id].append(now)

    def load(self, chat_id: int, sent: list[float]) -> None:
        """What was sent to the chat lately, by any instance, as the database knows it.

        It replaces what this instance counted: every send of ours is in the database before
        the next one (recorded with its delivery), under a slightly different time, and
        merging the two would count each send twice.
        """
        known = self._sent[chat_id]
        known.clear()
        known.extend(sorted(sent))


class _ChatRefused(Exception):
    """This chat cannot take messages now (kicked, blocked, gone, or a request it refuses)."""


class _ChatMoved(Exception):
    def __init__(self, new_chat_id: int) -> None:
        super().__init__(new_chat_id)
        self.new_chat_id = new_chat_id


class _TopicGone(Exception):
    """The forum topic was deleted: find or create it again."""


class Delivery:
    """Per-chat queues of summaries, paced to Telegram's limits, recorded once accepted."""

    def __init__(
        self, telegram: TelegramSettings, db: Database, bot: Bot, locks: ChatLocks, leases: Leases
    ) -> None:
        self.db, self.bot, self.locks, self.leases = db, bot, locks, leases
        self.pacer = Pacer(telegram.chat_interval, telegram.group_interval)
        self.chat_retry = telegram.chat_retry
        self.chats: dict[int, ChatState] = defaultdict(ChatState)
        self.migrations: dict[int, int] = {}
        self._wakeup = asyncio.Event()
        self.idle = asyncio.Event()  # nothing due and nothing being sent (tests, benchmarks)
        self._workers: dict[int, asyncio.Task[None]] = {}
        self._outage = False

    def wake(self) -> None:
        """New deliveries were recorded: look for chats to serve."""
        self.idle.clear()
        self._wakeup.set()

    def current_chat(self, chat_id: int) -> int:
        """The id a chat has now (Telegram migrates groups to supergroups)."""
        seen: set[int] = set()
        while chat_id in self.migrations and chat_id not in seen:
            seen.add(chat_id)
            chat_id = self.migrations[chat_id]
        return chat_id

    async def load(self) -> None:
        """Read the chat migrations seen before (call before the watchers start)."""
        self.migrations = await self.db.run(store.chat_migrations)

    async def run(self, stop: asyncio.Event) -> None:
        """Serve every chat that has deliveries due, until stop is set."""
        async with asyncio.TaskGroup() as group:
            while not stop.is_set():
                self._wakeup.clear()
                timeout = min(RECHECK, self.chat_retry)
                try:
                    for chat_id in await self.db.run(store.pending_chats, datetime.now(UTC)):
                        if chat_id in self._workers:
                            continue
                        # One instance serves a chat at a time: its pacing and order hold.
                        if await self._lease(chat_id):
                            self._workers[chat_id] = group.create_task(self._serve(chat_id, stop))
                        else:  # another instance serves it now and gives it up when done
                            timeout = min(timeout, CONTENDED_RECHECK)
                except UNAVAILABLE as exc:
                    logger.warning(
                        "delivery: database unusable (%s); retrying", unavailable_reason(exc)
                    )
                    timeout = min(timeout, 2.0)
                if not self._workers and not self._wakeup.is_set():
                    self.idle.set()
                waiters = {asyncio.ensure_future(self._wakeup.wait())}
                waiters.add(asyncio.ensure_future(stop.wait()))
                try:
                    await asyncio.wait(waiters, timeout=timeout, return_when="FIRST_COMPLETED")
                finally:
                    for waiter in waiters:
                        waiter.cancel()

    async def _lease(self, chat_id: int) -> bool:
        """Take (or renew) this chat's lease; with it, what other instances sent lately.

        A lease renewed within the last third of its time is not renewed again, and one that
        still runs is kept when the database is locked for a moment: sending goes on.
        """
        name = f"chat:{chat_id}"
        if self.leases.valid(name, margin=self.leases.seconds * 2 / 3):
            return True
        try:
            if await self.leases.take(name) is None:
                return False
        except UNAVAILABLE:
            if self.leases.valid(name):
                return True
            raise
        since = datetime.now(UTC) - timedelta(seconds=GROUP_WINDOW)
        sent = await self.db.run(store.recent_sends, chat_id, since)
        self.pacer.load(chat_id, [when.timestamp() for when in sent])
        return True

    async def _serve(self, chat_id: int, stop: asyncio.Event) -> None:
        """Send what waits for one chat, batch after batch, until nothing is due."""
        try:
            while not stop.is_set():
                wait = self.pacer.delay(chat_id, time.time())
                if wait > 0 and await wait_or_stop(stop, wait):
                    return
                if not await self._lease(chat_id):
                    return  # another instance serves this chat now
                due = await self.db.run(
                    store.due_deliveries, chat_id, datetime.now(UTC), BATCH_LOAD
                )
                if not due:
                    return
                await self._deliver(chat_id, due, stop)
        except Stopped:
            return
        except _ChatMoved as moved:
            await self._follow(chat_id, moved.new_chat_id)
        except TokenRefused:
            raise  # not this chat's problem: the service ends (exit 2)
        except Exception:  # one chat's surprise must not stop the others
            logger.exception(
                "delivery to chat %s failed unexpectedly", chat_id, extra={"chat": chat_id}
            )
        finally:
            # Nothing due: with other instances, the chat is free for whichever one records its
            # next mail (the pacing lives in the database), instead of waiting for this lease
            # to run out. Alone, keeping it spares a write before the next message.
            if self.leases.instances > 1:
                await self.leases.release(f"chat:{chat_id}")
            del self._workers[chat_id]
            self._wakeup.set()  # rows may have arrived after the last look

    async def _deliver(
        self, chat_id: int, due: list[store.PendingDelivery], stop: asyncio.Event
    ) -> None:
        """One message for the oldest waiting topic's mails; recorded once Telegram took it."""
        topic = due[0].topic
        batch = [item for item in due if item.topic == topic]
        try:
            async with self.locks[chat_id]:
                message_id = await self._send_batch(chat_id, topic, batch, stop)
                self.pacer.sent(chat_id, time.time())
                await self.db.persist(
                    store.mark_delivered_and_paced,
                    [item.id for item in batch],
                    chat_id,
                    message_id,
                )
        except _ChatRefused as exc:
            await self._postpone(chat_id, due, str(exc))
            raise Stopped from exc  # this worker is done; the scheduler comes back later
        state = self.chats[chat_id]
        if state.problem:
            logger.info("chat %s takes messages again", chat_id)
        state.delivered += len(batch)
        state.problem, state.since = "", None
        logger.info(
            "delivered %d mail(s) to chat %s", len(batch), chat_id, extra={"chat": chat_id}
        )
        _count_posted(batch)

    async def _send_batch(
        self, chat_id: int, topic: str, batch: list[store.PendingDelivery], stop: asyncio.Event
    ) -> int:
        if len(batch) == 1:
            mail = batch[0].mail
            text = mail.record.summary or render_batch([_line(mail)])
            markup = summary_keyboard(
                mail.posted_mail_id,
                attachments=mail.record.attachments,
                seen=mail.seen,
                state=mail.state,
            )
        else:
            text = render_batch([_line(item.mail) for item in batch])
            markup = _open_buttons(batch)
        while True:
            thread_id = await self._thread_id(chat_id, topic, stop)
            try:
                return await self._send(chat_id, thread_id, text, markup, stop)
            except _TopicGone:
                logger.warning(
                    "forum topic %r of chat %s is gone; creating it again", topic, chat_id
                )
                if thread_id is not None:
                    await self.db.persist(store.forget_topic, chat_id, thread_id)
                if topic.startswith(TOPIC_PREFIX):
                    raise _ChatRefused("the configured forum topic does not exist") from None

    async def _send(
        self,
        chat_id: int,
        thread_id: int | None,
        text: str,
        markup: InlineKeyboardMarkup | None,
        stop: asyncio.Event,
    ) -> int:
        """Send until Telegram accepts it; raises for what retrying cannot fix."""
        backoff = Backoff()
        parse_mode: str | None = ParseMode.HTML
        while True:
            try:
                message = await self.bot.send_message(
                    chat_id,
                    text,
                    parse_mode=parse_mode,
                    message_thread_id=thread_id,
                    reply_markup=markup,
                    link_preview_options=LinkPreviewOptions(is_disabled=True),
                )
            except TelegramError as exc:
                failure = count(classify(exc))
            else:
                metrics.telegram_answered()
                if self._outage:
                    self._outage = False
                    logger.info("Telegram reachable again")
                return message.message_id
            if failure.verdict is Verdict.BAD_HTML and parse_mode is not None:
                logger.warning("Telegram refused the HTML of a message; sending its plain text")
                text, parse_mode = plain_text(text), None
                continue
            await self._wait_or_raise(failure, backoff, stop)

    async def _wait_or_raise(
        self, failure: TelegramFailure, backoff: Backoff, stop: asyncio.Event
    ) -> None:
        """Wait before a retry, or raise what the caller must handle."""
        if failure.verdict is Verdict.MIGRATED and failure.new_chat_id is not None:
            raise _ChatMoved(failure.new_chat_id)
        if failure.verdict is Verdict.TOPIC_GONE:
            raise _TopicGone
        if failure.verdict is Verdict.TOKEN:
            raise TokenRefused
        if failure.verdict in (Verdict.CHAT_GONE, Verdict.BUG, Verdict.MIGRATED):
            raise _ChatRefused(failure.reason)
        if failure.verdict is Verdict.RETRY_AFTER and failure.delay is not None:
            delay = failure.delay
        else:
            delay = backoff.next()
            if not self._outage:
                self._outage = True
                logger.warning("Telegram unavailable (%s); retrying", failure.reason)
        if await wait_or_stop(stop, delay):
            raise Stopped

    async def _thread_id(self, chat_id: int, topic: str, stop: asyncio.Event) -> int | None:
        """The message_thread_id for a route's topic; a named topic is created when missing."""
        if not topic:
            return None
        if topic.startswith(TOPIC_PREFIX):
            return int(topic[len(TOPIC_PREFIX) :])
        known = await self.db.run(store.get_topic, chat_id, topic)
        if known is not None:
            return known
        backoff = Backoff()
        while True:
            try:
                created = await self.bot.create_forum_topic(chat_id, topic)
                break
            except TelegramError as exc:
                failure = count(classify(exc))
            if failure.verdict is Verdict.BUG:  # not a forum, or no can_manage_topics right
                logger.error(
                    "cannot create forum topic %r in chat %s (%s); posting in the chat itself",
                    topic,
                    chat_id,
                    failure.reason,
                )
                return None
            await self._wait_or_raise(failure, backoff, stop)
        await self.db.persist(store.save_topic, chat_id, topic, created.message_thread_id)
        logger.info("created forum topic %r in chat %s", topic, chat_id)
        return created.message_thread_id

    async def _postpone(self, chat_id: int, due: list[store.PendingDelivery], reason: str) -> None:
        """This chat refused: keep its mail pending and try again later, backing off."""
        attempts = max(item.attempts for item in due)
        delay = min(MAX_POSTPONE, self.chat_retry * 2 ** min(attempts, 12))
        until = datetime.now(UTC) + timedelta(seconds=delay)
        await self.db.persist(store.postpone_deliveries, [d.id for d in due], reason, until)
        state = self.chats[chat_id]
        if state.problem != reason:
            logger.error(
                "Telegram refused chat %s (%s): %d mail(s) wait; retrying in %.1f s",
                chat_id,
                reason,
                len(due),
                delay,
            )
        state.problem, state.since = reason, state.since or datetime.now(UTC)

    async def _follow(self, old_chat_id: int, new_chat_id: int) -> None:
        """A group became a supergroup: its waiting mail and later mail go to the new id."""
        await self.db.persist(store.move_chat, old_chat_id, new_chat_id)
        self.migrations[old_chat_id] = new_chat_id
        logger.warning(
            "chat %s was migrated to supergroup %s; following it (update the configuration)",
            old_chat_id,
            new_chat_id,
        )


def topic_key(topic: str | int | None) -> str:
    """How a route's topic is stored on a delivery row."""
    if topic is None:
        return ""
    if isinstance(topic, int):
        return f"{TOPIC_PREFIX}{topic}"
    return topic


def _count_posted(batch: list[store.PendingDelivery]) -> None:
    """Count the mails of a message Telegram accepted, and how long each took to get there."""
    now = datetime.now(UTC)
    for item in batch:
        metrics.MAILS_POSTED.labels(account=item.mail.account).inc()
        arrived = item.created_at
        if arrived is not None:
            # SQLite gives back naive UTC datetimes; PostgreSQL aware ones.
            arrived = arrived if arrived.tzinfo is not None else arrived.replace(tzinfo=UTC)
            metrics.DELIVERY_DELAY.observe(max(0.0, (now - arrived).total_seconds()))


def _line(mail: store.ShownMail) -> BatchLine:
    record = mail.record
    return BatchLine(record.sender_name, record.sender, record.subject)


def _open_buttons(batch: list[store.PendingDelivery]) -> InlineKeyboardMarkup:
    """One button per listed mail; its callback data is a row id the chat must own."""
    shown = batch[-COMBINED_LISTED:]
    first = len(batch) - len(shown) + 1
    return open_keyboard(
        [
            (item.mail.posted_mail_id, batch_line_label(first + n, _line(item.mail)))
            for n, item in enumerate(shown)
        ]
    )
