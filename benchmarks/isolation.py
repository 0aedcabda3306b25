"""What row-level security costs `list_for` at 10^6 tasks: `python -m benchmarks.isolation`.

A database of its own, migrated to head (row-level security enabled and forced on `tasks`),
1,000 users with 1,000 tasks each (10^6), `VACUUM (ANALYZE)`. The application's side runs as
a runtime role given its privileges by `grant` (what `todo-store grant` does), in units of
work bound to a random user, one `list_for` (a page of 50) each, direct, no injected latency.
The same units of work run for a
role that bypasses row-level security (BYPASSRLS, the same privileges), unit by unit
alternating with the runtime role's, on the same user, so drift in the machine's load hits
both alike; the medians are compared, and the median of the per-unit ratios. The plans
PostgreSQL chose are printed too: the repositories' query, and a query with no WHERE at all
(the policy alone narrows it to the user, through the owner index).
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
    """The plan's node types, outermost first, as that URL's role in a bound transaction."""
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
    tag = secrets.token_hex(3)
    enforced, bypassing = f"todo_store_bench_{tag}", f"todo_store_bench_bypass_{tag}"
    async with server() as provisioned, database(provisioned, "isolation") as db:
        admin = await asyncpg.connect(asyncpg_dsn(db.url))
        await admin.execute(f"CREATE ROLE {quote_ident(enforced)} LOGIN")
        await admin.execute(f"CREATE ROLE {quote_ident(bypassing)} LOGIN BYPASSRLS")
        try:
            started = time.perf_counter()
            await _fill(admin)
            filled_s = time.perf_counter() - started
            print(f"filled {TASKS:,} tasks of {USERS:,} users in {filled_s:.0f} s")
            engine = create_engine(settings_for(db.url))
            async with engine.begin() as conn:
                await grant(conn, enforced)
            await engine.dispose()
            # The same privileges by hand: `grant` refuses a role that bypasses.
            await admin.execute(
                f"GRANT SELECT, INSERT, UPDATE, DELETE ON tasks, users TO {quote_ident(bypassing)}"
            )
            urls = {
                rls: make_url(db.url)
                .set(username=role, password=None)
                .render_as_string(hide_password=False)
                for rls, role in ((True, enforced), (False, bypassing))
            }
            latencies: dict[bool, list[float]] = {True: [], False: []}
            per_round: dict[bool, list[float]] = {True: [], False: []}
            async with (
                TodoStore(settings_for(urls[True]).model_copy(update={"pool_size": 1})) as on,
                TodoStore(settings_for(urls[False]).model_copy(update={"pool_size": 1})) as off,
            ):
                stores = {True: on, False: off}
                for _ in range(20):  # warm-up
                    for store in stores.values():
                        await _timed(store, _user(rng.randrange(USERS)))
                for number in range(rounds):
                    this_round: dict[bool, list[float]] = {True: [], False: []}
                    for sample in range(samples):
                        user_id = _user(rng.randrange(USERS))
                        # Unit by unit, alternating which goes first: load drift hits both.
                        order = (True, False) if sample % 2 else (False, True)
                        for rls in order:
                            this_round[rls].append(await _timed(stores[rls], user_id))
                    for rls in (True, False):
                        latencies[rls] += this_round[rls]
                        per_round[rls].append(statistics.median(this_round[rls]) * 1000)
                    shown = f"{per_round[True][-1]:.3f} / {per_round[False][-1]:.3f} ms"
                    print(f"  round {number + 1} (enforced / bypassed): {shown}")
            plans = {
                rls: (
                    await _plan(asyncpg_dsn(urls[rls]), _REPOSITORY_QUERY, _user(1)),
                    await _plan(asyncpg_dsn(urls[rls]), _NO_WHERE),
                )
                for rls in (True, False)
            }
        finally:
            for role in (enforced, bypassing):
                await admin.execute(f"DROP OWNED BY {quote_ident(role)}")
            await admin.close()
            cleanup = await asyncpg.connect(provisioned.admin_url)
            for role in (enforced, bypassing):
                await cleanup.execute(f"DROP ROLE {quote_ident(role)}")
            await cleanup.close()
    _report(rounds, samples, latencies, per_round, plans)


def _report(
    rounds: int,
    samples: int,
    latencies: dict[bool, list[float]],
    per_round: dict[bool, list[float]],
    plans: dict[bool, tuple[str, str]],
) -> None:
    medians = {rls: statistics.median(values) * 1000 for rls, values in latencies.items()}
    paired = [a / b for a, b in zip(latencies[True], latencies[False], strict=True)]
    print(f"\nlist_for (page of 50), bound unit of work, {TASKS:,} tasks, {rounds} rounds of")
    print(f"{samples} units for each role, interleaved unit by unit, direct, pool of 1\n")
    print("| row-level security | median ms (all units) | round medians ms | plan |")
    print("|---|---|---|---|")
    for rls, label in ((True, "enforced (runtime role)"), (False, "bypassed (BYPASSRLS role)")):
        shown = ", ".join(f"{m:.3f}" for m in per_round[rls])
        print(f"| {label} | {medians[rls]:.3f} | {shown} | {plans[rls][0]} |")
    print(f"\nenforced / bypassed: {medians[True] / medians[False]:.3f} (medians); median of the")
    print(f"per-unit ratios (same user, back to back): {statistics.median(paired):.3f}")
    print(f"no WHERE at all, enforced: {plans[True][1]}")
    print(f"no WHERE at all, bypassed: {plans[False][1]}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds (5)")
    parser.add_argument("--samples", type=int, default=300, help="units per round (300)")
    arguments = parser.parse_args()
    asyncio.run(main(arguments.rounds, arguments.samples))
