"""Several `mailbridge run` processes on one database: the work shared between them, each mail
posted once, each outbox item sent once, one Telegram poller, and a dead instance's work taken
over within the lease."""

from __future__ import annotations

import asyncio
import secrets
import time

import httpx
import pytest

from tests.conftest import SECRETS
from tests.integration.chat import answer_containing, mail, times_posted, wait_mails
from tests.integration.conftest import OWNER, running
from tests.integration.processes import base_env, start
from tests.servers.dovecot import free_port

LEASE = 3  # BRIDGE_LEASE_SECONDS in these tests


def env_for(database_url: str, dovecot, user, ca, botapi, smtpd) -> dict[str, str]:
    """Every instance gets the same settings: one database, one mailbox, one bot."""
    return base_env(
        BRIDGE_DATABASE_URL=database_url,
        BRIDGE_LEASE_SECONDS=str(LEASE),
        BRIDGE_LOG_LEVEL="INFO",
        BRIDGE_TELEGRAM__TOKEN=botapi.token,
        BRIDGE_TELEGRAM__API_URL=botapi.url,
        BRIDGE_TELEGRAM__ALLOWED_USER_IDS=f"[{OWNER}]",
        BRIDGE_TELEGRAM__CHAT_INTERVAL="0",
        BRIDGE_IMAP__HOST="127.0.0.1",
        BRIDGE_IMAP__PORT=str(dovecot.port),
        BRIDGE_IMAP__USERNAME=user.name,
        BRIDGE_IMAP__PASSWORD=user.password,
        BRIDGE_IMAP__CA_FILE=str(ca.ca_file),
        BRIDGE_IMAP__POLL_INTERVAL="0.5",
        BRIDGE_SMTP__HOST="127.0.0.1",
        BRIDGE_SMTP__PORT=str(smtpd.port),
        BRIDGE_SMTP__USERNAME=smtpd.username,
        BRIDGE_SMTP__PASSWORD=smtpd.password,
        BRIDGE_SMTP__SECURITY=smtpd.tls,
        BRIDGE_SMTP__CA_FILE=str(ca.ca_file),
    )


def conflicts(botapi) -> int:
    """getUpdates answered 409: two instances polling at once."""
    return sum(1 for call in botapi.calls("getUpdates") if call.status == 409)


@pytest.mark.databases("postgresql", "sqlite")
async def test_two_instances_share_one_database_and_take_over(
    tmp_path, database_url, dovecot, mail_user, ca, botapi, smtpd
) -> None:
    env = env_for(database_url, dovecot, mail_user, ca, botapi, smtpd)
    first = await start(env)
    second = None
    try:
        await first.wait_line(r"took lease folder:default/INBOX")
        await first.wait_line(r"took lease telegram:updates")
        await first.wait_line(r"first contact with default/INBOX")
        second = await start(env)
        await second.wait_line(r"mailbridge running")
        # Two pieces of work, two instances: one each. The first keeps polling Telegram (the
        # work added first moves least) and hands the folder over.
        await first.wait_line(r"handing lease folder:default/INBOX over \(2 instances")
        await second.wait_line(r"took lease folder:default/INBOX")
        # Two instances, one mailbox: every mail once, and one outbox item sent once.
        subjects = [f"Shared {n}" for n in range(4)]
        for subject in subjects:
            dovecot.append(mail_user.name, mail_user.password, mail(subject))
        await wait_mails(botapi, subjects)
        botapi.send_user_message(OWNER, OWNER, "/send ann@example.org Once\nOnly once.")
        await answer_containing(botapi, "Sent to")
        assert not any("took lease telegram:updates" in line for line in second.lines)
        both_alive_conflicts = conflicts(botapi)
        # The instance polling Telegram dies without a word; within the lease the other one
        # polls Telegram and sends the outbox, and still watches the folder.
        first.kill()
        killed = time.monotonic()
        dovecot.append(mail_user.name, mail_user.password, mail("After the crash"))
        try:
            await second.wait_line(r"took lease telegram:updates", timeout=LEASE * 4)
            took_over = time.monotonic() - killed
            await wait_mails(botapi, ["After the crash"], timeout=LEASE * 4)
        except (AssertionError, TimeoutError) as exc:
            survivor = "\n".join(second.lines)
            raise AssertionError(f"{exc}; the survivor logged:\n{survivor}") from None
        botapi.send_user_message(OWNER, OWNER, "/send bob@example.org Later\nStill works.")
        await answer_containing(botapi, "Sent to bob@example.org", timeout=LEASE * 4)
        assert await second.stop() == 0
    finally:
        first.kill()
        if second is not None:
            second.kill()
    for subject in [*subjects, "After the crash"]:
        assert times_posted(botapi, subject) == 1, subject
    assert sorted(m.rcpt_tos[0] for m in smtpd.received) == ["ann@example.org", "bob@example.org"]
    assert both_alive_conflicts == 0  # one poller while both ran, also across the handover
    assert conflicts(botapi) <= 1  # at most the dead instance's open getUpdates
    assert took_over < LEASE * 2 + 2, f"took {took_over:.1f} s to take over"


@pytest.mark.databases("postgresql", "sqlite")
async def test_instances_started_together_migrate_once(
    tmp_path, database_url, dovecot, mail_user, ca, botapi, smtpd
) -> None:
    env = env_for(database_url, dovecot, mail_user, ca, botapi, smtpd)
    instances = await asyncio.gather(*(start(env) for _ in range(3)))
    try:
        for instance in instances:
            await instance.wait_line(r"mailbridge running", timeout=40)
        statuses = await asyncio.gather(*(i.stop() for i in instances))
    finally:
        for instance in instances:
            instance.kill()
    assert statuses == [0, 0, 0]
    assert not any("Traceback" in line for i in instances for line in i.lines)


async def test_webhook_mode_every_instance_takes_updates_each_handled_once(
    tmp_path, settings_for, botapi
) -> None:
    secret = secrets.token_urlsafe(24)
    SECRETS.add(secret)
    ports = [free_port(), free_port()]
    instances = [
        settings_for(
            telegram={
                "webhook_url": "https://bridge.example.org/telegram",
                "webhook_listen": f"127.0.0.1:{port}",
                "webhook_secret": secret,
            }
        )
        for port in ports
    ]
    # One after the other: two bridges in one process would share Alembic's module state.
    async with running(instances[0]) as first:
        await first.ready()
        async with running(instances[1]) as second:
            await second.ready()
            assert botapi.webhook == {
                "url": "https://bridge.example.org/telegram",
                "secret_token": secret,
            }
            botapi.send_user_message(OWNER, OWNER, "/help")
            (update,) = botapi.pop_updates()
            async with httpx.AsyncClient(timeout=20) as client:

                async def post(port: int, token: str) -> int:
                    headers = {"X-Telegram-Bot-Api-Secret-Token": token}
                    url = f"http://127.0.0.1:{port}/telegram"
                    return (await client.post(url, json=update, headers=headers)).status_code

                assert await post(ports[0], "wrong") == 403
                # The load balancer (or Telegram, retrying) hands the same update to both: one
                # handles it, the other says 200 (done) or 503 (busy: Telegram asks again).
                both = await asyncio.gather(post(ports[0], secret), post(ports[1], secret))
                assert sorted(both) in ([200, 200], [200, 503])
                assert await post(ports[1], secret) == 200  # later again: still handled once
    answers = [c for c in botapi.calls("sendMessage", ok_only=True) if "Commands" in str(c.params)]
    assert len(answers) == 1
    assert botapi.calls("getUpdates") == []
