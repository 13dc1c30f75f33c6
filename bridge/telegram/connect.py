"""/connect ACCOUNT: sign an OAuth2 account in from a private chat, as `mailbridge login` does.

The device flow shows a code and tells the chat when the sign-in is done; the code flow (Google)
shows an address to open and takes the address the browser was sent to, pasted back here.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any
from urllib.parse import parse_qs, urlsplit

from telegram import Bot, Update
from telegram.constants import ChatType
from telegram.error import TelegramError
from telegram.ext import ContextTypes, MessageHandler, filters

from bridge.errors import BridgeError
from bridge.oauth import CODE_TIMEOUT, AccountTokens, CodeFlow, DeviceCode
from bridge.telegram.deps import deps

logger = logging.getLogger(__name__)

# A pasted loopback redirect (RFC 8252 §7.3) carrying the state of a pending sign-in.
_REDIRECT = re.compile(r"^\s*https?://(127\.0\.0\.1|localhost|\[::1\])[:/]\S*state=", re.I)
_PENDING = "oauth_pending"  # bot_data key: state -> (user id, account, flow, deadline)


async def connect(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Start an account's sign-in: only in a private chat, where the code is the user's alone."""
    message, chat, user = update.effective_message, update.effective_chat, update.effective_user
    if message is None or chat is None or user is None:
        return
    if chat.type != ChatType.PRIVATE:
        await message.reply_text(
            "Send /connect to me in a private chat: a sign-in is yours alone.", do_quote=False
        )
        return
    tokens = deps(context).tokens
    args = context.args or []
    source = tokens.source(args[0]) if len(args) == 1 else None
    if source is None:
        known = ", ".join(tokens.names) or "none is configured"
        await message.reply_text(
            f"Usage: /connect ACCOUNT, for an account that signs in with OAuth2 ({known}).",
            do_quote=False,
        )
        return
    try:
        if source.provider.default_method == "device":
            code = await source.start_device()
            await message.reply_text(_device_text(source.name, code), do_quote=False)
            tokens.spawn(_finish_device(context.bot, chat.id, source, code))
            return
        flow = source.start_code()
    except BridgeError as exc:
        await message.reply_text(f"❌ Could not start the sign-in: {exc}", do_quote=False)
        return
    pending: dict[str, tuple[int, str, CodeFlow, float]] = context.bot_data.setdefault(
        _PENDING, {}
    )
    now = time.monotonic()
    for state in [s for s, entry in pending.items() if entry[3] < now]:
        del pending[state]
    pending[flow.state] = (user.id, source.name, flow, now + CODE_TIMEOUT)
    await message.reply_text(
        f"🔑 To sign in {source.name}, open this address, sign in and allow access:\n"
        f"{flow.url}\n\n"
        "The browser then shows a page that does not load: copy that page's whole address "
        "(http://...) from the address bar and send it to me here.",
        do_quote=False,
    )


def _device_text(name: str, code: DeviceCode) -> str:
    minutes = max(1, int(code.expires_in // 60))
    return (
        f"🔑 To sign in {name}, open {code.verification_uri} and enter the code "
        f"{code.user_code} (valid {minutes} min). I will tell you here when it is done."
    )


async def _finish_device(bot: Bot, chat_id: int, source: AccountTokens, code: DeviceCode) -> None:
    """Wait for the device flow beside the update handler, then tell the chat."""
    try:
        await source.finish_device(code)
        text = f"✅ {source.name} is signed in."
    except BridgeError as exc:
        text = f"❌ {source.name} is not signed in: {exc}"
    try:
        await bot.send_message(chat_id, text)
    except TelegramError as exc:
        logger.warning("could not tell chat %s how a sign-in ended: %s", chat_id, exc)


async def pasted(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """The address the browser was sent to: finish that user's pending code sign-in."""
    message, user = update.effective_message, update.effective_user
    if message is None or user is None or not message.text:
        return
    text = message.text.strip()
    state = parse_qs(urlsplit(text).query).get("state", [""])[0]
    pending: dict[str, tuple[int, str, CodeFlow, float]] = context.bot_data.get(_PENDING, {})
    entry = pending.get(state)
    if entry is None or entry[0] != user.id or entry[3] < time.monotonic():
        await message.reply_text(
            "That sign-in address is unknown or too old: send /connect ACCOUNT again.",
            do_quote=False,
        )
        return
    del pending[state]
    try:  # it carries a one-time code: keep it out of the chat's history
        await message.delete()
    except TelegramError:
        logger.debug("could not delete a pasted sign-in address", exc_info=True)
    _user_id, name, flow, _deadline = entry
    source = deps(context).tokens.source(name)
    if source is None:
        return
    try:
        await source.finish_code(flow, text)
    except BridgeError as exc:
        await message.reply_text(f"❌ {name} is not signed in: {exc}", do_quote=False)
        return
    await message.reply_text(f"✅ {name} is signed in.", do_quote=False)


def paste_handler() -> MessageHandler[Any, None]:
    """Private text messages that look like a pasted loopback redirect."""
    return MessageHandler(
        filters.ChatType.PRIVATE & filters.TEXT & ~filters.COMMAND & filters.Regex(_REDIRECT),
        pasted,
    )
