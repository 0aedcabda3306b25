"""Every failure path of the engine ends in the package's own error, with the reason.

Against real PostgreSQL and real PgBouncer (1.18 and 1.25): a pooler whose server is down, a
pool that is full, statements that time out or are cancelled by the server, writes in a
read-only unit, dead connections (one replaced per loss), connects that keep failing (bounded
attempts, then back as soon as the database is), and errors that carry no personal data.
Timings are measured in `benchmarks/failures.py`, not asserted here.
"""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from conftest import tracking_pgbouncer_binary
from sqlalchemy import event, text
from sqlalchemy.engine import make_url
from sqlalchemy.util import await_only

from tests.rigs.outage import Forwarder
from tests.rigs.proxy import RoundTripProxy
from todo_store import (
    CommitOutcomeUnknown,
    ConnectionRejected,
    DatabaseError,
    DatabaseUnavailable,
    EmailTaken,
    InvalidData,
    ReadOnlyViolation,
    Settings,
    TaskNotFound,
    TaskRepo,
    TodoStore,
    TodoStoreError,
    User,
    UserNotFound,
    UserRepo,
    resend,
)
from todo_store.connecting import CONNECT_BACKOFF_FIRST_S as _BACKOFF_FIRST_S
from todo_store.connecting import CONNECT_BACKOFF_MAX_S as _BACKOFF_MAX_S
from todo_store.testing.pgbouncer import PgBouncer
from todo_store.testing.plugin import settings_for, start_pgbouncer
from todo_store.testing.postgres import ProvisionedServer, server_from_url

POOLERS = [pytest.param(False, id="pgbouncer"), pytest.param(True, id="tracking-pgbouncer")]
POLL_STEPS = 500
POLL_STEP_S = 0.01


def _database(settings: Settings) -> str:
    return make_url(settings.database_url.get_secret_value()).database or ""


def _url(settings: Settings) -> str:
    return settings.database_url.get_secret_value()


def _pooler(server: ProvisionedServer, database: str, tracking: bool, **options: Any) -> PgBouncer:
    if tracking:
        options = {"binary": tracking_pgbouncer_binary(), **options}
    return start_pgbouncer(server, database, **options)


def _count_connects(store: TodoStore) -> list[int]:
    """A one-element list holding the number of connections the store's pool has opened."""
    opened = [0]

    @event.listens_for(store.engine.sync_engine, "connect")
    def connected(*_args: Any) -> None:
        opened[0] += 1

    return opened


async def _until(condition: Any, what: str) -> None:
    for _ in range(POLL_STEPS):
        if await condition():
            return
        await asyncio.sleep(POLL_STEP_S)
    raise AssertionError(f"not within {POLL_STEPS * POLL_STEP_S:.0f} s: {what}")


async def _fill_pool(store: TodoStore, size: int) -> list[int]:
    """Open `size` pooled connections at once; return their server pids."""
    barrier = asyncio.Barrier(size)

    async def hold() -> int:
        async with store.session() as session:
            pid = await session.scalar(text("SELECT pg_backend_pid()"))
            await barrier.wait()
            return int(pid)

    return list(await asyncio.gather(*(hold() for _ in range(size))))


async def _terminate(admin_url: str, pids: list[int]) -> None:
    """Kill these backends and wait (up to 5 s) until they have exited."""
    connection = await asyncpg.connect(admin_url)
    try:
        await connection.execute(
            "SELECT pg_terminate_backend(pid, 5000) FROM unnest($1::int[]) AS pid", pids
        )
    finally:
        await connection.close()


async def _run_units(store: TodoStore, n: int, *, atomic: bool = True) -> None:
    async def unit() -> None:
        async with store.session(atomic=atomic) as session:
            await session.execute(text("SELECT 1"))
            await asyncio.sleep(0)

    await asyncio.gather(*(unit() for _ in range(n)))


# --- a pooler whose server is down ----------------------------------------------------------


@pytest.fixture
def tcp_server(todo_store_server: ProvisionedServer) -> ProvisionedServer:
    """The test server, when clients reach it over TCP: TLS negotiation and the forwarder that
    takes the server down work on TCP only (an embedded server listens on a unix socket)."""
    if todo_store_server.is_unix_socket:
        pytest.skip("needs a test server reached over TCP (TODO_STORE_TEST_DATABASE_URL)")
    return todo_store_server


@pytest.fixture
async def downed_server(
    todo_store_settings: Settings, tcp_server: ProvisionedServer
) -> AsyncIterator[Forwarder]:
    """A path to the test server that can be taken down and brought back."""
    async with Forwarder.in_front_of(_url(todo_store_settings)) as forwarder:
        yield forwarder


@pytest.mark.parametrize("tracking", POOLERS)
async def test_fresh_engine_behind_a_pooler_whose_server_is_down(
    todo_store_settings: Settings, downed_server: Forwarder, tracking: bool
) -> None:
    """Before: `ResourceClosedError: This Connection is closed` after 32 s."""
    upstream = server_from_url(downed_server.url_for(_url(todo_store_settings)), "env")
    bouncer = _pooler(upstream, _database(todo_store_settings), tracking)
    try:
        probe = await asyncpg.connect(bouncer.url, statement_cache_size=0)
        await probe.execute("SELECT 1")  # the pooler has logged in to the server once
        await probe.close()
        downed_server.down()
        settings = settings_for(bouncer.url).model_copy(update={"connect_timeout": 0.5})
        async with TodoStore(settings) as store:
            with pytest.raises(DatabaseUnavailable) as first:
                await store.ping()
            with pytest.raises(DatabaseUnavailable) as second:
                await store.ping()
    finally:
        bouncer.stop()
    said = str(first.value)
    assert "first query got no answer within the connect timeout" in said or (
        "server login has been failing" in said
    ), said
    assert "not connecting yet" in str(second.value) or "server login" in str(second.value)


# --- the application's own pool -------------------------------------------------------------


def _events(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The operator events the `todo_store` logger recorded (`extra={"todo_store_event": …}`)."""
    return [
        getattr(record, "todo_store_event", "")
        for record in caplog.records
        if record.name == "todo_store"
    ]


async def test_exhausted_pool_is_database_unavailable(
    todo_store_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: `sqlalchemy.exc.TimeoutError` (neither a TodoStoreError nor TimeoutError)."""
    caplog.set_level(logging.INFO, logger="todo_store")
    one = {"pool_size": 1, "max_overflow": 0, "pool_timeout": 0.2}
    async with (
        TodoStore(todo_store_settings.model_copy(update=one)) as store,
        store.session() as held,
    ):
        await held.execute(text("SELECT 1"))
        with pytest.raises(DatabaseUnavailable) as raised:
            async with store.session(atomic=False) as session:
                await TaskRepo(session).count_for("u_nobody")
        with pytest.raises(DatabaseUnavailable):
            await store.ping()
    assert "all 1 of this process's database connections" in str(raised.value)
    assert "POOL_TIMEOUT" in str(raised.value)
    assert _events(caplog).count("pool_exhausted") == 2


# --- reads never have an unknown outcome ----------------------------------------------------


async def test_timed_out_reads_in_non_atomic_units_are_unavailable(
    todo_store_settings: Settings,
) -> None:
    """Before: `CommitOutcomeUnknown` for `text("SELECT ...")` and `ping()`."""
    quick = {"statement_timeout": 0.2, "pool_size": 1, "max_overflow": 0}
    async with TodoStore(todo_store_settings.model_copy(update=quick)) as store:
        with pytest.raises(DatabaseUnavailable) as raised:
            async with store.session(atomic=False) as session:
                await session.execute(text("SELECT pg_sleep(5)"))
        assert not isinstance(raised.value, CommitOutcomeUnknown)
        assert "timed out" in str(raised.value)


async def test_timed_out_ping_through_a_busy_pooler_is_unavailable(
    todo_store_server: ProvisionedServer, todo_store_settings: Settings
) -> None:
    bouncer = start_pgbouncer(todo_store_server, _database(todo_store_settings), pool_size=1)
    holder = await asyncpg.connect(bouncer.url, statement_cache_size=0)
    try:
        quick = settings_for(bouncer.url).model_copy(update={"statement_timeout": 0.3})
        async with TodoStore(quick) as store:
            await store.ping()
            transaction = holder.transaction()
            await transaction.start()
            await holder.execute("SELECT 1")  # the pooler's one server connection is taken
            with pytest.raises(DatabaseUnavailable) as raised:
                await store.ping()
            await transaction.rollback()
            await store.ping()  # and the store recovers
    finally:
        await holder.close()
        bouncer.stop()
    assert not isinstance(raised.value, CommitOutcomeUnknown)


# --- configuration errors are not "safe to retry" -------------------------------------------


async def test_tls_required_by_the_url_but_not_offered(
    todo_store_settings: Settings, tcp_server: ProvisionedServer
) -> None:
    """Before: `DatabaseUnavailable (rejected SSL upgrade — safe to retry)`."""
    url = make_url(_url(todo_store_settings)).update_query_dict({"sslmode": "require"})
    async with TodoStore(url.render_as_string(hide_password=False)) as store:
        with pytest.raises(ConnectionRejected) as raised:
            await store.ping()
    assert "rejected SSL upgrade" in raised.value.reason
    assert "retry" not in str(raised.value)


async def test_unknown_host_name_gives_no_retry_advice() -> None:
    async with TodoStore("postgresql://u:p@no-such-host.invalid/db?connect_timeout=5") as store:
        with pytest.raises(ConnectionRejected) as raised:
            await store.ping()
    assert "check the host name" in raised.value.advice
    assert "retry" not in str(raised.value)


# --- pool_pre_ping, if a user turns it on, reconnects ---------------------------------------


async def test_pool_pre_ping_reconnects(todo_store_settings: Settings) -> None:
    """Before: `DatabaseUnavailable (… InterfaceError)` from the ping of a dead connection."""
    small = todo_store_settings.model_copy(update={"pool_size": 2, "max_overflow": 0})
    async with TodoStore(small, pool_pre_ping=True) as store:
        pids = await _fill_pool(store, 2)
        await _terminate(_url(todo_store_settings), pids)
        async with store.session() as session:
            assert await session.scalar(text("SELECT 1")) == 1


# --- server-side errors --------------------------------------------------------------------


async def test_write_in_a_read_only_unit_is_read_only_violation(store: TodoStore) -> None:
    """Before: `DatabaseError (SQLSTATE 25006)`."""
    with pytest.raises(ReadOnlyViolation) as raised:
        async with store.session(read_only=True) as session:
            await TaskRepo(session).create("u_ro", title="never written")
    assert "the unit of work is read-only" in str(raised.value)
    assert isinstance(raised.value, TodoStoreError)
    assert not isinstance(raised.value, DatabaseError)


async def test_server_statement_timeout_is_unavailable(store: TodoStore) -> None:
    with pytest.raises(DatabaseUnavailable) as raised:  # noqa: PT012 - the unit is the subject
        async with store.session() as session:
            await session.execute(text("SET LOCAL statement_timeout = '50ms'"))
            await session.execute(text("SELECT pg_sleep(5)"))
    assert "statement cancelled" in str(raised.value)


async def test_pg_cancel_backend_is_unavailable(
    store: TodoStore, todo_store_settings: Settings
) -> None:
    admin = await asyncpg.connect(_url(todo_store_settings))
    marker = "cancel_me_57014"

    async def cancel_when_running() -> None:
        async def running() -> bool:
            return bool(
                await admin.fetchval(
                    # Only once it sleeps: a cancel that lands during Parse cancels nothing.
                    "SELECT pg_cancel_backend(pid) FROM pg_stat_activity "
                    "WHERE query LIKE $1 AND wait_event = 'PgSleep' AND pid <> pg_backend_pid()",
                    f"%{marker}%",
                )
            )

        await _until(running, "the statement to cancel is running")

    try:
        canceller = asyncio.create_task(cancel_when_running())
        with pytest.raises(DatabaseUnavailable) as raised:
            async with store.session() as session:
                await session.execute(text(f"SELECT pg_sleep(5) AS {marker}"))
        await canceller
    finally:
        await admin.close()
    assert "statement cancelled" in str(raised.value)


async def test_timed_out_statement_is_cancelled_on_the_server(
    todo_store_settings: Settings,
) -> None:
    """The bounded close after a timeout must not drop asyncpg's cancel request."""
    marker = "timed_out_57014"
    quick = {"statement_timeout": 0.2, "pool_size": 1, "max_overflow": 0}
    async with TodoStore(todo_store_settings.model_copy(update=quick)) as store:
        with pytest.raises(DatabaseUnavailable):
            async with store.session() as session:
                await session.execute(text(f"SELECT pg_sleep(30) AS {marker}"))
    admin = await asyncpg.connect(_url(todo_store_settings))
    try:

        async def gone() -> bool:
            return not await admin.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE query LIKE $1 AND state = 'active' "
                "AND pid <> pg_backend_pid()",
                f"%{marker}%",
            )

        await _until(gone, "the timed-out statement stops running on the server")
    finally:
        await admin.close()


# --- a caller's own timeout during COMMIT stays a timeout -----------------------------------


async def test_callers_timeout_during_commit_stays_a_timeout(
    todo_store_settings: Settings, new_user_id: str
) -> None:
    """The COMMIT reached the server: the row is there, yet the caller sees TimeoutError.
    An idempotent write (the caller's own key) tells the two cases apart on the next try."""
    target = _url(todo_store_settings)
    async with (
        RoundTripProxy.in_front_of(target, delay=0.2) as proxy,
        TodoStore(settings_for(proxy.url_for(target))) as store,
    ):
        await store.ping()
        with pytest.raises(TimeoutError):  # noqa: PT012 - the unit of work is the subject
            async with asyncio.timeout(None) as deadline:
                # The deadline passes as the COMMIT is sent: it expires while the reply is
                # still 0.2 s away.
                def expire(_conn: object) -> None:
                    deadline.reschedule(asyncio.get_running_loop().time())

                event.listen(store.engine.sync_engine, "commit", expire)
                async with store.session() as session:
                    await UserRepo(session).upsert(
                        new_user_id, email=f"{new_user_id}@example.com", name="T"
                    )
    async with TodoStore(todo_store_settings) as store:
        async with store.session() as session:
            user = await UserRepo(session).get(new_user_id)  # committed all the same
            assert user.id == new_user_id
            await UserRepo(session).upsert(  # running it again is harmless
                new_user_id, email=f"{new_user_id}@example.com", name="T"
            )
        async with store.session() as session:
            await UserRepo(session).delete(new_user_id)


# --- one loss replaces one connection -------------------------------------------------------


@pytest.mark.parametrize("atomic", [True, False], ids=["atomic", "non-atomic"])
async def test_one_killed_backend_replaces_one_connection(
    todo_store_settings: Settings, atomic: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: connects 4 -> 8 (the loss invalidated the whole pool)."""
    caplog.set_level(logging.INFO, logger="todo_store")
    four = todo_store_settings.model_copy(update={"pool_size": 4, "max_overflow": 0})
    async with TodoStore(four) as store:
        opened = _count_connects(store)
        pids = await _fill_pool(store, 4)
        assert opened[0] == 4
        await _terminate(_url(todo_store_settings), pids[:1])
        for _ in range(3):
            await _run_units(store, 4, atomic=atomic)
        assert opened[0] == 5
    assert _events(caplog).count("connection_replaced") == 1


async def test_query_wait_timeout_replaces_one_connection(
    todo_store_server: ProvisionedServer, todo_store_settings: Settings
) -> None:
    bouncer = start_pgbouncer(
        todo_store_server,
        _database(todo_store_settings),
        pool_size=1,
        settings={"query_wait_timeout": "1"},
    )
    holder = await asyncpg.connect(bouncer.url, statement_cache_size=0)
    try:
        four = settings_for(bouncer.url).model_copy(update={"pool_size": 4, "max_overflow": 0})
        async with TodoStore(four) as store:
            opened = _count_connects(store)
            for _ in range(4):
                await _run_units(store, 1)
            await _fill_pool_sequentially(store, 4)
            before = opened[0]
            transaction = holder.transaction()
            await transaction.start()
            await holder.execute("SELECT 1")
            with pytest.raises(DatabaseUnavailable) as raised:
                await store.ping()
            await transaction.rollback()
            await _fill_pool_sequentially(store, 4)
            assert opened[0] == before + 1
    finally:
        await holder.close()
        bouncer.stop()
    assert "query_wait_timeout" in str(raised.value)


async def _fill_pool_sequentially(store: TodoStore, size: int) -> None:
    """Check out `size` connections at once (through a pooler of one server connection, each
    holds no transaction while it waits)."""
    connections = [await store.engine.connect() for _ in range(size)]
    for connection in connections:
        await connection.close()


# --- connect storms -------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["direct", "pgbouncer"])
async def test_failing_connects_are_bounded_and_recover(
    todo_store_server: ProvisionedServer,
    todo_store_settings: Settings,
    downed_server: Forwarder,
    path: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Before: every failed call opened a login of its own (1,204 in 15 s through PgBouncer)."""
    caplog.set_level(logging.INFO, logger="todo_store")
    target = downed_server.url_for(_url(todo_store_settings))
    bouncer: PgBouncer | None = None
    if path == "pgbouncer":
        bouncer = start_pgbouncer(
            server_from_url(target, "env"),
            _database(todo_store_settings),
            settings={"server_login_retry": "1"},  # the pooler's own wait, kept short here
        )
        target = bouncer.url
    try:
        async with (
            Forwarder.in_front_of(target) as logins,
            TodoStore(settings_for(logins.url_for(target))) as store,
        ):
            await store.ping()
            downed_server.down()
            failures = []
            started = time.monotonic()
            for _ in range(50):
                with pytest.raises(DatabaseUnavailable) as raised:
                    await store.ping()
                failures.append(str(raised.value))
            attempts = logins.accepted - 1
            elapsed = time.monotonic() - started
            downed_server.up()

            async def back() -> bool:
                try:
                    await store.ping()
                except DatabaseUnavailable:
                    return False
                return True

            await _until(back, "a ping succeeds once the server is back")
    finally:
        if bouncer is not None:
            bouncer.stop()
    # Without the backoff every failed call opens a login (50); with it, no more than the
    # backoff's delays admit in the time the calls took (3 when they take under 0.15 s).
    allowed = _attempts_allowed(elapsed)
    assert attempts <= min(allowed, 10), f"{attempts} logins in {elapsed:.2f} s of 50 calls"
    assert any("next attempt in" in failure for failure in failures)
    assert "connect_failed" in _events(caplog)
    assert _events(caplog)[-1] == "connect_recovered"


def _attempts_allowed(elapsed: float) -> int:
    """The most connect attempts the backoff lets through in `elapsed` seconds: after the k-th
    failure the next attempt waits at least half of min(first delay * 2**(k-1), max delay)."""
    attempts, waited = 1, 0.0
    while True:
        wait = min(_BACKOFF_FIRST_S * 2 ** (attempts - 1), _BACKOFF_MAX_S) / 2
        if waited + wait > elapsed:
            return attempts
        waited += wait
        attempts += 1


# --- nothing personal -----------------------------------------------------------------------

EMAIL = "private.person@example.com"
TITLE = "Secret surgery appointment"
DESCRIPTION = "confidential notes"


def _shown(error: BaseException) -> str:
    return str(error) + repr(error) + "".join(traceback.format_exception(error))


@pytest.fixture
def records(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG)
    return caplog


async def test_no_personal_data_in_errors_or_logs(
    todo_store_settings: Settings, new_user_id: str, records: pytest.LogCaptureFixture
) -> None:
    """Before: EmailTaken's chain carried `DETAIL: Key (email)=(…)`, UserNotFound the email."""
    caught: list[BaseException] = []
    async with TodoStore(todo_store_settings, echo=True) as store:
        async with store.session() as session:
            await UserRepo(session).upsert(new_user_id, email=EMAIL, name="Private")
            task = await TaskRepo(session).create(new_user_id, title=TITLE, description=DESCRIPTION)
        try:
            with pytest.raises(EmailTaken) as taken:
                async with store.session() as session:
                    await UserRepo(session).upsert(f"{new_user_id}_2", email=EMAIL, name="Other")
            caught.append(taken.value)
            with pytest.raises(UserNotFound) as missing:
                async with store.session() as session:
                    await UserRepo(session).get_by_email("nobody." + EMAIL)
            caught.append(missing.value)
            with pytest.raises(TaskNotFound) as no_task:
                async with store.session() as session:
                    await TaskRepo(session).get(f"{new_user_id}_2", task.id)
            caught.append(no_task.value)
            with pytest.raises(InvalidData) as invalid:  # a CHECK: DETAIL quotes the whole row
                async with store.session() as session:
                    await session.execute(
                        text("INSERT INTO users (id, email, name) VALUES (:i, :e, :n)"),
                        {"i": f"{new_user_id}_3", "e": EMAIL.upper(), "n": TITLE},
                    )
            caught.append(invalid.value)
            with pytest.raises(ReadOnlyViolation) as read_only:
                async with store.session(read_only=True) as session:
                    await TaskRepo(session).create(new_user_id, title=TITLE)
            caught.append(read_only.value)
        finally:
            async with store.session() as session:
                await UserRepo(session).delete(new_user_id)
    logged = "".join(
        record.getMessage() + (record.exc_text or "") + repr(record.__dict__)
        for record in records.records
    )
    for error in caught:
        shown = _shown(error)
        for secret in (EMAIL, EMAIL.upper(), TITLE, DESCRIPTION, "nobody." + EMAIL):
            assert secret not in shown, f"{type(error).__name__} shows {secret!r}:\n{shown}"
    for secret in (EMAIL, EMAIL.upper(), TITLE, DESCRIPTION):
        assert secret not in logged


# --- non-atomic units flush the caller's own ORM changes ------------------------------------


async def test_non_atomic_unit_flushes_pending_orm_changes(
    store: TodoStore, new_user_id: str
) -> None:
    async with store.session(atomic=False) as session:
        session.add(User(id=new_user_id, email=f"{new_user_id}@example.com", name="Orm"))
    async with store.session() as session:
        assert (await UserRepo(session).get(new_user_id)).name == "Orm"
        await UserRepo(session).delete(new_user_id)


# --- a BEGIN that meets a closed connection is sent again, once -----------------------------

RESTART_CYCLES = 100


async def _terminate_now(admin: asyncpg.Connection, pids: list[int]) -> None:
    """Kill these backends without waiting for them to exit: their goodbye may still be on
    its way when the next unit of work starts (a restart under traffic)."""
    await admin.execute("SELECT pg_terminate_backend(pid) FROM unnest($1::int[]) AS pid", pids)


@pytest.mark.parametrize(
    ("atomic", "healthy_cost"), [(True, 4), (False, 2)], ids=["atomic", "non-atomic"]
)
@pytest.mark.parametrize("path", ["direct", "pgbouncer-1.25"])
async def test_a_first_round_trip_that_meets_a_closed_connection_is_sent_again(
    todo_store_settings: Settings,
    request: pytest.FixtureRequest,
    path: str,
    atomic: bool,
    healthy_cost: int,
) -> None:
    """Before: 31 to 58 of 100 units failed direct (`DatabaseUnavailable`, InternalClientError
    or ConnectionDoesNotExistError), about 68 through PgBouncer 1.25: the checkout check ran
    before the server's (or pooler's) goodbye arrived.

    The unit's first round trip (the BEGIN; without a transaction, the prepare) is sent again
    on a new connection; the healthy path costs what it always did (no check is added)."""
    if path == "direct":
        url = _url(todo_store_settings)
    else:
        url = request.getfixturevalue("tracking_pgbouncer").url
    failures: list[str] = []
    healthy_costs: set[int] = set()
    resent_executes: set[int] = set()
    async with RoundTripProxy.in_front_of(url) as proxy:
        four = settings_for(proxy.url_for(url)).model_copy(
            update={"pool_size": 4, "max_overflow": 0}
        )
        async with TodoStore(four) as store:
            resends = [0]
            resend.on_replacement(
                store.engine.sync_engine, lambda: resends.__setitem__(0, resends[0] + 1)
            )
            admin = await asyncpg.connect(_url(todo_store_settings))
            try:
                for _ in range(RESTART_CYCLES):
                    pids = await _fill_pool(store, 4)
                    await _terminate_now(admin, pids)
                    with proxy.counting() as unit:
                        try:
                            async with store.session(atomic=atomic) as session:
                                await session.execute(text("SELECT 1"))
                        except DatabaseUnavailable as error:
                            failures.append(str(error))
                            continue
                    if unit.connections == 0:
                        healthy_costs.add(unit.round_trips)
                    else:
                        resent_executes.add(unit.messages.get("Execute", 0))
            finally:
                await admin.close()
    # The race happened (else this test proves nothing); each resend opened one connection.
    assert resends[0] > 0
    if path == "direct":
        assert failures == []
    else:
        # Before: about 68 of 100 failed ("server conn crashed?"). The new client connection
        # can be given another of the pooler's dying server connections, and a round trip is
        # sent again only once: some may still fail (1 to 13 of 100 measured), after a resend.
        assert len(failures) < RESTART_CYCLES // 3, failures
    assert resent_executes == {1}  # a resent unit's statement ran once
    assert healthy_costs <= {healthy_cost}, healthy_costs


@pytest.mark.parametrize(
    ("atomic", "killed"),
    [(True, "after_begin"), (True, "during_write"), (False, "during_write")],
    ids=["atomic-after-begin", "atomic-during-write", "non-atomic-during-write"],
)
async def test_a_statement_that_may_have_run_is_never_sent_again(
    todo_store_settings: Settings, atomic: bool, killed: str
) -> None:
    """A write whose connection dies is reported, not repeated: sent again on a new connection
    it would commit (the sleep after it ends) and the table would hold a row."""
    url = _url(todo_store_settings)
    table = f"resend_probe_{uuid.uuid4().hex[:8]}"
    write = text(
        f"WITH written AS (INSERT INTO {table} VALUES (1) RETURNING n) "
        "SELECT pg_sleep(CASE WHEN :wait THEN 2 ELSE 0 END) FROM written"
    )
    admin = await asyncpg.connect(url)
    await admin.execute(f"CREATE TABLE {table} (n int)")
    try:
        async with TodoStore(todo_store_settings) as store:
            resends = [0]
            resend.on_replacement(
                store.engine.sync_engine, lambda: resends.__setitem__(0, resends[0] + 1)
            )
            opened = _count_connects(store)

            async def unit() -> None:
                async with store.session(atomic=atomic) as session:
                    if killed == "after_begin":
                        pid = await session.scalar(text("SELECT pg_backend_pid()"))
                        await _terminate(url, [int(pid)])
                    await session.execute(write, {"wait": killed == "during_write"})

            running = asyncio.create_task(unit())
            if killed == "during_write":

                async def writing() -> bool:
                    pids = await admin.fetch(
                        "SELECT pid FROM pg_stat_activity WHERE query LIKE $1 AND pid <> "
                        "pg_backend_pid()",
                        f"%INSERT INTO {table}%",
                    )
                    if pids:
                        await _terminate(url, [row["pid"] for row in pids])
                    return bool(pids)

                await _until(writing, "the write to be running")
            with pytest.raises((DatabaseUnavailable, CommitOutcomeUnknown)):
                await running
            assert opened[0] == 1
        assert resends[0] == 0
        assert await admin.fetchval(f"SELECT count(*) FROM {table}") == 0
    finally:
        await admin.execute(f"DROP TABLE {table}")
        await admin.close()


async def test_a_resent_begin_keeps_the_units_user_binding(
    todo_store_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """The connection is killed between checkout and the BEGIN (deterministically: from the
    engine's begin event); the BEGIN sent again on the new connection binds the same user."""
    caplog.set_level(logging.INFO, logger="todo_store")
    url = _url(todo_store_settings)
    async with TodoStore(todo_store_settings) as store:
        async with store.session() as session:  # one pooled connection
            await session.execute(text("SELECT 1"))
        opened = _count_connects(store)
        resends = [0]
        resend.on_replacement(
            store.engine.sync_engine, lambda: resends.__setitem__(0, resends[0] + 1)
        )
        killed: list[int] = []

        @event.listens_for(store.engine.sync_engine, "begin")
        def kill_before_the_begin(conn: Any) -> None:
            if not killed:
                driver = conn.connection.driver_connection
                killed.append(driver.get_server_pid())
                await_only(_terminate(url, killed))

        async with store.session(user_id="u_resent") as session:
            bound = await session.scalar(text("SELECT current_setting('todo_store.user_id')"))
            pid = await session.scalar(text("SELECT pg_backend_pid()"))
        async with store.session() as session:  # the slot's new connection is pooled
            again = await session.scalar(text("SELECT pg_backend_pid()"))
    assert bound == "u_resent"
    assert pid != killed[0]
    assert again == pid
    assert resends[0] == 1
    assert opened[0] == 0  # the pool slot kept its place: no pool-level reconnect
    assert _events(caplog).count("connection_replaced") == 1


async def test_a_later_begin_on_the_same_checkout_is_not_sent_again(
    todo_store_settings: Settings,
) -> None:
    """Only a checkout's first round trip is resent: a later transaction on the same
    connection may rely on what the connection did before (a SET, a temporary table)."""
    url = _url(todo_store_settings)
    async with TodoStore(todo_store_settings) as store:
        resends = [0]
        resend.on_replacement(
            store.engine.sync_engine, lambda: resends.__setitem__(0, resends[0] + 1)
        )
        async with store.engine.connect() as connection:
            pid = await connection.scalar(text("SELECT pg_backend_pid()"))
            await connection.commit()
            await _terminate(url, [int(pid)])
            with pytest.raises(DatabaseUnavailable):
                await connection.execute(text("SELECT 1"))
    assert resends[0] == 0
