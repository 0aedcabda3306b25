"""The test infrastructure itself: a provisioned server, throwaway databases, a real PgBouncer.

Needs only PostgreSQL (from wherever `provision_server()` finds one). The PgBouncer tests skip
when PgBouncer cannot run here, unless TODO_STORE_REQUIRE_PGBOUNCER=1 (CI), where they fail.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest
import pytest_asyncio

from todo_store.testing.pgbouncer import PgBouncer
from todo_store.testing.plugin import start_pgbouncer
from todo_store.testing.postgres import (
    ProvisionedServer,
    create_database,
    drop_database,
    server_from_url,
)


def _unique_name(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(4)}"


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def infra_database(todo_store_server: ProvisionedServer) -> AsyncIterator[str]:
    name = _unique_name("todo_infra")
    await create_database(todo_store_server.admin_url, name)
    yield name
    await drop_database(todo_store_server.admin_url, name)


@pytest.fixture(scope="module")
def infra_bouncer(todo_store_server: ProvisionedServer, infra_database: str) -> Iterator[PgBouncer]:
    bouncer = start_pgbouncer(todo_store_server, infra_database)
    try:
        yield bouncer
    finally:
        bouncer.stop()


def test_url_with_socket_host_is_described_piecewise() -> None:
    server = server_from_url("postgresql://postgres:@/postgres?host=/run/pg", "env")

    assert server.admin_url == "postgresql://postgres:@/postgres?host=/run/pg"  # as given
    assert (server.host, server.port, server.user, server.password) == (
        "/run/pg",
        5432,
        "postgres",
        None,
    )
    assert server.is_unix_socket


def test_url_with_driver_becomes_plain_libpq_url() -> None:
    server = server_from_url("postgresql+asyncpg://app:s3cret@db.example:6543/admin", "env")

    assert server.admin_url == "postgresql://app:s3cret@db.example:6543/admin"
    assert (server.host, server.port, server.user, server.password) == (
        "db.example",
        6543,
        "app",
        "s3cret",
    )
    assert not server.is_unix_socket


@pytest.mark.parametrize("name", ["Upper", "1st", "a-b", "x;drop", "a" * 64, ""])
async def test_unsafe_database_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="must match"):
        await create_database("postgresql://nobody@127.0.0.1:1/postgres", name)


async def test_database_is_created_and_dropped(todo_store_server: ProvisionedServer) -> None:
    name = _unique_name("todo_infra_cd")

    url = await create_database(todo_store_server.admin_url, name)
    conn = await asyncpg.connect(url)
    try:
        assert await conn.fetchval("SELECT current_database()") == name
    finally:
        await conn.close()
    # Still connected elsewhere would not stop the drop (WITH (FORCE)); here nobody is.
    await drop_database(todo_store_server.admin_url, name)

    admin = await asyncpg.connect(todo_store_server.admin_url)
    try:
        exists = await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
    finally:
        await admin.close()
    assert exists is None


@pytest.mark.pgbouncer
async def test_queries_work_through_pgbouncer(infra_bouncer: PgBouncer) -> None:
    conn = await asyncpg.connect(infra_bouncer.url, statement_cache_size=0)
    try:
        assert await conn.fetchval("SELECT 1") == 1
        assert await conn.fetchval("SELECT $1::int + 1", 41) == 42
        async with conn.transaction():
            assert await conn.fetchval("SELECT current_database()") == infra_bouncer.database
    finally:
        await conn.close()


@pytest.mark.pgbouncer
async def test_admin_console_reports_transaction_mode(infra_bouncer: PgBouncer) -> None:
    conn = await asyncpg.connect(infra_bouncer.url, statement_cache_size=0)
    try:
        await conn.fetchval("SELECT 1")  # a pool exists only once a client has used it
        pools = infra_bouncer.admin_query("SHOW POOLS")
    finally:
        await conn.close()
    config = {row["key"]: row["value"] for row in infra_bouncer.admin_query("SHOW CONFIG")}

    assert config["pool_mode"] == "transaction"
    assert config["default_pool_size"] == "4"
    ours = [row for row in pools if row["database"] == infra_bouncer.database]
    assert [row["pool_mode"] for row in ours] == ["transaction"]


@pytest.mark.pgbouncer
async def test_restart_keeps_port_and_drops_clients(infra_bouncer: PgBouncer) -> None:
    old = await asyncpg.connect(infra_bouncer.url, statement_cache_size=0)
    port, url = infra_bouncer.port, infra_bouncer.url
    try:
        assert await old.fetchval("SELECT 1") == 1

        infra_bouncer.restart()

        assert (infra_bouncer.port, infra_bouncer.url) == (port, url)
        with pytest.raises((asyncpg.InterfaceError, asyncpg.PostgresConnectionError, OSError)):
            await old.fetchval("SELECT 1")
    finally:
        old.terminate()

    new = await asyncpg.connect(infra_bouncer.url, statement_cache_size=0)
    try:
        assert await new.fetchval("SELECT 1") == 1
    finally:
        await new.close()
