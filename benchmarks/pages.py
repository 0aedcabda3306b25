"""`TaskRepo.page` at 10^4, 10^5 and 10^6 tasks: page 1 against page 100, and search.

A database of its own. One user ("big") holds a tenth of the table (10^3, 10^4, 10^5 tasks),
997 others the rest. The table grows in steps by `INSERT ... SELECT generate_series` with
revision 0005's indexes dropped (its downgrade) and built again after (its upgrade): building
an index once is far faster than maintaining it row by row. Then `VACUUM (ANALYZE)`.

Every task's title has a word in 0.1 % of the tasks ("quokka") and one in 50 % ("errand"), the
big user's included; half of them have a description. Timestamps tie in threes, so the id
tie-break is exercised. A third search shows the known worst case: a word none of the user's
tasks has but many of the others' do (the planner, estimating from the whole table, expects an
early match and reads the user's tasks in order, all of them).

At each size, for every sort: page 1 and page 100 (pages of `PAGE_SIZE`, so page 100 exists
for the smallest user too), and a search for each word (newest first, page 1). Each cell is
the median latency of `samples` single-call units of work (`session(atomic=False)`, direct, no
injected latency) and the server's own view of that statement: `EXPLAIN (ANALYZE, BUFFERS)`
of the exact SQL and parameters the repository sent.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any

import asyncpg
from pydantic import SecretStr
from sqlalchemy import event

from benchmarks.environment import Database, asyncpg_dsn
from todo_store import TaskRepo, TodoStore, migrations
from todo_store.pages import Page
from todo_store.testing.plugin import settings_for

BIG_USER = "big"
OTHER_USERS = 997
PAGE_SIZE = 10
DEEP_PAGE = 100
SORTS = ["-created", "created", "-updated", "updated", "title", "-title", "completed", "-completed"]
RARE, COMMON = "quokka", "errand"
ABSENT = "Fix"  # a title word of 12.5 % of the other users' tasks, none of the big user's
SEARCHES = {f"search {RARE} (0.1 %)": RARE, f"search {COMMON} (50 %)": COMMON}
WORST_CASE = {f"search {ABSENT} (0 %, 12.5 % of others)": ABSENT}
FULL_PLANS_OF = ["-created p1", "-created p100", "title p100", *SEARCHES, *WORST_CASE]
LOAD = """
INSERT INTO tasks (user_id, title, description, completed, created_at, updated_at)
SELECT CASE WHEN g % 10 = 0 THEN 'big' ELSE 'o_' || (g % 997) END,
       (ARRAY['Buy', 'Call', 'email', 'Fix', 'plan', 'Read', 'Write', 'Zip'])[1 + (g * 7) % 8]
         || ' ' || ((g * 7919) % 100003)
         || CASE WHEN (g / 10) % 1000 = 3 THEN ' quokka' ELSE '' END
         || CASE WHEN (g / 10) % 2 = 0 THEN ' errand' ELSE '' END,
       CASE WHEN g % 2 = 0 THEN 'notes ' || md5(g::text) END,
       g % 3 = 0,
       timestamptz '2026-01-01' + (g / 3) * interval '1 second',
       timestamptz '2026-01-01' + (g / 3) * interval '1 second'
         + ((g * 37) % 1000) * interval '1 minute'
FROM generate_series($1::bigint, $2::bigint - 1) AS g
"""


@dataclass(frozen=True)
class Cell:
    label: str
    median_ms: float
    rows: int
    execution_ms: float  # the server's, from EXPLAIN ANALYZE
    buffers: int  # shared blocks hit + read
    plan: str  # node types, outermost first
    full_plan: str


@dataclass(frozen=True)
class PagesRow:
    tasks: int
    user_tasks: int
    load_seconds: float  # insert, index builds, VACUUM ANALYZE
    cells: list[Cell]
    trigram_index: bool


async def measure_pages(db: Database, *, sizes: list[int], samples: int) -> list[PagesRow]:
    settings = settings_for(db.url)
    conn = await asyncpg.connect(asyncpg_dsn(db.url))
    store = TodoStore(
        settings.model_copy(update={"pool_size": 1, "cursor_secret": SecretStr("b" * 32)})
    )
    sent: list[tuple[str, Any]] = []

    def capture(_c: Any, _cur: Any, statement: str, parameters: Any, *_: Any) -> None:
        sent.append((statement, parameters))

    event.listen(store.engine.sync_engine, "before_cursor_execute", capture)
    rows = []
    try:
        await conn.execute(f"ALTER DATABASE {db.name} SET maintenance_work_mem = '256MB'")
        await conn.execute(
            """INSERT INTO users (id, email, name) VALUES ('big', 'big@example.com', 'Big');
               INSERT INTO users (id, email, name)
               SELECT 'o_' || g, 'o_' || g || '@example.com', 'Other'
               FROM generate_series(0, 996) AS g"""
        )
        before_0005 = migrations.script_directory().get_revision("0005").down_revision
        have = 0
        for size in sizes:
            started = time.perf_counter()
            await migrations.downgrade(settings, str(before_0005))
            await conn.execute(LOAD, have, size, timeout=900)
            await migrations.upgrade(settings)
            await conn.execute("VACUUM (ANALYZE) tasks", timeout=900)
            load_seconds = time.perf_counter() - started
            have = size
            trigram = bool(
                await conn.fetchval(
                    "SELECT 1 FROM pg_indexes WHERE indexname = 'idx_tasks_search_trgm'"
                )
            )
            queries: dict[str, dict[str, Any]] = {}
            for sort in SORTS:
                queries[f"{sort} p1"] = {"sort": sort}
                deep = await _cursor_of_page(store, DEEP_PAGE, sort=sort)
                queries[f"{sort} p{DEEP_PAGE}"] = {"sort": sort, "cursor": deep}
            for label, word in {**SEARCHES, **WORST_CASE}.items():
                queries[label] = {"search": word}
            latencies = await _latencies(store, queries, samples)
            cells = [
                await _cell(store, conn, sent, label, latencies[label], **query)
                for label, query in queries.items()
            ]
            rows.append(PagesRow(size, size // 10, load_seconds, cells, trigram))
            shown = ", ".join(f"{c.label} {c.median_ms:.2f} ms" for c in cells[:2] + cells[-2:])
            print(f"  pages {size:,} tasks (load {load_seconds:.0f} s): {shown}", file=sys.stderr)
    finally:
        await store.dispose()
        await conn.close()
    return rows


async def _cursor_of_page(store: TodoStore, number: int, **query: Any) -> str:
    cursor = None
    async with store.session(atomic=False) as session:
        repo = TaskRepo(session)
        for _ in range(number - 1):
            page = await repo.page(BIG_USER, limit=PAGE_SIZE, cursor=cursor, **query)
            cursor = page.next_cursor
            if cursor is None:
                raise RuntimeError(f"fewer than {number} pages")
    assert cursor is not None
    return cursor


async def _page(store: TodoStore, query: dict[str, Any]) -> Page:
    async with store.session(atomic=False) as session:
        return await TaskRepo(session).page(BIG_USER, limit=PAGE_SIZE, **query)


async def _latencies(
    store: TodoStore, queries: dict[str, dict[str, Any]], samples: int
) -> dict[str, list[float]]:
    """`samples` latencies of each query, taken in turns (page 1, page 100, a search, ...),
    so that a busy moment of the machine falls on all of them alike."""
    latencies: dict[str, list[float]] = {label: [] for label in queries}
    for n in range(samples + 1):  # the first round warms up
        for label, query in queries.items():
            started = time.perf_counter()
            await _page(store, query)
            if n:
                latencies[label].append(time.perf_counter() - started)
    return latencies


async def _cell(
    store: TodoStore,
    conn: asyncpg.Connection,
    sent: list[tuple[str, Any]],
    label: str,
    latencies: list[float],
    **query: Any,
) -> Cell:
    """The query's figures; its statement, captured as sent, is explained."""
    sent.clear()
    page = await _page(store, query)
    (statement, parameters), *others = sent
    if others:
        raise RuntimeError(f"{label}: {1 + len(others)} statements for one page")
    raw = await conn.fetchval(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {statement}", *parameters)
    text_plan = await conn.fetch(f"EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) {statement}", *parameters)
    explained = json.loads(raw)[0]
    top = explained["Plan"]
    return Cell(
        label=label,
        median_ms=statistics.median(latencies) * 1000,
        rows=len(page.items),
        execution_ms=float(explained["Execution Time"]),
        buffers=int(top.get("Shared Hit Blocks", 0)) + int(top.get("Shared Read Blocks", 0)),
        plan=_nodes(top),
        full_plan="\n".join(r[0] for r in text_plan),
    )


def _nodes(node: dict[str, Any]) -> str:
    """The plan's node types, outermost first, e.g. "Limit > Index Scan Backward (idx)"."""
    names = []
    current: dict[str, Any] | None = node
    while current is not None:
        kind = current["Node Type"]
        if current.get("Scan Direction") == "Backward":
            kind += " Backward"
        if "Index Name" in current:
            kind += f" ({current['Index Name']})"
        names.append(kind)
        children = current.get("Plans") or []
        current = children[0] if children else None
    return " > ".join(names)
