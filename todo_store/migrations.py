"""Run the Alembic migrations from code: upgrade, downgrade, check, current revision.

Migrations always use the direct (unpooled) URL: `DATABASE_URL_DIRECT`, else the URL derived
from a Neon `-pooler` host, else `DATABASE_URL`. Concurrent upgrades (several instances
booting at once) serialise on a transaction-scoped advisory lock: one applies, the others
then find the schema at head.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from todo_store.engine import add_store_events, connect_args_for
from todo_store.settings import Settings
from todo_store.urls import direct_url, is_pooler_host, mask

log = logging.getLogger("todo_store.migrations")

# pg_advisory_xact_lock key: the first 8 bytes of "todo_store" read as a signed bigint, so
# it will not collide with another application's lock by accident.
MIGRATION_LOCK_KEY = int.from_bytes(b"todo_sto", "big", signed=True)


def _script_location() -> Path:
    here = Path(__file__).resolve().parent
    packaged = here / "_alembic"  # inside a built wheel
    return packaged if packaged.is_dir() else here.parent / "alembic"


def alembic_config(settings: Settings | None = None) -> Config:
    """An Alembic `Config` that needs no `alembic.ini` (settings come from `Settings`)."""
    # Alembic's commands print to stdout (e.g. check's "No new upgrade operations detected.");
    # callers of this module get return values and exceptions instead.
    config = Config(stdout=io.StringIO())
    config.set_main_option("script_location", str(_script_location()))
    if settings is not None:
        config.attributes["settings"] = settings
    return config


def direct_settings(settings: Settings) -> tuple[Settings, str]:
    """`settings` pointed at the direct URL, and a line saying which URL was chosen and why."""
    if settings.database_url_direct is not None:
        url, why = settings.database_url_direct.get_secret_value(), "DATABASE_URL_DIRECT"
    elif is_pooler_host(settings.database_url.get_secret_value()):
        url = direct_url(settings.database_url.get_secret_value()).render_as_string(
            hide_password=False
        )
        why = "derived from the -pooler host in DATABASE_URL"
    else:
        url, why = settings.database_url.get_secret_value(), "DATABASE_URL"
    chosen = settings.model_copy(update={"database_url": type(settings.database_url)(url)})
    return chosen, f"migrations use {mask(url)} ({why})"


def create_migration_engine(settings: Settings) -> AsyncEngine:
    """A pool-less engine on the direct URL; DDL may run longer than a request's timeout."""
    chosen, line = direct_settings(settings)
    log.info(line)
    url, connect_args = connect_args_for(chosen)
    connect_args["command_timeout"] = None
    engine = create_async_engine(url, connect_args=connect_args, poolclass=NullPool)
    add_store_events(engine)
    return engine


def run_migrations(connection: Connection, settings: Settings, run: Callable[[], None]) -> None:
    """Run Alembic's migrations on `connection`, serialised and with a bounded lock wait."""
    with nullcontext() if connection.in_transaction() else connection.begin():
        connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK_KEY})")
        # Set only after the advisory lock is held: waiting for another instance's migration
        # is expected; waiting forever behind a long application transaction is not.
        lock_timeout_ms = int(settings.migration_lock_timeout * 1000)
        connection.exec_driver_sql(f"SET LOCAL lock_timeout = {lock_timeout_ms}")
        run()


async def _with_alembic(
    target: AsyncEngine | AsyncConnection, settings: Settings, action: Callable[[Config], Any]
) -> Any:
    config = alembic_config(settings)

    def invoke(sync_connection: Connection) -> Any:
        config.attributes["connection"] = sync_connection
        return action(config)

    if isinstance(target, AsyncConnection):
        return await target.run_sync(invoke)
    async with target.connect() as connection:
        return await connection.run_sync(invoke)


async def upgrade(
    settings: Settings, revision: str = "head", *, on: AsyncEngine | AsyncConnection | None = None
) -> None:
    """Apply migrations up to `revision` on the direct URL (or on the engine/connection given)."""
    await _run(settings, on, lambda config: command.upgrade(config, revision))


async def downgrade(
    settings: Settings, revision: str = "base", *, on: AsyncEngine | AsyncConnection | None = None
) -> None:
    """Revert migrations down to `revision`."""
    await _run(settings, on, lambda config: command.downgrade(config, revision))


async def check(settings: Settings, *, on: AsyncEngine | AsyncConnection | None = None) -> None:
    """Raise `alembic.util.exc.AutogenerateDiffsDetected` if the models and schema differ."""
    await _run(settings, on, command.check)


async def current_revision(
    settings: Settings, *, on: AsyncEngine | AsyncConnection | None = None
) -> str | None:
    """The revision the database is at (`None` for an empty database)."""

    def read(sync_connection: Connection) -> str | None:
        return MigrationContext.configure(sync_connection).get_current_revision()

    if isinstance(on, AsyncConnection):
        return await on.run_sync(read)
    engine = on or create_migration_engine(settings)
    try:
        async with engine.connect() as connection:
            return await connection.run_sync(read)
    finally:
        if on is None:
            await engine.dispose()


def head_revision() -> str | None:
    """The newest revision the code ships."""
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


async def _run(
    settings: Settings,
    on: AsyncEngine | AsyncConnection | None,
    action: Callable[[Config], Any],
) -> None:
    if on is not None:
        await _with_alembic(on, settings, action)
        return
    engine = create_migration_engine(settings)
    try:
        await _with_alembic(engine, settings, action)
    finally:
        await engine.dispose()
