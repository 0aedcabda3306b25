"""The FastAPI integration (`todo_store.fastapi`) over HTTP, against the test database.

Each test builds a small app on the integration and talks to it through httpx's ASGI
transport; `tests/test_example_app.py` covers the example service route by route.
"""

from __future__ import annotations

import asyncio
import inspect
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any

import httpx
import pytest
import pytest_asyncio
from conftest import granted_role
from fastapi import Depends, FastAPI, Header, HTTPException
from fastapi.responses import JSONResponse
from sqlalchemy import delete, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncSession

import todo_store.errors
from todo_store import Settings, Task, TaskRepo, TodoStore, TodoStoreError, User, UserRepo
from todo_store.binding import USER_SETTING
from todo_store.fastapi import (
    STALE,
    LimitQuery,
    UnitOfWork,
    error_responses,
    get_store,
    if_match,
    install,
    store_lifespan,
    unit_of_work,
    use_store,
)
from todo_store.testing.plugin import settings_for, start_pgbouncer
from todo_store.testing.postgres import ProvisionedServer


async def caller(x_user_id: Annotated[str, Header()]) -> str:
    return x_user_id


calls: list[str] = []


async def counted_caller(x_user_id: Annotated[str, Header()]) -> str:
    calls.append(x_user_id)
    return x_user_id


Atomic = Annotated[UnitOfWork, unit_of_work(user_id=caller)]
OneCall = Annotated[UnitOfWork, unit_of_work(user_id=caller, atomic=False)]
ReadOnly = Annotated[UnitOfWork, unit_of_work(user_id=caller, read_only=True)]
CountedCall = Annotated[UnitOfWork, unit_of_work(user_id=counted_caller, atomic=False)]
Unbound = Annotated[AsyncSession, unit_of_work(user_id=None, atomic=False)]


def _client(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def _app(store: TodoStore | None = None) -> FastAPI:
    app = FastAPI(lifespan=store_lifespan())
    if store is not None:
        use_store(app, store)
    install(app)
    return app


@pytest_asyncio.fixture(loop_scope="session")
async def user_id(store: TodoStore) -> AsyncIterator[str]:
    """A user that exists (committed), deleted with its tasks after the test."""
    user = f"u_{uuid.uuid4().hex[:12]}"
    async with store.session() as session:
        await UserRepo(session).upsert(user, email=f"{user}@example.com", name="Ada")
    yield user
    async with store.session() as session:
        await session.execute(delete(User).where(User.id == user))


def test_importing_the_package_never_imports_fastapi() -> None:
    code = (
        "import pkgutil, sys, importlib, todo_store\n"
        "for m in pkgutil.walk_packages(todo_store.__path__, 'todo_store.'):\n"
        "    if m.name != 'todo_store.fastapi': importlib.import_module(m.name)\n"
        "found = sorted(n for n in sys.modules if n.split('.')[0] in ('fastapi', 'starlette'))\n"
        "print(found)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "[]"


async def test_the_unit_of_work_commits_before_the_response(store: TodoStore, user_id: str) -> None:
    app = _app(store)

    @app.post("/orm-task")
    async def orm_task(owner: Annotated[str, Header()], work: Atomic) -> str:
        # Flushed only at commit, after the route returned: a commit that fails must be the
        # response, not a 200 already sent.
        work.session.add(Task(user_id=owner, title="written at commit"))
        return "sent"

    async with _client(app) as http:
        ok = await http.post("/orm-task", headers={"x-user-id": user_id, "owner": user_id})
        refused = await http.post("/orm-task", headers={"x-user-id": user_id, "owner": "u_none"})
    assert (ok.status_code, ok.json()) == (200, "sent")
    assert (refused.status_code, refused.json()) == (404, {"detail": "user not found"})
    async with store.session() as session:
        assert await TaskRepo(session).count_for(user_id) == 1


async def test_a_route_that_raises_leaves_nothing_written(store: TodoStore, user_id: str) -> None:
    app = _app(store)

    @app.post("/half")
    async def half(work: Atomic) -> None:
        await work.tasks.create(work.user_id, title="first of two")
        raise HTTPException(418, "stopped half way")

    async with _client(app) as http:
        response = await http.post("/half", headers={"x-user-id": user_id})
    assert response.status_code == 418
    async with store.session() as session:
        assert await TaskRepo(session).count_for(user_id) == 0


async def test_an_error_status_rolls_back(store: TodoStore, user_id: str) -> None:
    app = _app(store)

    @app.post("/refused")
    async def refused(work: Atomic) -> JSONResponse:
        await work.tasks.create(work.user_id, title="answered with an error")
        return JSONResponse({"detail": "refused"}, status_code=409)

    async with _client(app) as http:
        response = await http.post("/refused", headers={"x-user-id": user_id})
    assert response.status_code == 409
    async with store.session() as session:
        assert await TaskRepo(session).count_for(user_id) == 0


@pytest.mark.parametrize("error", [RuntimeError("a bug"), asyncio.CancelledError()])
async def test_an_escaping_exception_rolls_back_and_passes_unchanged(
    store: TodoStore, user_id: str, error: BaseException
) -> None:
    app = _app(store)

    @app.post("/escapes")
    async def escapes(work: Atomic) -> None:
        await work.tasks.create(work.user_id, title="written before the error")
        raise error

    async with _client(app) as http:
        with pytest.raises(type(error)) as raised:
            await http.post("/escapes", headers={"x-user-id": user_id})
    assert raised.value is error
    async with store.session() as session:
        assert await TaskRepo(session).count_for(user_id) == 0


async def test_an_unbound_unit_is_a_plain_session(store: TodoStore, user_id: str) -> None:
    app = _app(store)

    @app.get("/users/{owner}/count")
    async def count(owner: str, session: Unbound) -> int:
        return await TaskRepo(session).count_for(owner)

    async with _client(app) as http:
        response = await http.get(f"/users/{user_id}/count")
    assert (response.status_code, response.json()) == (200, 0)


async def test_parameters_with_one_marker_share_the_unit(store: TodoStore, user_id: str) -> None:
    app = _app(store)

    @app.get("/same")
    async def same(first: Atomic, second: Atomic, third: ReadOnly) -> list[bool]:
        return [first is second, first is third]

    async with _client(app) as http:
        response = await http.get("/same", headers={"x-user-id": user_id})
    assert response.json() == [True, False]


async def test_the_callers_dependency_runs_once_per_request(store: TodoStore, user_id: str) -> None:
    calls.clear()
    app = _app(store)

    @app.get("/count")
    async def count(user: Annotated[str, Depends(counted_caller)], work: CountedCall) -> int:
        assert work.user_id == user
        return await work.tasks.count_for(user)

    async with _client(app) as http:
        response = await http.get("/count", headers={"x-user-id": user_id})
    assert (response.status_code, response.json(), calls) == (200, 0, [user_id])


def test_user_id_must_be_named_and_be_a_dependency() -> None:
    with pytest.raises(TypeError):
        unit_of_work()  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="dependency"):
        unit_of_work(user_id="u_1")  # type: ignore[arg-type]


async def test_a_read_only_unit_refuses_writes(store: TodoStore, user_id: str) -> None:
    app = _app(store)

    @app.post("/write-while-reading")
    async def write(work: ReadOnly) -> None:
        await work.tasks.create(work.user_id, title="must not be written")

    async with _client(app) as http:
        response = await http.post("/write-while-reading", headers={"x-user-id": user_id})
    # A route that writes in a read-only unit is a bug of the service, not of the client.
    assert (response.status_code, response.json()) == (500, {"detail": "internal error"})
    async with store.session() as session:
        assert await TaskRepo(session).count_for(user_id) == 0


async def test_two_users_never_see_each_others_tasks(
    store: TodoStore, served_store: TodoStore, user_id: str
) -> None:
    served = served_store
    other = f"u_{uuid.uuid4().hex[:12]}"
    async with store.session() as session:
        await UserRepo(session).upsert(other, email=f"{other}@example.com", name="Bob")
    app = _app(served)

    @app.post("/tasks")
    async def create(work: OneCall) -> int:
        return (await work.tasks.create(work.user_id, title="mine")).id

    @app.get("/tasks/{task_id}")
    async def get(task_id: int, work: OneCall) -> str:
        return (await work.tasks.get(work.user_id, task_id)).user_id

    try:
        async with _client(app) as http:
            mine = (await http.post("/tasks", headers={"x-user-id": user_id})).json()
            theirs = (await http.post("/tasks", headers={"x-user-id": other})).json()
            own = await http.get(f"/tasks/{mine}", headers={"x-user-id": user_id})
            foreign = await http.get(f"/tasks/{theirs}", headers={"x-user-id": user_id})
        assert (own.status_code, own.json()) == (200, user_id)
        assert (foreign.status_code, foreign.json()) == (404, {"detail": "task not found"})
    finally:
        async with store.session() as session:
            await session.execute(delete(User).where(User.id == other))


# -- errors ----------------------------------------------------------------------------------


def _package_errors() -> list[type[TodoStoreError]]:
    return [
        value
        for value in vars(todo_store.errors).values()
        if inspect.isclass(value)
        and issubclass(value, TodoStoreError)
        and value is not TodoStoreError
    ]


@pytest.mark.parametrize("error", _package_errors(), ids=lambda error: error.__name__)
def test_every_package_error_has_a_response(error: type[TodoStoreError]) -> None:
    app = FastAPI()
    install(app)
    handled = [cls for cls in error.__mro__ if cls in app.exception_handlers]
    assert handled, f"{error.__name__} has no handler"
    # Not only the root: each error gets a response that says what happened.
    assert handled[0] is not TodoStoreError


async def test_422_has_one_shape_whoever_refused_the_input(store: TodoStore, user_id: str) -> None:
    app = _app(store)

    @app.get("/bounded")
    async def bounded(limit: LimitQuery) -> int:
        return limit

    @app.get("/unbounded/{before}")
    async def unbounded(before: int, limit: int, work: OneCall) -> None:
        # No bounds declared here: the repository refuses the values itself.
        await work.tasks.list_for(work.user_id, limit=limit, before=before)

    @app.post("/loose")
    async def loose(body: dict[str, Any], work: OneCall) -> None:
        await work.tasks.create(work.user_id, title=body["title"])

    as_user = {"x-user-id": user_id}
    async with _client(app) as http:
        by_fastapi = await http.get("/bounded", params={"limit": 501})
        by_repository = await http.get("/unbounded/0", params={"limit": 501}, headers=as_user)
        by_body = await http.post("/loose", json={"title": "   "}, headers=as_user)
    assert by_fastapi.status_code == by_repository.status_code == by_body.status_code == 422
    assert [e["loc"] for e in by_fastapi.json()["detail"]] == [["query", "limit"]]
    assert sorted(e["loc"] for e in by_repository.json()["detail"]) == [
        ["path", "before"],
        ["query", "limit"],
    ]
    assert [e["loc"] for e in by_body.json()["detail"]] == [["body", "title"]]
    for response in (by_fastapi, by_repository, by_body):
        assert all(set(e) == {"loc", "msg", "type"} for e in response.json()["detail"])


async def test_database_outage_is_503_with_retry_after_then_recovers(
    todo_store_server: ProvisionedServer, todo_store_settings: Settings, user_id: str
) -> None:
    database = make_url(todo_store_settings.database_url.get_secret_value()).database or ""
    with socket.socket() as probe:  # a free port, kept across PgBouncer's stop and start
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    bouncer = start_pgbouncer(todo_store_server, database, listen=("127.0.0.1", port))
    settings = settings_for(bouncer.url).model_copy(update={"connect_timeout": 2})
    app = _app()

    @app.get("/count")
    async def count(work: OneCall) -> int:
        return await work.tasks.count_for(work.user_id)

    try:
        async with TodoStore(settings) as through_bouncer, _client(app) as http:
            use_store(app, through_bouncer)
            as_user = {"x-user-id": user_id}
            assert (await http.get("/count", headers=as_user)).json() == 0
            bouncer.stop()
            down = await http.get("/count", headers=as_user)
            assert down.status_code == 503
            assert down.headers["retry-after"] == "1"
            assert down.json() == {"detail": "database unavailable, retry shortly"}
            bouncer.start()
            # While its connects failed the store backs off (at most 1 s): a client that waits
            # the Retry-After it was given gets through within a few attempts.
            back = await http.get("/count", headers=as_user)
            for _ in range(3):
                if back.status_code != 503:
                    break
                await asyncio.sleep(int(back.headers["retry-after"]))
                back = await http.get("/count", headers=as_user)
            assert (back.status_code, back.json()) == (200, 0)
    finally:
        bouncer.stop()


# -- If-Match ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "status", "body"),
    [
        (None, 200, None),
        ("*", 200, None),
        ('"7"', 200, 7),
        (' "12" ', 200, 12),
        ('W/"7"', 412, {"detail": STALE}),  # weak: never matches for a write
        ("7", 412, {"detail": STALE}),
        ('"0"', 412, {"detail": STALE}),  # no task has version 0 ...
        (f'"{2**31}"', 412, {"detail": STALE}),  # ... nor one past the column's range
    ],
)
async def test_if_match_gives_the_expected_version(
    header: str | None, status: int, body: object
) -> None:
    app = _app()

    @app.get("/expected")
    async def expected(version: Annotated[int | None, if_match()]) -> int | None:
        return version

    async with _client(app) as http:
        headers = {} if header is None else {"if-match": header}
        response = await http.get("/expected", headers=headers)
    assert (response.status_code, response.json()) == (status, body)


async def test_if_match_required_is_428_and_a_list_is_422() -> None:
    app = _app()

    @app.get("/expected")
    async def expected(version: Annotated[int | None, if_match(required=True)]) -> int | None:
        return version

    async with _client(app) as http:
        missing = await http.get("/expected")
        listed = await http.get("/expected", headers={"if-match": '"1", "2"'})
    assert missing.status_code == 428
    assert listed.status_code == 422
    assert [e["loc"] for e in listed.json()["detail"]] == [["header", "if-match"]]


# -- lifespan ------------------------------------------------------------------------------------


async def test_lifespan_creates_the_store_and_disposes_it(
    todo_store_settings: Settings, user_id: str
) -> None:
    app = FastAPI(lifespan=store_lifespan(todo_store_settings))
    install(app)

    connections: list[Any] = []

    @app.get("/count")
    async def count(work: OneCall) -> int:
        raw = await (await work.session.connection()).get_raw_connection()
        connections.append(raw.driver_connection)
        return await work.tasks.count_for(work.user_id)

    async with app.router.lifespan_context(app), _client(app) as http:
        assert isinstance(app.state.todo_store, TodoStore)
        assert (await http.get("/count", headers={"x-user-id": user_id})).json() == 0
        [pooled] = connections
        assert not pooled.is_closed()
    assert pooled.is_closed()
    assert app.state.todo_store is None


async def test_lifespan_warm_opens_connections_before_the_first_request(
    todo_store_settings: Settings,
) -> None:
    app = FastAPI(lifespan=store_lifespan(todo_store_settings, warm=2))
    async with app.router.lifespan_context(app):
        store = app.state.todo_store
        assert isinstance(store, TodoStore)
        assert store.engine.pool.checkedin() == 2  # open and idle, no request made yet
    assert app.state.todo_store is None


async def test_lifespan_without_warm_opens_no_connection(todo_store_settings: Settings) -> None:
    app = FastAPI(lifespan=store_lifespan(todo_store_settings))
    async with app.router.lifespan_context(app):
        assert app.state.todo_store.engine.pool.checkedin() == 0


async def test_lifespan_warm_beyond_the_pool_fails_startup_naming_n(
    todo_store_settings: Settings,
) -> None:
    too_many = todo_store_settings.pool_size + 1
    app = FastAPI(lifespan=store_lifespan(todo_store_settings, warm=too_many))
    with pytest.raises(ValueError, match=r"^n: expected 1 to POOL_SIZE"):
        async with app.router.lifespan_context(app):
            pass
    assert getattr(app.state, "todo_store", None) is None


async def test_get_store_gives_routes_the_apps_store(store: TodoStore, user_id: str) -> None:
    app = _app(store)

    @app.get("/count")
    async def count(
        served: Annotated[TodoStore, Depends(get_store)], user: Annotated[str, Depends(caller)]
    ) -> int:
        assert served is store

        async def work(session: AsyncSession) -> int:
            return await TaskRepo(session).count_for(user)

        return await served.run(work)

    async with _client(app) as http:
        response = await http.get("/count", headers={"x-user-id": user_id})
    assert (response.status_code, response.json()) == (200, 0)


async def test_lifespan_leaves_a_given_store_to_its_owner(store: TodoStore) -> None:
    app = _app(store)
    async with app.router.lifespan_context(app):
        assert app.state.todo_store is store
    assert app.state.todo_store is store
    await store.ping()


async def test_an_app_without_the_integration_or_a_store_says_what_is_missing() -> None:
    bare, storeless = FastAPI(), _app()
    for app in (bare, storeless):

        @app.get("/work")
        async def work(unit: OneCall) -> None:
            pass

    async with _client(bare) as http:
        with pytest.raises(RuntimeError, match=r"install\(app\)"):
            await http.get("/work", headers={"x-user-id": "u_1"})
    async with _client(storeless) as http:
        with pytest.raises(RuntimeError, match="store_lifespan"):
            await http.get("/work", headers={"x-user-id": "u_1"})


def test_error_responses_document_only_what_is_sent() -> None:
    documented = error_responses(404, 503)
    assert set(documented) == {404, 503}
    assert "Retry-After" in documented[503]["headers"]
    with pytest.raises(ValueError, match="418"):
        error_responses(418)


async def test_a_route_that_forgets_the_owner_filter_sees_only_the_callers_rows(
    store: TodoStore,
    todo_store_server: ProvisionedServer,
    todo_store_settings: Settings,
    user_id: str,
) -> None:
    other = f"u_{uuid.uuid4().hex[:12]}"
    async with store.session() as session:
        await UserRepo(session).upsert(other, email=f"{other}@example.com", name="Bob")
        await TaskRepo(session).create(user_id, title="mine")
        await TaskRepo(session).create(other, title="theirs")
    app = _app()

    @app.get("/owners")
    async def owners(work: OneCall) -> dict[str, Any]:
        # Application SQL with no WHERE user_id: row-level security holds it to the caller.
        rows = await work.session.execute(text("SELECT DISTINCT user_id FROM tasks"))
        bound = await work.session.execute(text(f"SELECT current_setting('{USER_SETTING}')"))
        return {"owners": sorted(row[0] for row in rows), "bound": bound.scalar_one()}

    database_url = todo_store_settings.database_url.get_secret_value()
    try:
        async with (
            granted_role(todo_store_server, database_url) as runtime_url,
            TodoStore(settings_for(runtime_url)) as runtime,
            _client(app) as http,
        ):
            use_store(app, runtime)
            response = await http.get("/owners", headers={"x-user-id": user_id})
        assert response.json() == {"owners": [user_id], "bound": user_id}
    finally:
        async with store.session() as session:
            await session.execute(delete(User).where(User.id == other))
