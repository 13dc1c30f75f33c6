"""The allow-list gate: runs before every handler; strangers get one refusal and nothing else."""

from __future__ import annotations

import logging
import time

from telegram import Update
from telegram.ext import ApplicationHandlerStop, ContextTypes

logger = logging.getLogger(__name__)

# One refusal (and one log line) per stranger per window, so the bot cannot be used to spam.
REFUSAL_WINDOW = 600.0


def refusal_text(user_id: int, chat_id: int) -> str:
    """What a stranger is told: enough to ask the owner for access, nothing more."""
    return (
        "⛔ This is a private mail bridge and you are not on its allow-list.\n"
        f"Your user id is {user_id} (this chat: {chat_id}). If this is your bridge, add the id "
        "to BRIDGE_TELEGRAM__ALLOWED_USER_IDS and restart it."
    )


class Gate:
    """A TypeHandler callback for group -1 that stops every update not from an allowed user."""

    def __init__(self, allowed_user_ids: list[int]) -> None:
        self.allowed = frozenset(allowed_user_ids)
        self._last_refused: dict[int, float] = {}

    def is_allowed(self, user_id: int | None) -> bool:
        """True only for users on the allow-list (an empty list allows nobody)."""
        return user_id is not None and user_id in self.allowed

    async def __call__(self, update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Let allowed users through; refuse strangers once per window; drop the rest."""
        if not isinstance(update, Update):
            raise ApplicationHandlerStop
        user = update.effective_user
        if self.is_allowed(user.id if user else None):
            return
        # Only what would be answered counts towards the window: a stranger's chatter in a
        # group must not use up the refusal their first command there gets.
        if user is not None and _addressed(update) and self._should_answer(user.id):
            logger.info(
                "refused user %s (chat %s)",
                user.id,
                update.effective_chat.id if update.effective_chat else "-",
            )
            await self._refuse(update, user.id)
        raise ApplicationHandlerStop

    def _should_answer(self, user_id: int) -> bool:
        now = time.monotonic()
        if now - self._last_refused.get(user_id, -REFUSAL_WINDOW) < REFUSAL_WINDOW:
            return False
        if len(self._last_refused) > 10_000:  # bounded memory under a flood of new ids
            self._last_refused.clear()
        self._last_refused[user_id] = now
        return True

    async def _refuse(self, update: Update, user_id: int) -> None:
        chat = update.effective_chat
        text = refusal_text(user_id, chat.id if chat else user_id)
        if update.callback_query is not None:
            await update.callback_query.answer("⛔ Not allowed.", show_alert=True)
            return
        message = update.effective_message
        if message is not None and chat is not None:
            await message.reply_text(text, do_quote=False)


def _addressed(update: Update) -> bool:
    """Whether the bot would answer: a button, a private chat, or a command or reply in a group."""
    if update.callback_query is not None:
        return True
    message, chat = update.effective_message, update.effective_chat
    if message is None or chat is None:
        return False
    if chat.type == chat.PRIVATE:
        return True
    # In groups only answer what was addressed to the bot (commands, replies to it).
    return bool(message.text and message.text.startswith("/")) or (
        message.reply_to_message is not None
        and message.reply_to_message.from_user is not None
        and message.reply_to_message.from_user.id == context_bot_id(update)
    )


def context_bot_id(update: Update) -> int | None:
    """The bot's own user id, as known to the update's bot."""
    try:
        return update.get_bot().id
    except RuntimeError:
        return None
