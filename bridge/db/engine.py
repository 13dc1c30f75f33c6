"""The database engine and the one helper that runs sessions off the event loop."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

from sqlalchemy import URL, Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from bridge import metrics
from bridge.errors import DatabaseError

logger = logging.getLogger(__name__)
P = ParamSpec("P")
PERSIST_FOR = 120.0
T = TypeVar("T")

# What a database that cannot be used right now raises: unreachable, restarting, locked, disk
# full (OperationalError), a connection that died under us (InterfaceError), or persist() giving
# up (DatabaseError). Callers wait and try again; nothing they read from the mail side or from
# Telegram is confirmed meanwhile.
UNAVAILABLE: tuple[type[Exception], ...] = (OperationalError, InterfaceError, DatabaseError)

# libpq: give up a connection attempt after 10 s, and notice a peer that vanished without a
# word (a host power cut, a dropped route) by TCP keepalives within about a minute. The server
# ends a session that sits in a transaction for 10 s (the bridge's take milliseconds): an
# instance frozen mid-transaction (SIGSTOP, a VM paused) must not hold row locks that every
# other instance waits for.
_POSTGRES_CONNECT: dict[str, Any] = {
    "connect_timeout": 10,
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
    "options": "-c idle_in_transaction_session_timeout=10000",
}


# `postgresql://` names no driver; SQLAlchemy's default (psycopg2) is not installed, psycopg 3 is.
_DEFAULT_DRIVERS = {"postgresql": "postgresql+psycopg", "postgres": "postgresql+psycopg"}


def parse_url(url: str) -> URL:
    """The URL with its default driver; DatabaseError (never echoing the URL) when malformed."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        # SQLAlchemy's message repeats the whole string, password included.
        raise DatabaseError("BRIDGE_DATABASE_URL is not a database URL") from None
    return parsed.set(drivername=_DEFAULT_DRIVERS.get(parsed.drivername, parsed.drivername))


def make_engine(url: str) -> Engine:
    """Create the engine; for SQLite create its folder and an owner-only file, and use WAL."""
    parsed = parse_url(url)
    if parsed.get_backend_name() != "sqlite":
        # What the URL sets itself (?connect_timeout=…) wins; its ?options= are kept.
        connect: dict[str, Any] = {
            k: v for k, v in _POSTGRES_CONNECT.items() if k not in parsed.query
        }
        if "options" in parsed.query:
            connect["options"] = f"{parsed.query['options']} {_POSTGRES_CONNECT['options']}"
        engine = create_engine(parsed, pool_pre_ping=True, connect_args=connect)
        _count_statements(engine)
        return engine
    database = parsed.database
    if database and database != ":memory:" and not database.startswith("file:"):
        path = Path(database)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not path.exists():
            # The database holds mail metadata: owner-only from its first byte.
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    # ?timeout=N in the URL (seconds) sets how long a writer waits for a lock; default 30.
    timeout = float(parsed.query.get("timeout", 30))  # type: ignore[arg-type]
    engine = create_engine(parsed, connect_args={"check_same_thread": False, "timeout": timeout})

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout={int(timeout * 1000)}")
        cursor.execute("PRAGMA foreign_keys=ON")
        _wal(cursor, timeout)
        cursor.close()

    _count_statements(engine)
    return engine


def _count_statements(engine: Engine) -> None:
    """Count every statement sent (mailbridge_db_statements on /metrics)."""

    @event.listens_for(engine, "before_cursor_execute")
    def _count(*args: Any) -> None:
        # (conn, cursor, statement, parameters, context, executemany): an executemany runs
        # its statement once per parameter set.
        parameters, executemany = args[3], args[5]
        metrics.DB_STATEMENTS.inc(len(parameters) if executemany and parameters else 1)


def _wal(cursor: Any, timeout: float) -> None:
    """Switch to WAL once; it persists in the file. Switching needs an exclusive lock and
    SQLite answers "locked" at once instead of waiting: several processes starting on a new
    database retry until one has switched it."""
    deadline = time.monotonic() + timeout
    while cursor.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
        except sqlite3.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)  # another process holds the lock for a moment


class Database:
    """The engine plus `run()`, which calls a store function in a worker thread."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)

    def session(self) -> Session:
        """A new session (for synchronous callers such as the CLI)."""
        return self._sessions()

    def call(self, fn: Callable[Concatenate[Session, P], T], *args: P.args, **kw: P.kwargs) -> T:
        """Run fn(session, ...) in one transaction, committed on success."""
        with self._sessions.begin() as session:
            return fn(session, *args, **kw)

    async def run(
        self, fn: Callable[Concatenate[Session, P], T], *args: P.args, **kw: P.kwargs
    ) -> T:
        """Run fn(session, ...) in a worker thread, so a locked SQLite never blocks the loop."""
        return await asyncio.to_thread(functools.partial(self.call, fn, *args, **kw))

    async def persist(
        self, fn: Callable[Concatenate[Session, P], T], *args: P.args, **kw: P.kwargs
    ) -> T:
        """Like run(), for writes that must land (a posted summary, a sent mail) and reads that
        work cannot go on without.

        A locked database, a full disk or an I/O error is retried with backoff for up to
        PERSIST_FOR seconds, logged once; the transaction is rolled back each time, so the
        database never holds half a write. Then DatabaseError.
        """
        delay, deadline, logged = 0.1, time.monotonic() + PERSIST_FOR, False
        while True:
            try:
                return await self.run(fn, *args, **kw)
            except (OperationalError, InterfaceError) as exc:
                reason = unavailable_reason(exc)
                if time.monotonic() > deadline:
                    raise DatabaseError(f"database unusable: {reason}") from exc
                if not logged:
                    logger.error("database unusable (%s); retrying", reason)
                    logged = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)


def unavailable_reason(exc: BaseException) -> str:
    """One line on why the database could not be used, without the SQL or the URL."""
    if isinstance(exc, DatabaseError):
        return str(exc)
    orig = getattr(exc, "orig", None)
    text = str(orig) if orig is not None else ""
    return text.strip().splitlines()[0] if text.strip() else type(orig or exc).__name__
