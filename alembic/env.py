"""Alembic environment, async (asyncpg), following Alembic's async template.

The URL comes from `todo_store.Settings` (environment or `.env`), never from alembic.ini,
and is always the direct (unpooled) one. Code and tests can hand in a connection through
`config.attributes["connection"]` (see `todo_store.migrations`).
"""

import asyncio
import logging.config

from alembic import context
from sqlalchemy import Connection

from todo_store.migrations import create_migration_engine, direct_settings, run_migrations
from todo_store.models import Base
from todo_store.settings import Settings

config = context.config
if config.config_file_name is not None and not config.attributes.get("connection"):
    logging.config.fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata
settings: Settings = config.attributes.get("settings") or Settings()


def run_migrations_offline() -> None:
    """Emit SQL to stdout (`alembic upgrade head --sql`) instead of running it."""
    chosen, _ = direct_settings(settings)
    context.configure(
        url=chosen.database_url.get_secret_value(),
        target_metadata=target_metadata,
        literal_binds=True,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def do_run_migrations(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata, compare_type=True)

    def run() -> None:
        with context.begin_transaction():
            context.run_migrations()

    run_migrations(connection, settings, run)


async def run_async_migrations() -> None:
    engine = create_migration_engine(settings)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(do_run_migrations)
    finally:
        await engine.dispose()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is None:
        asyncio.run(run_async_migrations())
    else:
        do_run_migrations(connection)


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
