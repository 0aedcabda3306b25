"""Round trips per unit of work, per client configuration, through PgBouncer and direct.

Each configuration's client gets one connection through a `RoundTripProxy` that adds `rtt`
seconds to every server-to-client burst. For every repository method: one warm-up unit of work,
then `iterations` timed ones, each on a fresh owner (made on a separate, unproxied connection).
Reported per cell: the round trips the proxy counted (deterministic) and the median latency
divided by the injected RTT (the same number, measured by time; a little above the count,
because client and server work is not free).
"""

from __future__ import annotations

import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from sqlalchemy.ext.asyncio import create_async_engine

from benchmarks.environment import Database, asyncpg_dsn, sqlalchemy_url
from benchmarks.workload import (
    CALLS,
    Client,
    EngineClient,
    RawClient,
    StoreClient,
    TutorialClient,
    make_owner,
)
from todo_store import TodoStore
from todo_store.testing.plugin import settings_for
from todo_store.testing.proxy import RoundTripProxy

# SQLAlchemy's documented asyncpg + PgBouncer recipe ("Prepared Statement Name with PGBouncer").
RECIPE_CONNECT_ARGS: dict[str, Any] = {
    "statement_cache_size": 0,
    "prepared_statement_cache_size": 0,
    "prepared_statement_name_func": lambda: f"__asyncpg_{uuid.uuid4()}__",
}

PGBOUNCER = "PgBouncer"
DIRECT = "direct"


def one_connection_store(url: str, **settings: object) -> TodoStore:
    update = {"pool_size": 1, "max_overflow": 0, **settings}
    return TodoStore(settings_for(url).model_copy(update=update))


def recipe_engine(url: str, *, pre_ping: bool = False, pool_size: int = 1) -> EngineClient:
    engine = create_async_engine(
        sqlalchemy_url(url),
        pool_size=pool_size,
        max_overflow=0,
        pool_pre_ping=pre_ping,
        connect_args=dict(RECIPE_CONNECT_ARGS),
    )
    return EngineClient(engine)


async def _store(url: str) -> Client:
    return StoreClient(one_connection_store(url))


async def _cached_store(url: str) -> Client:
    return StoreClient(one_connection_store(url, statement_cache=True))


async def _raw(url: str) -> Client:
    return await RawClient.connect(asyncpg_dsn(url))


async def _recipe(url: str) -> Client:
    return recipe_engine(url)


async def _recipe_ping(url: str) -> Client:
    return recipe_engine(url, pre_ping=True)


async def _tutorial(url: str) -> Client:
    return TutorialClient(one_connection_store(url))


@dataclass(frozen=True)
class Config:
    key: str
    label: str
    make: Callable[[str], Awaitable[Client]]
    names: tuple[str, ...] = tuple(CALLS)


CONFIGS = (
    Config("a", "(a) todo_store default", _store),
    Config("b", "(b) todo_store statement_cache=True", _cached_store),
    Config("c", "(c) raw asyncpg, cache off", _raw),
    Config("d", "(d) SQLAlchemy recipe (uuid names)", _recipe),
    Config("d+", "(d) recipe + pool_pre_ping", _recipe_ping),
    Config("e", "(e) tutorial ORM", _tutorial, TutorialClient.names),
)


@dataclass
class Cell:
    counted: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    error: str | None = None

    def counted_text(self) -> str:
        if self.error is not None:
            return "error"
        low, high = min(self.counted), max(self.counted)
        return str(low) if low == high else f"{low}-{high}"

    def ratio(self, rtt: float) -> float:
        return statistics.median(self.seconds) / rtt


@dataclass
class PathResult:
    path: str
    configs: list[Config]
    cells: dict[tuple[str, str], Cell]  # (config key, method name) -> cell


async def measure_path(
    path: str,
    target_url: str,
    db: Database,
    configs: list[Config],
    *,
    rtt: float,
    iterations: int,
) -> PathResult:
    """Every configuration and method through one proxy (with `rtt` injected) to `target_url`."""
    cells: dict[tuple[str, str], Cell] = {}
    setup = await asyncpg.connect(asyncpg_dsn(db.url))
    try:
        async with RoundTripProxy.in_front_of(target_url, delay=rtt) as proxy:
            url = proxy.url_for(target_url)
            for config in configs:
                started = time.perf_counter()
                client = await config.make(url)
                try:
                    for name in config.names:
                        cells[config.key, name] = await _measure(
                            client, name, proxy, setup, iterations
                        )
                finally:
                    await client.close()
                took = time.perf_counter() - started
                print(f"  round trips {path}: {config.label} ({took:.1f} s)", file=sys.stderr)
    finally:
        await setup.close()
    return PathResult(path, configs, cells)


async def _measure(
    client: Client, name: str, proxy: RoundTripProxy, setup: asyncpg.Connection, iterations: int
) -> Cell:
    cell = Cell()
    try:
        await client.run(name, await make_owner(setup))  # warm-up
        for _ in range(iterations):
            owner = await make_owner(setup)
            with proxy.counting() as counted:
                started = time.perf_counter()
                await client.run(name, owner)
                cell.seconds.append(time.perf_counter() - started)
            cell.counted.append(counted.round_trips)
    except Exception as error:  # a benchmark reports a failing configuration, it goes on
        cell.error = f"{type(error).__name__}: {error}"[:200]
    return cell
