"""Health and metrics over HTTP (BRIDGE_HTTP__LISTEN), and JSON logs, on an in-process bridge."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from bridge.config import HttpSettings, Settings
from bridge.logs import JsonFormatter, SecretFilter
from tests.integration.chat import mail, wait_for_log, wait_mails
from tests.integration.conftest import OWNER, running
from tests.servers.dovecot import free_port

BOUND = 30.0  # seconds for a reconnect after Dovecot is back (backoff starts at 1 s)
HEALTHCHECK = Path(__file__).parents[2] / "deploy" / "healthcheck.py"  # the image's HEALTHCHECK
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def with_http(settings: Settings) -> tuple[Settings, str]:
    """The settings with BRIDGE_HTTP__LISTEN on a free loopback port, and its base URL."""
    listen = f"127.0.0.1:{free_port()}"
    return dataclasses.replace(settings, http=HttpSettings(listen=listen)), f"http://{listen}"


async def health(client: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, Any]]:
    """GET /healthz: the status and the decoded body."""
    async with client.get(f"{url}/healthz") as response:
        assert response.content_type == "application/json"
        return response.status, await response.json()


async def scrape(client: aiohttp.ClientSession, url: str) -> Samples:
    """GET /metrics, parsed with the official client's parser."""
    async with client.get(f"{url}/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = await response.text()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value (0 when the series does not exist yet)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


async def healthcheck(url: str | None) -> tuple[int, str]:
    """Run deploy/healthcheck.py as the image does, for the bridge at url (None: unset)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")}
    if url is not None:
        env["BRIDGE_HTTP__LISTEN"] = url.removeprefix("http://")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(HEALTHCHECK), env=env, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 15)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


def is_log(text: str):
    return lambda record: record.name.startswith("bridge") and text in record.getMessage()


async def test_healthz_is_200_with_every_part_when_up(settings_for) -> None:
    settings, url = with_http(settings_for())
    async with running(settings) as bridge, aiohttp.ClientSession() as client:
        await bridge.ready()
        status, body = await health(client, url)
    assert status == 200, body
    assert body["ok"] is True
    assert body["down"] == []
    (folder,) = body["folders"]
    assert (folder["account"], folder["folder"]) == ("default", "INBOX")
    assert (folder["ok"], folder["state"], folder["error"]) == (True, "connected", "")
    assert folder["last_check"] is not None
    assert body["telegram"]["ok"] is True
    assert body["telegram"]["seconds_ago"] < 60
    assert body["database"] == {"ok": True}
    assert body["outbox"] == {"pending": 0, "failed": 0}


async def test_healthz_is_503_naming_the_folder_while_imap_is_down(
    settings_for, dovecot, caplog
) -> None:
    caplog.set_level(logging.INFO, logger="bridge")
    settings, url = with_http(settings_for())
    async with running(settings) as bridge, aiohttp.ClientSession() as client:
        await bridge.ready()
        assert (await health(client, url))[0] == 200
        await asyncio.to_thread(dovecot.stop)
        await wait_for_log(caplog, is_log("retrying with backoff"), BOUND)
        status, body = await health(client, url)
        assert status == 503, body
        assert body["ok"] is False
        assert body["down"] == ["imap default/INBOX"]
        (folder,) = body["folders"]
        assert (folder["ok"], folder["state"]) == (False, "disconnected")
        assert folder["error"]
        assert body["telegram"]["ok"] is True  # only the folder is down
        code, out = await healthcheck(url)
        assert code == 1
        assert json.loads(out)["down"] == ["imap default/INBOX"]
        await asyncio.to_thread(dovecot.start)
        await wait_for_log(caplog, is_log("IMAP connection restored"), BOUND)
        status, body = await health(client, url)
        assert status == 200, body
        assert await healthcheck(url) == (0, "")
    assert (await healthcheck(url))[0] == 1  # stopped: nothing listens
    assert await healthcheck(None) == (0, "")  # no BRIDGE_HTTP__LISTEN: nothing to ask


async def test_metrics_count_a_posted_and_a_muted_mail(
    settings_for, dovecot, mail_user, botapi, caplog
) -> None:
    caplog.set_level(logging.INFO, logger="bridge")
    settings, url = with_http(settings_for(routes=[{"from": "*@spam.example", "mute": True}]))
    async with running(settings) as bridge, aiohttp.ClientSession() as client:
        await bridge.ready()
        before = await scrape(client, url)
        dovecot.append(mail_user.name, mail_user.password, mail("Muted", sender="x@spam.example"))
        dovecot.append(mail_user.name, mail_user.password, mail("Counted"))
        await wait_mails(botapi, ["Counted"])
        await wait_for_log(caplog, is_log("delivered 1 mail(s)"), 10)
        after = await scrape(client, url)

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    account = {"account": "default"}
    assert grew("mailbridge_mails_seen_total", **account) == 2
    assert grew("mailbridge_mails_muted_total", **account) == 1
    assert grew("mailbridge_mails_posted_total", **account) == 1
    assert grew("mailbridge_delivery_delay_seconds_count") == 1
    assert 0 < grew("mailbridge_delivery_delay_seconds_sum") < 10
    assert value(after, "mailbridge_telegram_last_ok_timestamp_seconds") > 0
    assert value(after, "mailbridge_outbox_items", status="pending") == 0
    assert grew("mailbridge_db_statements_total") > 0  # recording and posting used the database
    assert value(after, "process_resident_memory_bytes") > 0


async def test_json_logs_carry_account_folder_and_chat_and_no_secret(
    settings_for, dovecot, mail_user, botapi
) -> None:
    settings = settings_for()
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(SecretFilter(settings.secrets()))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        async with running(settings) as bridge:
            await bridge.ready()
            dovecot.append(mail_user.name, mail_user.password, mail("In JSON"))
            await wait_mails(botapi, ["In JSON"])
    finally:
        root.removeHandler(handler)
    text = stream.getvalue()
    lines = [json.loads(line) for line in text.splitlines()]
    assert lines
    for line in lines:
        assert {"time", "level", "logger", "message"} <= set(line)
        assert line["time"].endswith("+00:00")
    first = [line for line in lines if line["message"].startswith("first contact with")]
    assert first
    assert (first[0]["account"], first[0]["folder"]) == ("default", "INBOX")
    delivered = [line for line in lines if line["message"].startswith("delivered 1 mail(s)")]
    assert delivered
    assert delivered[0]["chat"] == OWNER
    # httpx logs each request URL (with bot<TOKEN>) at DEBUG/INFO; those lines are masked.
    assert "/bot***/" in text
    for secret in (botapi.token, mail_user.password):
        assert secret not in text
