"""smtp.py against a real aiosmtpd server on loopback: TLS modes, AUTH, and error mapping."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bridge.config import SmtpSettings
from bridge.errors import PermanentMailError, TemporaryMailError
from bridge.mail.compose import (
    OutgoingAttachment,
    OutgoingMail,
    build_message,
    envelope_recipients,
)
from bridge.mail.smtp import check_login, send
from tests.servers.dovecot import free_port

SENDER = "Mail Bridge <bridge@example.org>"
TLS_MODES = [
    pytest.param("ssl", id="ssl"),
    pytest.param("starttls", marks=pytest.mark.smtpd(tls="starttls"), id="starttls"),
]


def smtp_settings(server: Any, ca: Any, **overrides: Any) -> SmtpSettings:
    """Settings for `server`, every field given so no BRIDGE_SMTP__* variable leaks in."""
    values: dict[str, Any] = {
        "host": server.host,
        "port": server.port,
        "security": server.tls,
        "username": server.username,
        "password": server.password,
        "from_address": SENDER,
        "ca_file": Path(ca.ca_file),
        "timeout": 5.0,
    }
    values.update(overrides)
    return SmtpSettings(**values)


def outgoing(**kwargs: Any) -> OutgoingMail:
    fields: dict[str, Any] = {
        "to": ("Jörg Müller <joerg@example.org>",),
        "subject": "Grüße – 你好 – Привет 🎉",
        "body": "Hallo Jörg,\n\nこんにちは、世界。\nمرحبا\n" + "long " * 400 + "\n",
    }
    fields.update(kwargs)
    return OutgoingMail(**fields)


@pytest.mark.parametrize("tls", TLS_MODES)
async def test_send_delivers_exactly_to_the_recipients(smtpd: Any, ca: Any, tls: str) -> None:
    assert smtpd.tls == tls
    settings = smtp_settings(smtpd, ca)
    mail = outgoing(
        cc=("carol@example.net",),
        bcc=("Hidden <hidden@example.com>",),
        attachments=(OutgoingAttachment("Übersicht 测试.txt", "", "Inhalt ä\n".encode()),),
    )
    message = build_message(mail, settings.sender, message_id="<send-test@example.org>")

    answer = await send(message, envelope_recipients(mail), settings)

    assert answer.startswith("250 ")
    assert "queued" in answer
    received = await smtpd.next_message()
    assert received.mail_from == "bridge@example.org"
    assert received.rcpt_tos == ["joerg@example.org", "carol@example.net", "hidden@example.com"]
    assert received.login == smtpd.username
    got = received.message()
    assert got["Subject"] == mail.subject
    assert got["Message-ID"] == "<send-test@example.org>"
    assert got["Bcc"] is None
    assert b"hidden" not in received.data.lower()
    assert [a.addr_spec for a in got["To"].addresses] == ["joerg@example.org"]
    assert got["To"].addresses[0].display_name == "Jörg Müller"
    body = got.get_body(preferencelist=("plain",))
    assert body.get_content().replace("\r\n", "\n") == mail.body
    (attachment,) = got.iter_attachments()
    assert attachment.get_filename() == "Übersicht 测试.txt"
    assert attachment.get_payload(decode=True) == "Inhalt ä\n".encode()


@pytest.mark.parametrize("tls", TLS_MODES)
async def test_check_login_returns_greeting(smtpd: Any, ca: Any, tls: str) -> None:
    greeting = await check_login(smtp_settings(smtpd, ca))
    assert greeting.startswith("220 ")
    assert "\n" not in greeting


@pytest.mark.parametrize("tls", TLS_MODES)
async def test_wrong_password_is_permanent_and_not_shown(smtpd: Any, ca: Any, tls: str) -> None:
    wrong = "Wr0ng-Pa55-word"
    settings = smtp_settings(smtpd, ca, password=wrong)
    mail = outgoing()
    message = build_message(mail, settings.sender, message_id="<wrong-pw@example.org>")

    with pytest.raises(PermanentMailError) as info:
        await send(message, envelope_recipients(mail), settings)
    text = str(info.value)
    assert "535" in text
    assert "login" in text
    assert wrong not in text
    assert smtpd.password not in text
    assert "\n" not in text

    with pytest.raises(PermanentMailError) as info:
        await check_login(settings)
    assert wrong not in str(info.value)


async def test_451_on_data_is_temporary(smtpd: Any, ca: Any) -> None:
    settings = smtp_settings(smtpd, ca)
    mail = outgoing()
    message = build_message(mail, settings.sender, message_id="<t451@example.org>")
    smtpd.fail_next(451, "4.3.0 Try again later")

    with pytest.raises(TemporaryMailError, match=r"451 4\.3\.0 Try again later"):
        await send(message, envelope_recipients(mail), settings)

    # The next attempt goes through: the fault was transient.
    await send(message, envelope_recipients(mail), settings)
    received = await smtpd.next_message()
    assert received.message()["Message-ID"] == "<t451@example.org>"


async def test_550_on_data_is_permanent(smtpd: Any, ca: Any) -> None:
    settings = smtp_settings(smtpd, ca)
    mail = outgoing()
    message = build_message(mail, settings.sender, message_id="<p550@example.org>")
    smtpd.fail_next(550, "5.7.1 Message rejected as spam")

    with pytest.raises(PermanentMailError, match=r"550 5\.7\.1 Message rejected as spam"):
        await send(message, envelope_recipients(mail), settings)


async def test_451_on_every_recipient_is_temporary(smtpd: Any, ca: Any) -> None:
    settings = smtp_settings(smtpd, ca)
    mail = outgoing()
    message = build_message(mail, settings.sender, message_id="<rcpt451@example.org>")
    smtpd.fail_next(451, "4.7.1 Greylisted", command="RCPT")

    with pytest.raises(TemporaryMailError, match=r"joerg@example\.org.*451 4\.7\.1 Greylisted"):
        await send(message, envelope_recipients(mail), settings)


async def test_550_sender_refused_is_permanent(smtpd: Any, ca: Any) -> None:
    settings = smtp_settings(smtpd, ca)
    mail = outgoing()
    message = build_message(mail, settings.sender, message_id="<mail550@example.org>")
    smtpd.fail_next(553, "5.7.1 Sender not owned by user", command="MAIL")

    with pytest.raises(PermanentMailError, match=r"sender.*553 5\.7\.1"):
        await send(message, envelope_recipients(mail), settings)


async def test_some_recipients_refused_still_delivers_and_says_so(smtpd: Any, ca: Any) -> None:
    settings = smtp_settings(smtpd, ca)
    mail = outgoing(to=("gone@example.org", "here@example.org"))
    message = build_message(mail, settings.sender, message_id="<partial@example.org>")
    smtpd.fail_next(550, "5.1.1 No such user", command="RCPT")

    answer = await send(message, envelope_recipients(mail), settings)

    assert answer.startswith("250 ")
    assert "refused: gone@example.org (550 5.1.1 No such user)" in answer
    received = await smtpd.next_message()
    assert received.rcpt_tos == ["here@example.org"]


async def test_server_down_is_temporary(ca: Any, smtpd: Any) -> None:
    settings = smtp_settings(smtpd, ca, port=free_port())
    mail = outgoing()
    message = build_message(mail, settings.sender, message_id="<down@example.org>")

    with pytest.raises(TemporaryMailError, match=r"127\.0\.0\.1"):
        await send(message, envelope_recipients(mail), settings)
    with pytest.raises(TemporaryMailError):
        await check_login(settings)


@pytest.mark.parametrize("tls", TLS_MODES)
async def test_untrusted_certificate_is_permanent(smtpd: Any, ca: Any, tls: str) -> None:
    # No CA file: the system store does not know the test CA, so the server is not trusted.
    settings = smtp_settings(smtpd, ca, ca_file=None)
    mail = outgoing()
    message = build_message(mail, settings.sender, message_id="<cert@example.org>")

    with pytest.raises(PermanentMailError, match="certificate verification failed"):
        await send(message, envelope_recipients(mail), settings)
    with pytest.raises(PermanentMailError, match="certificate verification failed"):
        await check_login(settings)
    assert smtpd.received == [] or all(
        r.message()["Message-ID"] != "<cert@example.org>" for r in smtpd.received
    )


@pytest.mark.smtpd(tls="starttls")
async def test_ssl_setting_against_starttls_server_is_permanent(smtpd: Any, ca: Any) -> None:
    # A TLS handshake against a plain-text greeting: a setting problem no retry will fix.
    settings = smtp_settings(smtpd, ca, security="ssl")

    with pytest.raises(PermanentMailError, match="TLS handshake failed"):
        await check_login(settings)
