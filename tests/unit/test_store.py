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
    assert upgrade_to_head(db.engine) == "0003"


def test_unknown_revision_is_refused(db: Database) -> None:
    with db.engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    with pytest.raises(DatabaseError, match=r"revision 9999.*downgrading is not supported"):
        upgrade_to_head(db.engine)


def test_mailbox_state_and_high_water_mark(db: Database) -> None:
    assert db.call(store.get_mailbox, "me@h:993", "INBOX") is None
    state = db.call(store.reset_mailbox, "me@h:993", "INBOX", 77, 10)
    db.call(store.advance, state.id, 12)
    db.call(store.advance, state.id, 11)  # never lowers
    assert db.call(store.get_mailbox, "me@h:993", "INBOX") == store.MailboxState(state.id, 77, 12)
    again = db.call(store.reset_mailbox, "me@h:993", "INBOX", 78, 3)  # new UIDVALIDITY
    assert again == store.MailboxState(state.id, 78, 3)


def test_summaries_map_back_to_the_mail(db: Database) -> None:
    box = db.call(store.reset_mailbox, "me@h:993", "INBOX", 5, 0)
    record = store.MailRecord(
        uid=3,
        message_id="<a@x>",
        subject="Hello",
        sender="bob@x.org",
        reply_to="list@x.org",
        references=("<r1@x>", "<r2@x>"),
    )
    db.call(store.record_summary, box.id, 5, record, 1001, 50)
    db.call(store.record_summary, box.id, 5, record, 1002, 60)
    assert db.call(store.posted_chats, box.id, 5, 3) == {1001, 1002}
    assert db.call(store.posted_chats, box.id, 6, 3) == set()
    assert db.call(store.find_by_summary, 1002, 60) == record
    assert db.call(store.find_by_summary, 1001, 60) is None  # same message id, other chat
    assert db.call(store.count_posted) == 1


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
    box = db.call(store.reset_mailbox, "a", "INBOX", 1, 0)
    blocker = sqlite3.connect(tmp_path / "locked.db", isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    write = asyncio.create_task(db.persist(store.advance, box.id, 9))
    await asyncio.sleep(0.5)  # the lock is held while persist retries; then released
    assert not write.done()
    blocker.execute("COMMIT")
    blocker.close()
    await asyncio.wait_for(write, 10)
    assert db.call(store.get_mailbox, "a", "INBOX").last_uid == 9
    engine.dispose()
