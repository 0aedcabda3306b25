"""What OpenTelemetry instrumentation costs per call: client CPU and ops/s, off and on.

    python -m benchmarks.instrumentation [--rounds 5] [--units 400]

Modes, interleaved over `rounds` rounds (each on a store created for it, pool of 1, one unit of
work at a time, so the client's CPU is what is measured):
- `off`: `TodoStoreInstrumentor` never enabled (the package as installed without `[otel]`);
- `on, sampled`: enabled with the SDK, every span recorded and handed to a batch processor
  whose exporter drops it, metrics aggregated in memory (the instrumentation's full cost
  without the network);
- `on, not sampled`: enabled, the sampler keeps no span (head sampling at 0%): metrics only.

Calls: `get` and `list_for` (50 rows) in `session(atomic=False)`, `get` in `session()`. Reported
per call: median CPU microseconds per unit of work (process time), median ops/s, and the
difference to `off`. Uses the database the tests use (`TODO_STORE_TEST_DATABASE_URL`, else
Docker or embedded).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import asyncpg
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, Sampler

from benchmarks import environment
from benchmarks.comparison import Plan, make_users
from todo_store import TaskRepo, TodoStore
from todo_store.instrumentation import TodoStoreInstrumentor
from todo_store.testing.plugin import settings_for

MODES: dict[str, Sampler | None] = {
    "off": None,
    "on, sampled": ALWAYS_ON,
    "on, not sampled": ALWAYS_OFF,
}


class _Discard(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


Call = Callable[[TodoStore, str, int], Awaitable[object]]


async def _get_non_atomic(store: TodoStore, user: str, task: int) -> object:
    async with store.session(atomic=False) as session:
        return await TaskRepo(session).get(user, task)


async def _list_non_atomic(store: TodoStore, user: str, _task: int) -> object:
    async with store.session(atomic=False) as session:
        return await TaskRepo(session).list_for(user, limit=50)


async def _get_atomic(store: TodoStore, user: str, task: int) -> object:
    async with store.session() as session:
        return await TaskRepo(session).get(user, task)


CALLS: dict[str, Call] = {
    "get, session(atomic=False)": _get_non_atomic,
    "list_for(50), session(atomic=False)": _list_non_atomic,
    "get, session()": _get_atomic,
}


async def _measure(
    url: str, sampler: Sampler | None, call: Call, *, user: str, task: int, units: int
) -> tuple[float, float]:
    """(CPU seconds per unit, units per second) for `units` sequential units of work."""
    instrumentor = TodoStoreInstrumentor()
    providers: list[Any] = []
    if sampler is not None:
        tracer_provider = TracerProvider(sampler=sampler)
        tracer_provider.add_span_processor(BatchSpanProcessor(_Discard()))
        meter_provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
        providers = [tracer_provider, meter_provider]
        instrumentor.instrument(tracer_provider=tracer_provider, meter_provider=meter_provider)
    try:
        async with TodoStore(settings_for(url).model_copy(update={"pool_size": 1})) as store:
            for _ in range(20):  # connect and warm the statement caches first
                await call(store, user, task)
            cpu, wall = time.process_time(), time.perf_counter()
            for _ in range(units):
                await call(store, user, task)
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    finally:
        if sampler is not None:
            instrumentor.uninstrument()
            for provider in providers:
                provider.shutdown()
    return cpu / units, units / wall


async def run(args: argparse.Namespace) -> None:
    async with environment.server() as server, environment.database(server, "otel") as db:
        setup = await asyncpg.connect(environment.asyncpg_dsn(db.url))
        try:
            owned = await make_users(setup, Plan(users=20, tasks_per_user=60))
        finally:
            await setup.close()
        user = sorted(owned)[0]
        task = owned[user][len(owned[user]) // 2]
        cpu: dict[tuple[str, str], list[float]] = {}
        rate: dict[tuple[str, str], list[float]] = {}
        for _ in range(args.rounds):
            for call_name, call in CALLS.items():
                for mode, sampler in MODES.items():
                    per_unit, per_second = await _measure(
                        db.url, sampler, call, user=user, task=task, units=args.units
                    )
                    cpu.setdefault((call_name, mode), []).append(per_unit)
                    rate.setdefault((call_name, mode), []).append(per_second)
    print(
        f"{args.rounds} rounds x {args.units} units per call and mode, pool of 1, sequential; "
        "median CPU per unit of work (client process) and ops/s\n"
    )
    print("| call | mode | CPU µs/unit (min-max) | vs off | ops/s | vs off |")
    print("|---|---|---|---|---|---|")
    for call_name in CALLS:
        base_cpu = statistics.median(cpu[(call_name, "off")])
        base_rate = statistics.median(rate[(call_name, "off")])
        for mode in MODES:
            samples = cpu[(call_name, mode)]
            c = statistics.median(samples)
            r = statistics.median(rate[(call_name, mode)])
            print(
                f"| {call_name} | {mode} | {c * 1e6:,.0f} ({min(samples) * 1e6:,.0f}-"
                f"{max(samples) * 1e6:,.0f}) | {(c - base_cpu) * 1e6:+,.0f} µs "
                f"| {r:,.0f} | {(r / base_rate - 1) * 100:+.0f}% |"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.instrumentation", description=__doc__
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--units", type=int, default=400, help="units of work per measurement")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
