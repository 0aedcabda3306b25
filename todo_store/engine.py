"""Engine, sessions and `TodoStore`, tuned for a transaction-mode pooler (Neon, PgBouncer).

Guarantees, whatever pooler sits in front of PostgreSQL:
- no named prepared statement outlives its transaction (unless `statement_cache` is on);
- round trips with caching off: an atomic unit of work of n statements costs 2n + 2 (BEGIN,
  prepare + execute per statement, COMMIT); a non-atomic one (`session(atomic=False)`) 2n;
- a connection that died while pooled (a Neon compute suspend or a pooler restart kills them
  all) is replaced at checkout, before any caller code runs, without sending anything;
- database errors reach callers as `todo_store.errors` exceptions; `CancelledError`,
  `KeyboardInterrupt` and `SystemExit` pass through unchanged, and the connection they
  interrupted is discarded, never returned to the pool in an unknown state.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import select
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import asyncpg
from sqlalchemy import event, exc, text
from sqlalchemy.engine import URL, Connection, Dialect, ExceptionContext
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.pool import ConnectionPoolEntry, PoolProxiedConnection

from todo_store.connect_errors import explain_connect_failure
from todo_store.errors import (
    CommitOutcomeUnknown,
    DatabaseUnavailable,
    TodoStoreError,
    TransactionConflict,
    is_connection_loss,
    translate,
)
from todo_store.replicas import (
    PositionReportingConnection,
    PositionReportingSession,
    ReplicaSet,
    open_connections,
    ran_on_replica,
    track_writes,
    write_unit,
)
from todo_store.settings import Settings
from todo_store.urls import mask, to_asyncpg

log = logging.getLogger("todo_store")

T = TypeVar("T")

_DISCONNECT_SQLSTATE_PREFIXES = ("08", "57P")
_TLS_INTENT = "todo_store_tls_intent"
_COMMITTING = "todo_store.committing"  # set in Connection.info while a COMMIT is in flight
_RETRY_FIRST_DELAY_S = 0.02
_RETRY_MAX_DELAY_S = 1.0


def _unnamed_statement() -> str:
    # The empty name is PostgreSQL's unnamed statement: replaced by the next Parse, never
    # needs a Close, and lives only inside the transaction that a pooler pins to one server.
    return ""


def connect_args_for(settings: Settings) -> tuple[URL, dict[str, Any]]:
    """The asyncpg URL and connect arguments `create_engine` uses (also used by migrations)."""
    target = to_asyncpg(settings.database_url.get_secret_value())
    args: dict[str, Any] = {"timeout": settings.connect_timeout, **target.connect_args}
    # Not for asyncpg: `_connect` takes it out again, to say why a certificate was verified.
    args[_TLS_INTENT] = target.tls
    # Client-side timeout: asyncpg cancels the statement on the server when it expires. A
    # `statement_timeout` startup parameter would be refused by PgBouncer.
    args["command_timeout"] = settings.statement_timeout
    # Reports a writing unit's commit position in the COMMIT's round trip (consistency tokens).
    args["connection_class"] = PositionReportingConnection
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
    add_store_events(engine)
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


def add_store_events(engine: AsyncEngine) -> None:
    """Give `engine` the connect, checkout, commit and error handling of this module."""
    sync_engine = engine.sync_engine
    event.listen(sync_engine, "do_connect", _connect)
    if _SOCKET_CHECK_AVAILABLE:
        event.listen(sync_engine, "checkout", _reject_dead_connection)
    event.listen(sync_engine, "begin", _forget_commit)
    event.listen(sync_engine, "commit", _mark_commit)
    event.listen(sync_engine, "handle_error", _raise_typed_error)


def create_sessionmaker(engine: AsyncEngine, **options: Any) -> async_sessionmaker[AsyncSession]:
    """Sessions whose objects stay readable after commit (nothing lazy-loads later)."""
    return async_sessionmaker(engine, expire_on_commit=False, autoflush=False, **options)


# -- first connect: no questions the server already answered -------------------------------

_VERSION_NUMBERS = re.compile(r"(\d+)(?:\.(\d+))?(?:\.(\d+))?")


def answer_first_connect_from_startup(dialect: Dialect) -> None:
    """Make the engine's first connection cost no round trip beyond the login itself.

    SQLAlchemy's first connect asks the server four questions (`select version()`,
    `select current_schema()`, `show transaction isolation level`, `show
    standard_conforming_strings`) in a transaction it rolls back: 10 round trips with
    caching off. Here they are answered without asking:

    - the server version and `standard_conforming_strings` come from the parameters every
      server (and PgBouncer) reports at login; if one is missing, the question is asked;
    - the isolation level is never forced: a transaction begins with a plain BEGIN (the
      server's default level) and a connection used with another level goes back to that,
      instead of to a level read once from the first connection;
    - the default schema is not asked (`dialect.default_schema_name` stays None): nothing in
      the package relies on it; reflection and Alembic (migrations, `doctor`, `alembic
      check`) run on the migrations' engine, which asks.
    """
    ask_version: Callable[[Connection], Any] = dialect._get_server_version_info
    ask_escapes = dialect._set_backslash_escapes  # type: ignore[attr-defined]

    def server_version(connection: Connection) -> tuple[int, ...]:
        reported = _reported(connection, "server_version")
        found = _VERSION_NUMBERS.match(reported or "")
        if found is None:
            return tuple(ask_version(connection))
        return tuple(int(number) for number in found.groups() if number is not None)

    def backslash_escapes(connection: Connection) -> None:
        reported = _reported(connection, "standard_conforming_strings")
        if reported is None:
            ask_escapes(connection)
        else:
            dialect._backslash_escapes = reported == "off"  # type: ignore[attr-defined]

    def server_default_level(_dbapi_connection: Any) -> str:
        return "READ COMMITTED"  # PostgreSQL's default; never sent (see reset below)

    reset_to_level = dialect.reset_isolation_level

    def reset_to_server_default(dbapi_connection: Any) -> None:
        if dialect._on_connect_isolation_level is not None:
            reset_to_level(dbapi_connection)  # an engine made with isolation_level=...
        else:
            dbapi_connection.set_isolation_level(None)  # plain BEGIN: the server's default

    answers: dict[str, Callable[..., Any]] = {
        "_get_server_version_info": server_version,
        "_set_backslash_escapes": backslash_escapes,
        "_get_default_schema_name": lambda _connection: None,
        "get_default_isolation_level": server_default_level,
        "reset_isolation_level": reset_to_server_default,
    }
    for name, answer in answers.items():
        setattr(dialect, name, answer)


def _reported(connection: Connection, name: str) -> str | None:
    """A parameter the server reported at login (ParameterStatus), if it did."""
    driver = connection.connection.driver_connection
    reported = getattr(driver.get_settings(), name, None) if driver is not None else None
    return reported if isinstance(reported, str) else None


# -- connect --------------------------------------------------------------------------------


def _connect(dialect: Any, _record: Any, cargs: Any, cparams: dict[str, Any]) -> Any:
    """Open a connection; a failure becomes `ConnectionRejected` (no retry can fix it) or
    `DatabaseUnavailable` (transient), with the server's reason and what to do.

    SQLAlchemy passes connect errors through untranslated, so `handle_error` never sees them.
    """
    tls = cparams.pop(_TLS_INTENT, None)
    try:
        return dialect.loaded_dbapi.connect(*cargs, **cparams)
    except Exception as error:
        explained = explain_connect_failure(error, tls=tls, password=cparams.get("password"))
        if explained is None:
            raise
        raise explained from error


# -- checkout: dead connections are found without a round trip -----------------------------

# The check reads asyncpg's transport, a private attribute: verified once, here. Without it
# the check is skipped (documented fallback): a connection that died while pooled then fails
# its first statement with `DatabaseUnavailable`, and the pool replaces every older one.
_SOCKET_CHECK_AVAILABLE = hasattr(asyncpg.Connection, "_transport")
if not _SOCKET_CHECK_AVAILABLE:  # pragma: no cover - depends on the installed asyncpg
    log.warning(
        "this asyncpg has no Connection._transport: dead pooled connections are found at "
        "their first statement instead of at checkout"
    )


def _reject_dead_connection(
    dbapi_connection: Any, _record: ConnectionPoolEntry, _proxy: PoolProxiedConnection
) -> None:
    """Replace a pooled connection the server (or pooler) has closed, sending nothing.

    A pooler restart or a compute suspend closes every connection: the FIN (often after a
    FATAL message) is already in the kernel's buffer, though asyncpg has not read it yet.
    An idle connection never has anything to read, so readable means closed or closing.
    `InvalidatePoolError` makes the pool retry with a fresh connection and mark every older
    one stale.
    """
    driver = dbapi_connection.driver_connection
    if driver.is_closed() or _has_unread_input(driver):
        raise exc.InvalidatePoolError("the server closed this pooled connection")


def _has_unread_input(driver: asyncpg.Connection) -> bool:
    transport = getattr(driver, "_transport", None)  # private: verified at import, see above
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


# -- commit tracking: an interrupted COMMIT has an unknown outcome ---------------------------


def _mark_commit(conn: Connection) -> None:
    conn.info[_COMMITTING] = True


def _forget_commit(conn: Connection) -> None:
    conn.info.pop(_COMMITTING, None)


# -- errors ---------------------------------------------------------------------------------


def _driver_error(error: BaseException) -> BaseException:
    """The asyncpg exception behind SQLAlchemy's adapter error (`orig` in 2.1, the cause
    in 2.0), or the error itself."""
    return getattr(error, "orig", None) or error.__cause__ or error


def _is_disconnect(error: BaseException) -> bool:
    driver_error = _driver_error(error)
    if is_connection_loss(error) or is_connection_loss(driver_error):
        return True
    if isinstance(driver_error, asyncpg.exceptions.ConnectionDoesNotExistError):
        return True
    sqlstate = getattr(error, "sqlstate", None) or getattr(driver_error, "sqlstate", None) or ""
    return sqlstate.startswith(_DISCONNECT_SQLSTATE_PREFIXES)


def _outcome_unknown(context: ExceptionContext) -> bool:
    """True when the failed operation may have committed: a COMMIT, or a write that commits
    by itself (autocommit)."""
    conn = context.connection
    if conn is None:
        return False
    if conn.info.get(_COMMITTING):
        return True
    execution = context.execution_context
    # The execution option, not get_isolation_level(): that would query the server.
    autocommit = conn.get_execution_options().get("isolation_level") == "AUTOCOMMIT"
    if execution is None or not autocommit:
        return False
    compiled = execution.compiled
    is_read = compiled is not None and bool(getattr(compiled.statement, "is_select", False))
    return not is_read


def _raise_typed_error(context: ExceptionContext) -> None:
    """Replace every driver error with the package's own (see `errors.translate`)."""
    error = context.original_exception
    if not isinstance(error, Exception):
        # CancelledError, KeyboardInterrupt, SystemExit: never converted. SQLAlchemy treats
        # them as a disconnect, so the interrupted connection is discarded, not pooled.
        return
    if isinstance(error, TodoStoreError):
        return
    timed_out = isinstance(error, TimeoutError) or isinstance(_driver_error(error), TimeoutError)
    if timed_out or context.is_disconnect or _is_disconnect(error):
        unknown = _outcome_unknown(context)
        # A timed-out or broken connection is in an unknown state: discard it. Only a real
        # loss says anything about the other pooled connections (a restart kills them all).
        context.is_disconnect = True
        context.invalidate_pool_on_disconnect = not timed_out
        if unknown:
            raise CommitOutcomeUnknown(
                "the connection "
                + ("timed out" if timed_out else "was lost")
                + " while a write was committing: it may or may not have been applied"
            )
        if timed_out:
            raise DatabaseUnavailable(
                "timed out waiting for the database (statement timeout, or a busy pooler); "
                "nothing was committed"
            )
        raise DatabaseUnavailable(f"the database connection was lost: {_reason(error)}")
    sqlstate = getattr(error, "sqlstate", None)
    if sqlstate is None:
        return  # not a server error (e.g. a programming error in SQLAlchemy usage)
    driver_error = _driver_error(error)
    raise translate(sqlstate, constraint=getattr(driver_error, "constraint_name", None))


def _reason(error: BaseException) -> str:
    """A short, parameter-free reason: the driver error's type and server message."""
    driver_error = _driver_error(error)
    message = getattr(driver_error, "message", None) or ""
    name = type(driver_error).__name__
    return f"{name}: {message}" if message else name


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
        self.sessionmaker = create_sessionmaker(
            self.engine, sync_session_class=PositionReportingSession
        )
        # Same pool, other per-checkout settings: no BEGIN at all, or BEGIN READ ONLY.
        self._autocommit_engine = self.engine.execution_options(isolation_level="AUTOCOMMIT")
        self._non_atomic = create_sessionmaker(self._autocommit_engine)
        self._read_only = create_sessionmaker(
            self.engine.execution_options(postgresql_readonly=True)
        )
        self.replicas = ReplicaSet(
            self.settings,
            primary=self.engine,
            primary_read_only=self._read_only,
            engines=lambda settings: create_engine(settings, **engine_kwargs),
            sessions=create_sessionmaker,
        )

    @classmethod
    def from_env(cls) -> TodoStore:
        """Build from `DATABASE_URL` etc. in the environment or `.env`."""
        return cls(Settings())

    @asynccontextmanager
    async def session(
        self, *, atomic: bool = True, read_only: bool = False, after: str | None = None
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

        `read_only=True` with `DATABASE_URL_REPLICA` set: on a replica that is healthy and
        within `REPLICA_MAX_LAG`, else on the primary (see `todo_store.replicas`). `after=` a
        consistency token (`todo_store.consistency_token(session)` of an earlier unit): never
        a state older than that unit's commit. A malformed token raises `ValueError`, one
        from another database `ForeignConsistencyToken`, before any SQL is sent.
        """
        if read_only and not atomic:
            raise ValueError("read_only=True needs atomic=True (a READ ONLY transaction)")
        if after is not None and not read_only:
            raise ValueError("after= needs read_only=True (writes always go to the primary)")
        if not atomic:
            # No transaction to begin or commit: only ORM changes of the caller's own, if any,
            # are flushed (each statement commits by itself). Closing returns the connection.
            async with self._non_atomic() as session:
                yield session
                if session.new or session.dirty or session.deleted:
                    await session.flush()
            return
        if read_only:
            async with self.replicas.read_unit(after) as session:
                yield session
            return
        # Closing without a commit rolls back, so the block that raises leaves nothing.
        async with write_unit(self.sessionmaker, self.replicas.learn) as session:
            yield session

    async def run(
        self,
        work: Callable[[AsyncSession], Awaitable[T]],
        *,
        attempts: int = 3,
        read_only: bool = False,
        after: str | None = None,
    ) -> T:
        """Run `work(session)` in one atomic unit of work and return its result.

        On `TransactionConflict` (serialization failure, deadlock: nothing was committed) the
        whole unit of work runs again, up to `attempts` times in all, after a short random
        backoff. Nothing else is retried: not `DatabaseUnavailable`, never
        `CommitOutcomeUnknown` — except that a read-only unit (`read_only=True`, `after=` as
        for `session`) whose replica fails with `DatabaseUnavailable` runs again at once, on
        the primary or a healthy replica.
        """
        if attempts < 1:
            raise ValueError("attempts must be at least 1")
        delay = _RETRY_FIRST_DELAY_S
        for attempt in range(1, attempts + 1):
            on_replica = False
            try:
                async with self.session(read_only=read_only, after=after) as session:
                    on_replica = ran_on_replica(session)
                    return await work(session)
            except TransactionConflict:
                if attempt == attempts:
                    raise
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
        async with self._autocommit_engine.connect() as connection:
            await connection.execute(text("SELECT 1"))

    async def warm(self, n: int) -> None:
        """Open n connections at once, ahead of the first request (and n to each replica).

        Raises `ValueError` if n is not between 1 and POOL_SIZE (more would be closed again
        as soon as they are returned), and `DatabaseUnavailable` / `ConnectionRejected` when
        the primary cannot be reached. A replica that cannot is logged and skipped, as by
        reads.
        """
        if not 1 <= n <= self.settings.pool_size:
            raise ValueError(f"n: expected 1 to POOL_SIZE ({self.settings.pool_size}), got {n}")
        await asyncio.gather(open_connections(self.engine, n), self.replicas.warm(n))

    async def dispose(self) -> None:
        """Close every pooled connection (the replicas' too)."""
        await self.replicas.dispose()
        await self.engine.dispose()

    async def __aenter__(self) -> TodoStore:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.dispose()

    def __repr__(self) -> str:
        return f"TodoStore({mask(self.settings.database_url.get_secret_value())})"
