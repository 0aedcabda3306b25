"""Round trips per unit of work, counted by a TCP proxy (deterministic: no clock involved).

A `RoundTripProxy` sits in front of the test database (direct) and in front of PgBouncer
(transaction mode). Each `TodoStore` has one pooled connection, warmed up before anything is
counted, so connecting is excluded. The design's claims, checked on both paths:

- a single repository call in `store.session()` costs 4 round trips: BEGIN (sent at pool
  checkout), prepare (Parse/Describe), execute (Bind/Execute/Sync), COMMIT;
- n calls in one unit of work cost 2n + 2;
- no named prepared statement and no Close message is ever sent (caching is off by default);
- `store.ping()` costs 4 (BEGIN, prepare, execute, and the ROLLBACK of the pool's reset);
- a pool full of dead connections (every backend terminated, as a Neon suspend does) recovers
  on the very next unit of work, which costs 4 plus one reconnect: no pre-ping, no failed try.

These units of work commit: every test owns a user with a unique id and deletes it at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import asyncpg
import pytest
import pytest_asyncio
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

from todo_store import Settings, TaskNotFound, TaskRepo, TodoStore, UserNotFound, UserRepo
from todo_store.testing.pgbouncer import PgBouncer
from todo_store.testing.plugin import settings_for
from todo_store.testing.postgres import ProvisionedServer
from todo_store.testing.proxy import Measurement, RoundTripProxy

PATHS = ["direct", pytest.param("pgbouncer", marks=pytest.mark.pgbouncer)]
PING_ROUND_TRIPS = 4  # BEGIN at checkout, prepare, execute, ROLLBACK when the pool resets it
WAIT_STEPS = 500  # bounded polls, 10 ms apart, for the server side of a kill to be seen
WAIT_STEP_S = 0.01


def _single_connection(url: str, *, pool_size: int = 1) -> Settings:
    return settings_for(url).model_copy(update={"pool_size": pool_size, "max_overflow": 0})


@dataclass
class Proxied:
    """A store whose only connection goes through `proxy` to `path` ("direct" / "pgbouncer")."""

    path: str
    proxy: RoundTripProxy
    store: TodoStore


@pytest_asyncio.fixture(scope="module", loop_scope="session", params=PATHS)
async def proxied(
    request: pytest.FixtureRequest, todo_store_settings: Settings
) -> AsyncIterator[Proxied]:
    if request.param == "pgbouncer":
        bouncer: PgBouncer = request.getfixturevalue("todo_store_pgbouncer")
        target = bouncer.url
    else:
        target = todo_store_settings.database_url.get_secret_value()
    async with RoundTripProxy.in_front_of(target) as proxy:
        store = TodoStore(_single_connection(proxy.url_for(target)))
        async with store:
            await store.ping()  # connect and the dialect's first-connect queries
            yield Proxied(request.param, proxy, store)


@dataclass
class Owner:
    """A committed user with three tasks (the first one completed), deleted after the test."""

    user_id: str
    email: str
    task_ids: list[int]


@pytest_asyncio.fixture(loop_scope="session")
async def owner(proxied: Proxied) -> AsyncIterator[Owner]:
    user_id = f"u_rt_{uuid.uuid4().hex[:12]}"
    email = f"{user_id}@example.com"
    # Also warms the connection up again, should an earlier test have killed it.
    async with proxied.store.session() as session:
        await UserRepo(session).upsert(user_id, email=email, name="Round Trip")
        tasks = TaskRepo(session)
        task_ids = [(await tasks.create(user_id, title=f"task {i}")).id for i in range(3)]
        await tasks.set_completed(user_id, task_ids[0])
    try:
        yield Owner(user_id, email, task_ids)
    finally:
        async with proxied.store.session() as session:
            with contextlib.suppress(UserNotFound):
                await UserRepo(session).delete(user_id)


Call = Callable[[AsyncSession, Owner], Awaitable[object]]

CALLS: dict[str, Call] = {
    "TaskRepo.list_for": lambda s, o: TaskRepo(s).list_for(o.user_id, completed=False, limit=2),
    "TaskRepo.get": lambda s, o: TaskRepo(s).get(o.user_id, o.task_ids[1]),
    "TaskRepo.create": lambda s, o: TaskRepo(s).create(o.user_id, title="new", description="d"),
    "TaskRepo.update": lambda s, o: TaskRepo(s).update(
        o.user_id, o.task_ids[1], title="renamed", description=None
    ),
    "TaskRepo.set_completed": lambda s, o: TaskRepo(s).set_completed(o.user_id, o.task_ids[1]),
    "TaskRepo.toggle": lambda s, o: TaskRepo(s).toggle(o.user_id, o.task_ids[1]),
    "TaskRepo.delete": lambda s, o: TaskRepo(s).delete(o.user_id, o.task_ids[1]),
    "TaskRepo.count_for": lambda s, o: TaskRepo(s).count_for(o.user_id, completed=True),
    "TaskRepo.complete_all": lambda s, o: TaskRepo(s).complete_all(o.user_id),
    "TaskRepo.delete_completed": lambda s, o: TaskRepo(s).delete_completed(o.user_id),
    "UserRepo.upsert": lambda s, o: UserRepo(s).upsert(o.user_id, email=o.email, name="Renamed"),
    "UserRepo.get": lambda s, o: UserRepo(s).get(o.user_id),
    "UserRepo.get_by_email": lambda s, o: UserRepo(s).get_by_email(o.email.upper()),
    "UserRepo.delete": lambda s, o: UserRepo(s).delete(o.user_id),
}

# Calls mixed into one unit of work for the 2n + 2 rule (none of them removes the owner).
SEQUENCE = [
    "TaskRepo.count_for",
    "TaskRepo.get",
    "TaskRepo.toggle",
    "TaskRepo.list_for",
    "TaskRepo.create",
]


def _assert_no_named_statements(measured: Measurement) -> None:
    assert measured.stats.named_statements == 0, measured
    assert "Close" not in measured.messages, measured
    assert measured.connections == 0, measured


@pytest.mark.parametrize("name", list(CALLS))
async def test_single_call_unit_of_work_costs_4_round_trips(
    proxied: Proxied, owner: Owner, name: str
) -> None:
    with proxied.proxy.counting() as measured:
        async with proxied.store.session() as session:
            await CALLS[name](session, owner)
    assert measured.round_trips == 4, measured
    _assert_no_named_statements(measured)
    # BEGIN and COMMIT are simple queries; the call is one prepare and one execute.
    assert measured.messages.get("Query") == 2, measured
    assert measured.messages.get("Parse", 0) >= 1, measured
    assert measured.messages.get("Execute") == 1, measured


@pytest.mark.parametrize("n", [1, 2, 3, 5])
async def test_unit_of_n_statements_costs_2n_plus_2(proxied: Proxied, owner: Owner, n: int) -> None:
    with proxied.proxy.counting() as measured:
        async with proxied.store.session() as session:
            for name in SEQUENCE[:n]:
                await CALLS[name](session, owner)
    assert measured.round_trips == 2 * n + 2, measured
    assert measured.messages.get("Execute") == n, measured
    _assert_no_named_statements(measured)


async def test_failed_call_costs_4_round_trips_and_rolls_back(
    proxied: Proxied, owner: Owner
) -> None:
    """A `TaskNotFound` leaves the block: BEGIN, prepare, execute, ROLLBACK."""
    with proxied.proxy.counting() as measured, pytest.raises(TaskNotFound):
        async with proxied.store.session() as session:
            await TaskRepo(session).get(owner.user_id, owner.task_ids[-1] + 10**9)
    assert measured.round_trips == 4, measured
    _assert_no_named_statements(measured)


async def test_invalid_input_costs_no_round_trip(proxied: Proxied, owner: Owner) -> None:
    """Validation runs before any SQL, and the session checks out no connection before SQL."""
    with proxied.proxy.counting() as measured, pytest.raises(ValueError, match="title"):
        async with proxied.store.session() as session:
            await TaskRepo(session).create(owner.user_id, title="   ")
    assert measured.round_trips == 0, measured


async def test_ping_costs_a_fixed_number_of_round_trips(proxied: Proxied) -> None:
    await proxied.store.ping()
    with proxied.proxy.counting() as measured:
        await proxied.store.ping()
    assert measured.round_trips == PING_ROUND_TRIPS, measured
    assert measured.messages.get("Query") == 2, measured  # BEGIN and ROLLBACK
    _assert_no_named_statements(measured)


# -- the yardsticks: what the proxy counts for raw asyncpg and for SQLAlchemy's recipe ----------


def _proxied_url(proxied: Proxied) -> str:
    return proxied.store.settings.database_url.get_secret_value()


async def test_raw_asyncpg_floor_is_4_round_trips(proxied: Proxied) -> None:
    """asyncpg with caching off, one query in a transaction: the floor the engine must match."""
    conn = await asyncpg.connect(_proxied_url(proxied), statement_cache_size=0)
    try:
        await conn.fetchval("SELECT 1")
        with proxied.proxy.counting() as measured:
            async with conn.transaction():
                assert await conn.fetchval("SELECT $1::int", 1) == 1
    finally:
        await conn.close()
    assert measured.round_trips == 4, measured
    _assert_no_named_statements(measured)


async def test_uuid_statement_names_cost_a_fifth_round_trip(proxied: Proxied) -> None:
    """SQLAlchemy's documented recipe: each named statement is closed later, at a cost of 1.

    The Close goes out before the next prepare, i.e. in the next transaction, which a
    transaction pooler may run on another server connection: hence the leak the benchmark shows.
    """
    url = make_url(_proxied_url(proxied)).set(drivername="postgresql+asyncpg")
    engine = create_async_engine(
        url,
        pool_size=1,
        max_overflow=0,
        connect_args={
            "statement_cache_size": 0,
            "prepared_statement_cache_size": 0,
            "prepared_statement_name_func": lambda: f"__asyncpg_{uuid.uuid4()}__",
        },
    )
    try:
        async with engine.begin() as connection:
            await connection.execute(text("SELECT 1"))
        with proxied.proxy.counting() as measured:
            async with engine.begin() as connection:
                await connection.execute(text("SELECT 1"))
    finally:
        await engine.dispose()
    assert measured.round_trips == 5, measured
    assert measured.stats.named_statements == 1, measured
    assert measured.messages.get("Close") == 1, measured


# -- connection loss ----------------------------------------------------------------------------


async def _one_unit(store: TodoStore, user_id: str) -> int:
    async with store.session() as session:
        return await TaskRepo(session).count_for(user_id)


async def _fill_pool(store: TodoStore, user_id: str, size: int) -> None:
    """Check out `size` connections at once, so that the pool holds `size` of them."""
    barrier = asyncio.Barrier(size)

    async def hold() -> None:
        async with store.session() as session:
            await TaskRepo(session).count_for(user_id)
            await barrier.wait()

    async with asyncio.timeout(30):
        await asyncio.gather(*(hold() for _ in range(size)))


async def _terminate_backends(server: ProvisionedServer, database: str) -> int:
    """Kill every backend of `database`, as a Neon compute suspend does; wait until they exit."""
    admin = await asyncpg.connect(server.admin_url)
    try:
        killed = await admin.fetchval(
            """SELECT count(*) FILTER (WHERE pg_terminate_backend(pid, 5000))
               FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()""",
            database,
        )
    finally:
        await admin.close()
    assert isinstance(killed, int)
    return killed


async def _wait_until(condition: Callable[[], bool]) -> None:
    for _ in range(WAIT_STEPS):
        if condition():
            return
        await asyncio.sleep(WAIT_STEP_S)
    raise AssertionError("condition not reached within the bounded wait")


async def test_pool_of_dead_connections_recovers_on_the_next_unit_of_work(
    todo_store_settings: Settings, todo_store_server: ProvisionedServer, new_user_id: str
) -> None:
    pool_size = 3
    target = todo_store_settings.database_url.get_secret_value()
    database = make_url(target).database
    assert database is not None
    async with RoundTripProxy.in_front_of(target) as proxy:
        settings = _single_connection(proxy.url_for(target), pool_size=pool_size)
        async with TodoStore(settings) as store:
            async with store.session() as session:
                await UserRepo(session).upsert(new_user_id, email=f"{new_user_id}@x.io", name="L")
            try:
                # The cost of one reconnect, measured: a unit of work on a new connection.
                await store.dispose()
                with proxy.counting() as fresh:
                    await _one_unit(store, new_user_id)
                reconnect = fresh.round_trips - 4
                assert fresh.connections == 1
                assert 1 <= reconnect <= 6  # SSLRequest, StartupMessage (+ auth steps)

                await _fill_pool(store, new_user_id, pool_size)
                await _wait_until(lambda: proxy.open_connections == pool_size)
                assert await _terminate_backends(todo_store_server, database) >= pool_size
                # The proxy closes a client's socket once the server has closed its own.
                await _wait_until(lambda: proxy.open_connections == 0)

                # Every pooled connection is dead: the first unit of work still succeeds,
                # with one reconnect and no failed attempt (nothing reached the dead sockets).
                with proxy.counting() as recovered:
                    assert await _one_unit(store, new_user_id) == 0
                assert recovered.round_trips == 4 + reconnect, recovered
                assert recovered.connections == 1, recovered

                # The other dead connections were marked stale by that failure: each is
                # replaced on checkout, never handed to a caller, never pinged.
                for _ in range(pool_size - 1):
                    with proxy.counting() as replaced:
                        await _one_unit(store, new_user_id)
                    assert replaced.round_trips == 4 + reconnect, replaced
                    assert replaced.connections == 1, replaced
                await _fill_pool(store, new_user_id, pool_size)
                with proxy.counting() as healthy:
                    await _one_unit(store, new_user_id)
                assert healthy.round_trips == 4, healthy
                assert healthy.connections == 0, healthy
            finally:
                async with store.session() as session:
                    await UserRepo(session).delete(new_user_id)


@pytest.mark.pgbouncer
async def test_backends_killed_behind_pgbouncer_cost_the_client_nothing(
    todo_store_settings: Settings,
    todo_store_server: ProvisionedServer,
    todo_store_pgbouncer: PgBouncer,
    new_user_id: str,
) -> None:
    """PgBouncer replaces its dead server connections; the client's stay open: still 4."""
    database = make_url(todo_store_settings.database_url.get_secret_value()).database
    assert database is not None
    async with RoundTripProxy.in_front_of(todo_store_pgbouncer.url) as proxy:
        settings = _single_connection(proxy.url_for(todo_store_pgbouncer.url))
        async with TodoStore(settings) as store:
            async with store.session() as session:
                await UserRepo(session).upsert(new_user_id, email=f"{new_user_id}@x.io", name="L")
            try:
                assert await _terminate_backends(todo_store_server, database) >= 1
                await _wait_until(lambda: not _server_connections(todo_store_pgbouncer, database))
                with proxy.counting() as measured:
                    assert await _one_unit(store, new_user_id) == 0
                assert measured.round_trips == 4, measured
                assert measured.connections == 0, measured
            finally:
                async with store.session() as session:
                    await UserRepo(session).delete(new_user_id)


def _server_connections(bouncer: PgBouncer, database: str) -> list[dict[str, str | None]]:
    return [row for row in bouncer.admin_query("SHOW SERVERS") if row.get("database") == database]
