"""Migrations and the engine, on SQLite and on PostgreSQL: every revision, no drift, no leaks."""

from __future__ import annotations

import threading
import traceback
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import sqlalchemy
from alembic import command
from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url

from bridge.db import store
from bridge.db.engine import Database, make_engine, parse_url
from bridge.db.migrate import alembic_config, upgrade_to_head
from bridge.errors import DatabaseError

pytestmark = pytest.mark.databases("sqlite", "postgresql")


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    """An engine on a new, empty database."""
    engine = make_engine(database_url)
    yield engine
    engine.dispose()


def test_every_revision_applies_and_models_do_not_drift(engine: Engine) -> None:
    assert upgrade_to_head(engine) == "0006"
    config = alembic_config(engine)
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.check(config)  # raises if autogenerate would produce a new revision


def test_an_upgrade_that_fails_midway_leaves_nothing_behind(engine: Engine) -> None:
    # The first revision creates mailbox, posted_mail, then posted_summary: a table in the way
    # of the last makes it fail after the others were created (as a kill mid-migration would).
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE posted_summary (x INTEGER)"))
    with pytest.raises(Exception, match="posted_summary"):
        upgrade_to_head(engine)
    with engine.connect() as conn:
        tables = set(sqlalchemy.inspect(conn).get_table_names())
    assert tables == {"posted_summary"}  # mailbox and posted_mail were rolled back
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE posted_summary"))
    assert upgrade_to_head(engine) == "0006"  # the next start migrates as if nothing happened


def test_upgrade_is_idempotent(engine: Engine) -> None:
    upgrade_to_head(engine)
    assert upgrade_to_head(engine) == "0006"


def test_unknown_revision_is_refused(engine: Engine) -> None:
    upgrade_to_head(engine)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    with pytest.raises(DatabaseError, match=r"revision 9999.*downgrading is not supported"):
        upgrade_to_head(engine)


def test_upgrade_gives_single_account_folders_to_default(engine: Engine) -> None:
    """0003 -> 0004: folders keyed `user@host:port` become the account `default`'s; when the
    host was written two ways, the newest row (the current cursor) wins."""
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
    # The sequences go on after the adopted rows.
    assert db.call(store.ensure_account, "work") > default


@pytest.mark.databases("postgresql")
def test_instances_starting_together_migrate_once(engine: Engine) -> None:
    """Several instances run `upgrade head` at the same moment: one migrates, the others
    wait for it and find the database current."""
    start = threading.Barrier(3)

    def upgrade() -> str:
        start.wait(10)
        return upgrade_to_head(engine)

    with ThreadPoolExecutor(3) as pool:
        heads = [f.result(timeout=60) for f in [pool.submit(upgrade) for _ in range(3)]]
    assert heads == ["0006"] * 3


@pytest.mark.databases("postgresql")
def test_a_url_encoded_password_is_taken_as_it_is(database_url: str) -> None:
    """`%` in the URL (an encoded password) once crashed Alembic's ConfigParser, whose message
    printed the rest of the URL."""
    url = make_url(database_url).set(password="p@ss%w0rd")  # the test server trusts anyone
    engine = make_engine(url.render_as_string(hide_password=False))
    try:
        assert "p%40ss%25w0rd" in engine.url.render_as_string(hide_password=False)
        config = alembic_config(engine)
        assert make_url(config.get_main_option("sqlalchemy.url") or "").password == "p@ss%w0rd"
        command.upgrade(config, "head")  # env.py connects through the configured URL
        assert upgrade_to_head(engine) == "0006"
    finally:
        engine.dispose()


def test_postgresql_url_uses_psycopg_unless_it_names_a_driver() -> None:
    plain = make_engine("postgresql://ann:pw@db.example/mail")
    short = make_engine("postgres://ann:pw@db.example/mail")
    named = parse_url("postgresql+psycopg2://ann:pw@db.example/mail")
    assert [plain.url.drivername, short.url.drivername] == ["postgresql+psycopg"] * 2
    assert named.drivername == "postgresql+psycopg2"
    assert plain.pool._pre_ping  # a connection the server dropped is replaced, not used


def test_a_malformed_url_never_shows_its_password() -> None:
    password = "s3cret" + "-pw"  # not whole in this line, which the traceback quotes
    with pytest.raises(DatabaseError) as caught:
        make_engine(f"postgresql//ann:{password}@db.example/mail")
    shown = "".join(traceback.format_exception(caught.value))
    assert "BRIDGE_DATABASE_URL" in shown
    assert password not in shown
