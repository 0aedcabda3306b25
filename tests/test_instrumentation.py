"""OpenTelemetry instrumentation: spans, metrics, and nothing secret in what is exported.

Every test runs with `TodoStoreInstrumentor` enabled (the autouse `telemetry` fixture, created
before the `store` fixtures, so that they are stores created after `instrument()`) and the
SDK's in-memory span exporter, metric reader and log exporter.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import uuid
import warnings
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx
import pytest
import pytest_asyncio
from fastapi import FastAPI, Header
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.sdk._logs import LoggerProvider, LoggingHandler
from opentelemetry.sdk._logs.export import SimpleLogRecordProcessor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from sqlalchemy import (
    BigInteger,
    Column,
    ForeignKey,
    Identity,
    MetaData,
    String,
    Table,
    event,
    text,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url
from sqlalchemy.util import await_only
from wrapt import FunctionWrapper

from todo_store import (
    CommitOutcomeUnknown,
    DatabaseUnavailable,
    EmailTaken,
    OwnedRepo,
    Settings,
    TaskNotFound,
    TaskRepo,
    TodoStore,
    UserRepo,
    migrations,
)
from todo_store.engine import create_engine
from todo_store.instrumentation import TodoStoreInstrumentor
from todo_store.models import User
from todo_store.testing.pgbouncer import PgBouncer
from todo_store.testing.plugin import settings_for
from todo_store.testing.postgres import ProvisionedServer

try:  # the name since opentelemetry-sdk 1.39
    from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter as InMemoryLogExporter
except ImportError:  # pragma: no cover - older SDKs
    from opentelemetry.sdk._logs.export import InMemoryLogExporter  # type: ignore[no-redef]


@dataclass
class Telemetry:
    spans: InMemorySpanExporter
    metrics: InMemoryMetricReader
    logs: InMemoryLogExporter
    tracer_provider: TracerProvider
    meter_provider: MeterProvider

    def finished(self) -> list[ReadableSpan]:
        return list(self.spans.get_finished_spans())

    def points(self, name: str) -> list[Any]:
        """Every data point of metric `name` collected now."""
        data = self.metrics.get_metrics_data()
        found: list[Any] = []
        for resource in data.resource_metrics if data else []:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name == name:
                        found.extend(metric.data.data_points)
        return found


@pytest.fixture(autouse=True)
def telemetry() -> Iterator[Telemetry]:
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    metrics = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[metrics])
    logs = InMemoryLogExporter()
    logger_provider = LoggerProvider()
    logger_provider.add_log_record_processor(SimpleLogRecordProcessor(logs))
    with warnings.catch_warnings():  # deprecated in newer SDKs, the one older ones have
        warnings.simplefilter("ignore", DeprecationWarning)
        handler = LoggingHandler(level=logging.DEBUG, logger_provider=logger_provider)
    root, package = logging.getLogger(), logging.getLogger("todo_store")
    root.addHandler(handler)
    level = package.level
    package.setLevel(logging.DEBUG)
    instrumentor = TodoStoreInstrumentor()
    instrumentor.instrument(tracer_provider=tracer_provider, meter_provider=meter_provider)
    try:
        yield Telemetry(spans, metrics, logs, tracer_provider, meter_provider)
    finally:
        instrumentor.uninstrument()
        root.removeHandler(handler)
        package.setLevel(level)
        meter_provider.shutdown()


def _by_name(spans: list[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [span for span in spans if span.name == name]


def _parent(spans: list[ReadableSpan], span: ReadableSpan) -> ReadableSpan:
    assert span.parent is not None, f"{span.name} has no parent"
    (parent,) = [s for s in spans if s.context.span_id == span.parent.span_id]
    return parent


def _sql_children(spans: list[ReadableSpan], parent: ReadableSpan) -> list[ReadableSpan]:
    return [
        s
        for s in spans
        if s.parent is not None
        and s.parent.span_id == parent.context.span_id
        and s.kind is SpanKind.CLIENT
    ]


# -- packaging ----------------------------------------------------------------------------------


def test_importing_the_package_imports_no_opentelemetry() -> None:
    """Without `instrument()`, OpenTelemetry is never imported (the extra may be absent)."""
    code = (
        "import sys, todo_store, todo_store.engine, todo_store.repositories\n"
        "from todo_store import TodoStore, TaskRepo\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('opentelemetry', 'wrapt'))\n"
        "print(loaded)\n"
        "sys.exit(1 if loaded else 0)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stdout + run.stderr


def test_opentelemetry_instrument_finds_the_instrumentor() -> None:
    from importlib.metadata import entry_points  # noqa: PLC0415

    (entry,) = entry_points(group="opentelemetry_instrumentor", name="todo_store")
    assert entry.load() is TodoStoreInstrumentor
    assert TodoStoreInstrumentor().instrumentation_dependencies()


# -- spans --------------------------------------------------------------------------------------


def _tiny_app(store: TodoStore) -> FastAPI:
    """A FastAPI service as an application writes it; the user comes from a header, as from
    an auth token, so that no user id is in the URL."""
    app = FastAPI()

    @app.get("/tasks")
    async def list_tasks(x_user: str = Header()) -> dict[str, int]:
        async with store.session(atomic=False) as session:
            tasks = await TaskRepo(session).list_for(x_user)
        return {"count": len(tasks)}

    return app


@pytest.mark.parametrize("path", ["direct", "pgbouncer"])
async def test_a_request_is_traced_from_fastapi_down_to_sql(
    path: str,
    store: TodoStore,
    pooled_store: TodoStore,
    telemetry: Telemetry,
    new_user_id: str,
) -> None:
    store = store if path == "direct" else pooled_store
    async with store.session() as session:
        await UserRepo(session).upsert(new_user_id, email=f"{new_user_id}@example.com", name="Ada")
        await TaskRepo(session).create(new_user_id, title="Buy milk")
    app = _tiny_app(store)
    FastAPIInstrumentor.instrument_app(
        app, tracer_provider=telemetry.tracer_provider, meter_provider=telemetry.meter_provider
    )
    telemetry.spans.clear()
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            response = await client.get("/tasks", headers={"X-User": new_user_id})
        assert response.json() == {"count": 1}
    finally:
        FastAPIInstrumentor.uninstrument_app(app)

    spans = telemetry.finished()
    (sql,) = [s for s in spans if s.kind is SpanKind.CLIENT]
    repository = _parent(spans, sql)
    unit = _parent(spans, repository)
    server = _parent(spans, unit)
    assert [sql.name.split()[0], repository.name, unit.name] == [
        "SELECT",
        "TaskRepo.list_for",
        "TodoStore.session",
    ]
    assert server.kind is SpanKind.SERVER
    assert server.name == "GET /tasks"
    assert server.parent is None

    url = make_url(store.settings.database_url.get_secret_value())
    expected_server = {"db.system.name": "postgresql", "db.namespace": url.database}
    if url.host:  # not on a Unix socket
        expected_server.update({"server.address": url.host, "server.port": url.port or 5432})
    assert unit.attributes is not None
    assert repository.attributes is not None
    assert {key: unit.attributes[key] for key in expected_server} == expected_server
    assert {key: repository.attributes[key] for key in expected_server} == expected_server
    assert unit.attributes["todo_store.unit.kind"] == "non-atomic"
    assert unit.attributes["todo_store.unit.outcome"] == "ok"
    assert unit.attributes["todo_store.statements"] == 1
    assert unit.attributes["todo_store.round_trips"] == 2  # prepare + execute, no BEGIN/COMMIT
    assert repository.attributes["db.operation.name"] == "list_for"
    assert repository.attributes["db.collection.name"] == "tasks"
    assert unit.status.status_code is StatusCode.UNSET


async def test_unit_kinds_round_trips_and_errors(
    store: TodoStore, telemetry: Telemetry, new_user_id: str
) -> None:
    email = f"{new_user_id}@example.com"
    async with store.session() as session:  # atomic, 2 calls: 2n + 2 round trips
        await UserRepo(session).upsert(new_user_id, email=email, name="Ada")
        task = await TaskRepo(session).create(new_user_id, title="Buy milk")
    async with store.session(read_only=True) as session:
        await TaskRepo(session).count_for(new_user_id)
    with pytest.raises(TaskNotFound):
        async with store.session() as session:
            await TaskRepo(session).get(new_user_id, task.id + 1_000_000)
    other = f"{new_user_id}_b"
    with pytest.raises(EmailTaken):
        async with store.session(atomic=False) as session:
            await UserRepo(session).upsert(other, email=email, name="Bob")

    spans = telemetry.finished()
    units = _by_name(spans, "TodoStore.session")
    assert [u.attributes and u.attributes["todo_store.unit.kind"] for u in units] == [
        "atomic",
        "read-only",
        "atomic",
        "non-atomic",
    ]
    written, read, missing, taken = units
    assert written.attributes is not None
    assert read.attributes is not None
    assert written.attributes["todo_store.statements"] == 2
    assert written.attributes["todo_store.round_trips"] == 6
    assert read.attributes["todo_store.round_trips"] == 4

    # A failed call: the class of the error, never its message (it names the user).
    assert missing.status.status_code is StatusCode.ERROR
    assert missing.attributes is not None
    assert missing.attributes["error.type"] == "todo_store.errors.TaskNotFound"
    (get,) = _by_name(spans, "TaskRepo.get")
    assert get.attributes is not None
    assert get.attributes["error.type"] == "todo_store.errors.TaskNotFound"
    assert not missing.events
    assert not get.events

    # The failed statement's SQL span is exported (the store's error hook raises its own error,
    # which would otherwise stop the SQL tracing from ending it), with the SQLSTATE only.
    (upsert,) = [s for s in _by_name(spans, "UserRepo.upsert") if _parent(spans, s) is taken]
    (failed_sql,) = _sql_children(spans, upsert)
    assert failed_sql.status.status_code is StatusCode.ERROR
    assert failed_sql.status.description is None
    assert failed_sql.attributes is not None
    assert failed_sql.attributes["db.response.status_code"] == "23505"
    assert failed_sql.attributes["error.type"].endswith("UniqueViolationError")
    assert taken.attributes is not None
    assert taken.attributes["error.type"] == "todo_store.errors.EmailTaken"


async def test_every_engine_is_traced_not_only_the_first(
    store: TodoStore, pooled_store: TodoStore, telemetry: Telemetry, new_user_id: str
) -> None:
    """Two stores, two engines (and each store's non-atomic and read-only variants): SQL spans
    under every one. The SQLAlchemy instrumentor's own `instrument(engine=...)` traces only the
    first engine it is given."""
    for each in (store, pooled_store):
        for options in ({}, {"atomic": False}, {"read_only": True}):
            async with each.session(**options) as session:
                await TaskRepo(session).count_for(new_user_id)
    spans = telemetry.finished()
    counts = _by_name(spans, "TaskRepo.count_for")
    assert len(counts) == 6
    for count in counts:
        (sql,) = _sql_children(spans, count)
        assert sql.name.startswith("SELECT")
    servers = {
        (count.attributes.get("server.address"), count.attributes.get("server.port"))
        for count in counts
        if count.attributes is not None
    }
    assert len(servers) == 2  # PostgreSQL and PgBouncer


_tags = Table(
    "tags",
    MetaData(),
    Column("id", BigInteger, Identity(always=True), primary_key=True),
    Column("user_id", ForeignKey(User.__table__.c.id, ondelete="CASCADE"), nullable=False),
    Column("name", String(40), nullable=False),
)


class TagRepo(OwnedRepo[Any]):
    table = _tags


async def test_an_applications_own_repository_is_traced_by_its_name(
    empty_database: str, telemetry: Telemetry, new_user_id: str
) -> None:
    settings = settings_for(empty_database)
    await migrations.upgrade(settings)
    async with TodoStore(settings) as store:
        async with store.engine.begin() as connection:
            await connection.run_sync(_tags.metadata.create_all)
        async with store.session() as session:
            await UserRepo(session).upsert(
                new_user_id, email=f"{new_user_id}@example.com", name="A"
            )
            await TagRepo(session).create(new_user_id, name="home")
    spans = telemetry.finished()
    (create,) = _by_name(spans, "TagRepo.create")
    assert create.attributes is not None
    assert create.attributes["db.collection.name"] == "tags"
    assert create.attributes["db.operation.name"] == "create"
    (sql,) = _sql_children(spans, create)
    assert sql.name.startswith("INSERT")
    assert _parent(spans, create).name == "TodoStore.session"


class _StoreWithAReplica(TodoStore):
    """A store that holds a second engine, as a store with a read replica does."""

    def __init__(self, settings: Settings, replica_url: str) -> None:
        super().__init__(settings)
        self.replicas = [create_engine(settings_for(replica_url))]

    async def dispose(self) -> None:
        for replica in self.replicas:
            await replica.dispose()
        await super().dispose()


async def test_engines_the_store_holds_are_traced_too(
    todo_store_settings: Settings, todo_store_pgbouncer: PgBouncer, telemetry: Telemetry
) -> None:
    async with _StoreWithAReplica(todo_store_settings, todo_store_pgbouncer.url) as store:
        async with store.session():  # the first unit of work finds the engine the subclass added
            pass
        telemetry.spans.clear()
        async with store.replicas[0].connect() as connection:
            await connection.execute(text("SELECT 1"))
            points = telemetry.points("db.client.connection.count")
    assert [span.name.split()[0] for span in telemetry.finished()] == ["SELECT"]
    used = {
        point.attributes["todo_store.pool.role"]: point.value
        for point in points
        if point.attributes["db.client.connection.state"] == "used"
    }
    assert used == {"primary": 0, "replica": 1}


def _listener_counts(store: TodoStore) -> dict[str, int]:
    engine = store.engine.sync_engine
    return {
        "handle_error": len(engine.dialect.dispatch.handle_error),
        "do_connect": len(engine.dialect.dispatch.do_connect),
        "before_cursor_execute": len(engine.dispatch.before_cursor_execute),
        "begin": len(engine.dispatch.begin),
        "checkout": len(engine.pool.dispatch.checkout),
        "invalidate": len(engine.pool.dispatch.invalidate),
    }


async def test_uninstrument_removes_everything(
    store: TodoStore, todo_store_settings: Settings, telemetry: Telemetry
) -> None:
    """After `uninstrument()` the code that runs is the package's own: no wrapper, no event
    listener, no patched pool method (so its calls cost what they cost without the extra)."""
    instrumented = _listener_counts(store)
    assert isinstance(vars(TaskRepo)["get"], FunctionWrapper)
    assert "connect" in vars(store.engine.pool)
    TodoStoreInstrumentor().uninstrument()
    try:
        for owner, name in [(TodoStore, "__init__"), (TodoStore, "session"), (TodoStore, "run")]:
            assert not isinstance(vars(owner)[name], FunctionWrapper), name
        for repo in (TaskRepo, UserRepo):
            for name, method in vars(repo).items():
                assert not isinstance(method, FunctionWrapper), f"{repo.__name__}.{name}"
        assert "connect" not in vars(store.engine.pool)
        async with TodoStore(todo_store_settings) as plain:
            assert _listener_counts(store) == _listener_counts(plain) != instrumented
        async with store.session() as session:
            await TaskRepo(session).count_for("nobody")
        assert telemetry.finished() == []
        assert telemetry.points("todo_store.unit_of_work.duration") == []
    finally:
        TodoStoreInstrumentor().instrument(
            tracer_provider=telemetry.tracer_provider, meter_provider=telemetry.meter_provider
        )


async def test_a_store_made_before_instrument_is_left_alone(
    todo_store_settings: Settings, telemetry: Telemetry
) -> None:
    TodoStoreInstrumentor().uninstrument()
    async with TodoStore(todo_store_settings) as earlier:
        TodoStoreInstrumentor().instrument(
            tracer_provider=telemetry.tracer_provider, meter_provider=telemetry.meter_provider
        )
        async with earlier.session() as session:
            await TaskRepo(session).count_for("nobody")
        assert _by_name(telemetry.finished(), "TodoStore.session") == []


# -- metrics, through a known workload ------------------------------------------------------


SECRET_PASSWORD = "pw-" + uuid.uuid4().hex


@pytest_asyncio.fixture(loop_scope="session")
async def small_store(todo_store_settings: Settings) -> AsyncIterator[TodoStore]:
    """A store with a pool of 1 (+1 overflow), short timeouts, and a password in its URL
    (the test server trusts the connection; the password must still never be exported)."""
    url = make_url(todo_store_settings.database_url.get_secret_value())
    settings = settings_for(
        url.set(password=SECRET_PASSWORD).render_as_string(hide_password=False)
    ).model_copy(
        update={"pool_size": 1, "max_overflow": 1, "pool_timeout": 0.2, "statement_timeout": 0.5}
    )
    async with TodoStore(settings) as store:
        yield store


def _sum(points: list[Any], **attributes: Any) -> int:
    wanted = {key.replace("__", "."): value for key, value in attributes.items()}
    return sum(
        point.count if hasattr(point, "count") else point.value
        for point in points
        if all(point.attributes.get(key) == value for key, value in wanted.items())
    )


async def test_metrics_after_a_known_workload(
    small_store: TodoStore,
    telemetry: Telemetry,
    todo_store_server: ProvisionedServer,
    new_user_id: str,
) -> None:
    store, user = small_store, new_user_id
    secrets = _Secrets(user=user, email=f"{user}@example.com", title=f"Secret plan {user}")
    connects = checkouts = 0

    def connected(*_args: Any) -> None:
        nonlocal connects
        connects += 1

    def checked_out(*_args: Any) -> None:
        nonlocal checkouts
        checkouts += 1

    engine = store.engine.sync_engine
    event.listen(engine, "connect", connected)
    event.listen(engine, "checkout", checked_out)

    # 1 unit that writes, then n = 5 units that read.
    async with store.session() as session:
        await UserRepo(session).upsert(user, email=secrets.email, name="Ada Secret")
        task = await TaskRepo(session).create(user, title=secrets.title, description=secrets.title)
    for _ in range(5):
        async with store.session(atomic=False) as session:
            await TaskRepo(session).get(user, task.id)

    # One TransactionConflict, retried by run(): another unit changes the row the first attempt
    # read under REPEATABLE READ.
    async def work(session: Any) -> None:
        await session.execute(text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ"))
        await TaskRepo(session).get(user, task.id)
        if not interfered:
            interfered.append(True)
            async with store.session() as other:
                await TaskRepo(other).update(user, task.id, title=secrets.title + " 2")
        await TaskRepo(session).update(user, task.id, title=secrets.title + " 3")

    interfered: list[bool] = []
    await store.run(work)

    # One statement timeout (atomic: DatabaseUnavailable), one commit of unknown outcome (a
    # statement that is not a read and times out in a non-atomic unit may have written).
    with pytest.raises(DatabaseUnavailable):
        async with store.session() as session:
            await session.execute(text("SELECT pg_sleep(5)"))
    with pytest.raises(CommitOutcomeUnknown):
        async with store.session(atomic=False) as session:
            # Not a read (a DO block may write), so its outcome is unknown when it times out.
            await session.execute(text("DO $$ BEGIN PERFORM pg_sleep(5); END $$"))

    # One dead connection: the pooled connection's server process is killed while it is idle.
    async with store.session() as session:
        pid = (await session.execute(text("SELECT pg_backend_pid()"))).scalar_one()
    admin = await asyncpg.connect(todo_store_server.admin_url)
    try:
        assert await admin.fetchval("SELECT pg_terminate_backend($1, 5000)", pid)
    finally:
        await admin.close()
    async with store.session() as session:
        await TaskRepo(session).count_for(user)

    # The pool while two units hold a connection each (pool of 1 + 1 overflow), and a third
    # that waits POOL_TIMEOUT for one in vain.
    async with store.session() as first, store.session() as second:
        await first.execute(text("SELECT 1"))
        await second.execute(text("SELECT 1"))
        in_use = _sum(
            telemetry.points("db.client.connection.count"),
            **{"db__client__connection__state": "used"},
        )
        overflow = _sum(telemetry.points("todo_store.pool.overflow"))
        with pytest.raises((sa_exc.TimeoutError, DatabaseUnavailable)):
            async with asyncio.timeout(30), store.session() as third:
                await third.execute(text("SELECT 1"))
    assert (in_use, overflow) == (2, 1)
    event.remove(engine, "connect", connected)
    event.remove(engine, "checkout", checked_out)

    def total(name: str, **attributes: Any) -> int:
        return _sum(telemetry.points(name), **attributes)

    units = "todo_store.unit_of_work.duration"
    assert total(units, todo_store__unit__kind="non-atomic", todo_store__unit__outcome="ok") == 5
    assert total(units, error__type="todo_store.errors.TransactionConflict") == 1
    assert total(units, error__type="todo_store.errors.CommitOutcomeUnknown") == 1
    assert total("todo_store.unit_of_work.retries") == 1
    assert total("todo_store.commit.outcome_unknown") == 1
    assert total("todo_store.statement.timeouts") == 2
    replaced = "todo_store.connection.replacements"
    assert total(replaced, todo_store__connection__replace_reason="dead_at_checkout") == 1
    assert total(replaced, todo_store__connection__replace_reason="timed_out") == 2
    assert total("db.client.connection.timeouts") == 1
    assert total("db.client.connection.create_time") == connects
    assert total("db.client.connection.wait_time") == checkouts + 1  # + the one that timed out
    assert total("db.client.operation.duration", db__operation__name="get") == 5 + 2
    idle = total("db.client.connection.count", db__client__connection__state="idle")
    used = total("db.client.connection.count", db__client__connection__state="used")
    assert (idle, used) == (store.engine.pool.checkedin(), 0)  # type: ignore[attr-defined]
    assert total("db.client.connection.max") == 2
    assert total("db.client.connection.pending_requests") == 0

    # The run: its two attempts under one span.
    spans = telemetry.finished()
    (run,) = _by_name(spans, "TodoStore.run")
    assert run.attributes is not None
    assert (
        run.attributes["todo_store.run.attempts"],
        run.attributes["todo_store.run.retries"],
    ) == (
        2,
        1,
    )
    attempts = [s for s in _by_name(spans, "TodoStore.session") if _is_child(s, run)]
    assert [a.attributes and a.attributes.get("todo_store.unit.attempt") for a in attempts] == [
        1,
        2,
    ]

    secrets.assert_absent(telemetry)


def _is_child(span: ReadableSpan, parent: ReadableSpan) -> bool:
    return span.parent is not None and span.parent.span_id == parent.context.span_id


@dataclass
class _Secrets:
    user: str
    email: str
    title: str

    def assert_absent(self, telemetry: Telemetry) -> None:
        """No exported span, metric point or log record holds any of the test's secrets."""
        exported = [span.to_json() for span in telemetry.finished()]
        data = telemetry.metrics.get_metrics_data()
        assert data is not None
        exported.append(data.to_json())
        records = telemetry.logs.get_finished_logs()
        for record in records:  # newer SDKs export the record itself, older ones wrap it
            readable = record if hasattr(record, "to_json") else record.log_record
            exported.append(readable.to_json())
        text_ = "\n".join(exported)
        assert "TodoStore.session" in text_  # the scan reads what was exported
        for secret in (SECRET_PASSWORD, self.user, self.email, self.title, "Ada Secret"):
            assert secret not in text_, "a secret was exported"


async def test_nothing_secret_in_a_traced_request(
    pooled_store: TodoStore, telemetry: Telemetry, new_user_id: str
) -> None:
    """Through PgBouncer: a FastAPI request, a not-found error and a uniqueness conflict."""
    secrets = _Secrets(
        user=new_user_id, email=f"{new_user_id}@example.com", title=f"Secret {new_user_id}"
    )
    async with pooled_store.session() as session:
        await UserRepo(session).upsert(new_user_id, email=secrets.email, name="Ada Secret")
        await TaskRepo(session).create(new_user_id, title=secrets.title)
    with pytest.raises(TaskNotFound):
        async with pooled_store.session() as session:
            await TaskRepo(session).get(new_user_id, 2**31 - 1)
    with pytest.raises(EmailTaken):
        async with pooled_store.session() as session:
            await UserRepo(session).upsert(new_user_id + "x", email=secrets.email, name="Ada")
    app = _tiny_app(pooled_store)
    FastAPIInstrumentor.instrument_app(
        app, tracer_provider=telemetry.tracer_provider, meter_provider=telemetry.meter_provider
    )
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            assert (await client.get("/tasks", headers={"X-User": new_user_id})).status_code == 200
    finally:
        FastAPIInstrumentor.uninstrument_app(app)
    logging.getLogger("todo_store").info("a record the handler exports")  # the scan sees logs
    assert telemetry.logs.get_finished_logs()
    secrets.assert_absent(telemetry)


async def test_a_connection_replaced_under_a_units_first_round_trip_is_counted(
    todo_store_settings: Settings, telemetry: Telemetry
) -> None:
    """The pool slot keeps its place (the pool sees no invalidation), so the replacement is
    counted by the store: `replacements{reason="dead_at_first_use"}`."""
    url = todo_store_settings.database_url.get_secret_value()
    async with TodoStore(todo_store_settings) as store:
        async with store.session() as session:
            await session.execute(text("SELECT 1"))
        killed: list[int] = []

        @event.listens_for(store.engine.sync_engine, "begin")
        def kill_before_the_begin(conn: Any) -> None:
            if not killed:
                killed.append(conn.connection.driver_connection.get_server_pid())
                await_only(_terminate_and_wait(url, killed[0]))

        async with store.session() as session:
            await session.execute(text("SELECT 1"))
    assert killed
    assert (
        _sum(
            telemetry.points("todo_store.connection.replacements"),
            todo_store__connection__replace_reason="dead_at_first_use",
        )
        == 1
    )


async def _terminate_and_wait(url: str, pid: int) -> None:
    admin = await asyncpg.connect(url)
    try:
        await admin.execute("SELECT pg_terminate_backend($1, 5000)", pid)
    finally:
        await admin.close()
