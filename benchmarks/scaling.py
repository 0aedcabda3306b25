"""How `list_for` and `count_for` latency grows with the table: 10^4 .. 10^6 tasks.

A database of its own: `USERS` users, then tasks added in steps (`INSERT ... SELECT
generate_series`, spread evenly over the users) up to each size, then `VACUUM (ANALYZE)` (the
statistics, and the visibility map a steady-state table has, which index-only scans use).
At each size: the median latency of `samples` single-call units of work on random users
(todo_store default, direct, no injected latency), and the plan PostgreSQL chose.
"""

from __future__ import annotations

import json
import random
import statistics
import sys
import time
from dataclasses import dataclass

import asyncpg

from benchmarks.environment import Database, asyncpg_dsn
from benchmarks.workload import CALLS, Owner
from todo_store import TodoStore
from todo_store.testing.plugin import settings_for

USERS = 1_000
CALLED = ("TaskRepo.list_for", "TaskRepo.count_for")
_EXPLAIN = {
    "TaskRepo.list_for": "SELECT * FROM tasks WHERE user_id = $1 ORDER BY id DESC LIMIT 50",
    "TaskRepo.count_for": "SELECT count(*) FROM tasks WHERE user_id = $1",
}


@dataclass(frozen=True)
class ScalingRow:
    tasks: int
    insert_seconds: float  # to grow the table to this size, VACUUM ANALYZE included
    median_ms: dict[str, float]
    plans: dict[str, str]


def _user(n: int) -> str:
    return f"s_{n:04d}"


async def measure_scaling(db: Database, *, sizes: list[int], samples: int) -> list[ScalingRow]:
    conn = await asyncpg.connect(asyncpg_dsn(db.url))
    store = TodoStore(settings_for(db.url).model_copy(update={"pool_size": 1}))
    rng = random.Random(20240601)  # picks users; not a secret
    rows = []
    try:
        await conn.execute(
            """INSERT INTO users (id, email, name)
               SELECT 's_' || lpad(g::text, 4, '0'), 's_' || g || '@example.com', 'Scale'
               FROM generate_series(0, $1 - 1) AS g""",
            USERS,
        )
        have = 0
        for size in sizes:
            started = time.perf_counter()
            await conn.execute(
                """INSERT INTO tasks (user_id, title, completed)
                   SELECT 's_' || lpad((g % $3)::text, 4, '0'), 'task ' || g, g % 3 = 0
                   FROM generate_series($1, $2 - 1) AS g""",
                have,
                size,
                USERS,
                timeout=600,
            )
            await conn.execute("VACUUM (ANALYZE) tasks", timeout=600)
            have = size
            insert_seconds = time.perf_counter() - started
            medians = {}
            for name in CALLED:
                await _timed(store, name, _user(0))  # warm-up
                latencies = [
                    await _timed(store, name, _user(rng.randrange(USERS))) for _ in range(samples)
                ]
                medians[name] = statistics.median(latencies) * 1000
            plans = {name: await _plan(conn, sql) for name, sql in _EXPLAIN.items()}
            rows.append(ScalingRow(size, insert_seconds, medians, plans))
            shown = ", ".join(f"{n} {ms:.2f} ms" for n, ms in medians.items())
            print(f"  scaling {size:,} tasks: {shown}", file=sys.stderr)
    finally:
        await store.dispose()
        await conn.close()
    return rows


async def _timed(store: TodoStore, name: str, user_id: str) -> float:
    owner = Owner(user_id, f"{user_id}@example.com", ())
    started = time.perf_counter()
    async with store.session() as session:
        await CALLS[name](session, owner)
    return time.perf_counter() - started


async def _plan(conn: asyncpg.Connection, sql: str) -> str:
    """The plan's node types, outermost first, e.g. "Limit > Index Scan Backward"."""
    raw = await conn.fetchval(f"EXPLAIN (FORMAT JSON) {sql}", _user(1))
    node = json.loads(raw)[0]["Plan"]
    names = []
    while node is not None:
        kind = node["Node Type"]
        if node.get("Scan Direction") == "Backward":
            kind += " Backward"
        if "Index Name" in node:
            kind += f" ({node['Index Name']})"
        names.append(kind)
        children = node.get("Plans") or []
        node = children[0] if children else None
    return " > ".join(names)
