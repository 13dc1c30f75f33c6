"""The PTB Application: builder, the command table, and every handler in order."""

from __future__ import annotations

import html
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from telegram import BotCommand, Update
from telegram.error import RetryAfter
from telegram.ext import (
    AIORateLimiter,
    Application,
    ApplicationBuilder,
    CommandHandler,
    ContextTypes,
    ExtBot,
    MessageHandler,
    TypeHandler,
    filters,
)

from bridge.config import TelegramSettings
from bridge.db.engine import UNAVAILABLE, unavailable_reason
from bridge.telegram import commands
from bridge.telegram.access import Gate
from bridge.telegram.deps import Deps

logger = logging.getLogger(__name__)

Callback = Callable[[Update, ContextTypes.DEFAULT_TYPE], Coroutine[Any, Any, Any]]


@dataclass(frozen=True)
class Command:
    """One chat command: feeds add_handler, /help and setMyCommands."""

    name: str
    usage: str
    description: str
    callback: Callback | None  # None: registered elsewhere (a conversation)


def command_table() -> list[Command]:
    """Every command, in the order /help lists them."""
    from bridge import search
    from bridge.telegram import buttons, connect, send

    return [
        Command(
            "send",
            "/send [@ACCOUNT] ADDR[,ADDR] SUBJECT",
            "write a mail (alone: step by step)",
            None,
        ),
        Command(
            "search",
            "/search WORDS [from: to: subject: since: before:]",
            "find mail on the server",
            search.search,
        ),
        Command("inbox", "/inbox [N]", "the newest N mails, one line each", search.inbox),
        Command("mutes", "/mutes", "the muted senders", buttons.mutes),
        Command("unmute", "/unmute ADDRESS", "post mail from that sender again", buttons.unmute),
        Command("status", "/status", "connection state, last check, counts", commands.status),
        Command(
            "connect",
            "/connect ACCOUNT",
            "sign an OAuth2 account in (private chat)",
            connect.connect,
        ),
        Command("help", "/help", "this list", commands.help_),
        Command("start", "/start", "your ids and whether you may use the bot", commands.start),
        Command("cancel", "/cancel", "stop the /send dialogue", send.cancel),
    ]


def help_text(table: list[Command]) -> str:
    """The /help message, generated from the command table."""
    lines = ["<b>Commands</b>"]
    lines += [f"{html.escape(c.usage)} — {html.escape(c.description)}" for c in table]
    lines.append("")
    lines.append("Reply to a mail notification to answer that mail by email.")
    return "\n".join(lines)


async def unknown_command(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Answer a command the bot does not know."""
    if update.effective_message is not None:
        await update.effective_message.reply_text(
            "Unknown command. /help lists what I can do.", do_quote=False
        )


@dataclass
class HeldBack:
    """Updates whose handling met a database that could not be used (bot_data["held_back"])."""

    waiting: set[int] = field(default_factory=set)  # not to be confirmed this time
    told: set[int] = field(default_factory=set)  # their chat was told once already


def _held(application: Application[Any, Any, Any, Any, Any, Any]) -> HeldBack:
    held = application.bot_data.setdefault("held_back", HeldBack())
    if not isinstance(held, HeldBack):
        raise TypeError("bot_data['held_back'] is not a HeldBack")
    return held


def held_back(application: Application[Any, Any, Any, Any, Any, Any], update: Update) -> bool:
    """True when handling `update` stopped because the database could not be used: it must
    not be confirmed, so that Telegram delivers it again."""
    held = _held(application)
    if update.update_id in held.waiting:
        held.waiting.discard(update.update_id)
        return True
    held.told.discard(update.update_id)
    return False


async def on_error(update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Log handler errors; the chat gets one line, never a traceback.

    An update that met a database it could not use is held back instead (polling and webhook
    mode do not confirm it, Telegram delivers it again); its chat is told once.
    """
    if isinstance(update, Update) and isinstance(context.error, UNAVAILABLE):
        held = _held(context.application)
        held.waiting.add(update.update_id)
        if update.update_id in held.told:
            return
        held.told.add(update.update_id)
        logger.warning(
            "database unusable (%s); update %d held back until it answers",
            unavailable_reason(context.error),
            update.update_id,
        )
        if update.effective_message is not None:
            try:
                await update.effective_message.reply_text(
                    "The bridge's database is not answering; I will do this as soon as it is "
                    "back.",
                    do_quote=False,
                )
            except Exception:  # the chat may be down too
                logger.debug("could not report the wait to the chat", exc_info=True)
        return
    if isinstance(context.error, RetryAfter):
        # A flood wait on a handler's own answer: the request itself was stored first (outbox,
        # jobs), and answering "something went wrong" would meet the same wait.
        logger.warning("Telegram asked to slow down; an answer in a chat was dropped")
        return
    logger.error("error while handling an update", exc_info=context.error)
    if isinstance(update, Update) and update.effective_message is not None:
        try:
            await update.effective_message.reply_text(
                "Something went wrong; the bridge's log has the details.", do_quote=False
            )
        except Exception:  # the chat may be what failed
            logger.debug("could not report an error to the chat", exc_info=True)


def make_bot(telegram: TelegramSettings) -> ExtBot[int]:
    """The bot, for the Bot API server in the settings, with PTB's rate limiter.

    The limiter paces, but never retries a 429: it would sleep out the flood wait inside
    send_message, where a stop cannot end it. RetryAfter reaches the caller, which waits where
    stop is honoured (delivery, outbox reports, jobs: telegram/errors.py); a handler's answer
    that meets one goes to the error handler, so that no wait holds up the other updates.
    """
    api = telegram.api_url
    return ExtBot(
        telegram.token.get_secret_value(),
        base_url=f"{api}/bot",
        base_file_url=f"{api}/file/bot",
        rate_limiter=AIORateLimiter(max_retries=0),
    )


def build_application(
    telegram: TelegramSettings, bot: ExtBot[int], dependencies: Deps
) -> Application[Any, Any, Any, Any, Any, Any]:
    """The one place that builds the Application and adds handlers (order matters)."""
    from bridge.telegram import buttons, connect, replies, send
    from bridge.telegram import open as open_mail

    table = command_table()

    async def set_commands(application: Application[Any, Any, Any, Any, Any, Any]) -> None:
        bot_commands = [BotCommand(c.name, c.description) for c in table]
        await application.bot.set_my_commands(bot_commands)

    application = (
        ApplicationBuilder()
        .bot(bot)
        .post_init(set_commands)
        .updater(None)  # polling.py confirms updates only after handling them
        .build()
    )
    gate = Gate(telegram.allowed_user_ids)
    application.bot_data["deps"] = dependencies
    application.bot_data["help"] = help_text(table)

    # 1. The gate, before everything else.
    application.add_handler(TypeHandler(Update, gate), group=-1)
    # 2. The /send dialogue (it owns /send and /cancel while active).
    application.add_handler(send.conversation(telegram.send_dialogue_timeout))
    # 3. Plain commands from the table.
    for command in table:
        if command.callback is not None and command.name != "cancel":
            application.add_handler(CommandHandler(command.name, command.callback))
    # 4. Replies to posted mail; then anything else that looks like a command.
    application.add_handler(CommandHandler("cancel", send.cancel))
    application.add_handler(connect.paste_handler())  # the address a /connect sign-in ended at
    application.add_handler(replies.handler())
    application.add_handler(open_mail.handler())
    application.add_handler(buttons.handler())
    application.add_handler(MessageHandler(filters.COMMAND, unknown_command))
    application.add_error_handler(on_error)
    return application
