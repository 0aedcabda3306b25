"""A small FastAPI service on `todo_store`: every task scoped to the caller, each request one
unit of work. Run: `uvicorn --factory examples.fastapi_app:create_app` (reads DATABASE_URL,
`.env`).

How requests use the database:
- a route that makes ONE repository call uses `store.session(atomic=False)` (`OneCall`): the
  call commits by itself, with no BEGIN/COMMIT around it (half the round trips);
- a route whose writes must all happen or none (`POST /tasks/batch`) runs them in
  `store.run(...)`: one transaction, run again if the database reports a conflict.

What clients get back:
- 401 without an identity; 404 for a task that is missing or another user's (the same body);
- 409 when a uniqueness rule refuses a write (e.g. the email is taken);
- 422 for bad input, naming the field, never echoing the input (at most 20 errors, each field
  name cut to 100 characters), also for text that is not valid Unicode (a lone surrogate);
- 503 when the database is unreachable or busy (`DatabaseUnavailable`, and a conflict that
  persisted through the retries: `Retry-After: 1`), when it refuses this service's login
  (`ConnectionRejected`: a configuration problem, logged), when the schema is not migrated,
  and when a commit's outcome is unknown (`CommitOutcomeUnknown`: no Retry-After, the body
  says to read before retrying);
- 500 only for a database error the package does not classify (`DatabaseError`), with a fixed
  body: nothing from the driver or the input reaches a client.

Needs FastAPI >= 0.121 for `Depends(..., scope="function")`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, FastAPI, Header, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from sqlalchemy.ext.asyncio import AsyncSession

from todo_store import (
    CommitOutcomeUnknown,
    ConflictError,
    ConnectionRejected,
    DatabaseError,
    DatabaseUnavailable,
    InvalidData,
    NotFoundError,
    SchemaNotReady,
    TaskCreate,
    TaskNotFound,
    TaskPatch,
    TaskRead,
    TaskRepo,
    TodoStore,
    TransactionConflict,
    UserNotFound,
    UserProfile,
    UserRead,
    UserRepo,
)

log = logging.getLogger("examples.fastapi_app")

BATCH_MAX = 50
ERRORS_SHOWN = 20
TEXT_MAX = 100  # characters of a field name or message shown in a 422


# ------------------------------------------------------------------------------ responses


class TaskPage(BaseModel):
    """One page of tasks, newest first; pass `next_before` as `before` for the next page
    (`null`: this is the last page)."""

    items: list[TaskRead]
    next_before: int | None


# ----------------------------------------------------------------- identity and sessions


async def current_user_id(x_user_id: Annotated[str | None, Header()] = None) -> str:
    """The caller's id. Example only: a real service verifies the Better Auth session cookie or
    JWT here (signed with BETTER_AUTH_SECRET) and returns its subject; never trust a header."""
    if not x_user_id:
        raise HTTPException(401, "not authenticated", headers={"WWW-Authenticate": "Bearer"})
    return x_user_id


def _store(request: Request) -> TodoStore:
    store: TodoStore = request.app.state.store
    return store


async def one_call(request: Request) -> AsyncIterator[AsyncSession]:
    """A session for ONE repository call: no transaction, the call commits by itself."""
    async with _store(request).session(atomic=False) as session:
        yield session


# scope="function": the session closes before the response is sent, not after.
OneCall = Annotated[AsyncSession, Depends(one_call, scope="function")]
UserId = Annotated[str, Depends(current_user_id)]
Store = Annotated[TodoStore, Depends(_store)]


router = APIRouter()


@router.put("/me")
async def put_me(body: UserProfile, user_id: UserId, session: OneCall) -> UserRead:
    user = await UserRepo(session).upsert(user_id, email=body.email, name=body.name)
    return UserRead.model_validate(user)


@router.get("/tasks")
async def list_tasks(
    user_id: UserId,
    session: OneCall,
    completed: bool | None = None,
    limit: int = 50,
    before: int | None = None,
) -> TaskPage:
    tasks = await TaskRepo(session).list_for(
        user_id, completed=completed, limit=limit, before=before
    )
    # A full page may have a successor; a short one is the last.
    next_before = tasks[-1].id if len(tasks) == limit else None
    return TaskPage(items=[TaskRead.model_validate(t) for t in tasks], next_before=next_before)


@router.post("/tasks", status_code=201)
async def create_task(body: TaskCreate, user_id: UserId, session: OneCall) -> TaskRead:
    task = await TaskRepo(session).create(user_id, title=body.title, description=body.description)
    return TaskRead.model_validate(task)


@router.post("/tasks/batch", status_code=201)
async def create_tasks(
    body: Annotated[list[TaskCreate], Body(min_length=1, max_length=BATCH_MAX)],
    user_id: UserId,
    store: Store,
) -> list[TaskRead]:
    """All the tasks, or none of them: one transaction, retried on a conflict."""

    async def create_all(session: AsyncSession) -> list[TaskRead]:
        tasks = TaskRepo(session)
        created = [
            await tasks.create(user_id, title=new.title, description=new.description)
            for new in body
        ]
        return [TaskRead.model_validate(task) for task in created]

    return await store.run(create_all)


# Declared before /tasks/{task_id}: routes match in order, and "count" would be taken as an id.
@router.get("/tasks/count")
async def count_tasks(user_id: UserId, session: OneCall, completed: bool | None = None) -> int:
    return await TaskRepo(session).count_for(user_id, completed=completed)


@router.get("/tasks/{task_id}")
async def get_task(task_id: int, user_id: UserId, session: OneCall) -> TaskRead:
    return TaskRead.model_validate(await TaskRepo(session).get(user_id, task_id))


@router.patch("/tasks/{task_id}")
async def patch_task(task_id: int, body: TaskPatch, user_id: UserId, session: OneCall) -> TaskRead:
    task = await TaskRepo(session).update(user_id, task_id, **body.changes())
    return TaskRead.model_validate(task)


@router.post("/tasks/{task_id}/toggle")
async def toggle_task(task_id: int, user_id: UserId, session: OneCall) -> TaskRead:
    return TaskRead.model_validate(await TaskRepo(session).toggle(user_id, task_id))


@router.delete("/tasks/{task_id}", status_code=204)
async def delete_task(task_id: int, user_id: UserId, session: OneCall) -> None:
    await TaskRepo(session).delete(user_id, task_id)


# ------------------------------------------------------------------------ error responses


def _detail(status: int, detail: object, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def _short(part: object) -> object:
    if isinstance(part, str) and len(part) > TEXT_MAX:
        return part[:TEXT_MAX] + "…"
    return part


def validation_errors(errors: Sequence[Any]) -> list[dict[str, object]]:
    """What a 422 body says about each error: where and why, never the input given.

    `loc` may hold a key the client sent (an unknown field): names and messages are cut to
    `TEXT_MAX` characters and at most `ERRORS_SHOWN` errors are listed, so a huge body never
    comes back in the response.
    """
    return [
        {
            "loc": [_short(part) for part in error["loc"]],
            "msg": _short(error["msg"]),
            "type": error["type"],
        }
        for error in errors[:ERRORS_SHOWN]
    ]


_RETRY_SHORTLY = {"Retry-After": "1"}


def _add_error_responses(app: FastAPI) -> None:
    # Bodies are fixed strings: nothing from the driver, and a task of another user is
    # indistinguishable from one that does not exist.
    @app.exception_handler(NotFoundError)
    async def not_found(_request: Request, error: NotFoundError) -> JSONResponse:
        if isinstance(error, TaskNotFound):
            return _detail(404, "task not found")
        return _detail(404, "user not found" if isinstance(error, UserNotFound) else "not found")

    @app.exception_handler(ConflictError)
    async def conflict(_request: Request, error: ConflictError) -> JSONResponse:
        return _detail(409, str(error))  # the package's own message, e.g. EmailTaken's

    @app.exception_handler(RequestValidationError)
    async def bad_request(_request: Request, error: RequestValidationError) -> JSONResponse:
        return _detail(422, validation_errors(error.errors()))

    @app.exception_handler(ValidationError)
    async def invalid(_request: Request, error: ValidationError) -> JSONResponse:
        # Raised by the repositories; `loc` names the field.
        return _detail(422, validation_errors(error.errors(include_input=False)))

    @app.exception_handler(InvalidData)
    async def rejected(_request: Request, _error: InvalidData) -> JSONResponse:
        return _detail(
            422, [{"loc": [], "msg": "value rejected by the database", "type": "invalid"}]
        )

    @app.exception_handler(DatabaseUnavailable)
    async def unavailable(_request: Request, _error: DatabaseUnavailable) -> JSONResponse:
        return _detail(503, "database unavailable, retry shortly", _RETRY_SHORTLY)

    @app.exception_handler(TransactionConflict)
    async def busy(_request: Request, _error: TransactionConflict) -> JSONResponse:
        # Still conflicting after store.run's retries: nothing was written, and the same
        # request can succeed in a moment. 409 would tell the client its request is wrong.
        return _detail(503, "database busy, retry shortly", _RETRY_SHORTLY)

    @app.exception_handler(ConnectionRejected)
    async def misconfigured(_request: Request, error: ConnectionRejected) -> JSONResponse:
        # The database refuses this service's login or TLS: the operator must act; a client
        # retrying soon will not help, so no Retry-After.
        log.error("database connection rejected: %s", error)
        return _detail(503, "database unavailable")

    @app.exception_handler(CommitOutcomeUnknown)
    async def outcome_unknown(_request: Request, error: CommitOutcomeUnknown) -> JSONResponse:
        log.warning("commit outcome unknown: %s", error)
        return _detail(503, "the database did not confirm the write: read before retrying")

    @app.exception_handler(SchemaNotReady)
    async def not_ready(_request: Request, _error: SchemaNotReady) -> JSONResponse:
        return _detail(503, "database schema not ready")

    @app.exception_handler(DatabaseError)
    async def database_error(_request: Request, error: DatabaseError) -> JSONResponse:
        # Unclassified: a bug or a server fault, not the client's doing.
        log.error("database error: %s", error)
        return _detail(500, "internal error")


def create_app(store: TodoStore | None = None) -> FastAPI:
    """The app. A `store` given here is the caller's to dispose; otherwise one is built from
    the environment at startup and disposed at shutdown."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if store is not None:
            yield
            return
        app.state.store = TodoStore.from_env()
        try:
            yield
        finally:
            await app.state.store.dispose()

    app = FastAPI(title="todo_store example", lifespan=lifespan)
    if store is not None:
        app.state.store = store  # usable without running the lifespan (e.g. ASGITransport)
    app.include_router(router)
    _add_error_responses(app)
    return app
