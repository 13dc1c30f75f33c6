"""Settings factory and an in-process bridge for the integration tests."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import make_url

from bridge import app
from bridge.config import (
    AccountSettings,
    CoreSettings,
    ImapSettings,
    RouteSettings,
    Settings,
    SmtpSettings,
    TelegramSettings,
)
from tests.conftest import DATABASES, SECRETS
from tests.servers.dovecot import MailUser
from tests.servers.smtpd import SmtpServer

OWNER = 4242  # the allowed user; also the notify chat (private chat id == user id)
# The tests of these modules run on SQLite and again on PostgreSQL; the others on SQLite only
# (the whole suite twice would take too long).
ON_BOTH_DATABASES = {"test_mail_to_chat", "test_routes", "test_send"}
# Tests there that prepare a SQLite file of their own.
SQLITE_ONLY = {
    "test_upgrade_from_an_env_only_database_loses_nothing",
    "test_a_big_attachment_is_built_off_the_event_loop",
}
# This test's PostgreSQL database, for make_settings (None: SQLite in its tmp_path).
_postgres_url: list[str | None] = [None]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Each test of ON_BOTH_DATABASES runs once per database (see database_url)."""
    if (
        Path(str(metafunc.module.__file__)).stem in ON_BOTH_DATABASES
        and metafunc.function.__name__ not in SQLITE_ONLY
        and "database_url" in metafunc.fixturenames
        and metafunc.definition.get_closest_marker("databases") is None
    ):
        metafunc.parametrize("database_url", DATABASES, indirect=True)


@pytest.fixture(autouse=True)
def _database_for_make_settings(database_url: str) -> Iterator[None]:
    """make_settings gives the bridge this test's database (tests call it directly too)."""
    postgres = make_url(database_url).get_backend_name() != "sqlite"
    _postgres_url[0] = database_url if postgres else None
    yield
    _postgres_url[0] = None


def make_settings(
    tmp_path: Path,
    *,
    dovecot: Any,
    user: Any,
    botapi: Any,
    ca_file: Path,
    smtpd: Any = None,
    telegram: dict[str, Any] | None = None,
    imap: dict[str, Any] | None = None,
    smtp: dict[str, Any] | None = None,
    accounts: list[AccountSettings] | None = None,
    routes: list[dict[str, Any]] | None = None,
    folders: list[str] | None = None,
    database_url: str | None = None,
) -> Settings:
    """Settings pointing at the test servers; nothing read from the environment or .env.

    Without `accounts`, one account `default` for `user` (as the environment variables make).
    Without `database_url`: the test's PostgreSQL database when it runs on one, else SQLite
    in tmp_path.
    """
    database_url = database_url or _postgres_url[0] or f"sqlite:///{tmp_path}/bridge.db"
    # chat_interval 0: tests post many mails quickly; test_faults_telegram checks the pacing.
    tg = {
        "token": botapi.token,
        "api_url": botapi.url,
        "allowed_user_ids": [OWNER],
        "chat_interval": 0,
    }
    tg.update(telegram or {})
    im = {
        "host": "127.0.0.1",
        "port": dovecot.port,
        "username": user.name,
        "password": user.password,
        "ca_file": ca_file,
        "poll_interval": 0.5,
    }
    im.update(imap or {})
    sm: dict[str, Any] = {"host": "127.0.0.1", "port": 1, "ca_file": ca_file}
    if smtpd is not None:
        sm.update(port=smtpd.port, username=smtpd.username, password=smtpd.password)
    else:
        sm.update(username=user.name, password=user.password)
    sm.update(smtp or {})
    if accounts is None:
        accounts = [
            AccountSettings(
                name="default",
                folders=folders or [],
                imap=ImapSettings(**im),
                smtp=SmtpSettings(**sm),
            )
        ]
    return Settings(
        core=CoreSettings(database_url=database_url),
        telegram=TelegramSettings(**tg),
        accounts=tuple(accounts),
        routes=tuple(RouteSettings.model_validate(r) for r in routes or []),
    )


def make_account(
    name: str,
    *,
    dovecot: Any,
    user: Any,
    ca_file: Path,
    smtpd: Any = None,
    folders: list[str] | None = None,
    imap: dict[str, Any] | None = None,
    smtp: dict[str, Any] | None = None,
) -> AccountSettings:
    """One more account on the test servers (the SMTP login is the IMAP user's unless given)."""
    im: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": dovecot.port,
        "username": user.name,
        "password": user.password,
        "ca_file": ca_file,
        "poll_interval": 0.5,
    }
    im.update(imap or {})
    sm: dict[str, Any] = {"host": "127.0.0.1", "port": smtpd.port if smtpd else 1}
    sm["ca_file"] = ca_file
    sm.update(smtp or {})
    return AccountSettings(
        name=name, folders=folders or [], imap=ImapSettings(**im), smtp=SmtpSettings(**sm)
    )


@dataclass
class RunningBridge:
    """A bridge running in this event loop; stop() ends it like SIGTERM does."""

    settings: Settings
    task: asyncio.Task[None]
    stop_event: asyncio.Event
    checked: asyncio.Event

    async def ready(self, timeout: float = 15.0) -> None:
        """Wait until the watcher has completed a mailbox check (it is connected and current)."""
        await asyncio.wait_for(self.checked.wait(), timeout)

    async def stop(self) -> None:
        """Ask it to stop and wait (bounded) for a clean exit."""
        self.stop_event.set()
        await asyncio.wait_for(self.task, 20)


@contextlib.asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[RunningBridge]:
    """Run the bridge for the duration of the block."""
    stop, checked = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(app.run(settings, stop, checked))
    bridge = RunningBridge(settings, task, stop, checked)
    try:
        yield bridge
    finally:
        if not task.done():
            await bridge.stop()
        else:
            task.result()  # surface a crash


@pytest.fixture
def settings_for(tmp_path: Path, dovecot: Any, mail_user: Any, botapi: Any, ca: Any):
    """make_settings bound to this test's servers and user."""

    def build(**kw: Any) -> Settings:
        kw.setdefault("dovecot", dovecot)
        kw.setdefault("user", mail_user)
        kw.setdefault("botapi", botapi)
        kw.setdefault("ca_file", Path(ca.ca_file))
        return make_settings(tmp_path, **kw)

    return build


WORK_SENDER = "Work Desk <desk@work.example>"


@pytest.fixture
def work_user(dovecot, mail_user) -> MailUser:
    """A second mailbox on the session Dovecot, for the account `work`."""
    user = MailUser(f"{mail_user.name}-work", secrets.token_urlsafe(12))
    dovecot.add_user(user.name, user.password)
    SECRETS.add(user.password)
    return user


@pytest.fixture
def work_smtpd(ca):
    """A second SMTP server with its own login: what arrives here left through `work`."""
    with SmtpServer(ca, username="desk@work.example") as server:
        SECRETS.add(server.password)
        yield server


@pytest.fixture
def two_accounts(settings_for, dovecot, ca, mail_user, smtpd, work_user, work_smtpd):
    """Settings with the accounts `home` (mail_user, smtpd) and `work` (work_user, work_smtpd)."""

    def build(**kw):
        ca_file = Path(ca.ca_file)
        home = make_account(
            "home",
            dovecot=dovecot,
            user=mail_user,
            ca_file=ca_file,
            smtpd=smtpd,
            imap={"save_sent": False},
            smtp={"username": smtpd.username, "password": smtpd.password},
        )
        work = make_account(
            "work",
            dovecot=dovecot,
            user=work_user,
            ca_file=ca_file,
            smtpd=work_smtpd,
            imap={"save_sent": False},
            smtp={
                "username": work_smtpd.username,
                "password": work_smtpd.password,
                "from_address": WORK_SENDER,
            },
        )
        return settings_for(accounts=[home, work], **kw)

    return build
