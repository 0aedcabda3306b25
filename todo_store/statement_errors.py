"""What a failed statement means: the engine's `handle_error` hook and commit tracking.

`ErrorHook` replaces every driver error with the package's own (`errors.translate`, by SQLSTATE
and constraint name), keeps the server's DETAIL (which quotes row values) out of the chain,
discards a lost or timed-out connection and only that one, and says `CommitOutcomeUnknown` when
the failed operation may have committed (a COMMIT, or a statement that may write in an
autocommit unit); a read never has an unknown outcome. `CancelledError`, `KeyboardInterrupt`
and `SystemExit` pass through unchanged.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import asyncpg
from sqlalchemy import exc, util
from sqlalchemy.engine import Connection, ExceptionContext
from sqlalchemy.pool import PoolProxiedConnection

from todo_store.connect_errors import driver_error, error_chain, pooler_cannot_reach_server
from todo_store.connecting import ConnectGate
from todo_store.errors import (
    DISCONNECT_SQLSTATE_CLASSES,
    CommitOutcomeUnknown,
    DatabaseUnavailable,
    TodoStoreError,
    is_connection_loss,
    translate,
)

log = logging.getLogger("todo_store")

_COMMITTING = "todo_store.committing"  # set in Connection.info while a COMMIT is in flight
# Statements that only read, when sent as text(): their failure never leaves a write behind.
_READ_KEYWORDS = frozenset({"select", "show", "values", "table", "explain"})


# -- commit tracking: an interrupted COMMIT has an unknown outcome ---------------------------


def mark_commit(conn: Connection | PoolProxiedConnection) -> None:
    """A COMMIT is about to be sent on `conn` (a `commit` listener)."""
    conn.info[_COMMITTING] = True


def forget_commit(conn: Connection | PoolProxiedConnection) -> None:
    """A transaction begins on `conn` (a `begin` listener): no COMMIT is in flight."""
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


class ErrorHook:
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
