"""Named prepared statements left on PgBouncer's server connections after N transactions.

A fresh PgBouncer (transaction mode, pool of 4) per client; `concurrency` client connections
run N single-call units of work, so transactions move between server connections. Clients with
statement caching run on a PgBouncer that tracks prepared statements (>= 1.21 with
`max_prepared_statements = 1000`, as Neon's), where what is left is PgBouncer's own copies,
bounded by the distinct statements sent; they are skipped where no such PgBouncer is installed.
Then as many clients as the pool has server connections each open a transaction (pinning one server
connection each, held until all have answered) and read `count(*) FROM pg_prepared_statements`
there: every server connection is reached once.
"""

from __future__ import annotations

import asyncio
import itertools
import sys
from collections import Counter
from dataclasses import dataclass

import asyncpg

from benchmarks.environment import BOUNCER_POOL_SIZE, Database, asyncpg_dsn
from benchmarks.round_trips import NonAtomicStoreClient, recipe_engine, tracking_pgbouncer
from benchmarks.workload import Client, Owner, StoreClient, make_owner
from todo_store import TodoStore
from todo_store.testing.pgbouncer import PgBouncer, PgBouncerUnavailable
from todo_store.testing.plugin import settings_for

MIX = ("TaskRepo.get", "TaskRepo.list_for", "TaskRepo.count_for", "TaskRepo.toggle")


@dataclass(frozen=True)
class LeakResult:
    label: str
    transactions: int
    per_server: tuple[int, ...]  # named statements on each server connection reached
    pooler: str = "PgBouncer"  # "PgBouncer 1.18", "PgBouncer 1.25 (max_prepared_statements=1000)"

    @property
    def total(self) -> int:
        return sum(self.per_server)


async def measure_leaks(
    db: Database, *, transactions: int, concurrency: int = 8
) -> list[LeakResult]:
    setup = await asyncpg.connect(asyncpg_dsn(db.url))
    try:
        owners = [await make_owner(setup) for _ in range(concurrency)]
    finally:
        await setup.close()
    clients = (
        ("todo_store default (unnamed statements)", _todo_store, False),
        ("todo_store session(atomic=False) (unnamed statements)", _non_atomic, False),
        ("SQLAlchemy recipe (uuid names)", _recipe, False),
        ("todo_store statement_cache=True", _cached, True),
        ("todo_store statement_cache=True, session(atomic=False)", _cached_non_atomic, True),
    )
    results = []
    for label, make, tracking in clients:
        try:
            bouncer = tracking_pgbouncer(db) if tracking else db.bouncer()
        except PgBouncerUnavailable as error:
            print(f"  leak: {label}: not measured: {error}", file=sys.stderr)
            continue
        with bouncer:
            client = make(bouncer.url, concurrency)
            try:
                await _run(client, owners, transactions)
            finally:
                await client.close()
            per_server = await named_statements_per_server(bouncer.url, BOUNCER_POOL_SIZE)
        results.append(LeakResult(label, transactions, per_server, _pooler_name(bouncer)))
        print(f"  leak: {label}: {sum(per_server)} left", file=sys.stderr)
    return results


def _pooler_name(bouncer: PgBouncer) -> str:
    version = ".".join(map(str, bouncer.version))
    if bouncer.max_prepared_statements:
        return f"PgBouncer {version} (max_prepared_statements={bouncer.max_prepared_statements})"
    return f"PgBouncer {version}"


def _todo_store(url: str, pool_size: int) -> Client:
    settings = settings_for(url).model_copy(update={"pool_size": pool_size, "max_overflow": 0})
    return StoreClient(TodoStore(settings))


def _non_atomic(url: str, pool_size: int) -> Client:
    settings = settings_for(url).model_copy(update={"pool_size": pool_size, "max_overflow": 0})
    return NonAtomicStoreClient(TodoStore(settings))


def _cached(url: str, pool_size: int) -> Client:
    update = {"pool_size": pool_size, "max_overflow": 0, "statement_cache": True}
    return StoreClient(TodoStore(settings_for(url).model_copy(update=update)))


def _cached_non_atomic(url: str, pool_size: int) -> Client:
    update = {"pool_size": pool_size, "max_overflow": 0, "statement_cache": True}
    return NonAtomicStoreClient(TodoStore(settings_for(url).model_copy(update=update)))


def _recipe(url: str, pool_size: int) -> Client:
    return recipe_engine(url, pool_size=pool_size)


async def _run(client: Client, owners: list[Owner], transactions: int) -> None:
    counter = itertools.count()

    async def worker(owner: Owner) -> None:
        while (n := next(counter)) < transactions:
            await client.run(MIX[n % len(MIX)], owner)

    await asyncio.gather(*(worker(owner) for owner in owners))


@dataclass(frozen=True)
class CacheCheck:
    """`statement_cache=True` through a PgBouncer that does not track prepared statements."""

    units: int
    failed: int
    errors: tuple[str, ...]


async def statement_cache_on_old_pgbouncer(
    db: Database, *, transactions: int, concurrency: int = 8
) -> CacheCheck:
    """How many units of work fail with the client-side statement cache on, through PgBouncer."""
    setup = await asyncpg.connect(asyncpg_dsn(db.url))
    try:
        owners = [await make_owner(setup) for _ in range(concurrency)]
    finally:
        await setup.close()
    failures: Counter[str] = Counter()
    counter = itertools.count()
    with db.bouncer() as bouncer:
        settings = settings_for(bouncer.url).model_copy(
            update={"pool_size": concurrency, "max_overflow": 0, "statement_cache": True}
        )
        client = StoreClient(TodoStore(settings))

        async def worker(owner: Owner) -> None:
            while (n := next(counter)) < transactions:
                try:
                    await client.run(MIX[n % len(MIX)], owner)
                except Exception as error:  # counted and shown: that is the measurement
                    failures[f"{type(error).__name__}: {error}"] += 1

        try:
            await asyncio.gather(*(worker(owner) for owner in owners))
        finally:
            await client.close()
    print(f"  statement cache via PgBouncer: {failures.total()} failed", file=sys.stderr)
    return CacheCheck(transactions, failures.total(), tuple(sorted(failures)))


async def named_statements_per_server(url: str, servers: int) -> tuple[int, ...]:
    """`pg_prepared_statements` rows on each of `servers` distinct server connections."""
    conns = [
        await asyncpg.connect(asyncpg_dsn(url), statement_cache_size=0) for _ in range(servers)
    ]
    barrier = asyncio.Barrier(servers)

    async def count(conn: asyncpg.Connection) -> tuple[int, int]:
        async with conn.transaction():  # pins one server connection until COMMIT
            row = await conn.fetchrow(
                "SELECT pg_backend_pid() AS pid, count(*) AS n FROM pg_prepared_statements"
            )
            async with asyncio.timeout(30):
                await barrier.wait()
        assert row is not None
        return int(row["pid"]), int(row["n"])

    try:
        rows = await asyncio.gather(*(count(conn) for conn in conns))
    finally:
        for conn in conns:
            await conn.close()
    assert len({pid for pid, _ in rows}) == servers, "two clients shared a server connection"
    return tuple(sorted((n for _, n in rows), reverse=True))
