"""The atomic unit of work (`TodoStore.session()`): one connection, one transaction, and the
repositories' statements sent straight to the driver until the caller uses the ORM.

A unit of work is an `AsyncSession` (`UnitSession`) that owns one pooled connection for its
whole block, checked out at its first statement; its ORM session is made when first used.
Guarantees:

- **Everything an `AsyncSession` does.** ORM use (`add`, `get`, `execute`, `flush`,
  `begin_nested`, `connection()`, `run_sync`), a `commit()` or `rollback()` in the middle of
  the block: all run on the unit's connection, in the unit's transaction, as they would in a
  plain `AsyncSession`. Committed when the block exits normally, rolled back when it raises.
- **Repository calls cost what their statements cost.** While the ORM session has not begun a
  transaction and holds no pending change, a repository call sends its statement (compiled
  once per statement) through SQLAlchemy's asyncpg adapter itself: the same BEGIN (with the
  user binding), prepare, statement names and caching, and the same resend of a first round
  trip that met a closed connection; none of the ORM session's or `Connection.execute`'s
  per-call bookkeeping. Until something needs SQLAlchemy's `Connection` (the ORM, a failure,
  a rollback), the unit holds the pool's connection without one, and commits on it directly.
  Once the ORM session has begun (or holds pending changes), calls go through it, so a
  pending change is flushed first and a `begin_nested()` savepoint holds them.
- **The same errors.** A failed statement is handed to SQLAlchemy's own error handling for the
  connection, so the engine's `handle_error` hooks (the package's typed errors), the
  invalidation of a broken connection and the pass-through of `CancelledError`,
  `KeyboardInterrupt` and `SystemExit` are exactly those of any other statement.
- **Listeners are honoured.** Where anything else listens to statement execution (tracing, an
  application's `before_execute` or `before_cursor_execute`, `echo`), or a statement needs
  SQLAlchemy's execution machinery (Python-side defaults, expanding IN lists), the statement
  runs through `Connection.execute` on the unit's connection instead: same transaction, every
  event fired. Where anything else listens to a `Connection`'s creation, begin, commit or
  rollback, the unit takes a `Connection` from the start.

It relies on private parts of SQLAlchemy's asyncpg adapter (the cursor's
`_prepare_and_execute` and `_rows`) and of `Connection` (`_handle_dbapi_exception`,
`_handle_dbapi_exception_noconnection`), present in SQLAlchemy 2.0.58 and 2.1;
`DIRECT_SUPPORTED` checks them once at import. Where they are missing, every unit takes a
`Connection` and every statement runs through `Connection.execute`.
"""

from __future__ import annotations

import asyncio
import inspect
import weakref
from collections.abc import AsyncIterator, Callable, Hashable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, Protocol

from sqlalchemy import exc
from sqlalchemy.dialects.postgresql.asyncpg import AsyncAdapt_asyncpg_cursor
from sqlalchemy.engine import Connection, Dialect, Engine
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import Session
from sqlalchemy.pool import PoolProxiedConnection
from sqlalchemy.sql import ClauseElement, Executable
from sqlalchemy.util import greenlet_spawn

from todo_store.binding import bind_transaction, bind_transaction_listener
from todo_store.replicas import (
    Position,
    forget_writes,
    forget_writes_listener,
    note_write,
    note_write_listener,
    request_position,
    unit_ended,
    unit_opened,
)
from todo_store.resend import executemany_is_not_resent
from todo_store.statement_errors import forget_commit, mark_commit

DIRECT_SUPPORTED = (
    inspect.iscoroutinefunction(getattr(AsyncAdapt_asyncpg_cursor, "_prepare_and_execute", None))
    and hasattr(Connection, "_handle_dbapi_exception")
    and hasattr(Connection, "_handle_dbapi_exception_noconnection")
)
"""Whether this SQLAlchemy has what sending a statement straight to the adapter needs."""

# The package's own `before_cursor_execute` listeners (registered with retval=True, so that
# SQLAlchemy keeps them unwrapped): a directly sent statement does their work itself.
_OWN_STATEMENT_LISTENERS = frozenset({note_write_listener, executemany_is_not_resent})
# The package's own `begin` and `commit` listeners: a unit holding a pool connection without a
# `Connection` does their work itself (`_begin_directly`, `UnitConnection.commit`).
_OWN_TRANSACTION_LISTENERS = frozenset(
    {bind_transaction_listener, forget_commit, forget_writes_listener, mark_commit}
)


class Rows(Protocol):
    """What a statement gave back, as the repositories read it: SQLAlchemy's `Result`, or a
    unit's `FetchedRows`."""

    def one(self) -> Any: ...

    def one_or_none(self) -> Any: ...

    def all(self) -> Sequence[Any]: ...

    def scalar_one_or_none(self) -> Any: ...

    @property
    def rowcount(self) -> int: ...


class FetchedRows:
    """The rows of a statement sent directly, with `Result`'s reading methods."""

    __slots__ = ("_rows", "rowcount")

    def __init__(self, rows: list[Any], rowcount: int) -> None:
        self._rows = rows
        self.rowcount = rowcount

    def all(self) -> list[Any]:
        return self._rows

    def one_or_none(self) -> Any:
        if len(self._rows) > 1:
            raise exc.MultipleResultsFound("Multiple rows were found when one or none was required")
        return self._rows[0] if self._rows else None

    def one(self) -> Any:
        row = self.one_or_none()
        if row is None:
            raise exc.NoResultFound("No row was found when one was required")
        return row

    def scalar_one_or_none(self) -> Any:
        row = self.one_or_none()
        return None if row is None else row[0]


# -- statements compiled once for the adapter ------------------------------------------------


class _Compiled:
    """A statement as the adapter takes it: SQL text, argument order, type processing."""

    __slots__ = ("_binds", "_given", "_names", "_results", "_types", "is_select", "sql")

    def __init__(self, statement: ClauseElement, compiled: Any) -> None:
        self.sql: str = compiled.string
        self.is_select = bool(getattr(statement, "is_select", False))
        names: tuple[str, ...] = tuple(compiled.positiontup or ())
        self._names = names
        # Values the statement carries itself; a required parameter has none.
        defaults = compiled.construct_params(_check=False)
        required = {name for bind, name in compiled.bind_names.items() if bind.required}
        self._given = {name: defaults.get(name) for name in names if name not in required}
        processors = compiled._bind_processors
        self._binds = tuple(processors.get(name) for name in names)
        self._types = tuple(entry.type for entry in compiled._result_columns)
        self._results: tuple[tuple[int, ...], tuple[Any, ...]] | None = None

    def arguments(self, parameters: Mapping[str, Any]) -> list[Any]:
        given = self._given
        try:
            values = [parameters[n] if n in parameters else given[n] for n in self._names]
        except KeyError as missing:  # as Connection.execute says it
            raise exc.InvalidRequestError(
                f"A value is required for bind parameter {missing.args[0]!r}"
            ) from None
        return [
            value if process is None else process(value)
            for value, process in zip(values, self._binds, strict=True)
        ]

    def rows(self, cursor: Any, dialect: Dialect) -> FetchedRows:
        rows = list(cursor._rows)
        description = cursor.description
        if rows and description:
            processors = self._result_processors(description, dialect)
            if any(processors):
                rows = [
                    tuple(
                        value if process is None else process(value)
                        for value, process in zip(row, processors, strict=True)
                    )
                    for row in rows
                ]
        return FetchedRows(rows, cursor.rowcount)

    def _result_processors(self, description: Any, dialect: Dialect) -> tuple[Any, ...]:
        oids = tuple(column[1] for column in description)
        known = self._results
        if known is not None and known[0] == oids:
            return known[1]
        if len(self._types) != len(oids):
            raise RuntimeError("a directly sent statement returned other columns than compiled")
        processors = tuple(
            type_._cached_result_processor(dialect, oid)
            for type_, oid in zip(self._types, oids, strict=True)
        )
        self._results = (oids, processors)
        return processors


def _compile(statement: Executable, dialect: Dialect, keys: tuple[str, ...]) -> _Compiled | None:
    """`statement` compiled as `Connection.execute` would compile it for parameters named
    `keys`; None where it needs SQLAlchemy's execution machinery."""
    if not isinstance(statement, ClauseElement):
        return None
    compiled: Any = statement.compile(dialect=dialect, column_keys=list(keys))
    needs_execution_machinery = (
        compiled.insert_prefetch
        or compiled.update_prefetch
        or compiled.literal_execute_params
        or compiled.post_compile_params
        or compiled.escaped_bind_names
        or any(bind.callable is not None for bind in compiled.binds.values())
    )
    return None if needs_execution_machinery else _Compiled(statement, compiled)


class _Statements:
    """One dialect's directly compiled statements, each compiled once per set of keys."""

    def __init__(self, dialect: Dialect) -> None:
        self.dialect = dialect
        self._compiled: weakref.WeakKeyDictionary[Any, dict[Hashable, _Compiled | None]] = (
            weakref.WeakKeyDictionary()
        )

    def get(self, statement: Executable, parameters: Mapping[str, Any]) -> _Compiled | None:
        """`statement` compiled for the adapter, or None where it needs SQLAlchemy's
        execution (defaults computed in Python, expanding parameters, ...)."""
        by_keys = self._compiled.get(statement)
        if by_keys is None:
            by_keys = self._compiled[statement] = {}
        keys = tuple(sorted(parameters))
        if keys in by_keys:
            return by_keys[keys]
        direct = by_keys[keys] = _compile(statement, self.dialect, keys)
        return direct


_statements: weakref.WeakKeyDictionary[Dialect, _Statements] = weakref.WeakKeyDictionary()


def _statements_for(dialect: Dialect) -> _Statements:
    found = _statements.get(dialect)
    if found is None:
        found = _statements[dialect] = _Statements(dialect)
    return found


def _sent_directly(target: Connection | Engine) -> bool:
    """Whether nothing but this package listens to the statements of `target` (a connection,
    or an engine whose pool connection a unit holds without one)."""
    echo = target._echo if isinstance(target, Connection) else target._should_log_info()
    if echo or not DIRECT_SUPPORTED:  # echo logs each statement
        return False
    if "schema_translate_map" in target._execution_options:
        return False  # changes the compiled text
    dispatch = target.dispatch
    if dispatch.before_execute or dispatch.after_execute or dispatch.after_cursor_execute:
        return False
    if target.dialect.dispatch.do_execute:
        return False
    return _OWN_STATEMENT_LISTENERS.issuperset(dispatch.before_cursor_execute)


def _held_without_connection(engine: Engine) -> bool:
    """Whether a unit may hold `engine`'s pool connection without a SQLAlchemy `Connection`:
    nothing but this package listens to what a `Connection` reports (its creation, begin,
    commit, rollback or statements)."""
    if Connection.__dict__.get("_has_events"):  # a listener on the Connection class itself
        return False
    if not _sent_directly(engine):
        return False
    dispatch = engine.dispatch
    return (
        not dispatch.engine_connect
        and not dispatch.rollback
        and _OWN_TRANSACTION_LISTENERS.issuperset(dispatch.begin)
        and _OWN_TRANSACTION_LISTENERS.issuperset(dispatch.commit)
    )


def _begin_directly(pool_connection: PoolProxiedConnection, options: Mapping[str, Any]) -> None:
    """What the package's `begin` listeners do (`_OWN_TRANSACTION_LISTENERS`), for a
    transaction begun without a `Connection`."""
    bind_transaction(pool_connection, options)
    forget_commit(pool_connection)
    forget_writes(pool_connection)


def _checked_out(engine: Engine) -> PoolProxiedConnection:
    """A connection of `engine`'s pool; a failure to connect is raised as `Connection` raises
    it (through the engine's `handle_error` hooks)."""
    try:
        return engine.raw_connection()
    except engine.dialect.loaded_dbapi.Error as error:
        Connection._handle_dbapi_exception_noconnection(error, engine.dialect, engine)
        raise  # pragma: no cover - the handler always raises


# -- the unit ---------------------------------------------------------------------------------


class UnitConnection:
    """The unit's one connection (checked out at first need) and its transaction.

    Until something needs SQLAlchemy's `Connection` (the ORM, a statement that needs its
    execution machinery, a listener, a failure, a rollback), the unit holds the pool's
    connection itself (`pool_connection`): begin, statements and a successful commit go to
    the adapter with no `Connection` bookkeeping. Then `as_connection()` wraps the same pool
    connection, in the same transaction, and everything after runs through it.
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.connection: Connection | None = None
        self.pool_connection: PoolProxiedConnection | None = None
        self.ended = False
        self._checking_out = False
        self._begun = False  # a transaction begun on `pool_connection` without a Connection

    def in_transaction(self) -> bool:
        if self.connection is not None:
            return self.connection.in_transaction()
        return self._begun

    def for_orm(self) -> Connection:
        """The connection, checked out if not yet (sync: inside SQLAlchemy's greenlet)."""
        if self.connection is None:
            self._refuse_if_ended()
            if self.pool_connection is not None:
                return self.as_connection()
            self.connection = self.engine.sync_engine.connect()
        return self.connection

    def as_connection(self) -> Connection:
        """A `Connection` on the held pool connection, in the transaction begun on it."""
        if self.connection is not None:
            return self.connection
        if self.pool_connection is None:  # a call still running when its unit ended
            self._refuse_if_ended()
            raise exc.InvalidRequestError("this unit of work holds no connection")
        connection = Connection(self.engine.sync_engine, connection=self.pool_connection)
        if self._begun:
            # Connection.begin() fires the begin listeners, which reset what they track per
            # transaction (a write noted, a COMMIT in flight); this transaction is the same
            # one, so what they track is put back.
            info = self.pool_connection.info
            kept = dict(info)
            connection.begin()
            info.clear()
            info.update(kept)
        self.connection = connection
        self.pool_connection = None
        self._begun = False
        return connection

    def _refuse_if_ended(self) -> None:
        # Work after the block would run in a transaction nothing commits, on a connection
        # nothing returns: refused instead.
        if self.ended:
            raise exc.InvalidRequestError(
                "this unit of work has ended: open a new one (store.session())"
            )

    async def fetch(self, statement: Executable, parameters: Mapping[str, Any]) -> Rows:
        """Run `statement` in the unit's transaction (begun here if none is open)."""
        if self.connection is None and self.pool_connection is None:
            await self._checkout()
        compiled = _statements_for(self.engine.dialect).get(statement, parameters)
        connection = self.connection
        if connection is None and compiled is not None and _sent_directly(self.engine.sync_engine):
            pool_connection = self._begun_pool_connection()
        else:
            connection = self.as_connection()
            if not connection.in_transaction():
                # No I/O here: the adapter sends the BEGIN (with the user binding) before the
                # statement.
                connection.begin()
            if compiled is None or not _sent_directly(connection):
                result: Rows = await greenlet_spawn(connection.execute, statement, parameters)
                return result
            pool_connection = connection.connection
        # What this package's own before_cursor_execute listeners do, done here.
        if not compiled.is_select:
            note_write(pool_connection.info, statement)
        cursor = pool_connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        arguments = compiled.arguments(parameters)
        try:
            await cursor._prepare_and_execute(compiled.sql, arguments)
        except BaseException as error:
            await greenlet_spawn(
                _handle_as_sqlalchemy, self.as_connection(), error, compiled.sql, cursor
            )
            raise  # pragma: no cover - _handle_as_sqlalchemy always raises
        return compiled.rows(cursor, self.engine.dialect)

    def _begun_pool_connection(self) -> PoolProxiedConnection:
        """The held pool connection, its transaction begun (the adapter sends the BEGIN, with
        the user binding, before the first statement)."""
        pool_connection = self.pool_connection
        assert pool_connection is not None  # noqa: S101 - checked out before
        if not self._begun:
            _begin_directly(pool_connection, self.engine.sync_engine._execution_options)
            self._begun = True
        return pool_connection

    async def _checkout(self) -> None:
        # Two tasks sharing one unit would each check out a connection of their own: refused,
        # as SQLAlchemy refuses concurrent use of a session that is provisioning one.
        if self._checking_out:
            raise exc.InvalidRequestError(
                "this unit of work is opening its connection for another task: concurrent "
                "operations on one unit of work are not permitted"
            )
        self._refuse_if_ended()
        engine = self.engine.sync_engine
        self._checking_out = True
        try:
            if _held_without_connection(engine):
                held: PoolProxiedConnection | Connection = await greenlet_spawn(
                    _checked_out, engine
                )
            else:
                held = await greenlet_spawn(engine.connect)
        finally:
            self._checking_out = False
        if self.ended:  # the unit ended while this task waited for the pool
            await greenlet_spawn(held.close)
            self._refuse_if_ended()
        if isinstance(held, Connection):
            self.connection = held
        else:
            self.pool_connection = held

    def commit(self) -> list[str] | None:
        """Commit the unit's transaction (sync, in SQLAlchemy's greenlet); what the COMMIT will
        report its position into."""
        connection = self.connection
        if connection is not None:
            sink = self.request_position()
            if connection.in_transaction():
                connection.commit()
            return sink
        pool_connection = self.pool_connection
        if pool_connection is None or not self._begun:
            return None
        sink = self.request_position()
        mark_commit(pool_connection)  # what the package's `commit` listener does
        try:
            pool_connection.dbapi_connection.commit()  # type: ignore[union-attr]
        except BaseException as error:
            _handle_as_sqlalchemy(self.as_connection(), error, None, None)
            raise  # pragma: no cover - _handle_as_sqlalchemy always raises
        self._begun = False
        return sink

    def request_position(self) -> list[str] | None:
        """Ask the COMMIT to come to report its position (see `replicas.request_position`)."""
        connection = self.connection
        if connection is None:
            return request_position(self.pool_connection)
        return None if connection.invalidated else request_position(connection.connection)

    def close(self) -> None:
        """Return the connection to the pool; an open transaction is rolled back (sync, in
        SQLAlchemy's greenlet)."""
        self.ended = True
        if self._begun:
            self.as_connection()  # the rollback and its errors, as a Connection has them
        held: PoolProxiedConnection | Connection | None = self.connection or self.pool_connection
        self.connection = self.pool_connection = None
        if held is not None:
            held.close()


def _handle_as_sqlalchemy(
    connection: Connection, error: BaseException, sql: str | None, cursor: Any
) -> None:
    """Raise what `Connection` would have raised for `error`, with its side effects (the
    engine's `handle_error` hooks, invalidating a broken connection)."""
    try:
        raise error  # noqa: TRY301 - SQLAlchemy's handler reads it from sys.exc_info()
    except BaseException as raised:  # re-raised by SQLAlchemy, converted or unchanged
        # Parameters are not passed: nothing may quote them (the engine hides them anyway).
        connection._handle_dbapi_exception(raised, sql, None, cursor, None)


class UnitOrmSession(Session):
    """The ORM session of a unit: it runs on the unit's connection, and takes over the
    transaction the unit's repository calls have begun before anything of its own."""

    unit: UnitConnection

    def get_bind(self, *args: Any, **kwargs: Any) -> Any:
        return self.unit.for_orm()

    def _take_over(self) -> None:
        if self._transaction is None and self.unit.in_transaction():
            self.connection()  # joins the open transaction (join_transaction_mode control_fully)

    def commit(self) -> None:
        self._take_over()
        super().commit()

    def rollback(self) -> None:
        self._take_over()
        super().rollback()

    def close(self) -> None:
        self._take_over()
        super().close()

    def invalidate(self) -> None:
        self._take_over()
        super().invalidate()

    def begin(self, nested: bool = False) -> Any:
        self._take_over()
        return super().begin(nested=nested)

    def in_transaction(self) -> bool:
        return super().in_transaction() or self.unit.in_transaction()


class UnitSession(AsyncSession):
    """The `AsyncSession` of `TodoStore.session()`: see the module docstring.

    Its ORM session (`sync_session`, and every attribute of `AsyncSession` that reads it) is
    made when first used: a unit that only makes repository calls never pays for one.
    """

    sync_session: UnitOrmSession

    def __init__(self, engine: AsyncEngine, *, info: dict[Any, Any]) -> None:
        # AsyncSession.__init__ runs at first use of the ORM (`_make_orm_session`).
        self._engine = engine
        self._info = info
        self._orm: UnitOrmSession | None = None
        self._orm_started = False
        self.unit = UnitConnection(engine)

    def __getattr__(self, name: str) -> Any:
        # Only for attributes not set yet: those AsyncSession.__init__ sets (they differ
        # between SQLAlchemy versions) appear once the ORM session is made.
        if name.startswith("__") or vars(self).get("_orm_started", True):
            raise AttributeError(name)
        self._make_orm_session()
        return getattr(self, name)

    def _make_orm_session(self) -> None:
        self._orm_started = True
        AsyncSession.__init__(
            self,
            self._engine,
            expire_on_commit=False,
            autoflush=False,
            sync_session_class=UnitOrmSession,
            join_transaction_mode="control_fully",
        )
        orm = self.sync_session
        orm.unit = self.unit
        vars(orm)["info"] = self._info  # one dict for session.info and sync_session.info
        self._orm = orm

    @property
    def info(self) -> dict[Any, Any]:
        return self._info

    def in_transaction(self) -> bool:
        if self._orm is None:
            return self.unit.in_transaction()
        return self._orm.in_transaction()

    def runs_directly(self) -> bool:
        """Whether a repository call may go to the unit's connection without the ORM: the ORM
        session has begun nothing and holds no change to flush first."""
        orm = self._orm
        return orm is None or (orm._transaction is None and orm._is_clean())


@asynccontextmanager
async def atomic_unit(
    engine: AsyncEngine, *, info: dict[Any, Any], learn: Callable[[Position], None]
) -> AsyncIterator[UnitSession]:
    """A unit of work on `engine`: committed when the block exits, rolled back when it raises;
    its consistency token left in `session.info`."""
    session = UnitSession(engine, info=info)
    unit_opened(session.info)
    sink: list[str] | None = None
    try:
        try:
            yield session
        except BaseException:
            await asyncio.shield(greenlet_spawn(_discard, session))
            raise
        sink = await greenlet_spawn(_commit, session)
    finally:
        unit_ended(session.info, sink, learn)


def _commit(session: UnitSession) -> list[str] | None:
    """Commit the unit (ORM changes flushed first) and release its connection; what the
    COMMIT will report its position into."""
    orm = session._orm
    try:
        if orm is not None and not orm._is_clean():
            orm.flush()
        if orm is None or orm._transaction is None:
            return session.unit.commit()
        sink = session.unit.request_position()
        orm.commit()
        return sink
    finally:
        _discard(session)


def _discard(session: UnitSession) -> None:
    """Close the ORM session and the connection: whatever is uncommitted is rolled back."""
    session.unit.ended = True
    orm = session._orm
    try:
        if orm is not None and (
            orm._transaction is not None or orm.identity_map or not orm._is_clean()
        ):
            Session.close(orm)  # not the take-over: the connection closes next
    finally:
        session.unit.close()
