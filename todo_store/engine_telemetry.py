"""What the OpenTelemetry instrumentation adds to one engine (the `[otel]` extra).

Used by `todo_store.instrumentation`; imported only when it is enabled. For each engine a store
uses, `EngineTelemetry.trace(engine)` adds, once:
- the SQL spans of `opentelemetry-instrumentation-sqlalchemy` (its per-engine tracer: its own
  `instrument(engine=...)` works once per process), unless that engine already has them;
- an error hook that ends a failed statement's SQL span with the driver's error class and the
  SQLSTATE, never the message (the store's own hook raises before that tracing's would run);
- the statement and transaction counts of the current unit of work (`current_unit`);
- the pool metrics: connections by state, waits, connects, timeouts, connections discarded.

`untrace_all()` removes every listener and patch it added.
"""

from __future__ import annotations

import contextvars
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.instrumentation.sqlalchemy import engine as sqlalchemy_tracing
from opentelemetry.metrics import CallbackOptions, Meter, NoOpUpDownCounter, Observation
from opentelemetry.trace import Status, StatusCode, Tracer
from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine

from todo_store import resend

# Attribute names of OpenTelemetry's database semantic conventions (stable since 1.33).
DB_SYSTEM_NAME = "db.system.name"
DB_NAMESPACE = "db.namespace"
DB_OPERATION_NAME = "db.operation.name"
DB_COLLECTION_NAME = "db.collection.name"
DB_RESPONSE_STATUS_CODE = "db.response.status_code"
SERVER_ADDRESS = "server.address"
SERVER_PORT = "server.port"
ERROR_TYPE = "error.type"
POOL_NAME = "db.client.connection.pool.name"
CONNECTION_STATE = "db.client.connection.state"
# This package's own.
REPLACE_REASON = "todo_store.connection.replace_reason"
POOL_ROLE = "todo_store.pool.role"  # primary | replica

# The conventions' advice for database durations, in seconds.
DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0)
_CONNECT_STARTED = "todo_store.otel.connect_started"


def error_type(error: BaseException) -> str:
    """The exception's fully qualified class name, never its message (it may name a user)."""
    cls = type(error)
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


def root_engine(engine: Engine) -> Engine:
    """The engine that owns the pool (`execution_options()` makes proxies of it)."""
    while True:
        proxied = getattr(engine, "_proxied", None)
        if not isinstance(proxied, Engine):
            return engine
        engine = proxied


def _causes(error: BaseException | None) -> Iterator[BaseException]:
    """The error, the driver error SQLAlchemy wraps, and their causes (a few levels)."""
    seen = 0
    while error is not None and seen < 6:
        yield error
        seen += 1
        error = getattr(error, "orig", None) or error.__cause__ or error.__context__


def _is_timeout(error: BaseException | None) -> bool:
    return any(isinstance(e, TimeoutError) for e in _causes(error))


# -- the current unit of work's counts ---------------------------------------------------------


@dataclass(eq=False)
class UnitCounts:
    """What a unit of work sent, counted by the engine hooks while it is `current_unit`."""

    statements: int = 0
    transactions: int = 0
    server: dict[str, Any] = field(default_factory=dict)


current_unit: contextvars.ContextVar[UnitCounts | None] = contextvars.ContextVar(
    "todo_store_otel_unit", default=None
)


def _count_statement(*_args: Any) -> None:
    unit = current_unit.get()
    if unit is not None:
        unit.statements += 1


def _count_transaction(connection: Any) -> None:
    unit = current_unit.get()
    # With AUTOCOMMIT (`session(atomic=False)`) SQLAlchemy still "begins", but sends nothing.
    if unit is not None and connection.get_execution_options().get("isolation_level") != (
        "AUTOCOMMIT"
    ):
        unit.transactions += 1


# -- per engine -------------------------------------------------------------------------------


@dataclass(eq=False)
class EngineState:
    """What was added to one engine, and the attributes that describe it."""

    role: str
    server: dict[str, Any]
    pool_attributes: dict[str, Any]
    statement_cache: bool
    listeners: list[tuple[Any, str, Callable[..., Any]]] = field(default_factory=list)
    pending: int = 0
    patched_pool: Any = None
    stop_counting_resends: Callable[[], None] | None = None
    traces_sql: bool = False  # the SQLAlchemy tracing was added here, not found


class EngineTelemetry:
    """SQL spans, unit-of-work counts and pool metrics on the engines given to `trace`."""

    def __init__(self, meter: Meter, sql_tracer: Tracer) -> None:
        self._sql_tracer = sql_tracer
        self._engines: weakref.WeakKeyDictionary[Engine, EngineState] = weakref.WeakKeyDictionary()
        seconds: dict[str, Any] = {
            "unit": "s",
            "explicit_bucket_boundaries_advisory": DURATION_BUCKETS,
        }
        self._wait_time = meter.create_histogram(
            "db.client.connection.wait_time",
            description="Time it took to obtain a connection from the pool.",
            **seconds,
        )
        self._create_time = meter.create_histogram(
            "db.client.connection.create_time",
            description="Time it took to open a new connection.",
            **seconds,
        )
        self._pool_timeouts = meter.create_counter(
            "db.client.connection.timeouts",
            unit="{timeout}",
            description="Waits for a pooled connection that timed out (POOL_TIMEOUT).",
        )
        self._statement_timeouts = meter.create_counter(
            "todo_store.statement.timeouts",
            unit="{timeout}",
            description="Statements cancelled by STATEMENT_TIMEOUT (or a busy pooler).",
        )
        self._replacements = meter.create_counter(
            "todo_store.connection.replacements",
            unit="{connection}",
            description="Connections discarded from the pool, by reason: dead_at_checkout, "
            "dead_at_first_use, lost, timed_out, interrupted, other.",
        )
        meter.create_observable_up_down_counter(
            "db.client.connection.count",
            callbacks=[self._observe_connections],
            unit="{connection}",
            description="Connections in the pool, by state (idle, used).",
        )
        meter.create_observable_up_down_counter(
            "db.client.connection.max",
            callbacks=[self._pool_observer(lambda pool: pool.size() + pool._max_overflow)],
            unit="{connection}",
            description="Most connections the pool opens (POOL_SIZE + MAX_OVERFLOW).",
        )
        meter.create_observable_up_down_counter(
            "db.client.connection.idle.max",
            callbacks=[self._pool_observer(lambda pool: pool.size())],
            unit="{connection}",
            description="Most idle connections the pool keeps (POOL_SIZE).",
        )
        meter.create_observable_up_down_counter(
            "todo_store.pool.overflow",
            callbacks=[self._pool_observer(lambda pool: max(0, pool.overflow()))],
            unit="{connection}",
            description="Connections open beyond POOL_SIZE (up to MAX_OVERFLOW).",
        )
        meter.create_observable_up_down_counter(
            "db.client.connection.pending_requests",
            callbacks=[self._observe_pending],
            unit="{request}",
            description="Callers waiting for a pooled connection.",
        )

    def get(self, engine: Engine) -> EngineState | None:
        return self._engines.get(engine)

    def trace(self, engine: Engine, role: str, *, statement_cache: bool) -> EngineState:
        """Add everything to `engine` (a root engine, see `root_engine`), once."""
        known = self._engines.get(engine)
        if known is not None:
            return known
        url = engine.url
        server: dict[str, Any] = {DB_SYSTEM_NAME: "postgresql"}
        if url.database:
            server[DB_NAMESPACE] = url.database
        if url.host:
            server[SERVER_ADDRESS] = url.host
            server[SERVER_PORT] = url.port or 5432
        pool_name = f"{url.host or 'localhost'}:{url.port or 5432}/{url.database or ''}"
        state = EngineState(
            role=role,
            server=server,
            pool_attributes={POOL_NAME: pool_name, POOL_ROLE: role, DB_SYSTEM_NAME: "postgresql"},
            statement_cache=statement_cache,
        )
        self._engines[engine] = state

        def listen(
            target: Any, identifier: str, listener: Callable[..., Any], *, first: bool = False
        ) -> None:
            if first:
                _listen_first(target, identifier, listener)
            else:
                event.listen(target, identifier, listener)
            state.listeners.append((target, identifier, listener))

        # First in line: the store's own error hook raises its typed error, which stops the
        # SQLAlchemy tracing's hook from ever ending the SQL span; the store's connect hook
        # returns the connection, which ends the line.
        listen(engine, "handle_error", self._on_error(state), first=True)
        listen(engine, "do_connect", _connect_started, first=True)
        listen(engine, "before_cursor_execute", _count_statement)
        listen(engine, "begin", _count_transaction)
        listen(engine, "connect", self._on_connect(state))
        listen(engine, "invalidate", self._on_invalidate(state))
        listen(engine, "engine_disposed", self._on_disposed(state))
        self._measure_waits(engine.pool, state)
        state.stop_counting_resends = resend.on_replacement(engine, self._on_resend(state))
        if not event.contains(engine, "after_cursor_execute", sqlalchemy_tracing._after_cur_exec):
            # Its pool gauge is left out: `db.client.connection.count` is read from the pool.
            sqlalchemy_tracing.EngineTracer(  # type: ignore[no-untyped-call]
                self._sql_tracer, engine, NoOpUpDownCounter("unused")
            )
            state.traces_sql = True
        return state

    def untrace_all(self) -> None:
        for engine, state in list(self._engines.items()):
            for target, identifier, listener in state.listeners:
                if event.contains(target, identifier, listener):
                    event.remove(target, identifier, listener)
            if state.traces_sql:
                _forget_sqlalchemy_listeners(engine)
            if state.patched_pool is not None:
                vars(state.patched_pool).pop("connect", None)
            if state.stop_counting_resends is not None:
                state.stop_counting_resends()
        self._engines.clear()

    # -- pool metrics --------------------------------------------------------------------------

    def _pools(self) -> Iterable[tuple[Any, EngineState]]:
        for engine, state in list(self._engines.items()):
            yield engine.pool, state

    def _observe_connections(self, _options: CallbackOptions) -> Iterable[Observation]:
        for pool, state in self._pools():
            if hasattr(pool, "checkedout"):
                used = pool.checkedout()
                yield Observation(used, {**state.pool_attributes, CONNECTION_STATE: "used"})
                idle = pool.checkedin()
                yield Observation(idle, {**state.pool_attributes, CONNECTION_STATE: "idle"})

    def _observe_pending(self, _options: CallbackOptions) -> Iterable[Observation]:
        for _pool, state in self._pools():
            yield Observation(state.pending, state.pool_attributes)

    def _pool_observer(
        self, measure: Callable[[Any], int]
    ) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(_options: CallbackOptions) -> Iterable[Observation]:
            for pool, state in self._pools():
                if hasattr(pool, "overflow"):  # a QueuePool, the store's kind
                    yield Observation(measure(pool), state.pool_attributes)

        return observe

    def _measure_waits(self, pool: Any, state: EngineState) -> None:
        """Time each checkout (`db.client.connection.wait_time`) and count pool timeouts."""
        original = pool.connect
        wait_time, timeouts = self._wait_time, self._pool_timeouts

        def connect() -> Any:
            state.pending += 1
            started = time.perf_counter()
            try:
                return original()
            except Exception as error:
                # The pool's own timeout, however the store reports it to the caller.
                if any(isinstance(e, sa_exc.TimeoutError) for e in _causes(error)):
                    timeouts.add(1, state.pool_attributes)
                raise
            finally:
                state.pending -= 1
                wait_time.record(time.perf_counter() - started, state.pool_attributes)

        pool.connect = connect  # an instance attribute: deleting it restores the method
        state.patched_pool = pool

    def _on_disposed(self, state: EngineState) -> Callable[[Engine], None]:
        def disposed(engine: Engine) -> None:
            # dispose() puts a new pool in place: measure its waits as well.
            if state.patched_pool is not None:
                vars(state.patched_pool).pop("connect", None)
            self._measure_waits(engine.pool, state)

        return disposed

    def _on_connect(self, state: EngineState) -> Callable[..., None]:
        create_time = self._create_time

        def connected(_dbapi_connection: Any, record: Any) -> None:
            started = record.info.pop(_CONNECT_STARTED, None)
            if started is not None:
                create_time.record(time.perf_counter() - started, state.pool_attributes)

        return connected

    def _on_invalidate(self, state: EngineState) -> Callable[..., None]:
        replacements = self._replacements

        def invalidated(_dbapi_connection: Any, _record: Any, error: BaseException | None) -> None:
            if isinstance(error, sa_exc.DisconnectionError):
                reason = "dead_at_checkout"  # found closed at checkout, before any caller code
            elif error is None:
                reason = "other"
            elif not isinstance(error, Exception):
                reason = "interrupted"  # cancelled, KeyboardInterrupt, SystemExit
            elif _is_timeout(error):
                reason = "timed_out"
            else:
                reason = "lost"
            replacements.add(1, {**state.pool_attributes, REPLACE_REASON: reason})

        return invalidated

    def _on_resend(self, state: EngineState) -> Callable[[], None]:
        replacements = self._replacements

        def replaced() -> None:
            # The pool slot keeps its adapter, so the pool sees no invalidation: counted here.
            replacements.add(1, {**state.pool_attributes, REPLACE_REASON: "dead_at_first_use"})

        return replaced

    # -- SQL spans of failed statements ---------------------------------------------------------

    def _on_error(self, state: EngineState) -> Callable[[Any], None]:
        statement_timeouts = self._statement_timeouts

        def on_error(context: Any) -> None:
            error = context.original_exception
            if _is_timeout(error):
                statement_timeouts.add(1, state.pool_attributes)
            execution = context.execution_context
            span = getattr(execution, "_otel_span", None)
            if span is None:
                return
            execution._otel_span = None  # ended here, not again by the SQLAlchemy tracing
            if span.is_recording():
                # No status description: the driver's message can quote a row's values.
                span.set_status(Status(StatusCode.ERROR))
                # The innermost error with a SQLSTATE is the driver's own (SQLAlchemy's adapter
                # copies the SQLSTATE onto its wrapper in some versions).
                driver = error
                for cause in _causes(error):
                    if getattr(cause, "sqlstate", None):
                        driver = cause
                span.set_attribute(ERROR_TYPE, error_type(driver))
                sqlstate = getattr(driver, "sqlstate", None)
                if sqlstate:
                    span.set_attribute(DB_RESPONSE_STATUS_CODE, sqlstate)
            span.end()

        return on_error


def _connect_started(_dialect: Any, record: Any, _cargs: Any, _cparams: Any) -> None:
    record.info[_CONNECT_STARTED] = time.perf_counter()


def _listen_first(engine: Engine, identifier: str, listener: Callable[..., Any]) -> None:
    """Listen to a dialect event (`handle_error`, `do_connect`) ahead of the listeners already
    there. `event.listen(..., insert=True)` does not do it for dialect events (SQLAlchemy drops
    the flag), so the others are taken off and put back after this one, in their order."""
    others = list(getattr(engine.dialect.dispatch, identifier))
    for other in others:
        event.remove(engine, identifier, other)
    event.listen(engine, identifier, listener)
    for other in others:
        event.listen(engine, identifier, other)


def _forget_sqlalchemy_listeners(engine: Engine) -> None:
    """Remove the listeners the SQLAlchemy tracing added to `engine` (kept in a class-level
    list it offers no per-engine removal for)."""
    registered = getattr(sqlalchemy_tracing.EngineTracer, "_remove_event_listener_params", [])
    for entry in list(registered):
        target_ref, identifier, listener = entry
        if target_ref() is engine:
            if event.contains(engine, identifier, listener):
                event.remove(engine, identifier, listener)
            registered.remove(entry)
