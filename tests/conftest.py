"""Shared fixtures: the throwaway CA and the real servers the integration tests run against."""

from __future__ import annotations

import itertools
import logging
import secrets
from collections.abc import AsyncIterator, Iterator

import pytest

from tests.servers.botapi import FakeBotApi
from tests.servers.certs import CA
from tests.servers.dovecot import DovecotServer, MailUser
from tests.servers.smtpd import SmtpServer

_user_numbers = itertools.count(1)
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
