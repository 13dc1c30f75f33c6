"""The IMAP watcher through a faulty network: cuts, outages, a slow or silent server, bad TLS.

The bridge reaches the session Dovecot through TcpProxy (tests/servers/tcpproxy.py); mail is
appended directly to Dovecot, so delivery never depends on the broken link. Each test asserts
what the user sees: every mail posted exactly once, in order, once the link is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import AsyncIterator
from email.message import EmailMessage
from email.utils import make_msgid

import pytest

from tests.integration.chat import (
    mail,
    next_text,
    received_subjects,
    texts,
    times_posted,
    wait_for_log,
    wait_mails,
)
from tests.integration.conftest import running
from tests.servers.tcpproxy import TcpProxy


def big_mail(subject: str, size: int = 2_000_000) -> bytes:
    """A mail whose attachment makes it far larger than the prefix the watcher fetches."""
    msg = EmailMessage()
    msg["From"] = "scanner@example.org"
    msg["Subject"] = subject
    msg["Message-ID"] = make_msgid(domain="example.org")
    msg.set_content("See the attached scan.")
    # Random-looking bytes: base64 of zeros would compress if TLS ever did; it doesn't, but
    # the byte counts below should not depend on that.
    payload = bytes(i * 7919 % 251 for i in range(size))
    msg.add_attachment(payload, maintype="application", subtype="pdf", filename="scan.pdf")
    return bytes(msg)


def watcher_warnings(caplog) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "bridge.mail_to_chat" and r.levelno == logging.WARNING and "IMAP" in r.message
    ]


@pytest.fixture
async def proxy(dovecot) -> AsyncIterator[TcpProxy]:
    """A proxy in front of the session Dovecot."""
    async with TcpProxy(dovecot.host, dovecot.port) as server:
        yield server


@pytest.fixture
def via_proxy(settings_for, proxy):
    """settings_for, with the bridge's IMAP connection going through the proxy."""

    def build(imap: dict | None = None, **kw):
        return settings_for(imap={"port": proxy.port, **(imap or {})}, **kw)

    return build


@pytest.fixture
def deliver(dovecot, mail_user):
    """Append a mail straight to Dovecot (not through the proxy); returns its UID."""

    def append(raw: bytes) -> int:
        return dovecot.append(mail_user.name, mail_user.password, raw)

    return append


@pytest.fixture(autouse=True)
def _watcher_logs(caplog) -> None:
    caplog.set_level(logging.INFO, logger="bridge")


async def test_cut_while_idling_then_mail_is_posted_once(via_proxy, proxy, deliver, botapi):
    async with running(via_proxy()) as bridge:
        await bridge.ready()
        await proxy.quiet()  # in IDLE: nothing moves
        assert proxy.cut() == 1
        deliver(mail("After the cut"))
        assert "After the cut" in await next_text(botapi, timeout=15)
        await proxy.quiet()
        deliver(mail("And the next one"))
        assert "And the next one" in await next_text(botapi)
    assert proxy.accepted >= 2  # it did reconnect
    assert times_posted(botapi, "After the cut") == 1
    assert times_posted(botapi, "And the next one") == 1


async def test_cut_on_the_exists_push_still_posts_once(via_proxy, proxy, deliver, botapi):
    async with running(via_proxy()) as bridge:
        await bridge.ready()
        await proxy.quiet()
        fired = proxy.cut_on_next_server_data()
        deliver(mail("Pushed into the void"))
        await asyncio.wait_for(fired.wait(), 5)  # the EXISTS never reached the bridge
        assert "Pushed into the void" in await next_text(botapi, timeout=15)
        await proxy.quiet()
    assert times_posted(botapi, "Pushed into the void") == 1


async def test_exists_push_split_across_segments_is_not_lost(via_proxy, proxy, deliver, botapi):
    """The TLS record holding "* n EXISTS" arrives in three pieces (8 bytes, 8 more 50 ms later,
    the rest 0.5 s later: a retransmitted segment). The socket is readable but no line is
    complete; whether the watcher takes that for a dead link or not, the change must not get
    lost."""
    async with running(via_proxy()) as bridge:
        await bridge.ready()
        await proxy.quiet()
        fired = proxy.split_next_server_data((8, 0.05), (16, 0.5))
        deliver(mail("Split in two"))
        await asyncio.wait_for(fired.wait(), 5)
        assert "Split in two" in await next_text(botapi, timeout=10)
    assert proxy.accepted == 1  # no reconnect was needed
    assert times_posted(botapi, "Split in two") == 1


async def test_cut_in_the_middle_of_a_fetch(via_proxy, proxy, deliver, botapi):
    async with running(via_proxy()) as bridge:
        await bridge.ready()
        await proxy.quiet()
        before = proxy.bytes_from_server
        # The idle connection has carried the handshake and a few replies (a few KB); the
        # watcher fetches the first 256 KB of the 2 MB mail: cut 100 KB into that.
        fired = proxy.cut_after_bytes(before + 100_000)
        deliver(big_mail("Big scan"))
        await asyncio.wait_for(fired.wait(), 10)
        text = await next_text(botapi, timeout=15)
        await proxy.quiet()
    assert "Big scan" in text
    assert "scan.pdf" in text
    assert "See the attached scan." in text
    assert proxy.accepted >= 2
    assert times_posted(botapi, "Big scan") == 1
    # Twice the 256 KB prefix and the handshakes, never the 2 MB attachment.
    assert proxy.bytes_from_server < 1_000_000


async def test_network_down_for_a_while_one_warning_mail_in_order(
    via_proxy, proxy, deliver, botapi, caplog
):
    async with running(via_proxy()) as bridge:
        await bridge.ready()
        await proxy.quiet()
        proxy.refuse(True)
        proxy.cut()
        deliver(mail("Down 1"))
        deliver(mail("Down 2"))
        await asyncio.sleep(3)  # the outage's length, not a wait for something: retries fail
        assert proxy.refused >= 1
        assert received_subjects(botapi) == []
        proxy.refuse(False)
        # Found together after the outage, the two may come as one combined message.
        await wait_mails(botapi, ["Down 1", "Down 2"], timeout=15)
    assert received_subjects(botapi) == ["Down 1", "Down 2"]  # each once, in order
    # One warning for the outage, not one per failed retry.
    assert 1 <= len(watcher_warnings(caplog)) <= 2, [r.message for r in watcher_warnings(caplog)]


async def test_every_outage_is_reported(via_proxy, proxy, deliver, botapi, caplog):
    """After a recovery, the next outage is a new one and gets its own warning."""
    async with running(via_proxy()) as bridge:
        await bridge.ready()
        for n in (1, 2):
            await proxy.quiet()
            proxy.cut()
            deliver(mail(f"After outage {n}"))
            assert f"After outage {n}" in await next_text(botapi, timeout=15)
    assert received_subjects(botapi) == ["After outage 1", "After outage 2"]
    assert len(watcher_warnings(caplog)) == 2, [r.message for r in watcher_warnings(caplog)]


async def test_dovecot_stopped_for_a_few_seconds(via_proxy, proxy, dovecot, deliver, botapi):
    # Down for ~3 s, so recovery takes a few backoff steps (0.5-1 s, 1-2 s, 2-4 s). After a
    # long outage recovery is bounded by the backoff cap (MAX_BACKOFF = 60 s), not tested here.
    async with running(via_proxy()) as bridge:
        await bridge.ready()
        await proxy.quiet()
        try:
            dovecot.stop()
            # Dovecot's imap processes outlive its master (the open session keeps working), so
            # drop the open connection too, as the server's host going away would.
            proxy.cut()
            # Down until two reconnects have failed (1.5-3 s with the backoff's jitter).
            await proxy.wait_until(lambda p: p.refused >= 2)
        finally:
            dovecot.start()
        deliver(mail("Back again"))
        assert "Back again" in await next_text(botapi, timeout=20)
    assert times_posted(botapi, "Back again") == 1


async def test_slow_server(via_proxy, proxy, deliver, botapi):
    proxy.set_delay(0.3)  # every answer 0.3 s late, from the TLS handshake on
    async with running(via_proxy()) as bridge:
        await bridge.ready(timeout=30)
        deliver(mail("Slowly 1"))
        deliver(mail("Slowly 2"))
        await wait_mails(botapi, ["Slowly 1", "Slowly 2"], timeout=40)
    assert proxy.accepted == 1  # slow is not broken: no reconnect
    assert received_subjects(botapi) == ["Slowly 1", "Slowly 2"]  # each once, in order


async def test_server_stops_answering(via_proxy, proxy, deliver, botapi, caplog):
    async with running(via_proxy(imap={"timeout": 2})) as bridge:
        await bridge.ready()
        await proxy.quiet()
        # Well beyond the 2 s timeout: the EXISTS push comes 5 s late, and the answer to the
        # DONE the watcher then sends would come 5 s after that; it gives up 2 s after sending.
        # (A longer delay only makes the test slower: in IDLE the watcher sends nothing, so it
        # can only notice a silent server once it has something to say.)
        proxy.set_delay(5)
        deliver(mail("Unanswered"))
        record = await wait_for_log(
            caplog, lambda r: r.name == "bridge.mail_to_chat" and "timed out" in r.message, 20
        )
        assert record.levelno == logging.WARNING
        proxy.set_delay(0)
        assert "Unanswered" in await next_text(botapi, timeout=15)
    assert proxy.accepted >= 2
    assert times_posted(botapi, "Unanswered") == 1


async def test_unknown_ca_is_refused(settings_for, deliver, botapi, caplog):
    deliver(mail("Would be backfilled"))
    # Without the CA file the system store does not trust the test CA.
    async with running(settings_for(imap={"ca_file": None, "backfill": 1})):
        record = await wait_for_log(
            caplog, lambda r: r.name == "bridge.mail_to_chat" and r.levelno >= logging.ERROR, 10
        )
    assert "certificate" in record.message
    assert texts(botapi) == []


@pytest.fixture
async def wrong_name_server(ca) -> AsyncIterator[int]:
    """A TLS server on 127.0.0.1 with a certificate from the trusted CA for another name."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.ca.issue_cert("imap.example.net").configure_cert(context)

    async def greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            writer.write(b"* OK IMAP4rev1 ready\r\n")
            await writer.drain()
            await reader.read(1024)
        writer.close()

    server = await asyncio.start_server(greet, "127.0.0.1", 0, ssl=context)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await asyncio.wait_for(server.wait_closed(), 5)


async def test_certificate_for_another_host_is_refused(
    settings_for, wrong_name_server, botapi, caplog
):
    async with running(settings_for(imap={"port": wrong_name_server})):
        record = await wait_for_log(
            caplog, lambda r: r.name == "bridge.mail_to_chat" and r.levelno >= logging.ERROR, 10
        )
    assert "certificate" in record.message
    assert "mismatch" in record.message
    assert texts(botapi) == []
