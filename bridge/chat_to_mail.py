"""Chat to mail: the outbox. Accept a mail, store it, send it, retry, tell the chat."""

from __future__ import annotations

import asyncio
import email
import email.policy
import logging
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from sqlalchemy.exc import IntegrityError
from telegram import Bot
from telegram.error import TelegramError

from bridge import metrics
from bridge.config import AccountSettings, TelegramSettings
from bridge.db import store
from bridge.db.engine import UNAVAILABLE, Database
from bridge.errors import (
    BridgeError,
    PermanentMailError,
    SignInNeeded,
    TemporaryMailError,
)
from bridge.mail import smtp
from bridge.mail.compose import OutgoingMail, build_message, envelope_recipients, make_message_id
from bridge.mail.imap import append_sent
from bridge.retry import wait_or_stop
from bridge.telegram.errors import Verdict, classify, count

if TYPE_CHECKING:
    from bridge.oauth import AccessTokens

logger = logging.getLogger(__name__)

# A temporary failure is retried with backoff for this long, then reported as failed.
GIVE_UP_AFTER = timedelta(hours=24)
MAX_RETRY_DELAY = 600.0
IDLE_CHECK = 30.0


class RateLimited(BridgeError):
    """The user has sent too many mails in the last hour."""


class UnknownAccount(BridgeError):
    """No configured account has this name; str(exc) is one line that lists the accounts."""

    def __init__(self, name: str, known: Sequence[str]) -> None:
        listed = ", ".join(f"@{account}" for account in known)
        super().__init__(f"No account named @{name}; the accounts are {listed}.")
        self.name = name


class Outbox:
    """Outgoing mail: written to the database first, sent by work(), reported to the chat."""

    def __init__(
        self,
        accounts: Sequence[AccountSettings],
        telegram: TelegramSettings,
        db: Database,
        bot: Bot,
        tokens: AccessTokens | None = None,
    ) -> None:
        if not accounts:
            raise ValueError("the outbox needs at least one account")
        self._tokens = tokens  # OAuth2 accounts' tokens, by account name
        self._accounts = {account.name: account for account in accounts}
        self._first = accounts[0]
        self.send_rate_limit = telegram.send_rate_limit
        self.db = db
        self.bot = bot
        self._wakeup = asyncio.Event()
        self._account_ids: dict[str, int] = {}

    @property
    def account_names(self) -> tuple[str, ...]:
        """The names of the accounts mail can leave through, the first (default) one first."""
        return tuple(self._accounts)

    def account(self, name: str) -> AccountSettings:
        """The account called name; UnknownAccount (listing the accounts) otherwise."""
        found = self._accounts.get(name)
        if found is None:
            raise UnknownAccount(name, self.account_names)
        return found

    async def submit(
        self,
        mail: OutgoingMail,
        *,
        account: str,
        chat_id: int | None = None,
        user_id: int | None = None,
        source_message_id: int | None = None,
    ) -> int | None:
        """Store a mail for sending and wake the worker; returns the outbox id.

        Returns None when the chat message `source_message_id` was already accepted: Telegram
        re-delivers updates the bridge had not confirmed before a crash.

        Raises UnknownAccount for a name that is not configured, RateLimited when the user is
        over BRIDGE_TELEGRAM__SEND_RATE_LIMIT per hour, and compose.InvalidMail when the mail
        cannot be built.
        """
        settings = self.account(account)
        if user_id is not None:
            since = datetime.now(UTC) - timedelta(hours=1)
            recent = await self.db.run(store.count_sent_by_user, user_id, since)
            limit = self.send_rate_limit
            if recent >= limit:
                raise RateLimited(
                    f"Not sent: you have sent {recent} mails in the last hour "
                    f"(limit {limit}). Try again later."
                )
        sender = settings.smtp.sender
        message_id = make_message_id(sender)
        # Off the event loop: a 20 MB attachment takes seconds to encode.
        raw = await asyncio.to_thread(_flatten, mail, sender, message_id)
        recipients = envelope_recipients(mail)
        account_id = await self._account_id(account)
        item_id = await self.db.run(
            store.add_outbox,
            account_id=account_id,
            chat_id=chat_id,
            user_id=user_id,
            message_id=message_id,
            recipients=recipients,
            subject=mail.subject,
            raw=raw,
            source_message_id=source_message_id,
        )
        if item_id is None:
            logger.info(
                "chat message %s was already accepted; not sending again", source_message_id
            )
            return None
        logger.info(
            "outbox item %d stored (account %s, %d recipients)", item_id, account, len(recipients)
        )
        self._wakeup.set()
        return item_id

    async def _account_id(self, name: str) -> int:
        """The account's stable database id (looked up once)."""
        if name not in self._account_ids:
            try:
                self._account_ids[name] = await self.db.run(store.ensure_account, name)
            except IntegrityError:  # another writer created the row at the same moment
                self._account_ids[name] = await self.db.run(store.ensure_account, name)
        return self._account_ids[name]

    async def describe(self) -> str:
        """One line for /status."""
        counts = await self.db.run(store.outbox_counts)
        return ", ".join(f"{n} {status}" for status, n in sorted(counts.items())) or "empty"

    async def work(self, stop: asyncio.Event) -> None:
        """Send due items until stop is set; the item in hand is finished first."""
        while not stop.is_set():
            try:
                # One item at a time: an item may hold a 20 MB mail.
                due = await self.db.run(store.due_outbox, datetime.now(UTC), 1)
                for item in due:
                    await self._attempt(item, stop)
                    if stop.is_set():
                        return
                if due:
                    continue
                delay = await self._idle_delay()
            except UNAVAILABLE as exc:
                logger.error("outbox: database unusable (%s); retrying", exc)
                delay = IDLE_CHECK
            await self._sleep(stop, delay)

    async def _idle_delay(self) -> float:
        self._wakeup.clear()
        next_due = await self.db.run(store.next_outbox_due)
        if next_due is None:
            return IDLE_CHECK
        wait = (next_due - datetime.now(UTC)).total_seconds()  # the store gives aware UTC
        return min(max(0.0, wait), IDLE_CHECK)

    async def _sleep(self, stop: asyncio.Event, seconds: float) -> None:
        """Sleep until seconds pass, a new item is submitted, or stop is set."""
        waiters = {asyncio.ensure_future(self._wakeup.wait()), asyncio.ensure_future(stop.wait())}
        try:
            await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()

    async def _attempt(self, item: store.OutgoingRecord, stop: asyncio.Event) -> None:
        # Items stored before accounts existed have none: they leave through the first one.
        account = self._first if item.account is None else self._accounts.get(item.account)
        if account is None:
            error = f"the account {item.account!r} is no longer configured"
            await self.db.persist(store.mark_outbox, item.id, "failed", error=error)
            metrics.OUTBOX_FAILED.labels(account=item.account or "").inc()
            logger.warning("outbox item %d failed: %s", item.id, error)
            await self._tell(item, f"❌ Not sent: {error}.", stop)
            return

        async def record_sent(answer: str) -> None:
            # The mail is gone: this write must land, or a restart would send it again.
            await self.db.persist(store.mark_outbox, item.id, "sent", error=answer)

        signed_in = self._tokens.source(account.name) if self._tokens is not None else None

        try:
            # The stored bytes, as they are: nothing is parsed back or built again.
            await smtp.send(
                item.raw, list(item.recipients), account.smtp, record_sent, tokens=signed_in
            )
        except (TemporaryMailError, SignInNeeded) as exc:
            # An account that must sign in again keeps its mail until it has (or 24 h pass).
            await self._retry_or_fail(item, str(exc), stop)
            return
        except PermanentMailError as exc:
            await self.db.persist(store.mark_outbox, item.id, "failed", error=str(exc))
            metrics.OUTBOX_FAILED.labels(account=account.name).inc()
            logger.warning("outbox item %d failed: %s", item.id, exc)
            await self._tell(item, f"❌ Not sent: {exc}", stop)
            return
        metrics.OUTBOX_SENT.labels(account=account.name).inc()
        logger.info("outbox item %d sent", item.id)
        await self._tell(item, f"✅ Sent to {', '.join(item.recipients)}: {item.subject}", stop)
        if account.imap.save_sent:
            try:
                await append_sent(account.imap, item.raw, signed_in)
            except BridgeError as exc:
                logger.warning("could not save a copy in the Sent folder: %s", exc)

    async def _retry_or_fail(
        self, item: store.OutgoingRecord, error: str, stop: asyncio.Event
    ) -> None:
        if datetime.now(UTC) - item.created_at > GIVE_UP_AFTER:
            await self.db.run(store.mark_outbox, item.id, "failed", error=error)
            metrics.OUTBOX_FAILED.labels(account=item.account or self._first.name).inc()
            await self._tell(
                item, f"❌ Not sent after {item.attempts + 1} attempts: {error}", stop
            )
            return
        delay = min(MAX_RETRY_DELAY, 5.0 * 2**item.attempts)
        next_at = datetime.now(UTC) + timedelta(seconds=delay)
        await self.db.run(
            store.mark_outbox, item.id, "pending", error=error, next_attempt_at=next_at
        )
        logger.warning("outbox item %d: %s; retrying in %.0f s", item.id, error, delay)
        if item.attempts == 0:
            await self._tell(item, f"⏳ Not sent yet ({error}); I will keep trying.", stop)

    async def _tell(self, item: store.OutgoingRecord, text: str, stop: asyncio.Event) -> None:
        """Tell the chat the outcome: a report, so a few tries, never a reason to stop.

        Waits between tries (a flood wait, capped) end when stop is set: the report is then
        only logged, the item's state is in the database already.
        """
        chat_id = item.chat_id
        for _attempt in range(3):
            if chat_id is None:
                return
            try:
                await self.bot.send_message(chat_id, text)
                metrics.telegram_answered()
                return
            except TelegramError as exc:
                failure = count(classify(exc))
            if failure.verdict is Verdict.MIGRATED:
                chat_id = failure.new_chat_id  # the group became a supergroup
            elif failure.verdict in (Verdict.RETRY_AFTER, Verdict.TRANSIENT):
                if await wait_or_stop(stop, min(failure.delay or 2.0, 30.0)):
                    break
            else:
                break
        logger.warning("could not report outbox item %d to the chat: %s", item.id, failure.reason)


def _flatten(mail: OutgoingMail, sender: str, message_id: str) -> bytes:
    """The mail as the bytes that go over SMTP (and into the Sent folder)."""
    return build_message(mail, sender, message_id=message_id).as_bytes(policy=email.policy.SMTP)
