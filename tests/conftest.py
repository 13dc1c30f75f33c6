"""Shared fixtures: the throwaway CA and the real servers the integration tests run against."""

from __future__ import annotations

import itertools
import logging
import os
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from sqlalchemy import URL, Engine, create_engine, text
from sqlalchemy.exc import OperationalError

from bridge.db.engine import parse_url
from tests.servers.botapi import FakeBotApi
from tests.servers.certs import CA
from tests.servers.dovecot import DovecotServer, MailUser
from tests.servers.smtpd import SmtpServer

_user_numbers = itertools.count(1)
# The PostgreSQL server the tests create their databases on (scripts/test.sh sets it when it
# starts a throwaway one); its user must be allowed to create databases.
POSTGRES_VARIABLE = "MAILBRIDGE_TEST_POSTGRES"
POSTGRES_DEFAULT = "postgresql://postgres@127.0.0.1:5432/postgres"
DATABASES = ("sqlite", "postgresql")
# Every secret a test hands to the bridge; the session's whole log is checked against them.
SECRETS: set[str] = set()


class _AuditHandler(logging.Handler):
    """Keeps every formatted log line of the session."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture(scope="session", autouse=True)
def log_audit() -> Iterator[_AuditHandler]:
    """Capture the whole suite's log output at DEBUG; at the end no secret may appear in it."""
    handler = _AuditHandler()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield handler
    root.removeHandler(handler)
    root.setLevel(old_level)
    text = "\n".join(handler.lines)
    leaked = sorted(s for s in SECRETS if len(s) >= 6 and s in text)
    where = next((line for line in handler.lines if any(s in line for s in leaked)), "")
    for secret in leaked:
        where = where.replace(secret, "<SECRET>")
    assert not leaked, f"{len(leaked)} secret(s) appeared in the log output, e.g. {where[:300]!r}"


@pytest.fixture(scope="session")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CA:
    """The session's certificate authority and localhost server certificate."""
    return CA(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="session")
def dovecot(ca: CA) -> Iterator[DovecotServer]:
    """One Dovecot IMAPS server for the session; tests get their own users (mail_user)."""
    server = DovecotServer(ca)
    server.start()
    yield server
    server.cleanup()


@pytest.fixture
def mail_user(dovecot: DovecotServer) -> MailUser:
    """A fresh mailbox account on the session Dovecot (restarted if a test left it stopped)."""
    if not dovecot.running:
        dovecot.start()
    user = MailUser(f"user{next(_user_numbers)}", secrets.token_urlsafe(12))
    dovecot.add_user(user.name, user.password)
    SECRETS.add(user.password)
    return user


@pytest.fixture
async def botapi(request: pytest.FixtureRequest) -> AsyncIterator[FakeBotApi]:
    """A fake Bot API for this test; `@pytest.mark.botapi(token=...)` passes options."""
    marker = request.node.get_closest_marker("botapi")
    async with FakeBotApi(**(marker.kwargs if marker else {})) as server:
        SECRETS.add(server.token)
        yield server


@pytest.fixture
def smtpd(request: pytest.FixtureRequest, ca: CA) -> Iterator[SmtpServer]:
    """An SMTP submission server; `@pytest.mark.smtpd(tls="starttls", ...)` picks the variant."""
    marker = request.node.get_closest_marker("smtpd")
    with SmtpServer(ca, **(marker.kwargs if marker else {})) as server:
        SECRETS.add(server.password)
        yield server


def pytest_configure(config: pytest.Config) -> None:
    """Register the `databases` marker."""
    config.addinivalue_line(
        "markers", "databases(*kinds): run the test once per database: sqlite, postgresql"
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """`@pytest.mark.databases("sqlite", "postgresql")` runs a test that uses database_url once
    on each (without it: SQLite only)."""
    marker = metafunc.definition.get_closest_marker("databases")
    if marker is not None and "database_url" in metafunc.fixturenames:
        metafunc.parametrize("database_url", marker.args or DATABASES, indirect=True)


@pytest.fixture(scope="session")
def postgres() -> Iterator[Engine]:
    """An AUTOCOMMIT engine on the test PostgreSQL server's maintenance database.

    A server that cannot be reached fails the run: it is never a reason to skip.
    """
    admin = parse_url(os.environ.get(POSTGRES_VARIABLE, POSTGRES_DEFAULT))
    engine = create_engine(
        admin, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5}
    )
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except OperationalError as exc:
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else type(exc).__name__
    else:
        reason = ""
    if reason:
        engine.dispose()
        where = admin.render_as_string(hide_password=True)
        pytest.fail(
            f"PostgreSQL not reachable at {where} ({reason}): scripts/test.sh starts one, "
            f"or set {POSTGRES_VARIABLE}",
            pytrace=False,
        )
    yield engine
    engine.dispose()


@pytest.fixture
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The URL of a new, empty database for this test: SQLite in tmp_path, or (parametrized
    "postgresql") a database of its own on the test PostgreSQL, dropped afterwards."""
    kind = getattr(request, "param", "sqlite")
    if kind == "sqlite":
        yield f"sqlite:///{tmp_path}/bridge.db"
        return
    server: Engine = request.getfixturevalue("postgres")
    name = f"mb_{secrets.token_hex(6)}"
    with server.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url: URL = server.url.set(database=name)
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with server.connect() as conn:
            # FORCE: a bridge engine a failed test left open must not keep it alive.
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
