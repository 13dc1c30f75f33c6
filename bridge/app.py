"""The service: migrate, build the parts, run watcher, outbox and bot until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from typing import Any

from telegram.error import InvalidToken, TelegramError
from telegram.ext import Application

from bridge.chat_to_mail import Outbox
from bridge.config import Settings
from bridge.db.engine import Database, make_engine
from bridge.db.migrate import upgrade_to_head
from bridge.errors import BridgeError
from bridge.logs import mask_secrets
from bridge.mail_to_chat import ChatLocks, Watcher, WatchStatus
from bridge.retry import Backoff, wait_or_stop
from bridge.telegram import polling
from bridge.telegram.bot import build_application
from bridge.telegram.deps import Deps

logger = logging.getLogger(__name__)


def _install_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)


async def run(
    settings: Settings, stop: asyncio.Event | None = None, ready: asyncio.Event | None = None
) -> None:
    """Run until stop is set (by SIGTERM/SIGINT when none is given); BridgeError on failure.

    `ready` is set after each completed mailbox check (for tests and benchmarks).
    """
    if stop is None:
        stop = asyncio.Event()
        _install_signals(stop)
    unmask = mask_secrets(settings.secrets())
    engine = make_engine(settings.core.database_url)
    try:
        await asyncio.to_thread(upgrade_to_head, engine)
        if not settings.telegram.allowed_user_ids:
            logger.warning("BRIDGE_TELEGRAM__ALLOWED_USER_IDS is empty: the bot serves nobody")
        await serve(settings, Database(engine), stop, ready)
    finally:
        engine.dispose()
        unmask()


async def serve(
    settings: Settings, db: Database, stop: asyncio.Event, ready: asyncio.Event | None = None
) -> None:
    """The bot, the watcher and the outbox worker under one task group."""
    deps = Deps(settings=settings, db=db, status=WatchStatus(), chat_locks=ChatLocks())
    application = build_application(settings, deps)
    watcher = Watcher(
        settings, db, application.bot, deps.status, checked=ready, chat_locks=deps.chat_locks
    )
    deps.outbox = outbox = Outbox(settings, db, application.bot)
    if not await _initialize(application, stop):
        return
    # PTB calls post_init only from run_polling(); we start the parts ourselves.
    if application.post_init is not None:
        try:
            await application.post_init(application)
        except TelegramError as exc:  # the command menu is a convenience, not a reason to stop
            logger.warning("could not set the bot's command menu: %s", exc)
    try:
        await application.start()
        logger.info("mailbridge running: watching %s", settings.imap.mailbox)
        async with asyncio.TaskGroup() as group:
            group.create_task(polling.poll(application, stop))
            group.create_task(watcher.run(stop))
            group.create_task(outbox.work(stop))
            await stop.wait()
        logger.info("stopping")
        await application.stop()
    finally:
        await application.shutdown()


async def _initialize(
    application: Application[Any, Any, Any, Any, Any, Any], stop: asyncio.Event
) -> bool:
    """application.initialize() (getMe), retried while Telegram is unreachable."""
    backoff = Backoff()
    while True:
        try:
            await application.initialize()
            return True
        except InvalidToken as exc:
            raise BridgeError("Telegram refused the bot token (BRIDGE_TELEGRAM__TOKEN)") from exc
        except TelegramError as exc:
            delay = backoff.next()
            if backoff.attempt == 1:
                logger.warning("Telegram unreachable (%s); retrying", exc)
            if await wait_or_stop(stop, delay):
                return False
