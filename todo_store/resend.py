"""A unit of work whose first round trip meets a closed connection starts on a new one.

The checkout check (`engine._reject_dead_connection`) finds a connection the server closed
while it was pooled, at no cost, once the server's goodbye has reached the socket. When a
backend is terminated (a restart, a compute suspend) just as a unit of work starts, the
goodbye can still be on its way: the unit's first round trip then meets the closed
connection. That round trip cannot have changed anything:
- in a transaction it is the BEGIN (SQLAlchemy's asyncpg adapter sends it before the first
  statement); whatever it started ended with the connection, and a user binding that rides
  on it is transaction-local;
- without one (`session(atomic=False)`), with statement caching off, it is the first
  statement's prepare (Parse/Describe/Sync), which runs nothing.

So when that round trip fails and its connection is closed afterwards, the pool slot keeps
its SQLAlchemy adapter, the adapter gets a new asyncpg connection (opened like any other:
the engine's connect path and backoff, the dialect's per-connection setup, the pending user
binding), and the round trip is sent once more. Guarantees:

- the healthy path costs nothing: no round trip and no check is added;
- only a checkout's first round trip is sent again, once. A statement that may have run, a
  COMMIT, a later BEGIN on the same checkout (the connection may hold a SET or a temporary
  table the caller relies on), a first statement sent as executemany, a cached statement's
  execution, and anything that timed out (slow is not gone) never are: their failures reach
  the caller as before;
- if no new connection can be opened, the caller gets the round trip's own failure
  (`DatabaseUnavailable` with the server's words), as without this module.

It relies on private attributes of SQLAlchemy's asyncpg adapter (`_connection`,
`_transaction`, `_prepared_statement_cache`, `isolation_level`, `_start_transaction`,
`_prepare`), present in SQLAlchemy 2.0.58 and 2.1; `RESEND_SUPPORTED` checks them once at
import. Where they are missing nothing is resent: the unit fails with `DatabaseUnavailable`,
as it did before.
"""

from __future__ import annotations

import inspect
import logging
import weakref
from collections.abc import Callable
from typing import Any

from sqlalchemy.dialects.postgresql.asyncpg import AsyncAdapt_asyncpg_connection
from sqlalchemy.engine import Engine
from sqlalchemy.util import greenlet_spawn

from todo_store.binding import BoundConnection

log = logging.getLogger("todo_store")

_ADAPTER_COROUTINES = ("_start_transaction", "_prepare")
_ADAPTER_SLOTS = ("_connection", "_transaction", "_prepared_statement_cache", "isolation_level")


def _adapter_has_what_resend_needs(adapter_class: type) -> bool:
    slots = {
        name
        for cls in adapter_class.__mro__
        for name in (getattr(cls, "__slots__", ()) or ())
        if isinstance(name, str)
    }
    methods = (getattr(adapter_class, name, None) for name in _ADAPTER_COROUTINES)
    return set(_ADAPTER_SLOTS) <= slots and all(map(inspect.iscoroutinefunction, methods))


RESEND_SUPPORTED = _adapter_has_what_resend_needs(AsyncAdapt_asyncpg_connection)
"""Whether this SQLAlchemy's asyncpg adapter has what a resent BEGIN needs (checked once)."""

OpenReplacement = Callable[[], Any]
"""Opens a new adapted connection, set up like the pool's others (sync, in a greenlet)."""

_listeners: weakref.WeakKeyDictionary[Engine, list[Callable[[], None]]] = (
    weakref.WeakKeyDictionary()
)


def on_replacement(engine: Engine, listener: Callable[[], None]) -> Callable[[], None]:
    """Call `listener()` each time one of `engine`'s connections is replaced under a BEGIN
    that met a closed connection; return a function that stops it."""
    registered = _listeners.setdefault(engine, [])
    registered.append(listener)

    def remove() -> None:
        if listener in registered:
            registered.remove(listener)

    return remove


def resending_class(
    adapter_class: type, engine: Engine, open_replacement: OpenReplacement
) -> type | None:
    """A subclass of `adapter_class` (same layout: an adapter's class can be set to it) whose
    BEGIN is sent again once on a new connection; None where that is not supported."""
    if not RESEND_SUPPORTED or not issubclass(adapter_class, AsyncAdapt_asyncpg_connection):
        return None
    engine_ref = weakref.ref(engine)
    namespace = {
        "__slots__": (),
        "_open_replacement": staticmethod(open_replacement),
        "_engine_ref": staticmethod(engine_ref),
    }
    return type(
        f"Resending{adapter_class.__name__}", (_ResendingFirstRoundTrip, adapter_class), namespace
    )


_fresh: weakref.WeakSet[Any] = weakref.WeakSet()  # asyncpg connections not used since checkout


def checked_out(driver: Any) -> None:
    """`driver` was just checked out: its next round trip is the unit of work's first."""
    _fresh.add(driver)


def not_resendable(driver: Any) -> None:
    """The unit's first statement is sent as executemany, whose first round trip executes."""
    _fresh.discard(driver)


def executemany_is_not_resent(
    conn: Any, _cursor: Any, statement: Any, parameters: Any, _context: Any, many: bool
) -> tuple[Any, Any]:
    """`before_cursor_execute` (retval=True): a statement sent as executemany is not resent."""
    if many and conn.connection.dbapi_connection is not None:
        not_resendable(conn.connection.driver_connection)
    return statement, parameters


def _first_round_trip(driver: Any) -> bool:
    """Whether this is the first round trip on `driver` since checkout (asked once)."""
    fresh = driver in _fresh
    _fresh.discard(driver)
    return fresh


class _ResendingFirstRoundTrip:
    """Mixin for SQLAlchemy's asyncpg adapter: see the module docstring."""

    __slots__ = ()

    _connection: Any
    _transaction: Any
    _prepared_statement_cache: Any
    isolation_level: Any
    _open_replacement: OpenReplacement
    _engine_ref: Callable[[], Engine | None]

    async def _start_transaction(self) -> None:
        old = self._connection
        if self.isolation_level == "autocommit" or not _first_round_trip(old):
            # No BEGIN (a non-atomic unit: its first round trip is the prepare), or not the
            # unit's first round trip: the connection may hold what the unit did before.
            await super()._start_transaction()  # type: ignore[misc]
            return
        # The BEGIN consumes the binding before it is sent: keep it for the replacement.
        pending = old.pending_binding() if isinstance(old, BoundConnection) else None
        try:
            await super()._start_transaction()  # type: ignore[misc]
        except Exception as error:
            if not _met_a_closed_connection(error, old) or self._transaction is not None:
                raise
            if not await self._replace(old, pending, "begin"):
                raise
        else:
            return
        await super()._start_transaction()  # type: ignore[misc]

    async def _prepare(self, operation: Any, invalidate_timestamp: Any) -> Any:
        old = self._connection
        # With caching off, a non-atomic unit's first round trip is Parse/Describe/Sync: it
        # executes nothing. With caching on it may be the Bind/Execute of a cached statement.
        first = _first_round_trip(old)  # asked on every prepare: the marker never lingers
        resendable = (
            first
            and self.isolation_level == "autocommit"
            and self._prepared_statement_cache is None
        )
        try:
            return await super()._prepare(operation, invalidate_timestamp)  # type: ignore[misc]
        except Exception as error:
            if not (resendable and _met_a_closed_connection(error, old)):
                raise
            if not await self._replace(old, None, "prepare"):
                raise
        return await super()._prepare(operation, invalidate_timestamp)  # type: ignore[misc]

    async def _replace(self, old: Any, pending: str | None, found: str) -> bool:
        """Put a new connection in `old`'s place; False if none could be opened."""
        try:
            replacement = await greenlet_spawn(self._open_replacement)
        except Exception:
            return False  # the connect path has logged why (and backs off)
        driver = replacement._connection
        if isinstance(driver, BoundConnection):
            driver.bind_next_transaction(pending)
        self._connection = driver
        # Statements prepared on the closed connection are unknown to the new one.
        if self._prepared_statement_cache is not None:
            self._prepared_statement_cache.clear()
        old.terminate()
        log.info(
            "a database connection was closed under a unit's first round trip; "
            "sending it again on a new connection",
            extra={"todo_store_event": "connection_replaced", "found": found},
        )
        engine = self._engine_ref()
        for listener in list(_listeners.get(engine, ())) if engine is not None else ():
            listener()
        return True


def _met_a_closed_connection(error: BaseException, driver: Any) -> bool:
    """The BEGIN failed and its connection is closed now (reset, closed by the server, or
    the server's FATAL admin-shutdown message): nothing it started outlives it. A timeout
    is excluded: it says the database was slow, not that the connection was gone."""
    if not driver.is_closed():
        return False
    seen: BaseException | None = error
    for _ in range(8):
        if seen is None:
            break
        if isinstance(seen, TimeoutError):
            return False
        seen = getattr(seen, "orig", None) or seen.__cause__ or seen.__context__
    return True
