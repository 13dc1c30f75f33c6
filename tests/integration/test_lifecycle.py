"""How `mailbridge run` starts and ends (a real subprocess): start-up calls are retried, a
refused token ends it with exit 2, a crash with exit 1, each with one line that says why."""

from __future__ import annotations

import asyncio
import json
import socket
import time

from tests.integration.chat import mail, next_text, times_posted, wait_mails
from tests.integration.conftest import OWNER
from tests.integration.processes import make_env, one_line_error, service

EXIT_BOUND = 15.0  # seconds from the cause to the exit
FLOOD_WAIT = 60  # seconds a 429 asks for: far longer than a stop may take
STOP_BOUND = 5.0  # seconds from SIGTERM to the exit


async def exit_code(svc, bound: float = EXIT_BOUND) -> int:
    """Wait (bounded) for the process to end by itself; its exit status."""
    try:
        code = await asyncio.wait_for(svc.proc.wait(), bound)
    except TimeoutError:
        raise AssertionError(f"still running after {bound} s:\n{svc.stderr}") from None
    await asyncio.wait_for(svc._reader, 5)
    return code


async def test_transient_errors_at_start_are_retried_and_logs_are_json(
    tmp_path, dovecot, mail_user, ca, botapi
) -> None:
    for method in ("getMe", "setMyCommands", "deleteWebhook"):
        botapi.fail(method, 502, count=2)
    env = make_env(dovecot=dovecot, user=mail_user, ca=ca, botapi=botapi, BRIDGE_LOG_FORMAT="json")
    async with service(env, tmp_path) as svc:
        await svc.wait_for_line("first contact with")
        dovecot.append(mail_user.name, mail_user.password, mail("After two 502s"))
        assert "After two 502s" in await next_text(botapi, timeout=20)
        botapi.send_user_message(OWNER, OWNER, "/help")  # the poller runs
        assert "/status" in await next_text(botapi, timeout=20)
        assert await svc.terminate() == 0
    for method in ("getMe", "setMyCommands", "deleteWebhook"):
        statuses = [call.status for call in botapi.calls(method)]
        assert statuses[:3] == [502, 502, 200], (method, statuses)
    assert botapi.commands()  # the command menu was set after all
    lines = [json.loads(line) for line in svc.lines]  # every line is one JSON object
    warnings = [line["message"] for line in lines if line["level"] == "WARNING"]
    for method in ("getMe", "setMyCommands", "deleteWebhook"):
        assert sum(m.startswith(f"{method} failed") for m in warnings) == 1, warnings
    started = [line for line in lines if line["message"].startswith("first contact with")]
    assert (started[0]["account"], started[0]["folder"]) == ("default", "INBOX")
    for secret in (botapi.token, mail_user.password):
        assert secret not in svc.stderr


async def test_a_token_revoked_while_running_exits_2_with_one_line(
    tmp_path, dovecot, mail_user, ca, botapi
) -> None:
    env = make_env(dovecot=dovecot, user=mail_user, ca=ca, botapi=botapi)
    async with service(env, tmp_path) as svc:
        await svc.wait_for_line("first contact with")
        botapi.fail("*", 401, count=1_000_000, description="Unauthorized")
        dovecot.append(mail_user.name, mail_user.password, mail("Nowhere to go"))
        code = await exit_code(svc)
    assert code == 2, svc.stderr
    line = one_line_error(svc.stderr)
    assert line.startswith("mailbridge: configuration error: Telegram refused the bot token")
    assert botapi.token not in svc.stderr


async def test_a_token_revoked_while_idle_exits_2_at_the_next_long_poll(
    tmp_path, dovecot, mail_user, ca, botapi
) -> None:
    env = make_env(dovecot=dovecot, user=mail_user, ca=ca, botapi=botapi)
    async with service(env, tmp_path) as svc:
        await svc.wait_for_line("mailbridge running")
        await botapi.next_call("getUpdates", timeout=EXIT_BOUND)
        botapi.fail("*", 401, count=1_000_000, description="Unauthorized")
        # The long poll in flight ends after at most LONG_POLL (10 s); the next one is refused.
        code = await exit_code(svc)
    assert code == 2, svc.stderr
    assert "refused the bot token" in one_line_error(svc.stderr)


async def test_a_token_refused_at_start_exits_2_with_one_line(
    tmp_path, dovecot, mail_user, ca, botapi
) -> None:
    botapi.fail("*", 401, count=1_000_000, description="Unauthorized")
    env = make_env(dovecot=dovecot, user=mail_user, ca=ca, botapi=botapi)
    async with service(env, tmp_path) as svc:
        code = await exit_code(svc, EXIT_BOUND + 10)
    assert code == 2, svc.stderr
    assert "refused the bot token" in one_line_error(svc.stderr)
    assert [call.method for call in botapi.calls()] == ["getMe"]  # no retry in a loop


async def test_a_crash_in_a_task_exits_1_with_one_line_naming_it(
    tmp_path, dovecot, mail_user, ca, botapi
) -> None:
    env = make_env(dovecot=dovecot, user=mail_user, ca=ca, botapi=botapi)
    async with service(env, tmp_path) as svc:
        await svc.wait_for_line("mailbridge running")
        await botapi.next_call("getUpdates", timeout=EXIT_BOUND)
        # An answer without "result" breaks PTB's parsing (KeyError): a bug, not an outage.
        botapi.fail("getUpdates", 200, description="garbled")
        botapi.send_user_message(OWNER, OWNER, "/help")  # ends the long poll in flight
        code = await exit_code(svc)
    assert code == 1, svc.stderr
    line = one_line_error(svc.stderr)
    assert line.startswith("mailbridge: crashed in poll, at bridge/telegram/polling.py:"), line
    assert "KeyError: 'result'" in line
    assert "RuntimeError" not in svc.stderr


async def test_a_busy_http_port_exits_1_with_one_line(
    tmp_path, dovecot, mail_user, ca, botapi
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        listen = f"127.0.0.1:{taken.getsockname()[1]}"
        env = make_env(
            dovecot=dovecot, user=mail_user, ca=ca, botapi=botapi, BRIDGE_HTTP__LISTEN=listen
        )
        async with service(env, tmp_path) as svc:
            code = await exit_code(svc, EXIT_BOUND + 10)
    assert code == 1, svc.stderr
    line = one_line_error(svc.stderr)
    assert line.startswith(f"mailbridge: BRIDGE_HTTP__LISTEN: cannot listen on {listen}"), line


async def test_sigterm_during_a_flood_wait_ends_at_once_and_the_mail_waits(
    tmp_path, dovecot, mail_user, ca, botapi
) -> None:
    env = make_env(dovecot=dovecot, user=mail_user, ca=ca, botapi=botapi)
    async with service(env, tmp_path) as svc:
        await svc.wait_for_line("first contact with")
        botapi.fail("sendMessage", 429, retry_after=FLOOD_WAIT)
        dovecot.append(mail_user.name, mail_user.password, mail("Behind a flood wait"))
        refused = await botapi.next_call("sendMessage", timeout=EXIT_BOUND)
        assert refused.status == 429
        started = time.monotonic()
        assert await svc.terminate(timeout=FLOOD_WAIT / 2) == 0
        took = time.monotonic() - started
    assert took < STOP_BOUND, f"SIGTERM took {took:.1f} s during a {FLOOD_WAIT} s flood wait"
    assert "Traceback" not in svc.stderr  # PTB's limiter logs each 429 with one: kept quiet
    assert not botapi.calls("sendMessage", ok_only=True)
    async with service(env, tmp_path) as svc:  # the mail waited in the database
        await wait_mails(botapi, ["Behind a flood wait"], timeout=EXIT_BOUND)
        assert await svc.terminate() == 0
    assert times_posted(botapi, "Behind a flood wait") == 1
