"""The Neon / PgBouncer rules, proven through a real PgBouncer in transaction mode.

The gauntlet: 120 workers each run 12 units of work of mixed repository calls (1,440 units)
through a PgBouncer of its own (pool of 4 server connections), atomic or not, with statement
caching off through any PgBouncer and on through one that tracks prepared statements; a
round-trip proxy in front of PgBouncer watches the wire. Then the final rows are checked
exactly (no error, no lost write) and every server connection is asked what it still holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest
from conftest import command_env, start_tracking_pgbouncer
from sqlalchemy import text
from sqlalchemy.engine import make_url

from tests.rigs.proxy import RoundTripProxy
from todo_store import DatabaseUnavailable, Settings, TaskRepo, TodoStore, UserRepo, migrations
from todo_store.doctor import diagnose
from todo_store.pooler import PROBE_STATEMENT
from todo_store.pooler import probe as probe_pooler
from todo_store.schema_checks import CheckResult
from todo_store.testing.pgbouncer import PgBouncer
from todo_store.testing.plugin import settings_for, start_pgbouncer
from todo_store.testing.postgres import ProvisionedServer

ROOT = Path(__file__).resolve().parent.parent
ATOMIC = [pytest.param(True, id="atomic"), pytest.param(False, id="non-atomic")]
WORKERS = 120
UNITS_PER_WORKER = 12
BOUNCER_POOL_SIZE = 4


async def _terminate_backends(settings: Settings) -> int:
    """Kill every other server connection to the test database, as a Neon suspend does, and
    wait (up to 5 s each) until those backends have exited, so their sockets are closed."""
    connection = await asyncpg.connect(settings.database_url.get_secret_value())
    try:
        killed = await connection.fetchval(
            """SELECT count(*) FILTER (WHERE pg_terminate_backend(pid, 5000))
               FROM pg_stat_activity
               WHERE datname = current_database() AND pid <> pg_backend_pid()"""
        )
    finally:
        await connection.close()
    assert isinstance(killed, int)
    return killed


async def _until_pgbouncer_sees_no_server(bouncer: PgBouncer) -> None:
    """Bounded poll: PgBouncer has dropped every server connection of its database.

    A request that reaches PgBouncer before it has read the server's close gets that dead
    server connection; a compute suspend happens long before the next request does.
    """
    for _ in range(500):
        servers = bouncer.admin_query("SHOW SERVERS")
        if not any(row.get("database") == bouncer.database for row in servers):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("PgBouncer still lists server connections after 5 s")


async def _fill_pool(store: TodoStore, size: int) -> None:
    """Open `size` pooled connections at once, so the pool holds that many."""
    barrier = asyncio.Barrier(size)

    async def hold() -> None:
        async with store.session() as session:
            await session.execute(text("SELECT 1"))
            await barrier.wait()

    await asyncio.gather(*(hold() for _ in range(size)))


async def _named_prepared_statements(bouncer: PgBouncer, pool_size: int) -> list[int]:
    """`pg_prepared_statements` counts seen from every server connection of the pool.

    Each client holds a transaction while it asks, so PgBouncer has to give each one its own
    server connection and all of them are inspected.
    """
    clients = [await asyncpg.connect(bouncer.url, statement_cache_size=0) for _ in range(pool_size)]
    try:
        transactions = [client.transaction() for client in clients]
        for transaction in transactions:
            await transaction.start()
        counts = [
            await client.fetchval("SELECT count(*) FROM pg_prepared_statements")
            for client in clients
        ]
        pids = {await client.fetchval("SELECT pg_backend_pid()") for client in clients}
        assert len(pids) == pool_size
        for transaction in transactions:
            await transaction.rollback()
        return counts
    finally:
        for client in clients:
            await client.close()


@pytest.fixture
def own_pgbouncer(todo_store_pgbouncer: PgBouncer) -> Iterator[PgBouncer]:
    """A PgBouncer of this test's own (pool of 4), so its server connections start empty."""
    with PgBouncer(todo_store_pgbouncer.server, todo_store_pgbouncer.database, pool_size=4) as b:
        yield b


@dataclass(frozen=True)
class Gauntlet:
    """What a gauntlet run found."""

    units: int
    errors: list[str]
    lost_writes: int
    left_per_server: list[int]  # named statements on each of the pool's server connections
    distinct_named: int  # distinct query texts the clients prepared under a name
    named_parses: int
    unparsed_unnamed_binds: int

    def __str__(self) -> str:
        return (
            f"{self.units} units, {len(self.errors)} errors, {self.lost_writes} lost writes, "
            f"statements left per server {self.left_per_server}, "
            f"{self.distinct_named} distinct named statements sent ({self.named_parses} Parse), "
            f"{self.unparsed_unnamed_binds} unnamed Binds without their Parse"
        )


async def _run_gauntlet(bouncer: PgBouncer, *, atomic: bool, statement_cache: bool) -> Gauntlet:
    async with RoundTripProxy.in_front_of(bouncer.url) as proxy:
        settings = settings_for(proxy.url_for(bouncer.url)).model_copy(
            update={"statement_cache": statement_cache}
        )
        async with TodoStore(settings) as store:
            errors, lost = await _mixed_units_of_work(store, atomic=atomic)
        stats = proxy.snapshot()
        distinct = len(proxy.named_statement_texts)
    left = await _named_prepared_statements(bouncer, pool_size=BOUNCER_POOL_SIZE)
    result = Gauntlet(
        units=WORKERS * UNITS_PER_WORKER,
        errors=errors,
        lost_writes=lost,
        left_per_server=left,
        distinct_named=distinct,
        named_parses=stats.named_statements,
        unparsed_unnamed_binds=stats.unparsed_unnamed_binds,
    )
    version = ".".join(map(str, bouncer.version))
    mode = "atomic" if atomic else "non-atomic"
    print(f"\ngauntlet, PgBouncer {version}, {mode}, cache {statement_cache}: {result}")
    return result


async def _mixed_units_of_work(store: TodoStore, *, atomic: bool) -> tuple[list[str], int]:
    """`WORKERS` workers, `UNITS_PER_WORKER` units each, of mixed repository calls.

    Returns the errors raised and the number of lost writes, found by checking every row
    left against what the units that succeeded must have written.
    """
    users = [f"pool_{secrets.token_hex(4)}_{n}" for n in range(4)]
    async with store.session() as session:
        for user_id in users:
            await UserRepo(session).upsert(user_id, email=f"{user_id}@example.com", name="P")

    async def unit(n: int) -> None:
        user_id = users[n % len(users)]
        async with store.session(atomic=atomic) as session:
            tasks = TaskRepo(session)
            task = await tasks.create(user_id, title=f"task {n}")
            await tasks.toggle(user_id, task.id)
            await tasks.update(user_id, task.id, description=f"unit {n}")
            assert [t.id for t in await tasks.list_for(user_id, limit=500)].count(task.id) == 1
            if n % 3 == 0:
                await tasks.delete(user_id, task.id)

    errors: list[str] = []

    async def worker(w: int) -> None:
        for k in range(UNITS_PER_WORKER):
            try:
                await unit(w * UNITS_PER_WORKER + k)
            except Exception as error:  # counted and shown: that is the measurement
                errors.append(f"{type(error).__name__}: {error}")

    await asyncio.gather(*(worker(w) for w in range(WORKERS)))
    units = WORKERS * UNITS_PER_WORKER
    kept = {n for n in range(units) if n % 3}
    async with store.session() as session:
        found = 0
        for user_id in users:  # at most 360 tasks each: one page of 500 holds them all
            for task in await TaskRepo(session).list_for(user_id, limit=500):
                n = int(task.title.removeprefix("task "))
                if n in kept and task.completed and task.description == f"unit {n}":
                    found += 1
        for user_id in users:
            await UserRepo(session).delete(user_id)
    return errors, len(kept) - found


@pytest.mark.pgbouncer
@pytest.mark.parametrize("atomic", ATOMIC)
async def test_gauntlet_through_pgbouncer(own_pgbouncer: PgBouncer, atomic: bool) -> None:
    """Caching off, through a PgBouncer that does not track prepared statements."""
    found = await _run_gauntlet(own_pgbouncer, atomic=atomic, statement_cache=False)
    assert found.errors == []
    assert found.lost_writes == 0
    assert found.left_per_server == [0] * BOUNCER_POOL_SIZE
    assert found.named_parses == 0
    assert found.unparsed_unnamed_binds == 0


@pytest.mark.pgbouncer
@pytest.mark.parametrize("statement_cache", [False, True], ids=["cache-off", "cache-on"])
@pytest.mark.parametrize("atomic", ATOMIC)
async def test_gauntlet_through_tracking_pgbouncer(
    todo_store_pgbouncer: PgBouncer, atomic: bool, statement_cache: bool
) -> None:
    """Through a PgBouncer that tracks prepared statements (max_prepared_statements = 1000)."""
    bouncer = start_tracking_pgbouncer(
        todo_store_pgbouncer.server, todo_store_pgbouncer.database, pool_size=BOUNCER_POOL_SIZE
    )
    try:
        found = await _run_gauntlet(bouncer, atomic=atomic, statement_cache=statement_cache)
    finally:
        bouncer.stop()
    assert found.errors == []
    assert found.lost_writes == 0
    assert found.unparsed_unnamed_binds == 0
    if statement_cache:
        # PgBouncer keeps one server-side copy per distinct statement and server connection.
        assert found.distinct_named > 0
        assert all(0 <= n <= found.distinct_named for n in found.left_per_server)
        assert any(found.left_per_server)  # the count does see PgBouncer's statements
    else:
        assert found.named_parses == 0
        assert found.left_per_server == [0] * BOUNCER_POOL_SIZE


@pytest.mark.parametrize("atomic", ATOMIC)
async def test_pool_of_dead_connections_recovers_on_next_unit(
    todo_store_settings: Settings, new_user_id: str, atomic: bool
) -> None:
    async with TodoStore(todo_store_settings.model_copy(update={"pool_size": 3})) as store:
        await _fill_pool(store, 3)
        assert store.engine.pool.checkedin() == 3  # type: ignore[attr-defined]
        assert await _terminate_backends(todo_store_settings) >= 3

        async def unit(n: int) -> str:
            async with store.session(atomic=atomic) as session:
                user = await UserRepo(session).upsert(
                    f"{new_user_id}_{n}", email=f"{new_user_id}_{n}@example.com", name="L"
                )
                return user.id

        # As many units as the pool had connections, all at once: none may fail.
        assert len(await asyncio.gather(*(unit(n) for n in range(3)))) == 3
        async with store.session() as session:
            for n in range(3):
                await UserRepo(session).delete(f"{new_user_id}_{n}")


@pytest.mark.pgbouncer
@pytest.mark.parametrize("atomic", ATOMIC)
async def test_server_connections_killed_behind_pgbouncer(
    pooled_store: TodoStore,
    todo_store_pgbouncer: PgBouncer,
    todo_store_settings: Settings,
    new_user_id: str,
    atomic: bool,
) -> None:
    await _fill_pool(pooled_store, 4)
    assert await _terminate_backends(todo_store_settings) >= 1
    await _until_pgbouncer_sees_no_server(todo_store_pgbouncer)
    async with pooled_store.session(atomic=atomic) as session:
        await UserRepo(session).upsert(new_user_id, email=f"{new_user_id}@x.io", name="K")
    async with pooled_store.session() as session:
        await UserRepo(session).delete(new_user_id)


@pytest.mark.pgbouncer
@pytest.mark.parametrize("atomic", ATOMIC)
async def test_pgbouncer_restart_is_survived_without_caller_retry(
    pooled_store: TodoStore, todo_store_pgbouncer: PgBouncer, new_user_id: str, atomic: bool
) -> None:
    await _fill_pool(pooled_store, 4)
    todo_store_pgbouncer.restart()  # every client connection in the pool is now dead
    for n in range(4):
        async with pooled_store.session(atomic=atomic) as session:
            await UserRepo(session).upsert(
                f"{new_user_id}_{n}", email=f"{new_user_id}_{n}@x.io", name="R"
            )
    async with pooled_store.session() as session:
        for n in range(4):
            await UserRepo(session).delete(f"{new_user_id}_{n}")


async def test_unreachable_database_is_database_unavailable(
    todo_store_settings: Settings,
) -> None:
    closed_port = "postgresql://postgres@127.0.0.1:9/none"
    settings = todo_store_settings.model_copy(
        update={"database_url": type(todo_store_settings.database_url)(closed_port)}
    )
    async with TodoStore(settings) as store:
        with pytest.raises(DatabaseUnavailable):
            await store.ping()


async def test_statement_timeout_is_database_unavailable(todo_store_settings: Settings) -> None:
    one_connection = {"statement_timeout": 0.2, "pool_size": 1, "max_overflow": 0}
    async with TodoStore(todo_store_settings.model_copy(update=one_connection)) as store:
        with pytest.raises(DatabaseUnavailable, match="timed out"):
            async with store.session() as session:
                await session.execute(text("SELECT pg_sleep(5)"))
        async with store.session() as session:  # the one pooled connection still works
            assert await session.scalar(text("SELECT 1")) == 1


async def test_concurrent_upgrades_serialise(empty_database: str) -> None:
    env = command_env(empty_database)
    processes = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "alembic",
            "upgrade",
            "head",
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(3)
    ]
    outputs = [await process.communicate() for process in processes]
    assert [p.returncode for p in processes] == [0, 0, 0], [o[1].decode() for o in outputs]
    applied = [o[1].decode().count("Running upgrade  -> 0001") for o in outputs]
    assert sorted(applied) == [0, 0, 1]  # one applied it, the others found head

    settings = settings_for(empty_database)
    assert await migrations.current_revision(settings) == migrations.head_revision()
    connection = await asyncpg.connect(empty_database)
    try:
        assert await connection.fetchval("SELECT count(*) FROM alembic_version") == 1
    finally:
        await connection.close()


# -- finding the pooler by experiment (`todo_store.pooler`, `todo-store doctor`) -----------------


def _looks_like_the_server(server: ProvisionedServer, address: str) -> tuple[str, int] | None:
    """Listen on another loopback address at the server's own port, where that is possible, so
    that neither the host name nor the port gives the pooler away (else: a free port)."""
    if server.is_unix_socket or server.host not in ("127.0.0.1", "localhost"):
        return None
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # As PgBouncer does: connections of an earlier run may linger in TIME_WAIT there.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((address, server.port))
        except OSError:
            return None
    return address, server.port


@contextlib.contextmanager
def _bouncer(
    base: PgBouncer, *, tracking: bool, address: str, pool_size: int = BOUNCER_POOL_SIZE
) -> Iterator[PgBouncer]:
    listen = _looks_like_the_server(base.server, address)
    start = start_tracking_pgbouncer if tracking else start_pgbouncer
    bouncer = start(base.server, base.database, pool_size=pool_size, listen=listen)
    try:
        yield bouncer
    finally:
        bouncer.stop()


async def _probe_statements_on_servers(bouncer: PgBouncer) -> list[tuple[int, int]]:
    """Per server connection: (statements named by a probe, copies of the probe's text)."""
    clients = [
        await asyncpg.connect(bouncer.url, statement_cache_size=0) for _ in range(bouncer.pool_size)
    ]
    try:
        transactions = [client.transaction() for client in clients]
        for transaction in transactions:
            await transaction.start()
        rows = [
            await client.fetchrow(
                """SELECT pg_backend_pid() AS pid,
                          count(*) FILTER (WHERE name LIKE 'todo_store_probe_%') AS ours,
                          count(*) FILTER (WHERE statement = $1) AS copies
                   FROM pg_prepared_statements""",
                PROBE_STATEMENT,
            )
            for client in clients
        ]
        for transaction in transactions:
            await transaction.rollback()
    finally:
        for client in clients:
            await client.close()
    assert len({row["pid"] for row in rows if row}) == bouncer.pool_size
    return sorted((row["ours"], row["copies"]) for row in rows if row)


async def test_probe_finds_a_direct_connection(todo_store_settings: Settings) -> None:
    found = await probe_pooler(todo_store_settings)
    assert not found.transaction_pooling
    assert not found.renamed
    assert found.statement_cache_safe
    assert found.summary.startswith("direct: ")


@pytest.mark.pgbouncer
@pytest.mark.parametrize("pool_size", [BOUNCER_POOL_SIZE, 50])
async def test_probe_finds_pgbouncer_without_tracking(
    todo_store_pgbouncer: PgBouncer, pool_size: int
) -> None:
    with _bouncer(
        todo_store_pgbouncer, tracking=False, address="127.0.0.2", pool_size=pool_size
    ) as bouncer:
        for _ in range(3):
            found = await probe_pooler(settings_for(bouncer.url))
            assert found.transaction_pooling, found
            assert not found.tracks_statements, found
            assert not found.statement_cache_safe, found
        if pool_size == BOUNCER_POOL_SIZE:
            # Its statement was deallocated inside its own transaction: nothing is left.
            assert await _probe_statements_on_servers(bouncer) == [(0, 0)] * pool_size


@pytest.mark.pgbouncer
@pytest.mark.parametrize("pool_size", [BOUNCER_POOL_SIZE, 50])
async def test_probe_finds_pgbouncer_that_tracks_statements(
    todo_store_pgbouncer: PgBouncer, pool_size: int
) -> None:
    with _bouncer(
        todo_store_pgbouncer, tracking=True, address="127.0.0.3", pool_size=pool_size
    ) as bouncer:
        for _ in range(3):
            found = await probe_pooler(settings_for(bouncer.url))
            assert found.transaction_pooling, found
            assert found.tracks_statements, found
            assert found.ran_on_another_backend, found
            assert found.statement_cache_safe, found
        if pool_size == BOUNCER_POOL_SIZE:
            # Our name never reaches a server; PgBouncer keeps at most one copy of the text
            # per server connection, however often the probe runs.
            left = await _probe_statements_on_servers(bouncer)
            assert all(ours == 0 and copies <= 1 for ours, copies in left), left


async def _doctor_lines(url: str, *, statement_cache: bool) -> dict[str, CheckResult]:
    settings = settings_for(url).model_copy(update={"statement_cache": statement_cache})
    return {result.name: result for result in await diagnose(settings)}


@pytest.mark.parametrize("statement_cache", [False, True], ids=["cache-off", "cache-on"])
async def test_doctor_on_a_direct_connection(
    todo_store_settings: Settings, statement_cache: bool
) -> None:
    url = todo_store_settings.database_url.get_secret_value()
    checks = await _doctor_lines(url, statement_cache=statement_cache)
    assert checks["pooler"].ok
    assert checks["pooler"].detail.startswith("direct: no transaction pooler")
    assert checks["statement cache"].ok, checks["statement cache"]


@pytest.mark.pgbouncer
@pytest.mark.parametrize("statement_cache", [False, True], ids=["cache-off", "cache-on"])
async def test_doctor_on_pgbouncer_without_tracking_addressed_by_ip(
    todo_store_pgbouncer: PgBouncer, statement_cache: bool
) -> None:
    """Debian's 1.18 at 127.0.0.2 (at the server's own port where possible): no host name and
    no port gives it away; caching on must fail loudly, off must pass."""
    with _bouncer(todo_store_pgbouncer, tracking=False, address="127.0.0.2") as bouncer:
        if bouncer.listen is not None:
            assert make_url(bouncer.url).port == bouncer.server.port  # the server's own port
        checks = await _doctor_lines(bouncer.url, statement_cache=statement_cache)
    assert checks["pooler"].ok
    assert checks["pooler"].detail.startswith(
        "pooled: a transaction pooler that does not track prepared statements"
    )
    cache = checks["statement cache"]
    if statement_cache:
        assert not cache.ok
        assert cache.detail.startswith("on, through a pooler:")
        assert "STATEMENT_CACHE=false" in cache.hint
    else:
        assert cache.ok
        assert cache.detail == "off: safe through any pooler"


@pytest.mark.pgbouncer
@pytest.mark.parametrize("statement_cache", [False, True], ids=["cache-off", "cache-on"])
async def test_doctor_on_pgbouncer_that_tracks_statements_addressed_by_ip(
    todo_store_pgbouncer: PgBouncer, statement_cache: bool
) -> None:
    """Neon's setup (max_prepared_statements = 1000), at 127.0.0.3: caching is safe."""
    with _bouncer(todo_store_pgbouncer, tracking=True, address="127.0.0.3") as bouncer:
        checks = await _doctor_lines(bouncer.url, statement_cache=statement_cache)
    assert checks["pooler"].ok
    assert checks["pooler"].detail.startswith(
        "pooled: a transaction pooler that tracks prepared statements"
    )
    cache = checks["statement cache"]
    assert cache.ok, cache
    if statement_cache:
        assert cache.detail == "on: safe, the pooler tracks prepared statements"
    else:
        assert "STATEMENT_CACHE=true is safe too" in cache.detail
