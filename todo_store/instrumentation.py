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

This module owns the wrapping of `TodoStore` and the repositories (spans of units of work and
calls); what is added to each engine (SQL spans, pool metrics) is `todo_store.engine_telemetry`.
"""

from __future__ import annotations

import contextvars
import inspect
import time
import weakref
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.instrumentation.instrumentor import (  # type: ignore[attr-defined]
    BaseInstrumentor,
)
from opentelemetry.instrumentation.sqlalchemy.version import (
    __version__ as sqlalchemy_tracing_version,
)
from opentelemetry.instrumentation.utils import is_instrumentation_enabled, unwrap
from opentelemetry.metrics import Meter, get_meter
from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer, get_tracer
from sqlalchemy import Table
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine
from wrapt import wrap_function_wrapper

from todo_store import __version__, owned, repositories
from todo_store.engine import TodoStore
from todo_store.engine_telemetry import (
    DB_COLLECTION_NAME,
    DB_OPERATION_NAME,
    DB_SYSTEM_NAME,
    DURATION_BUCKETS,
    ERROR_TYPE,
    EngineState,
    EngineTelemetry,
    UnitCounts,
    current_unit,
    error_type,
    root_engine,
)
from todo_store.errors import CommitOutcomeUnknown, TransactionConflict

_INSTRUMENTS = ("todo-store >= 0.1",)

# This package's own attributes (the conventions' ones are in `engine_telemetry`).
UNIT_KIND = "todo_store.unit.kind"  # atomic | non-atomic | read-only | bound | replica
UNIT_OUTCOME = "todo_store.unit.outcome"  # ok | error
UNIT_ATTEMPT = "todo_store.unit.attempt"  # in `run`: 1, 2, ...
STATEMENTS = "todo_store.statements"
ROUND_TRIPS = "todo_store.round_trips"
RUN_ATTEMPTS = "todo_store.run.attempts"
RUN_RETRIES = "todo_store.run.retries"

_COLLECTIONS = {"TaskRepo": "tasks", "UserRepo": "users"}  # OwnedRepo's name their `table`


# -- per unit of work -----------------------------------------------------------------------


@dataclass(eq=False)
class _Run:
    attempts: int = 0
    active: UnitCounts | None = None


_current_run: contextvars.ContextVar[_Run | None] = contextvars.ContextVar(
    "todo_store_otel_run", default=None
)


def _reset(var: contextvars.ContextVar[Any], token: contextvars.Token[Any]) -> None:
    # A unit entered in one task and left in another (rare) cannot reset: leave it.
    try:
        var.reset(token)
    except ValueError:
        var.set(None)


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
            "opentelemetry.instrumentation.sqlalchemy",
            sqlalchemy_tracing_version,
            tracer_provider,
        )
        meter = get_meter(__name__, __version__, meter_provider)
        self._create_instruments(meter)
        self._engines = EngineTelemetry(meter, self._sql_tracer)
        self._stores: weakref.WeakKeyDictionary[TodoStore, _StoreState] = (
            weakref.WeakKeyDictionary()
        )
        self._wrapped: list[tuple[Any, str]] = []
        self._wrap(TodoStore, "__init__", self._traced_init)
        self._wrap(TodoStore, "session", self._traced_session)
        self._wrap(TodoStore, "run", self._traced_run)
        for repo in _repository_classes():
            for name, method in vars(repo).items():
                if not name.startswith("_") and inspect.iscoroutinefunction(method):
                    self._wrap(repo, name, self._repository_call(name))

    def _uninstrument(self, **kwargs: Any) -> None:
        for owner, name in self._wrapped:
            unwrap(owner, name)
        self._wrapped.clear()
        self._engines.untrace_all()
        self._stores.clear()

    def _wrap(self, owner: Any, name: str, wrapper: Callable[..., Any]) -> None:
        wrap_function_wrapper(owner, name, wrapper)
        self._wrapped.append((owner, name))

    # -- instruments ---------------------------------------------------------------------

    def _create_instruments(self, meter: Meter) -> None:
        seconds: dict[str, Any] = {
            "unit": "s",
            "explicit_bucket_boundaries_advisory": DURATION_BUCKETS,
        }
        self._unit_duration = meter.create_histogram(
            "todo_store.unit_of_work.duration",
            description="Duration of units of work (store.session / store.run attempts).",
            **seconds,
        )
        self._operation_duration = meter.create_histogram(
            "db.client.operation.duration",
            description="Duration of repository calls (one SQL statement each).",
            **seconds,
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

    # -- stores and engines ----------------------------------------------------------------

    def _traced_init(
        self, wrapped: Callable[..., None], instance: TodoStore, args: Any, kwargs: Any
    ) -> None:
        wrapped(*args, **kwargs)
        primary = root_engine(instance.engine.sync_engine)
        statement_cache = bool(getattr(instance.settings, "statement_cache", False))
        store = _StoreState(primary, statement_cache)
        self._stores[instance] = store
        self._engines.trace(primary, "primary", statement_cache=statement_cache)
        self._trace_held_engines(instance, store)

    def _trace_held_engines(self, instance: TodoStore, store: _StoreState) -> None:
        """Trace the other engines the store holds (replicas), as `replica`: when it is created,
        so that their connects and warm-up are measured, and again at its first unit of work,
        for engines a subclass adds after `TodoStore.__init__`. An engine a unit of work runs
        on is traced then at the latest (`_unit_engine`)."""
        for engine in _engines_held_by(instance):
            root = root_engine(engine.sync_engine)
            if root is not store.primary:
                self._engines.trace(root, "replica", statement_cache=store.statement_cache)

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
            span.set_attribute(ERROR_TYPE, error_type(error))
            raise
        finally:
            _reset(_current_run, token)
            span.set_attribute(RUN_ATTEMPTS, run.attempts)
            span.set_attribute(RUN_RETRIES, max(0, run.attempts - 1))
            span.end()

    def _unit_started(self, unit: UnitCounts) -> int | None:
        """The attempt number when `unit` is a run's attempt (not a unit nested in `work`)."""
        run = _current_run.get()
        if run is None or run.active is not None:
            return None
        run.active = unit
        run.attempts += 1
        if run.attempts > 1:
            self._retries.add(1, {ERROR_TYPE: _class_name(TransactionConflict)})
        return run.attempts

    def _unit_engine(self, store: _StoreState, session: Any) -> EngineState:
        """The traced engine the session runs on (traced now if the store made it lately)."""
        bind = getattr(session, "bind", None)
        sync_engine = getattr(bind, "sync_engine", None)
        root = root_engine(sync_engine) if isinstance(sync_engine, Engine) else store.primary
        role = "primary" if root is store.primary else "replica"
        return self._engines.trace(root, role, statement_cache=store.statement_cache)

    # -- repository calls ------------------------------------------------------------------

    def _repository_call(self, method: str) -> Callable[..., Any]:
        # Named after the instance's class: `OwnedRepo.get` runs as `TagRepo.get`.
        labels: dict[type, tuple[str, dict[str, Any]]] = {}

        def label(repo: type) -> tuple[str, dict[str, Any]]:
            found = labels.get(repo)
            if found is None:
                static: dict[str, Any] = {DB_SYSTEM_NAME: "postgresql", DB_OPERATION_NAME: method}
                collection = _collection(repo)
                if collection:
                    static[DB_COLLECTION_NAME] = collection
                found = labels[repo] = (f"{repo.__name__}.{method}", static)
            return found

        tracer, duration = self._tracer, self._operation_duration

        async def call(wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any) -> Any:
            if not is_instrumentation_enabled():
                return await wrapped(*args, **kwargs)
            name, static = label(type(instance))
            unit = current_unit.get()
            attributes = {**unit.server, **static} if unit is not None else static
            span = tracer.start_span(name, kind=SpanKind.INTERNAL, attributes=attributes)
            started = time.perf_counter()
            try:
                with trace.use_span(
                    span, end_on_exit=False, record_exception=False, set_status_on_exception=False
                ):
                    return await wrapped(*args, **kwargs)
            except BaseException as error:
                attributes = {**attributes, ERROR_TYPE: error_type(error)}
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
        self._unit = UnitCounts()
        self._engine: EngineState | None = None

    async def __aenter__(self) -> Any:
        instrumentor = self._instrumentor
        self._attempt = instrumentor._unit_started(self._unit)
        self._span = instrumentor._tracer.start_span("TodoStore.session", kind=SpanKind.INTERNAL)
        self._context_token = otel_context.attach(trace.set_span_in_context(self._span))
        self._unit_token = current_unit.set(self._unit)
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
        _reset(current_unit, self._unit_token)
        run = _current_run.get()
        if run is not None and run.active is unit:
            run.active = None
        attributes: dict[str, Any] = {
            UNIT_KIND: self._kind(),
            UNIT_OUTCOME: "ok" if error is None else "error",
            **unit.server,
        }
        if error is not None:
            attributes[ERROR_TYPE] = error_type(error)
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


def _class_name(cls: type[BaseException]) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _repository_classes() -> list[type]:
    """The repositories: the classes named `...Repo` that `todo_store.repositories` and
    `todo_store.owned` define (an application's `OwnedRepo` subclasses inherit the wrapping)."""
    return [
        value
        for module in (repositories, owned)
        for name, value in vars(module).items()
        if isinstance(value, type) and name.endswith("Repo") and value.__module__ == module.__name__
    ]


def _collection(repo: type) -> str | None:
    table = getattr(repo, "table", None)
    if isinstance(table, Table):
        return table.name
    for cls in repo.__mro__:
        if cls.__name__ in _COLLECTIONS:
            return _COLLECTIONS[cls.__name__]
    return None


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


__all__ = ["TodoStoreInstrumentor"]
