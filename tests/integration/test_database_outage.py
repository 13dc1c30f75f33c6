"""PostgreSQL stops answering for 10 s under a running bridge (the default lease of 30 s).

A `/send` written during the outage is held back, not confirmed, and mailed once the database
is back; a mail that arrives meanwhile is posted afterwards; the watcher keeps its IMAP
connection through it all. The database is reached through a TcpProxy that refuses new
connections and cuts the open ones: what a restart or a lost route looks like to the bridge.
"""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
from sqlalchemy.engine import make_url

from tests.integration.chat import answer_containing, mail, texts, times_posted, wait_mails
from tests.integration.conftest import OWNER, running
from tests.servers.tcpproxy import TcpProxy

OUTAGE = 10.0  # seconds the database is unreachable


@pytest.mark.databases("postgresql")
async def test_database_outage_holds_the_update_back_and_keeps_imap(
    database_url, settings_for, dovecot, mail_user, botapi, smtpd, caplog
) -> None:
    caplog.set_level(logging.INFO, logger="bridge")
    url = make_url(database_url)
    async with (
        TcpProxy(url.host or "127.0.0.1", url.port or 5432) as database,
        TcpProxy(dovecot.host, dovecot.port) as imap,
    ):
        proxied = url.set(host="127.0.0.1", port=database.port)
        settings = settings_for(
            smtpd=smtpd,
            database_url=proxied.render_as_string(hide_password=False),
            imap={"port": imap.port, "save_sent": False},  # only the watcher talks IMAP
        )
        async with running(settings) as bridge:
            await bridge.ready()
            dovecot.append(mail_user.name, mail_user.password, mail("Before the outage"))
            await wait_mails(botapi, ["Before the outage"])
            await imap.quiet()
            connections = imap.accepted

            database.refuse()
            database.cut()
            down = time.monotonic()
            botapi.send_user_message(
                OWNER, OWNER, "/send ann@example.org During\nWritten while the database was away."
            )
            dovecot.append(mail_user.name, mail_user.password, mail("Arrived during the outage"))
            told = await answer_containing(botapi, "database is not answering", timeout=OUTAGE)
            # The fault lasts OUTAGE seconds whatever the bridge does: this wait is the fault.
            await asyncio.sleep(max(0.0, OUTAGE - (time.monotonic() - down)))
            assert smtpd.received == []  # nothing could be queued: nothing went out
            database.refuse(False)

            received = await smtpd.next_message(timeout=30)
            await answer_containing(botapi, "Sent to ann@example.org", timeout=30)
            await wait_mails(botapi, ["Arrived during the outage"], timeout=30)
        assert imap.accepted == connections, "the watcher reconnected to IMAP during the outage"
        assert imap.cuts == 0
    assert received.message()["Subject"] == "During"
    assert len(smtpd.received) == 1
    assert times_posted(botapi, "Arrived during the outage") == 1
    assert times_posted(botapi, "Before the outage") == 1
    assert "I will do this as soon as it is back" in told
    chat = texts(botapi, OWNER)
    assert sum("database is not answering" in text for text in chat) == 1  # told once
    assert not any("Something went wrong" in text for text in chat)
    reconnects = [r for r in caplog.records if "retrying with backoff" in r.getMessage()]
    assert reconnects == []
