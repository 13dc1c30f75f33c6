"""Shared fixtures: the throwaway CA and the real servers the integration tests run against."""

from __future__ import annotations

import itertools
import secrets
from collections.abc import AsyncIterator, Iterator

import pytest

from tests.servers.botapi import FakeBotApi
from tests.servers.certs import CA
from tests.servers.dovecot import DovecotServer, MailUser
from tests.servers.smtpd import SmtpServer

_user_numbers = itertools.count(1)


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
    return user


@pytest.fixture
async def botapi(request: pytest.FixtureRequest) -> AsyncIterator[FakeBotApi]:
    """A fake Bot API for this test; `@pytest.mark.botapi(token=...)` passes options."""
    marker = request.node.get_closest_marker("botapi")
    async with FakeBotApi(**(marker.kwargs if marker else {})) as server:
        yield server


@pytest.fixture
def smtpd(request: pytest.FixtureRequest, ca: CA) -> Iterator[SmtpServer]:
    """An SMTP submission server; `@pytest.mark.smtpd(tls="starttls", ...)` picks the variant."""
    marker = request.node.get_closest_marker("smtpd")
    with SmtpServer(ca, **(marker.kwargs if marker else {})) as server:
        yield server
