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
import re
import select
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import asyncpg
from sqlalchemy import event, exc, text, util
from sqlalchemy.engine import URL, Connection, Dialect, Engine, ExceptionContext
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
from todo_store.connect_errors import (
    driver_error,
    error_chain,
    explain_connect_failure,
    pooler_cannot_reach_server,
)
from todo_store.errors import (
    DISCONNECT_SQLSTATE_CLASSES,
    CommitOutcomeUnknown,
    DatabaseUnavailable,
    TodoStoreError,
    TransactionConflict,
    is_connection_loss,
    translate,
)
from todo_store.pages import CURSOR_KEY_INFO, CursorKey, cursor_key_for
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

_TLS_INTENT = "todo_store_tls_intent"
_COMMITTING = "todo_store.committing"  # set in Connection.info while a COMMIT is in flight
_RETRY_FIRST_DELAY_S = 0.02
_RETRY_MAX_DELAY_S = 1.0
# Connect backoff while connects fail: the first retry after ~50 ms, doubling, never more than
# 1 s apart, so the first call after the database is back waits at most ~1 s for its attempt.
_CONNECT_BACKOFF_FIRST_S = 0.05
_CONNECT_BACKOFF_MAX_S = 1.0
# Statements that only read, when sent as text(): their failure never leaves a write behind.
_READ_KEYWORDS = frozenset({"select", "show", "values", "table", "explain"})


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
    args[_TLS_INTENT] = target.tls
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
    event.listen(sync_engine, "do_connect", _Connector(gate, first_connect_timeout, sync_engine))
    event.listen(sync_engine, "checkout", _reject_dead_connection)
    event.listen(sync_engine, "before_cursor_execute", _executemany_is_not_resent)
    event.listen(sync_engine, "checkin", gate.database_answered)
    event.listen(sync_engine, "begin", _forget_commit)
    event.listen(sync_engine, "commit", _mark_commit)
    # A timed-out connection gets this long to close gracefully (its cancel request answered):
    # 1% of the statement timeout, at least 20 ms, at most 100 ms.
    close_budget = min(max(statement_timeout * 0.01, 0.02), 0.1)
    event.listen(sync_engine, "handle_error", _ErrorHook(gate, close_budget))
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


# -- first connect: no questions the server already answered -------------------------------

_VERSION_NUMBERS = re.compile(r"(\d+)(?:\.(\d+))?(?:\.(\d+))?")


def answer_first_connect_from_startup(dialect: Dialect) -> None:
    """Make the engine's first connection cost no round trip for SQLAlchemy's questions.

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


class ConnectGate:
    """While connects fail, a process makes a bounded number of attempts (one per engine).

    After a failed attempt (refused, timed out, or a pooler that cannot reach its server) the
    next one waits a jittered, doubling delay (50 ms up to 1 s); callers that need a new
    connection before then fail at once with `DatabaseUnavailable`, saying why and when the
    next attempt is, instead of each opening a login of its own. A connection that comes back
    to the pool healthy, or a connect that succeeds, opens the gate again.
    """

    def __init__(self) -> None:
        self.failures = 0
        self._next_attempt = 0.0
        self._reason = ""
        self._attempt_in_flight = False

    def enter(self) -> None:
        """Raise `DatabaseUnavailable` if no attempt may be made now; else mark one in flight."""
        if self.failures:
            wait = self._next_attempt - time.monotonic()
            if wait > 0 or self._attempt_in_flight:
                raise DatabaseUnavailable(
                    f"not connecting yet: the last {self.failures} connect attempt(s) failed, "
                    f"next attempt in {max(wait, 0.0):.2f} s; last failure: {self._reason}"
                )
        self._attempt_in_flight = True

    def failed(self, reason: str) -> None:
        self._attempt_in_flight = False
        delay = min(_CONNECT_BACKOFF_FIRST_S * 2**self.failures, _CONNECT_BACKOFF_MAX_S)
        # Jitter, not security: spreads the processes of a fleet apart.
        delay = random.uniform(delay / 2, delay)  # noqa: S311
        self.failures += 1
        self._next_attempt = time.monotonic() + delay
        self._reason = reason
        log.warning(
            "database connect failed; next attempt in %.2f s",
            delay,
            extra={
                "todo_store_event": "connect_failed",
                "failures_in_a_row": self.failures,
                "retry_in_s": round(delay, 3),
                "reason": reason,
            },
        )

    def connected(self) -> None:
        self._attempt_in_flight = False

    def database_answered(self, dbapi_connection: Any, _record: Any = None) -> None:
        """A connection came back healthy (pool checkin): the database is reachable."""
        if self.failures and dbapi_connection is not None:
            log.info(
                "database reachable again after %d failed connect(s)",
                self.failures,
                extra={"todo_store_event": "connect_recovered", "failures": self.failures},
            )
            self.failures = 0


class _Connector:
    """The engine's `do_connect`: open a connection through the `ConnectGate`; a failure
    becomes `ConnectionRejected` (no retry can fix it) or `DatabaseUnavailable` (transient),
    with the server's or pooler's reason and what to do.

    SQLAlchemy passes connect errors through untranslated, so `handle_error` never sees them.
    The engine's first connection is also checked with one round trip within the connect
    timeout: through a pooler that still accepts logins while its server is down, that is
    where the wait for the server happens (SQLAlchemy's own first queries would otherwise wait
    the statement timeout).

    Each connection it opens can send its BEGIN again on a new connection when the BEGIN
    meets a closed one (`todo_store.resend`); that new connection is opened here too.
    """

    def __init__(self, gate: ConnectGate, first_connect_timeout: float, engine: Engine) -> None:
        self.gate = gate
        self.first_connect_timeout = first_connect_timeout
        self.first_done = False
        self.engine = engine
        self._last_connect: tuple[Any, list[Any], dict[str, Any]] | None = None
        self._resending: dict[type, type | None] = {}

    def __call__(self, dialect: Any, _record: Any, cargs: Any, cparams: dict[str, Any]) -> Any:
        self._last_connect = (dialect, list(cargs), dict(cparams))
        connection = self._open(dialect, cargs, cparams)
        resending = self._resending_class(type(connection))
        if resending is not None:
            connection.__class__ = resending
        return connection

    def _resending_class(self, adapter_class: type) -> type | None:
        if adapter_class not in self._resending:
            self._resending[adapter_class] = resend.resending_class(
                adapter_class, self.engine, self._open_replacement
            )
        return self._resending[adapter_class]

    def _open_replacement(self) -> Any:
        """A new adapted connection for a pool slot whose connection was found closed: opened
        with the last connect's arguments, through the gate, with the dialect's setup."""
        if self._last_connect is None:  # pragma: no cover - a connection implies a connect
            raise DatabaseUnavailable("no connection was ever opened to replace")
        dialect, cargs, cparams = self._last_connect
        connection = self._open(dialect, list(cargs), dict(cparams))
        setup = dialect.on_connect()
        try:
            if setup is not None:
                setup(connection)
        except BaseException:
            connection.driver_connection.terminate()
            raise
        return connection

    def _open(self, dialect: Any, cargs: Any, cparams: dict[str, Any]) -> Any:
        tls = cparams.pop(_TLS_INTENT, None)
        self.gate.enter()
        started = time.monotonic()
        try:
            connection = dialect.loaded_dbapi.connect(*cargs, **cparams)
            if not self.first_done:
                remaining = self.first_connect_timeout - (time.monotonic() - started)
                self._first_round_trip(connection, max(remaining, 0.001))
        except _FirstQueryTimedOut as error:
            self.gate.failed(str(error))
            raise DatabaseUnavailable(str(error)) from None
        except Exception as error:
            explained = explain_connect_failure(error, tls=tls, password=cparams.get("password"))
            if explained is None:
                self.gate.connected()
                raise
            if isinstance(explained, DatabaseUnavailable):
                self.gate.failed(str(explained))
            else:
                self.gate.connected()
            raise explained from error
        except BaseException:
            self.gate.connected()
            raise
        self.first_done = True
        self.gate.connected()
        return connection

    @staticmethod
    def _first_round_trip(connection: Any, timeout: float) -> None:
        driver = connection.driver_connection
        try:
            util.await_only(driver.execute("SELECT 1", timeout=timeout))
        except TimeoutError:
            driver.terminate()
            raise _FirstQueryTimedOut() from None
        except BaseException:
            driver.terminate()
            raise


class _FirstQueryTimedOut(DatabaseUnavailable):
    def __init__(self) -> None:
        super().__init__(
            "could not connect: the login was accepted but the first query got no answer within "
            "the connect timeout (connect_timeout); through a pooler, its database server may be "
            "suspended, starting or down, or every server connection busy — retry later"
        )


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


def _executemany_is_not_resent(
    conn: Connection, _cursor: Any, _statement: Any, _parameters: Any, _context: Any, many: bool
) -> None:
    if many and conn.connection.dbapi_connection is not None:
        resend.not_resendable(conn.connection.driver_connection)


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


# -- commit tracking: an interrupted COMMIT has an unknown outcome ---------------------------


def _mark_commit(conn: Connection) -> None:
    conn.info[_COMMITTING] = True


def _forget_commit(conn: Connection) -> None:
    conn.info.pop(_COMMITTING, None)


# -- errors ---------------------------------------------------------------------------------


def _driver_error(error: BaseException) -> BaseException:
    return driver_error(error) or error


def _is_disconnect(error: BaseException) -> bool:
    found = _driver_error(error)
    if is_connection_loss(error) or is_connection_loss(found):
        return True
    if any(isinstance(e, asyncpg.ConnectionDoesNotExistError) for e in error_chain(error)):
        return True
    if isinstance(found, asyncpg.InterfaceError) and "closed" in str(found):
        return True  # asyncpg's "connection is closed": its own fixed text, not the server's
    sqlstate = getattr(found, "sqlstate", None) or ""
    return sqlstate.startswith(DISCONNECT_SQLSTATE_CLASSES)


def _connection_info(context: ExceptionContext) -> dict[Any, Any] | None:
    """The failed Connection's `info`, or None where there is none: SQLAlchemy's first-connect
    queries run on an ad hoc connection whose `info` raises."""
    conn = context.connection
    if conn is None:
        return None
    try:
        return conn.info
    except (NotImplementedError, AttributeError, exc.SQLAlchemyError):
        return None


def _outcome_unknown(context: ExceptionContext) -> bool:
    """True when the failed operation may have committed: a COMMIT, or a statement that may
    write and commits by itself (autocommit). A read never has an unknown outcome."""
    info = _connection_info(context)
    if info is None:
        return False
    if info.get(_COMMITTING):
        return True
    conn = context.connection
    execution = context.execution_context
    if conn is None or execution is None:
        return False
    # The execution option, not get_isolation_level(): that would query the server.
    if conn.get_execution_options().get("isolation_level") != "AUTOCOMMIT":
        return False
    return not _is_read(execution)


def _is_read(execution: Any) -> bool:
    compiled = execution.compiled
    statement = getattr(compiled, "statement", None)
    if statement is not None and getattr(statement, "is_select", False):
        return True
    if execution.isinsert or execution.isupdate or execution.isdelete or execution.isddl:
        return False
    words = (getattr(execution, "statement", None) or "").split(None, 1)
    return bool(words) and words[0].lower() in _READ_KEYWORDS


def _strip_details(error: BaseException) -> None:
    """Remove the server's DETAIL (e.g. `Key (email)=(…)`, `Failing row contains (…)`) from
    every exception in the chain a caller will see: it quotes the row's values."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [error]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, asyncpg.PostgresError):
            current.detail = None
            current.hint = None
        elif isinstance(current, Exception) and current.args and isinstance(current.args[0], str):
            first_line = current.args[0].split("\n", 1)[0]
            current.args = (first_line, *current.args[1:])
        pending += [getattr(current, "orig", None), current.__cause__, current.__context__]


class _ErrorHook:
    """`handle_error`: replace every driver error with the package's own (`errors.translate`).

    `CancelledError`, `KeyboardInterrupt` and `SystemExit` are never converted (SQLAlchemy
    treats them as a disconnect, so the interrupted connection is discarded, not pooled). The
    errors of a `pool_pre_ping` are left to SQLAlchemy, which reconnects.
    """

    def __init__(self, gate: ConnectGate, close_budget: float) -> None:
        self.gate = gate
        self.close_budget = close_budget

    def _close_timed_out(self, context: ExceptionContext) -> None:
        """Close a timed-out connection within `close_budget`, then drop it.

        asyncpg has already asked the server to cancel the statement; a graceful close waits
        for that cancel to be answered, which a pooler holding the statement in its queue may
        never do (SQLAlchemy would wait 2 s more). So the close is bounded, and the timeout
        the caller set is the time the caller waits.
        """
        proxied = context.connection.connection if context.connection is not None else None
        driver = getattr(proxied, "driver_connection", None)
        if not isinstance(driver, asyncpg.Connection) or driver.is_closed():
            return
        util.await_only(_close_within(driver, self.close_budget))

    def __call__(self, context: ExceptionContext) -> None:
        error = context.original_exception
        if not isinstance(error, Exception) or context.is_pre_ping:
            return
        if isinstance(error, TodoStoreError):
            return
        timed_out = isinstance(error, TimeoutError) or isinstance(
            _driver_error(error), TimeoutError
        )
        if timed_out or context.is_disconnect or _is_disconnect(error):
            self._connection_failed(context, error, timed_out=timed_out)
        sqlstate = getattr(error, "sqlstate", None)
        if sqlstate is None:
            return  # not a server error (e.g. a programming error in SQLAlchemy usage)
        found = _driver_error(error)
        _strip_details(error)
        raise translate(sqlstate, constraint=getattr(found, "constraint_name", None))

    def _connection_failed(
        self, context: ExceptionContext, error: Exception, *, timed_out: bool
    ) -> None:
        unknown = _outcome_unknown(context)
        # A timed-out or broken connection is in an unknown state: discard it, and only it:
        # the others are each checked at their next checkout, at no cost.
        context.is_disconnect = True
        context.invalidate_pool_on_disconnect = False
        reason = "timed out" if timed_out else _reason(error)
        event_extra = {"todo_store_event": "connection_lost", "reason": reason}
        if unknown:
            log.error(
                "commit outcome unknown: the connection failed while a write was committing",
                extra={**event_extra, "todo_store_event": "commit_outcome_unknown"},
            )
            raise CommitOutcomeUnknown(
                "the connection "
                + ("timed out" if timed_out else f"was lost ({reason})")
                + " while a write was committing: it may or may not have been applied"
            )
        if timed_out:
            self._close_timed_out(context)
            log.warning("database statement timed out; connection discarded", extra=event_extra)
            raise DatabaseUnavailable(
                "timed out waiting for the database (statement timeout, or a busy pooler); "
                "nothing was committed"
            )
        log.warning("database connection lost; connection discarded", extra=event_extra)
        found = _driver_error(error)
        if isinstance(found, asyncpg.PostgresError) and pooler_cannot_reach_server(
            getattr(found, "message", "") or ""
        ):
            self.gate.failed(f"the pooler cannot reach the database server: {reason}")
        raise DatabaseUnavailable(f"the database connection was lost: {reason}")


async def _close_within(driver: asyncpg.Connection, seconds: float) -> None:
    try:
        await asyncio.wait_for(driver.close(), seconds)
    except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
        driver.terminate()


def _reason(error: BaseException) -> str:
    """A short, parameter-free reason: the server's or pooler's own words where it sent any
    (with the SQLSTATE), else the driver error's type."""
    found = _driver_error(error)
    message = getattr(found, "message", None) or (found.args[0] if found.args else "")
    message = message if isinstance(message, str) else ""
    sqlstate = getattr(found, "sqlstate", None)
    if message and sqlstate:
        return f"{' '.join(message.split())} (SQLSTATE {sqlstate})"
    name = type(found).__name__
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
        key = cursor_key_for(self.settings.cursor_secret, self.settings.better_auth_secret)
        _hand_cursor_key(self.engine, key)
        self.sessionmaker = create_sessionmaker(
            self.engine, cursor_key=key, sync_session_class=PositionReportingSession
        )
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
            # Closing without a commit rolls back, so the block that raises leaves nothing.
            async with write_unit(self.sessionmaker, self.read_router.learn) as session:
                yield session
        except exc.TimeoutError:  # only the pool raises SQLAlchemy's TimeoutError
            raise self._pool_exhausted() from None

    @asynccontextmanager
    async def _bound_unit(
        self, user_id: str, *, atomic: bool, read_only: bool
    ) -> AsyncIterator[AsyncSession]:
        engine = self._read_only_engine if read_only else self.engine
        bind = engine.execution_options(**{USER_OPTION: user_id})
        session_class = AsyncSession if atomic else CallByCallTransactions
        info = dict(self.sessionmaker.kw.get("info") or {})  # the cursor key, as unbound units
        if atomic and not read_only:  # a write unit: its COMMIT reports a consistency token
            maker = async_sessionmaker(
                bind,
                expire_on_commit=False,
                autoflush=False,
                info=info,
                sync_session_class=PositionReportingSession,
            )
            async with write_unit(maker, self.read_router.learn) as session:
                yield session
            return
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
