"""The store: what was posted, what waits, what is sent; on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from bridge.db import store
from bridge.db.engine import Database, make_engine
from bridge.db.migrate import upgrade_to_head
from bridge.db.models import ChatMigration, Delivery, PostedMail, PostedSummary

pytestmark = pytest.mark.databases("sqlite", "postgresql")


@pytest.fixture
def db(database_url: str) -> Iterator[Database]:
    """A migrated database (created by upgrade head, never create_all)."""
    engine = make_engine(database_url)
    upgrade_to_head(engine)
    yield Database(engine)
    engine.dispose()


def _record(uid: int, subject: str = "Hello") -> store.MailRecord:
    return store.MailRecord(
        uid=uid,
        message_id=f"<{uid}@x>",
        subject=subject,
        sender="bob@x.org",
        reply_to="list@x.org",
        references=("<r1@x>", "<r2@x>"),
        sender_name="Bob",
        summary=f"<b>{subject}</b>",
    )


def _outgoing(**kw: Any) -> dict[str, Any]:
    """add_outbox arguments for a small mail."""
    return {
        "chat_id": 5,
        "user_id": 5,
        "message_id": "<m@x>",
        "recipients": ["a@x.org"],
        "subject": "S",
        "raw": b"raw",
    } | kw


def _count(db: Database, query: Any) -> int:
    return db.call(lambda s: s.scalar(select(func.count()).select_from(query)))


def test_sqlite_folder_created_file_owner_only_and_wal(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path}/sub/bridge.db")
    upgrade_to_head(engine)
    path = tmp_path / "sub" / "bridge.db"
    assert path.is_file()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
    engine.dispose()


def test_mailbox_state_and_high_water_mark(db: Database) -> None:
    home = db.call(store.ensure_account, "home")
    assert db.call(store.ensure_account, "home") == home  # stable: by name
    assert db.call(store.get_mailbox, home, "INBOX") is None
    state = db.call(store.reset_mailbox, home, "INBOX", 77, 10)
    db.call(store.advance, state.id, 12)
    db.call(store.advance, state.id, 11)  # never lowers
    assert db.call(store.get_mailbox, home, "INBOX") == store.MailboxState(state.id, 77, 12)
    again = db.call(store.reset_mailbox, home, "INBOX", 78, 3)  # new UIDVALIDITY
    assert again == store.MailboxState(state.id, 78, 3)
    assert db.call(store.get_mailbox, home, "INBOX") == again
    work = db.call(store.ensure_account, "work")
    assert db.call(store.get_mailbox, work, "INBOX") is None  # same folder name, other account


def test_recorded_mail_waits_per_chat_until_delivered(db: Database) -> None:
    account = db.call(store.ensure_account, "home")
    box = db.call(store.reset_mailbox, account, "Lists", 5, 0)
    now = datetime.now(UTC) + timedelta(seconds=1)
    entries = [
        (_record(3), [(1001, ""), (-100, "GitHub")]),
        (_record(4, "Muted"), []),  # muted: seen, queued nowhere
        (_record(6, "Later"), [(1001, "")]),
    ]
    db.call(store.record_mails, box.id, 5, entries, 7)
    assert db.call(store.get_mailbox, account, "Lists").last_uid == 7  # the cursor moved with it
    db.call(store.record_mails, box.id, 5, entries[:1], 7)  # a repeat after a crash: not queued
    assert sorted(db.call(store.pending_chats, now)) == [-100, 1001]
    waiting = db.call(store.due_deliveries, 1001, now)
    assert [(d.mail.record.uid, d.topic) for d in waiting] == [(3, ""), (6, "")]
    assert (waiting[0].mail.account, waiting[0].mail.folder) == ("home", "Lists")
    assert waiting[0].mail.record == _record(3)
    assert [d.topic for d in db.call(store.due_deliveries, -100, now)] == ["GitHub"]
    # One combined message carried both mails: each is delivered, a reply finds both.
    db.call(store.mark_delivered, [d.id for d in waiting], 1001, 50)
    assert db.call(store.pending_chats, now) == [-100]
    shown = db.call(store.find_by_summary, 1001, 50)
    assert [m.record.uid for m in shown] == [3, 6]
    assert db.call(store.find_by_summary, -100, 50) == []  # same message id, other chat
    assert db.call(store.count_posted) == 2


def test_two_topics_in_one_chat_are_one_delivery(db: Database) -> None:
    box = db.call(store.reset_mailbox, db.call(store.ensure_account, "a"), "INBOX", 1, 0)
    db.call(store.record_mails, box.id, 1, [(_record(1), [(7, "One"), (7, "Two")])], 1)
    now = datetime.now(UTC) + timedelta(seconds=1)
    assert [d.topic for d in db.call(store.due_deliveries, 7, now)] == ["One"]


def test_refused_chat_is_postponed_and_a_migrated_one_followed(db: Database) -> None:
    box = db.call(store.reset_mailbox, db.call(store.ensure_account, "a"), "INBOX", 1, 0)
    db.call(store.record_mails, box.id, 1, [(_record(1), [(-5, ""), (7, "")])], 1)
    now = datetime.now(UTC) + timedelta(seconds=1)
    (item,) = db.call(store.due_deliveries, 7, now)
    db.call(store.postpone_deliveries, [item.id], "Forbidden: kicked", now + timedelta(hours=1))
    assert db.call(store.pending_chats, now) == [-5]
    assert db.call(store.due_deliveries, 7, now + timedelta(hours=2))[0].attempts == 1
    db.call(store.move_chat, -5, -1005)
    db.call(store.move_chat, -5, -1005)  # told twice (two instances): no second row
    assert db.call(store.chat_migrations) == {-5: -1005}
    assert db.call(store.pending_chats, now) == [-1005]


def test_a_mail_waiting_for_both_chats_of_a_migration_waits_once(db: Database) -> None:
    box = db.call(store.reset_mailbox, db.call(store.ensure_account, "a"), "INBOX", 1, 0)
    db.call(store.record_mails, box.id, 1, [(_record(1), [(-5, ""), (-1005, "")])], 1)
    db.call(store.move_chat, -5, -1005)
    now = datetime.now(UTC) + timedelta(seconds=1)
    assert db.call(store.pending_chats, now) == [-1005]
    assert len(db.call(store.due_deliveries, -1005, now)) == 1


def test_callback_rows_belong_to_their_chat(db: Database) -> None:
    box = db.call(store.reset_mailbox, db.call(store.ensure_account, "a"), "INBOX", 1, 0)
    db.call(store.record_mails, box.id, 1, [(_record(1), [(7, "")])], 1)
    now = datetime.now(UTC) + timedelta(seconds=1)
    (item,) = db.call(store.due_deliveries, 7, now)
    mail_id = item.mail.posted_mail_id
    assert db.call(store.find_in_chat, 7, mail_id) is not None  # waiting for this chat
    assert db.call(store.find_in_chat, 8, mail_id) is None  # forged from another chat
    assert db.call(store.find_in_chat, 7, mail_id + 1) is None
    db.call(store.record_summary, mail_id, 8, 99)  # re-posted in chat 8
    db.call(store.record_summary, mail_id, 8, 99)  # recorded twice: still one row
    assert db.call(store.find_in_chat, 8, mail_id).record.uid == 1
    assert _count(db, PostedSummary) == 1


def test_search_hits_and_moved_mails_are_known_once(db: Database) -> None:
    account = db.call(store.ensure_account, "home")
    inbox = db.call(store.reset_mailbox, account, "INBOX", 1, 0)
    db.call(store.reset_mailbox, account, "Archive", 9, 0)
    assert db.call(store.ensure_mail, "home", "Nowhere", 1, _record(3)) is None
    found = db.call(store.ensure_mail, "home", "INBOX", 1, _record(3))
    assert db.call(store.ensure_mail, "home", "INBOX", 1, _record(3)) == found
    db.call(store.mark_known, inbox.id, "Archive", 9, 40)
    db.call(store.mark_known, inbox.id, "Archive", 9, 40)
    assert _count(db, PostedMail) == 2


def test_topics_and_mutes(db: Database) -> None:
    assert db.call(store.get_topic, -5, "GitHub") is None
    db.call(store.save_topic, -5, "GitHub", 11)
    assert db.call(store.get_topic, -5, "GitHub") == 11
    db.call(store.save_topic, -5, "GitHub", 12)  # created again after a user deleted it
    assert db.call(store.get_topic, -5, "GitHub") == 12
    db.call(store.forget_topic, -5, 12)
    assert db.call(store.get_topic, -5, "GitHub") is None
    assert db.call(store.add_mute, "Ann@Example.org", 4) is True
    assert db.call(store.add_mute, "ann@example.org", 4) is False
    assert db.call(store.muted_addresses) == {"ann@example.org"}
    assert db.call(store.remove_mute, "ANN@example.org") is True
    assert db.call(store.muted_addresses) == set()


def test_outbox_lifecycle_and_rate_count(db: Database) -> None:
    now = datetime.now(UTC)
    item = db.call(
        store.add_outbox, **_outgoing(chat_id=1, user_id=7, recipients=["a@x.org", "b@y.org"])
    )
    (due,) = db.call(store.due_outbox, now + timedelta(seconds=1))
    assert (due.id, due.recipients, due.raw) == (item, ("a@x.org", "b@y.org"), b"raw")
    later = now + timedelta(minutes=5)
    db.call(store.mark_outbox, item, "pending", error="451 later", next_attempt_at=later)
    assert db.call(store.due_outbox, now + timedelta(seconds=1)) == []
    assert db.call(store.due_outbox, later + timedelta(seconds=1))[0].attempts == 1
    db.call(store.mark_outbox, item, "sent")
    assert db.call(store.outbox_counts) == {"sent": 1}
    assert db.call(store.count_sent_by_user, 7, now - timedelta(hours=1)) == 1
    assert db.call(store.count_sent_by_user, 8, now - timedelta(hours=1)) == 0


def test_a_chat_message_becomes_at_most_one_outbox_item(db: Database) -> None:
    """Telegram re-delivers an unconfirmed update after a crash: it must not send twice."""
    first = db.call(store.add_outbox, **_outgoing(source_message_id=77))
    assert first is not None
    assert db.call(store.add_outbox, **_outgoing(source_message_id=77)) is None
    assert db.call(store.add_outbox, **_outgoing(source_message_id=77, chat_id=6)) is not None
    assert db.call(store.add_outbox, **_outgoing()) is not None  # not from a chat message
    assert db.call(store.add_outbox, **_outgoing()) is not None


def test_times_come_back_as_aware_utc(db: Database) -> None:
    """SQLite returns naive UTC, PostgreSQL aware values: the store hands out aware UTC."""
    db.call(store.add_outbox, **_outgoing())
    box = db.call(store.reset_mailbox, db.call(store.ensure_account, "a"), "INBOX", 1, 0)
    db.call(store.record_mails, box.id, 1, [(_record(1), [(7, "")])], 1)
    (item,) = db.call(store.due_outbox, datetime.now(UTC) + timedelta(seconds=1))
    moments = [
        item.created_at,
        db.call(store.next_outbox_due),
        db.call(store.next_delivery_due, 7),
    ]
    assert [m.tzinfo for m in moments] == [UTC, UTC, UTC]
    assert datetime.now(UTC) - item.created_at < timedelta(minutes=1)


def test_an_outbox_item_is_claimed_once_until_its_claim_expires(db: Database) -> None:
    """Two instances never send one item; one that died mid-send leaves it due after a while."""
    now = datetime.now(UTC) + timedelta(seconds=1)
    first = db.call(store.add_outbox, **_outgoing(subject="first"))
    second = db.call(store.add_outbox, **_outgoing(subject="second"))
    assert [i.id for i in db.call(store.due_outbox, now)] == [first]
    assert [i.id for i in db.call(store.due_outbox, now)] == [second]  # first is claimed
    assert db.call(store.due_outbox, now) == []
    assert db.call(store.outbox_counts) == {"sending": 2}
    assert db.call(store.next_outbox_due) == now + store.OUTBOX_CLAIM
    db.call(store.mark_outbox, second, "sent")
    # The instance sending `first` died: after the claim's deadline another one takes it.
    expired = now + store.OUTBOX_CLAIM + timedelta(seconds=1)
    assert [i.id for i in db.call(store.due_outbox, expired, 5)] == [first]
    assert db.call(store.due_outbox, expired, 5) == []


def test_a_job_is_claimed_once_until_its_claim_expires(db: Database) -> None:
    first = db.call(store.add_job, update_id=1, kind="full", chat_id=7)
    second = db.call(store.add_job, update_id=2, kind="full", chat_id=7)
    assert db.call(store.add_job, update_id=2, kind="full", chat_id=7) is None  # re-delivered
    assert db.call(store.add_job, update_id=None, kind="search", chat_id=7) is not None
    assert [j.id for j in db.call(store.claim_jobs, 1)] == [first]
    assert [j.id for j in db.call(store.claim_jobs, 1)] == [second]
    db.call(store.finish_job, second, "done")
    # Another instance starting now keeps the running job of a live one.
    assert db.call(store.requeue_running_jobs) == 0
    assert [j.kind for j in db.call(store.claim_jobs, 5)] == ["search"]
    assert db.call(store.claim_jobs, 5) == []
    # The instance running `first` died: after the claim's deadline another one takes it.
    expired = datetime.now(UTC) + store.JOB_CLAIM + timedelta(seconds=1)
    assert [j.id for j in db.call(store.claim_jobs, 1, now=expired)] == [first]


# Another process on this host claims the oldest outbox item and job, prints their ids, then
# waits for a line on stdin (alive) and ends without finishing them (a crash).
_CLAIMER = """
import sys
from datetime import UTC, datetime, timedelta
from bridge.db import store
from bridge.db.engine import Database, make_engine

db = Database(make_engine(sys.argv[1]))
items = db.call(store.due_outbox, datetime.now(UTC) + timedelta(seconds=1))
jobs = db.call(store.claim_jobs, 1)
print(items[0].id, jobs[0].id, flush=True)
sys.stdin.readline()
"""


def test_work_claimed_by_a_process_that_died_here_is_taken_over_at_once(
    db: Database, database_url: str
) -> None:
    """A restart after a crash sends what the crash interrupted without waiting for the claim's
    deadline; while the claimer lives, its claim holds."""
    now = datetime.now(UTC) + timedelta(seconds=1)
    item = db.call(store.add_outbox, **_outgoing())
    job = db.call(store.add_job, update_id=1, kind="full", chat_id=7)
    other = subprocess.Popen(
        [sys.executable, "-c", _CLAIMER, database_url],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert other.stdout is not None
        assert other.stdout.readline().split() == [str(item), str(job)]
        assert db.call(store.due_outbox, now) == []  # alive: its claims hold
        assert db.call(store.claim_jobs, 1) == []
        assert db.call(store.requeue_running_jobs) == 0
    finally:
        other.communicate("", timeout=30)  # it ends without finishing its work
    assert [i.id for i in db.call(store.due_outbox, now)] == [item]
    assert db.call(store.requeue_running_jobs) == 1
    assert [j.id for j in db.call(store.claim_jobs, 1)] == [job]


@pytest.mark.databases("postgresql")
def test_claims_skip_what_another_instance_is_claiming(db: Database) -> None:
    """FOR UPDATE SKIP LOCKED: a second instance neither waits for nor takes a claimed row."""
    now = datetime.now(UTC) + timedelta(seconds=1)
    items = [db.call(store.add_outbox, **_outgoing(subject=f"s{n}")) for n in range(2)]
    jobs = [db.call(store.add_job, update_id=n, kind="full", chat_id=7) for n in range(2)]
    with db.session() as first, first.begin():
        assert [i.id for i in store.due_outbox(first, now)] == items[:1]
        assert [j.id for j in store.claim_jobs(first, 1)] == jobs[:1]
        # Not committed yet: the rows are locked, the second instance passes them by.
        assert [i.id for i in db.call(store.due_outbox, now)] == items[1:]
        assert [j.id for j in db.call(store.claim_jobs, 5)] == jobs[1:]


@dataclass(frozen=True)
class Race:
    """Two instances doing the same write at the same moment."""

    first: Callable[[Session], Any]
    second: Callable[[Session], Any]
    check: Callable[[Database, Any, Any], None]


def _mailbox(db: Database) -> int:
    return db.call(store.reset_mailbox, db.call(store.ensure_account, "a"), "INBOX", 1, 10).id


def _races() -> dict[str, Callable[[Database], Race]]:
    def account(db: Database) -> Race:
        def check(db: Database, one: int, two: int) -> None:
            assert one == two == db.call(store.ensure_account, "home")

        return Race(
            lambda s: store.ensure_account(s, "home"),
            lambda s: store.ensure_account(s, "home"),
            check,
        )

    def outbox(db: Database) -> Race:
        def add(s: Session) -> int | None:
            return store.add_outbox(s, **_outgoing(source_message_id=3))

        def check(db: Database, one: int | None, two: int | None) -> None:
            assert one is not None
            assert two is None

        return Race(add, add, check)

    def job(db: Database) -> Race:
        def add(s: Session) -> int | None:
            return store.add_job(s, update_id=9, kind="full", chat_id=7)

        def check(db: Database, one: int | None, two: int | None) -> None:
            assert one is not None
            assert two is None

        return Race(add, add, check)

    def mute(db: Database) -> Race:
        def check(db: Database, one: bool, two: bool) -> None:
            assert (one, two) == (True, False)

        return Race(
            lambda s: store.add_mute(s, "x@y.org", 1),
            lambda s: store.add_mute(s, "X@y.org", 2),
            check,
        )

    def mails(db: Database) -> Race:
        box = _mailbox(db)

        def record(s: Session) -> None:
            store.record_mails(s, box, 1, [(_record(11), [(7, "")])], 11)

        def check(db: Database, _one: None, _two: None) -> None:
            assert (_count(db, PostedMail), _count(db, Delivery)) == (1, 1)

        return Race(record, record, check)

    def cursor(db: Database) -> Race:
        box = _mailbox(db)

        def check(db: Database, _one: None, _two: None) -> None:
            assert (
                db.call(store.get_mailbox, db.call(store.ensure_account, "a"), "INBOX").last_uid
                == 12
            )

        return Race(
            lambda s: store.advance(s, box, 12), lambda s: store.advance(s, box, 11), check
        )

    def summary(db: Database) -> Race:
        _mailbox(db)
        mail = db.call(store.ensure_mail, "a", "INBOX", 1, _record(3))

        def check(db: Database, _one: None, _two: None) -> None:
            assert _count(db, PostedSummary) == 1

        return Race(
            lambda s: store.record_summary(s, mail, 7, 70),
            lambda s: store.record_summary(s, mail, 7, 70),
            check,
        )

    def topic(db: Database) -> Race:
        def check(db: Database, _one: None, _two: None) -> None:
            assert db.call(store.get_topic, -5, "GitHub") == 12  # the later one

        return Race(
            lambda s: store.save_topic(s, -5, "GitHub", 11),
            lambda s: store.save_topic(s, -5, "GitHub", 12),
            check,
        )

    def migration(db: Database) -> Race:
        def check(db: Database, _one: None, _two: None) -> None:
            assert _count(db, ChatMigration) == 1

        return Race(
            lambda s: store.move_chat(s, -5, -1005), lambda s: store.move_chat(s, -5, -1005), check
        )

    def known(db: Database) -> Race:
        box = _mailbox(db)

        def check(db: Database, one: int | None, two: int | None) -> None:
            assert one == two
            assert _count(db, PostedMail) == 1

        return Race(
            lambda s: store.ensure_mail(s, "a", "INBOX", 1, _record(4)),
            lambda s: (
                store.mark_known(s, box, "INBOX", 1, 4),
                store.ensure_mail(s, "a", "INBOX", 1, _record(4)),
            )[1],
            check,
        )

    def folder(db: Database) -> Race:
        account_id = db.call(store.ensure_account, "a")

        def check(db: Database, one: store.MailboxState, two: store.MailboxState) -> None:
            assert one.id == two.id
            assert db.call(store.get_mailbox, account_id, "INBOX") == two

        return Race(
            lambda s: store.reset_mailbox(s, account_id, "INBOX", 1, 5),
            lambda s: store.reset_mailbox(s, account_id, "INBOX", 2, 6),
            check,
        )

    return {
        f.__name__: f
        for f in (
            account,
            outbox,
            job,
            mute,
            mails,
            cursor,
            summary,
            topic,
            migration,
            known,
            folder,
        )
    }


def _wait_until_waiting_for_a_lock(db: Database) -> None:
    """Until another session of this database waits for a row lock (bounded)."""
    query = text(
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )
    deadline = time.monotonic() + 10
    with db.engine.connect() as conn:
        while not conn.execute(query).scalar():
            assert time.monotonic() < deadline, "the second writer never waited for the first"
            conn.rollback()  # a fresh snapshot of pg_stat_activity
            time.sleep(0.01)  # polling a condition, bounded above


@pytest.mark.databases("postgresql")
@pytest.mark.parametrize("case", list(_races()))
def test_two_instances_writing_at_once_do_not_collide(db: Database, case: str) -> None:
    """The second writer waits for the first's uncommitted row, then must neither fail on the
    unique constraint nor undo the first's write (check-then-insert and read-then-write would)."""
    race = _races()[case](db)
    first = db.session()
    first.begin()
    one = race.first(first)
    with ThreadPoolExecutor(1) as pool:
        second = pool.submit(db.call, race.second)
        _wait_until_waiting_for_a_lock(db)
        first.commit()
        first.close()
        two = second.result(timeout=10)
    race.check(db, one, two)


class _Seen(logging.Handler):
    """Sets an event when a log line contains a text."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text, self.event = text, asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.event.set()


async def test_persist_retries_a_locked_database(tmp_path: Path) -> None:
    """A write that meets a locked database waits and lands; nothing half-written."""
    engine = make_engine(f"sqlite:///{tmp_path}/locked.db?timeout=0.1")
    upgrade_to_head(engine)
    db = Database(engine)
    account = db.call(store.ensure_account, "a")
    box = db.call(store.reset_mailbox, account, "INBOX", 1, 0)
    blocker = sqlite3.connect(tmp_path / "locked.db", isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    retrying = _Seen("retrying")
    logging.getLogger("bridge.db.engine").addHandler(retrying)
    try:
        write = asyncio.create_task(db.persist(store.advance, box.id, 9))
        await asyncio.wait_for(retrying.event.wait(), 10)  # it met the lock and waits
    finally:
        logging.getLogger("bridge.db.engine").removeHandler(retrying)
    assert not write.done()
    blocker.execute("COMMIT")
    blocker.close()
    await asyncio.wait_for(write, 10)
    assert db.call(store.get_mailbox, account, "INBOX").last_uid == 9
    engine.dispose()


# --- Leases shared by several instances (store.lease_round) ---

WORK = [f"folder:home/F{n:02d}" for n in range(10)]


def _round(db: Database, holder: str, names: list[str] = WORK, seconds: float = 30):
    until = datetime.now(UTC) + timedelta(seconds=seconds)
    return db.call(store.lease_round, holder, names, until)


def _hand_over(db: Database, holder: str, plan: store.LeasePlan) -> None:
    if plan.surplus:
        db.call(store.release_leases, plan.surplus, holder)


def test_lease_rounds_spread_the_work_evenly_and_hand_it_over_cleanly(db: Database) -> None:
    a, b, c = "elsewhere:1-1-aa", "elsewhere:1-2-bb", "elsewhere:1-3-cc"
    alone = _round(db, a)
    assert sorted(alone.held) == WORK
    assert alone.instances == 1
    # b arrives: there is nothing free yet, but a sees two instances and hands half over.
    assert _round(db, b).held == {}
    halved = _round(db, a)
    assert (len(halved.held), len(halved.surplus), halved.instances) == (5, 5, 2)
    _hand_over(db, a, halved)
    assert len(_round(db, b).held) == 5
    # c arrives: ceil(10 / 3) = 4 each at most, and every lease has one holder.
    _round(db, c)
    for holder in (a, b):
        _hand_over(db, holder, _round(db, holder))
    plans = {holder: _round(db, holder) for holder in (c, a, b)}
    counts = sorted(len(p.held) for p in plans.values())
    assert counts == [2, 4, 4] or counts == [3, 3, 4], counts
    assert all(p.surplus == () for p in plans.values())
    held = [name for p in plans.values() for name in p.held]
    assert sorted(held) == WORK  # each once
    # A handed-over lease gets a new fencing token: its old holder cannot write any more.
    moved = next(iter(plans[c].held))
    assert plans[c].held[moved] >= 2


def test_a_dead_instances_share_goes_to_the_living(db: Database) -> None:
    a, b = "elsewhere:1-1-aa", "elsewhere:1-2-bb"
    _round(db, a, seconds=0.5)  # a takes all, then dies: its rows expire
    _round(db, b)
    time.sleep(0.6)  # the lease time passing is the condition under test
    taken = _round(db, b)
    assert sorted(taken.held) == WORK
    assert taken.instances == 1


def test_instances_with_other_work_do_not_count_as_peers(db: Database) -> None:
    a, b = "elsewhere:1-1-aa", "elsewhere:1-2-bb"
    _round(db, a)
    other = _round(db, b, names=["folder:work/INBOX"])  # another configuration
    assert other.instances == 1
    assert other.held == {"folder:work/INBOX": 1}
    again = _round(db, a)
    assert again.instances == 1
    assert again.surplus == ()


def test_leaving_releases_the_instance_at_once(db: Database) -> None:
    a, b = "elsewhere:1-1-aa", "elsewhere:1-2-bb"
    _round(db, a)
    _round(db, b)
    assert _round(db, a).instances == 2
    db.call(store.release_leases, [], b, leaving=True)
    assert _round(db, a).instances == 1
