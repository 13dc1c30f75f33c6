"""Mail to chat against real Dovecot and the fake Bot API: posted once, never \\Seen, no loss."""

from __future__ import annotations

from email.message import EmailMessage
from pathlib import Path

import pytest

from tests.integration.chat import (
    mail,
    next_text,
    received_subjects,
    texts,
    times_posted,
    wait_mails,
)
from tests.integration.conftest import OWNER, running

SAMPLES = Path(__file__).parent.parent / "mails"


async def test_new_mail_posted_once_old_mail_not_and_never_seen(
    settings_for, dovecot, mail_user, botapi
) -> None:
    old = dovecot.append(mail_user.name, mail_user.password, mail("Old news"))
    settings = settings_for()
    async with running(settings) as bridge:
        await bridge.ready()
        uid = dovecot.append(mail_user.name, mail_user.password, mail("Fresh news", "Body text"))
        text = await next_text(botapi)
        assert "Fresh news" in text
        assert "Ann" in text
        assert "ann@example.org" in text
        assert "Body text" in text
        call = botapi.calls("sendMessage")[-1]
        assert int(call.params["chat_id"]) == OWNER
        assert call.params["parse_mode"] == "HTML"
    assert [t for t in texts(botapi) if "news" in t] == [text]
    assert received_subjects(botapi) == ["Fresh news"]
    assert b"\\Seen" not in dovecot.flags(mail_user.name, mail_user.password, uid)
    assert b"\\Seen" not in dovecot.flags(mail_user.name, mail_user.password, old)


async def test_backfill_posts_only_the_newest_existing(settings_for, dovecot, mail_user, botapi):
    for n in range(5):
        dovecot.append(mail_user.name, mail_user.password, mail(f"Existing {n}"))
    async with running(settings_for(imap={"backfill": 2})) as bridge:
        await bridge.ready()  # checked, and what it found delivered
    # The two may come as one combined message: what counts is which mails arrived.
    assert received_subjects(botapi) == ["Existing 3", "Existing 4"]


async def test_restart_posts_nothing_twice(settings_for, dovecot, mail_user, botapi) -> None:
    settings = settings_for()
    async with running(settings) as bridge:
        await bridge.ready()
        dovecot.append(mail_user.name, mail_user.password, mail("First"))
        assert "First" in await next_text(botapi)
    dovecot.append(mail_user.name, mail_user.password, mail("While down"))
    async with running(settings) as bridge:
        # Mail that arrived while the bridge was down is posted after the restart.
        assert "While down" in await next_text(botapi)
        await bridge.ready()
        dovecot.append(mail_user.name, mail_user.password, mail("Second"))
        assert "Second" in await next_text(botapi)
    assert received_subjects(botapi) == ["First", "While down", "Second"]


@pytest.mark.parametrize("status", [502, 500])
async def test_mail_arriving_while_telegram_fails_is_posted_once_after(
    settings_for, dovecot, mail_user, botapi, status
) -> None:
    async with running(settings_for()) as bridge:
        await bridge.ready()
        botapi.fail("sendMessage", status, count=3)
        dovecot.append(mail_user.name, mail_user.password, mail("Through the outage"))
        text = await next_text(botapi, timeout=30)
        assert "Through the outage" in text
        dovecot.append(mail_user.name, mail_user.password, mail("After it"))
        await wait_mails(botapi, ["After it"])
    assert times_posted(botapi, "Through the outage") == 1
    assert received_subjects(botapi) == ["Through the outage", "After it"]


async def test_flood_limit_retry_after_is_honoured(settings_for, dovecot, mail_user, botapi):
    async with running(settings_for()) as bridge:
        await bridge.ready()
        botapi.fail("sendMessage", 429, count=1, retry_after=1)
        dovecot.append(mail_user.name, mail_user.password, mail("Slow down"))
        assert "Slow down" in await next_text(botapi, timeout=20)
    tries = [c for c in botapi.calls("sendMessage") if "Slow down" in str(c.params["text"])]
    assert [c.ok for c in tries] == [False, True]
    assert tries[1].time - tries[0].time >= 1.0  # waited retry_after before trying again


async def test_watcher_survives_a_dovecot_restart(settings_for, dovecot, mail_user, botapi):
    async with running(settings_for()) as bridge:
        await bridge.ready()
        dovecot.restart()
        dovecot.append(mail_user.name, mail_user.password, mail("After restart"))
        assert "After restart" in await next_text(botapi, timeout=40)
    assert received_subjects(botapi) == ["After restart"]


async def test_polling_when_idle_is_off(settings_for, dovecot, mail_user, botapi) -> None:
    async with running(settings_for(imap={"idle": False, "poll_interval": 0.3})) as bridge:
        await bridge.ready()
        dovecot.append(mail_user.name, mail_user.password, mail("Polled"))
        assert "Polled" in await next_text(botapi)


async def test_big_attachment_listed_without_downloading_it(
    settings_for, dovecot, mail_user, botapi
) -> None:
    msg = EmailMessage()
    msg["From"] = "scanner@example.org"
    msg["Subject"] = "Scan"
    msg.set_content("See the attached scan.")
    msg.add_attachment(
        b"\x00" * 3_000_000, maintype="application", subtype="pdf", filename="scan.pdf"
    )
    async with running(settings_for()) as bridge:
        await bridge.ready()
        uid = dovecot.append(mail_user.name, mail_user.password, bytes(msg))
        text = await next_text(botapi)
    assert "See the attached scan." in text
    assert "scan.pdf" in text
    assert "MB" in text
    assert b"\\Seen" not in dovecot.flags(mail_user.name, mail_user.password, uid)


async def test_fixture_mails_decode_the_same_over_imap(
    settings_for, dovecot, mail_user, botapi
) -> None:
    """Every hand-written fixture, delivered through Dovecot, gives a summary."""
    from bridge.mail.parse import parse_mail
    from bridge.mail.summary import render_summary

    fixtures = sorted(SAMPLES.glob("*.eml"))
    assert fixtures
    async with running(settings_for(telegram={"digest_threshold": 1000})) as bridge:
        await bridge.ready()
        for path in fixtures:
            raw = path.read_bytes()
            if len(raw) > 200_000:
                continue
            dovecot.append(mail_user.name, mail_user.password, raw)
            text = await next_text(botapi)
            expected = render_summary(parse_mail(raw))
            # The subject line is the same whether parsed locally or fetched over IMAP.
            assert text.splitlines()[0] == expected.splitlines()[0], path.name
