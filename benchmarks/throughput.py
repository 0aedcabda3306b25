"""Throughput of the hot calls: todo_store against raw asyncpg running the same SQL.

Direct connection, no injected latency, `concurrency` workers (each on its own owner, so that
toggles do not queue on one row lock), as many pooled connections as workers. For each call
the two clients alternate over `rounds` rounds (so drift of the machine hits both alike); the
ratio is todo_store ops/s divided by raw asyncpg ops/s, from the same run.
"""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass

import asyncpg

from benchmarks.environment import Database, asyncpg_dsn
from benchmarks.workload import Client, Owner, RawClient, StoreClient, make_owner
from todo_store import TodoStore
from todo_store.testing.plugin import settings_for

HOT_CALLS = ("TaskRepo.get", "TaskRepo.list_for", "TaskRepo.create", "TaskRepo.toggle")
ROUNDS = 2


@dataclass(frozen=True)
class ThroughputRow:
    name: str
    todo_store: float  # ops/s
    raw: float  # ops/s
    todo_store_cpu_ms: float  # this process's CPU time per op
    raw_cpu_ms: float

    @property
    def ratio(self) -> float:
        return self.todo_store / self.raw


async def measure_throughput(
    db: Database, *, seconds: float, concurrency: int = 8
) -> list[ThroughputRow]:
    setup = await asyncpg.connect(asyncpg_dsn(db.url))
    try:
        owners = [await make_owner(setup, tasks=20) for _ in range(concurrency)]
    finally:
        await setup.close()
    settings = settings_for(db.url).model_copy(update={"pool_size": concurrency, "max_overflow": 0})
    store = StoreClient(TodoStore(settings))
    raw = await RawClient.connect(asyncpg_dsn(db.url), size=concurrency)
    rows = []
    try:
        for name in HOT_CALLS:
            totals = {"todo_store": [0, 0.0, 0.0], "raw": [0, 0.0, 0.0]}
            for client in (store, raw):
                await _run(client, name, owners, 0.2)  # warm-up: connections, caches
            for _ in range(ROUNDS):
                for client, key in ((store, "todo_store"), (raw, "raw")):
                    cpu = time.process_time()
                    ops, took = await _run(client, name, owners, seconds / ROUNDS)
                    totals[key][0] += ops
                    totals[key][1] += took
                    totals[key][2] += time.process_time() - cpu
            mine, raws = totals["todo_store"], totals["raw"]
            row = ThroughputRow(
                name,
                todo_store=mine[0] / mine[1],
                raw=raws[0] / raws[1],
                todo_store_cpu_ms=mine[2] / mine[0] * 1000,
                raw_cpu_ms=raws[2] / raws[0] * 1000,
            )
            rows.append(row)
            print(f"  throughput {name}: ratio {row.ratio:.2f}", file=sys.stderr)
    finally:
        await store.close()
        await raw.close()
    return rows


async def _run(client: Client, name: str, owners: list[Owner], seconds: float) -> tuple[int, float]:
    """Units of work completed by all workers in `seconds`, and the time actually taken."""
    done = 0
    started = time.perf_counter()
    deadline = started + seconds

    async def worker(owner: Owner) -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            await client.run(name, owner)
            done += 1

    await asyncio.gather(*(worker(owner) for owner in owners))
    return done, time.perf_counter() - started
