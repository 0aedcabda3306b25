"""Throughput of the hot calls: todo_store against its peers, interleaved, in one process.

A database of its own with `users` users of `tasks_per_user` tasks each. Direct to
PostgreSQL, no injected latency, `workers` concurrent workers, a pool of `workers`
connections (max_overflow 0) and statement caching off, as the package runs by default.
Every operation is its own unit of work on a random user (and a random task of that user),
so that concurrent writers rarely meet on one row.

For each call, every round runs each implementation for `seconds`, in an order that rotates
from round to round (and reverses every other round), so that drift of a shared machine hits
all alike. Before each call the table is vacuumed (`VACUUM ANALYZE tasks`, as pgbench vacuums
before a run): the write calls leave dead rows and visibility bits unset, which autovacuum
clears at a moment of its own choosing, so a call measured after them (`count_for`'s
index-only scan) would otherwise depend on when autovacuum ran.

Per implementation and call the result keeps each round's ops/s and the client CPU (this
process's CPU time / operations); ratios are taken within a round and then summarised.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import sys
import time
from dataclasses import dataclass, field

import asyncpg

from benchmarks.environment import Database, asyncpg_dsn
from benchmarks.peers import (
    HOT_CALLS,
    AdvancedAlchemy,
    CoreRows,
    Implementation,
    Operation,
    RawAsyncpg,
    TodoStoreImpl,
    TodoStoreOnConnection,
    TutorialOrm,
    supports_non_atomic,
)
from todo_store import TodoStore
from todo_store.testing.plugin import settings_for

TODO_STORE = "todo_store"
TODO_STORE_NON_ATOMIC = "todo_store atomic=False"
TODO_STORE_CONNECTION = "todo_store on AsyncConnection, atomic=False"
TUTORIAL = "tutorial ORM"
ADVANCED_ALCHEMY = "advanced-alchemy"
CORE = "SQLAlchemy Core"
RAW = "raw asyncpg"
RAW_NON_ATOMIC = "raw asyncpg, no transaction"


@dataclass(frozen=True)
class Plan:
    users: int = 200
    tasks_per_user: int = 200
    workers: int = 8
    rounds: int = 5
    seconds: float = 1.5  # per implementation, call and round
    warmup_seconds: float = 0.3


@dataclass(frozen=True)
class Spread:
    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: list[float]) -> Spread:
        return cls(statistics.median(values), min(values), max(values))


@dataclass
class Cell:
    """One implementation on one call: a value per round."""

    ops_per_s: list[float] = field(default_factory=list)
    cpu_ms_per_op: list[float] = field(default_factory=list)
    errors: int = 0


@dataclass
class Comparison:
    plan: Plan
    labels: list[str]  # implementations, in report order
    cells: dict[tuple[str, str], Cell]  # (label, call) -> cell
    missing: dict[str, str]  # label -> why it was not measured

    def ops(self, label: str, call: str) -> Spread:
        return Spread.of(self.cells[label, call].ops_per_s)

    def cpu(self, label: str, call: str) -> Spread:
        return Spread.of(self.cells[label, call].cpu_ms_per_op)

    def ratio(self, label: str, other: str, call: str) -> Spread | None:
        """`label` ops/s over `other` ops/s, round by round (same conditions in each round)."""
        if (label, call) not in self.cells or (other, call) not in self.cells:
            return None
        mine, theirs = self.cells[label, call].ops_per_s, self.cells[other, call].ops_per_s
        return Spread.of([a / b for a, b in zip(mine, theirs, strict=True) if b > 0])


async def make_users(conn: asyncpg.Connection, plan: Plan) -> dict[str, list[int]]:
    """`plan.users` users with `plan.tasks_per_user` tasks each: user id -> task ids."""
    async with conn.transaction():
        await conn.execute(
            """INSERT INTO users (id, email, name)
               SELECT 'cmp_' || g, 'cmp_' || g || '@example.com', 'Bench'
               FROM generate_series(1, $1) AS g""",
            plan.users,
        )
        await conn.execute(
            """INSERT INTO tasks (user_id, title, completed)
               SELECT 'cmp_' || u, 'task ' || t, t % 3 = 0
               FROM generate_series(1, $1) AS u, generate_series(1, $2) AS t""",
            plan.users,
            plan.tasks_per_user,
        )
    await conn.execute("VACUUM ANALYZE tasks")
    owned: dict[str, list[int]] = {}
    for row in await conn.fetch("SELECT user_id, id FROM tasks ORDER BY id"):
        owned.setdefault(row["user_id"], []).append(row["id"])
    return owned


async def vacuum(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("VACUUM ANALYZE tasks")
    finally:
        await conn.close()


async def compare(db: Database, plan: Plan) -> Comparison:
    setup = await asyncpg.connect(asyncpg_dsn(db.url))
    try:
        owned = await make_users(setup, plan)
    finally:
        await setup.close()
    settings = settings_for(db.url).model_copy(
        update={"pool_size": plan.workers, "max_overflow": 0}
    )
    store = TodoStore(settings)
    raw_connections = await RawAsyncpg.connect(asyncpg_dsn(db.url), plan.workers)
    implementations: list[Implementation] = [TodoStoreImpl(store)]
    missing: dict[str, str] = {}
    if supports_non_atomic(store):
        implementations.append(TodoStoreImpl(store, atomic=False))
        implementations.append(TodoStoreOnConnection(store))
    else:
        missing[TODO_STORE_NON_ATOMIC] = "this todo_store has no session(atomic=False)"
    implementations += [TutorialOrm(store.engine)]
    try:
        implementations.append(AdvancedAlchemy(store.engine))
    except ImportError as error:
        missing[ADVANCED_ALCHEMY] = f"not installed ({error.name})"
    implementations += [
        CoreRows(store.engine),
        RawAsyncpg(raw_connections),
        RawAsyncpg(raw_connections, atomic=False),
    ]
    cells = {(impl.label, call): Cell() for impl in implementations for call in HOT_CALLS}
    try:
        for call in HOT_CALLS:
            await vacuum(asyncpg_dsn(db.url))
            operations = [(impl.label, impl.operations()[call]) for impl in implementations]
            for _label, operation in operations:
                await _run(operation, owned, plan.workers, plan.warmup_seconds, seed=0)
            for n in range(plan.rounds):
                shift = n % len(operations)
                order = operations[shift:] + operations[:shift]
                for label, operation in order if n % 2 == 0 else reversed(order):
                    cell = cells[label, call]
                    ops, wall, cpu, errors = await _run(
                        operation, owned, plan.workers, plan.seconds, seed=n + 1
                    )
                    cell.ops_per_s.append(ops / wall)
                    cell.cpu_ms_per_op.append(cpu / max(ops, 1) * 1000)
                    cell.errors += errors
            line = ", ".join(
                f"{label} {statistics.median(cells[label, call].ops_per_s):,.0f}"
                for label, _ in operations
            )
            print(f"  comparison {call}: {line} ops/s", file=sys.stderr)
    finally:
        await store.dispose()
        for conn in raw_connections:
            await conn.close()
    labels = [impl.label for impl in implementations]
    return Comparison(plan, labels, cells, missing)


async def _run(
    operation: Operation, owned: dict[str, list[int]], workers: int, seconds: float, *, seed: int
) -> tuple[int, float, float, int]:
    """Operations completed by `workers` workers in `seconds`: (ops, wall s, CPU s, errors)."""
    users = sorted(owned)
    done = errors = 0
    started = time.perf_counter()
    cpu_started = time.process_time()
    deadline = started + seconds

    async def worker(rng: random.Random) -> None:
        nonlocal done, errors
        while time.perf_counter() < deadline:
            user = rng.choice(users)
            try:
                await operation(user, rng.choice(owned[user]))
            except Exception as error:  # counted and reported; a benchmark must not hide them
                errors += 1
                if errors == 1:
                    print(f"  error: {type(error).__name__}: {error}", file=sys.stderr)
            else:
                done += 1

    # Seeds are fixed per round, so every implementation gets the same sequence of picks.
    await asyncio.gather(*(worker(random.Random(seed * 1000 + w)) for w in range(workers)))
    return done, time.perf_counter() - started, time.process_time() - cpu_started, errors
