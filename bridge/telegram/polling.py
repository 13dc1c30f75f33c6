"""getUpdates long polling that confirms an update only after it was handled.

PTB's Updater confirms updates to Telegram (the next getUpdates offset) as soon as it has
fetched them, before any handler ran: a crash in between loses the update, and with it a /send.
Here the offset moves past an update only after Application.process_update() returned, so a
crash means Telegram delivers it again (the outbox refuses a chat message twice). An update
whose handling met a database that could not be used is not confirmed either: it is fetched and
handled again, with backoff, until the database answers.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from telegram import Update
from telegram.error import Conflict, TelegramError
from telegram.ext import Application

from bridge import metrics
from bridge.errors import TokenRefused
from bridge.retry import Backoff, Stopped
from bridge.telegram.bot import held_back
from bridge.telegram.errors import Verdict, call_until_answered, classify, count

logger = logging.getLogger(__name__)

LONG_POLL = 10  # seconds Telegram may hold a getUpdates open
MAX_BACKOFF = 30.0
DATABASE_RETRY_CAP = 10.0  # seconds between attempts at an update held back


async def poll(
    application: Application[Any, Any, Any, Any, Any, Any], stop: asyncio.Event
) -> None:
    """Fetch, handle, then confirm updates until stop is set."""
    bot = application.bot
    try:  # a transient error at start must not end the service: retried until stop
        await call_until_answered(
            "deleteWebhook",
            lambda: bot.delete_webhook(drop_pending_updates=False),  # never drop pending ones
            stop,
        )
    except Stopped:
        return
    offset: int | None = None
    delay = 0.0
    database_waits = Backoff(first=0.5, cap=DATABASE_RETRY_CAP)
    while not stop.is_set():
        if delay:
            try:
                await asyncio.wait_for(stop.wait(), timeout=delay)
                return
            except TimeoutError:
                pass
        fetch = asyncio.ensure_future(
            bot.get_updates(offset=offset, timeout=LONG_POLL, allowed_updates=Update.ALL_TYPES)
        )
        stopper = asyncio.ensure_future(stop.wait())
        await asyncio.wait({fetch, stopper}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        if not fetch.done():
            fetch.cancel()  # nothing fetched is lost: unconfirmed updates come again
            return
        try:
            updates = fetch.result()
        except TelegramError as exc:
            failure = count(classify(exc))
            if failure.verdict is Verdict.TOKEN:
                raise TokenRefused from exc
            if failure.verdict is Verdict.RETRY_AFTER and failure.delay is not None:
                delay = failure.delay
            elif isinstance(exc, Conflict):
                logger.error("another program polls this bot (%s); retrying", failure.reason)
                delay = MAX_BACKOFF
            else:
                if not delay:
                    logger.warning("getUpdates failed (%s); retrying", failure.reason)
                delay = min(MAX_BACKOFF, max(1.0, delay * 2))
            continue
        delay = 0.0
        metrics.telegram_answered()
        for update in updates:
            await application.process_update(update)
            if held_back(application, update):
                # The database could not be used: not confirmed, so Telegram hands this update
                # (and those after it, in order) over again once the wait is over.
                delay = database_waits.next()
                break
            offset = update.update_id + 1  # confirmed by the next getUpdates
        else:
            database_waits.reset()
