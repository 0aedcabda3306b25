"""pytest plugin: a real PostgreSQL (and PgBouncer) with the migrations applied.

Loaded automatically where `todo_store` is installed (entry point `pytest11`). Fixtures:

- `todo_store_server`: the PostgreSQL server of this run (see `postgres.provision_server`).
- `todo_store_settings`: `Settings` for a fresh database of this run, migrated to head.
- `todo_store_engine`: an engine on it (session scope, session event loop).
- `todo_store_session`: an `AsyncSession` inside a transaction rolled back after the test;
  code under test may commit (commits become savepoint releases).
- `todo_store_pgbouncer`: a PgBouncer in transaction mode (pool of 4) in front of that
  database. Skipped where PgBouncer cannot run, unless `TODO_STORE_REQUIRE_PGBOUNCER=1`.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import pytest_asyncio
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from todo_store import migrations
from todo_store.engine import create_engine
from todo_store.settings import Settings
from todo_store.testing.pgbouncer import PgBouncer, PgBouncerUnavailable
from todo_store.testing.postgres import (
    ProvisionedServer,
    create_database,
    drop_database,
    provision_server,
)

REQUIRE_PGBOUNCER = "TODO_STORE_REQUIRE_PGBOUNCER"


def settings_for(url: str) -> Settings:
    """Settings for a test database; the direct URL is the same server."""
    return Settings(database_url=url, database_url_direct=url)


def start_pgbouncer(server: ProvisionedServer, database: str, **options: Any) -> PgBouncer:
    """A started PgBouncer; skips the test where none can run, or fails if one is required."""
    bouncer = PgBouncer(server, database, **options)
    try:
        bouncer.start()
    except PgBouncerUnavailable as error:
        if os.environ.get(REQUIRE_PGBOUNCER) == "1":
            pytest.fail(f"PgBouncer is required ({REQUIRE_PGBOUNCER}=1): {error}")
        pytest.skip(f"PgBouncer unavailable: {error}")
    return bouncer


@pytest.fixture(scope="session")
def todo_store_server() -> Iterator[ProvisionedServer]:
    with provision_server() as server:
        yield server


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def todo_store_settings(todo_store_server: ProvisionedServer) -> AsyncIterator[Settings]:
    name = f"todo_store_test_{secrets.token_hex(4)}"
    url = await create_database(todo_store_server.admin_url, name)
    settings = settings_for(url)
    await migrations.upgrade(settings)
    yield settings
    await drop_database(todo_store_server.admin_url, name)


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def todo_store_engine(todo_store_settings: Settings) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(todo_store_settings)
    yield engine
    await engine.dispose()


@pytest_asyncio.fixture(loop_scope="session")
async def todo_store_session(todo_store_engine: AsyncEngine) -> AsyncIterator[AsyncSession]:
    async with todo_store_engine.connect() as connection:
        outer = await connection.begin()
        session = AsyncSession(
            bind=connection,
            join_transaction_mode="create_savepoint",
            expire_on_commit=False,
            autoflush=False,
        )
        try:
            yield session
        finally:
            await session.close()
            await outer.rollback()


@pytest.fixture(scope="session")
def todo_store_pgbouncer(
    todo_store_server: ProvisionedServer, todo_store_settings: Settings
) -> Iterator[PgBouncer]:
    database = make_url(todo_store_settings.database_url.get_secret_value()).database or ""
    bouncer = start_pgbouncer(todo_store_server, database, pool_size=4)
    try:
        yield bouncer
    finally:
        bouncer.stop()
