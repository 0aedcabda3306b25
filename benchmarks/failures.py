"""How the engine behaves on a bad day: timeouts, an outage, a restart under load.

`python -m benchmarks.failures` (needs `TODO_STORE_TEST_DATABASE_URL`, a superuser URL, and
PgBouncer: Debian's 1.18 on PATH or /usr/sbin, 1.25 from `TODO_STORE_PGBOUNCER_TRACKING_BIN`):

1. timeout overshoot: how long after `STATEMENT_TIMEOUT` / `CONNECT_TIMEOUT` the caller gets
   its error, direct and through PgBouncer (a statement running on the server, and one
   queued in a PgBouncer whose server connections are all busy; a first connect through a
   PgBouncer whose server is down; a server that never answers);
2. an outage: the database is unreachable for `--outage` seconds while 8 callers keep calling
   `ping()`; logins attempted per second during it, and the time from the database being
   reachable again to the first successful call, direct and through PgBouncer 1.25;
3. a restart under load: 100 cycles of "fill a pool of 4, `pg_terminate_backend` all of them,
   run one atomic unit at once", direct and through PgBouncer 1.25: how many units fail,
   and how many connections were
   replaced under a unit's first round trip (the goodbye had not arrived at checkout).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager

import asyncpg
from sqlalchemy import text
from sqlalchemy.engine import make_url

from tests.rigs.outage import Forwarder
from todo_store import DatabaseUnavailable, Settings, TodoStore, TodoStoreError, resend
from todo_store.testing.pgbouncer import PgBouncer, tracking_binary
from todo_store.testing.postgres import create_database, drop_database, server_from_url

WORKERS = 8


def _settings(url: str, **update: object) -> Settings:
    return Settings(database_url=url, database_url_direct=url).model_copy(update=update)


async def _elapsed(work: Awaitable[object]) -> tuple[float, str]:
    started = time.perf_counter()
    try:
        await work
        outcome = "no error"
    except Exception as error:
        outcome = f"{type(error).__name__}: {str(error)[:90]}"
    return time.perf_counter() - started, outcome


def _row(label: str, setting: float, took: float, outcome: str) -> None:
    over = took - setting
    print(f"| {label} | {setting:g} s | {took:.3f} s | {over * 1000:+.0f} ms | {outcome} |")


async def _statement_running(url: str, seconds: float) -> tuple[float, str]:
    async with TodoStore(_settings(url, statement_timeout=seconds, pool_size=1)) as store:
        await store.ping()

        async def unit() -> None:
            async with store.session() as session:
                await session.execute(text("SELECT pg_sleep(60)"))

        return await _elapsed(unit())


async def _statement_queued(bouncer: PgBouncer, seconds: float) -> tuple[float, str]:
    """The statement waits in PgBouncer's queue: its only server connection is taken."""
    holder = await asyncpg.connect(bouncer.url, statement_cache_size=0)
    try:
        async with TodoStore(_settings(bouncer.url, statement_timeout=seconds)) as store:
            await store.ping()
            transaction = holder.transaction()
            await transaction.start()
            await holder.execute("SELECT 1")
            try:
                return await _elapsed(store.ping())
            finally:
                await transaction.rollback()
    finally:
        await holder.close()


async def _first_connect_server_down(bouncer: PgBouncer, seconds: float) -> tuple[float, str]:
    async with TodoStore(_settings(bouncer.url, connect_timeout=seconds)) as store:
        return await _elapsed(store.ping())


async def _silent_server(seconds: float) -> tuple[float, str]:
    server = await asyncio.start_server(lambda _r, _w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        async with TodoStore(_settings(url, connect_timeout=seconds)) as store:
            return await _elapsed(store.ping())
    finally:
        server.close()


async def timeouts(url: str, database: str, settings: list[float]) -> None:
    server = server_from_url(url, "env")
    print("\n## Timeout overshoot\n")
    print("| case | setting | error after | overshoot | error |")
    print("|---|---|---|---|---|")
    binaries = {"PgBouncer 1.18": None, "PgBouncer 1.25": tracking_binary()}
    for timeout in settings:
        _row("statement, direct", timeout, *await _statement_running(url, timeout))
        for name, binary in binaries.items():
            with PgBouncer(server, database, binary=binary) as bouncer:
                took = await _statement_running(bouncer.url, timeout)
                _row(f"statement running, {name}", timeout, *took)
            with PgBouncer(server, database, binary=binary, pool_size=1) as bouncer:
                took = await _statement_queued(bouncer, timeout)
                _row(f"statement queued in {name}", timeout, *took)
        _row("connect, server never answers", timeout, *await _silent_server(timeout))
        async with Forwarder.in_front_of(url) as gone:
            upstream = server_from_url(gone.url_for(url), "env")
            for name, binary in binaries.items():
                with PgBouncer(upstream, database, binary=binary) as bouncer:
                    probe = await asyncpg.connect(bouncer.url, statement_cache_size=0)
                    await probe.execute("SELECT 1")
                    await probe.close()
                    gone.down()
                    took = await _first_connect_server_down(bouncer, timeout)
                    _row(f"first connect, {name}, server down", timeout, *took)
                    gone.up()


@asynccontextmanager
async def _path(url: str, database: str, via: str) -> AsyncIterator[tuple[str, Forwarder]]:
    """A URL to the database through `via`, and the switch that takes the database down."""
    async with Forwarder.in_front_of(url) as database_link:
        target = database_link.url_for(url)
        if via == "direct":
            yield target, database_link
            return
        upstream = server_from_url(target, "env")
        # PgBouncer waits server_login_retry (15 s by default) after a failed server login
        # before it tries again: 1 s here, so what is measured is the client's own delay.
        retry = {"server_login_retry": "1"}
        with PgBouncer(upstream, database, binary=tracking_binary(), settings=retry) as bouncer:
            yield bouncer.url, database_link


async def outage(url: str, database: str, via: str, seconds: float) -> None:
    async with _path(url, database, via) as (target, database_link):  # noqa: SIM117
        async with Forwarder.in_front_of(target) as logins:
            store = TodoStore(_settings(logins.url_for(target), connect_timeout=2))
            await store.ping()
            state = {"stop": False, "first_success": 0.0, "calls": 0}

            async def caller() -> None:
                while not state["stop"]:
                    state["calls"] += 1
                    try:
                        await store.ping()
                    except TodoStoreError:  # before: CommitOutcomeUnknown, even for ping()
                        await asyncio.sleep(0.01)  # a service's next request
                        continue
                    if not database_link.is_up or state["first_success"]:
                        await asyncio.sleep(0.01)
                        continue
                    state["first_success"] = time.perf_counter()

            logins_before = logins.accepted
            database_link.down()
            workers = [asyncio.create_task(caller()) for _ in range(WORKERS)]
            await asyncio.sleep(seconds)
            logins_during = logins.accepted - logins_before
            calls_during = state["calls"]
            back_at = time.perf_counter()
            database_link.up()
            for _ in range(3000):
                if state["first_success"]:
                    break
                await asyncio.sleep(0.01)
            state["stop"] = True
            await asyncio.gather(*workers)
            await store.dispose()
    first = state["first_success"] - back_at if state["first_success"] else float("nan")
    print(
        f"| {via} | {seconds:g} s | {calls_during} | {logins_during} | "
        f"{logins_during / seconds:.1f} | {first:.3f} s |"
    )


async def restart_under_load(url: str, database: str, cycles: int) -> None:
    print("\n## Restart under load\n")
    await _restart_under_load(url, url, "direct", cycles)
    with PgBouncer(server_from_url(url, "env"), database, binary=tracking_binary()) as bouncer:
        await _restart_under_load(bouncer.url, url, "PgBouncer 1.25", cycles)


async def _restart_under_load(url: str, admin_url: str, via: str, cycles: int) -> None:
    failed = skipped = 0
    errors: set[str] = set()
    async with TodoStore(_settings(url, pool_size=4, max_overflow=0)) as store:
        resent = [0]

        def replaced() -> None:
            resent[0] += 1

        resend.on_replacement(store.engine.sync_engine, replaced)
        admin = await asyncpg.connect(admin_url)
        try:
            for _ in range(cycles):
                barrier = asyncio.Barrier(4)

                async def hold(barrier: asyncio.Barrier = barrier) -> int:
                    async with store.session() as session:
                        pid = await session.scalar(text("SELECT pg_backend_pid()"))
                        await barrier.wait()
                        return int(pid)

                filled = True
                try:
                    async with asyncio.TaskGroup() as group:
                        holders = [group.create_task(hold()) for _ in range(4)]
                except* DatabaseUnavailable:  # a connection of the last cycle's; not measured
                    filled = False
                if not filled:
                    skipped += 1
                    continue
                pids = [holder.result() for holder in holders]
                await admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM unnest($1::int[]) AS pid", pids
                )
                try:
                    async with store.session() as session:
                        await session.execute(text("SELECT 1"))
                except DatabaseUnavailable as error:
                    failed += 1
                    errors.add(str(error)[:100])
        finally:
            await admin.close()
    print(
        f"- {via}: {failed} of {cycles - skipped} units failed "
        f"({skipped} cycles skipped: the pool could not be filled); {resent[0]} connections "
        f"replaced under a unit's first round trip (fills included): {sorted(errors)}"
    )


async def main(arguments: argparse.Namespace) -> None:
    admin_url = os.environ["TODO_STORE_TEST_DATABASE_URL"]
    database = f"bench_failures_{uuid.uuid4().hex[:8]}"
    await create_database(admin_url, database)
    url = make_url(admin_url).set(database=database).render_as_string(hide_password=False)
    try:
        if "timeouts" in arguments.only:
            await timeouts(url, database, arguments.timeouts)
        if "outage" in arguments.only:
            print(f"\n## Outage ({WORKERS} callers calling ping() in a loop)\n")
            print(
                "| path | outage | calls during it | logins during it | logins/s "
                "| first success after |"
            )
            print("|---|---|---|---|---|---|")
            for via in ("direct", "pgbouncer-1.25"):
                await outage(url, database, via, arguments.outage)
        if "restart" in arguments.only:
            await restart_under_load(url, database, arguments.cycles)
    finally:
        await drop_database(admin_url, database)


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", default=["timeouts", "outage", "restart"])
    parser.add_argument("--timeouts", nargs="+", type=float, default=[1.0, 5.0])
    parser.add_argument("--outage", type=float, default=15.0)
    parser.add_argument("--cycles", type=int, default=100)
    return parser.parse_args()


if __name__ == "__main__":
    asyncio.run(main(_parse()))
