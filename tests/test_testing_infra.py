"""The test infrastructure itself: a provisioned server, throwaway databases, a real PgBouncer.

Needs only PostgreSQL (from wherever `provision_server()` finds one). The PgBouncer tests skip
when PgBouncer cannot run here, unless TODO_STORE_REQUIRE_PGBOUNCER=1 (CI), where they fail.
"""

from __future__ import annotations

import asyncio
import secrets
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest
import pytest_asyncio
from sqlalchemy.engine import make_url

from tests.rigs.proxy import ProxyStats, RoundTripProxy
from tests.rigs.wire import SYNC, bind, exchange, execute, parse
from todo_store.testing.pgbouncer import (
    TRACKING_BINARY_ENV,
    PgBouncer,
    PgBouncerUnavailable,
    binary_version,
    tracking_binary,
)
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


def test_repr_of_a_server_hides_its_password() -> None:
    server = server_from_url("postgresql://admin:Sup3r-s3cret@db.example:6543/postgres", "env")
    server_in_query = server_from_url(
        "postgresql://admin@/postgres?host=/run/pg&password=Sup3r-s3cret", "env"
    )

    for shown in (repr(server), str(server), repr(server_in_query), f"{[server]}"):
        assert "Sup3r-s3cret" not in shown
        assert "admin" in shown  # still says which server and role it is


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


# -- the round-trip proxy's wire checks ---------------------------------------------------------


async def _exchange_through_proxy(url: str, batches: list[bytes]) -> tuple[list[str], ProxyStats]:
    parsed = make_url(url)
    async with RoundTripProxy.in_front_of(url) as proxy:
        results = await asyncio.to_thread(
            exchange, proxy.host, proxy.port, parsed.username or "", parsed.database or "", batches
        )
        # Terminate has been sent: wait until the proxy has read everything.
        for _ in range(500):
            if proxy.open_connections == 0:
                break
            await asyncio.sleep(0.01)
        return results, proxy.snapshot()


async def test_proxy_flags_a_bind_outside_the_sync_group_of_its_parse(
    todo_store_server: ProvisionedServer, infra_database: str
) -> None:
    """Directly, PostgreSQL keeps the unnamed statement across Sync, so this works; through a
    transaction pooler the Bind could reach another server. The proxy counts it."""
    url = make_url(todo_store_server.admin_url).set(database=infra_database)
    results, stats = await _exchange_through_proxy(
        url.render_as_string(hide_password=False),
        [parse("", "SELECT 1") + SYNC, bind("") + execute() + SYNC],
    )
    assert results == ["", ""]
    assert stats.unnamed_binds == 1
    assert stats.unparsed_unnamed_binds == 1
    assert stats.named_statements == 0


async def test_proxy_accepts_a_bind_after_its_parse_in_the_same_group(
    todo_store_server: ProvisionedServer, infra_database: str
) -> None:
    url = make_url(todo_store_server.admin_url).set(database=infra_database)
    results, stats = await _exchange_through_proxy(
        url.render_as_string(hide_password=False),
        [
            parse("", "SELECT 1") + bind("") + execute() + SYNC,
            parse("named_one", "SELECT 2") + SYNC,
            bind("named_one") + execute() + SYNC,
        ],
    )
    assert results == ["", "", ""]
    assert (stats.unnamed_binds, stats.unparsed_unnamed_binds) == (1, 0)
    assert stats.named_statements == 1
    assert stats.messages["Bind"] == 2


async def test_exchange_reports_the_sqlstate_of_a_failed_batch(
    todo_store_server: ProvisionedServer, infra_database: str
) -> None:
    url = make_url(todo_store_server.admin_url).set(database=infra_database)
    results, _ = await _exchange_through_proxy(
        url.render_as_string(hide_password=False),
        [bind("never_prepared") + execute() + SYNC, parse("", "SELECT 1") + SYNC],
    )
    assert results == ["26000", ""]  # invalid_sql_statement_name; the connection goes on


# -- which PgBouncer runs: one that tracks prepared statements -----------------------------------


def test_tracking_binary_refuses_a_pgbouncer_that_cannot_track(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    old = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    if not Path(old).is_file() or binary_version(old) >= (1, 21):
        pytest.skip("needs a PgBouncer older than 1.21 installed (Debian 12's 1.18)")
    monkeypatch.setenv(TRACKING_BINARY_ENV, old)
    with pytest.raises(PgBouncerUnavailable, match=r"it must be >= 1\.21"):
        tracking_binary()
    monkeypatch.delenv(TRACKING_BINARY_ENV)
    monkeypatch.setenv("PATH", str(Path(old).parent))
    with pytest.raises(PgBouncerUnavailable, match=TRACKING_BINARY_ENV):
        tracking_binary()


def test_tracking_binary_names_a_missing_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(TRACKING_BINARY_ENV, str(tmp_path / "pgbouncer"))
    with pytest.raises(PgBouncerUnavailable, match="not an executable file"):
        tracking_binary()


@pytest.mark.pgbouncer
def test_tracking_pgbouncer_runs_as_neon_configures_it(tracking_pgbouncer: PgBouncer) -> None:
    config = {row["key"]: row["value"] for row in tracking_pgbouncer.admin_query("SHOW CONFIG")}
    version = tracking_pgbouncer.admin_query("SHOW VERSION")[0]["version"] or ""

    assert tracking_pgbouncer.version >= (1, 21)
    assert version.startswith("PgBouncer 1.")
    assert config["max_prepared_statements"] == "1000"
    assert config["pool_mode"] == "transaction"
    assert tracking_pgbouncer.tracks_prepared_statements


@pytest.mark.pgbouncer
def test_default_pgbouncer_does_not_track_statements(todo_store_pgbouncer: PgBouncer) -> None:
    config = {row["key"]: row["value"] for row in todo_store_pgbouncer.admin_query("SHOW CONFIG")}
    assert config.get("max_prepared_statements", "0") == "0"
    assert not todo_store_pgbouncer.tracks_prepared_statements
