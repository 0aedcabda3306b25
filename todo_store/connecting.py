"""How the store's engines open connections.

- `Connector` (the engine's `do_connect`): every connect goes through a `ConnectGate`, so that
  while connects fail a process makes about one attempt per second (jittered backoff) and
  callers meanwhile fail at once with `DatabaseUnavailable` saying when the next attempt is; a
  failure becomes `ConnectionRejected` or `DatabaseUnavailable` with the server's or pooler's
  reason (`connect_errors`); the engine's first connection is checked within the connect
  timeout; replacement connections for `resend` are opened here too.
- `answer_first_connect_from_startup`: SQLAlchemy's first-connect questions answered from what
  the server reported at login, at no round trip.
"""

from __future__ import annotations

import logging
import random
import re
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import util
from sqlalchemy.engine import Connection, Dialect, Engine

from todo_store import resend
from todo_store.connect_errors import explain_connect_failure
from todo_store.errors import DatabaseUnavailable

log = logging.getLogger("todo_store")

# A connect argument that is not asyncpg's: the URL's TLS intent, taken out again by
# `Connector` to say why a certificate was verified.
TLS_INTENT = "todo_store_tls_intent"
# Connect backoff while connects fail: the first retry after ~50 ms, doubling, never more than
# 1 s apart, so the first call after the database is back waits at most ~1 s for its attempt.
CONNECT_BACKOFF_FIRST_S = 0.05
CONNECT_BACKOFF_MAX_S = 1.0


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
        delay = min(CONNECT_BACKOFF_FIRST_S * 2**self.failures, CONNECT_BACKOFF_MAX_S)
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


class Connector:
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
        tls = cparams.pop(TLS_INTENT, None)
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
