"""The tables: what the bridge remembers across restarts."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# Named constraints, so that batch migrations on SQLite can find them (Alembic docs).
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    """Now, timezone-aware."""
    return datetime.now(UTC)


class Base(DeclarativeBase):
    """Declarative base with the naming convention."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Account(Base):
    """A configured account, by its name: the stable key of its folders and outgoing mail.

    Keyed by name, not by server address, so that writing the host differently is not a
    first contact (which would silently count what arrived meanwhile as seen).
    """

    __tablename__ = "account"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(32), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Mailbox(Base):
    """One watched folder: its UIDVALIDITY and the highest UID handled."""

    __tablename__ = "mailbox"
    __table_args__ = (UniqueConstraint("account_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("account.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(1000))  # RFC 3501 sets no limit; servers ~1,000
    uidvalidity: Mapped[int] = mapped_column(BigInteger)
    last_uid: Mapped[int] = mapped_column(BigInteger, default=0)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class PostedMail(Base):
    """A mail the watcher handed to delivery: its summary and what a reply needs."""

    __tablename__ = "posted_mail"
    __table_args__ = (UniqueConstraint("mailbox_id", "uidvalidity", "uid"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    mailbox_id: Mapped[int] = mapped_column(ForeignKey("mailbox.id", ondelete="CASCADE"))
    uidvalidity: Mapped[int] = mapped_column(BigInteger)
    uid: Mapped[int] = mapped_column(BigInteger)
    message_id: Mapped[str] = mapped_column(Text, default="")
    subject: Mapped[str] = mapped_column(Text, default="")
    sender: Mapped[str] = mapped_column(Text, default="")
    reply_to: Mapped[str] = mapped_column(Text, default="")
    references: Mapped[str] = mapped_column(Text, default="")
    sender_name: Mapped[str] = mapped_column(Text, default="")
    summary: Mapped[str] = mapped_column(Text, default="")  # Telegram HTML, <= 4,096 characters
    attachments: Mapped[int] = mapped_column(Integer, default=0)
    # Where the mail is now, after buttons moved it ("" / None: where the watcher found it).
    location_folder: Mapped[str] = mapped_column(String(1000), default="")
    location_uidvalidity: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    location_uid: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    state: Mapped[str] = mapped_column(String(16), default="")  # "", archived, deleted, spam
    seen: Mapped[bool] = mapped_column(Boolean, default=False)
    posted_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    summaries: Mapped[list[PostedSummary]] = relationship(
        back_populates="mail", cascade="all, delete-orphan"
    )


class PostedSummary(Base):
    """A Telegram message that shows a mail: the key a chat reply is resolved by.

    A combined message (several mails that waited for the same chat) has one row per mail.
    """

    __tablename__ = "posted_summary"
    __table_args__ = (UniqueConstraint("chat_id", "telegram_message_id", "posted_mail_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    posted_mail_id: Mapped[int] = mapped_column(
        ForeignKey("posted_mail.id", ondelete="CASCADE"), index=True
    )
    chat_id: Mapped[int] = mapped_column(BigInteger)
    telegram_message_id: Mapped[int] = mapped_column(BigInteger)
    # summary: a summary or combined message; list: search results; forward: the bot's question
    # "forward to whom?" (a reply to it gives the addresses).
    kind: Mapped[str] = mapped_column(String(16), default="summary")

    mail: Mapped[PostedMail] = relationship(back_populates="summaries")


class Delivery(Base):
    """One mail for one chat (and forum topic): pending until Telegram accepted a message
    carrying it. Written with the folder's cursor, so nothing is lost between the two."""

    __tablename__ = "delivery"
    __table_args__ = (UniqueConstraint("posted_mail_id", "chat_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    posted_mail_id: Mapped[int] = mapped_column(
        ForeignKey("posted_mail.id", ondelete="CASCADE"), index=True
    )
    chat_id: Mapped[int] = mapped_column(BigInteger, index=True)
    topic: Mapped[str] = mapped_column(String(128), default="")  # name or thread id; "" none
    status: Mapped[str] = mapped_column(String(16), default="pending", index=True)
    telegram_message_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_error: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class ForumTopic(Base):
    """A forum topic the bridge posts into, by name: created once, reused after a restart."""

    __tablename__ = "forum_topic"
    __table_args__ = (UniqueConstraint("chat_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    chat_id: Mapped[int] = mapped_column(BigInteger)
    name: Mapped[str] = mapped_column(String(128))
    thread_id: Mapped[int] = mapped_column(BigInteger)


class ChatMigration(Base):
    """A group that Telegram turned into a supergroup with a new id (ChatMigrated)."""

    __tablename__ = "chat_migration"

    old_chat_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    new_chat_id: Mapped[int] = mapped_column(BigInteger)
    migrated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Mute(Base):
    """A muted sender: later mail from this address is recorded as seen, posted nowhere."""

    __tablename__ = "mute"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    address: Mapped[str] = mapped_column(String(320), unique=True)  # lower case
    muted_by: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Job(Base):
    """Work a button or a command asked for (full text, an attachment, a move, a search).

    Written before the update is confirmed to Telegram and done by the job runner, so a slow
    upload never holds up other updates and a crash does not lose the request.
    """

    __tablename__ = "job"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    update_id: Mapped[int | None] = mapped_column(BigInteger, unique=True, nullable=True)
    kind: Mapped[str] = mapped_column(String(16))
    chat_id: Mapped[int] = mapped_column(BigInteger)
    user_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    message_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    thread_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    posted_mail_id: Mapped[int | None] = mapped_column(
        ForeignKey("posted_mail.id", ondelete="CASCADE"), nullable=True
    )
    args: Mapped[str] = mapped_column(Text, default="")
    status: Mapped[str] = mapped_column(String(16), default="pending", index=True)
    error: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class Lease(Base):
    """Who does a piece of work now, when several instances share the database (a folder's
    watcher, the Telegram poller). Renewed by its holder; taken over once expired. The fencing
    token grows with every new holder, so a paused instance that lost its lease can tell."""

    __tablename__ = "lease"

    name: Mapped[str] = mapped_column(String(300), primary_key=True)
    holder: Mapped[str] = mapped_column(String(100))
    token: Mapped[int] = mapped_column(BigInteger, default=1)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ChatSend(Base):
    """A message sent to a chat: per-chat pacing that holds across instances."""

    __tablename__ = "chat_send"
    __table_args__ = (Index("ix_chat_send_chat_id_sent_at", "chat_id", "sent_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    chat_id: Mapped[int] = mapped_column(BigInteger)
    sent_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ProcessedUpdate(Base):
    """A Telegram update an instance took (webhook mode: every instance takes updates)."""

    __tablename__ = "processed_update"

    update_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    processed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    done: Mapped[bool] = mapped_column(Boolean, default=False)  # False: being handled


class OAuthToken(Base):
    """An account's OAuth2 tokens, encrypted with BRIDGE_SECRET_KEY (Fernet): never plain."""

    __tablename__ = "oauth_token"

    account_id: Mapped[int] = mapped_column(
        ForeignKey("account.id", ondelete="CASCADE"), primary_key=True, autoincrement=False
    )
    access_token: Mapped[str] = mapped_column(Text, default="")  # Fernet token
    refresh_token: Mapped[str] = mapped_column(Text, default="")  # Fernet token
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    scope: Mapped[str] = mapped_column(Text, default="")
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)  # sign in again
    told: Mapped[bool] = mapped_column(Boolean, default=False)  # the chat was told so
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class OutboxItem(Base):
    """An outgoing mail: written before sending, marked sent only after SMTP accepted it."""

    __tablename__ = "outbox_item"
    # Telegram re-delivers an update when the bridge dies before confirming it: the same chat
    # message must not become a second mail. The index serves the per-user rate limit.
    __table_args__ = (
        UniqueConstraint("chat_id", "source_message_id"),
        Index("ix_outbox_item_user_id_created_at", "user_id", "created_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    status: Mapped[str] = mapped_column(String(16), default="pending", index=True)
    # None for items stored before accounts existed: they leave through the first account.
    account_id: Mapped[int | None] = mapped_column(
        ForeignKey("account.id", ondelete="SET NULL"), nullable=True
    )
    chat_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    user_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    source_message_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    message_id: Mapped[str] = mapped_column(Text)
    recipients: Mapped[str] = mapped_column(Text)
    subject: Mapped[str] = mapped_column(Text, default="")
    raw: Mapped[bytes] = mapped_column(LargeBinary)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_error: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
