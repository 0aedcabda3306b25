"""`TaskRepo` and `UserRepo` against a real PostgreSQL.

Most tests run in the rolled-back `session`; the ones about commits (objects readable after
the unit of work, rollback of a failed unit) use `store` with unique user ids and delete
those users at the end.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, TypeVar, get_args, get_origin, get_type_hints

import pytest
import pytest_asyncio
from sqlalchemy import event, inspect, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import Mapped

from todo_store import (
    ConflictError,
    EmailTaken,
    Task,
    TaskNotFound,
    TaskRead,
    TaskRepo,
    TodoStore,
    User,
    UserNotFound,
    UserRead,
    UserRepo,
)
from todo_store.schemas import TaskRecord, UserRecord

T = TypeVar("T")

NEVER_ISSUED_ID = 2**63 - 1  # a valid bigint no task will ever get


def _uid(prefix: str = "r") -> str:
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


async def _in_savepoint(session: AsyncSession, call: Awaitable[T]) -> T:
    """Run a call that may fail in the database without aborting the test's transaction."""
    async with session.begin_nested():
        return await call


async def _task_rows(session: AsyncSession, user_id: str) -> list[tuple[Any, ...]]:
    """The user's tasks exactly as stored, straight from the table (no ORM identity map)."""
    result = await session.execute(
        text(
            """SELECT id, title, description, completed, created_at, updated_at
               FROM tasks WHERE user_id = :user_id ORDER BY id"""
        ),
        {"user_id": user_id},
    )
    return [tuple(row) for row in result]


async def _stored_task(session: AsyncSession, task_id: int) -> tuple[Any, ...] | None:
    row = (
        await session.execute(
            text("SELECT user_id, title, description, completed FROM tasks WHERE id = :id"),
            {"id": task_id},
        )
    ).one_or_none()
    return None if row is None else tuple(row)


@dataclass
class World:
    """Two users in the rolled-back session: `me` with one open task, `other` with two."""

    session: AsyncSession
    tasks: TaskRepo
    users: UserRepo
    me: str
    other: str
    mine: TaskRecord
    theirs_open: TaskRecord
    theirs_done: TaskRecord

    async def new_user(self, *, email: str | None = None) -> str:
        user_id = _uid()
        await self.users.upsert(user_id, email=email or f"{user_id}@example.com", name="New")
        return user_id


@pytest_asyncio.fixture(loop_scope="session")
async def world(session: AsyncSession) -> World:
    return await world_for(session)


async def world_for(session: AsyncSession) -> World:
    tasks, users = TaskRepo(session), UserRepo(session)
    me, other = _uid("me"), _uid("other")
    await users.upsert(me, email=f"{me}@example.com", name="Me")
    await users.upsert(other, email=f"{other}@example.com", name="Other")
    mine = await tasks.create(me, title="mine", description="my notes")
    theirs_open = await tasks.create(other, title="theirs", description="their notes")
    theirs_done = await tasks.create(other, title="theirs, done")
    await tasks.set_completed(other, theirs_done.id)
    return World(session, tasks, users, me, other, mine, theirs_open, theirs_done)


# --------------------------------------------------------------------------- TaskRepo.list_for


async def _make_tasks(world: World, user_id: str, count: int) -> list[int]:
    return [(await world.tasks.create(user_id, title=f"task {n}")).id for n in range(count)]


async def test_list_for_returns_own_tasks_newest_first(world: World) -> None:
    user = await world.new_user()
    ids = await _make_tasks(world, user, 5)

    listed = await world.tasks.list_for(user)

    assert [task.id for task in listed] == sorted(ids, reverse=True)
    assert {task.user_id for task in listed} == {user}
    assert [task.id for task in await world.tasks.list_for(world.other)] == [
        world.theirs_done.id,
        world.theirs_open.id,
    ]


async def test_list_for_unknown_user_is_empty(world: World) -> None:
    assert await world.tasks.list_for(_uid("ghost")) == []


@pytest.mark.parametrize("page_size", [1, 3, 4, 10, 11])
async def test_list_for_keyset_pages_are_disjoint_and_cover_everything(
    world: World, page_size: int
) -> None:
    user = await world.new_user()
    ids = await _make_tasks(world, user, 10)

    pages: list[list[int]] = []
    before: int | None = None
    while True:
        page = [t.id for t in await world.tasks.list_for(user, limit=page_size, before=before)]
        if not page:
            break
        assert len(page) <= page_size
        pages.append(page)
        before = page[-1]

    walked = [task_id for page in pages for task_id in page]
    assert walked == sorted(ids, reverse=True)  # consecutive, newest first, no overlap, no gap
    assert len(set(walked)) == len(walked)
    assert [len(page) for page in pages[:-1]] == [page_size] * (len(pages) - 1)


async def test_list_for_before_excludes_that_id_and_newer(world: World) -> None:
    user = await world.new_user()
    ids = await _make_tasks(world, user, 5)

    listed = await world.tasks.list_for(user, before=ids[2])

    assert [task.id for task in listed] == [ids[1], ids[0]]


async def test_list_for_completed_filter(world: World) -> None:
    user = await world.new_user()
    ids = await _make_tasks(world, user, 6)
    done = ids[1::2]
    for task_id in done:
        await world.tasks.set_completed(user, task_id)

    listed_done = await world.tasks.list_for(user, completed=True)
    listed_open = await world.tasks.list_for(user, completed=False)
    listed_all = await world.tasks.list_for(user, completed=None)

    assert [t.id for t in listed_done] == sorted(done, reverse=True)
    assert all(t.completed for t in listed_done)
    assert [t.id for t in listed_open] == sorted(set(ids) - set(done), reverse=True)
    assert not any(t.completed for t in listed_open)
    assert [t.id for t in listed_all] == sorted(ids, reverse=True)


@pytest.mark.parametrize(("limit", "expected"), [(1, 1), (2, 2), (7, 7), (50, 7), (500, 7)])
async def test_list_for_limit(world: World, limit: int, expected: int) -> None:
    user = await world.new_user()
    ids = await _make_tasks(world, user, 7)

    listed = await world.tasks.list_for(user, limit=limit)

    assert [t.id for t in listed] == sorted(ids, reverse=True)[:expected]


async def test_list_for_default_limit_is_50(world: World) -> None:
    user = await world.new_user()
    await world.session.execute(
        text("INSERT INTO tasks (user_id, title) SELECT :u, 't' FROM generate_series(1, 60)"),
        {"u": user},
    )
    assert len(await world.tasks.list_for(user)) == 50


async def test_list_for_returns_current_rows_after_another_unit_committed(
    store: TodoStore, new_user_id: str
) -> None:
    async with store.session() as s:
        await UserRepo(s).upsert(new_user_id, email=f"{new_user_id}@example.com", name="Stale")
        task_id = (await TaskRepo(s).create(new_user_id, title="t")).id
    try:
        async with store.session() as reader:
            held = await TaskRepo(reader).get(new_user_id, task_id)
            async with store.session() as writer:
                await TaskRepo(writer).toggle(new_user_id, task_id)  # committed elsewhere
            listed = await TaskRepo(reader).list_for(new_user_id, completed=True)
        assert [t.id for t in listed] == [task_id]
        assert listed[0].completed is True
        assert held.completed is False  # a record is the row as it was read, never rewritten
    finally:
        async with store.session() as s:
            await UserRepo(s).delete(new_user_id)


# ------------------------------------------------------------- pending ORM changes in the session


async def test_returned_records_refuse_assignment_naming_the_way_to_change_them(
    world: World,
) -> None:
    task = await world.tasks.get(world.me, world.mine.id)
    user = await world.users.get(world.me)

    with pytest.raises(AttributeError, match=r"'title'.*TaskRepo\.update"):
        task.title = "edited"  # type: ignore[misc]
    with pytest.raises(AttributeError, match=r"'name'.*UserRepo\.upsert"):
        user.name = "edited"  # type: ignore[misc]
    assert (await world.tasks.get(world.me, world.mine.id)).title == "mine"


async def test_record_reprs_show_ids_not_user_data(world: World) -> None:
    task = await world.tasks.get(world.me, world.mine.id)
    user = await world.users.get(world.me)

    assert repr(task) == f"TaskRecord(id={task.id!r}, user_id={world.me!r}, completed=False)"
    assert repr(user) == f"UserRecord(id={world.me!r})"


@pytest.mark.parametrize(
    "call",
    [
        lambda w: w.tasks.list_for(w.me),
        lambda w: w.tasks.get(w.me, w.mine.id),
        lambda w: w.tasks.count_for(w.me),
        lambda w: w.tasks.toggle(w.me, w.mine.id),
    ],
    ids=["list_for", "get", "count_for", "toggle"],
)
async def test_a_pending_orm_edit_is_flushed_before_a_repository_call_not_discarded(
    world: World, call: Callable[[World], Awaitable[Any]]
) -> None:
    # The caller's own ORM object, edited and not flushed (the sessions do not autoflush).
    task = await world.session.get(Task, world.mine.id)
    assert task is not None
    task.title = "edited"

    await call(world)

    assert "edited" in {row[1] for row in await _task_rows(world.session, world.me)}
    assert task.title == "edited"
    assert not world.session.dirty
    assert (await world.tasks.get(world.me, world.mine.id)).title == "edited"


async def test_a_pending_orm_edit_survives_list_for_and_commits(
    store: TodoStore, committed: tuple[str, int]
) -> None:
    user_id, task_id = committed
    async with store.session() as s:
        task = await s.get(Task, task_id)
        assert task is not None
        task.title = "edited"
        listed = await TaskRepo(s).list_for(user_id)
        assert [t.title for t in listed] == ["edited"]
    async with store.session() as s:
        assert (await TaskRepo(s).get(user_id, task_id)).title == "edited"


# ------------------------------------------------------------------------- single-task methods


async def test_get_returns_the_task(world: World) -> None:
    task = await world.tasks.get(world.me, world.mine.id)

    assert (task.id, task.user_id, task.title, task.description, task.completed) == (
        world.mine.id,
        world.me,
        "mine",
        "my notes",
        False,
    )


@pytest.mark.parametrize(
    ("title", "stored"),
    [
        ("Buy milk", "Buy milk"),
        ("  padded  ", "padded"),
        ("\t tabs \n", "tabs"),
        ("x" * 200, "x" * 200),
    ],
)
async def test_create_strips_title_and_stores_defaults(
    world: World, title: str, stored: str
) -> None:
    task = await world.tasks.create(world.me, title=title, description="d")

    assert (task.user_id, task.title, task.description, task.completed) == (
        world.me,
        stored,
        "d",
        False,
    )
    assert isinstance(task.created_at, datetime)
    assert task.updated_at == task.created_at
    assert task.id > world.theirs_done.id  # sequential
    assert await _stored_task(world.session, task.id) == (world.me, stored, "d", False)


async def test_create_without_description_stores_null(world: World) -> None:
    task = await world.tasks.create(world.me, title="plain")

    assert task.description is None
    assert await _stored_task(world.session, task.id) == (world.me, "plain", None, False)


async def test_create_for_unknown_user_raises_user_not_found_naming_it(world: World) -> None:
    ghost = _uid("ghost")

    with pytest.raises(UserNotFound) as caught:
        await _in_savepoint(world.session, world.tasks.create(ghost, title="orphan"))

    assert isinstance(caught.value, LookupError)
    assert caught.value.user_id == ghost
    assert ghost in str(caught.value)
    assert await _task_rows(world.session, ghost) == []


_UNCHANGED = object()

UPDATE_CASES = [
    pytest.param({"title": "  renamed "}, ("renamed", _UNCHANGED, _UNCHANGED), id="title"),
    pytest.param({"description": "new notes"}, (_UNCHANGED, "new notes", _UNCHANGED), id="desc"),
    pytest.param({"description": None}, (_UNCHANGED, None, _UNCHANGED), id="desc-None-clears"),
    pytest.param({"description": ""}, (_UNCHANGED, "", _UNCHANGED), id="desc-empty"),
    pytest.param({"completed": True}, (_UNCHANGED, _UNCHANGED, True), id="completed"),
    pytest.param({"completed": False}, (_UNCHANGED, _UNCHANGED, False), id="completed-same"),
    pytest.param(
        {"title": "all", "description": None, "completed": True}, ("all", None, True), id="all"
    ),
    pytest.param({}, (_UNCHANGED, _UNCHANGED, _UNCHANGED), id="nothing"),
]


@pytest.mark.parametrize(("changes", "expected"), UPDATE_CASES)
async def test_update_writes_only_the_given_fields(
    world: World, changes: dict[str, Any], expected: tuple[Any, Any, Any]
) -> None:
    original = ("mine", "my notes", False)
    want = tuple(o if e is _UNCHANGED else e for o, e in zip(original, expected, strict=True))
    theirs_before = await _task_rows(world.session, world.other)

    task = await world.tasks.update(world.me, world.mine.id, **changes)

    assert (task.title, task.description, task.completed) == want
    assert await _stored_task(world.session, world.mine.id) == (world.me, *want)
    assert await _task_rows(world.session, world.other) == theirs_before


@pytest.mark.parametrize(
    ("args", "expected"),
    [((), True), ((True,), True), ((False,), False)],
    ids=["default", "true", "false"],
)
async def test_set_completed(world: World, args: tuple[bool, ...], expected: bool) -> None:
    task = await world.tasks.set_completed(world.me, world.mine.id, *args)

    assert task.completed is expected
    assert await _stored_task(world.session, world.mine.id) == (
        world.me,
        "mine",
        "my notes",
        expected,
    )


async def test_set_completed_false_reopens_a_done_task(world: World) -> None:
    await world.tasks.set_completed(world.me, world.mine.id, True)

    task = await world.tasks.set_completed(world.me, world.mine.id, False)

    assert task.completed is False


async def test_toggle_flips_and_flips_back(world: World) -> None:
    first = await world.tasks.toggle(world.me, world.mine.id)
    assert first.completed is True
    assert (await _stored_task(world.session, world.mine.id)) == (
        world.me,
        "mine",
        "my notes",
        True,
    )

    second = await world.tasks.toggle(world.me, world.mine.id)
    assert second.completed is False
    assert (await world.tasks.get(world.me, world.mine.id)).completed is False


async def test_delete_removes_the_task(world: World) -> None:
    assert await world.tasks.delete(world.me, world.mine.id) is None

    assert await _stored_task(world.session, world.mine.id) is None
    with pytest.raises(TaskNotFound):
        await world.tasks.get(world.me, world.mine.id)


SingleTaskCall = Callable[[TaskRepo, str, int], Awaitable[Any]]

SINGLE_TASK_CALLS: dict[str, SingleTaskCall] = {
    "get": lambda repo, user, task_id: repo.get(user, task_id),
    "update": lambda repo, user, task_id: repo.update(
        user, task_id, title="hijacked", description=None, completed=True
    ),
    "update-nothing": lambda repo, user, task_id: repo.update(user, task_id),
    "set_completed": lambda repo, user, task_id: repo.set_completed(user, task_id, True),
    "toggle": lambda repo, user, task_id: repo.toggle(user, task_id),
    "delete": lambda repo, user, task_id: repo.delete(user, task_id),
}


@pytest.mark.parametrize(
    "target", ["deleted", "never-issued", "other-users-open", "other-users-done"]
)
@pytest.mark.parametrize("method", list(SINGLE_TASK_CALLS))
async def test_missing_and_foreign_tasks_are_both_task_not_found(
    world: World, method: str, target: str
) -> None:
    if target == "deleted":
        gone = await world.tasks.create(world.me, title="gone")
        await world.tasks.delete(world.me, gone.id)
        task_id = gone.id
    elif target == "never-issued":
        task_id = NEVER_ISSUED_ID
    elif target == "other-users-open":
        task_id = world.theirs_open.id
    else:
        task_id = world.theirs_done.id
    mine_before = await _task_rows(world.session, world.me)
    theirs_before = await _task_rows(world.session, world.other)

    with pytest.raises(TaskNotFound) as caught:
        await SINGLE_TASK_CALLS[method](world.tasks, world.me, task_id)

    error = caught.value
    assert type(error) is TaskNotFound  # not a subclass or a "forbidden" variant
    assert isinstance(error, LookupError)
    assert (error.user_id, error.task_id) == (world.me, task_id)
    assert str(error) == f"task {task_id} not found for user {world.me!r}"  # same for all
    assert await _task_rows(world.session, world.other) == theirs_before
    assert await _task_rows(world.session, world.me) == mine_before


# ---------------------------------------------------------------------------- bulk methods


async def test_count_for(world: World) -> None:
    user = await world.new_user()
    ids = await _make_tasks(world, user, 5)
    for task_id in ids[:2]:
        await world.tasks.set_completed(user, task_id)

    assert await world.tasks.count_for(user) == 5
    assert await world.tasks.count_for(user, completed=None) == 5
    assert await world.tasks.count_for(user, completed=True) == 2
    assert await world.tasks.count_for(user, completed=False) == 3
    assert await world.tasks.count_for(world.other) == 2  # not counting anyone else's
    assert await world.tasks.count_for(_uid("ghost")) == 0


async def test_complete_all_marks_only_own_open_tasks(world: World) -> None:
    extra = await world.tasks.create(world.me, title="second")
    already = await world.tasks.create(world.me, title="done already")
    await world.tasks.set_completed(world.me, already.id)
    theirs_before = await _task_rows(world.session, world.other)

    changed = await world.tasks.complete_all(world.me)

    assert changed == 2  # `mine` and `extra`, not the one already done
    assert await world.tasks.count_for(world.me, completed=False) == 0
    assert {t.id for t in await world.tasks.list_for(world.me, completed=True)} == {
        world.mine.id,
        extra.id,
        already.id,
    }
    assert await _task_rows(world.session, world.other) == theirs_before
    assert await world.tasks.complete_all(world.me) == 0


async def test_delete_completed_deletes_only_own_done_tasks(world: World) -> None:
    done = await world.tasks.create(world.me, title="done")
    await world.tasks.set_completed(world.me, done.id)
    theirs_before = await _task_rows(world.session, world.other)

    deleted = await world.tasks.delete_completed(world.me)

    assert deleted == 1
    assert [t.id for t in await world.tasks.list_for(world.me)] == [world.mine.id]
    assert await _task_rows(world.session, world.other) == theirs_before  # their done one stays
    assert await world.tasks.delete_completed(world.me) == 0


@pytest.mark.parametrize("method", ["complete_all", "delete_completed"])
async def test_bulk_methods_for_a_user_without_tasks_change_nothing(
    world: World, method: str
) -> None:
    theirs_before = await _task_rows(world.session, world.other)
    mine_before = await _task_rows(world.session, world.me)

    for user in (await world.new_user(), _uid("ghost")):
        assert await getattr(world.tasks, method)(user) == 0

    assert await _task_rows(world.session, world.other) == theirs_before
    assert await _task_rows(world.session, world.me) == mine_before


# -------------------------------------------------------------------------------- UserRepo


async def test_upsert_creates_a_user_with_lowercased_email(world: World) -> None:
    user_id = _uid()

    user = await world.users.upsert(user_id, email=f"Ada.{user_id}@Example.COM", name=" Ada ")

    assert (user.id, user.email, user.name) == (user_id, f"ada.{user_id}@example.com", "Ada")
    assert isinstance(user.created_at, datetime)
    stored = (
        await world.session.execute(
            text("SELECT email, name FROM users WHERE id = :id"), {"id": user_id}
        )
    ).one()
    assert tuple(stored) == (f"ada.{user_id}@example.com", "Ada")


async def test_upsert_updates_name_and_email_of_an_existing_id(world: World) -> None:
    before = await world.users.get(world.me)
    new_email = f"renamed.{world.me}@example.org"

    user = await world.users.upsert(world.me, email=new_email.upper(), name="Renamed")

    assert (user.id, user.email, user.name) == (world.me, new_email, "Renamed")
    assert user.created_at == before.created_at
    assert (await world.users.get(world.me)).email == new_email
    assert (
        await world.session.scalar(
            text("SELECT count(*) FROM users WHERE id = :id"), {"id": world.me}
        )
        == 1
    )
    assert await world.tasks.count_for(world.me) == 1  # the user's tasks are kept


async def test_upsert_with_own_email_in_other_case_is_not_a_conflict(world: World) -> None:
    user = await world.users.upsert(world.me, email=f"{world.me}@EXAMPLE.COM", name="Me")

    assert user.email == f"{world.me}@example.com"


@pytest.mark.parametrize(
    ("existing", "attempt"),
    [("ada@x.com", "Ada@X.com"), ("Ada@X.com", "ada@x.com"), ("ada@x.com", "ADA@X.COM")],
)
async def test_upsert_with_another_users_email_raises_email_taken(
    world: World, existing: str, attempt: str
) -> None:
    suffix = uuid.uuid4().hex[:8]
    holder = await world.new_user(email=existing.replace("@", f".{suffix}@"))
    newcomer = _uid("newcomer")

    for user_id in (newcomer, world.me):  # a new id, and an existing one changing its email
        with pytest.raises(EmailTaken) as caught:
            await _in_savepoint(
                world.session,
                world.users.upsert(user_id, email=attempt.replace("@", f".{suffix}@"), name="X"),
            )
        assert isinstance(caught.value, ConflictError)

    with pytest.raises(UserNotFound):
        await world.users.get(newcomer)
    assert (await world.users.get(world.me)).email == f"{world.me}@example.com"
    assert (await world.users.get(holder)).email == existing.lower().replace("@", f".{suffix}@")


@pytest.mark.parametrize("spelling", ["ada@x.com", "ADA@X.COM", "Ada@x.Com"])
async def test_get_by_email_is_case_insensitive(world: World, spelling: str) -> None:
    suffix = uuid.uuid4().hex[:8]
    user_id = await world.new_user(email=f"Ada.{suffix}@X.com")

    user = await world.users.get_by_email(spelling.replace("@", f".{suffix}@"))

    assert user.id == user_id
    assert user.email == f"ada.{suffix}@x.com"


async def test_user_get_returns_the_user(world: World) -> None:
    user = await world.users.get(world.me)

    assert (user.id, user.email, user.name) == (world.me, f"{world.me}@example.com", "Me")


async def test_user_delete_cascades_to_own_tasks_only(world: World) -> None:
    await _make_tasks(world, world.me, 3)
    theirs_before = await _task_rows(world.session, world.other)

    assert await world.users.delete(world.me) is None

    assert await _task_rows(world.session, world.me) == []
    assert await _task_rows(world.session, world.other) == theirs_before
    with pytest.raises(UserNotFound):
        await world.users.get(world.me)
    with pytest.raises(TaskNotFound):
        await world.tasks.get(world.me, world.mine.id)
    assert (await world.users.get(world.other)).id == world.other


UserCall = Callable[[UserRepo, str], Awaitable[Any]]

USER_NOT_FOUND_CALLS: dict[str, UserCall] = {
    "get": lambda repo, user_id: repo.get(user_id),
    "delete": lambda repo, user_id: repo.delete(user_id),
}


@pytest.mark.parametrize("method", list(USER_NOT_FOUND_CALLS))
async def test_user_not_found_by_id(world: World, method: str) -> None:
    ghost = _uid("ghost")
    users_before = await world.session.scalar(text("SELECT count(*) FROM users"))

    with pytest.raises(UserNotFound) as caught:
        await USER_NOT_FOUND_CALLS[method](world.users, ghost)

    assert isinstance(caught.value, LookupError)
    assert caught.value.user_id == ghost
    assert ghost in str(caught.value)
    assert await world.session.scalar(text("SELECT count(*) FROM users")) == users_before


async def test_user_not_found_by_email(world: World) -> None:
    email = f"Nobody.{uuid.uuid4().hex[:8]}@Example.com"

    with pytest.raises(UserNotFound) as caught:
        await world.users.get_by_email(email)

    assert isinstance(caught.value, LookupError)
    assert caught.value.email == email.lower()


async def test_user_delete_twice_is_not_found(world: World) -> None:
    await world.users.delete(world.me)

    with pytest.raises(UserNotFound):
        await world.users.delete(world.me)


# ------------------------------------------------------------------ one statement per call

WorldCall = Callable[[World], Awaitable[Any]]

ONE_STATEMENT_CALLS: dict[str, WorldCall] = {
    "TaskRepo.list_for": lambda w: w.tasks.list_for(w.me),
    "TaskRepo.list_for(completed,before,limit)": lambda w: w.tasks.list_for(
        w.me, completed=False, before=w.mine.id + 1, limit=5
    ),
    "TaskRepo.get": lambda w: w.tasks.get(w.me, w.mine.id),
    "TaskRepo.get(not found)": lambda w: _swallow(w.tasks.get(w.me, w.theirs_open.id)),
    "TaskRepo.create": lambda w: w.tasks.create(w.me, title="one more", description="d"),
    "TaskRepo.update": lambda w: w.tasks.update(w.me, w.mine.id, title="t", completed=True),
    "TaskRepo.update(no fields)": lambda w: w.tasks.update(w.me, w.mine.id),
    "TaskRepo.set_completed": lambda w: w.tasks.set_completed(w.me, w.mine.id),
    "TaskRepo.toggle": lambda w: w.tasks.toggle(w.me, w.mine.id),
    "TaskRepo.delete": lambda w: w.tasks.delete(w.me, w.mine.id),
    "TaskRepo.delete(not found)": lambda w: _swallow(w.tasks.delete(w.me, w.theirs_open.id)),
    "TaskRepo.count_for": lambda w: w.tasks.count_for(w.me, completed=False),
    "TaskRepo.complete_all": lambda w: w.tasks.complete_all(w.me),
    "TaskRepo.delete_completed": lambda w: w.tasks.delete_completed(w.other),
    "UserRepo.upsert(new)": lambda w: w.users.upsert(_uid(), email=f"{_uid()}@x.com", name="N"),
    "UserRepo.upsert(existing)": lambda w: w.users.upsert(
        w.me, email=f"{w.me}@example.net", name="N"
    ),
    "UserRepo.get": lambda w: w.users.get(w.me),
    "UserRepo.get_by_email": lambda w: w.users.get_by_email(f"{w.me.upper()}@EXAMPLE.COM"),
    "UserRepo.delete": lambda w: w.users.delete(w.other),
}


async def _swallow(call: Awaitable[Any]) -> None:
    try:
        await call
    except (TaskNotFound, UserNotFound):
        return
    raise AssertionError("expected a not-found error")


@pytest.mark.parametrize(
    "method", list(ONE_STATEMENT_CALLS), ids=[f"{name}=1" for name in ONE_STATEMENT_CALLS]
)
async def test_each_call_sends_exactly_one_statement(
    world: World, statements: Any, method: str
) -> None:
    statements.clear()

    await ONE_STATEMENT_CALLS[method](world)

    assert len(statements) == 1, statements.statements


@pytest.mark.parametrize(
    "method", list(ONE_STATEMENT_CALLS), ids=[f"{name}=1" for name in ONE_STATEMENT_CALLS]
)
async def test_each_call_on_a_connection_sends_one_statement_and_returns_the_same(
    world: World, statements: Any, method: str
) -> None:
    on_session = await ONE_STATEMENT_CALLS[method](world)
    await world.session.rollback()  # back to the state the fixture built, for a second run
    world = await _rebuilt(world)
    connection = await world.session.connection()
    on_connection = replace(world, tasks=TaskRepo(connection), users=UserRepo(connection))
    statements.clear()

    result = await ONE_STATEMENT_CALLS[method](on_connection)

    assert len(statements) == 1, statements.statements
    assert _comparable(result) == _comparable(on_session)


async def _rebuilt(world: World) -> World:
    return await world_for(world.session)


def _comparable(result: Any) -> Any:
    # Ids, timestamps and generated user ids differ between the two runs; the shape must not.
    if isinstance(result, list):
        return [_comparable(item) for item in result]
    if isinstance(result, TaskRecord):
        return (type(result), result.title, result.description, result.completed)
    if isinstance(result, UserRecord):
        return (type(result), result.name)
    return result


# --------------------------------------------------------------------- the list query plan


@pytest.mark.parametrize(
    "query",
    [{}, {"before": "middle"}, {"completed": True}, {"completed": False, "limit": 10}],
    ids=["plain", "before", "completed", "open-limit"],
)
async def test_list_for_uses_the_owner_index(
    session: AsyncSession, todo_store_engine: AsyncEngine, query: dict[str, Any]
) -> None:
    prefix = _uid("bulk")
    await session.execute(
        text(
            """INSERT INTO users (id, email, name)
               SELECT :p || '_' || g, :p || '_' || g || '@example.com', 'Bulk'
               FROM generate_series(1, 200) AS g"""
        ),
        {"p": prefix},
    )
    await session.execute(
        text(
            """INSERT INTO tasks (user_id, title, completed)
               SELECT :p || '_' || (g % 200 + 1), 'task ' || g, g % 3 = 0
               FROM generate_series(1, 20000) AS g"""
        ),
        {"p": prefix},
    )
    await session.execute(text("ANALYZE tasks"))
    user = f"{prefix}_7"
    if query.get("before") == "middle":
        ids = [t.id for t in await TaskRepo(session).list_for(user, limit=500)]
        query = {"before": ids[len(ids) // 2]}

    captured: list[tuple[str, Any]] = []

    def capture(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        captured.append((statement, parameters))

    event.listen(todo_store_engine.sync_engine, "before_cursor_execute", capture)
    try:
        listed = await TaskRepo(session).list_for(user, **query)
    finally:
        event.remove(todo_store_engine.sync_engine, "before_cursor_execute", capture)
    assert listed  # the query is not trivially empty
    assert len(captured) == 1
    sql, parameters = captured[0]

    connection = await session.connection()
    result = await connection.exec_driver_sql(f"EXPLAIN {sql}", parameters)
    plan = "\n".join(row[0] for row in result)

    # With `completed`, the (user_id, completed, id) index of the pages serves it as well.
    assert "idx_tasks_user_id" in plan or "idx_tasks_user_completed" in plan, plan
    assert "Seq Scan on tasks" not in plan, plan


# ------------------------------------------------------------- commits, with the real store


@pytest_asyncio.fixture(loop_scope="session")
async def committed(store: TodoStore, new_user_id: str) -> AsyncIterator[tuple[str, int]]:
    """A committed user with one committed task; deleted (with its tasks) afterwards."""
    async with store.session() as s:
        await UserRepo(s).upsert(new_user_id, email=f"{new_user_id}@example.com", name="C")
        task = await TaskRepo(s).create(new_user_id, title="committed", description="d")
    yield new_user_id, task.id
    async with store.session() as s:
        await s.execute(text("DELETE FROM users WHERE id = :id"), {"id": new_user_id})


StoreCall = Callable[[AsyncSession, str, int], Awaitable[Any]]

RETURNING_CALLS: dict[str, StoreCall] = {
    "TaskRepo.create": lambda s, u, t: TaskRepo(s).create(u, title="new", description=None),
    "TaskRepo.get": lambda s, u, t: TaskRepo(s).get(u, t),
    "TaskRepo.update": lambda s, u, t: TaskRepo(s).update(u, t, title="renamed"),
    "TaskRepo.update(no fields)": lambda s, u, t: TaskRepo(s).update(u, t),
    "TaskRepo.set_completed": lambda s, u, t: TaskRepo(s).set_completed(u, t),
    "TaskRepo.toggle": lambda s, u, t: TaskRepo(s).toggle(u, t),
    "TaskRepo.list_for": lambda s, u, t: TaskRepo(s).list_for(u),
    "UserRepo.upsert": lambda s, u, t: UserRepo(s).upsert(u, email=f"{u}@example.org", name="R"),
    "UserRepo.get": lambda s, u, t: UserRepo(s).get(u),
    "UserRepo.get_by_email": lambda s, u, t: UserRepo(s).get_by_email(f"{u}@EXAMPLE.com"),
}


@pytest.mark.parametrize("method", list(RETURNING_CALLS))
async def test_returned_objects_are_readable_after_the_unit_commits(
    store: TodoStore, committed: tuple[str, int], method: str
) -> None:
    user_id, _task_id = committed
    async with store.session() as s:
        returned = await RETURNING_CALLS[method](s, *committed)
    objects = returned if isinstance(returned, list) else [returned]
    assert objects

    for obj in objects:
        # A record is complete by construction: every column of its table, no loader behind it.
        assert isinstance(obj, TaskRecord | UserRecord)
        assert None not in (obj.id, obj.created_at)
        if isinstance(obj, TaskRecord):
            read: TaskRead | UserRead = TaskRead.model_validate(obj)
            assert read.user_id == user_id
            assert read.id > 0
            assert read.updated_at >= read.created_at
        else:
            read = UserRead.model_validate(obj)
            assert read.id == user_id
        assert read.created_at.tzinfo is not None


def _mapped_types(model: type[Any]) -> dict[str, Any]:
    return {
        name: get_args(hint)[0]
        for name, hint in get_type_hints(model).items()
        if get_origin(hint) is Mapped
    }


@pytest.mark.parametrize(("record", "model"), [(TaskRecord, Task), (UserRecord, User)])
def test_records_have_exactly_the_models_columns_and_types(
    record: type[Any], model: type[Any]
) -> None:
    columns = [column.key for column in inspect(model).columns]

    assert list(record._fields) == columns
    assert get_type_hints(record) == _mapped_types(model)


async def test_a_failed_call_rolls_back_the_whole_unit(store: TodoStore, new_user_id: str) -> None:
    holder = f"{new_user_id}_holder"
    async with store.session() as s:
        await UserRepo(s).upsert(holder, email=f"{holder}@example.com", name="Holder")
    created: list[int] = []

    async def unit_of_work() -> None:
        async with store.session() as s:
            await UserRepo(s).upsert(new_user_id, email=f"{new_user_id}@example.com", name="N")
            created.append((await TaskRepo(s).create(new_user_id, title="doomed")).id)
            await UserRepo(s).upsert(new_user_id, email=f"{holder}@EXAMPLE.com", name="N")

    try:
        with pytest.raises(EmailTaken):
            await unit_of_work()

        assert created  # the user and the task were written before the failure
        async with store.session() as s:
            with pytest.raises(UserNotFound):
                await UserRepo(s).get(new_user_id)
            with pytest.raises(TaskNotFound):
                await TaskRepo(s).get(new_user_id, created[0])
            assert await _stored_task(s, created[0]) is None
            assert (await UserRepo(s).get(holder)).email == f"{holder}@example.com"
    finally:
        async with store.session() as s:
            await s.execute(
                text("DELETE FROM users WHERE id = ANY(:ids)"), {"ids": [holder, new_user_id]}
            )
