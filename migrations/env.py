"""Alembic environment: URL from the bridge's settings, metadata from its models."""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context
from sqlalchemy import Connection

from bridge.config import load_core
from bridge.db.engine import make_engine, parse_url
from bridge.db.models import Base

config = context.config
# Only when run by the `alembic` command with an ini file: inside `mailbridge run` this would
# reset the bridge's logging (fileConfig disables existing loggers).
if config.config_file_name is not None:
    fileConfig(config.config_file_name)

target_metadata = Base.metadata


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=True,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Use the connection handed over by bridge.db.migrate, else build one from settings."""
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = config.get_main_option("sqlalchemy.url") or load_core().database_url
    engine = make_engine(url)
    with engine.begin() as conn:
        _run(conn)
    engine.dispose()


def run_migrations_offline() -> None:
    """Emit SQL without a database (alembic upgrade --sql)."""
    url = config.get_main_option("sqlalchemy.url") or load_core().database_url
    context.configure(url=parse_url(url), target_metadata=target_metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
