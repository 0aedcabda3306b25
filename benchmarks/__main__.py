"""`python -m benchmarks [--quick]`: run every benchmark, write benchmarks/results.md, print it.

Needs only what the tests need: a PostgreSQL from `TODO_STORE_TEST_DATABASE_URL` (else Docker,
else an embedded one) and the `pgbouncer` binary (or Docker). Everything it creates (databases,
PgBouncer processes, proxies) is removed at the end. A full run takes a few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from benchmarks import environment
from benchmarks.leak import measure_leaks, statement_cache_on_old_pgbouncer
from benchmarks.report import STATEMENT_CACHE_ON_POOLER_SINCE, Results, render
from benchmarks.round_trips import CONFIGS, DIRECT, PGBOUNCER, PathResult, measure_path
from benchmarks.scaling import measure_scaling
from benchmarks.throughput import measure_throughput
from benchmarks.workload import check_raw_sql
from todo_store import TodoStore
from todo_store.testing.plugin import settings_for

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results.md"
LEAK_CONCURRENCY = 8


@dataclass(frozen=True)
class Plan:
    iterations: int
    leak_transactions: int
    throughput_seconds: float
    scaling_sizes: list[int]
    scaling_samples: int


FULL = Plan(7, 1_200, 4.0, [10**4, 10**5, 10**6], 51)
QUICK = Plan(2, 300, 0.5, [10**4, 10**5], 11)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a short run with few samples")
    parser.add_argument(
        "--rtt-ms", type=float, default=20.0, help="round-trip time the proxy injects (ms)"
    )
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="report file")
    return parser.parse_args(argv)


async def run(args: argparse.Namespace, command: str) -> Results:
    plan = QUICK if args.quick else FULL
    rtt = args.rtt_ms / 1000
    async with environment.server() as server:
        async with environment.database(server, "main") as db:
            with db.bouncer() as bouncer:
                versions = await environment.versions(db, bouncer)
                mismatches = await _raw_sql_mismatches(db)
                paths = await _round_trips(db, bouncer.url, rtt, plan)
            cache_check = None
            if versions.pgbouncer_number >= STATEMENT_CACHE_ON_POOLER_SINCE:
                with db.bouncer(max_prepared_statements=100) as tracking:
                    label = f"{PGBOUNCER} (max_prepared_statements=100)"
                    measured = await _measure(
                        label, tracking.url, db, keys=["b"], rtt=rtt, plan=plan
                    )
                    paths.append(measured)
            else:
                cache_check = await statement_cache_on_old_pgbouncer(
                    db, transactions=plan.leak_transactions // 3, concurrency=LEAK_CONCURRENCY
                )
            leaks = await measure_leaks(
                db, transactions=plan.leak_transactions, concurrency=LEAK_CONCURRENCY
            )
            throughput = await measure_throughput(db, seconds=plan.throughput_seconds)
        async with environment.database(server, "scaling") as scaling_db:
            scaling = await measure_scaling(
                scaling_db, sizes=plan.scaling_sizes, samples=plan.scaling_samples
            )
    return Results(
        command=command,
        quick=args.quick,
        rtt=rtt,
        iterations=plan.iterations,
        versions=versions,
        raw_sql_mismatches=mismatches,
        paths=paths,
        cache_check=cache_check,
        leaks=leaks,
        leak_concurrency=LEAK_CONCURRENCY,
        throughput=throughput,
        throughput_seconds=plan.throughput_seconds,
        scaling=scaling,
        scaling_samples=plan.scaling_samples,
    )


async def _round_trips(
    db: environment.Database, pooled_url: str, rtt: float, plan: Plan
) -> list[PathResult]:
    return [
        await _measure(
            PGBOUNCER, pooled_url, db, keys=["a", "c", "d", "d+", "e"], rtt=rtt, plan=plan
        ),
        await _measure(
            DIRECT, db.url, db, keys=["a", "b", "c", "d", "d+", "e"], rtt=rtt, plan=plan
        ),
    ]


async def _measure(
    path: str, url: str, db: environment.Database, *, keys: list[str], rtt: float, plan: Plan
) -> PathResult:
    by_key = {config.key: config for config in CONFIGS}
    configs = [by_key[key] for key in keys]
    return await measure_path(path, url, db, configs, rtt=rtt, iterations=plan.iterations)


async def _raw_sql_mismatches(db: environment.Database) -> list[str]:
    setup = await asyncpg.connect(environment.asyncpg_dsn(db.url))
    try:
        async with TodoStore(settings_for(db.url)) as store:
            return await check_raw_sql(store, setup)
    finally:
        await setup.close()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    command = shlex.join(["python", "-m", "benchmarks", *argv])
    started = time.perf_counter()
    results = asyncio.run(run(args, command))
    report = render(results)
    args.output.write_text(report, encoding="utf-8")
    print(report)
    took = time.perf_counter() - started
    print(f"wrote {args.output} in {took:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
