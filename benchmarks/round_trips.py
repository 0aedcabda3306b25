"""Round trips per unit of work, per client configuration, through PgBouncer and direct.

Each configuration's client gets one connection through a `RoundTripProxy` that adds `rtt`
seconds to every server-to-client burst. For every repository method: one warm-up unit of work,
then `iterations` timed ones, each on a fresh owner (made on a separate, unproxied connection).
Reported per cell: the round trips the proxy counted (deterministic) and the median latency
divided by the injected RTT (the same number, measured by time; a little above the count,
because client and server work is not free).

`measure_all_paths` runs the three paths: PgBouncer without statement tracking (Debian's 1.18,
or any with `max_prepared_statements = 0`), PgBouncer >= 1.21 with `max_prepared_statements =
1000` (Neon's setting; skipped with the reason where none is installed) and direct; caching is
measured only where it is safe. `chart_data` turns the results into one row per (path,
configuration): round trips per call, next to the peers'. `python -m benchmarks.round_trips`
runs only this benchmark and prints both (the JSON shape is described in `chart_data`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
from sqlalchemy.ext.asyncio import create_async_engine

from benchmarks import environment
from benchmarks.environment import BOUNCER_POOL_SIZE, Database, asyncpg_dsn, sqlalchemy_url
from benchmarks.workload import (
    CALLS,
    Client,
    EngineClient,
    Owner,
    RawClient,
    StoreClient,
    TutorialClient,
    make_owner,
)
from tests.rigs.proxy import RoundTripProxy
from todo_store import TodoStore
from todo_store.testing.pgbouncer import PgBouncer, PgBouncerUnavailable, tracking_binary
from todo_store.testing.plugin import settings_for

# SQLAlchemy's documented asyncpg + PgBouncer recipe ("Prepared Statement Name with PGBouncer").
RECIPE_CONNECT_ARGS: dict[str, Any] = {
    "statement_cache_size": 0,
    "prepared_statement_cache_size": 0,
    "prepared_statement_name_func": lambda: f"__asyncpg_{uuid.uuid4()}__",
}

PGBOUNCER = "PgBouncer"
DIRECT = "direct"
NEON_MAX_PREPARED_STATEMENTS = 1000  # what Neon's pooler runs with


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


class NonAtomicStoreClient(StoreClient):
    """todo_store: `async with store.session(atomic=False) as s: await CALLS[name](s, owner)`."""

    async def run(self, name: str, owner: Owner) -> None:
        async with self.store.session(atomic=False) as session:
            await CALLS[name](session, owner)


async def _non_atomic_store(url: str) -> Client:
    return NonAtomicStoreClient(one_connection_store(url))


async def _cached_non_atomic_store(url: str) -> Client:
    return NonAtomicStoreClient(one_connection_store(url, statement_cache=True))


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
    Config("a-", "(a) todo_store session(atomic=False)", _non_atomic_store),
    Config("b", "(b) todo_store statement_cache=True", _cached_store),
    Config("b-", "(b) statement_cache=True, session(atomic=False)", _cached_non_atomic_store),
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


def cell_text(cell: Cell | None, rtt: float) -> str:
    """A table cell: round trips counted / median latency in RTTs (or why there is none)."""
    if cell is None:
        return "n/a"
    if cell.error is not None:
        return f"error: {cell.error}"
    return f"{cell.counted_text()} / {cell.ratio(rtt):.2f}"


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


# -- every path, and the chart ----------------------------------------------------------------

# Caching is measured only where it is safe: direct, and a PgBouncer that tracks statements.
UNCACHED_KEYS = ("a", "a-", "c", "d", "d+", "e")
ALL_KEYS = ("a", "a-", "b", "b-", "c", "d", "d+", "e")
PEER_KEYS = frozenset({"d", "d+", "e"})  # SQLAlchemy's recipe, with pool_pre_ping, tutorial ORM


def configs_for(keys: tuple[str, ...]) -> list[Config]:
    by_key = {config.key: config for config in CONFIGS}
    return [by_key[key] for key in keys]


def tracking_pgbouncer(db: Database) -> PgBouncer:
    """A PgBouncer >= 1.21 with Neon's `max_prepared_statements`; not started.

    Raises `PgBouncerUnavailable` (with the reason) where none is installed; see
    `todo_store.testing.pgbouncer.tracking_binary`.
    """
    return PgBouncer(
        db.server,
        db.name,
        pool_size=BOUNCER_POOL_SIZE,
        binary=tracking_binary(),
        max_prepared_statements=NEON_MAX_PREPARED_STATEMENTS,
    )


def path_name(bouncer: PgBouncer) -> str:
    """ "PgBouncer 1.18" or "PgBouncer 1.25 (max_prepared_statements=1000)"."""
    version = ".".join(map(str, bouncer.version))
    if bouncer.max_prepared_statements:
        return f"{PGBOUNCER} {version} (max_prepared_statements={bouncer.max_prepared_statements})"
    return f"{PGBOUNCER} {version}"


@dataclass(frozen=True)
class AllPaths:
    paths: list[PathResult]
    skipped: list[str]  # paths not measured, with the reason


async def measure_all_paths(db: Database, *, rtt: float, iterations: int) -> AllPaths:
    """PgBouncer without tracking, PgBouncer with tracking (where installed), direct."""
    paths = []
    skipped = []
    with db.bouncer() as bouncer:
        paths.append(
            await measure_path(
                path_name(bouncer),
                bouncer.url,
                db,
                configs_for(UNCACHED_KEYS),
                rtt=rtt,
                iterations=iterations,
            )
        )
    try:
        tracking = tracking_pgbouncer(db)
    except PgBouncerUnavailable as error:
        skipped.append(f"{PGBOUNCER} with max_prepared_statements: {error}")
    else:
        with tracking:
            paths.append(
                await measure_path(
                    path_name(tracking),
                    tracking.url,
                    db,
                    configs_for(ALL_KEYS),
                    rtt=rtt,
                    iterations=iterations,
                )
            )
    paths.append(
        await measure_path(
            DIRECT, db.url, db, configs_for(ALL_KEYS), rtt=rtt, iterations=iterations
        )
    )
    return AllPaths(paths, skipped)


def chart_data(paths: list[PathResult], *, rtt: float) -> dict[str, Any]:
    """Round trips per call, per (path, configuration): the data of the comparison chart.

    ```
    {"rtt_ms": 20.0,
     "rows": [{"path": "PgBouncer 1.18", "config": "a-",
               "label": "(a) todo_store session(atomic=False)",
               "peer": false,             # true for SQLAlchemy's recipe (+ pre-ping), tutorial
               "atomic": false, "statement_cache": false,
               "round_trips": 2,          # median over the methods of the counted round trips
               "min": 2, "max": 2,        # lowest / highest count of any method
               "latency_rtts": 2.1,       # median over methods of median latency / rtt
               "methods": 14,             # methods measured (the tutorial ORM has 2)
               "errors": []}, ...]}       # "method: error" for cells that failed
    ```
    Rows come in the order paths were measured, configurations in `CONFIGS` order.
    """
    rows = []
    for path in paths:
        for config in path.configs:
            cells = [
                (name, path.cells[config.key, name])
                for name in config.names
                if (config.key, name) in path.cells
            ]
            good = [cell for _, cell in cells if cell.error is None and cell.counted]
            counts = [statistics.median(cell.counted) for cell in good]
            rows.append(
                {
                    "path": path.path,
                    "config": config.key,
                    "label": config.label,
                    "peer": config.key in PEER_KEYS,
                    "atomic": config.key not in ("a-", "b-"),
                    "statement_cache": config.key in ("b", "b-"),
                    "round_trips": statistics.median(counts) if counts else None,
                    "min": min(counts) if counts else None,
                    "max": max(counts) if counts else None,
                    "latency_rtts": round(statistics.median(cell.ratio(rtt) for cell in good), 2)
                    if good
                    else None,
                    "methods": len(good),
                    "errors": [f"{name}: {cell.error}" for name, cell in cells if cell.error],
                }
            )
    return {"rtt_ms": rtt * 1000, "rows": rows}


def render_tables(paths: list[PathResult], *, rtt: float) -> str:
    """Markdown: one table per path, methods by configuration (counted / latency in RTTs)."""
    out = []
    for path in paths:
        header = ["method", *(c.label for c in path.configs if c.key != "e")]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for name in CALLS:
            row = [f"`{name}`"]
            for config in path.configs:
                if config.key == "e":
                    continue
                row.append(cell_text(path.cells.get((config.key, name)), rtt))
            lines.append("| " + " | ".join(row) + " |")
        out += [f"### {path.path}", "", *lines, ""]
    return "\n".join(out)


def render_chart_rows(data: dict[str, Any]) -> str:
    """The chart's data as a Markdown table (round trips per single-call unit of work)."""
    lines = [
        "| path | configuration | round trips per call | latency ÷ RTT |",
        "|---|---|---|---|",
    ]
    for row in data["rows"]:
        counted = row["round_trips"]
        shown = "error" if counted is None else f"{counted:g}"
        if row["min"] is not None and row["min"] != row["max"]:
            shown += f" ({row['min']:g}-{row['max']:g})"
        latency = "-" if row["latency_rtts"] is None else f"{row['latency_rtts']:.2f}"
        lines.append(f"| {row['path']} | {row['label']} | {shown} | {latency} |")
    return "\n".join(lines)


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    async with environment.server() as server, environment.database(server, "rt") as db:
        measured = await measure_all_paths(db, rtt=args.rtt_ms / 1000, iterations=args.iterations)
    data = chart_data(measured.paths, rtt=args.rtt_ms / 1000)
    data["skipped"] = measured.skipped
    print(render_tables(measured.paths, rtt=args.rtt_ms / 1000))
    print(render_chart_rows(data))
    for reason in measured.skipped:
        print(f"not measured: {reason}")
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.round_trips",
        description="Round trips per unit of work: PgBouncer with and without statement "
        "tracking, and direct; every configuration next to SQLAlchemy's recipe and the "
        "tutorial ORM.",
    )
    parser.add_argument("--rtt-ms", type=float, default=20.0, help="injected round trip (ms)")
    parser.add_argument("--iterations", type=int, default=3, help="timed units per cell")
    parser.add_argument("--json", type=Path, help="also write the chart data here")
    args = parser.parse_args(argv)
    data = asyncio.run(_main(args))
    if args.json is not None:
        args.json.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
