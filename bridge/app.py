"""The service: migrate, build the parts, run watchers, delivery, outbox and bot until stopped."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from telegram import Bot
from telegram.error import InvalidToken, TelegramError
from telegram.ext import Application

from bridge import http
from bridge.chat_to_mail import Outbox
from bridge.config import AccountSettings, Settings
from bridge.db import store
from bridge.db.engine import Database, make_engine
from bridge.db.migrate import migrated
from bridge.delivery import ChatLocks, Delivery
from bridge.errors import BridgeError, TokenRefused
from bridge.jobs import JobRunner
from bridge.leases import Leases, lease_name
from bridge.logs import SecretFilter, mask_secrets
from bridge.mail_to_chat import FolderPoller, FolderWatcher
from bridge.oauth import AccessTokens
from bridge.retry import Stopped
from bridge.telegram import polling, webhook
from bridge.telegram.bot import build_application, make_bot
from bridge.telegram.deps import Deps
from bridge.telegram.errors import call_through_floods, call_until_answered

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

    Whatever ends the service comes out as one BridgeError with a one-line message: a token
    Telegram refuses as TokenRefused (a ConfigError: exit 2), a crash of any part as a
    BridgeError naming where it happened (exit 1); its traceback is logged at DEBUG.
    `ready` is set once every watched folder has been checked (for tests and benchmarks).
    """
    if stop is None:
        stop = asyncio.Event()
        _install_signals(stop)
    unmask = mask_secrets(settings.secrets())
    engine = make_engine(settings.core.database_url)
    try:
        if not await asyncio.to_thread(migrated, engine):
            from bridge.db.migrate import upgrade_to_head  # loads Alembic: only when needed

            await asyncio.to_thread(upgrade_to_head, engine)
        if not settings.telegram.allowed_user_ids:
            logger.warning("BRIDGE_TELEGRAM__ALLOWED_USER_IDS is empty: the bot serves nobody")
        await serve(settings, Database(engine), stop, ready)
    except BridgeError:
        raise
    except Exception as exc:  # a crash (or several, from the task group): one line
        logger.debug("the service ended with an unexpected error", exc_info=exc)
        raise _failure(exc, SecretFilter(settings.secrets()).mask) from exc
    finally:
        engine.dispose()
        unmask()


def _failure(exc: Exception, mask: Any) -> BridgeError:
    """What a user must read of what ended the service, in one line."""
    leaves = list(_leaves(exc))
    if any(isinstance(leaf, TokenRefused | InvalidToken) for leaf in leaves):
        return TokenRefused()
    for leaf in leaves:
        if isinstance(leaf, BridgeError):
            return leaf
    crash = leaves[0] if leaves else exc
    detail = " ".join(str(crash).split())[:200]
    what = f"{type(crash).__name__}: {detail}" if detail else type(crash).__name__
    return BridgeError(
        mask(f"crashed {_where(crash)}: {what} (BRIDGE_LOG_LEVEL=DEBUG logs the traceback)")
    )


def _leaves(exc: BaseException) -> Iterator[BaseException]:
    """The exceptions inside (nested) exception groups, or exc itself."""
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
    else:
        yield exc


def _where(exc: BaseException) -> str:
    """The task and the place, from the bridge's own frames of the traceback: the outermost
    (the task's coroutine, e.g. "Delivery.run") and the innermost (where it went wrong)."""
    package = Path(__file__).resolve().parent
    ours: list[tuple[str, str]] = []
    tb = exc.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        path = Path(code.co_filename).resolve()
        if path.is_relative_to(package):
            where = f"{path.relative_to(package.parent).as_posix()}:{tb.tb_lineno}"
            ours.append((code.co_qualname, where))
        tb = tb.tb_next
    if not ours:
        return "outside the bridge's code"
    return f"in {ours[0][0]}, at {ours[-1][1]}"


def _origin(settings: Settings, account: AccountSettings, folder: str) -> str:
    """What a summary says of where the mail came: the account when there are several, the
    folder when the account watches several or another than INBOX."""
    parts = [account.name] if len(settings.accounts) > 1 else []
    if len(account.folders) > 1 or folder.upper() != "INBOX":
        parts.append(folder)
    return " · ".join(parts)


def build_watchers(
    settings: Settings,
    db: Database,
    delivery: Delivery,
    executor: ThreadPoolExecutor,
    tokens: AccessTokens | None = None,
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
                tokens=tokens.source(account.name) if tokens is not None else None,
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
    leases = Leases(db, settings.core.lease_seconds)
    delivery = Delivery(settings.telegram, db, bot, locks, leases)
    notify = _notify_chats(bot, settings.telegram.notify_chats, stop)
    tokens = AccessTokens(settings.accounts, settings.core.secret_keys, db, notify)
    outbox = Outbox(settings.accounts, settings.telegram, db, bot, tokens=tokens)
    jobs = JobRunner(settings.accounts, settings.telegram, db, bot, outbox, locks, tokens=tokens)
    connections = sum(min(len(a.folders), a.imap.max_connections) for a in settings.accounts)
    executor = ThreadPoolExecutor(max_workers=connections + 4, thread_name_prefix="imap")
    watchers, pollers = build_watchers(settings, db, delivery, executor, tokens)
    polled = {id(w) for p in pollers for w in p.watchers}
    deps = Deps(
        settings=settings,
        db=db,
        folders=tuple(w.status for w in watchers),
        delivery=delivery,
        chat_locks=locks,
        outbox=outbox,
        jobs=jobs,
        tokens=tokens,
    )
    application = build_application(settings.telegram, bot, deps)
    try:
        if not await _initialize(application, stop) or not await _set_commands(application, stop):
            return
        await delivery.load()
        for account in settings.accounts:  # before the watchers, which all look them up
            await db.run(store.ensure_account, account.name)
        await application.start()
        logger.info(
            "mailbridge running: %d account(s), %d folder(s) (%d polled)",
            len(settings.accounts),
            len(watchers),
            len(polled),
        )
        # Work only one instance may do at a time runs under a lease (one instance: all its).
        # Instances share the leases evenly; the first ones added move least.
        if not settings.telegram.webhook_url:  # long polling: one instance at a time
            leases.add("telegram:updates", lambda halt, _held: polling.poll(application, halt))
        for watcher in watchers:
            if id(watcher) not in polled:
                leases.add(watcher_lease(watcher), watcher.run)
        for poller in pollers:
            leases.add(lease_name(f"poll:{poller.account.name}"), poller.run)
        async with asyncio.TaskGroup() as group:
            if settings.telegram.webhook_url:  # every instance takes updates
                group.create_task(webhook.serve(application, db, settings.telegram, stop))
            group.create_task(leases.run(stop))
            group.create_task(delivery.run(stop))
            group.create_task(outbox.work(stop))
            group.create_task(jobs.run(stop))
            group.create_task(http.serve(settings.http, deps, stop))
            if ready is not None:
                group.create_task(_all_checked(watchers, pollers, leases, delivery, ready, stop))
            await stop.wait()
        logger.info("stopping")
    finally:
        if application.running:  # also after a crash, so that shutdown() does not hide it
            await application.stop()
        await application.shutdown()
        await tokens.aclose()
        executor.shutdown(wait=False, cancel_futures=True)


def _notify_chats(
    bot: Bot, chats: Sequence[int], stop: asyncio.Event
) -> Callable[[str], Awaitable[None]]:
    """How bridge/oauth.py tells the notify chats that an account must sign in again."""

    async def notify(text: str) -> None:
        for chat_id in chats:
            try:
                await call_through_floods(functools.partial(bot.send_message, chat_id, text), stop)
            except Stopped:
                logger.warning("stopping: chat %s was not told about a sign-in", chat_id)
                return
            except TelegramError as exc:  # told once: a chat that refuses it is logged
                logger.warning("could not tell chat %s about a sign-in: %s", chat_id, exc)

    return notify


def watcher_lease(watcher: FolderWatcher) -> str:
    """The lease a folder's own watcher runs under."""
    return lease_name(f"folder:{watcher.account.name}/{watcher.folder}")


async def _all_checked(
    watchers: list[FolderWatcher],
    pollers: list[FolderPoller],
    leases: Leases,
    delivery: Delivery,
    ready: asyncio.Event,
    stop: asyncio.Event,
) -> None:
    """Set ready once every folder this instance watches was checked and what they found was
    delivered."""
    await leases.settled.wait()
    polled = {id(w): lease_name(f"poll:{p.account.name}") for p in pollers for w in p.watchers}
    mine = [w for w in watchers if polled.get(id(w), watcher_lease(w)) in leases.held]
    waits: list[asyncio.Future[Any]] = [asyncio.ensure_future(w.checked.wait()) for w in mine]
    waits.append(asyncio.ensure_future(_drained(mine, delivery)))
    stopper = asyncio.ensure_future(stop.wait())
    everyone: asyncio.Future[Any] = asyncio.gather(*waits)
    try:
        await asyncio.wait([everyone, stopper], return_when="FIRST_COMPLETED")
    finally:
        stopper.cancel()
        everyone.cancel()
        for wait in waits:
            wait.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await everyone
    if not stop.is_set():
        ready.set()


async def _drained(watchers: list[FolderWatcher], delivery: Delivery) -> None:
    for watcher in watchers:
        await watcher.checked.wait()
    await delivery.idle.wait()


async def _initialize(
    application: Application[Any, Any, Any, Any, Any, Any], stop: asyncio.Event
) -> bool:
    """application.initialize() (getMe), retried while Telegram is unreachable; False when
    stop was set first. TokenRefused when Telegram refuses the token."""
    try:
        await call_until_answered("getMe", application.initialize, stop)
    except Stopped:
        return False
    return True


async def _set_commands(
    application: Application[Any, Any, Any, Any, Any, Any], stop: asyncio.Event
) -> bool:
    """The post_init hook (setMyCommands), retried like getMe; False when stop was set first.

    PTB calls post_init only from run_polling(); we start the parts ourselves.
    """
    post_init = application.post_init
    if post_init is None:
        return True
    try:
        await call_until_answered("setMyCommands", lambda: post_init(application), stop)
    except Stopped:
        return False
    except TelegramError as exc:  # refused for good: the command menu is a convenience
        logger.warning("could not set the bot's command menu: %s", exc)
    return True
