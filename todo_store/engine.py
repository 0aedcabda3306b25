"""Engine, sessions and `TodoStore`, tuned for a transaction-mode pooler (Neon, PgBouncer).

Guarantees, whatever pooler sits in front of PostgreSQL:
- no named prepared statement outlives its transaction (unless `statement_cache` is on);
- round trips with caching off: an atomic unit of work of n statements costs 2n + 2 (BEGIN,
  prepare + execute per statement, COMMIT); a non-atomic one (`session(atomic=False)`) 2n;
  a unit bound to a user (`session(user_id=...)`) costs what it costs unbound when atomic
  (the binding rides on the BEGIN), and 4 per call when not (a bound transaction per call);
- a connection that died while pooled (a Neon compute suspend or a pooler restart kills them
  all) is replaced at checkout, before any caller code runs, without sending anything, and
  only that one: a loss never throws healthy connections away; a unit whose first round trip
  (one that runs nothing) still meets a closed connection sends it again on a new one
  (`todo_store.resend`);
- while connects fail, a process makes at most about one attempt per second (jittered
  backoff), and callers that need a connection meanwhile get `DatabaseUnavailable` at once;
- database errors reach callers as `todo_store.errors` exceptions; `CancelledError`,
  `KeyboardInterrupt` and `SystemExit` pass through unchanged, and the connection they
  interrupted is discarded, never returned to the pool in an unknown state.
"""

from __future__ import annotations

import asyncio
import logging
import random
import select
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import asyncpg
from sqlalchemy import event, exc, text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.pool import ConnectionPoolEntry, PoolProxiedConnection

from todo_store import resend
from todo_store.binding import (
    USER_OPTION,
    BoundConnection,
    CallByCallTransactions,
    add_binding_events,
    unit_arguments,
)
from todo_store.connecting import (
    TLS_INTENT,
    ConnectGate,
    Connector,
    answer_first_connect_from_startup,
)
from todo_store.errors import (
    DatabaseUnavailable,
    TransactionConflict,
)
from todo_store.pages import CURSOR_KEY_INFO, CursorKey, cursor_key_for
from todo_store.replicas import (
    Position,
    PositionReportingConnection,
    ReplicaSet,
    open_connections,
    ran_on_replica,
    track_writes,
)
from todo_store.resend import executemany_is_not_resent
from todo_store.settings import Settings
from todo_store.statement_errors import ErrorHook, forget_commit, mark_commit
from todo_store.units import atomic_unit
from todo_store.urls import mask, to_asyncpg

log = logging.getLogger("todo_store")

T = TypeVar("T")

_RETRY_FIRST_DELAY_S = 0.02
_RETRY_MAX_DELAY_S = 1.0


def _unnamed_statement() -> str:
    # The empty name is PostgreSQL's unnamed statement: replaced by the next Parse, never
    # needs a Close, and lives only inside the transaction that a pooler pins to one server.
    return ""


class StoreConnection(BoundConnection, PositionReportingConnection):
    """The store's asyncpg connection: a unit's user binding rides on its BEGIN, a writing
    unit's commit position on its COMMIT; every other query is sent unchanged."""


def connect_args_for(settings: Settings) -> tuple[URL, dict[str, Any]]:
    """The asyncpg URL and connect arguments `create_engine` uses (also used by migrations)."""
    target = to_asyncpg(settings.database_url.get_secret_value())
    args: dict[str, Any] = {"timeout": settings.connect_timeout, **target.connect_args}
    # Not for asyncpg: `_connect` takes it out again, to say why a certificate was verified.
    args[TLS_INTENT] = target.tls
    # Client-side timeout: asyncpg cancels the statement on the server when it expires. A
    # `statement_timeout` startup parameter would be refused by PgBouncer.
    args["command_timeout"] = settings.statement_timeout
    # Carries a unit's user binding in the BEGIN it sends anyway (see `binding`), and a
    # writing unit's commit position in its COMMIT (consistency tokens, see `replicas`).
    args["connection_class"] = StoreConnection
    if settings.statement_cache:
        args["statement_cache_size"] = settings.statement_cache_size
        args["prepared_statement_cache_size"] = settings.statement_cache_size
    else:
        args["statement_cache_size"] = 0
        args["prepared_statement_cache_size"] = 0
        args["prepared_statement_name_func"] = _unnamed_statement
    return target.url, args


def create_engine(settings: Settings, **engine_kwargs: Any) -> AsyncEngine:
    """An `AsyncEngine` safe behind any transaction-mode pooler; see the module docstring."""
    url, connect_args = connect_args_for(settings)
    options: dict[str, Any] = {
        "connect_args": connect_args,
        "pool_size": settings.pool_size,
        "max_overflow": settings.max_overflow,
        "pool_timeout": settings.pool_timeout,
        "pool_recycle": settings.pool_recycle,
        "pool_pre_ping": False,  # replaced by the socket check at checkout, at no cost
        "hide_parameters": True,  # parameters (emails, titles) stay out of logs and errors
        "logging_name": _LOGGING_NAME,
    }
    options.update(engine_kwargs)
    engine = create_async_engine(url, **options)
    add_store_events(
        engine,
        first_connect_timeout=settings.connect_timeout,
        statement_timeout=settings.statement_timeout,
    )
    answer_first_connect_from_startup(engine.sync_engine.dialect)
    return engine


class _NoRowLogging(logging.Filter):
    """Drops SQLAlchemy's `Row (...)` debug lines: rows hold the same emails and titles that
    `hide_parameters` keeps out of the statement lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg != "Row %r"


# With echo=True SQLAlchemy logs to "sqlalchemy.engine.Engine.<logging_name>": the filter sits
# on that logger only, so engines that are not the store's are untouched.
_LOGGING_NAME = "todo_store"
logging.getLogger(f"sqlalchemy.engine.Engine.{_LOGGING_NAME}").addFilter(_NoRowLogging())


def add_store_events(
    engine: AsyncEngine, *, first_connect_timeout: float = 10.0, statement_timeout: float = 30.0
) -> None:
    """Give `engine` the connect, checkout, commit and error handling of this module.

    `first_connect_timeout` bounds the engine's first connection, SQLAlchemy's own first
    queries included (through a pooler, they are what waits for the server's login).
    """
    sync_engine = engine.sync_engine
    gate = ConnectGate()
    event.listen(sync_engine, "do_connect", Connector(gate, first_connect_timeout, sync_engine))
    event.listen(sync_engine, "checkout", _reject_dead_connection)
    event.listen(sync_engine, "before_cursor_execute", executemany_is_not_resent, retval=True)
    event.listen(sync_engine, "checkin", gate.database_answered)
    event.listen(sync_engine, "begin", forget_commit)
    event.listen(sync_engine, "commit", mark_commit)
    # A timed-out connection gets this long to close gracefully (its cancel request answered):
    # 1% of the statement timeout, at least 20 ms, at most 100 ms.
    close_budget = min(max(statement_timeout * 0.01, 0.02), 0.1)
    event.listen(sync_engine, "handle_error", ErrorHook(gate, close_budget))
    add_binding_events(engine)


def create_sessionmaker(
    engine: AsyncEngine, *, cursor_key: CursorKey | None = None, **options: Any
) -> async_sessionmaker[AsyncSession]:
    """Sessions whose objects stay readable after commit (nothing lazy-loads later).

    `cursor_key` goes in each session's `info`, where `TaskRepo.page` finds it; `options`
    go to `async_sessionmaker` (e.g. `sync_session_class`).
    """
    info = {} if cursor_key is None else {CURSOR_KEY_INFO: cursor_key}
    return async_sessionmaker(engine, expire_on_commit=False, autoflush=False, info=info, **options)


def _keyed(engine: AsyncEngine, key: CursorKey) -> AsyncEngine:
    """`engine`, its connections holding the cursor key (a replica's, like the primary's)."""
    _hand_cursor_key(engine, key)
    return engine


def _hand_cursor_key(engine: AsyncEngine, key: CursorKey) -> None:
    """Put `key` in every connection's `info`: `TaskRepo(connection)` finds it there."""

    def on_connect(_dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
        record.info[CURSOR_KEY_INFO] = key

    event.listen(engine.sync_engine, "connect", on_connect)


# -- checkout: dead connections are found without a round trip -----------------------------


def _reject_dead_connection(
    dbapi_connection: Any, _record: ConnectionPoolEntry, _proxy: PoolProxiedConnection
) -> None:
    """Replace a pooled connection the server (or pooler) has closed, sending nothing.

    A pooler restart or a compute suspend closes every connection: the FIN (often after a
    FATAL message) is already in the kernel's buffer, though asyncpg has not read it yet.
    An idle connection never has anything to read, so readable means closed or closing.
    `DisconnectionError` makes the pool discard this one connection and retry with the next
    (or a new one); the other pooled connections are each checked the same way when their
    turn comes, so a healthy one is never thrown away.
    """
    driver = dbapi_connection.driver_connection
    if driver.is_closed() or _has_unread_input(driver):
        log.info(
            "a pooled database connection was closed by the server; replacing it",
            extra={"todo_store_event": "connection_replaced", "found": "checkout"},
        )
        raise exc.DisconnectionError("the server closed this pooled connection")
    # Its goodbye may still be on the way: the unit's first round trip, if it can have
    # executed nothing, is sent again on a new connection when it meets a closed one.
    resend.checked_out(driver)


def _has_unread_input(driver: asyncpg.Connection) -> bool:
    """Whether the socket has bytes asyncpg has not read. Reads asyncpg's private transport;
    where an asyncpg lacks it, only the public `is_closed()` check above remains."""
    transport = getattr(driver, "_transport", None)
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None:
        return False
    fd = sock.fileno()
    if fd < 0:
        return True
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(fd, select.POLLIN | select.POLLPRI)
        return bool(poller.poll(0))
    readable, _, _ = select.select([fd], [], [], 0)  # pragma: no cover - Windows
    return bool(readable)


# -- the store -------------------------------------------------------------------------------


class TodoStore:
    """The package's entry point: one engine, and units of work on it.

    ```python
    store = TodoStore.from_env()
    async with store.session() as session:
        task = await TaskRepo(session).create("u_1", title="Buy milk")
    ```
    """

    def __init__(self, settings_or_url: Settings | str, **engine_kwargs: Any) -> None:
        if isinstance(settings_or_url, Settings):
            self.settings = settings_or_url
        else:
            self.settings = Settings(database_url=settings_or_url)
        ReplicaSet.validate(self.settings)
        self.engine = create_engine(self.settings, **engine_kwargs)
        track_writes(self.engine)
        key = cursor_key_for(self.settings.cursor_secret, self.settings.better_auth_secret)
        _hand_cursor_key(self.engine, key)
        self.sessionmaker = create_sessionmaker(self.engine, cursor_key=key)
        # Same pool, other per-checkout settings: no BEGIN at all, or BEGIN READ ONLY.
        self._autocommit_engine = self.engine.execution_options(isolation_level="AUTOCOMMIT")
        self._non_atomic = create_sessionmaker(self._autocommit_engine, cursor_key=key)
        self._read_only_engine = self.engine.execution_options(postgresql_readonly=True)
        self._read_only = create_sessionmaker(self._read_only_engine, cursor_key=key)
        self.read_router = ReplicaSet(
            self.settings,
            primary=self.engine,
            primary_read_only=self._read_only,
            engines=lambda settings: _keyed(create_engine(settings, **engine_kwargs), key),
            sessions=lambda engine: create_sessionmaker(engine, cursor_key=key),
        )
        # Each with its `engine` (instrumentation finds the engines a store holds this way).
        self.replicas = self.read_router.replicas

    def _unit_info(self) -> dict[Any, Any]:
        """A new unit's `session.info`: what every session of this store carries (the key
        that seals page cursors)."""
        return dict(self.sessionmaker.kw.get("info") or {})

    def _learn(self, position: Position) -> None:
        self.read_router.learn(position)

    @classmethod
    def from_env(cls) -> TodoStore:
        """Build from `DATABASE_URL` etc. in the environment or `.env`."""
        return cls(Settings())

    @asynccontextmanager
    async def session(
        self,
        *,
        atomic: bool = True,
        read_only: bool = False,
        user_id: str | None = None,
        after: str | None = None,
    ) -> AsyncIterator[AsyncSession]:
        """A unit of work.

        `atomic=True` (default): one transaction, committed when the block succeeds, rolled
        back when it raises. After a database error inside the block the transaction is
        aborted; let the error leave the block, or use `session.begin_nested()` around a call
        whose failure you want to survive. `read_only=True` makes it a READ ONLY transaction.

        `atomic=False`: no transaction; every statement commits by itself, so each
        repository call is atomic on its own and costs half the round trips. A failed call
        leaves the session usable. Use it when the block makes one call, or calls that need
        not succeed together.

        `user_id`: the unit is bound to that user in the database (row-level security): its
        statements see and change only that user's rows, whatever their WHERE clause; at no
        extra round trip (the binding rides on the BEGIN). The binding needs a transaction,
        so with `atomic=False` every call is a bound transaction of its own (committed at
        once; 4 round trips per call instead of 2).

        Raises `ValueError` naming the argument (before anything is sent) for `read_only`
        without `atomic`, or an invalid `user_id`.

        `read_only=True` with `DATABASE_URL_REPLICA` set (and no `user_id`): on a replica that
        is healthy and within `REPLICA_MAX_LAG`, else on the primary (see `replicas`). `after=`
        a consistency token (`todo_store.consistency_token(session)` of an earlier unit): never
        a state older than that unit's commit. A malformed token raises `ValueError`, one from
        another database `ForeignConsistencyToken`, before any SQL is sent.
        """
        bound = unit_arguments(atomic=atomic, read_only=read_only, user_id=user_id)
        if after is not None and not read_only:
            raise ValueError("after= needs read_only=True (writes always go to the primary)")
        try:
            if bound is not None:
                async with self._bound_unit(bound, atomic=atomic, read_only=read_only) as session:
                    yield session
                return
            if not atomic:
                # No transaction to begin or commit: only ORM changes of the caller's own, if
                # any, are flushed (each statement commits by itself). Closing returns the
                # connection.
                async with self._non_atomic() as session:
                    yield session
                    if session.new or session.dirty or session.deleted:
                        await session.flush()
                return
            if read_only:
                async with self.read_router.read_unit(after) as session:
                    yield session
                return
            async with atomic_unit(self.engine, info=self._unit_info(), learn=self._learn) as unit:
                yield unit
        except exc.TimeoutError:  # only the pool raises SQLAlchemy's TimeoutError
            raise self._pool_exhausted() from None

    @asynccontextmanager
    async def _bound_unit(
        self, user_id: str, *, atomic: bool, read_only: bool
    ) -> AsyncIterator[AsyncSession]:
        engine = self._read_only_engine if read_only else self.engine
        bind = engine.execution_options(**{USER_OPTION: user_id})
        info = self._unit_info()
        if atomic and not read_only:
            async with atomic_unit(bind, info=info, learn=self._learn) as unit:
                yield unit
            return
        session_class = AsyncSession if atomic else CallByCallTransactions
        async with session_class(
            bind=bind, expire_on_commit=False, autoflush=False, info=info
        ) as session:
            yield session
            if atomic or session.new or session.dirty or session.deleted:
                await session.commit()

    async def run(
        self,
        work: Callable[[AsyncSession], Awaitable[T]],
        *,
        attempts: int = 3,
        user_id: str | None = None,
        read_only: bool = False,
        after: str | None = None,
    ) -> T:
        """Run `work(session)` in one atomic unit of work and return its result.

        On `TransactionConflict` (serialization failure, deadlock: nothing was committed) the
        whole unit of work runs again, up to `attempts` times in all, after a short random
        backoff. Nothing else is retried: not `DatabaseUnavailable`, never
        `CommitOutcomeUnknown` — except that a read-only unit (`read_only=True`, `after=` as
        for `session`) whose replica fails with `DatabaseUnavailable` runs again at once, on
        the primary or a healthy replica. `user_id` binds the unit to that user, as in
        `session()`.
        """
        if attempts < 1:
            raise ValueError("attempts must be at least 1")
        unit_arguments(atomic=True, read_only=False, user_id=user_id)
        delay = _RETRY_FIRST_DELAY_S
        for attempt in range(1, attempts + 1):
            on_replica = False
            try:
                async with self.session(
                    user_id=user_id, read_only=read_only, after=after
                ) as session:
                    on_replica = ran_on_replica(session)
                    return await work(session)
            except TransactionConflict as conflict:
                if attempt == attempts:
                    raise
                log.info(
                    "unit of work conflicted; running it again",
                    extra={
                        "todo_store_event": "unit_retried",
                        "attempt": attempt,
                        "attempts": attempts,
                        "sqlstate": conflict.sqlstate,
                    },
                )
            except DatabaseUnavailable:
                if not on_replica or attempt == attempts:
                    raise
                continue  # that replica is out of rotation now: no backoff needed
            # Jitter, not security: spreads the retries of the conflicting units apart.
            await asyncio.sleep(random.uniform(0, delay))  # noqa: S311
            delay = min(delay * 2, _RETRY_MAX_DELAY_S)
        raise AssertionError("unreachable")  # pragma: no cover

    async def ping(self) -> None:
        """Round-trip to the database; raises `DatabaseUnavailable` if it cannot."""
        try:
            async with self._autocommit_engine.connect() as connection:
                await connection.execute(text("SELECT 1"))
        except exc.TimeoutError:
            raise self._pool_exhausted() from None

    def _pool_exhausted(self) -> DatabaseUnavailable:
        settings = self.settings
        limit = settings.pool_size + settings.max_overflow
        log.warning(
            "connection pool exhausted",
            extra={
                "todo_store_event": "pool_exhausted",
                "connections": limit,
                "pool_timeout_s": settings.pool_timeout,
            },
        )
        return DatabaseUnavailable(
            f"all {limit} of this process's database connections (POOL_SIZE "
            f"{settings.pool_size} + MAX_OVERFLOW {settings.max_overflow}) were busy for "
            f"POOL_TIMEOUT ({settings.pool_timeout:g} s): the database was not asked; finish "
            "units of work sooner, or raise POOL_SIZE within the server's or pooler's limits"
        )

    async def warm(self, n: int) -> None:
        """Open n connections at once, ahead of the first request (and n to each replica).

        Raises `ValueError` if n is not between 1 and POOL_SIZE (more would be closed again
        as soon as they are returned), and `DatabaseUnavailable` / `ConnectionRejected` when
        the primary cannot be reached. A replica that cannot is logged and skipped, as by
        reads.
        """
        if not 1 <= n <= self.settings.pool_size:
            raise ValueError(f"n: expected 1 to POOL_SIZE ({self.settings.pool_size}), got {n}")
        await asyncio.gather(open_connections(self.engine, n), self.read_router.warm(n))

    async def dispose(self) -> None:
        """Close every pooled connection (the replicas' too)."""
        await self.read_router.dispose()
        await self.engine.dispose()

    async def __aenter__(self) -> TodoStore:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.dispose()

    def __repr__(self) -> str:
        return f"TodoStore({mask(self.settings.database_url.get_secret_value())})"
