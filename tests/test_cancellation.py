"""Cancellation stays cancellation, and never leaves a connection in an unknown state.

The storm: hundreds of units of work (reads, writes, atomic and not, direct and through
PgBouncer, behind a latency-injecting proxy) are cancelled at random points. Afterwards every
cancelled task reports `cancelled()`, no other error happened, the pool has nothing checked
out, no server backend is left idle in a transaction, and the next units of work all succeed.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import asyncpg
import pytest
import pytest_asyncio
from sqlalchemy import event, text
from sqlalchemy.engine import make_url

from tests.rigs.proxy import RoundTripProxy
from todo_store import DatabaseUnavailable, Settings, TaskRepo, TodoStore, TodoStoreError, UserRepo
from todo_store.testing.pgbouncer import PgBouncer
from todo_store.testing.plugin import settings_for
from todo_store.testing.postgres import ProvisionedServer

PATHS = ["direct", pytest.param("pgbouncer", marks=pytest.mark.pgbouncer)]
STORM_UNITS = 320  # per path: 640 in all
STORM_CONCURRENCY = 16
PROXY_DELAY_S = 0.004  # injected round-trip time: a unit of work takes 8..24 ms
CANCEL_WITHIN_S = 0.15
WAIT_STEPS = 500  # bounded polls for the server to notice a discarded connection
WAIT_STEP_S = 0.01


@dataclass
class StormResult:
    cancelled_mid_flight: int = 0
    completed: int = 0
    not_cancelled: list[str] = field(default_factory=list)  # cancel() accepted, not cancelled()
    errors: list[str] = field(default_factory=list)


@pytest_asyncio.fixture(loop_scope="session", params=PATHS)
async def storm_store(
    request: pytest.FixtureRequest, todo_store_settings: Settings
) -> AsyncIterator[TodoStore]:
    if request.param == "pgbouncer":
        bouncer: PgBouncer = request.getfixturevalue("todo_store_pgbouncer")
        target = bouncer.url
    else:
        target = todo_store_settings.database_url.get_secret_value()
    async with RoundTripProxy.in_front_of(target, delay=PROXY_DELAY_S) as proxy:
        settings = settings_for(proxy.url_for(target)).model_copy(
            update={"pool_size": 4, "max_overflow": 4}
        )
        async with TodoStore(settings) as store:
            yield store


async def _owner(store: TodoStore) -> tuple[str, list[int]]:
    user_id = f"storm_{uuid.uuid4().hex[:10]}"
    async with store.session() as session:
        await UserRepo(session).upsert(user_id, email=f"{user_id}@example.com", name="Storm")
        tasks = TaskRepo(session)
        ids = [(await tasks.create(user_id, title=f"task {n}")).id for n in range(4)]
    return user_id, ids


def _units(store: TodoStore, user_id: str, ids: list[int]) -> list[Callable[[], Awaitable[None]]]:
    async def read() -> None:
        async with store.session() as session:
            await TaskRepo(session).list_for(user_id, limit=10)

    async def toggle() -> None:
        async with store.session() as session:
            await TaskRepo(session).toggle(user_id, random.choice(ids))  # noqa: S311

    async def create_non_atomic() -> None:
        async with store.session(atomic=False) as session:
            task = await TaskRepo(session).create(user_id, title="storm")
            await TaskRepo(session).delete(user_id, task.id)

    async def several_writes() -> None:
        async with store.session() as session:
            tasks = TaskRepo(session)
            task = await tasks.create(user_id, title="storm")
            await tasks.set_completed(user_id, task.id)
            await tasks.delete(user_id, task.id)

    return [read, toggle, create_non_atomic, several_writes]


async def _storm(store: TodoStore, rng: random.Random, units: int) -> StormResult:
    user_id, ids = await _owner(store)
    kinds = _units(store, user_id, ids)
    result = StormResult()
    for start in range(0, units, STORM_CONCURRENCY):
        batch = range(start, min(start + STORM_CONCURRENCY, units))
        await _cancel_batch([kinds[n % len(kinds)] for n in batch], rng, result)
    return result


async def _cancel_batch(
    units: list[Callable[[], Awaitable[None]]], rng: random.Random, result: StormResult
) -> None:
    """Start the units together and cancel each at a random point (maybe after it is done)."""
    loop = asyncio.get_running_loop()
    tasks = [asyncio.create_task(unit()) for unit in units]
    accepted: dict[asyncio.Task[None], bool] = {}
    all_fired = asyncio.Event()

    def cancel(task: asyncio.Task[None]) -> None:
        accepted[task] = not task.done() and task.cancel()
        if len(accepted) == len(tasks):
            all_fired.set()

    for task in tasks:
        loop.call_later(rng.uniform(0, CANCEL_WITHIN_S), cancel, task)
    await asyncio.gather(*tasks, return_exceptions=True)
    await all_fired.wait()
    for task in tasks:
        if accepted[task]:
            result.cancelled_mid_flight += 1
            if not task.cancelled():
                result.not_cancelled.append(repr(task.exception()))
        elif task.cancelled():
            result.not_cancelled.append("cancelled without a cancel() call")
        elif task.exception() is not None:
            result.errors.append(repr(task.exception()))
        else:
            result.completed += 1


async def _idle_in_transaction(admin_url: str, database: str) -> int:
    connection = await asyncpg.connect(admin_url)
    try:
        count: int = await connection.fetchval(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = $1 AND state LIKE 'idle in transaction%'",
            database,
        )
        return count
    finally:
        await connection.close()


async def test_cancellation_storm_leaves_nothing_behind(
    storm_store: TodoStore, todo_store_settings: Settings, todo_store_server: ProvisionedServer
) -> None:
    rng = random.Random(20261130)  # noqa: S311 - reproducible cancel points, not security
    result = await _storm(storm_store, rng, STORM_UNITS)

    assert result.not_cancelled == []
    assert result.errors == []
    # The storm really cancelled work in flight, and let some finish.
    assert result.cancelled_mid_flight >= STORM_UNITS // 3, result
    assert result.completed >= 1, result
    assert storm_store.engine.pool.checkedout() == 0  # type: ignore[attr-defined]

    database = make_url(todo_store_settings.database_url.get_secret_value()).database or ""
    admin_url = todo_store_server.admin_url
    for _ in range(WAIT_STEPS):  # discarded connections' backends exit on their own
        if await _idle_in_transaction(admin_url, database) == 0:
            break
        await asyncio.sleep(WAIT_STEP_S)
    assert await _idle_in_transaction(admin_url, database) == 0

    user_id, ids = await _owner(storm_store)
    for unit in _units(storm_store, user_id, ids) * 5:
        await unit()
    async with storm_store.session() as session:  # the storm's rows go (cascade)
        await session.execute(text("DELETE FROM users WHERE id LIKE 'storm\\_%'"))
    print(  # the figures the storm produced, shown with -s
        f"storm: {STORM_UNITS} units, {result.cancelled_mid_flight} cancelled mid-flight, "
        f"{result.completed} completed, 0 errors"
    )


async def test_asyncio_timeout_raises_timeout_error(todo_store_settings: Settings) -> None:
    async with TodoStore(todo_store_settings) as store:
        with pytest.raises(TimeoutError) as raised:
            async with asyncio.timeout(0.2), store.session() as session:
                await session.execute(text("SELECT pg_sleep(5)"))
        assert not isinstance(raised.value, TodoStoreError)
        assert store.engine.pool.checkedout() == 0  # type: ignore[attr-defined]
        async with store.session() as session:
            assert await session.scalar(text("SELECT 1")) == 1


async def test_cancel_stops_a_loop_that_retries_unavailable(
    todo_store_settings: Settings,
) -> None:
    started = asyncio.Event()
    attempts = 0

    async def read_with_retries(store: TodoStore) -> None:
        nonlocal attempts
        while True:  # the README allows retrying reads on DatabaseUnavailable
            attempts += 1
            try:
                async with store.session() as session:
                    await session.execute(text("SELECT 1"))  # connected, in a transaction
                    started.set()
                    await session.execute(text("SELECT pg_sleep(5)"))
            except DatabaseUnavailable:
                continue
            return

    async with TodoStore(todo_store_settings) as store:
        task = asyncio.create_task(read_with_retries(store))
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert task.cancelled()
        assert attempts == 1


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, SystemExit])
async def test_interrupts_pass_through_unchanged(
    todo_store_settings: Settings, interrupt: type[BaseException]
) -> None:
    single = todo_store_settings.model_copy(update={"pool_size": 1, "max_overflow": 0})
    async with TodoStore(single) as store:

        def interrupt_now(*_args: object) -> None:
            raise interrupt

        event.listen(store.engine.sync_engine, "before_cursor_execute", interrupt_now)
        with pytest.raises(interrupt):
            async with store.session() as session:
                await session.execute(text("SELECT 1"))
        event.remove(store.engine.sync_engine, "before_cursor_execute", interrupt_now)

        assert store.engine.pool.checkedout() == 0  # type: ignore[attr-defined]
        async with store.session() as session:
            assert await session.scalar(text("SELECT 1")) == 1
