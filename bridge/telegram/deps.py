"""The long-lived objects handlers need, stored once in bot_data."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from telegram.ext import ContextTypes

from bridge.config import Settings
from bridge.db.engine import Database

if TYPE_CHECKING:
    from bridge.chat_to_mail import Outbox
    from bridge.delivery import ChatLocks, Delivery
    from bridge.jobs import JobRunner
    from bridge.mail_to_chat import FolderStatus
    from bridge.oauth import AccessTokens


@dataclass(frozen=True)
class Deps:
    """Settings, database, each folder's status, delivery and its chat locks, outbox, jobs."""

    settings: Settings
    db: Database
    folders: tuple[FolderStatus, ...]
    delivery: Delivery
    chat_locks: ChatLocks
    outbox: Outbox
    jobs: JobRunner
    tokens: AccessTokens  # the OAuth2 accounts' sign-ins (/connect, /status)


def deps(context: ContextTypes.DEFAULT_TYPE) -> Deps:
    """The Deps stored in bot_data by build_application()."""
    value = context.bot_data["deps"]
    if not isinstance(value, Deps):
        raise TypeError("bot_data['deps'] is not set")
    return value
