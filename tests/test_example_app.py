"""The example FastAPI app (`examples/fastapi_app.py`) over HTTP, against the test database,
directly and through PgBouncer.

The app gets the suite's committing `store` (httpx's ASGITransport runs no lifespan); one test
runs it under uvicorn with its own lifespan. Every test uses fresh user ids and deletes those
users at the end.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from conftest import command_env
from sqlalchemy import delete
from sqlalchemy.engine import URL

from examples.fastapi_app import create_app
from todo_store import (
    CommitOutcomeUnknown,
    DatabaseError,
    Settings,
    TaskRepo,
    TodoStore,
    TransactionConflict,
    User,
    UserNotFound,
    UserRepo,
)
from todo_store.testing.postgres import ProvisionedServer, create_database, drop_database

NEVER_ISSUED_ID = 2**63 - 1  # a valid task id no task will ever get
REPOSITORY = Path(__file__).resolve().parents[1]


def _client(store: TodoStore) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=create_app(store))
    return httpx.AsyncClient(transport=transport, base_url="http://test")


def _as(user_id: str) -> dict[str, str]:
    return {"X-User-Id": user_id}


@pytest_asyncio.fixture(loop_scope="session")
async def client(served_store: TodoStore) -> AsyncIterator[httpx.AsyncClient]:
    async with _client(served_store) as http:
        yield http


@pytest_asyncio.fixture(loop_scope="session")
async def users(store: TodoStore, new_user_id: str) -> AsyncIterator[tuple[str, str]]:
    """Two fresh user ids (`me`, `other`), not yet created; deleted with their tasks after."""
    ids = (new_user_id, f"u_{uuid.uuid4().hex[:12]}")
    yield ids
    async with store.session() as session:
        await session.execute(delete(User).where(User.id.in_(ids)))


async def _sign_up(client: httpx.AsyncClient, user_id: str) -> None:
    response = await client.put(
        "/me", json={"email": f"{user_id}@example.com", "name": "Ada"}, headers=_as(user_id)
    )
    assert response.status_code == 200, response.text


async def test_happy_flow(
    client: httpx.AsyncClient, store: TodoStore, users: tuple[str, str]
) -> None:
    me, _ = users
    h = _as(me)
    response = await client.put(
        "/me", json={"email": f"Ada.{me}@Example.COM", "name": "Ada"}, headers=h
    )
    assert response.status_code == 200
    user = response.json()
    assert (user["id"], user["email"], user["name"]) == (me, f"ada.{me}@example.com", "Ada")
    assert set(user) == {"id", "email", "name", "created_at"}

    response = await client.post(
        "/tasks", json={"title": "  Buy milk ", "description": "2 l"}, headers=h
    )
    assert response.status_code == 201
    milk = response.json()
    assert (milk["user_id"], milk["title"], milk["description"], milk["completed"]) == (
        me,
        "Buy milk",
        "2 l",
        False,
    )
    bread = (await client.post("/tasks", json={"title": "Bread"}, headers=h)).json()
    assert bread["id"] > milk["id"]
    assert bread["description"] is None

    # Committed before the response: a separate unit of work sees it.
    async with store.session() as session:
        assert (await TaskRepo(session).get(me, milk["id"])).title == "Buy milk"

    listed = (await client.get("/tasks", headers=h)).json()
    assert [t["id"] for t in listed["items"]] == [bread["id"], milk["id"]]  # newest first
    assert listed["next_before"] is None
    page = await client.get("/tasks", params={"limit": 1, "before": bread["id"]}, headers=h)
    assert [t["id"] for t in page.json()["items"]] == [milk["id"]]

    response = await client.post(f"/tasks/{milk['id']}/toggle", headers=h)
    assert response.status_code == 200
    assert response.json()["completed"] is True
    done = await client.get("/tasks", params={"completed": "true"}, headers=h)
    assert [t["id"] for t in done.json()["items"]] == [milk["id"]]

    response = await client.patch(f"/tasks/{milk['id']}", json={"description": "oat"}, headers=h)
    assert response.status_code == 200
    patched = response.json()
    assert (patched["title"], patched["description"], patched["completed"]) == (
        "Buy milk",
        "oat",
        True,
    )
    cleared = await client.patch(f"/tasks/{milk['id']}", json={"description": None}, headers=h)
    assert cleared.json()["description"] is None
    assert cleared.json()["title"] == "Buy milk"

    assert (await client.get("/tasks/count", headers=h)).json() == 2
    assert (await client.get("/tasks/count", params={"completed": True}, headers=h)).json() == 1

    response = await client.delete(f"/tasks/{milk['id']}", headers=h)
    assert response.status_code == 204
    assert response.content == b""
    response = await client.get(f"/tasks/{milk['id']}", headers=h)
    assert response.status_code == 404
    assert response.json() == {"detail": "task not found"}
    assert (await client.get("/tasks/count", headers=h)).json() == 1


@pytest.mark.parametrize(
    ("method", "suffix", "body"),
    [
        ("GET", "", None),
        ("PATCH", "", {"title": "mine now", "completed": True}),
        ("POST", "/toggle", None),
        ("DELETE", "", None),
    ],
)
async def test_another_users_task_looks_missing(
    client: httpx.AsyncClient,
    users: tuple[str, str],
    method: str,
    suffix: str,
    body: dict[str, Any] | None,
) -> None:
    me, other = users
    await _sign_up(client, me)
    await _sign_up(client, other)
    theirs = (await client.post("/tasks", json={"title": "private"}, headers=_as(other))).json()

    foreign = await client.request(
        method, f"/tasks/{theirs['id']}{suffix}", json=body, headers=_as(me)
    )
    missing = await client.request(
        method, f"/tasks/{NEVER_ISSUED_ID}{suffix}", json=body, headers=_as(me)
    )
    assert foreign.status_code == missing.status_code == 404
    assert foreign.content == missing.content
    assert foreign.headers["content-length"] == missing.headers["content-length"]

    assert (await client.get(f"/tasks/{theirs['id']}", headers=_as(other))).json() == theirs
    assert (await client.get("/tasks", headers=_as(me))).json() == {
        "items": [],
        "next_before": None,
    }
    assert (await client.get("/tasks/count", headers=_as(me))).json() == 0


@pytest.mark.parametrize(
    ("route", "body", "field"),
    [
        ("POST /tasks", {"title": "   "}, "title"),
        ("POST /tasks", {"title": "x" * 201}, "title"),
        ("PATCH /tasks/1", {"title": None}, "title"),
        ("GET /tasks/0", None, "task_id"),
        ("DELETE /tasks/-1", None, "task_id"),
        ("GET /tasks?limit=501", None, "limit"),
        ("GET /tasks?limit=0", None, "limit"),
        ("PUT /me", {"email": "not-an-email", "name": "Ada"}, "email"),
        ("PUT /me", {"email": "ada@example.com", "name": " "}, "name"),
    ],
)
async def test_bad_input_is_422_naming_the_field(
    client: httpx.AsyncClient,
    users: tuple[str, str],
    route: str,
    body: dict[str, Any] | None,
    field: str,
) -> None:
    me, _ = users
    await _sign_up(client, me)
    method, path = route.split()
    response = await client.request(method, path, json=body, headers=_as(me))
    assert response.status_code == 422, response.text
    errors = response.json()["detail"]
    assert any(field in error["loc"] for error in errors), errors
    assert (await client.get("/tasks/count", headers=_as(me))).json() == 0


async def test_email_taken_is_409(
    client: httpx.AsyncClient, store: TodoStore, users: tuple[str, str]
) -> None:
    me, other = users
    email = f"{me}@example.com"
    await _sign_up(client, me)
    response = await client.put(
        "/me", json={"email": email.upper(), "name": "Eve"}, headers=_as(other)
    )
    assert response.status_code == 409
    assert response.json() == {"detail": "email is already used by another user"}
    async with store.session() as session:  # the failed unit of work left nothing behind
        with pytest.raises(UserNotFound):
            await UserRepo(session).get(other)
    # Re-sending one's own email is an update, not a conflict.
    again = await client.put("/me", json={"email": email, "name": "Ada L."}, headers=_as(me))
    assert again.status_code == 200
    assert again.json()["name"] == "Ada L."


async def test_task_before_profile_is_404_user_not_found(
    client: httpx.AsyncClient, users: tuple[str, str]
) -> None:
    me, _ = users
    response = await client.post("/tasks", json={"title": "too early"}, headers=_as(me))
    assert response.status_code == 404
    assert response.json() == {"detail": "user not found"}


async def test_no_identity_is_401(client: httpx.AsyncClient) -> None:
    response = await client.get("/tasks")
    assert response.status_code == 401


async def test_database_down_is_503_with_retry_after(new_user_id: str) -> None:
    settings = Settings(database_url="postgresql://postgres@127.0.0.1:1/nowhere", connect_timeout=2)
    async with TodoStore(settings) as down, _client(down) as http:
        response = await http.get("/tasks", headers=_as(new_user_id))
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert response.json() == {"detail": "database unavailable, retry shortly"}


@pytest_asyncio.fixture(loop_scope="session")
async def unmigrated_store(todo_store_server: ProvisionedServer) -> AsyncIterator[TodoStore]:
    name = f"todo_store_empty_{secrets.token_hex(4)}"
    url = await create_database(todo_store_server.admin_url, name)
    try:
        async with TodoStore(url) as empty:
            yield empty
    finally:
        await drop_database(todo_store_server.admin_url, name)


async def test_schema_missing_is_503(unmigrated_store: TodoStore, new_user_id: str) -> None:
    async with _client(unmigrated_store) as http:
        response = await http.get("/tasks", headers=_as(new_user_id))
    assert response.status_code == 503
    assert response.json() == {"detail": "database schema not ready"}


async def test_the_list_is_paged_with_a_cursor(
    client: httpx.AsyncClient, users: tuple[str, str]
) -> None:
    me, _ = users
    await _sign_up(client, me)
    created = (
        await client.post(
            "/tasks/batch", json=[{"title": f"task {n}"} for n in range(5)], headers=_as(me)
        )
    ).json()
    pages: list[list[int]] = []
    params: dict[str, int] = {"limit": 2}
    while True:
        page = (await client.get("/tasks", params=params, headers=_as(me))).json()
        pages.append([task["id"] for task in page["items"]])
        if page["next_before"] is None:
            break
        assert page["next_before"] == pages[-1][-1]
        params["before"] = page["next_before"]
    newest_first = sorted((task["id"] for task in created), reverse=True)
    assert pages == [newest_first[0:2], newest_first[2:4], newest_first[4:]]


async def test_batch_creates_all_or_none(client: httpx.AsyncClient, users: tuple[str, str]) -> None:
    me, other = users
    await _sign_up(client, me)
    response = await client.post(
        "/tasks/batch", json=[{"title": "one"}, {"title": "two"}], headers=_as(me)
    )
    assert response.status_code == 201, response.text
    assert [task["title"] for task in response.json()] == ["one", "two"]

    response = await client.post(
        "/tasks/batch", json=[{"title": "three"}, {"title": " "}], headers=_as(me)
    )
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", 1, "title"]
    response = await client.post("/tasks/batch", json=[{"title": "x"}] * 51, headers=_as(me))
    assert response.status_code == 422
    response = await client.post("/tasks/batch", json=[{"title": "x"}], headers=_as(other))
    assert response.status_code == 404
    assert (await client.get("/tasks/count", headers=_as(me))).json() == 2


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ('{"title": "\\ud800"}', "title"),  # a lone surrogate: JSON allows it, UTF-8 does not
        ('{"title": "ok", "description": "a\\udfffb"}', "description"),
    ],
)
async def test_text_that_is_not_unicode_is_422(
    client: httpx.AsyncClient, users: tuple[str, str], body: str, field: str
) -> None:
    me, _ = users
    await _sign_up(client, me)
    headers = {**_as(me), "content-type": "application/json"}
    response = await client.post("/tasks", content=body, headers=headers)
    assert response.status_code == 422, response.text
    assert [error["loc"] for error in response.json()["detail"]] == [["body", field]]
    assert "\\ud" not in response.text
    assert (await client.get("/tasks/count", headers=_as(me))).json() == 0


@pytest.mark.parametrize(
    "body",
    [
        {"title": "x" * 3_000_000},
        {"title": "ok", "x" * 1_000_000: 1},
        {"title": "ok", **{f"field_{n}": n for n in range(10_000)}},
        {"title": 7, "description": ["y" * 100_000] * 20},
    ],
    ids=["huge title", "huge unknown key", "many unknown keys", "huge wrong type"],
)
async def test_422_never_echoes_the_input(
    client: httpx.AsyncClient, users: tuple[str, str], body: dict[str, Any]
) -> None:
    me, _ = users
    response = await client.post("/tasks", json=body, headers=_as(me))
    assert response.status_code == 422
    assert len(response.content) < 4_000
    errors = response.json()["detail"]
    assert 1 <= len(errors) <= 20
    assert all(set(error) == {"loc", "msg", "type"} for error in errors)
    assert "x" * 101 not in response.text
    assert "y" * 101 not in response.text


async def test_rejected_login_is_503_without_retry_after(
    todo_store_server: ProvisionedServer, new_user_id: str
) -> None:
    server = todo_store_server
    query = {"host": server.host, "port": str(server.port)} if server.is_unix_socket else {}
    url = URL.create(
        "postgresql",
        "no_such_role",
        "secretpw",
        None if server.is_unix_socket else server.host,
        None if server.is_unix_socket else server.port,
        "postgres",
        query=query,
    ).render_as_string(hide_password=False)
    async with TodoStore(url) as rejected, _client(rejected) as http:
        response = await http.get("/tasks", headers=_as(new_user_id))
    assert response.status_code == 503
    assert "retry-after" not in response.headers
    assert response.json() == {"detail": "database unavailable"}
    assert "secretpw" not in response.text


@pytest.mark.parametrize(
    ("error", "status", "detail", "retry_after"),
    [
        (TransactionConflict("40001"), 503, "database busy, retry shortly", "1"),
        (
            CommitOutcomeUnknown("the connection was lost during COMMIT"),
            503,
            "outcome unknown: the database did not confirm the write; read before retrying",
            None,
        ),
        (DatabaseError("XX000"), 500, "internal error", None),
    ],
    ids=["TransactionConflict", "CommitOutcomeUnknown", "DatabaseError"],
)
async def test_package_errors_map_to_fixed_responses(
    store: TodoStore, error: Exception, status: int, detail: str, retry_after: str | None
) -> None:
    # These arise from timing (conflicts, a connection lost mid-COMMIT, a server fault), which
    # the engine's own tests provoke for real; here only the response each one gets is checked.
    app = create_app(store)

    async def fails() -> None:
        raise error

    app.add_api_route("/fails", fails)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        response = await http.get("/fails")
    assert response.status_code == status
    assert response.json() == {"detail": detail}
    assert response.headers.get("retry-after") == retry_after


async def test_me_is_read_in_one_snapshot(
    client: httpx.AsyncClient, users: tuple[str, str]
) -> None:
    me, other = users
    await _sign_up(client, me)
    created = await client.post(
        "/tasks/batch", json=[{"title": "open"}, {"title": "done"}], headers=_as(me)
    )
    await client.post(f"/tasks/{created.json()[1]['id']}/toggle", headers=_as(me))
    response = await client.get("/me", headers=_as(me))
    assert response.status_code == 200
    body = response.json()
    assert (body["user"]["id"], body["open_tasks"], body["done_tasks"]) == (me, 1, 1)
    missing = await client.get("/me", headers=_as(other))
    assert (missing.status_code, missing.json()) == (404, {"detail": "user not found"})


def _operation(schema: dict[str, Any], method: str, path: str) -> dict[str, Any]:
    operation: dict[str, Any] = schema["paths"][path][method]
    return operation


def _parameter(operation: dict[str, Any], name: str) -> dict[str, Any]:
    [parameter] = [p for p in operation["parameters"] if p["name"] == name]
    schema: dict[str, Any] = parameter["schema"]
    return schema


def test_openapi_lists_the_bounds_and_the_error_responses(store: TodoStore) -> None:
    schema = create_app(store).openapi()
    listing = _operation(schema, "get", "/tasks")
    assert (_parameter(listing, "limit")["minimum"], _parameter(listing, "limit")["maximum"]) == (
        1,
        500,
    )
    before = _parameter(listing, "before")["anyOf"][0]
    assert (before["exclusiveMinimum"], before["maximum"]) == (0, 2**63 - 1)
    for method, path in [
        ("get", "/tasks/{task_id}"),
        ("patch", "/tasks/{task_id}"),
        ("post", "/tasks/{task_id}/toggle"),
        ("delete", "/tasks/{task_id}"),
    ]:
        operation = _operation(schema, method, path)
        assert _parameter(operation, "task_id")["exclusiveMinimum"] == 0
        assert {"404", "422", "500", "503"} <= set(operation["responses"])
        assert "Retry-After" in operation["responses"]["503"]["headers"]
    assert "409" in _operation(schema, "put", "/me")["responses"]
    components = schema["components"]["schemas"]
    title = components["TaskCreate"]["properties"]["title"]
    assert (title["minLength"], title["maxLength"]) == (1, 200)
    # The 422 schema is the shape sent: no `input`, no `ctx`.
    assert set(components["ValidationError"]["properties"]) == {"loc", "msg", "type"}
    assert components["HTTPValidationError"]["properties"]["detail"]["maxItems"] == 20


async def test_uvicorn_serves_the_app_with_its_own_store(
    todo_store_settings: Settings, new_user_id: str
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    argv = [
        *(sys.executable, "-m", "uvicorn", "--factory", "examples.fastapi_app:create_app"),
        *("--host", "127.0.0.1", "--port", str(port)),
    ]
    env = command_env(todo_store_settings.database_url.get_secret_value())
    server = subprocess.Popen(  # noqa: ASYNC220 - runs beside the test, stopped in `finally`
        argv, cwd=REPOSITORY, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            response = await _first_answer(http, f"/tasks/{NEVER_ISSUED_ID}", _as(new_user_id))
        assert (response.status_code, response.json()) == (404, {"detail": "task not found"})
    finally:
        server.terminate()
        output, _ = server.communicate(timeout=30)
    # The lifespan ran to its end (the store disposed); uvicorn re-raises the SIGTERM it got.
    assert b"Application shutdown complete" in output, output.decode()


async def _first_answer(
    http: httpx.AsyncClient, path: str, headers: dict[str, str]
) -> httpx.Response:
    """The first response of a server still starting (bounded: 30 s)."""
    async with asyncio.timeout(30):
        while True:
            try:
                return await http.get(path, headers=headers)
            except httpx.ConnectError:
                await asyncio.sleep(0.05)


async def test_edits_with_a_stale_if_match_are_412_and_change_nothing(
    client: httpx.AsyncClient, users: tuple[str, str]
) -> None:
    me, _ = users
    await _sign_up(client, me)
    created = await client.post("/tasks", json={"title": "draft"}, headers=_as(me))
    task_id, first = created.json()["id"], created.headers["etag"]
    read = await client.get(f"/tasks/{task_id}", headers=_as(me))
    assert read.headers["etag"] == first == '"1"'

    edited = await client.patch(
        f"/tasks/{task_id}", json={"title": "final"}, headers={**_as(me), "If-Match": first}
    )
    assert (edited.status_code, edited.headers["etag"]) == (200, '"2"')
    stale = {**_as(me), "If-Match": first}
    for method, suffix, body in [
        ("PATCH", "", {"title": "overwritten"}),
        ("POST", "/toggle", None),
        ("DELETE", "", None),
    ]:
        response = await client.request(
            method, f"/tasks/{task_id}{suffix}", json=body, headers=stale
        )
        assert response.status_code == 412, (method, suffix)
        assert response.headers["etag"] == '"2"'
        assert response.json() == {
            "detail": "precondition failed: the task has changed; read it again"
        }
    now = (await client.get(f"/tasks/{task_id}", headers=_as(me))).json()
    assert (now["title"], now["completed"], now["version"]) == ("final", False, 2)

    # Without If-Match the last write wins; with the current ETag the delete goes through.
    assert (await client.post(f"/tasks/{task_id}/toggle", headers=_as(me))).status_code == 200
    current = {**_as(me), "If-Match": '"3"'}
    assert (await client.delete(f"/tasks/{task_id}", headers=current)).status_code == 204


async def test_two_editors_of_one_version_one_wins_one_gets_412(
    client: httpx.AsyncClient, users: tuple[str, str]
) -> None:
    me, _ = users
    await _sign_up(client, me)
    created = await client.post("/tasks", json={"title": "shared"}, headers=_as(me))
    task_id, seen = created.json()["id"], created.headers["etag"]
    headers = {**_as(me), "If-Match": seen}
    first, second = await asyncio.gather(
        client.patch(f"/tasks/{task_id}", json={"title": "from phone"}, headers=headers),
        client.patch(f"/tasks/{task_id}", json={"title": "from laptop"}, headers=headers),
    )
    assert sorted([first.status_code, second.status_code]) == [200, 412]
    winner = first if first.status_code == 200 else second
    now = (await client.get(f"/tasks/{task_id}", headers=_as(me))).json()
    assert now["title"] == winner.json()["title"]
    assert now["version"] == 2
