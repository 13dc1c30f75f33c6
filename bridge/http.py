"""Health and metrics over HTTP (BRIDGE_HTTP__LISTEN): GET /healthz and GET /metrics.

Tornado's HTTPServer runs on the bridge's own event loop (python-telegram-bot's `webhooks`
extra brings it, and webhook mode serves through it too), so a probe sees the parts' state
as it is, without threads or locks.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from datetime import UTC, datetime
from typing import Any

from prometheus_client.exposition import choose_encoder
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session
from telegram.error import TelegramError
from tornado.httpserver import HTTPServer
from tornado.web import Application, RequestHandler

from bridge import metrics
from bridge.config import HttpSettings
from bridge.db import store
from bridge.errors import BridgeError
from bridge.mail_to_chat import FolderStatus
from bridge.telegram.deps import Deps
from bridge.telegram.errors import classify, count

logger = logging.getLogger(__name__)

RECENT = 60.0  # Telegram answered within this many seconds: up, without asking it again
PROBE_TIMEOUT = 5.0  # for getMe and the database query a probe makes
# A folder in one of these states is not watched as it should be. Any other state ("connected",
# or one for a folder another instance watches) is not this instance's failure.
DOWN_STATES = frozenset({"starting", "disconnected"})


class Health:
    """What /healthz reports: each watched folder, Telegram, the database, the outbox."""

    def __init__(self, deps: Deps) -> None:
        self.deps = deps
        # Telegram answers noted before this run (an earlier bridge in this process) don't count.
        self.started = time.time()

    async def report(self) -> tuple[bool, dict[str, Any]]:
        """(healthy, the JSON body): healthy when every part is up; the outbox only informs."""
        folders = [_folder(status) for status in self.deps.folders]
        telegram, (database, outbox) = await asyncio.gather(self.telegram(), self.database())
        down = [f"imap {f['account']}/{f['folder']}" for f in folders if not f["ok"]]
        down += [
            part
            for part, state in (("telegram", telegram), ("database", database))
            if not state["ok"]
        ]
        body = {
            "ok": not down,
            "down": down,
            "folders": folders,
            "telegram": telegram,
            "database": database,
            "outbox": outbox,
        }
        return not down, body

    async def telegram(self) -> dict[str, Any]:
        """Up when a Bot API call succeeded within RECENT seconds, else when getMe does now."""
        last = metrics.telegram_last_ok()
        if last < self.started or time.time() - last > RECENT:
            try:
                await asyncio.wait_for(self.deps.delivery.bot.get_me(), PROBE_TIMEOUT)
            except TelegramError as exc:
                return {"ok": False, "error": count(classify(exc)).reason, **_when(last)}
            except TimeoutError:
                return {
                    "ok": False,
                    "error": f"no answer within {PROBE_TIMEOUT:g} s",
                    **_when(last),
                }
            metrics.telegram_answered()
            last = time.time()
        return {"ok": True, **_when(last)}

    async def database(self) -> tuple[dict[str, Any], dict[str, int]]:
        """The database's state (a SELECT 1) and the outbox items per status."""
        try:
            counts = await asyncio.wait_for(self.deps.db.run(_probe), PROBE_TIMEOUT)
        except SQLAlchemyError as exc:
            reason = str(getattr(exc, "orig", None) or exc).splitlines()[0]
            return {"ok": False, "error": reason}, {}
        except TimeoutError:
            return {"ok": False, "error": f"no answer within {PROBE_TIMEOUT:g} s"}, {}
        for status in ("pending", "sent", "failed"):
            metrics.OUTBOX_ITEMS.labels(status=status).set(counts.get(status, 0))
        return {"ok": True}, {status: counts.get(status, 0) for status in ("pending", "failed")}


def _probe(session: Session) -> dict[str, int]:
    session.execute(text("SELECT 1"))
    return store.outbox_counts(session)


def _folder(status: FolderStatus) -> dict[str, Any]:
    """One folder's part of the report."""
    return {
        "account": status.account,
        "folder": status.folder,
        "ok": status.state not in DOWN_STATES,
        "state": status.state,
        "mode": status.mode,
        "last_check": status.last_check.isoformat() if status.last_check else None,
        "error": status.last_error,
    }


def _when(unix: float) -> dict[str, Any]:
    """last_ok as ISO 8601 and how long ago (None: never in this run)."""
    if unix <= 0:
        return {"last_ok": None, "seconds_ago": None}
    return {
        "last_ok": datetime.fromtimestamp(unix, UTC).isoformat(timespec="seconds"),
        "seconds_ago": round(max(0.0, time.time() - unix), 1),
    }


class HealthHandler(RequestHandler):
    """GET /healthz: 200 when every part is up, else 503; the JSON body says which is down."""

    def initialize(self, health: Health) -> None:
        """Tornado passes the URL spec's arguments here."""
        self.health = health

    async def get(self) -> None:
        """The report."""
        healthy, body = await self.health.report()
        self.set_status(200 if healthy else 503)
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        self.finish(json.dumps(body, ensure_ascii=False))


class MetricsHandler(RequestHandler):
    """GET /metrics: every metric in Prometheus' text format (OpenMetrics when asked for)."""

    def initialize(self, health: Health) -> None:
        """Tornado passes the URL spec's arguments here."""
        self.health = health

    async def get(self) -> None:
        """The outbox gauge read from the database, then the registry, encoded."""
        await self.health.database()
        encoder, content_type = choose_encoder(self.request.headers.get("Accept", ""))
        self.set_header("Content-Type", content_type)
        self.finish(encoder(metrics.REGISTRY))


def _log_request(handler: RequestHandler) -> None:
    """Requests at DEBUG: a probe every few seconds is no event (tornado logs 5xx as errors)."""
    request = handler.request
    logger.debug(
        "%s %s %d %.1f ms",
        request.method,
        request.uri,
        handler.get_status(),
        1000 * request.request_time(),
    )


async def serve(settings: HttpSettings, deps: Deps, stop: asyncio.Event) -> None:
    """Serve /healthz and /metrics on settings.listen until stop is set (nothing when unset)."""
    if settings.listen is None:
        return
    host, _, port = settings.listen.rpartition(":")
    health = Health(deps)
    application = Application(
        [
            (r"/healthz", HealthHandler, {"health": health}),
            (r"/metrics", MetricsHandler, {"health": health}),
        ],
        log_function=_log_request,
    )
    server = HTTPServer(application, xheaders=False)
    try:
        server.listen(int(port), address=host.strip("[]"))
    except OSError as exc:
        raise BridgeError(
            f"BRIDGE_HTTP__LISTEN: cannot listen on {settings.listen}: {exc.strerror}"
        ) from None
    logger.info("health and metrics at http://%s/healthz and /metrics", settings.listen)
    try:
        await stop.wait()
    finally:
        server.stop()
        await server.close_all_connections()
