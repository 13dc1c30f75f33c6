"""The service: migrate, build the parts, run watchers, delivery, outbox and bot until stopped."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from telegram.error import InvalidToken, TelegramError
from telegram.ext import Application

from bridge.chat_to_mail import Outbox
from bridge.config import AccountSettings, Settings
from bridge.db.engine import Database, make_engine
from bridge.db.migrate import upgrade_to_head
from bridge.delivery import ChatLocks, Delivery
from bridge.errors import BridgeError
from bridge.jobs import JobRunner
from bridge.logs import mask_secrets
from bridge.mail_to_chat import FolderPoller, FolderWatcher
from bridge.retry import Backoff, wait_or_stop
from bridge.telegram import polling
from bridge.telegram.bot import build_application, make_bot
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

    `ready` is set once every watched folder has been checked (for tests and benchmarks).
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


def _origin(settings: Settings, account: AccountSettings, folder: str) -> str:
    """What a summary says of where the mail came: the account when there are several, the
    folder when the account watches several or another than INBOX."""
    parts = [account.name] if len(settings.accounts) > 1 else []
    if len(account.folders) > 1 or folder.upper() != "INBOX":
        parts.append(folder)
    return " · ".join(parts)


def build_watchers(
    settings: Settings, db: Database, delivery: Delivery, executor: ThreadPoolExecutor
) -> tuple[list[FolderWatcher], list[FolderPoller]]:
    """One watcher per folder; per account, folders beyond its connection budget (keeping one
    connection for the poller) share a FolderPoller."""
    watchers: list[FolderWatcher] = []
    pollers: list[FolderPoller] = []
    for account in settings.accounts:
        mine = [
            FolderWatcher(
                account,
                folder,
                db=db,
                delivery=delivery,
                routes=settings.routes,
                default_chats=settings.telegram.notify_chats,
                preview_chars=settings.telegram.preview_chars,
                digest_threshold=settings.telegram.digest_threshold,
                origin=_origin(settings, account, folder),
                executor=executor,
            )
            for folder in account.folders
        ]
        watchers += mine
        budget = account.imap.max_connections
        if len(mine) > budget:
            pollers.append(FolderPoller(account, mine[budget - 1 :], executor))
    return watchers, pollers


async def serve(
    settings: Settings, db: Database, stop: asyncio.Event, ready: asyncio.Event | None = None
) -> None:
    """The bot, the folder watchers, delivery and the outbox worker under one task group."""
    bot = make_bot(settings.telegram)
    locks = ChatLocks()
    delivery = Delivery(settings.telegram, db, bot, locks)
    outbox = Outbox(settings.accounts, settings.telegram, db, bot)
    jobs = JobRunner(settings.accounts, settings.telegram, db, bot, outbox)
    connections = sum(min(len(a.folders), a.imap.max_connections) for a in settings.accounts)
    executor = ThreadPoolExecutor(max_workers=connections + 4, thread_name_prefix="imap")
    watchers, pollers = build_watchers(settings, db, delivery, executor)
    polled = {id(w) for p in pollers for w in p.watchers}
    deps = Deps(
        settings=settings,
        db=db,
        folders=tuple(w.status for w in watchers),
        delivery=delivery,
        chat_locks=locks,
        outbox=outbox,
        jobs=jobs,
    )
    application = build_application(settings.telegram, bot, deps)
    try:
        if not await _initialize(application, stop):
            return
        # PTB calls post_init only from run_polling(); we start the parts ourselves.
        if application.post_init is not None:
            try:
                await application.post_init(application)
            except TelegramError as exc:  # the command menu is a convenience
                logger.warning("could not set the bot's command menu: %s", exc)
        await delivery.load()
        await application.start()
        logger.info(
            "mailbridge running: %d account(s), %d folder(s) (%d polled)",
            len(settings.accounts),
            len(watchers),
            len(polled),
        )
        async with asyncio.TaskGroup() as group:
            group.create_task(polling.poll(application, stop))
            group.create_task(delivery.run(stop))
            group.create_task(outbox.work(stop))
            group.create_task(jobs.run(stop))
            for watcher in watchers:
                if id(watcher) not in polled:
                    group.create_task(watcher.run(stop))
            for poller in pollers:
                group.create_task(poller.run(stop))
            if ready is not None:
                group.create_task(_all_checked(watchers, delivery, ready, stop))
            await stop.wait()
        logger.info("stopping")
    finally:
        if application.running:  # also after a crash, so that shutdown() does not hide it
            await application.stop()
        await application.shutdown()
        executor.shutdown(wait=False, cancel_futures=True)


async def _all_checked(
    watchers: list[FolderWatcher], delivery: Delivery, ready: asyncio.Event, stop: asyncio.Event
) -> None:
    """Set ready once every folder was checked and what they found was delivered."""
    waits: list[asyncio.Future[Any]] = [asyncio.ensure_future(w.checked.wait()) for w in watchers]
    waits.append(asyncio.ensure_future(_drained(watchers, delivery)))
    stopper = asyncio.ensure_future(stop.wait())
    everyone: asyncio.Future[Any] = asyncio.gather(*waits)
    try:
        await asyncio.wait([everyone, stopper], return_when="FIRST_COMPLETED")
    finally:
        stopper.cancel()
        for wait in waits:
            wait.cancel()
    if not stop.is_set():
        ready.set()


async def _drained(watchers: list[FolderWatcher], delivery: Delivery) -> None:
    for watcher in watchers:
        await watcher.checked.wait()
    await delivery.idle.wait()


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
