"""A new process at the connection floor, counted by the round-trip proxy (no TLS, so every
message is readable), direct and through PgBouncer:

- the first call of a new engine costs the connection's own round trips, its one-query check,
  and the call's: + 2 for one call in `session(atomic=False)`, + 4 in `session()`;
  SQLAlchemy's first-connect questions (version, schema, isolation level, string escapes: 10
  round trips) are answered from what the server reported at login;
- nothing is lost: the server version and string-escape rule are the ones SQLAlchemy would
  have asked for, and a transaction after a non-atomic unit still runs at the server's
  default isolation level (not one read once and forced);
- `await store.warm(n)` opens n connections at once: the proxy lets no connection through
  until n are waiting, so one-after-another would never finish.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator

import asyncpg
import pytest
import pytest_asyncio
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from tests.rigs.proxy import RoundTripProxy
from todo_store import Settings, TaskRepo, TodoStore
from todo_store.testing.pgbouncer import PgBouncer
from todo_store.testing.plugin import settings_for
from todo_store.testing.postgres import ProvisionedServer, create_database, drop_database

PATHS = ["direct", pytest.param("pgbouncer", marks=pytest.mark.pgbouncer)]
# The engine's first connection is checked with one simple query within the connect timeout
# (through a pooler whose server is down, that is where the wait happens): 1 round trip.
FIRST_CONNECTION_CHECK = 1
GATE_TIMEOUT_S = 10.0


def _target(request: pytest.FixtureRequest, path: str, settings: Settings) -> str:
    if path == "pgbouncer":
        bouncer: PgBouncer = request.getfixturevalue("todo_store_pgbouncer")
        return bouncer.url
    return settings.database_url.get_secret_value()


async def _connection_round_trips(proxy: RoundTripProxy, url: str) -> int:
    """A bare asyncpg login through the proxy, without its closing Terminate."""
    with proxy.counting() as measured:
        connection = await asyncpg.connect(url)
    await connection.close()
    return measured.round_trips


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(("atomic", "call_round_trips"), [(False, 2), (True, 4)])
async def test_the_first_call_of_a_new_engine_costs_the_connection_plus_the_call(
    request: pytest.FixtureRequest,
    todo_store_settings: Settings,
    path: str,
    atomic: bool,
    call_round_trips: int,
) -> None:
    target = _target(request, path, todo_store_settings)
    async with RoundTripProxy.in_front_of(target) as proxy:
        url = proxy.url_for(target)
        login = await _connection_round_trips(proxy, url)
        settings = settings_for(url).model_copy(update={"pool_size": 1, "max_overflow": 0})
        async with TodoStore(settings) as store:
            with proxy.counting() as measured:
                async with store.session(atomic=atomic) as session:
                    await TaskRepo(session).count_for("u_cold_start")
    assert measured.connections == 1
    assert measured.round_trips == login + FIRST_CONNECTION_CHECK + call_round_trips, measured
    # Exactly the call: one prepare (Parse/Describe) and one execute, BEGIN/COMMIT if atomic;
    # besides, only the check's simple query.
    assert measured.messages["Parse"] == 2, measured
    assert measured.messages["Describe"] == 1, measured
    assert measured.messages["Query"] == FIRST_CONNECTION_CHECK + (2 if atomic else 0), measured


async def test_nothing_sqlalchemy_would_have_asked_is_lost(todo_store_settings: Settings) -> None:
    url = make_url(todo_store_settings.database_url.get_secret_value())
    asked = create_async_engine(url.set(drivername="postgresql+asyncpg"))  # asks at connect
    try:
        async with asked.connect():
            pass
        async with TodoStore(todo_store_settings) as store:
            await store.ping()
            answered = store.engine.dialect
            assert answered.server_version_info == asked.dialect.server_version_info
            escapes = "_backslash_escapes"  # the rule literal strings are rendered with
            assert getattr(answered, escapes) == getattr(asked.dialect, escapes)
            assert answered.supports_identity_columns == asked.dialect.supports_identity_columns
            assert answered.default_schema_name is None  # not asked; see engine.py
    finally:
        await asked.dispose()


@pytest_asyncio.fixture(loop_scope="session")
async def repeatable_read_database(
    todo_store_server: ProvisionedServer,
) -> AsyncIterator[str]:
    """An empty database whose default isolation level is REPEATABLE READ."""
    name = f"todo_store_rr_{secrets.token_hex(4)}"
    url = await create_database(todo_store_server.admin_url, name)
    admin = await asyncpg.connect(todo_store_server.admin_url)
    try:
        await admin.execute(
            f"ALTER DATABASE {name} SET default_transaction_isolation = 'repeatable read'"
        )
    finally:
        await admin.close()
    yield url
    await drop_database(todo_store_server.admin_url, name)


async def test_a_transaction_runs_at_the_servers_default_level_after_a_non_atomic_unit(
    repeatable_read_database: str,
) -> None:
    settings = settings_for(repeatable_read_database).model_copy(
        update={"pool_size": 1, "max_overflow": 0}
    )
    level = text("SELECT current_setting('transaction_isolation')")
    async with TodoStore(settings) as store:
        for atomic in (False, True, False, True):  # one connection, used both ways in turn
            async with store.session(atomic=atomic) as session:
                assert (await session.execute(level)).scalar_one() == "repeatable read"


class _GatedProxy(RoundTripProxy):
    """Forwards no connection until `gate` connections are waiting (or the gate times out)."""

    def __init__(self, host: str, port: int, gate: int) -> None:
        super().__init__(host, port)
        self._waiting = 0
        self._all_here = asyncio.Event()
        self._gate = gate

    async def _open_target(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        self._waiting += 1
        if self._waiting >= self._gate:
            self._all_here.set()
        await asyncio.wait_for(self._all_here.wait(), GATE_TIMEOUT_S)
        return await super()._open_target()


async def test_warm_opens_n_connections_at_once(todo_store_settings: Settings) -> None:
    target = todo_store_settings.database_url.get_secret_value()
    server = RoundTripProxy.in_front_of(target)  # where the server is (host, or socket dir)
    n = 3
    async with _GatedProxy(server.target_host, server.target_port, gate=n) as proxy:
        settings = settings_for(proxy.url_for(target)).model_copy(
            update={"pool_size": n, "max_overflow": 0, "connect_timeout": 2 * GATE_TIMEOUT_S}
        )
        async with TodoStore(settings) as store:
            await store.warm(n)
            assert proxy.open_connections == n
            with proxy.counting() as measured:

                async def unit() -> None:
                    async with store.session(atomic=False) as session:
                        await TaskRepo(session).count_for("u_warm")
                        await asyncio.sleep(0)  # all n units hold a connection at once

                await asyncio.gather(*(unit() for _ in range(n)))
            assert measured.connections == 0  # the first requests found them open


async def test_warm_refuses_a_count_outside_the_pool(todo_store_settings: Settings) -> None:
    async with TodoStore(todo_store_settings) as store:
        for n in (0, todo_store_settings.pool_size + 1):
            with pytest.raises(ValueError, match=r"^n: expected 1 to POOL_SIZE"):
                await store.warm(n)
