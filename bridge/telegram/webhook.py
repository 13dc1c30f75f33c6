"""Webhook mode: Telegram (through a load balancer) posts each update to an instance.

Every instance serves BRIDGE_TELEGRAM__WEBHOOK_LISTEN; requests without the secret token that
setWebhook registered are refused (Bot API: X-Telegram-Bot-Api-Secret-Token). An update is
answered 200 only after it was handled, so Telegram sends it again after a crash, and its id is
taken in the database before it is handled, so that an update sent again, to this or
another instance, is handled once.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from typing import Any
from urllib.parse import urlsplit

from telegram import Update
from telegram.ext import Application
from tornado.httpserver import HTTPServer
from tornado.web import Application as WebApplication
from tornado.web import RequestHandler

from bridge.config import TelegramSettings
from bridge.db import store
from bridge.db.engine import UNAVAILABLE, Database
from bridge.retry import Stopped
from bridge.telegram.bot import held_back
from bridge.telegram.errors import call_until_answered

logger = logging.getLogger(__name__)

SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"  # noqa: S105 - a header name
MAX_BODY = 1024 * 1024  # an update is a few KB; refuse anything near this


class _UpdateHandler(RequestHandler):
    """POST {path}: one update, as JSON."""

    def initialize(
        self, app: Application[Any, Any, Any, Any, Any, Any], db: Database, secret: str
    ) -> None:
        """Tornado passes the handler's arguments here."""
        self.app, self.db, self.secret = app, db, secret

    async def post(self) -> None:
        """Check the secret, skip an update handled before, handle it, then answer 200."""
        given = self.request.headers.get(SECRET_HEADER, "")
        if not hmac.compare_digest(given.encode(), self.secret.encode()):
            self.set_status(403)
            return
        try:
            data = json.loads(self.request.body)
            update = Update.de_json(data, self.app.bot)
        except (ValueError, TypeError, KeyError):
            self.set_status(400)
            return
        try:
            claim = await self.db.run(store.claim_update, update.update_id)
        except UNAVAILABLE as exc:
            logger.warning("webhook: database unusable (%s); update asked for again", exc)
            self.set_status(503)  # not taken: Telegram sends it again
            return
        if claim == "done":
            return  # handled already (here or by another instance): 200, nothing else
        if claim == "busy":
            self.set_status(503)  # another instance is on it; Telegram asks again later
            return
        handled = False
        try:
            await self.app.process_update(update)
            handled = not held_back(self.app, update)
        finally:
            if not handled:
                self.set_status(503)  # Telegram sends it again
            try:
                await self.db.run(store.finish_update, update.update_id, handled)
            except UNAVAILABLE:
                # Not recorded as done: when it comes again it is taken again after
                # UPDATE_TAKEOVER (store.py), and the outbox refuses a chat message twice.
                logger.warning("webhook: could not record update %d", update.update_id)


async def serve(
    application: Application[Any, Any, Any, Any, Any, Any],
    db: Database,
    telegram: TelegramSettings,
    stop: asyncio.Event,
) -> None:
    """Register the webhook with Telegram (retried) and serve updates until stop is set."""
    if not (telegram.webhook_url and telegram.webhook_listen and telegram.webhook_secret):
        raise ValueError("webhook mode needs webhook_url, webhook_listen and webhook_secret")
    secret = telegram.webhook_secret.get_secret_value()
    path = urlsplit(telegram.webhook_url).path or "/"
    host, _, port = telegram.webhook_listen.rpartition(":")
    web = WebApplication(
        [(path, _UpdateHandler, {"app": application, "db": db, "secret": secret})]
    )
    server = HTTPServer(web, max_body_size=MAX_BODY)
    server.listen(int(port), address=host)
    logger.info("webhook: listening on %s%s", telegram.webhook_listen, path)
    try:
        await _register(application, telegram.webhook_url, secret, stop)
        await stop.wait()
    finally:
        server.stop()
        await server.close_all_connections()


async def _register(
    application: Application[Any, Any, Any, Any, Any, Any],
    url: str,
    secret: str,
    stop: asyncio.Event,
) -> None:
    """setWebhook, retried while Telegram is unreachable (every instance sets the same); a URL
    Telegram refuses ends the service with its reason."""
    try:
        await call_until_answered(
            "setWebhook",
            lambda: application.bot.set_webhook(
                url, secret_token=secret, allowed_updates=Update.ALL_TYPES
            ),
            stop,
        )
    except Stopped:
        return
