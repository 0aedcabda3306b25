"""A small FastAPI service on `todo_store`: one unit of work per request, every task scoped to
the caller. Run: `uvicorn --factory examples.fastapi_app:create_app` (reads DATABASE_URL, `.env`).

Needs FastAPI >= 0.121 for `Depends(..., scope="function")`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Header, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncSession

from todo_store import (
    ConflictError,
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
    UserNotFound,
    UserProfile,
    UserRead,
    UserRepo,
)


async def unit_of_work(request: Request) -> AsyncIterator[AsyncSession]:
    """One transaction per request: committed if the route returns, rolled back if it raises."""
    store: TodoStore = request.app.state.store
    async with store.session() as session:
        yield session


async def current_user_id(x_user_id: Annotated[str | None, Header()] = None) -> str:
    """The caller's id. Example only: a real service verifies the Better Auth session cookie or
    JWT here (signed with BETTER_AUTH_SECRET) and returns its subject; never trust a header."""
    if not x_user_id:
        raise HTTPException(401, "not authenticated", headers={"WWW-Authenticate": "Bearer"})
    return x_user_id


# scope="function": the COMMIT runs (and can fail) before the response is sent, not after.
Session = Annotated[AsyncSession, Depends(unit_of_work, scope="function")]
UserId = Annotated[str, Depends(current_user_id)]


router = APIRouter()


@router.put("/me")
async def put_me(body: UserProfile, user_id: UserId, session: Session) -> UserRead:
    user = await UserRepo(session).upsert(user_id, email=body.email, name=body.name)
    return UserRead.model_validate(user)


@router.get("/tasks")
async def list_tasks(
    user_id: UserId,
    session: Session,
    completed: bool | None = None,
    limit: int = 50,
    before: int | None = None,
) -> list[TaskRead]:
    tasks = await TaskRepo(session).list_for(
        user_id, completed=completed, limit=limit, before=before
    )
    return [TaskRead.model_validate(task) for task in tasks]


@router.post("/tasks", status_code=201)
async def create_task(body: TaskCreate, user_id: UserId, session: Session) -> TaskRead:
    task = await TaskRepo(session).create(user_id, title=body.title, description=body.description)
    return TaskRead.model_validate(task)


# Declared before /tasks/{task_id}: routes match in order, and "count" would be taken as an id.
@router.get("/tasks/count")
async def count_tasks(user_id: UserId, session: Session, completed: bool | None = None) -> int:
    return await TaskRepo(session).count_for(user_id, completed=completed)


@router.get("/tasks/{task_id}")
async def get_task(task_id: int, user_id: UserId, session: Session) -> TaskRead:
    return TaskRead.model_validate(await TaskRepo(session).get(user_id, task_id))


@router.patch("/tasks/{task_id}")
async def patch_task(task_id: int, body: TaskPatch, user_id: UserId, session: Session) -> TaskRead:
    task = await TaskRepo(session).update(user_id, task_id, **body.changes())
    return TaskRead.model_validate(task)


@router.post("/tasks/{task_id}/toggle")
async def toggle_task(task_id: int, user_id: UserId, session: Session) -> TaskRead:
    return TaskRead.model_validate(await TaskRepo(session).toggle(user_id, task_id))


@router.delete("/tasks/{task_id}", status_code=204)
async def delete_task(task_id: int, user_id: UserId, session: Session) -> None:
    await TaskRepo(session).delete(user_id, task_id)


def _detail(status: int, detail: object, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


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

    @app.exception_handler(ValidationError)
    async def invalid(_request: Request, error: ValidationError) -> JSONResponse:
        # Raised by the repositories; `loc` names the field. No input echoed back.
        errors = error.errors(include_url=False, include_context=False, include_input=False)
        return _detail(
            422, [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in errors]
        )

    @app.exception_handler(InvalidData)
    async def rejected(_request: Request, _error: InvalidData) -> JSONResponse:
        return _detail(
            422, [{"loc": [], "msg": "value rejected by the database", "type": "invalid"}]
        )

    @app.exception_handler(DatabaseUnavailable)
    async def unavailable(_request: Request, _error: DatabaseUnavailable) -> JSONResponse:
        return _detail(503, "database unavailable, retry shortly", {"Retry-After": "1"})

    @app.exception_handler(SchemaNotReady)
    async def not_ready(_request: Request, _error: SchemaNotReady) -> JSONResponse:
        return _detail(503, "database schema not ready")

    return app
