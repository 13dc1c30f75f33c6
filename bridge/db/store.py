"""The bridge's queries, as plain functions taking a Session."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from bridge.db.models import Mailbox, OutboxItem, PostedMail, PostedSummary, utcnow


@dataclass(frozen=True)
class MailboxState:
    """What the watcher knows of a folder."""

    id: int
    uidvalidity: int
    last_uid: int


@dataclass(frozen=True)
class MailRecord:
    """The facts about a posted mail that a reply needs."""

    uid: int
    message_id: str
    subject: str
    sender: str
    reply_to: str
    references: tuple[str, ...]


def get_mailbox(session: Session, account: str, name: str) -> MailboxState | None:
    """The stored state of a folder, or None on first contact."""
    row = session.scalar(select(Mailbox).where(Mailbox.account == account, Mailbox.name == name))
    return None if row is None else MailboxState(row.id, row.uidvalidity, row.last_uid)


def reset_mailbox(
    session: Session, account: str, name: str, uidvalidity: int, last_uid: int
) -> MailboxState:
    """Start a folder afresh (first contact, new UIDVALIDITY): UIDs <= last_uid count as seen."""
    row = session.scalar(select(Mailbox).where(Mailbox.account == account, Mailbox.name == name))
    if row is None:
        row = Mailbox(account=account, name=name, uidvalidity=uidvalidity, last_uid=last_uid)
        session.add(row)
    else:
        row.uidvalidity, row.last_uid, row.updated_at = uidvalidity, last_uid, utcnow()
    session.flush()
    return MailboxState(row.id, row.uidvalidity, row.last_uid)


def advance(session: Session, mailbox_id: int, uid: int) -> None:
    """Raise the folder's high-water mark to uid (never lowers it)."""
    row = session.get_one(Mailbox, mailbox_id)
    if uid > row.last_uid:
        row.last_uid, row.updated_at = uid, utcnow()


def posted_chats(session: Session, mailbox_id: int, uidvalidity: int, uid: int) -> set[int]:
    """Chats that already show this mail (so a retry after a crash skips them)."""
    rows = session.scalars(
        select(PostedSummary.chat_id)
        .join(PostedMail)
        .where(
            PostedMail.mailbox_id == mailbox_id,
            PostedMail.uidvalidity == uidvalidity,
            PostedMail.uid == uid,
        )
    )
    return set(rows)


def record_summary(
    session: Session,
    mailbox_id: int,
    uidvalidity: int,
    record: MailRecord,
    chat_id: int,
    telegram_message_id: int,
) -> None:
    """Remember that chat_id shows this mail as telegram_message_id."""
    mail = session.scalar(
        select(PostedMail).where(
            PostedMail.mailbox_id == mailbox_id,
            PostedMail.uidvalidity == uidvalidity,
            PostedMail.uid == record.uid,
        )
    )
    if mail is None:
        mail = PostedMail(
            mailbox_id=mailbox_id,
            uidvalidity=uidvalidity,
            uid=record.uid,
            message_id=record.message_id,
            subject=record.subject,
            sender=record.sender,
            reply_to=record.reply_to,
            references=" ".join(record.references),
        )
        session.add(mail)
        session.flush()
    session.add(
        PostedSummary(
            posted_mail_id=mail.id, chat_id=chat_id, telegram_message_id=telegram_message_id
        )
    )


def find_by_summary(session: Session, chat_id: int, telegram_message_id: int) -> MailRecord | None:
    """The mail shown by a Telegram message in a chat, or None if the bridge did not post it."""
    mail = session.scalar(
        select(PostedMail)
        .join(PostedSummary)
        .where(
            PostedSummary.chat_id == chat_id,
            PostedSummary.telegram_message_id == telegram_message_id,
        )
    )
    if mail is None:
        return None
    return MailRecord(
        uid=mail.uid,
        message_id=mail.message_id,
        subject=mail.subject,
        sender=mail.sender,
        reply_to=mail.reply_to,
        references=tuple(mail.references.split()),
    )


def count_posted(session: Session) -> int:
    """How many mails have been posted, all time."""
    return session.scalar(select(func.count()).select_from(PostedMail)) or 0


@dataclass(frozen=True)
class OutgoingRecord:
    """An outbox row as the worker needs it."""

    id: int
    chat_id: int | None
    message_id: str
    recipients: tuple[str, ...]
    subject: str
    raw: bytes
    attempts: int
    created_at: datetime


def add_outbox(
    session: Session,
    *,
    chat_id: int | None,
    user_id: int | None,
    message_id: str,
    recipients: list[str],
    subject: str,
    raw: bytes,
    source_message_id: int | None = None,
) -> int | None:
    """Store an outgoing mail before anything is sent; returns its id.

    Returns None when this chat message was already stored (Telegram re-delivered the update).
    """
    if source_message_id is not None and chat_id is not None:
        seen = session.scalar(
            select(OutboxItem.id).where(
                OutboxItem.chat_id == chat_id, OutboxItem.source_message_id == source_message_id
            )
        )
        if seen is not None:
            return None
    item = OutboxItem(
        chat_id=chat_id,
        user_id=user_id,
        source_message_id=source_message_id,
        message_id=message_id,
        recipients="\n".join(recipients),
        subject=subject,
        raw=raw,
    )
    session.add(item)
    session.flush()
    return item.id


def due_outbox(session: Session, now: datetime, limit: int = 10) -> list[OutgoingRecord]:
    """Pending items whose next attempt is due, oldest first."""
    rows = session.scalars(
        select(OutboxItem)
        .where(OutboxItem.status == "pending", OutboxItem.next_attempt_at <= now)
        .order_by(OutboxItem.id)
        .limit(limit)
    )
    return [
        OutgoingRecord(
            r.id,
            r.chat_id,
            r.message_id,
            tuple(r.recipients.split("\n")),
            r.subject,
            r.raw,
            r.attempts,
            r.created_at,
        )
        for r in rows
    ]


def next_outbox_due(session: Session) -> datetime | None:
    """When the next pending item is due, or None when nothing is pending."""
    return session.scalar(
        select(func.min(OutboxItem.next_attempt_at)).where(OutboxItem.status == "pending")
    )


def mark_outbox(
    session: Session,
    item_id: int,
    status: str,
    *,
    error: str = "",
    next_attempt_at: datetime | None = None,
) -> None:
    """Record an attempt's outcome: sent, failed, or pending again at next_attempt_at."""
    item = session.get_one(OutboxItem, item_id)
    item.attempts += 1
    item.status = status
    item.last_error = error
    if status == "sent":
        item.sent_at = utcnow()
        item.raw = b""  # the mail is gone; keep the row, not the attachments
    if next_attempt_at is not None:
        item.next_attempt_at = next_attempt_at


def count_sent_by_user(session: Session, user_id: int, since: datetime) -> int:
    """Outgoing mails a user submitted since a moment (the per-user rate limit)."""
    return (
        session.scalar(
            select(func.count())
            .select_from(OutboxItem)
            .where(OutboxItem.user_id == user_id, OutboxItem.created_at >= since)
        )
        or 0
    )


def outbox_counts(session: Session) -> dict[str, int]:
    """Number of outbox items per status."""
    rows = session.execute(select(OutboxItem.status, func.count()).group_by(OutboxItem.status))
    return {row[0]: row[1] for row in rows}
