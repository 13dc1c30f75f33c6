"""Alembic migrations run from code: `upgrade head`, refusing databases newer than this code."""

from __future__ import annotations

import contextlib
import fcntl
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import SQLAlchemyError

from bridge.errors import DatabaseError

if TYPE_CHECKING:
    from alembic.config import Config

logger = logging.getLogger(__name__)
# The PostgreSQL advisory lock held while migrating (any constant: "mailbr" in ASCII).
MIGRATION_LOCK = 0x6D61696C6272


def script_location() -> Path:
    """The migrations folder: packaged in a wheel, top-level in a checkout."""
    packaged = Path(__file__).resolve().parent.parent / "migrations"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent.parent / "migrations"


def alembic_config(engine: Engine) -> Config:
    """An Alembic Config built in code (no alembic.ini needed at run time)."""
    from alembic.config import Config  # Alembic is loaded only when a migration runs

    config = Config()
    config.set_main_option("script_location", str(script_location()))
    # ConfigParser interpolates `%`: an URL-encoded password (`p%40ss`) must be escaped, or
    # its error message would print the rest of the URL, password included.
    url = engine.url.render_as_string(hide_password=False)
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


@contextlib.contextmanager
def _sqlite_lock(engine: Engine) -> Iterator[None]:
    """SQLite: instances started together on one file migrate one after the other (a lock
    file beside the database; SQLite's own locks answer "locked" to the second at once)."""
    database = engine.url.database
    if engine.dialect.name != "sqlite" or not database or database == ":memory:":
        yield
        return
    with Path(f"{database}.migrate-lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def _sqlite_transaction(engine: Engine) -> Iterator[Connection]:
    """SQLite: one real transaction around every migration. Python's sqlite3 runs DDL outside
    any transaction (it begins one only before INSERT/UPDATE/DELETE), so a process killed
    mid-migration would leave tables behind without their revision, and every later start would
    fail ("table already exists"). With the driver's own transaction handling off, BEGIN and
    COMMIT are ours: a kill rolls the whole upgrade back."""
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.exec_driver_sql("BEGIN IMMEDIATE")
        try:
            yield connection
        except BaseException:
            connection.exec_driver_sql("ROLLBACK")
            raise
        connection.exec_driver_sql("COMMIT")


def migrated(engine: Engine) -> bool:
    """True when the database is already at the newest revision this code ships, read with
    one query and the revision files' names: `mailbridge run` then never loads Alembic (about
    12 MB of memory)."""
    versions = script_location() / "versions"
    newest = max((p.name.split("_", 1)[0] for p in versions.glob("[0-9]*_*.py")), default="")
    try:
        with engine.connect() as connection:
            rows = connection.execute(text("SELECT version_num FROM alembic_version")).all()
    except SQLAlchemyError:
        return False  # a new database: no alembic_version table yet
    return [row[0] for row in rows] == [newest]


def upgrade_to_head(engine: Engine) -> str:
    """Apply every migration; return the head revision.

    Refuses a database stamped with a revision this code does not know: downgrading is not
    supported, and guessing would corrupt it.
    """
    from alembic import command
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    config = alembic_config(engine)
    script = ScriptDirectory.from_config(config)

    def upgrade(connection: Connection) -> None:
        current = MigrationContext.configure(connection).get_current_heads()
        known = {rev.revision for rev in script.walk_revisions()}
        unknown = [rev for rev in current if rev not in known]
        if unknown:
            raise DatabaseError(
                f"the database is at revision {unknown[0]}, which this version of mailbridge "
                "does not know (it was used by a newer version); downgrading is not supported"
            )
        config.attributes["connection"] = connection
        command.upgrade(config, "head")

    if engine.dialect.name == "sqlite":
        with _sqlite_lock(engine), _sqlite_transaction(engine) as connection:
            upgrade(connection)
    else:
        with engine.begin() as connection:
            if connection.dialect.name == "postgresql":
                # Instances started together: one migrates, the others wait, then find head.
                connection.execute(
                    text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK}
                )
            upgrade(connection)
    head = script.get_current_head() or ""
    logger.info("database at revision %s", head)
    return head
