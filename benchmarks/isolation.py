"""What row-level security costs `list_for` at 10^6 tasks: `python -m benchmarks.isolation`.

A database of its own, migrated to head (row-level security enabled and forced on `tasks`),
1,000 users with 1,000 tasks each (10^6), `VACUUM (ANALYZE)`. The application's side runs as
a runtime role given its privileges by `grant` (what `todo-store grant` does), in units of
work bound to a random user, one `list_for` (a page of 50) each, direct, no injected latency.
Rounds alternate between row-level security on (as migrated) and off (`ALTER TABLE tasks
DISABLE ROW LEVEL SECURITY`, the same units of work), so drift in the machine's load hits both
alike; the medians of each state are compared. The plans PostgreSQL chose are printed too:
the repositories' query, and a query with no WHERE at all (the policy alone narrows it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import secrets
import statistics
import time
from typing import Any

import asyncpg
from sqlalchemy.engine import make_url

from benchmarks.environment import asyncpg_dsn, database, server
from todo_store import TaskRepo, TodoStore
from todo_store.binding import bind_statement, grant, quote_ident
from todo_store.engine import create_engine
from todo_store.testing.plugin import settings_for

USERS = 1_000
TASKS = 1_000_000
_REPOSITORY_QUERY = "SELECT * FROM tasks WHERE user_id = $1 ORDER BY id DESC LIMIT 50"
_NO_WHERE = "SELECT * FROM tasks ORDER BY id DESC LIMIT 50"


def _user(n: int) -> str:
    return f"i_{n:04d}"


async def _fill(conn: asyncpg.Connection) -> None:
    await conn.execute(
        """INSERT INTO users (id, email, name)
           SELECT 'i_' || lpad(g::text, 4, '0'), 'i_' || g || '@example.com', 'Bench'
           FROM generate_series(0, $1 - 1) AS g""",
        USERS,
    )
    await conn.execute(
        """INSERT INTO tasks (user_id, title, completed)
           SELECT 'i_' || lpad((g % $2)::text, 4, '0'), 'task ' || g, g % 3 = 0
           FROM generate_series(0, $1 - 1) AS g""",
        TASKS,
        USERS,
        timeout=1200,
    )
    await conn.execute("VACUUM (ANALYZE) tasks, users", timeout=1200)


async def _plan(runtime_dsn: str, sql: str, *args: Any) -> str:
    """The plan's node types, outermost first, as the runtime role in a bound transaction."""
    conn = await asyncpg.connect(runtime_dsn, statement_cache_size=0)
    try:
        async with conn.transaction():
            await conn.execute(bind_statement(_user(1)))
            raw = await conn.fetchval(f"EXPLAIN (FORMAT JSON) {sql}", *args)
    finally:
        await conn.close()
    node = json.loads(raw)[0]["Plan"]
    names = []
    while node is not None:
        kind = node["Node Type"]
        if node.get("Scan Direction") == "Backward":
            kind += " Backward"
        if "Index Name" in node:
            kind += f" ({node['Index Name']}: {node.get('Index Cond', 'no condition')})"
        names.append(kind)
        # Follow the rows, not the policy's InitPlan (the bound user, read once).
        children = [
            child for child in node.get("Plans") or [] if child["Parent Relationship"] != "InitPlan"
        ]
        node = children[0] if children else None
    return " > ".join(names)


async def _timed(store: TodoStore, user_id: str) -> float:
    started = time.perf_counter()
    async with store.session(user_id=user_id) as session:
        tasks = await TaskRepo(session).list_for(user_id)
    elapsed = time.perf_counter() - started
    if len(tasks) != 50 or {task.user_id for task in tasks} != {user_id}:
        raise AssertionError(f"list_for({user_id}) returned the wrong rows")
    return elapsed


async def main(rounds: int, samples: int) -> None:
    rng = random.Random(20261204)  # picks users; not a secret
    role = f"todo_store_bench_{secrets.token_hex(3)}"
    async with server() as provisioned, database(provisioned, "isolation") as db:
        admin = await asyncpg.connect(asyncpg_dsn(db.url))
        await admin.execute(f"CREATE ROLE {quote_ident(role)} LOGIN")
        try:
            started = time.perf_counter()
            await _fill(admin)
            filled_s = time.perf_counter() - started
            print(f"filled {TASKS:,} tasks of {USERS:,} users in {filled_s:.0f} s")
            engine = create_engine(settings_for(db.url))
            async with engine.begin() as conn:
                await grant(conn, role)
            await engine.dispose()
            runtime_url = make_url(db.url).set(username=role, password=None)
            runtime = runtime_url.render_as_string(hide_password=False)
            medians: dict[bool, list[float]] = {True: [], False: []}
            plans: dict[bool, tuple[str, str]] = {}
            async with TodoStore(
                settings_for(runtime).model_copy(update={"pool_size": 1})
            ) as store:
                for number in range(rounds * 2):
                    rls = number % 2 == 0
                    state = "ENABLE" if rls else "DISABLE"
                    await admin.execute(f"ALTER TABLE tasks {state} ROW LEVEL SECURITY")
                    await store.dispose()  # no plan or cache carried over from the other state
                    for _ in range(20):  # warm-up
                        await _timed(store, _user(rng.randrange(USERS)))
                    latencies = [
                        await _timed(store, _user(rng.randrange(USERS))) for _ in range(samples)
                    ]
                    medians[rls].append(statistics.median(latencies) * 1000)
                    if rls not in plans:
                        plans[rls] = (
                            await _plan(asyncpg_dsn(runtime), _REPOSITORY_QUERY, _user(1)),
                            await _plan(asyncpg_dsn(runtime), _NO_WHERE),
                        )
                await admin.execute("ALTER TABLE tasks ENABLE ROW LEVEL SECURITY")
        finally:
            await admin.execute(f"DROP OWNED BY {quote_ident(role)}")
            await admin.close()
            cleanup = await asyncpg.connect(provisioned.admin_url)
            await cleanup.execute(f"DROP ROLE {quote_ident(role)}")
            await cleanup.close()
    on, off = statistics.median(medians[True]), statistics.median(medians[False])
    # Each "on" round against the "off" round right after it: drift in load cancels out.
    paired = [a / b for a, b in zip(medians[True], medians[False], strict=True)]
    print(f"\nlist_for (page of 50), bound unit of work, {TASKS:,} tasks, {rounds} rounds each")
    print(f"of {samples} units; median of the rounds' medians (each round's median in brackets)\n")
    print("| row-level security | median ms | rounds | plan of the repository's query |")
    print("|---|---|---|---|")
    for rls, value in ((True, on), (False, off)):
        shown = ", ".join(f"{m:.3f}" for m in medians[rls])
        print(f"| {'on' if rls else 'off'} | {value:.3f} | {shown} | {plans[rls][0]} |")
    print(f"\nwith / without: {on / off:.3f} (medians); paired rounds: median ratio ", end="")
    print(f"{statistics.median(paired):.3f} ({', '.join(f'{r:.3f}' for r in paired)})")
    print(f"no WHERE at all, row-level security on: {plans[True][1]}")
    print(f"no WHERE at all, row-level security off: {plans[False][1]}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9, help="rounds of each state (9)")
    parser.add_argument("--samples", type=int, default=300, help="units per round (300)")
    arguments = parser.parse_args()
    asyncio.run(main(arguments.rounds, arguments.samples))
