"""Engine, sessions and `TodoStore`, tuned for a transaction-mode pooler (Neon, PgBouncer).

Guarantees, whatever pooler sits in front of PostgreSQL:
- no named prepared statement outlives its transaction (unless `statement_cache` is on);
- a unit of work of n statements costs 2n + 2 round trips: BEGIN, (prepare, execute) * n,
  COMMIT, with no extra ping;
- a connection that died while pooled (a Neon compute suspend kills them all) is replaced
  before any caller code runs, using the BEGIN the unit of work sends anyway;
- database errors reach callers as `todo_store.errors` exceptions.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import event, exc, text
from sqlalchemy.engine import URL, ExceptionContext
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.pool import ConnectionPoolEntry, PoolProxiedConnection

from todo_store.errors import DatabaseUnavailable, TodoStoreError, is_connection_loss, translate
from todo_store.settings import Settings
from todo_store.urls import mask, to_asyncpg

log = logging.getLogger("todo_store")

_DISCONNECT_SQLSTATE_PREFIXES = ("08", "57P")


def _unnamed_statement() -> str:
    # The empty name is PostgreSQL's unnamed statement: replaced by the next Parse, never
    # needs a Close, and lives only inside the transaction that a pooler pins to one server.
    return ""


def connect_args_for(settings: Settings) -> tuple[URL, dict[str, Any]]:
    """The asyncpg URL and connect arguments `create_engine` uses (also used by migrations)."""
    target = to_asyncpg(settings.database_url.get_secret_value())
    args: dict[str, Any] = {"timeout": settings.connect_timeout, **target.connect_args}
    # Client-side timeout: asyncpg cancels the statement on the server when it expires. A
    # `statement_timeout` startup parameter would be refused by PgBouncer.
    args["command_timeout"] = settings.statement_timeout
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
        "pool_pre_ping": False,  # replaced by the BEGIN-on-checkout below, at no extra cost
        "hide_parameters": True,  # parameters (emails, titles) stay out of logs and errors
    }
    options.update(engine_kwargs)
    engine = create_async_engine(url, **options)
    add_store_events(engine)
    return engine


def add_store_events(engine: AsyncEngine) -> None:
    """Give `engine` the connect, checkout and error handling described in this module."""
    event.listen(engine.sync_engine, "do_connect", _connect)
    event.listen(engine.sync_engine, "checkout", _begin_on_checkout)
    event.listen(engine.sync_engine, "handle_error", _raise_typed_error)


def create_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Sessions whose objects stay readable after commit (nothing lazy-loads later)."""
    return async_sessionmaker(engine, expire_on_commit=False, autoflush=False)


def _connect(dialect: Any, _record: Any, cargs: Any, cparams: Any) -> Any:
    """Open a connection; refused, unreachable or too slow becomes `DatabaseUnavailable`.

    SQLAlchemy passes OS-level connect errors through untranslated (they are not DBAPI
    errors), so `handle_error` never sees them.
    """
    try:
        return dialect.loaded_dbapi.connect(*cargs, **cparams)
    except (OSError, TimeoutError) as error:
        raise DatabaseUnavailable(f"could not connect: {type(error).__name__}") from error


def _begin_on_checkout(
    dbapi_connection: Any, record: ConnectionPoolEntry, proxy: PoolProxiedConnection
) -> None:
    """Send the transaction's BEGIN now; a dead connection fails here and is replaced.

    The asyncpg adapter would send the same BEGIN lazily before the first statement; sending
    it at checkout costs no extra round trip and lets the pool retry with a fresh connection
    (`InvalidatePoolError` also marks every older pooled connection stale, since a suspend or
    restart kills them all) before any caller code runs.
    """
    adapter = dbapi_connection
    if adapter.autocommit or adapter._transaction is not None:
        return
    try:
        adapter.run_async(lambda _driver: adapter._start_transaction())
    except Exception as error:
        if _is_disconnect(error, adapter.driver_connection):
            raise exc.InvalidatePoolError(f"connection lost before BEGIN: {error!r}") from error
        raise


def _is_disconnect(error: BaseException, driver_connection: Any) -> bool:
    sqlstate = getattr(error, "sqlstate", None) or ""
    return (
        driver_connection.is_closed()
        or is_connection_loss(error)
        or sqlstate.startswith(_DISCONNECT_SQLSTATE_PREFIXES)
    )


def _raise_typed_error(context: ExceptionContext) -> None:
    """Replace every driver error with the package's own (see `errors.translate`)."""
    error = context.original_exception
    if isinstance(error, TodoStoreError):
        return
    if isinstance(error, TimeoutError):
        # asyncpg's command_timeout: the statement was cancelled, the connection survives.
        raise DatabaseUnavailable("the statement timed out and was cancelled")
    if is_connection_loss(error):
        context.is_disconnect = True
    if context.is_disconnect:
        raise DatabaseUnavailable(f"the database connection was lost: {type(error).__name__}")
    sqlstate = getattr(error, "sqlstate", None)
    if sqlstate is None:
        return  # not a server error (e.g. a programming error in SQLAlchemy usage)
    driver_error = getattr(error, "orig", None)
    raise translate(sqlstate, constraint=getattr(driver_error, "constraint_name", None))


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
        self.engine = create_engine(self.settings, **engine_kwargs)
        self.sessionmaker = create_sessionmaker(self.engine)

    @classmethod
    def from_env(cls) -> TodoStore:
        """Build from `DATABASE_URL` etc. in the environment or `.env`."""
        return cls(Settings())

    @asynccontextmanager
    async def session(self) -> AsyncIterator[AsyncSession]:
        """One transaction: committed when the block succeeds, rolled back when it raises.

        After a database error inside the block the transaction is aborted; let the error
        leave the block (everything in it is rolled back) or use `session.begin_nested()`
        around a call whose failure you want to survive.
        """
        async with self.sessionmaker.begin() as session:
            yield session

    async def ping(self) -> None:
        """Round-trip to the database; raises `DatabaseUnavailable` if it cannot."""
        async with self.engine.connect() as connection:
            await connection.execute(text("SELECT 1"))

    async def dispose(self) -> None:
        """Close every pooled connection."""
        await self.engine.dispose()

    async def __aenter__(self) -> TodoStore:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.dispose()

    def __repr__(self) -> str:
        return f"TodoStore({mask(self.settings.database_url.get_secret_value())})"
