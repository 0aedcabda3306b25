"""`python -m benchmarks [--quick] [--only comparison|pages|fastapi]`: run the benchmarks,
write the report.

Needs only what the tests need: a PostgreSQL from `TODO_STORE_TEST_DATABASE_URL` (else Docker,
else an embedded one) and the `pgbouncer` binary (or Docker); the peer comparison also uses
advanced-alchemy and matplotlib when installed (`nox -s bench` installs both). Everything it
creates (databases, PgBouncer processes, proxies) is removed at the end. A full run takes
about 17 minutes on 2 cores (`--only pages`: under 2).
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
from benchmarks.chart import draw
from benchmarks.comparison import RAW, TODO_STORE, TODO_STORE_NON_ATOMIC, TUTORIAL, compare
from benchmarks.comparison import Plan as ComparisonPlan
from benchmarks.fastapi import FastapiOverhead, measure_fastapi
from benchmarks.leak import measure_leaks, statement_cache_on_old_pgbouncer
from benchmarks.pages import measure_pages
from benchmarks.peers import HOT_CALLS
from benchmarks.report import Results, render
from benchmarks.round_trips import DIRECT, PathResult, measure_all_paths
from benchmarks.scaling import measure_scaling
from benchmarks.workload import check_raw_sql
from todo_store import TodoStore
from todo_store.testing.plugin import settings_for

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results.md"
LEAK_CONCURRENCY = 8


@dataclass(frozen=True)
class Plan:
    iterations: int
    leak_transactions: int
    comparison: ComparisonPlan
    scaling_sizes: list[int]
    scaling_samples: int
    pages_sizes: list[int]
    pages_samples: int
    fastapi_pairs: int


FULL = Plan(7, 1_200, ComparisonPlan(), [10**4, 10**5, 10**6], 51, [10**4, 10**5, 10**6], 51, 100)
QUICK = Plan(
    2,
    300,
    ComparisonPlan(users=50, tasks_per_user=50, rounds=2, seconds=0.4, warmup_seconds=0.1),
    [10**4, 10**5],
    11,
    [10**4, 10**5],
    11,
    20,
)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a short run with few samples")
    parser.add_argument(
        "--rtt-ms", type=float, default=20.0, help="round-trip time the proxy injects (ms)"
    )
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="report file")
    parser.add_argument(
        "--only",
        choices=["comparison", "pages", "fastapi"],
        help="run only this part (the report then holds only it)",
    )
    return parser.parse_args(argv)


async def run(args: argparse.Namespace, command: str) -> tuple[Results, FastapiOverhead | None]:
    plan = QUICK if args.quick else FULL
    rtt = args.rtt_ms / 1000
    everything = args.only is None
    paths: list[PathResult] = []
    skipped: list[str] = []
    cache_check = None
    leaks = []
    scaling = []
    pages = []
    comparison = None
    async with environment.server() as server:
        async with environment.database(server, "main") as db:
            with db.bouncer() as bouncer:
                versions = await environment.versions(db, bouncer)
                mismatches = (
                    await _raw_sql_mismatches(db) if args.only in (None, "comparison") else []
                )
            if everything:
                measured = await measure_all_paths(db, rtt=rtt, iterations=plan.iterations)
                paths, skipped = measured.paths, measured.skipped
                # On a PgBouncer that does not track statements, caching is not measured: it
                # fails. This shows how often.
                cache_check = await statement_cache_on_old_pgbouncer(
                    db, transactions=plan.leak_transactions // 3, concurrency=LEAK_CONCURRENCY
                )
                leaks = await measure_leaks(
                    db, transactions=plan.leak_transactions, concurrency=LEAK_CONCURRENCY
                )
        if args.only in (None, "comparison"):
            async with environment.database(server, "comparison") as comparison_db:
                comparison = await compare(comparison_db, plan.comparison)
        if everything:
            async with environment.database(server, "scaling") as scaling_db:
                scaling = await measure_scaling(
                    scaling_db, sizes=plan.scaling_sizes, samples=plan.scaling_samples
                )
        if args.only in (None, "pages"):
            async with environment.database(server, "pages") as pages_db:
                pages = await measure_pages(
                    pages_db, sizes=plan.pages_sizes, samples=plan.pages_samples
                )
        fastapi = None
        if args.only in (None, "fastapi"):
            async with environment.database(server, "fastapi") as fastapi_db:
                fastapi = await measure_fastapi(fastapi_db, pairs=plan.fastapi_pairs)
    chart = args.output.with_suffix(".png")
    why_not = (
        draw(comparison, chart_round_trips(paths), chart)
        if comparison is not None
        else "no comparison in this run"
    )
    results = Results(
        command=command,
        quick=args.quick,
        rtt=rtt,
        iterations=plan.iterations,
        versions=versions,
        raw_sql_mismatches=mismatches,
        paths=paths,
        skipped_paths=skipped,
        cache_check=cache_check,
        leaks=leaks,
        leak_concurrency=LEAK_CONCURRENCY,
        comparison=comparison,
        chart=chart.name if why_not is None else why_not,
        chart_drawn=why_not is None,
        scaling=scaling,
        scaling_samples=plan.scaling_samples,
        pages=pages,
        pages_samples=plan.pages_samples,
    )
    return results, fastapi


# Round-trip configurations shown next to the comparison's implementations in the chart.
CHART_CONFIGS = {"a": TODO_STORE, "a-": TODO_STORE_NON_ATOMIC, "e": TUTORIAL, "c": RAW}


def chart_round_trips(paths: list[PathResult]) -> dict[str, dict[str, int]]:
    """Round trips per unit of work measured direct: implementation -> call -> count."""
    out: dict[str, dict[str, int]] = {}
    for path in paths:
        if path.path != DIRECT:
            continue
        for (key, name), cell in path.cells.items():
            label = CHART_CONFIGS.get(key)
            call = name.removeprefix("TaskRepo.")
            if label is None or call not in HOT_CALLS or cell.error or not cell.counted:
                continue
            out.setdefault(label, {})[call] = min(cell.counted)
    return {label: out[label] for label in CHART_CONFIGS.values() if label in out}


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
    results, fastapi = asyncio.run(run(args, command))
    report = render(results) + ("\n" + fastapi.markdown() if fastapi is not None else "")
    args.output.write_text(report, encoding="utf-8")
    print(report)
    took = time.perf_counter() - started
    print(f"wrote {args.output} in {took:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
