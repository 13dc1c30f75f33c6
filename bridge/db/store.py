"""The bridge's queries, as plain functions taking a Session."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from bridge.db.models import (
    Account,
    ChatMigration,
    Delivery,
    ForumTopic,
    Job,
    Mailbox,
    Mute,
    OutboxItem,
    PostedMail,
    PostedSummary,
    utcnow,
)


@dataclass(frozen=True)
class MailboxState:
    """What the watcher knows of a folder."""

    id: int
    uidvalidity: int
    last_uid: int


@dataclass(frozen=True)
class MailRecord:
    """The facts about a mail that a reply, a digest line and a re-post need."""

    uid: int
    message_id: str
    subject: str
    sender: str
    reply_to: str
    references: tuple[str, ...]
    sender_name: str = ""
    summary: str = ""
    attachments: int = 0


@dataclass(frozen=True)
class ShownMail:
    """A mail shown in a chat: its record, its row id, the account it came to, and where it
    is now (buttons move it) with its state."""

    posted_mail_id: int
    account: str
    folder: str
    record: MailRecord
    uidvalidity: int = 0
    location_folder: str = ""  # "" : still in `folder`
    location_uidvalidity: int = 0
    location_uid: int = 0
    state: str = ""  # "", archived, deleted, spam
    seen: bool = False

    @property
    def where(self) -> tuple[str, int, int]:
        """(folder, UIDVALIDITY, UID) where the mail is now."""
        if self.location_folder:
            return self.location_folder, self.location_uidvalidity, self.location_uid
        return self.folder, self.uidvalidity, self.record.uid


@dataclass(frozen=True)
class PendingDelivery:
    """A mail waiting for one chat (and topic)."""

    id: int
    chat_id: int
    topic: str
    attempts: int
    mail: ShownMail


def ensure_account(session: Session, name: str) -> int:
    """The stable id of the account with this name, created on first use."""
    found = session.scalar(select(Account.id).where(Account.name == name))
    if found is not None:
        return found
    account = Account(name=name)
    session.add(account)
    session.flush()
    return account.id


def get_mailbox(session: Session, account_id: int, name: str) -> MailboxState | None:
    """The stored state of a folder, or None on first contact."""
    row = session.scalar(
        select(Mailbox).where(Mailbox.account_id == account_id, Mailbox.name == name)
    )
    return None if row is None else MailboxState(row.id, row.uidvalidity, row.last_uid)


def reset_mailbox(
    session: Session, account_id: int, name: str, uidvalidity: int, last_uid: int
) -> MailboxState:
    """Start a folder afresh (first contact, new UIDVALIDITY): UIDs <= last_uid count as seen."""
    row = session.scalar(
        select(Mailbox).where(Mailbox.account_id == account_id, Mailbox.name == name)
    )
    if row is None:
        row = Mailbox(account_id=account_id, name=name, uidvalidity=uidvalidity, last_uid=last_uid)
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


def record_mails(
    session: Session,
    mailbox_id: int,
    uidvalidity: int,
    entries: Sequence[tuple[MailRecord, Sequence[tuple[int, str]]]],
    up_to_uid: int,
) -> None:
    """Hand mails to delivery: one pending row per (chat, topic), and the cursor past them.

    In one transaction, so a crash leaves each mail either unseen or queued, never lost. A mail
    recorded before (a repeat after a crash) is not queued again.
    """
    for record, destinations in entries:
        if not destinations:
            continue  # muted: seen, posted nowhere
        seen = session.scalar(
            select(PostedMail.id).where(
                PostedMail.mailbox_id == mailbox_id,
                PostedMail.uidvalidity == uidvalidity,
                PostedMail.uid == record.uid,
            )
        )
        if seen is not None:
            continue
        mail = PostedMail(
            mailbox_id=mailbox_id,
            uidvalidity=uidvalidity,
            uid=record.uid,
            message_id=record.message_id,
            subject=record.subject,
            sender=record.sender,
            sender_name=record.sender_name,
            reply_to=record.reply_to,
            references=" ".join(record.references),
            summary=record.summary,
            attachments=record.attachments,
        )
        session.add(mail)
        session.flush()
        for chat_id, topic in dict.fromkeys(destinations):
            session.add(Delivery(posted_mail_id=mail.id, chat_id=chat_id, topic=topic))
    advance(session, mailbox_id, up_to_uid)


def _shown(mail: PostedMail, account: str, folder: str) -> ShownMail:
    return ShownMail(
        posted_mail_id=mail.id,
        account=account,
        folder=folder,
        uidvalidity=mail.uidvalidity,
        location_folder=mail.location_folder,
        location_uidvalidity=mail.location_uidvalidity or 0,
        location_uid=mail.location_uid or 0,
        state=mail.state,
        seen=mail.seen,
        record=MailRecord(
            uid=mail.uid,
            message_id=mail.message_id,
            subject=mail.subject,
            sender=mail.sender,
            reply_to=mail.reply_to,
            references=tuple(mail.references.split()),
            sender_name=mail.sender_name,
            summary=mail.summary,
            attachments=mail.attachments,
        ),
    )


SHOWING = ("summary", "list")  # what find_by_summary resolves a reply to

_SHOWN = (
    select(PostedMail, Account.name, Mailbox.name)
    .join(Mailbox, PostedMail.mailbox_id == Mailbox.id)
    .join(Account, Mailbox.account_id == Account.id)
)


def pending_chats(session: Session, now: datetime) -> list[int]:
    """Chats with deliveries due now."""
    rows = session.scalars(
        select(Delivery.chat_id)
        .where(Delivery.status == "pending", Delivery.next_attempt_at <= now)
        .distinct()
    )
    return list(rows)


def due_deliveries(
    session: Session, chat_id: int, now: datetime, limit: int = 500
) -> list[PendingDelivery]:
    """What waits for a chat, oldest first (UID order within each folder)."""
    rows = session.execute(
        _SHOWN.add_columns(Delivery)
        .join(Delivery, Delivery.posted_mail_id == PostedMail.id)
        .where(
            Delivery.chat_id == chat_id,
            Delivery.status == "pending",
            Delivery.next_attempt_at <= now,
        )
        .order_by(Delivery.id)
        .limit(limit)
    )
    return [
        PendingDelivery(d.id, d.chat_id, d.topic, d.attempts, _shown(mail, account, folder))
        for mail, account, folder, d in rows
    ]


def next_delivery_due(session: Session, chat_id: int) -> datetime | None:
    """When the next pending delivery to a chat is due, or None."""
    return session.scalar(
        select(func.min(Delivery.next_attempt_at)).where(
            Delivery.chat_id == chat_id, Delivery.status == "pending"
        )
    )


def mark_delivered(
    session: Session, delivery_ids: Sequence[int], chat_id: int, telegram_message_id: int
) -> None:
    """Telegram accepted the message carrying these deliveries: they are done in this chat."""
    rows = session.scalars(select(Delivery).where(Delivery.id.in_(delivery_ids)))
    now = utcnow()
    for row in rows:
        row.status, row.telegram_message_id, row.sent_at = "sent", telegram_message_id, now
        row.attempts += 1
        session.add(
            PostedSummary(
                posted_mail_id=row.posted_mail_id,
                chat_id=chat_id,
                telegram_message_id=telegram_message_id,
            )
        )


def postpone_deliveries(
    session: Session, delivery_ids: Sequence[int], error: str, next_attempt_at: datetime
) -> None:
    """Not accepted (the chat is gone, forbidden, ...): try again later, keep the reason."""
    rows = session.scalars(select(Delivery).where(Delivery.id.in_(delivery_ids)))
    for row in rows:
        row.attempts += 1
        row.last_error, row.next_attempt_at = error[:500], next_attempt_at


def move_chat(session: Session, old_chat_id: int, new_chat_id: int) -> None:
    """Telegram migrated a group to a supergroup: its pending mail and topics follow it."""
    if session.get(ChatMigration, old_chat_id) is None:
        session.add(ChatMigration(old_chat_id=old_chat_id, new_chat_id=new_chat_id))
    for row in session.scalars(
        select(Delivery).where(Delivery.chat_id == old_chat_id, Delivery.status == "pending")
    ):
        row.chat_id = new_chat_id


def chat_migrations(session: Session) -> dict[int, int]:
    """Old group id -> new supergroup id, for every migration seen."""
    rows = session.execute(select(ChatMigration.old_chat_id, ChatMigration.new_chat_id))
    return {int(old): int(new) for old, new in rows.all()}


def get_topic(session: Session, chat_id: int, name: str) -> int | None:
    """The thread id of a forum topic the bridge created by name, or None."""
    return session.scalar(
        select(ForumTopic.thread_id).where(ForumTopic.chat_id == chat_id, ForumTopic.name == name)
    )


def save_topic(session: Session, chat_id: int, name: str, thread_id: int) -> None:
    """Remember a forum topic (replacing a deleted one of the same name)."""
    row = session.scalar(
        select(ForumTopic).where(ForumTopic.chat_id == chat_id, ForumTopic.name == name)
    )
    if row is None:
        session.add(ForumTopic(chat_id=chat_id, name=name, thread_id=thread_id))
    else:
        row.thread_id = thread_id


def forget_topic(session: Session, chat_id: int, thread_id: int) -> None:
    """A topic Telegram no longer knows (deleted by a user)."""
    for row in session.scalars(
        select(ForumTopic).where(ForumTopic.chat_id == chat_id, ForumTopic.thread_id == thread_id)
    ):
        session.delete(row)


def muted_addresses(session: Session) -> set[str]:
    """Every muted sender address (lower case)."""
    return set(session.scalars(select(Mute.address)))


def add_mute(session: Session, address: str, user_id: int | None) -> bool:
    """Mute a sender; False when it was muted already."""
    address = address.lower()
    if session.scalar(select(Mute.id).where(Mute.address == address)) is not None:
        return False
    session.add(Mute(address=address, muted_by=user_id))
    return True


def remove_mute(session: Session, address: str) -> bool:
    """End a mute; False when that address was not muted."""
    row = session.scalar(select(Mute).where(Mute.address == address.lower()))
    if row is None:
        return False
    session.delete(row)
    return True


def find_by_summary(
    session: Session, chat_id: int, telegram_message_id: int, kinds: Sequence[str] = SHOWING
) -> list[ShownMail]:
    """The mails a Telegram message in a chat shows (several for a combined message or a
    list of search results)."""
    rows = session.execute(
        _SHOWN.join(PostedSummary, PostedSummary.posted_mail_id == PostedMail.id)
        .where(
            PostedSummary.chat_id == chat_id,
            PostedSummary.telegram_message_id == telegram_message_id,
            PostedSummary.kind.in_(kinds),
        )
        .order_by(PostedMail.id)
    )
    return [_shown(mail, account, folder) for mail, account, folder in rows]


def find_in_chat(session: Session, chat_id: int, posted_mail_id: int) -> ShownMail | None:
    """A mail by its row id, only if it was shown in (or is waiting for) this chat.

    Callback data comes back from the client: the row must belong to the chat it came from.
    """
    shown = select(PostedSummary.id).where(
        PostedSummary.posted_mail_id == posted_mail_id, PostedSummary.chat_id == chat_id
    )
    waiting = select(Delivery.id).where(
        Delivery.posted_mail_id == posted_mail_id, Delivery.chat_id == chat_id
    )
    if session.scalar(shown.limit(1)) is None and session.scalar(waiting.limit(1)) is None:
        return None
    row = session.execute(_SHOWN.where(PostedMail.id == posted_mail_id)).first()
    return None if row is None else _shown(*row)


def record_summary(
    session: Session,
    posted_mail_id: int,
    chat_id: int,
    telegram_message_id: int,
    kind: str = "summary",
) -> None:
    """Remember that a chat shows this mail as telegram_message_id (a re-posted summary, a
    search result, or the bot's "forward to whom?" question: `kind`)."""
    session.add(
        PostedSummary(
            posted_mail_id=posted_mail_id,
            chat_id=chat_id,
            telegram_message_id=telegram_message_id,
            kind=kind,
        )
    )


def set_location(
    session: Session, posted_mail_id: int, folder: str, uidvalidity: int, uid: int, state: str
) -> None:
    """A button moved the mail (or found it elsewhere): where it is now and why."""
    mail = session.get_one(PostedMail, posted_mail_id)
    mail.location_folder, mail.location_uidvalidity, mail.location_uid = folder, uidvalidity, uid
    mail.state = state
    # A watched folder must not post the mail as new: it is already known.
    mark_known(session, mail.mailbox_id, folder, uidvalidity, uid)


def mark_known(session: Session, mailbox_id: int, folder: str, uidvalidity: int, uid: int) -> None:
    """The mail at (folder, uidvalidity, uid) of the same account counts as seen by the bridge
    (Undo moves a mail back: it is no new mail)."""
    account_id = session.scalar(select(Mailbox.account_id).where(Mailbox.id == mailbox_id))
    target = session.scalar(
        select(Mailbox).where(
            Mailbox.account_id == account_id,
            Mailbox.name == folder,
            Mailbox.uidvalidity == uidvalidity,
        )
    )
    if target is None:
        return  # not watched: nothing would post it
    known = session.scalar(
        select(PostedMail.id).where(
            PostedMail.mailbox_id == target.id,
            PostedMail.uidvalidity == uidvalidity,
            PostedMail.uid == uid,
        )
    )
    if known is None:
        session.add(PostedMail(mailbox_id=target.id, uidvalidity=uidvalidity, uid=uid))


def set_seen(session: Session, posted_mail_id: int, seen: bool) -> None:
    """The mail's \\Seen flag as the bridge last set or read it."""
    session.get_one(PostedMail, posted_mail_id).seen = seen


def ensure_mail(
    session: Session, account: str, folder: str, uidvalidity: int, record: MailRecord
) -> int | None:
    """The row of a mail found by /search (created when the bridge never posted it); None when
    the folder is not one the bridge watches."""
    box = session.scalar(
        select(Mailbox)
        .join(Account, Mailbox.account_id == Account.id)
        .where(Account.name == account, Mailbox.name == folder)
    )
    if box is None:
        return None
    found = session.scalar(
        select(PostedMail.id).where(
            PostedMail.mailbox_id == box.id,
            PostedMail.uidvalidity == uidvalidity,
            PostedMail.uid == record.uid,
        )
    )
    if found is not None:
        return found
    mail = PostedMail(
        mailbox_id=box.id,
        uidvalidity=uidvalidity,
        uid=record.uid,
        message_id=record.message_id,
        subject=record.subject,
        sender=record.sender,
        sender_name=record.sender_name,
        reply_to=record.reply_to,
        references=" ".join(record.references),
    )
    session.add(mail)
    session.flush()
    return mail.id


def set_summary(session: Session, posted_mail_id: int, summary: str, attachments: int) -> None:
    """Keep a summary rendered later (a search hit opened from the chat)."""
    mail = session.get_one(PostedMail, posted_mail_id)
    mail.summary, mail.attachments = summary, attachments


@dataclass(frozen=True)
class JobRecord:
    """Work a press or a command asked for."""

    id: int
    kind: str
    chat_id: int
    user_id: int | None
    message_id: int | None
    thread_id: int | None
    posted_mail_id: int | None
    args: str
    attempts: int


def add_job(
    session: Session,
    *,
    update_id: int | None,
    kind: str,
    chat_id: int,
    user_id: int | None = None,
    message_id: int | None = None,
    thread_id: int | None = None,
    posted_mail_id: int | None = None,
    args: str = "",
) -> int | None:
    """Store a job; None when this update was stored before (Telegram re-delivered it)."""
    if update_id is not None:
        seen = session.scalar(select(Job.id).where(Job.update_id == update_id))
        if seen is not None:
            return None
    job = Job(
        update_id=update_id,
        kind=kind,
        chat_id=chat_id,
        user_id=user_id,
        message_id=message_id,
        thread_id=thread_id,
        posted_mail_id=posted_mail_id,
        args=args,
    )
    session.add(job)
    session.flush()
    return job.id


def claim_jobs(session: Session, limit: int) -> list[JobRecord]:
    """Pending jobs, oldest first, marked running (a restart finds them pending again)."""
    rows = list(
        session.scalars(select(Job).where(Job.status == "pending").order_by(Job.id).limit(limit))
    )
    for row in rows:
        row.status = "running"
    return [
        JobRecord(
            r.id,
            r.kind,
            r.chat_id,
            r.user_id,
            r.message_id,
            r.thread_id,
            r.posted_mail_id,
            r.args,
            0,
        )
        for r in rows
    ]


def finish_job(session: Session, job_id: int, status: str, error: str = "") -> None:
    """done or failed (with the one line the chat was told)."""
    job = session.get_one(Job, job_id)
    job.status, job.error, job.finished_at = status, error[:500], utcnow()


def requeue_running_jobs(session: Session) -> int:
    """At start: jobs a crash interrupted are pending again."""
    rows = list(session.scalars(select(Job).where(Job.status == "running")))
    for row in rows:
        row.status = "pending"
    return len(rows)


def list_mutes(session: Session) -> list[str]:
    """Muted senders, alphabetically."""
    return list(session.scalars(select(Mute.address).order_by(Mute.address)))


def count_posted(session: Session) -> int:
    """How many mails have been posted, all time."""
    return session.scalar(select(func.count()).select_from(PostedMail)) or 0


@dataclass(frozen=True)
class OutgoingRecord:
    """An outbox row as the worker needs it."""

    id: int
    account: str | None  # None: stored before accounts existed (the first account sends it)
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
    account_id: int | None = None,
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
        account_id=account_id,
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
    rows = session.execute(
        select(OutboxItem, Account.name)
        .outerjoin(Account, OutboxItem.account_id == Account.id)
        .where(OutboxItem.status == "pending", OutboxItem.next_attempt_at <= now)
        .order_by(OutboxItem.id)
        .limit(limit)
    )
    return [
        OutgoingRecord(
            r.id,
            account,
            r.chat_id,
            r.message_id,
            tuple(r.recipients.split("\n")),
            r.subject,
            r.raw,
            r.attempts,
            r.created_at,
        )
        for r, account in rows
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
