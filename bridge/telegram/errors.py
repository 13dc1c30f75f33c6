"""One reading of Telegram's errors for the watcher, the outbox and the bot: what to do next
(and two retries that a stop ends: start-up calls until Telegram answers, any call through
its flood waits)."""

from __future__ import annotations

import asyncio
import enum
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from telegram.error import (
    BadRequest,
    ChatMigrated,
    EndPointNotFound,
    Forbidden,
    InvalidToken,
    RetryAfter,
    TelegramError,
)

from bridge import metrics
from bridge.errors import TokenRefused
from bridge.logs import MASK
from bridge.retry import Backoff, Stopped, retry_delay, wait_or_stop

logger = logging.getLogger(__name__)
T = TypeVar("T")
MAX_REASON = 200
# Bot API "Authorizing your bot": a token is "<bot id>:<secret>"; httpx and PTB messages may
# carry it, also inside a ".../bot<token>/method" URL.
_TOKEN_RE = re.compile(r"\d+:[A-Za-z0-9_-]{10,}")
# Descriptions as the Bot API words them (PTB drops the "Bad Request: " prefix), lower-cased.
_CHAT_GONE = (
    "chat not found",
    "group chat was upgraded",  # ChatMigrated without the new id: nothing to follow
    "not enough rights to send",  # "... text messages to the chat": muted or restricted
    "have no rights to send",
    "need administrator rights",  # a channel that took the bot's posting right away
    "topic_closed",  # a closed topic refuses posts until an admin reopens it
)
_BAD_HTML = ("can't parse entities",)
_TOPIC_GONE = ("message thread not found",)


class Verdict(enum.StrEnum):
    """What the failed request's sender should do next."""

    RETRY_AFTER = "retry_after"  # RetryAfter: wait exactly what Telegram says
    TRANSIENT = "transient"  # network, timeout, 5xx, Conflict, unknown: back off and retry
    MIGRATED = "migrated"  # ChatMigrated: the group has a new id; follow it
    CHAT_GONE = "chat_gone"  # kicked, blocked, chat not found: retry this chat much later
    BAD_HTML = "bad_html"  # "can't parse entities": send the plain text instead
    TOPIC_GONE = "topic_gone"  # "message thread not found": the forum topic was deleted
    TOKEN = "token"  # noqa: S105 - not a secret. InvalidToken (401/404): fix the config
    BUG = "bug"  # any other BadRequest: our request is wrong; do not repeat it


@dataclass(frozen=True, kw_only=True)
class TelegramFailure:
    """A classified Telegram error: the verdict and what acting on it needs."""

    verdict: Verdict
    delay: float | None = None  # seconds, for RETRY_AFTER
    new_chat_id: int | None = None  # for MIGRATED
    reason: str  # one short line for logs and /status, without the bot token


def classify(exc: TelegramError) -> TelegramFailure:
    """Tell what a Telegram error means for the request that raised it."""
    reason = _reason(exc)
    # Order matters: BadRequest and TimedOut are NetworkError subclasses in PTB.
    if isinstance(exc, RetryAfter):
        delay = retry_delay(exc)
        return TelegramFailure(
            verdict=Verdict.RETRY_AFTER, delay=delay, reason=f"flood control: retry in {delay:g} s"
        )
    if isinstance(exc, ChatMigrated):
        return TelegramFailure(
            verdict=Verdict.MIGRATED,
            new_chat_id=exc.new_chat_id,
            reason=f"group upgraded to supergroup {exc.new_chat_id}",
        )
    if isinstance(exc, InvalidToken):
        return TelegramFailure(verdict=Verdict.TOKEN, reason=reason)
    if isinstance(exc, Forbidden):
        return TelegramFailure(verdict=Verdict.CHAT_GONE, reason=reason)
    if isinstance(exc, BadRequest):
        return TelegramFailure(verdict=_bad_request_verdict(exc.message), reason=reason)
    if isinstance(exc, EndPointNotFound):
        return TelegramFailure(verdict=Verdict.BUG, reason=reason)  # a method name we got wrong
    # Conflict (a second getUpdates), NetworkError, TimedOut, 5xx and whatever PTB adds later.
    return TelegramFailure(verdict=Verdict.TRANSIENT, reason=reason)


def _bad_request_verdict(message: str) -> Verdict:
    """The verdict for a 400 answer, read from its description."""
    text = message.lower()
    if any(marker in text for marker in _BAD_HTML):
        return Verdict.BAD_HTML
    if any(marker in text for marker in _TOPIC_GONE):
        return Verdict.TOPIC_GONE
    if any(marker in text for marker in _CHAT_GONE):
        return Verdict.CHAT_GONE
    return Verdict.BUG


def _reason(exc: TelegramError) -> str:
    """One line naming the error kind and Telegram's words, token masked, at most MAX_REASON."""
    text = _TOKEN_RE.sub(MASK, " ".join(exc.message.split()))
    kind = type(exc).__name__
    line = text if text.lower().startswith(kind.lower()) else f"{kind}: {text}"
    return line if len(line) <= MAX_REASON else line[: MAX_REASON - 1] + "…"


def count(failure: TelegramFailure) -> TelegramFailure:
    """Count a failed Bot API call in mailbridge_telegram_errors_total; returns it."""
    metrics.TELEGRAM_ERRORS.labels(verdict=failure.verdict.value).inc()
    return failure


async def call_until_answered(
    what: str, call: Callable[[], Awaitable[T]], stop: asyncio.Event
) -> T:
    """Call until Telegram answers (for start-up calls such as getMe and deleteWebhook).

    Network errors, 5xx and flood waits are retried with backoff, logged once; a refused
    token raises TokenRefused; any other error is raised as it is. Stopped when stop is set
    while waiting.
    """
    backoff = Backoff()
    failures = 0
    while True:
        try:
            result = await call()
        except TelegramError as exc:
            failure = count(classify(exc))
            if failure.verdict is Verdict.TOKEN:
                raise TokenRefused from exc
            if failure.verdict not in (Verdict.TRANSIENT, Verdict.RETRY_AFTER):
                raise
        else:
            metrics.telegram_answered()
            if failures:
                logger.info("%s: Telegram answered after %d failure(s)", what, failures)
            return result
        failures += 1
        if failures == 1:
            logger.warning("%s failed (%s); retrying", what, failure.reason)
        delay = failure.delay if failure.delay is not None else backoff.next()
        if await wait_or_stop(stop, delay):
            raise Stopped


async def call_through_floods(call: Callable[[], Awaitable[T]], stop: asyncio.Event) -> T:
    """Call; while Telegram answers 429 (RetryAfter), wait what it asks and call again.

    PTB's rate limiter does not retry (max_retries=0, telegram/bot.py): the flood wait is
    waited here, where stop ends it with Stopped. Any other error is raised as it is.
    """
    while True:
        try:
            return await call()
        except RetryAfter as exc:
            failure = count(classify(exc))
        logger.info("Telegram asks to wait: %s", failure.reason)
        if await wait_or_stop(stop, failure.delay if failure.delay is not None else 1.0):
            raise Stopped
