"""Chat to mail: the outbox. Accept a mail, store it, send it, retry, tell the chat."""

from __future__ import annotations

import asyncio
import email
import email.policy
import logging
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage

from sqlalchemy.exc import OperationalError
from telegram import Bot
from telegram.error import TelegramError

from bridge.config import Settings
from bridge.db import store
from bridge.db.engine import Database
from bridge.errors import BridgeError, DatabaseError, PermanentMailError, TemporaryMailError
from bridge.mail import smtp
from bridge.mail.compose import OutgoingMail, build_message, envelope_recipients, make_message_id
from bridge.mail.imap import append_sent

logger = logging.getLogger(__name__)

# A temporary failure is retried with backoff for this long, then reported as failed.
GIVE_UP_AFTER = timedelta(hours=24)
MAX_RETRY_DELAY = 600.0
IDLE_CHECK = 30.0


class RateLimited(BridgeError):
    """The user has sent too many mails in the last hour."""


class Outbox:
    """Outgoing mail: written to the database first, sent by work(), reported to the chat."""

    def __init__(self, settings: Settings, db: Database, bot: Bot) -> None:
        self.settings = settings
        self.db = db
        self.bot = bot
        self._wakeup = asyncio.Event()

    async def submit(
        self,
        mail: OutgoingMail,
        *,
        chat_id: int | None = None,
        user_id: int | None = None,
        source_message_id: int | None = None,
    ) -> int | None:
        """Store a mail for sending and wake the worker; returns the outbox id.

        Returns None when the chat message `source_message_id` was already accepted: Telegram
        re-delivers updates the bridge had not confirmed before a crash.

        Raises RateLimited when the user is over BRIDGE_TELEGRAM__SEND_RATE_LIMIT per hour, and
        compose.InvalidMail when the mail cannot be built.
        """
        if user_id is not None:
            since = datetime.now(UTC) - timedelta(hours=1)
            recent = await self.db.run(store.count_sent_by_user, user_id, since)
            limit = self.settings.telegram.send_rate_limit
            if recent >= limit:
                raise RateLimited(
                    f"Not sent: you have sent {recent} mails in the last hour "
                    f"(limit {limit}). Try again later."
                )
        sender = self.settings.smtp.sender
        message_id = make_message_id(sender)
        message = build_message(mail, sender, message_id=message_id)
        recipients = envelope_recipients(mail)
        item_id = await self.db.run(
            store.add_outbox,
            chat_id=chat_id,
            user_id=user_id,
            message_id=message_id,
            recipients=recipients,
            subject=mail.subject,
            raw=message.as_bytes(policy=email.policy.SMTP),
            source_message_id=source_message_id,
        )
        if item_id is None:
            logger.info(
                "chat message %s was already accepted; not sending again", source_message_id
            )
            return None
        logger.info("outbox item %d stored (%d recipients)", item_id, len(recipients))
        self._wakeup.set()
        return item_id

    async def describe(self) -> str:
        """One line for /status."""
        counts = await self.db.run(store.outbox_counts)
        return ", ".join(f"{n} {status}" for status, n in sorted(counts.items())) or "empty"

    async def work(self, stop: asyncio.Event) -> None:
        """Send due items until stop is set; the item in hand is finished first."""
        while not stop.is_set():
            try:
                due = await self.db.run(store.due_outbox, datetime.now(UTC))
                for item in due:
                    await self._attempt(item)
                    if stop.is_set():
                        return
                if due:
                    continue
                delay = await self._idle_delay()
            except (OperationalError, DatabaseError) as exc:
                logger.error("outbox: database unusable (%s); retrying", exc)
                delay = IDLE_CHECK
            await self._sleep(stop, delay)

    async def _idle_delay(self) -> float:
        self._wakeup.clear()
        next_due = await self.db.run(store.next_outbox_due)
        if next_due is None:
            return IDLE_CHECK
        wait = (next_due.replace(tzinfo=UTC) - datetime.now(UTC)).total_seconds()
        return min(max(0.0, wait), IDLE_CHECK)

    async def _sleep(self, stop: asyncio.Event, seconds: float) -> None:
        """Sleep until seconds pass, a new item is submitted, or stop is set."""
        waiters = {asyncio.ensure_future(self._wakeup.wait()), asyncio.ensure_future(stop.wait())}
        try:
            await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()

    async def _attempt(self, item: store.OutgoingRecord) -> None:
        message = email.message_from_bytes(item.raw, _class=EmailMessage, policy=email.policy.SMTP)

        async def record_sent(answer: str) -> None:
            # The mail is gone: this write must land, or a restart would send it again.
            await self.db.persist(store.mark_outbox, item.id, "sent", error=answer)

        try:
            await smtp.send(message, list(item.recipients), self.settings.smtp, record_sent)
        except TemporaryMailError as exc:
            await self._retry_or_fail(item, str(exc))
            return
        except PermanentMailError as exc:
            await self.db.persist(store.mark_outbox, item.id, "failed", error=str(exc))
            logger.warning("outbox item %d failed: %s", item.id, exc)
            await self._tell(item, f"❌ Not sent: {exc}")
            return
        logger.info("outbox item %d sent", item.id)
        await self._tell(item, f"✅ Sent to {', '.join(item.recipients)}: {item.subject}")
        if self.settings.imap.save_sent:
            try:
                await append_sent(self.settings.imap, item.raw)
            except BridgeError as exc:
                logger.warning("could not save a copy in the Sent folder: %s", exc)

    async def _retry_or_fail(self, item: store.OutgoingRecord, error: str) -> None:
        if datetime.now(UTC) - item.created_at.replace(tzinfo=UTC) > GIVE_UP_AFTER:
            await self.db.run(store.mark_outbox, item.id, "failed", error=error)
            await self._tell(item, f"❌ Not sent after {item.attempts + 1} attempts: {error}")
            return
        delay = min(MAX_RETRY_DELAY, 5.0 * 2**item.attempts)
        next_at = datetime.now(UTC) + timedelta(seconds=delay)
        await self.db.run(
            store.mark_outbox, item.id, "pending", error=error, next_attempt_at=next_at
        )
        logger.warning("outbox item %d: %s; retrying in %.0f s", item.id, error, delay)
        if item.attempts == 0:
            await self._tell(item, f"⏳ Not sent yet ({error}); I will keep trying.")

    async def _tell(self, item: store.OutgoingRecord, text: str) -> None:
        if item.chat_id is None:
            return
        try:
            await self.bot.send_message(item.chat_id, text)
        except TelegramError as exc:
            logger.warning("could not report outbox item %d to the chat: %s", item.id, exc)
