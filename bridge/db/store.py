"""The bridge's queries, as plain functions taking a Session."""

from __future__ import annotations

import hashlib
import os
import secrets
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import ColumnElement, Row, String, cast, delete, func, literal, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from bridge.db.models import (
    Account,
    Base,
    ChatMigration,
    ChatSend,
    Delivery,
    ForumTopic,
    Job,
    Lease,
    Mailbox,
    Mute,
    OutboxItem,
    PostedMail,
    PostedSummary,
    ProcessedUpdate,
    utcnow,
)
from bridge.errors import DatabaseError, LeaseLost

# A claimed outbox item or job is taken over after this when its process died on another host
# (a send is bounded by the SMTP timeouts; a job may upload for up to 10 minutes).
OUTBOX_CLAIM = timedelta(seconds=60)
JOB_CLAIM = timedelta(minutes=15)
_SENDABLE = ("pending", "sending")  # "sending" once its claim can be taken over


def as_utc(moment: datetime) -> datetime:
    """A time read from the database as aware UTC (SQLite returns naive UTC values)."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _insert(session: Session, model: type[Base]) -> postgresql.Insert | sqlite.Insert:
    """INSERT for the session's database, so that it can say ON CONFLICT DO NOTHING/UPDATE."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        return postgresql.insert(model)
    if dialect == "sqlite":
        return sqlite.insert(model)
    raise DatabaseError(f"the {dialect} database is not supported: use PostgreSQL or SQLite")


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
    created_at: datetime | None = None  # when the watcher recorded it (delivery delay metric)


def ensure_account(session: Session, name: str) -> int:
    """The stable id of the account with this name, created on first use."""
    query = select(Account.id).where(Account.name == name)
    found = session.scalar(query)
    if found is not None:
        return found
    # Another instance may create it at the same moment: then its row is the one.
    session.execute(
        _insert(session, Account).values(name=name).on_conflict_do_nothing(index_elements=["name"])
    )
    return session.scalars(query).one()


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
    values = {"uidvalidity": uidvalidity, "last_uid": last_uid, "updated_at": utcnow()}
    statement = _insert(session, Mailbox).values(account_id=account_id, name=name, **values)
    mailbox_id = session.scalars(
        statement.on_conflict_do_update(
            index_elements=["account_id", "name"], set_=values
        ).returning(Mailbox.id)
    ).one()
    return MailboxState(mailbox_id, uidvalidity, last_uid)


def advance(session: Session, mailbox_id: int, uid: int) -> None:
    """Raise the folder's high-water mark to uid (never lowers it): one conditional UPDATE."""
    session.execute(
        update(Mailbox)
        .where(Mailbox.id == mailbox_id, Mailbox.last_uid < uid)
        .values(last_uid=uid, updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )


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
        mail_id = session.scalar(
            _insert(session, PostedMail)
            .values(_mail_row(mailbox_id, uidvalidity, record))
            .on_conflict_do_nothing(index_elements=["mailbox_id", "uidvalidity", "uid"])
            .returning(PostedMail.id)
        )
        if mail_id is None:
            continue  # recorded before
        rows = [
            {"posted_mail_id": mail_id, "chat_id": chat_id, "topic": topic}
            for chat_id, topic in dict.fromkeys(destinations)
        ]
        # One row per chat: a second topic in the same chat is not a second delivery.
        session.execute(
            _insert(session, Delivery)
            .values(rows)
            .on_conflict_do_nothing(index_elements=["posted_mail_id", "chat_id"])
        )
    advance(session, mailbox_id, up_to_uid)


def _mail_row(mailbox_id: int, uidvalidity: int, record: MailRecord) -> dict[str, object]:
    """The posted_mail columns of a mail."""
    return {
        "mailbox_id": mailbox_id,
        "uidvalidity": uidvalidity,
        "uid": record.uid,
        "message_id": record.message_id,
        "subject": record.subject,
        "sender": record.sender,
        "sender_name": record.sender_name,
        "reply_to": record.reply_to,
        "references": " ".join(record.references),
        "summary": record.summary,
        "attachments": record.attachments,
    }


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
PACING_KEPT = timedelta(minutes=2)  # chat_send rows older than the pacing window go

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
        PendingDelivery(
            d.id,
            d.chat_id,
            d.topic,
            d.attempts,
            _shown(mail, account, folder),
            as_utc(d.created_at),
        )
        for mail, account, folder, d in rows
    ]


def next_delivery_due(session: Session, chat_id: int) -> datetime | None:
    """When the next pending delivery to a chat is due, or None."""
    due = session.scalar(
        select(func.min(Delivery.next_attempt_at)).where(
            Delivery.chat_id == chat_id, Delivery.status == "pending"
        )
    )
    return None if due is None else as_utc(due)


def mark_delivered(
    session: Session, delivery_ids: Sequence[int], chat_id: int, telegram_message_id: int
) -> None:
    """Telegram accepted the message carrying these deliveries: they are done in this chat."""
    rows = session.scalars(select(Delivery).where(Delivery.id.in_(delivery_ids)))
    now = utcnow()
    for row in rows:
        row.status, row.telegram_message_id, row.sent_at = "sent", telegram_message_id, now
        row.attempts += 1
        record_summary(session, row.posted_mail_id, chat_id, telegram_message_id)


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
    session.execute(
        _insert(session, ChatMigration)
        .values(old_chat_id=old_chat_id, new_chat_id=new_chat_id)
        .on_conflict_do_nothing(index_elements=["old_chat_id"])
    )
    pending = (Delivery.chat_id == old_chat_id, Delivery.status == "pending")
    # A mail that waits for both chats waits once, in the new one.
    already = select(Delivery.posted_mail_id).where(Delivery.chat_id == new_chat_id)
    session.execute(
        delete(Delivery)
        .where(*pending, Delivery.posted_mail_id.in_(already))
        .execution_options(synchronize_session=False)
    )
    session.execute(
        update(Delivery)
        .where(*pending)
        .values(chat_id=new_chat_id)
        .execution_options(synchronize_session=False)
    )


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
    session.execute(
        _insert(session, ForumTopic)
        .values(chat_id=chat_id, name=name, thread_id=thread_id)
        .on_conflict_do_update(index_elements=["chat_id", "name"], set_={"thread_id": thread_id})
    )


def forget_topic(session: Session, chat_id: int, thread_id: int) -> None:
    """A topic Telegram no longer knows (deleted by a user)."""
    for row in session.scalars(
        select(ForumTopic).where(ForumTopic.chat_id == chat_id, ForumTopic.thread_id == thread_id)
    ):
        session.delete(row)


def muted_addresses(session: Session) -> set[str]:
    """Every muted sender address (lower case)."""
    return set(session.scalars(select(Mute.address)))


ADDRESS_MAX = 320  # mute.address: RFC 5321's 64 + 1 + 255


def add_mute(session: Session, address: str, user_id: int | None) -> bool:
    """Mute a sender; False when it was muted already."""
    added = session.scalar(
        _insert(session, Mute)
        .values(address=address.lower(), muted_by=user_id)
        .on_conflict_do_nothing(index_elements=["address"])
        .returning(Mute.id)
    )
    return added is not None


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
    session.execute(
        _insert(session, PostedSummary)
        .values(
            posted_mail_id=posted_mail_id,
            chat_id=chat_id,
            telegram_message_id=telegram_message_id,
            kind=kind,
        )
        .on_conflict_do_nothing(
            index_elements=["chat_id", "telegram_message_id", "posted_mail_id"]
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
    session.execute(
        _insert(session, PostedMail)
        .values(mailbox_id=target.id, uidvalidity=uidvalidity, uid=uid)
        .on_conflict_do_nothing(index_elements=["mailbox_id", "uidvalidity", "uid"])
    )


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
    session.execute(
        _insert(session, PostedMail)
        .values(_mail_row(box.id, uidvalidity, record))
        .on_conflict_do_nothing(index_elements=["mailbox_id", "uidvalidity", "uid"])
    )
    return session.scalars(
        select(PostedMail.id).where(
            PostedMail.mailbox_id == box.id,
            PostedMail.uidvalidity == uidvalidity,
            PostedMail.uid == record.uid,
        )
    ).one()


def set_summary(session: Session, posted_mail_id: int, summary: str, attachments: int) -> None:
    """Keep a summary rendered later (a search hit opened from the chat)."""
    mail = session.get_one(PostedMail, posted_mail_id)
    mail.summary, mail.attachments = summary, attachments


# --- Claims: which process sends an outbox item or runs a job ---
#
# A claim is a lease row named "outbox:<id>" or "job:<id>" held by this process (CLAIMER) until a
# deadline that the claimed row repeats (outbox_item.next_attempt_at, job.finished_at), so that
# idle waits know when it ends. Another process takes the work over once the deadline passed, or
# at once when the claimer ran on this host and is gone: a restart after a crash does what the
# crash interrupted without waiting for the deadline.


def _pid_namespace() -> int:
    """This process's pid namespace (a container has its own): pids compare only within one."""
    try:
        return Path("/proc/self/ns/pid").stat().st_ino
    except OSError:
        return 0


_HOST = f"{socket.gethostname()[:50]}:{_pid_namespace()}"
CLAIMER = f"{_HOST}-{os.getpid()}-{secrets.token_hex(3)}"  # this process, in claim rows


def new_holder() -> str:
    """A name for a lease holder in this process, in the form claimer_gone() understands."""
    return f"{_HOST}-{os.getpid()}-{secrets.token_hex(3)}"


def claimer_gone(holder: str | None) -> bool:
    """True when the process behind a claim is known to be gone: no claim row, or one made on
    this host (same pid namespace) by a pid that runs no more. Elsewhere the deadline decides."""
    if holder is None:
        return True
    if holder == CLAIMER or not holder.startswith(f"{_HOST}-"):
        return False
    pid = holder.removeprefix(f"{_HOST}-").split("-", 1)[0]
    if not pid.isdigit() or int(pid) <= 0:
        return False
    try:
        os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except OSError:
        return False  # it exists, under another user
    return False


def _takeable(
    session: Session,
    model: type[OutboxItem] | type[Job],
    deadline: Any,
    free: ColumnElement[bool],
    active: str,
    limit: int | None,
) -> list[Row[Any]]:
    """Rows (id, status, deadline, holder) that may be claimed now, oldest first: `free` ones, and
    `active` ones claimed on this host by a process that is gone.

    Rows another process is claiming at this moment are skipped (FOR UPDATE SKIP LOCKED on
    PostgreSQL)."""
    kind = model.__tablename__.split("_")[0]  # outbox_item: outbox, job: job
    claim = Lease.name == literal(f"{kind}:") + cast(model.id, String)
    query = (
        select(model.id, model.status, deadline.label("deadline"), Lease.holder)
        .outerjoin(Lease, claim)
        .order_by(model.id)
        .with_for_update(skip_locked=True, of=model)
    )
    rows = {row.id: row for row in session.execute(query.where(free).limit(limit))}
    local = query.where(
        model.status == active,
        Lease.holder.startswith(f"{_HOST}-", autoescape=True),
        Lease.holder != CLAIMER,
    )
    for row in session.execute(local):
        if claimer_gone(row.holder):
            rows.setdefault(row.id, row)
    return sorted(rows.values(), key=lambda row: int(row.id))[:limit]


def _claim(
    session: Session,
    model: type[OutboxItem] | type[Job],
    deadline: Any,
    free: ColumnElement[bool],
    active: str,
    until: datetime,
    limit: int,
) -> list[int]:
    """Claim up to limit rows for this process until a deadline; their ids, oldest first.

    Each claim is an UPDATE conditional on the row as it was read, so two processes never claim
    one row, on PostgreSQL or SQLite."""
    claimed = []
    for row in _takeable(session, model, deadline, free, active, limit):
        taken = session.execute(
            update(model)
            .where(model.id == row.id, model.status == row.status, deadline == row.deadline)
            .values({model.status: active, deadline: until})
            .returning(model.id)
            .execution_options(synchronize_session=False)
        ).scalar()
        if taken is not None:
            claimed.append(taken)
    if claimed:
        kind = model.__tablename__.split("_")[0]
        rows = [
            {"name": f"{kind}:{i}", "holder": CLAIMER, "token": 1, "expires_at": until}
            for i in claimed
        ]
        insert = _insert(session, Lease).values(rows)
        session.execute(
            insert.on_conflict_do_update(
                index_elements=["name"],
                set_={"holder": insert.excluded.holder, "expires_at": insert.excluded.expires_at},
            )
        )
    return claimed


def _release(session: Session, kind: str, ids: Sequence[int]) -> None:
    """The work is done (or given back): its claim rows go."""
    names = [f"{kind}:{i}" for i in ids]
    session.execute(
        delete(Lease).where(Lease.name.in_(names)).execution_options(synchronize_session=False)
    )


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
    return session.scalar(
        _insert(session, Job)
        .values(
            update_id=update_id,
            kind=kind,
            chat_id=chat_id,
            user_id=user_id,
            message_id=message_id,
            thread_id=thread_id,
            posted_mail_id=posted_mail_id,
            args=args,
        )
        .on_conflict_do_nothing(index_elements=["update_id"])  # NULLs never conflict
        .returning(Job.id)
    )


def _job_expired(now: datetime) -> ColumnElement[bool]:
    """Running under a claim whose deadline passed (or from before claims had one)."""
    return (Job.status == "running") & or_(Job.finished_at.is_(None), Job.finished_at <= now)


def claim_jobs(
    session: Session, limit: int, *, now: datetime | None = None, claim_for: timedelta = JOB_CLAIM
) -> list[JobRecord]:
    """Claim up to limit jobs, oldest first, for this process: running until now + claim_for
    (kept in finished_at while it runs); finish_job ends the claim. A job whose process died is
    taken over (see Claims above)."""
    now = now or utcnow()
    free = or_(Job.status == "pending", _job_expired(now))
    claimed = _claim(session, Job, Job.finished_at, free, "running", now + claim_for, limit)
    rows = session.scalars(select(Job).where(Job.id.in_(claimed)).order_by(Job.id))
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
    _release(session, "job", [job_id])


def give_back_job(session: Session, job_id: int) -> None:
    """A job this process stopped before it ended (the service is stopping): pending again,
    for the next start or another instance, at once."""
    session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == "running")
        .values(status="pending", finished_at=None)
        .execution_options(synchronize_session=False)
    )
    _release(session, "job", [job_id])


def requeue_running_jobs(session: Session) -> int:
    """At start: running jobs a crash interrupted (their process is gone, or their claim
    expired) are pending again. Jobs another live instance runs keep their claim."""
    rows = _takeable(session, Job, Job.finished_at, _job_expired(utcnow()), "running", None)
    ids = [row.id for row in rows]
    session.execute(
        update(Job)
        .where(Job.id.in_(ids))
        .values(status="pending", finished_at=None)
        .execution_options(synchronize_session=False)
    )
    _release(session, "job", ids)
    return len(ids)


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
    return session.scalar(
        _insert(session, OutboxItem)
        .values(
            account_id=account_id,
            chat_id=chat_id,
            user_id=user_id,
            source_message_id=source_message_id,
            message_id=message_id,
            recipients="\n".join(recipients),
            subject=subject,
            raw=raw,
        )
        # NULLs never conflict: a mail not from a chat message is always stored.
        .on_conflict_do_nothing(index_elements=["chat_id", "source_message_id"])
        .returning(OutboxItem.id)
    )


def due_outbox(
    session: Session, now: datetime, limit: int = 1, claim_for: timedelta = OUTBOX_CLAIM
) -> list[OutgoingRecord]:
    """Claim due items, oldest first, for this process to send: "sending" until now + claim_for
    (kept in next_attempt_at); mark_outbox ends the claim. An item whose process died is taken
    over (see Claims above), so two instances never send one item."""
    due = OutboxItem.status.in_(_SENDABLE) & (OutboxItem.next_attempt_at <= now)
    until = now + claim_for
    claimed = _claim(session, OutboxItem, OutboxItem.next_attempt_at, due, "sending", until, limit)
    rows = session.execute(
        select(OutboxItem, Account.name)
        .outerjoin(Account, OutboxItem.account_id == Account.id)
        .where(OutboxItem.id.in_(claimed))
        .order_by(OutboxItem.id)
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
            as_utc(r.created_at),
        )
        for r, account in rows
    ]


def next_outbox_due(session: Session) -> datetime | None:
    """When the next item is due (or a claim expires), or None when nothing waits."""
    due = session.scalar(
        select(func.min(OutboxItem.next_attempt_at)).where(OutboxItem.status.in_(_SENDABLE))
    )
    return None if due is None else as_utc(due)


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
    _release(session, "outbox", [item_id])


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


# --- Leases: who does what when several instances share the database (bridge/leases.py) ---


def take_lease(session: Session, name: str, holder: str, until: datetime) -> int | None:
    """Take a free or expired lease, or renew our own; its fencing token, or None when another
    instance holds it. A lease that expired gets a new token, even for its last holder."""
    now = utcnow()
    row = session.scalar(select(Lease).where(Lease.name == name).with_for_update())
    if row is None:
        try:
            with session.begin_nested():
                session.add(Lease(name=name, holder=holder, token=1, expires_at=until))
        except IntegrityError:
            return None  # another instance took it this very moment
        return 1
    # Expired, or its holder ran on this host and is gone (a crash, a kill): take it over now,
    # without waiting out the lease.
    if as_utc(row.expires_at) <= now or (row.holder != holder and claimer_gone(row.holder)):
        row.holder, row.token, row.expires_at = holder, row.token + 1, until
        return row.token
    if row.holder == holder:
        row.expires_at = until
        return row.token
    return None


INSTANCE = "instance:"  # lease rows that only say "this instance is alive" (lease_round)
_FREE = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class LeasePlan:
    """One lease round's outcome for one instance."""

    held: dict[str, int]  # lease name -> fencing token: the work to run here now
    surplus: tuple[str, ...]  # ours beyond our share (renewed): stop that work, then release
    instances: int  # live instances sharing this work, this one included


def lease_round(session: Session, holder: str, names: Sequence[str], until: datetime) -> LeasePlan:
    """Renew our leases, take free ones, and say which of ours to hand over, in one
    transaction, so that the work `names` spreads evenly over the live instances.

    Every instance keeps an `instance:<work digest>:<holder>` row alive; instances with the
    same work (the same digest) share it: each holds at most ceil(work / live instances).
    A lease is free when it expired or its holder ran on this host and is gone. A lease that
    expired gets a new token, even for its last holder.
    """
    now = utcnow()
    digest = hashlib.sha256("\n".join(sorted(names)).encode()).hexdigest()[:12]
    peers = f"{INSTANCE}{digest}:"
    beat = session.get(Lease, peers + holder, with_for_update=True)
    if beat is None:
        session.add(Lease(name=peers + holder, holder=holder, token=1, expires_at=until))
    else:
        beat.expires_at = until
    session.execute(  # instances that died long ago
        delete(Lease)
        .where(Lease.name.startswith(INSTANCE), Lease.expires_at < now - timedelta(hours=1))
        .execution_options(synchronize_session=False)
    )
    beats = session.scalars(
        select(Lease.holder).where(Lease.name.startswith(peers), Lease.expires_at > now)
    )
    instances = len({h for h in beats if h == holder or not claimer_gone(h)} | {holder})
    share = -(-len(names) // instances)
    # Rows for our work, locked in name order (two instances' rounds never deadlock).
    locked = select(Lease).where(Lease.name.in_(names)).order_by(Lease.name).with_for_update()
    rows = {row.name: row for row in session.scalars(locked)}
    if len(rows) < len(names):
        missing = [{"name": n, "holder": "", "token": 0, "expires_at": _FREE} for n in names]
        session.execute(
            _insert(session, Lease)
            .values([m for m in missing if m["name"] not in rows])
            .on_conflict_do_nothing(index_elements=["name"])
        )
        rows = {row.name: row for row in session.scalars(locked)}
    mine: list[Lease] = []
    free: list[Lease] = []
    for name in names:  # in the order the work was added: the first ones stay put
        row = rows[name]
        if as_utc(row.expires_at) > now and row.holder == holder:
            mine.append(row)
        elif as_utc(row.expires_at) <= now or claimer_gone(row.holder):
            free.append(row)
    keep, surplus = mine[:share], mine[share:]
    taken = free[: max(0, share - len(keep))]
    for row in keep + surplus:
        row.expires_at = until
    for row in taken:
        row.holder, row.token, row.expires_at = holder, row.token + 1, until
    return LeasePlan(
        held={row.name: row.token for row in keep + taken},
        surplus=tuple(row.name for row in surplus),
        instances=instances,
    )


def holds_lease(session: Session, name: str, holder: str, token: int) -> bool:
    """Fencing: True when this holder still has the lease under this token and it is valid."""
    row = session.get(Lease, name)
    return (
        row is not None
        and row.holder == holder
        and row.token == token
        and as_utc(row.expires_at) > utcnow()
    )


def release_leases(
    session: Session, names: Sequence[str], holder: str, *, leaving: bool = False
) -> None:
    """Our leases `names` expire now, so that another instance takes them at once (a clean
    stop, or work handed over); `leaving`: this instance no longer counts as alive either."""
    now = utcnow()
    for row in session.scalars(select(Lease).where(Lease.name.in_(names))):
        if row.holder == holder:
            row.expires_at = now
    if leaving:
        session.execute(
            update(Lease)
            .where(Lease.name.startswith(INSTANCE), Lease.holder == holder)
            .values(expires_at=now)
            .execution_options(synchronize_session=False)
        )


def lease_holders(session: Session) -> dict[str, str]:
    """Lease name -> holder, for leases that are valid now (for /status and tests)."""
    now = utcnow()
    return {
        row.name: row.holder
        for row in session.scalars(select(Lease))
        if as_utc(row.expires_at) > now
    }


def record_mails_fenced(
    session: Session,
    fence: tuple[str, str, int] | None,
    mailbox_id: int,
    uidvalidity: int,
    entries: Sequence[tuple[MailRecord, Sequence[tuple[int, str]]]],
    up_to_uid: int,
) -> None:
    """record_mails, only while the watcher's lease (name, holder, token) is still its own."""
    if fence is not None and not holds_lease(session, *fence):
        raise LeaseLost(f"lease {fence[0]} was taken over; not recording")
    record_mails(session, mailbox_id, uidvalidity, entries, up_to_uid)


def mark_delivered_and_paced(
    session: Session, delivery_ids: Sequence[int], chat_id: int, telegram_message_id: int
) -> None:
    """mark_delivered, and count the message for the chat's pacing across instances."""
    mark_delivered(session, delivery_ids, chat_id, telegram_message_id)
    now = utcnow()
    session.add(ChatSend(chat_id=chat_id, sent_at=now))
    old = delete(ChatSend).where(ChatSend.chat_id == chat_id, ChatSend.sent_at < now - PACING_KEPT)
    session.execute(old.execution_options(synchronize_session=False))


def recent_sends(session: Session, chat_id: int, since: datetime) -> list[datetime]:
    """When messages went to a chat since a moment (any instance), oldest first."""
    rows = session.scalars(
        select(ChatSend.sent_at)
        .where(ChatSend.chat_id == chat_id, ChatSend.sent_at >= since)
        .order_by(ChatSend.sent_at)
    )
    return [as_utc(when) for when in rows]


# --- OAuth2 tokens (bridge/oauth.py): both tokens arrive and leave Fernet-encrypted ---
# (Appended as one block while store.py's inserts change elsewhere; its import stays here.)

from bridge.db.models import OAuthToken  # noqa: E402


@dataclass(frozen=True)
class StoredTokens:
    """An account's OAuth2 sign-in as stored: access and refresh token still encrypted."""

    access_token: str
    refresh_token: str
    expires_at: datetime | None
    scope: str
    revoked: bool
    told: bool
    updated_at: datetime


def get_oauth_tokens(session: Session, account: str) -> StoredTokens | None:
    """The account's stored sign-in, or None when it never signed in."""
    row = session.get(OAuthToken, ensure_account(session, account))
    if row is None:
        return None
    return StoredTokens(
        access_token=row.access_token,
        refresh_token=row.refresh_token,
        expires_at=as_utc(row.expires_at) if row.expires_at is not None else None,
        scope=row.scope,
        revoked=row.revoked,
        told=row.told,
        updated_at=as_utc(row.updated_at),
    )


def save_oauth_tokens(
    session: Session,
    account: str,
    *,
    access_token: str,
    refresh_token: str,
    expires_at: datetime | None,
    scope: str,
) -> None:
    """Store a sign-in or a refresh (always the newest refresh token); clears revoked/told."""
    account_id = ensure_account(session, account)
    row = session.get(OAuthToken, account_id)
    if row is None:
        row = OAuthToken(account_id=account_id)
        session.add(row)
    row.access_token, row.refresh_token = access_token, refresh_token
    row.expires_at, row.scope = expires_at, scope
    row.revoked, row.told = False, False
    row.updated_at = utcnow()


def revoke_oauth_tokens(session: Session, account: str) -> bool:
    """Mark the sign-in revoked and forget both tokens; False when it already was."""
    row = session.get(OAuthToken, ensure_account(session, account))
    if row is None or row.revoked:
        return False
    row.revoked, row.access_token, row.refresh_token = True, "", ""
    row.updated_at = utcnow()
    return True


def claim_oauth_told(session: Session, account: str) -> bool:
    """True exactly once per revocation, for the one caller that tells the chat."""
    account_id = ensure_account(session, account)
    # One UPDATE decides: two instances (or two tasks) cannot both see told = false.
    claimed = session.scalars(
        update(OAuthToken)
        .where(
            OAuthToken.account_id == account_id,
            OAuthToken.revoked.is_(True),
            OAuthToken.told.is_(False),
        )
        .values(told=True)
        .returning(OAuthToken.account_id)
    ).all()
    return bool(claimed)


# --- Webhook mode: an update handled once, whichever instance it reached ---


UPDATE_TAKEOVER = timedelta(minutes=2)  # an update taken this long ago and not done: a crash


def claim_update(session: Session, update_id: int) -> str:
    """Take an update for handling: "new" (handle it), "done" (handled already) or "busy"
    (another instance handles it now). One taken long ago and never finished was left by a
    crash: it is taken again."""
    now = utcnow()
    row = session.get(ProcessedUpdate, update_id, with_for_update=True)
    if row is None:
        try:
            with session.begin_nested():
                session.add(ProcessedUpdate(update_id=update_id, processed_at=now, done=False))
        except IntegrityError:
            return "busy"  # another instance took it this very moment
        return "new"
    if row.done:
        return "done"
    if as_utc(row.processed_at) > now - UPDATE_TAKEOVER:
        return "busy"
    row.processed_at = now
    return "new"


def finish_update(session: Session, update_id: int, handled: bool) -> None:
    """Handled: remember it (and forget those older than a day, Telegram keeps 24 h); not
    handled (an error): let it be taken again."""
    row = session.get(ProcessedUpdate, update_id)
    if row is not None and not handled:
        session.delete(row)
    elif row is not None:
        row.done = True
    old = delete(ProcessedUpdate).where(
        ProcessedUpdate.processed_at < utcnow() - timedelta(days=1)
    )
    session.execute(old.execution_options(synchronize_session=False))
