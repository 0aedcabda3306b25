"""OpenTelemetry instrumentation for `TodoStore` (the optional `[otel]` extra).

```python
from todo_store.instrumentation import TodoStoreInstrumentor

TodoStoreInstrumentor().instrument(tracer_provider=..., meter_provider=...)
store = TodoStore.from_env()      # stores created from now on are instrumented
```

`opentelemetry-instrument` finds it through the `opentelemetry_instrumentor` entry point.

Guarantees:
- every `TodoStore` created after `instrument()` gets a span per unit of work
  (`TodoStore.session`, `TodoStore.run`), a child span per repository call (`TaskRepo.get`, ...)
  and, under those, the SQL spans of `opentelemetry-instrumentation-sqlalchemy` on every engine
  the store uses (primary, replicas), each engine traced once;
- the metrics below, with the names and units of OpenTelemetry's database conventions where
  one exists;
- no span, metric or event carries a bound parameter, a row, an exception message or a user
  id: errors are reported by class (`error.type`) and SQLSTATE only, and user ids are omitted;
- `uninstrument()` removes every wrapper and event listener it added; without `instrument()`
  nothing of this module runs (and `import todo_store` never imports OpenTelemetry).

Metrics: `todo_store.unit_of_work.duration`, `db.client.operation.duration` (one repository
call), `db.client.connection.count` (state idle/used), `db.client.connection.max`,
`db.client.connection.idle.max`, `db.client.connection.pending_requests`,
`todo_store.pool.overflow`, `db.client.connection.wait_time`,
`db.client.connection.create_time`, `db.client.connection.timeouts` (pool),
`todo_store.statement.timeouts`, `todo_store.connection.replacements` (by reason),
`todo_store.unit_of_work.retries`, `todo_store.commit.outcome_unknown`.
"""

from __future__ import annotations

import contextvars
import inspect
import time
import weakref
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.instrumentation.instrumentor import (  # type: ignore[attr-defined]
    BaseInstrumentor,
)
from opentelemetry.instrumentation.sqlalchemy import engine as sqlalchemy_tracing
from opentelemetry.instrumentation.sqlalchemy.version import (
    __version__ as sqlalchemy_tracing_version,
)
from opentelemetry.instrumentation.utils import is_instrumentation_enabled, unwrap
from opentelemetry.metrics import (
    CallbackOptions,
    Meter,
    NoOpUpDownCounter,
    Observation,
    get_meter,
)
from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer, get_tracer
from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine
from wrapt import wrap_function_wrapper

from todo_store import __version__, repositories
from todo_store.engine import TodoStore
from todo_store.errors import CommitOutcomeUnknown, TransactionConflict

_INSTRUMENTS = ("todo-store >= 0.1",)

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
# This package's own attributes.
UNIT_KIND = "todo_store.unit.kind"  # atomic | non-atomic | read-only | bound | replica
UNIT_OUTCOME = "todo_store.unit.outcome"  # ok | error
UNIT_ATTEMPT = "todo_store.unit.attempt"  # in `run`: 1, 2, ...
STATEMENTS = "todo_store.statements"
ROUND_TRIPS = "todo_store.round_trips"
RUN_ATTEMPTS = "todo_store.run.attempts"
RUN_RETRIES = "todo_store.run.retries"
REPLACE_REASON = "todo_store.connection.replace_reason"
POOL_ROLE = "todo_store.pool.role"  # primary | replica

# The conventions' advice for database durations, in seconds.
_DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0)
_COLLECTIONS = {"TaskRepo": "tasks", "UserRepo": "users"}
_CONNECT_STARTED = "todo_store.otel.connect_started"


def _error_type(error: BaseException) -> str:
    """The exception's fully qualified class name, never its message (it may name a user)."""
    cls = type(error)
    return (
        cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    )


def _causes(error: BaseException | None) -> Iterator[BaseException]:
    """The error, the driver error SQLAlchemy wraps, and their causes (a few levels)."""
    seen = 0
    while error is not None and seen < 6:
        yield error
        seen += 1
        error = getattr(error, "orig", None) or error.__cause__ or error.__context__


def _is_timeout(error: BaseException | None) -> bool:
    return any(isinstance(e, TimeoutError) for e in _causes(error))


def _root(engine: Engine) -> Engine:
    """The engine that owns the pool (`execution_options()` makes proxies of it)."""
    while True:
        proxied = getattr(engine, "_proxied", None)
        if not isinstance(proxied, Engine):
            return engine
        engine = proxied


# -- per unit of work -----------------------------------------------------------------------


@dataclass(eq=False)
class _Unit:
    statements: int = 0
    transactions: int = 0
    server: dict[str, Any] = field(default_factory=dict)


@dataclass(eq=False)
class _Run:
    attempts: int = 0
    active: _Unit | None = None


_current_unit: contextvars.ContextVar[_Unit | None] = contextvars.ContextVar(
    "todo_store_otel_unit", default=None
)
_current_run: contextvars.ContextVar[_Run | None] = contextvars.ContextVar(
    "todo_store_otel_run", default=None
)


def _reset(var: contextvars.ContextVar[Any], token: contextvars.Token[Any]) -> None:
    # A unit entered in one task and left in another (rare) cannot reset: leave it.
    try:
        var.reset(token)
    except ValueError:
        var.set(None)


# -- per engine -------------------------------------------------------------------------------


@dataclass(eq=False)
class _EngineState:
    """What the instrumentor added to one engine, and the attributes that describe it."""

    role: str
    server: dict[str, Any]
    pool_attributes: dict[str, Any]
    statement_cache: bool
    listeners: list[tuple[Any, str, Callable[..., Any]]] = field(default_factory=list)
    pending: int = 0
    patched_pool: Any = None
    traces_sql: bool = False  # this instrumentor added the SQLAlchemy tracing to the engine


@dataclass(eq=False)
class _StoreState:
    primary: Engine
    statement_cache: bool
    had_a_unit: bool = False


class TodoStoreInstrumentor(BaseInstrumentor):  # type: ignore[misc]
    """Spans and metrics for every `TodoStore` created after `instrument()`.

    `instrument(tracer_provider=None, meter_provider=None)`: the global providers when not
    given. `uninstrument()` undoes everything, including on stores created in between.
    """

    def instrumentation_dependencies(self) -> Collection[str]:
        return _INSTRUMENTS

    def _instrument(self, **kwargs: Any) -> None:
        tracer_provider = kwargs.get("tracer_provider")
        meter_provider = kwargs.get("meter_provider")
        self._tracer: Tracer = get_tracer(__name__, __version__, tracer_provider)
        self._sql_tracer: Tracer = get_tracer(
            sqlalchemy_tracing.__name__.rpartition(".")[0],
            sqlalchemy_tracing_version,
            tracer_provider,
        )
        meter = get_meter(__name__, __version__, meter_provider)
        self._create_instruments(meter)
        self._stores: weakref.WeakKeyDictionary[TodoStore, _StoreState] = (
            weakref.WeakKeyDictionary()
        )
        self._engines: weakref.WeakKeyDictionary[Engine, _EngineState] = weakref.WeakKeyDictionary()
        self._wrapped: list[tuple[Any, str]] = []
        self._wrap(TodoStore, "__init__", self._traced_init)
        self._wrap(TodoStore, "session", self._traced_session)
        self._wrap(TodoStore, "run", self._traced_run)
        for repo in _repository_classes():
            for name, method in vars(repo).items():
                if not name.startswith("_") and inspect.iscoroutinefunction(method):
                    self._wrap(repo, name, self._repository_call(repo.__name__, name))

    def _uninstrument(self, **kwargs: Any) -> None:
        for owner, name in self._wrapped:
            unwrap(owner, name)
        self._wrapped.clear()
        for engine, state in list(self._engines.items()):
            for target, identifier, listener in state.listeners:
                if event.contains(target, identifier, listener):
                    event.remove(target, identifier, listener)
            if state.traces_sql:
                _forget_sqlalchemy_listeners(engine)
            if state.patched_pool is not None:
                vars(state.patched_pool).pop("connect", None)
        self._engines.clear()
        self._stores.clear()

    def _wrap(self, owner: Any, name: str, wrapper: Callable[..., Any]) -> None:
        wrap_function_wrapper(owner, name, wrapper)
        self._wrapped.append((owner, name))

    # -- instruments ---------------------------------------------------------------------

    def _create_instruments(self, meter: Meter) -> None:
        seconds = {"unit": "s", "explicit_bucket_boundaries_advisory": _DURATION_BUCKETS}
        self._unit_duration = meter.create_histogram(
            "todo_store.unit_of_work.duration",
            description="Duration of units of work (store.session / store.run attempts).",
            **seconds,  # type: ignore[arg-type]
        )
        self._operation_duration = meter.create_histogram(
            "db.client.operation.duration",
            description="Duration of repository calls (one SQL statement each).",
            **seconds,  # type: ignore[arg-type]
        )
        self._wait_time = meter.create_histogram(
            "db.client.connection.wait_time",
            description="Time it took to obtain a connection from the pool.",
            **seconds,  # type: ignore[arg-type]
        )
        self._create_time = meter.create_histogram(
            "db.client.connection.create_time",
            description="Time it took to open a new connection.",
            **seconds,  # type: ignore[arg-type]
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
            "lost, timed_out, interrupted, other.",
        )
        self._retries = meter.create_counter(
            "todo_store.unit_of_work.retries",
            unit="{retry}",
            description="Units of work run again by store.run after a TransactionConflict.",
        )
        self._outcome_unknown = meter.create_counter(
            "todo_store.commit.outcome_unknown",
            unit="{commit}",
            description="Units of work that ended in CommitOutcomeUnknown.",
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

    def _pools(self) -> Iterable[tuple[Any, _EngineState]]:
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

    # -- stores and engines ----------------------------------------------------------------

    def _traced_init(
        self, wrapped: Callable[..., None], instance: TodoStore, args: Any, kwargs: Any
    ) -> None:
        wrapped(*args, **kwargs)
        primary = _root(instance.engine.sync_engine)
        statement_cache = bool(getattr(instance.settings, "statement_cache", False))
        store = _StoreState(primary, statement_cache)
        self._stores[instance] = store
        self._trace_engine(primary, "primary", statement_cache)
        self._trace_held_engines(instance, store)

    def _trace_held_engines(self, instance: TodoStore, store: _StoreState) -> None:
        """Trace the other engines the store holds (replicas), as `replica`: when it is created,
        so that their connects and warm-up are measured, and again at its first unit of work,
        for engines a subclass adds after `TodoStore.__init__`. An engine a unit of work runs
        on is traced then at the latest (`_unit_engine`)."""
        for engine in _engines_held_by(instance):
            root = _root(engine.sync_engine)
            if root is not store.primary:
                self._trace_engine(root, "replica", store.statement_cache)

    def _trace_engine(self, engine: Engine, role: str, statement_cache: bool) -> _EngineState:
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
        state = _EngineState(
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
        if not event.contains(engine, "after_cursor_execute", sqlalchemy_tracing._after_cur_exec):
            # The SQLAlchemy instrumentor's per-engine tracer: its `instrument(engine=...)`
            # works only once per process, so a second engine would go untraced. Its pool
            # gauge is left out (`db.client.connection.count` above is read from the pool).
            sqlalchemy_tracing.EngineTracer(  # type: ignore[no-untyped-call]
                self._sql_tracer, engine, NoOpUpDownCounter("unused")
            )
            state.traces_sql = True
        return state

    def _measure_waits(self, pool: Any, state: _EngineState) -> None:
        """Time each checkout (`db.client.connection.wait_time`) and count pool timeouts."""
        original = pool.connect
        wait_time, timeouts = self._wait_time, self._pool_timeouts

        def connect() -> Any:
            state.pending += 1
            started = time.perf_counter()
            try:
                return original()
            except sa_exc.TimeoutError:
                timeouts.add(1, state.pool_attributes)
                raise
            finally:
                state.pending -= 1
                wait_time.record(time.perf_counter() - started, state.pool_attributes)

        pool.connect = connect  # an instance attribute: deleting it restores the method
        state.patched_pool = pool

    def _on_disposed(self, state: _EngineState) -> Callable[[Engine], None]:
        def disposed(engine: Engine) -> None:
            # dispose() puts a new pool in place: measure its waits as well.
            if state.patched_pool is not None:
                vars(state.patched_pool).pop("connect", None)
            self._measure_waits(engine.pool, state)

        return disposed

    def _on_connect(self, state: _EngineState) -> Callable[..., None]:
        create_time = self._create_time

        def connected(_dbapi_connection: Any, record: Any) -> None:
            started = record.info.pop(_CONNECT_STARTED, None)
            if started is not None:
                create_time.record(time.perf_counter() - started, state.pool_attributes)

        return connected

    def _on_invalidate(self, state: _EngineState) -> Callable[..., None]:
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

    def _on_error(self, state: _EngineState) -> Callable[[Any], None]:
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
                span.set_attribute(ERROR_TYPE, _error_type(driver))
                sqlstate = getattr(driver, "sqlstate", None)
                if sqlstate:
                    span.set_attribute(DB_RESPONSE_STATUS_CODE, sqlstate)
            span.end()

        return on_error

    # -- units of work -------------------------------------------------------------------

    def _traced_session(
        self, wrapped: Callable[..., Any], instance: TodoStore, args: Any, kwargs: Any
    ) -> Any:
        store = self._stores.get(instance)
        if store is None or not is_instrumentation_enabled():
            return wrapped(*args, **kwargs)
        if not store.had_a_unit:
            store.had_a_unit = True
            self._trace_held_engines(instance, store)
        return _TracedUnit(self, store, wrapped(*args, **kwargs), kwargs)

    async def _traced_run(
        self, wrapped: Callable[..., Any], instance: TodoStore, args: Any, kwargs: Any
    ) -> Any:
        if instance not in self._stores or not is_instrumentation_enabled():
            return await wrapped(*args, **kwargs)
        run = _Run()
        token = _current_run.set(run)
        span = self._tracer.start_span("TodoStore.run", kind=SpanKind.INTERNAL)
        try:
            with trace.use_span(
                span, end_on_exit=False, record_exception=False, set_status_on_exception=False
            ):
                return await wrapped(*args, **kwargs)
        except BaseException as error:
            span.set_status(Status(StatusCode.ERROR))
            span.set_attribute(ERROR_TYPE, _error_type(error))
            raise
        finally:
            _reset(_current_run, token)
            span.set_attribute(RUN_ATTEMPTS, run.attempts)
            span.set_attribute(RUN_RETRIES, max(0, run.attempts - 1))
            span.end()

    def _unit_started(self, unit: _Unit) -> int | None:
        """The attempt number when `unit` is a run's attempt (not a unit nested in `work`)."""
        run = _current_run.get()
        if run is None or run.active is not None:
            return None
        run.active = unit
        run.attempts += 1
        if run.attempts > 1:
            self._retries.add(1, {ERROR_TYPE: _error_type_name(TransactionConflict)})
        return run.attempts

    def _unit_engine(self, store: _StoreState, session: Any) -> _EngineState:
        """The traced engine the session runs on (traced now if the store made it lately)."""
        bind = getattr(session, "bind", None)
        sync_engine = getattr(bind, "sync_engine", None)
        if not isinstance(sync_engine, Engine):
            return self._engines[store.primary]
        root = _root(sync_engine)
        state = self._engines.get(root)
        if state is None:
            state = self._trace_engine(root, "replica", store.statement_cache)
        return state

    # -- repository calls ------------------------------------------------------------------

    def _repository_call(self, owner: str, method: str) -> Callable[..., Any]:
        name = f"{owner}.{method}"
        static = {DB_SYSTEM_NAME: "postgresql", DB_OPERATION_NAME: method}
        if owner in _COLLECTIONS:
            static[DB_COLLECTION_NAME] = _COLLECTIONS[owner]
        tracer, duration = self._tracer, self._operation_duration

        async def call(wrapped: Callable[..., Any], _instance: Any, args: Any, kwargs: Any) -> Any:
            if not is_instrumentation_enabled():
                return await wrapped(*args, **kwargs)
            unit = _current_unit.get()
            attributes = {**unit.server, **static} if unit is not None else static
            span = tracer.start_span(name, kind=SpanKind.INTERNAL, attributes=attributes)
            started = time.perf_counter()
            try:
                with trace.use_span(
                    span, end_on_exit=False, record_exception=False, set_status_on_exception=False
                ):
                    return await wrapped(*args, **kwargs)
            except BaseException as error:
                attributes = {**attributes, ERROR_TYPE: _error_type(error)}
                span.set_status(Status(StatusCode.ERROR))
                span.set_attribute(ERROR_TYPE, attributes[ERROR_TYPE])
                raise
            finally:
                duration.record(time.perf_counter() - started, attributes)
                span.end()

        return call


class _TracedUnit:
    """Wraps the context manager `TodoStore.session()` returns: a span around the unit of
    work, the unit's statement count, and the duration, retry and outcome metrics."""

    def __init__(
        self,
        instrumentor: TodoStoreInstrumentor,
        store: _StoreState,
        unit_of_work: Any,
        kwargs: dict[str, Any],
    ) -> None:
        self._instrumentor = instrumentor
        self._store = store
        self._unit_of_work = unit_of_work
        self._kwargs = kwargs
        self._unit = _Unit()
        self._engine: _EngineState | None = None

    async def __aenter__(self) -> Any:
        instrumentor = self._instrumentor
        self._attempt = instrumentor._unit_started(self._unit)
        self._span = instrumentor._tracer.start_span("TodoStore.session", kind=SpanKind.INTERNAL)
        self._context_token = otel_context.attach(trace.set_span_in_context(self._span))
        self._unit_token = _current_unit.set(self._unit)
        self._started = time.perf_counter()
        try:
            session = await self._unit_of_work.__aenter__()
        except BaseException as error:
            self._finish(error)
            raise
        self._engine = instrumentor._unit_engine(self._store, session)
        self._unit.server = self._engine.server
        return session

    async def __aexit__(
        self,
        error_type: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool | None:
        try:
            suppressed = await self._unit_of_work.__aexit__(error_type, error, traceback)
        except BaseException as raised:
            self._finish(raised)
            raise
        self._finish(None if suppressed else error)
        return suppressed  # type: ignore[no-any-return]

    def _kind(self) -> str:
        kwargs = self._kwargs
        if self._engine is not None and self._engine.role == "replica":
            return "replica"
        if kwargs.get("read_only"):
            return "read-only"
        if kwargs.get("user_id") is not None:
            return "bound"
        if kwargs.get("atomic", True) is False:
            return "non-atomic"
        return "atomic"

    def _finish(self, error: BaseException | None) -> None:
        instrumentor, unit, span = self._instrumentor, self._unit, self._span
        elapsed = time.perf_counter() - self._started
        _reset(_current_unit, self._unit_token)
        run = _current_run.get()
        if run is not None and run.active is unit:
            run.active = None
        attributes: dict[str, Any] = {
            UNIT_KIND: self._kind(),
            UNIT_OUTCOME: "ok" if error is None else "error",
            **unit.server,
        }
        if error is not None:
            attributes[ERROR_TYPE] = _error_type(error)
            if isinstance(error, CommitOutcomeUnknown):
                instrumentor._outcome_unknown.add(1, unit.server)
        instrumentor._unit_duration.record(elapsed, attributes)
        if span.is_recording():
            span.set_attributes(attributes)
            span.set_attribute(STATEMENTS, unit.statements)
            if self._attempt is not None:
                span.set_attribute(UNIT_ATTEMPT, self._attempt)
            if self._engine is not None and not self._engine.statement_cache:
                # Caching off: every statement is a Parse round trip and an Execute one; a
                # transaction adds its BEGIN and its COMMIT or ROLLBACK (only when it sent a
                # statement: an empty transaction sends nothing).
                began = 2 if unit.transactions and unit.statements else 0
                span.set_attribute(ROUND_TRIPS, 2 * unit.statements + began)
            if error is not None:
                span.set_status(Status(StatusCode.ERROR))
        span.end()
        otel_context.detach(self._context_token)


def _error_type_name(cls: type[BaseException]) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _count_statement(*_args: Any) -> None:
    unit = _current_unit.get()
    if unit is not None:
        unit.statements += 1


def _count_transaction(connection: Any) -> None:
    unit = _current_unit.get()
    # With AUTOCOMMIT (`session(atomic=False)`) SQLAlchemy still "begins", but sends nothing.
    if unit is not None and connection.get_execution_options().get("isolation_level") != (
        "AUTOCOMMIT"
    ):
        unit.transactions += 1


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


def _repository_classes() -> list[type]:
    """The repositories: classes of `todo_store.repositories` named `...Repo`."""
    return [
        value
        for name, value in vars(repositories).items()
        if isinstance(value, type)
        and name.endswith("Repo")
        and value.__module__ == repositories.__name__
    ]


def _engines_held_by(store: TodoStore) -> Iterator[AsyncEngine]:
    """Engines among the store's attributes, directly, in a collection, or on an object."""
    for value in vars(store).values():
        candidates: Iterable[Any]
        if isinstance(value, dict):
            candidates = value.values()
        elif isinstance(value, list | tuple | set | frozenset):
            candidates = value
        else:
            candidates = (value,)
        for candidate in candidates:
            if isinstance(candidate, AsyncEngine):
                yield candidate
            elif isinstance(getattr(candidate, "engine", None), AsyncEngine):
                yield candidate.engine


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


__all__ = ["TodoStoreInstrumentor"]
