"""Alembic environment, async (asyncpg), following Alembic's async template.

The URL comes from `todo_store.Settings` (environment or `.env`), never from alembic.ini,
and is always the direct (unpooled) one. Code and tests can hand in a connection through
`config.attributes["connection"]` (see `todo_store.migrations`).

Online and offline (`--sql`) alike, every migration transaction first takes the package's
advisory lock and sets `lock_timeout` (`todo_store.migrations.lock_statements`). The models
compared by `alembic check` / autogenerate are the package's plus those an application's
alembic.ini names with `target_metadata = module:attribute`.
"""

import asyncio
import logging.config

from alembic import context
from sqlalchemy import Connection

from todo_store.migrations import (
    create_migration_engine,
    lock_statements,
    record_applied,
    run_migrations,
    target_metadata,
)
from todo_store.settings import Settings

config = context.config
if (
    config.config_file_name is not None
    and not config.attributes.get("connection")
    and config.file_config.has_section("loggers")  # an application's file may have none
):
    logging.config.fileConfig(config.config_file_name, disable_existing_loggers=False)

metadata = target_metadata(config)

# Indexes a revision creates only where the server can (0005's trigram index needs pg_trgm):
# the models cannot declare them, so comparing models with the database leaves them out.
OPTIONAL_INDEXES = frozenset({"idx_tasks_search_trgm"})


def include_object(
    _object: object, name: str | None, type_: str, reflected: bool, _compare_to: object
) -> bool:
    return not (type_ == "index" and reflected and name in OPTIONAL_INDEXES)


settings: Settings = config.attributes.get("settings") or Settings()


def run_migrations_offline() -> None:
    """Emit SQL to stdout (`alembic upgrade head --sql`) instead of running it.

    Only the dialect matters here, so every URL form the package accepts works.
    """
    context.configure(
        dialect_name="postgresql",
        target_metadata=metadata,
        literal_binds=True,
        compare_type=True,
        include_object=include_object,
    )
    with context.begin_transaction():
        for statement in lock_statements(settings):
            context.execute(statement)
        context.run_migrations()


def do_run_migrations(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        compare_type=True,
        include_object=include_object,
        on_version_apply=record_applied(config),
    )

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
