"""A small FastAPI service on `todo_store` and its FastAPI integration (`todo_store.fastapi`).

Run: `uvicorn --factory examples.fastapi_app:create_app` (reads DATABASE_URL and `.env`).

Every request's unit of work is bound to the caller (`current_user_id`): PostgreSQL's
row-level security holds its statements to that user's rows. A route that makes one
repository call uses a non-atomic unit (`OneCall`: the call commits by itself); `POST
/tasks/batch` must create all its tasks or none (`AllOrNone`); `GET /me` reads three things in
one read-only snapshot (`Snapshot`). Error responses are the integration's (`install`): 401
without an identity, 404 for a task that is missing or another user's (the same body), 409 for
a taken email, 412 for an edit whose If-Match is stale, 422 naming the field, 503 when the
database is unavailable. Reads and edits of a task answer with its `ETag`.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, FastAPI, Header, HTTPException, Response
from pydantic import BaseModel

from todo_store import (
    TaskCreate,
    TaskPatch,
    TaskRead,
    TodoStore,
    UserProfile,
    UserRead,
)
from todo_store.fastapi import (
    BeforeQuery,
    LimitQuery,
    TaskIdPath,
    UnitOfWork,
    error_responses,
    etag,
    if_match,
    install,
    store_lifespan,
    unit_of_work,
    use_store,
)

BATCH_MAX = 50


async def current_user_id(x_user_id: Annotated[str | None, Header()] = None) -> str:
    """The caller's id. Example only: a real service verifies the Better Auth session cookie or
    JWT here (signed with BETTER_AUTH_SECRET) and returns its subject; never trust a header."""
    if not x_user_id:
        raise HTTPException(401, "not authenticated", headers={"WWW-Authenticate": "Bearer"})
    return x_user_id


OneCall = Annotated[UnitOfWork, unit_of_work(user_id=current_user_id, atomic=False)]
AllOrNone = Annotated[UnitOfWork, unit_of_work(user_id=current_user_id)]
Snapshot = Annotated[UnitOfWork, unit_of_work(user_id=current_user_id, read_only=True)]
IfMatch = Annotated[int | None, if_match()]


class TaskPage(BaseModel):
    """One page of tasks, newest first; pass `next_before` as `before` for the next page
    (`null`: this is the last page)."""

    items: list[TaskRead]
    next_before: int | None


class Me(BaseModel):
    user: UserRead
    open_tasks: int
    done_tasks: int


router = APIRouter(responses=error_responses(500, 503))
EDIT_ERRORS = error_responses(404, 412)


@router.put("/me", responses=error_responses(409))
async def put_me(body: UserProfile, work: OneCall) -> UserRead:
    user = await work.users.upsert(work.user_id, email=body.email, name=body.name)
    return UserRead.model_validate(user)


@router.get("/me", responses=error_responses(404))
async def get_me(work: Snapshot) -> Me:
    return Me(
        user=UserRead.model_validate(await work.users.get(work.user_id)),
        open_tasks=await work.tasks.count_for(work.user_id, completed=False),
        done_tasks=await work.tasks.count_for(work.user_id, completed=True),
    )


@router.get("/tasks")
async def list_tasks(
    work: OneCall,
    completed: bool | None = None,
    limit: LimitQuery = 50,
    before: BeforeQuery = None,
) -> TaskPage:
    tasks = await work.tasks.list_for(work.user_id, completed=completed, limit=limit, before=before)
    # A full page may have a successor; a short one is the last.
    next_before = tasks[-1].id if len(tasks) == limit else None
    return TaskPage(items=[TaskRead.model_validate(t) for t in tasks], next_before=next_before)


@router.post("/tasks", status_code=201, responses=error_responses(404))
async def create_task(body: TaskCreate, work: OneCall, response: Response) -> TaskRead:
    task = await work.tasks.create(work.user_id, title=body.title, description=body.description)
    response.headers["ETag"] = etag(task.version)
    return TaskRead.model_validate(task)


@router.post("/tasks/batch", status_code=201, responses=error_responses(404))
async def create_tasks(
    body: Annotated[list[TaskCreate], Body(min_length=1, max_length=BATCH_MAX)],
    work: AllOrNone,
) -> list[TaskRead]:
    created = [
        await work.tasks.create(work.user_id, title=new.title, description=new.description)
        for new in body
    ]
    return [TaskRead.model_validate(task) for task in created]


# Declared before /tasks/{task_id}: routes match in order, and "count" would be taken as an id.
@router.get("/tasks/count")
async def count_tasks(work: OneCall, completed: bool | None = None) -> int:
    return await work.tasks.count_for(work.user_id, completed=completed)


@router.get("/tasks/{task_id}", responses=error_responses(404))
async def get_task(task_id: TaskIdPath, work: OneCall, response: Response) -> TaskRead:
    task = await work.tasks.get(work.user_id, task_id)
    response.headers["ETag"] = etag(task.version)
    return TaskRead.model_validate(task)


# Edits take the ETag the client read as If-Match: a task changed since is a 412 with its
# current ETag, never a silent overwrite. Without If-Match the last write wins.
@router.patch("/tasks/{task_id}", responses=EDIT_ERRORS)
async def patch_task(
    task_id: TaskIdPath, body: TaskPatch, work: OneCall, expected: IfMatch, response: Response
) -> TaskRead:
    task = await work.tasks.update(
        work.user_id, task_id, expected_version=expected, **body.changes()
    )
    response.headers["ETag"] = etag(task.version)
    return TaskRead.model_validate(task)


@router.post("/tasks/{task_id}/toggle", responses=EDIT_ERRORS)
async def toggle_task(
    task_id: TaskIdPath, work: OneCall, expected: IfMatch, response: Response
) -> TaskRead:
    task = await work.tasks.toggle(work.user_id, task_id, expected_version=expected)
    response.headers["ETag"] = etag(task.version)
    return TaskRead.model_validate(task)


@router.delete("/tasks/{task_id}", status_code=204, responses=EDIT_ERRORS)
async def delete_task(task_id: TaskIdPath, work: OneCall, expected: IfMatch) -> None:
    await work.tasks.delete(work.user_id, task_id, expected_version=expected)


def create_app(store: TodoStore | None = None) -> FastAPI:
    """The app. A `store` given here is the caller's to dispose; otherwise one is built from
    the environment at startup and disposed at shutdown."""
    app = FastAPI(title="todo_store example", lifespan=store_lifespan())
    if store is not None:
        use_store(app, store)
    app.include_router(router)
    install(app)
    return app
