"""Client CPU of one unit of work, without concurrency: where the time of a hot call goes.

    python -m benchmarks.cpu units   [--call get] [--rounds 7] [--units 300]
    python -m benchmarks.cpu profile [--call get] [--units 2000] [--repositories FILE]

`units`: CPU time per unit of work (one call, one pooled connection, sequential), for each
implementation of `benchmarks.peers` and for two other ways to open a session on the same
engine; implementations interleaved, `rounds` rounds, median and min-max.

`profile`: cProfile with a CPU-time clock over `units` units of work of todo_store, summed by
category (the module each function lives in). `--repositories FILE` profiles another version
of `todo_store/repositories.py` instead (e.g. `git show <commit>:todo_store/repositories.py`),
for a before/after comparison.

Uses the database the tests use (`TODO_STORE_TEST_DATABASE_URL`, else Docker or embedded).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import importlib.util
import pstats
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from benchmarks import environment
from benchmarks.comparison import Plan, make_users
from benchmarks.peers import (
    HOT_CALLS,
    CoreRows,
    Implementation,
    RawAsyncpg,
    TodoStoreImpl,
    TodoStoreOnConnection,
    TutorialOrm,
    supports_non_atomic,
)
from todo_store import TodoStore
from todo_store.engine import create_sessionmaker
from todo_store.testing.plugin import settings_for

_ORM_LOADING = [
    "loading",
    "identity",
    "state",
    "attributes",
    "context",
    "instrumentation",
    "strategies",
    "path_registry",
    "mapper",
    "query",
    "bulk_persistence",
    "persistence",
]
CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    ("event loop, sockets", ("asyncio/", "selectors.py", "socket", "epoll", "_contextvars")),
    ("greenlet switches", ("greenlet", "util/concurrency.py", "_concurrency_py3k")),
    ("asyncpg and SQLAlchemy's adapter", ("asyncpg/", "dialects/postgresql/asyncpg.py")),
    ("statement building, cache key, compile", ("sqlalchemy/sql/",)),
    (
        "ORM loading, identity map",
        tuple(f"orm/{module}.py" for module in _ORM_LOADING),
    ),
    (
        "session begin/commit/close, pool",
        (
            "orm/session.py",
            "orm/state_changes.py",
            "ext/asyncio/",
            "engine/base.py",
            "pool/",
            "todo_store/engine.py",
            "contextlib.py",
        ),
    ),
    ("result rows", ("engine/result.py", "engine/cursor.py", "engine/row.py", "engine/default.py")),
    ("event hooks", ("sqlalchemy/event/",)),
    ("validation (pydantic)", ("pydantic",)),
    ("repository code", ("repositories", "schemas.py")),
]


def category(key: tuple[str, int, str]) -> str:
    where = f"{key[0]} {key[2]}"
    for name, patterns in CATEGORIES:
        if any(pattern in where for pattern in patterns):
            return name
    return "other (builtins, weakrefs, event attribute lookups)"


class SessionVariant(Implementation):
    """todo_store's repositories in a session opened another way (engine suggestions)."""

    def __init__(self, label: str, open_session: Callable[[], Any], repositories: Any) -> None:
        self.label = label
        self.open_session = open_session
        self.repositories = repositories

    def operations(self) -> dict[str, Callable[[str, int], Awaitable[object]]]:
        def make(call: str) -> Callable[[str, int], Awaitable[object]]:
            async def run(user_id: str, task_id: int) -> object:
                async with self.open_session() as session:
                    return await _call(self.repositories, session, call, user_id, task_id)

            return run

        return {call: make(call) for call in HOT_CALLS}


async def _call(repositories: Any, session: Any, call: str, user_id: str, task_id: int) -> object:
    tasks = repositories.TaskRepo(session)
    if call == "get":
        return await tasks.get(user_id, task_id)
    if call == "list_for":
        return await tasks.list_for(user_id, limit=50)
    if call == "create":
        return await tasks.create(user_id, title="new")
    if call == "toggle":
        return await tasks.toggle(user_id, task_id)
    if call == "update":
        return await tasks.update(user_id, task_id, title="renamed")
    return await tasks.count_for(user_id)


def _session_variants(store: TodoStore, repositories: Any) -> list[Implementation]:
    maker = store.sessionmaker
    autocommit = create_sessionmaker(store.engine.execution_options(isolation_level="AUTOCOMMIT"))

    @asynccontextmanager
    async def commit_at_end() -> AsyncIterator[AsyncSession]:
        async with maker() as session:
            yield session
            await session.commit()

    @asynccontextmanager
    async def autocommit_only() -> AsyncIterator[AsyncSession]:
        async with autocommit() as session:
            yield session

    return [
        SessionVariant("sessionmaker() + commit at the end", commit_at_end, repositories),
        SessionVariant("autocommit sessionmaker(), no begin/commit", autocommit_only, repositories),
    ]


async def units(args: argparse.Namespace) -> None:
    async with _database() as (store, dsn, owned):
        implementations: list[Implementation] = [TodoStoreImpl(store)]
        if supports_non_atomic(store):
            implementations += [TodoStoreImpl(store, atomic=False), TodoStoreOnConnection(store)]
        implementations += _session_variants(store, _repositories(None))
        raw = await RawAsyncpg.connect(dsn, 1)
        implementations += [TutorialOrm(store.engine), CoreRows(store.engine), RawAsyncpg(raw)]
        user, task = _pick(owned)
        operations = {impl.label: impl.operations()[args.call] for impl in implementations}
        for operation in operations.values():
            for _ in range(args.units // 2):
                await operation(user, task)
        cpu: dict[str, list[float]] = {label: [] for label in operations}
        labels = list(operations)
        for n in range(args.rounds):
            for label in labels if n % 2 == 0 else reversed(labels):
                started = time.process_time()
                for _ in range(args.units):
                    await operations[label](user, task)
                cpu[label].append((time.process_time() - started) / args.units * 1000)
        for conn in raw:
            await conn.close()
    print(f"CPU per unit of work, `{args.call}`, median (min-max) of {args.rounds} rounds:")
    for label, values in cpu.items():
        low, high = min(values), max(values)
        print(f"  {label:46s} {statistics.median(values):.3f} ms ({low:.3f}-{high:.3f})")


async def profile(args: argparse.Namespace) -> None:
    repositories = _repositories(args.repositories)
    async with _database() as (store, _dsn, owned):
        user, task = _pick(owned)

        async def unit() -> None:
            async with store.session() as session:
                await _call(repositories, session, args.call, user, task)

        for _ in range(300):
            await unit()
        started = time.process_time()
        for _ in range(args.units):
            await unit()
        unprofiled = (time.process_time() - started) / args.units * 1000
        profiler = cProfile.Profile(time.process_time)
        profiler.enable()
        for _ in range(args.units):
            await unit()
        profiler.disable()
    stats: dict[Any, Any] = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    totals: dict[str, float] = {}
    for key, (_cc, _nc, tottime, _ct, _callers) in stats.items():
        totals[category(key)] = totals.get(category(key), 0.0) + tottime
    whole = sum(totals.values())
    source = args.repositories or "todo_store/repositories.py"
    print(f"`{args.call}` ({source}): {unprofiled:.3f} ms CPU per unit of work (unprofiled)")
    names = [name for name, _ in CATEGORIES] + [category(("", 0, ""))]
    for name in names:
        print(f"  {name:52s} {totals.get(name, 0.0) / whole * 100:5.1f} %")


def _repositories(path: str | None) -> ModuleType:
    if path is None:
        import todo_store.repositories  # noqa: PLC0415

        return todo_store.repositories
    spec = importlib.util.spec_from_file_location("repositories_under_test", Path(path))
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pick(owned: dict[str, list[int]]) -> tuple[str, int]:
    user = sorted(owned)[0]
    return user, owned[user][len(owned[user]) // 2]


@asynccontextmanager
async def _database() -> AsyncIterator[tuple[TodoStore, str, dict[str, list[int]]]]:
    import asyncpg  # noqa: PLC0415

    async with environment.server() as server, environment.database(server, "cpu") as db:
        dsn = environment.asyncpg_dsn(db.url)
        setup = await asyncpg.connect(dsn)
        try:
            owned = await make_users(setup, Plan(users=20, tasks_per_user=60))
        finally:
            await setup.close()
        store = TodoStore(settings_for(db.url).model_copy(update={"pool_size": 1}))
        try:
            yield store, dsn, owned
        finally:
            await store.dispose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cpu", description=__doc__)
    parser.add_argument("what", choices=["units", "profile"])
    parser.add_argument("--call", choices=HOT_CALLS, default="get")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--units", type=int, default=None, help="units of work per round")
    parser.add_argument("--repositories", help="profile this repositories.py instead")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.units is None:
        args.units = 300 if args.what == "units" else 2000
    asyncio.run(units(args) if args.what == "units" else profile(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
