"""The database: migrations create it, the store remembers what was posted."""

from __future__ import annotations

import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import text

from bridge.db import store
from bridge.db.engine import Database, make_engine
from bridge.db.migrate import alembic_config, upgrade_to_head
from bridge.errors import DatabaseError


@pytest.fixture
def db(tmp_path: Path) -> Database:
    """A migrated SQLite database in a temp folder (created by upgrade head, never create_all)."""
    engine = make_engine(f"sqlite:///{tmp_path}/sub/bridge.db")
    upgrade_to_head(engine)
    yield Database(engine)
    engine.dispose()


def test_sqlite_folder_created_file_owner_only_and_wal(db: Database, tmp_path: Path) -> None:
    path = tmp_path / "sub" / "bridge.db"
    assert path.is_file()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with db.engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"


def test_models_and_migrations_do_not_drift(db: Database) -> None:
    config = alembic_config(db.engine)
    with db.engine.begin() as conn:
        config.attributes["connection"] = conn
        command.check(config)  # raises if autogenerate would produce a new revision


def test_upgrade_is_idempotent(db: Database) -> None:
    assert upgrade_to_head(db.engine) == "0006"


def test_unknown_revision_is_refused(db: Database) -> None:
    with db.engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    with pytest.raises(DatabaseError, match=r"revision 9999.*downgrading is not supported"):
        upgrade_to_head(db.engine)


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
    work = db.call(store.ensure_account, "work")
    assert db.call(store.get_mailbox, work, "INBOX") is None  # same folder name, other account


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


def test_refused_chat_is_postponed_and_a_migrated_one_followed(db: Database) -> None:
    box = db.call(store.reset_mailbox, db.call(store.ensure_account, "a"), "INBOX", 1, 0)
    db.call(store.record_mails, box.id, 1, [(_record(1), [(-5, ""), (7, "")])], 1)
    now = datetime.now(UTC) + timedelta(seconds=1)
    (item,) = db.call(store.due_deliveries, 7, now)
    db.call(store.postpone_deliveries, [item.id], "Forbidden: kicked", now + timedelta(hours=1))
    assert db.call(store.pending_chats, now) == [-5]
    assert db.call(store.due_deliveries, 7, now + timedelta(hours=2))[0].attempts == 1
    db.call(store.move_chat, -5, -1005)
    assert db.call(store.chat_migrations) == {-5: -1005}
    assert db.call(store.pending_chats, now) == [-1005]


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
    assert db.call(store.find_in_chat, 8, mail_id).record.uid == 1


def test_topics_and_mutes(db: Database) -> None:
    assert db.call(store.get_topic, -5, "GitHub") is None
    db.call(store.save_topic, -5, "GitHub", 11)
    assert db.call(store.get_topic, -5, "GitHub") == 11
    db.call(store.forget_topic, -5, 11)
    assert db.call(store.get_topic, -5, "GitHub") is None
    assert db.call(store.add_mute, "Ann@Example.org", 4) is True
    assert db.call(store.add_mute, "ann@example.org", 4) is False
    assert db.call(store.muted_addresses) == {"ann@example.org"}
    assert db.call(store.remove_mute, "ANN@example.org") is True
    assert db.call(store.muted_addresses) == set()


def test_outbox_lifecycle_and_rate_count(db: Database) -> None:
    now = datetime.now(UTC)
    item = db.call(
        store.add_outbox,
        chat_id=1,
        user_id=7,
        message_id="<m@x>",
        recipients=["a@x.org", "b@y.org"],
        subject="S",
        raw=b"raw",
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
    kw = {
        "chat_id": 5,
        "user_id": 5,
        "message_id": "<m@x>",
        "recipients": ["a@x.org"],
        "subject": "S",
        "raw": b"raw",
        "source_message_id": 77,
    }
    first = db.call(store.add_outbox, **kw)
    assert first is not None
    assert db.call(store.add_outbox, **kw) is None
    assert db.call(store.add_outbox, **{**kw, "chat_id": 6}) is not None  # other chat, other msg


async def test_persist_retries_a_locked_database(tmp_path: Path) -> None:
    """A write that meets a locked database waits and lands; nothing half-written."""
    import asyncio
    import sqlite3

    engine = make_engine(f"sqlite:///{tmp_path}/locked.db?timeout=0.1")
    upgrade_to_head(engine)
    db = Database(engine)
    account = db.call(store.ensure_account, "a")
    box = db.call(store.reset_mailbox, account, "INBOX", 1, 0)
    blocker = sqlite3.connect(tmp_path / "locked.db", isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    write = asyncio.create_task(db.persist(store.advance, box.id, 9))
    await asyncio.sleep(0.5)  # the lock is held while persist retries; then released
    assert not write.done()
    blocker.execute("COMMIT")
    blocker.close()
    await asyncio.wait_for(write, 10)
    assert db.call(store.get_mailbox, account, "INBOX").last_uid == 9
    engine.dispose()


def test_upgrade_gives_single_account_folders_to_default(tmp_path: Path) -> None:
    """0003 -> 0004: folders keyed `user@host:port` become the account `default`'s; when the
    host was written two ways, the newest row (the current cursor) wins."""
    engine = make_engine(f"sqlite:///{tmp_path}/old.db")
    command.upgrade(alembic_config(engine), "0003")
    with engine.begin() as conn:
        for key, last in (("me@imap.example.org:993", 10), ("me@IMAP.example.org:993", 42)):
            conn.execute(
                text(
                    "INSERT INTO mailbox (account, name, uidvalidity, last_uid, updated_at) "
                    "VALUES (:key, 'INBOX', 7, :last, CURRENT_TIMESTAMP)"
                ),
                {"key": key, "last": last},
            )
    upgrade_to_head(engine)
    db = Database(engine)
    default = db.call(store.ensure_account, "default")
    assert db.call(store.get_mailbox, default, "INBOX").last_uid == 42
    engine.dispose()
