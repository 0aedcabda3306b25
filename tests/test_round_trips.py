"""Round trips per unit of work, counted by a TCP proxy (deterministic: no clock involved).

A `RoundTripProxy` sits in front of the test database (direct), in front of a PgBouncer that
does not track prepared statements (`pgbouncer`: Debian's 1.18, or any with
`max_prepared_statements = 0`) and in front of one that does (`pgbouncer-tracking`: >= 1.21
with `max_prepared_statements = 1000`, as Neon runs it). Each `TodoStore` has one pooled
connection, warmed up before anything is counted, so connecting is excluded. The claims:

- caching off (the default), on every path:
  - `store.session()` (atomic): a single repository call costs 4 round trips: BEGIN,
    prepare (Parse/Describe), execute (Parse/Bind/Execute/Sync), COMMIT; n calls cost 2n + 2;
  - `store.session(atomic=False)`: 2 per call, n calls cost 2n; no BEGIN/COMMIT at all, and a
    failed call costs 2 and leaves the session usable;
  - no named prepared statement and no Close is ever sent, and every Bind of the unnamed
    statement follows a Parse of it in the same Sync group, so a pooler cannot separate them;
- `statement_cache=True`, direct and through the tracking PgBouncer, once the statement is
  cached: 1 round trip per call non-atomic (Bind/Execute/Sync), n + 2 atomic;
- `store.ping()` costs 2 (prepare, execute; it runs outside a transaction);
- a pool full of dead connections (every backend terminated, as a Neon suspend does, or the
  PgBouncer restarted) recovers on the very next unit of work, atomic or not, which costs its
  usual count plus one reconnect: nothing is sent to a dead connection, no caller retries.

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
from conftest import start_tracking_pgbouncer
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

from tests.rigs.proxy import Measurement, RoundTripProxy
from todo_store import Settings, TaskNotFound, TaskRepo, TodoStore, UserNotFound, UserRepo
from todo_store.testing.pgbouncer import PgBouncer
from todo_store.testing.plugin import settings_for, start_pgbouncer
from todo_store.testing.postgres import ProvisionedServer

PGBOUNCER = "pgbouncer"  # no statement tracking (Debian's 1.18)
TRACKING = "pgbouncer-tracking"  # >= 1.21, max_prepared_statements = 1000 (Neon's setting)
PATHS = [
    "direct",
    pytest.param(PGBOUNCER, marks=pytest.mark.pgbouncer),
    pytest.param(TRACKING, marks=pytest.mark.pgbouncer),
]
# Where caching is safe: a direct connection, a PgBouncer that tracks prepared statements.
CACHED_PATHS = ["direct", pytest.param(TRACKING, marks=pytest.mark.pgbouncer)]
BOUNCERS = [
    pytest.param(PGBOUNCER, marks=pytest.mark.pgbouncer),
    pytest.param(TRACKING, marks=pytest.mark.pgbouncer),
]
ATOMIC = [pytest.param(True, id="atomic"), pytest.param(False, id="non-atomic")]
PING_ROUND_TRIPS = 2  # prepare, execute: a ping runs outside any transaction
WAIT_STEPS = 500  # bounded polls, 10 ms apart, for the server side of a kill to be seen
WAIT_STEP_S = 0.01


def _single_connection(url: str, *, pool_size: int = 1, **settings: object) -> Settings:
    update = {"pool_size": pool_size, "max_overflow": 0, **settings}
    return settings_for(url).model_copy(update=update)


def _path_url(request: pytest.FixtureRequest, path: str, settings: Settings) -> str:
    if path == PGBOUNCER:
        bouncer: PgBouncer = request.getfixturevalue("todo_store_pgbouncer")
        return bouncer.url
    if path == TRACKING:
        tracking: PgBouncer = request.getfixturevalue("tracking_pgbouncer")
        return tracking.url
    return settings.database_url.get_secret_value()


@dataclass
class Proxied:
    """A store whose only connection goes through `proxy` to `path` (see `PATHS`)."""

    path: str
    proxy: RoundTripProxy
    store: TodoStore


@pytest_asyncio.fixture(scope="module", loop_scope="session", params=PATHS)
async def proxied(
    request: pytest.FixtureRequest, todo_store_settings: Settings
) -> AsyncIterator[Proxied]:
    """Caching off (the default), one connection through the proxy."""
    target = _path_url(request, request.param, todo_store_settings)
    async with (
        RoundTripProxy.in_front_of(target) as proxy,
        TodoStore(_single_connection(proxy.url_for(target))) as store,
    ):
        await store.ping()  # connect and the dialect's first-connect queries
        yield Proxied(request.param, proxy, store)


@pytest_asyncio.fixture(scope="module", loop_scope="session", params=CACHED_PATHS)
async def cached(
    request: pytest.FixtureRequest, todo_store_settings: Settings
) -> AsyncIterator[Proxied]:
    """`statement_cache=True`, one connection through the proxy."""
    target = _path_url(request, request.param, todo_store_settings)
    async with RoundTripProxy.in_front_of(target) as proxy:
        settings = _single_connection(proxy.url_for(target), statement_cache=True)
        async with TodoStore(settings) as store:
            await store.ping()
            yield Proxied(request.param, proxy, store)


@dataclass
class Owner:
    """A committed user with three tasks (the first one completed), deleted after the test."""

    user_id: str
    email: str
    task_ids: list[int]


@contextlib.asynccontextmanager
async def _owner_on(store: TodoStore) -> AsyncIterator[Owner]:
    user_id = f"u_rt_{uuid.uuid4().hex[:12]}"
    email = f"{user_id}@example.com"
    # Also warms the connection up again, should an earlier test have killed it.
    async with store.session() as session:
        await UserRepo(session).upsert(user_id, email=email, name="Round Trip")
        tasks = TaskRepo(session)
        task_ids = [(await tasks.create(user_id, title=f"task {i}")).id for i in range(3)]
        await tasks.set_completed(user_id, task_ids[0])
    try:
        yield Owner(user_id, email, task_ids)
    finally:
        async with store.session() as session:
            with contextlib.suppress(UserNotFound):
                await UserRepo(session).delete(user_id)


@pytest_asyncio.fixture(loop_scope="session")
async def owner(proxied: Proxied) -> AsyncIterator[Owner]:
    async with _owner_on(proxied.store) as made:
        yield made


@pytest_asyncio.fixture(loop_scope="session")
async def cached_owner(cached: Proxied) -> AsyncIterator[Owner]:
    async with _owner_on(cached.store) as made:
        yield made


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

# Calls mixed into one unit of work for the 2n (+ 2) rules (none of them removes the owner).
SEQUENCE = [
    "TaskRepo.count_for",
    "TaskRepo.get",
    "TaskRepo.toggle",
    "TaskRepo.list_for",
    "TaskRepo.create",
]


def _assert_pooler_safe_wire(measured: Measurement) -> None:
    """Caching off: nothing named, nothing closed, no reconnect, every unnamed Bind parsed."""
    assert measured.stats.named_statements == 0, measured
    assert "Close" not in measured.messages, measured
    assert measured.connections == 0, measured
    assert measured.stats.unparsed_unnamed_binds == 0, measured
    assert measured.stats.unnamed_binds == measured.messages.get("Bind", 0), measured


# -- caching off, atomic: 2n + 2 ----------------------------------------------------------------


@pytest.mark.parametrize("name", list(CALLS))
async def test_single_call_unit_of_work_costs_4_round_trips(
    proxied: Proxied, owner: Owner, name: str
) -> None:
    with proxied.proxy.counting() as measured:
        async with proxied.store.session() as session:
            await CALLS[name](session, owner)
    assert measured.round_trips == 4, measured
    _assert_pooler_safe_wire(measured)
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
    _assert_pooler_safe_wire(measured)


async def test_failed_call_costs_4_round_trips_and_rolls_back(
    proxied: Proxied, owner: Owner
) -> None:
    """A `TaskNotFound` leaves the block: BEGIN, prepare, execute, ROLLBACK."""
    with proxied.proxy.counting() as measured, pytest.raises(TaskNotFound):
        async with proxied.store.session() as session:
            await TaskRepo(session).get(owner.user_id, owner.task_ids[-1] + 10**9)
    assert measured.round_trips == 4, measured
    _assert_pooler_safe_wire(measured)


# -- caching off, non-atomic: 2n ----------------------------------------------------------------


@pytest.mark.parametrize("name", list(CALLS))
async def test_single_call_non_atomic_costs_2_round_trips(
    proxied: Proxied, owner: Owner, name: str
) -> None:
    with proxied.proxy.counting() as measured:
        async with proxied.store.session(atomic=False) as session:
            await CALLS[name](session, owner)
    assert measured.round_trips == 2, measured
    _assert_pooler_safe_wire(measured)
    assert "Query" not in measured.messages, measured  # no BEGIN, COMMIT or ROLLBACK
    assert measured.messages.get("Execute") == 1, measured


@pytest.mark.parametrize("n", [1, 2, 3, 5])
async def test_non_atomic_n_calls_cost_2n(proxied: Proxied, owner: Owner, n: int) -> None:
    with proxied.proxy.counting() as measured:
        async with proxied.store.session(atomic=False) as session:
            for name in SEQUENCE[:n]:
                await CALLS[name](session, owner)
    assert measured.round_trips == 2 * n, measured
    assert measured.messages.get("Execute") == n, measured
    assert "Query" not in measured.messages, measured
    _assert_pooler_safe_wire(measured)


async def test_non_atomic_failed_call_costs_2_and_the_session_goes_on(
    proxied: Proxied, owner: Owner
) -> None:
    """Each call commits by itself: a failed one aborts nothing, the writes around it stay."""
    with proxied.proxy.counting() as measured:
        async with proxied.store.session(atomic=False) as session:
            tasks = TaskRepo(session)
            before = await tasks.toggle(owner.user_id, owner.task_ids[1])
            with pytest.raises(TaskNotFound):
                await tasks.get(owner.user_id, owner.task_ids[-1] + 10**9)
            after = await tasks.toggle(owner.user_id, owner.task_ids[2])
    assert measured.round_trips == 6, measured
    assert "Query" not in measured.messages, measured
    _assert_pooler_safe_wire(measured)
    assert before.completed
    assert after.completed
    async with proxied.store.session() as session:  # both toggles were committed
        done = await TaskRepo(session).count_for(owner.user_id, completed=True)
    assert done == 3


async def test_invalid_input_costs_no_round_trip(proxied: Proxied, owner: Owner) -> None:
    """Validation runs before any SQL, and the session checks out no connection before SQL."""
    for atomic in (True, False):
        with proxied.proxy.counting() as measured, pytest.raises(ValueError, match="title"):
            async with proxied.store.session(atomic=atomic) as session:
                await TaskRepo(session).create(owner.user_id, title="   ")
        assert measured.round_trips == 0, measured


async def test_ping_costs_a_fixed_number_of_round_trips(proxied: Proxied) -> None:
    await proxied.store.ping()
    with proxied.proxy.counting() as measured:
        await proxied.store.ping()
    assert measured.round_trips == PING_ROUND_TRIPS, measured
    assert "Query" not in measured.messages, measured  # no BEGIN, no ROLLBACK
    _assert_pooler_safe_wire(measured)


# -- statement caching where it is safe: 1 per call, n + 2 atomic --------------------------------


@pytest.mark.parametrize("name", list(CALLS))
async def test_cached_non_atomic_call_costs_1_round_trip(
    cached: Proxied, cached_owner: Owner, name: str
) -> None:
    call = CALLS[name]
    # Warm up: the same statement, on another user's rows.
    async with _owner_on(cached.store) as spare, cached.store.session(atomic=False) as session:
        await call(session, spare)
    with cached.proxy.counting() as measured:
        async with cached.store.session(atomic=False) as session:
            await call(session, cached_owner)
    assert measured.round_trips == 1, measured
    # Only Bind/Execute/Sync of the statement prepared before: nothing parsed, nothing begun.
    assert measured.messages.get("Parse", 0) == 0, measured
    assert measured.messages.get("Execute") == 1, measured
    assert "Query" not in measured.messages, measured
    assert measured.connections == 0, measured


@pytest.mark.parametrize("n", [1, 2, 3, 5])
async def test_cached_atomic_n_calls_cost_n_plus_2(
    cached: Proxied, cached_owner: Owner, n: int
) -> None:
    async with cached.store.session() as session:  # caches every statement of the sequence
        for name in SEQUENCE[:n]:
            await CALLS[name](session, cached_owner)
    with cached.proxy.counting() as measured:
        async with cached.store.session() as session:
            for name in SEQUENCE[:n]:
                await CALLS[name](session, cached_owner)
    assert measured.round_trips == n + 2, measured
    assert measured.messages.get("Parse", 0) == 0, measured
    assert measured.messages.get("Query") == 2, measured  # BEGIN, COMMIT


async def test_cached_calls_prepare_each_statement_once(
    cached: Proxied, cached_owner: Owner
) -> None:
    """On a new connection the first call of a statement prepares it under a name (one more
    round trip); every later call only executes it: get, count_for, get, get cost 2+2+1+1."""
    calls = ["TaskRepo.get", "TaskRepo.count_for", "TaskRepo.get", "TaskRepo.get"]
    async with TodoStore(cached.store.settings) as fresh:
        await fresh.ping()
        with cached.proxy.counting() as measured:
            for name in calls:
                async with fresh.session(atomic=False) as session:
                    await CALLS[name](session, cached_owner)
    assert measured.stats.named_statements == 2, measured
    assert measured.round_trips == 6, measured
    assert measured.messages.get("Execute") == 4, measured


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
    _assert_pooler_safe_wire(measured)


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


# -- connection loss ----------------------------------------------------------------------------


async def _one_unit(store: TodoStore, user_id: str, *, atomic: bool = True) -> int:
    async with store.session(atomic=atomic) as session:
        return await TaskRepo(session).count_for(user_id)


def _unit_cost(atomic: bool) -> int:
    return 4 if atomic else 2


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


async def _reconnect_cost(proxy: RoundTripProxy, store: TodoStore, user_id: str) -> int:
    """Round trips of opening one connection: a unit of work on a new connection, minus 4."""
    await store.dispose()
    with proxy.counting() as fresh:
        await _one_unit(store, user_id)
    assert fresh.connections == 1
    reconnect = fresh.round_trips - 4
    assert 1 <= reconnect <= 6  # SSLRequest, StartupMessage (+ auth steps)
    return reconnect


async def _assert_every_dead_connection_replaced(
    proxy: RoundTripProxy,
    store: TodoStore,
    user_id: str,
    *,
    pool_size: int,
    reconnect: int,
    atomic: bool,
) -> None:
    """Each of `pool_size` units of work (one per dead pooled connection) succeeds at once and
    costs exactly its usual count plus one reconnect: nothing was sent on a dead socket."""
    for _ in range(pool_size):
        with proxy.counting() as replaced:
            assert await _one_unit(store, user_id, atomic=atomic) == 0
        assert replaced.round_trips == _unit_cost(atomic) + reconnect, replaced
        assert replaced.connections == 1, replaced
    await _fill_pool(store, user_id, pool_size)
    with proxy.counting() as healthy:
        await _one_unit(store, user_id, atomic=atomic)
    assert healthy.round_trips == _unit_cost(atomic), healthy
    assert healthy.connections == 0, healthy


async def _kill_full_pool_and_recover(
    proxy: RoundTripProxy,
    store: TodoStore,
    user_id: str,
    *,
    pool_size: int,
    atomic: bool,
    kill: Callable[[], Awaitable[None]],
) -> None:
    """Fill the pool, `kill` every connection in it, and check that each is replaced at
    checkout for exactly one reconnect (the user is created before and deleted after)."""
    async with store.session() as session:
        await UserRepo(session).upsert(user_id, email=f"{user_id}@x.io", name="L")
    try:
        reconnect = await _reconnect_cost(proxy, store, user_id)
        await _fill_pool(store, user_id, pool_size)
        await _wait_until(lambda: proxy.open_connections == pool_size)
        await kill()
        # The proxy closes a client's socket once the server has closed its own.
        await _wait_until(lambda: proxy.open_connections == 0)
        await _assert_every_dead_connection_replaced(
            proxy, store, user_id, pool_size=pool_size, reconnect=reconnect, atomic=atomic
        )
    finally:
        async with store.session() as session:
            await UserRepo(session).delete(user_id)


@pytest.mark.parametrize("atomic", ATOMIC)
async def test_pool_of_dead_connections_recovers_on_the_next_unit_of_work(
    todo_store_settings: Settings,
    todo_store_server: ProvisionedServer,
    new_user_id: str,
    atomic: bool,
) -> None:
    pool_size = 3
    target = todo_store_settings.database_url.get_secret_value()
    database = make_url(target).database
    assert database is not None
    async with RoundTripProxy.in_front_of(target) as proxy:
        settings = _single_connection(proxy.url_for(target), pool_size=pool_size)
        async with TodoStore(settings) as store:

            async def terminate() -> None:
                assert await _terminate_backends(todo_store_server, database) >= pool_size

            await _kill_full_pool_and_recover(
                proxy, store, new_user_id, pool_size=pool_size, atomic=atomic, kill=terminate
            )


@pytest.mark.pgbouncer
@pytest.mark.parametrize("atomic", ATOMIC)
@pytest.mark.parametrize("tracking", [False, True], ids=[PGBOUNCER, TRACKING])
async def test_pgbouncer_restart_costs_one_reconnect_per_pooled_connection(
    todo_store_settings: Settings,
    todo_store_server: ProvisionedServer,
    new_user_id: str,
    atomic: bool,
    tracking: bool,
) -> None:
    """A PgBouncer of this test's own is restarted under a full pool: every pooled connection
    is dead, and each is replaced at checkout without a failed attempt."""
    pool_size = 3
    database = make_url(todo_store_settings.database_url.get_secret_value()).database or ""
    start = start_tracking_pgbouncer if tracking else start_pgbouncer
    bouncer = start(todo_store_server, database, pool_size=4)
    try:
        async with RoundTripProxy.in_front_of(bouncer.url) as proxy:
            settings = _single_connection(proxy.url_for(bouncer.url), pool_size=pool_size)
            async with TodoStore(settings) as store:

                async def restart() -> None:
                    bouncer.restart()

                await _kill_full_pool_and_recover(
                    proxy, store, new_user_id, pool_size=pool_size, atomic=atomic, kill=restart
                )
    finally:
        bouncer.stop()


@pytest.mark.parametrize("atomic", ATOMIC)
@pytest.mark.parametrize("path", BOUNCERS)
async def test_backends_killed_behind_pgbouncer_cost_the_client_nothing(
    request: pytest.FixtureRequest,
    todo_store_server: ProvisionedServer,
    new_user_id: str,
    path: str,
    atomic: bool,
) -> None:
    """PgBouncer replaces its dead server connections; the client's stay open: no extra trip."""
    bouncer: PgBouncer = request.getfixturevalue(
        "tracking_pgbouncer" if path == TRACKING else "todo_store_pgbouncer"
    )
    async with (
        RoundTripProxy.in_front_of(bouncer.url) as proxy,
        TodoStore(_single_connection(proxy.url_for(bouncer.url))) as store,
    ):
        async with store.session() as session:
            await UserRepo(session).upsert(new_user_id, email=f"{new_user_id}@x.io", name="L")
        try:
            assert await _terminate_backends(todo_store_server, bouncer.database) >= 1
            await _wait_until(lambda: not _server_connections(bouncer, bouncer.database))
            with proxy.counting() as measured:
                assert await _one_unit(store, new_user_id, atomic=atomic) == 0
            assert measured.round_trips == _unit_cost(atomic), measured
            assert measured.connections == 0, measured
        finally:
            async with store.session() as session:
                await UserRepo(session).delete(new_user_id)


def _server_connections(bouncer: PgBouncer, database: str) -> list[dict[str, str | None]]:
    return [row for row in bouncer.admin_query("SHOW SERVERS") if row.get("database") == database]
