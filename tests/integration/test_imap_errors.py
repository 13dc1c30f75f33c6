"""What comes out of an IMAP call: a network or protocol failure as a MailError (the caller
reconnects, or tells the chat), a bug of ours as it is: the service ends with one line, or a
button's job fails with its traceback logged. A bug never becomes a reconnect loop."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from imapclient import IMAPClient
from imapclient.exceptions import IMAPClientError

from bridge import app, metrics
from bridge.errors import BridgeError, TemporaryMailError
from bridge.mail import imap
from bridge.mail.imap import ImapSession, MailConnection, with_connection
from tests.integration.chat import (
    accepted,
    answer_containing,
    buttons,
    carried,
    mail,
    visible,
    wait_mails,
)
from tests.integration.conftest import OWNER, running

CRASH_BOUND = 15.0  # seconds from the bug to the end of the service

# Mistakes our code could make with a live client: each talks to the server, then fails.
BUGS: dict[type[Exception], Callable[[IMAPClient], Any]] = {
    TypeError: lambda client: client.list_folders() + 1,
    AttributeError: lambda client: client.folder_status("INBOX").uidnext,
    KeyError: lambda client: client.select_folder("INBOX", readonly=True)[b"NO-SUCH-KEY"],
}


@pytest.fixture
async def session(settings_for) -> AsyncIterator[ImapSession]:
    """A watcher's kind of session, connected to the test user's INBOX."""
    connected = ImapSession(settings_for().accounts[0].imap)
    await connected.connect()
    try:
        yield connected
    finally:
        await connected.close()


@pytest.mark.parametrize("kind", list(BUGS))
async def test_a_bug_inside_a_session_call_comes_out_as_it_is(session, kind) -> None:
    with pytest.raises(kind):
        await session._call(BUGS[kind], session.client)
    await session.noop()  # not taken for an outage: the connection was kept


async def test_a_protocol_error_inside_a_session_call_is_a_temporary_mail_error(session) -> None:
    # The server answers NO: imaplib raises IMAP4.error (imapclient's IMAPClientError).
    with pytest.raises(TemporaryMailError, match="IMAP connection failed") as caught:
        await session._call(session.client.select_folder, "No such folder", True)
    assert isinstance(caught.value.__cause__, IMAPClientError)
    with pytest.raises(TemporaryMailError, match="not connected"):
        session.client  # noqa: B018 - dropped: the watcher connects again


async def test_a_network_error_inside_a_session_call_is_a_temporary_mail_error(session) -> None:
    session.client.socket().shutdown(socket.SHUT_RDWR)
    with pytest.raises(TemporaryMailError) as caught:
        await session.noop()
    assert isinstance(caught.value.__cause__, OSError | IMAPClientError | EOFError)


async def test_a_bug_in_work_on_a_fresh_connection_comes_out_as_it_is(settings_for) -> None:
    settings = settings_for().accounts[0].imap

    def buggy(connection: MailConnection) -> Any:
        return BUGS[TypeError](connection.client)

    def refused(connection: MailConnection) -> Any:
        return connection.client.select_folder("No such folder", readonly=True)

    with pytest.raises(TypeError):
        await with_connection(settings, buggy)
    with pytest.raises(TemporaryMailError):
        await with_connection(settings, refused)


async def test_a_bug_in_the_watcher_ends_the_service_with_one_line(
    settings_for, dovecot, mail_user, monkeypatch
) -> None:
    reconnects = metrics.IMAP_RECONNECTS.labels(account="default")
    before = reconnects._value.get()

    def buggy_fetch(client: IMAPClient, uids: list[int]) -> Any:
        return client.fetch(uids, ["FLAGS"])[uids[0]][b"NO-SUCH-ITEM"]

    stop, checked = asyncio.Event(), asyncio.Event()
    service = asyncio.create_task(app.run(settings_for(), stop, checked))
    try:
        await asyncio.wait_for(checked.wait(), 15)
        monkeypatch.setattr(imap, "_fetch_summaries", buggy_fetch)
        dovecot.append(mail_user.name, mail_user.password, mail("Meets a bug"))
        done, _ = await asyncio.wait([service], timeout=CRASH_BOUND)
    finally:
        stop.set()
        await asyncio.wait([service], timeout=20)
    assert done, f"still running {CRASH_BOUND} s after the bug"
    with pytest.raises(BridgeError) as crashed:
        service.result()
    line = str(crashed.value)
    assert line.startswith("crashed in FolderWatcher.run, at bridge/mail/imap.py:"), line
    assert "KeyError: b'NO-SUCH-ITEM'" in line
    assert reconnects._value.get() == before  # no reconnect: a bug is not an outage


async def test_a_bug_in_a_button_action_fails_that_job_only(
    settings_for, dovecot, mail_user, botapi, monkeypatch, caplog
) -> None:
    def buggy_set_flag(self: MailConnection, uid: int, flag: bytes, on: bool) -> None:
        BUGS[TypeError](self.client)

    monkeypatch.setattr(MailConnection, "set_flag", buggy_set_flag)
    caplog.set_level(logging.ERROR, logger="bridge.jobs")
    async with running(settings_for()) as bridge:
        await bridge.ready()
        dovecot.append(mail_user.name, mail_user.password, mail("Press me"))
        await wait_mails(botapi, ["Press me"])
        (summary,) = [c for c in accepted(botapi) if carried(visible(c))[1] == ["Press me"]]
        (read,) = [data for label, data in buttons(summary) if "Mark read" in label]
        botapi.press_button(OWNER, OWNER, int(summary.result["message_id"]), read)
        answer = await answer_containing(botapi, "⚠️")
        # The service goes on: the next mail is posted.
        dovecot.append(mail_user.name, mail_user.password, mail("After the bug"))
        await wait_mails(botapi, ["After the bug"])
    assert answer == "⚠️ That did not work; the bridge's log has the details."
    failed = [r for r in caplog.records if r.getMessage().endswith("(read) failed")]
    assert len(failed) == 1
    # The traceback is logged (as text: the secret filter formats it to mask it).
    traceback = failed[0].exc_text or ""
    assert "TypeError: can only concatenate list" in traceback, traceback


async def test_mail_reported_during_a_fetch_is_looked_for_before_idling(
    session, dovecot, mail_user
) -> None:
    # Dovecot reports a mail that arrives after the watcher's SEARCH as "* N EXISTS" in the
    # answer to its FETCH; no later NOOP or IDLE reports it again. Lost, it would wait for the
    # folder's next change or the IDLE renewal (9 minutes).
    first = dovecot.append(mail_user.name, mail_user.password, mail("One"))
    async with asyncio.timeout(10):  # the session sees it once Dovecot told it (~0.5 s)
        while await session.uids_after(0) != [first]:
            pass
    session._changed = False  # the watcher would check now; what follows is the case
    dovecot.append(mail_user.name, mail_user.password, mail("Two, during the fetch"))
    async with asyncio.timeout(10):  # Dovecot notices the new mail within about 0.5 s
        while not session._changed:
            await session.fetch([first])
    assert await session.idle_wait(asyncio.Event(), renew_after=3) is True
