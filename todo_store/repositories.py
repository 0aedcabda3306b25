"""User-scoped data access: `TaskRepo` and `UserRepo`.

Guarantees:
- every `TaskRepo` statement filters on the `user_id` it is given; another user's task is
  reported exactly like a missing one (`TaskNotFound`);
- each method sends one SQL statement, and validates its input before that (a
  `pydantic.ValidationError`, a `ValueError`, naming the field);
- repositories never commit: the caller's unit of work (`TodoStore.session()`) does; they run
  on an `AsyncSession` or, skipping the ORM session's bookkeeping, an `AsyncConnection`;
- results are `TaskRecord` / `UserRecord`: complete rows, immutable, readable after the session
  closes; a repository never loads into, refreshes or overwrites the session's ORM objects;
- changes the caller made to ORM objects in the same session and has not flushed yet are
  flushed before the repository's statement, so it sees them and nothing is discarded.

The statements are built once, here, from the models' tables, with bound parameters:
SQLAlchemy's compiled cache then serves every call without rebuilding a statement or its
cache key. They run on the session's connection as Core statements, so no ORM identity map
work is done per row.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any, Final, TypeVar, cast

from sqlalchemy import (
    Column,
    ColumnElement,
    CursorResult,
    Executable,
    Integer,
    Select,
    Table,
    Update,
    and_,
    bindparam,
    delete,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import Result
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlalchemy.orm import Session

from todo_store import pages
from todo_store.errors import TaskNotFound, UserNotFound
from todo_store.models import Task, User
from todo_store.schemas import (
    EmailLookup,
    TaskCreate,
    TaskListQuery,
    TaskPatch,
    TaskRecord,
    TaskRef,
    UserRecord,
    UserRef,
    UserUpsert,
)

R = TypeVar("R")

Executor = AsyncSession | AsyncConnection
"""What a repository runs on: a session (the usual unit of work) or a connection."""


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


UNSET: Final = _Unset()
"""Default of `TaskRepo.update` arguments: the field is left as it is."""

TASKS = cast(Table, Task.__table__)
USERS = cast(Table, User.__table__)


def _columns(table: Table, record: type[tuple[Any, ...]]) -> tuple[Column[Any], ...]:
    """The table's columns in the record's field order; the two must name the same columns."""
    fields: tuple[str, ...] = getattr(record, "_fields")  # noqa: B009 (NamedTuple protocol)
    if set(fields) != set(table.c.keys()):
        raise RuntimeError(f"{record.__name__} fields {fields} differ from {table.name} columns")
    return tuple(table.c[name] for name in fields)


TASK_COLUMNS = _columns(TASKS, TaskRecord)
USER_COLUMNS = _columns(USERS, UserRecord)

# -- statements, built once -------------------------------------------------------------------
# Bound parameter names never equal a column name: SQLAlchemy reserves those in INSERT/UPDATE.

_OWNER = TASKS.c.user_id == bindparam("owner")
_THE_TASK = and_(_OWNER, TASKS.c.id == bindparam("task"))


def _status(completed: bool | None) -> list[ColumnElement[bool]]:
    # `IS true` / `IS false` as literals, one statement per value: PostgreSQL has no `IS $1`.
    return [] if completed is None else [TASKS.c.completed.is_(completed)]


def _list_statement(completed: bool | None, paged: bool) -> Select[Any]:
    keyset = [TASKS.c.id < bindparam("before")] if paged else []
    return (
        select(*TASK_COLUMNS)
        .where(_OWNER, *_status(completed), *keyset)
        .order_by(TASKS.c.id.desc())
        .limit(bindparam("row_limit", type_=Integer))
    )


_LIST: Final = {
    (completed, paged): _list_statement(completed, paged)
    for completed in (None, True, False)
    for paged in (False, True)
}
_GET: Final = select(*TASK_COLUMNS).where(_THE_TASK)
# Column values come from the parameter names (user_id, title, description).
_CREATE: Final = insert(TASKS).returning(*TASK_COLUMNS)
_TOGGLE: Final = (
    update(TASKS).where(_THE_TASK).values(completed=~TASKS.c.completed).returning(*TASK_COLUMNS)
)
_DELETE: Final = delete(TASKS).where(_THE_TASK).returning(TASKS.c.id)
_COUNT: Final = {
    completed: select(func.count()).select_from(TASKS).where(_OWNER, *_status(completed))
    for completed in (None, True, False)
}
_COMPLETE_ALL: Final = update(TASKS).where(_OWNER, *_status(False)).values(completed=True)
_DELETE_COMPLETED: Final = delete(TASKS).where(_OWNER, *_status(True))
_UPDATES: dict[tuple[str, ...], Update] = {}  # one per set of fields, built on first use

_upsert = pg_insert(USERS)
_UPSERT: Final = _upsert.on_conflict_do_update(
    index_elements=[USERS.c.id],
    set_={"email": _upsert.excluded.email, "name": _upsert.excluded.name},
).returning(*USER_COLUMNS)
_USER_GET: Final = select(*USER_COLUMNS).where(USERS.c.id == bindparam("user"))
_USER_BY_EMAIL: Final = select(*USER_COLUMNS).where(USERS.c.email == bindparam("lookup"))
_USER_DELETE: Final = delete(USERS).where(USERS.c.id == bindparam("user")).returning(USERS.c.id)


def _update_statement(fields: tuple[str, ...]) -> Update:
    statement = _UPDATES.get(fields)
    if statement is None:
        values: dict[str, Any] = {name: bindparam(f"new_{name}") for name in fields}
        statement = update(TASKS).where(_THE_TASK).values(values).returning(*TASK_COLUMNS)
        _UPDATES[fields] = statement
    return statement


# -- running them -----------------------------------------------------------------------------


def _in_session(
    session: Session,
    statement: Executable,
    parameters: Mapping[str, Any],
    shape: Callable[[Result[Any]], R],
) -> R:
    # Without this, a pending ORM change would be invisible to the statement (the sessions
    # do not autoflush) and could conflict with it at commit; flushing is what autoflush does.
    if session.new or session.dirty or session.deleted:
        session.flush()
    return shape(session.connection().execute(statement, parameters))


async def _run(
    executor: Executor,
    statement: Executable,
    parameters: Mapping[str, Any],
    shape: Callable[[Result[Any]], R],
) -> R:
    """Execute on the session's connection and shape the result, in one hop to the driver."""
    if isinstance(executor, AsyncConnection):
        return shape(await executor.execute(statement, parameters))
    return await executor.run_sync(_in_session, statement, parameters, shape)


def _task_or_none(result: Result[Any]) -> TaskRecord | None:
    row = result.one_or_none()
    return None if row is None else TaskRecord._make(row)


def _task(result: Result[Any]) -> TaskRecord:
    return TaskRecord._make(result.one())


def _tasks(result: Result[Any]) -> list[TaskRecord]:
    return list(map(TaskRecord._make, result.all()))


def _user_or_none(result: Result[Any]) -> UserRecord | None:
    row = result.one_or_none()
    return None if row is None else UserRecord._make(row)


def _user(result: Result[Any]) -> UserRecord:
    return UserRecord._make(result.one())


def _scalar(result: Result[Any]) -> Any:
    return result.scalar_one_or_none()


def _rowcount(result: Result[Any]) -> int:
    return cast(CursorResult[Any], result).rowcount


class TaskRepo:
    """Tasks of one user at a time: every method takes the owner's `user_id` first.

    Runs on an `AsyncSession` (`store.session()`), or on an `AsyncConnection`, which skips
    the ORM session's bookkeeping: the same statements, results and errors.
    """

    def __init__(self, session: Executor) -> None:
        self.session = session

    async def list_for(
        self,
        user_id: str,
        *,
        completed: bool | None = None,
        limit: int = 50,
        before: int | None = None,
    ) -> list[TaskRecord]:
        """The user's tasks, newest first; `before` (a task id) pages backwards by keyset.

        `limit` is 1..500. An unknown user simply has no tasks.
        """
        query = TaskListQuery(user_id=user_id, completed=completed, limit=limit, before=before)
        statement = _LIST[query.completed, query.before is not None]
        parameters = {"owner": query.user_id, "row_limit": query.limit, "before": query.before}
        if query.before is None:
            del parameters["before"]
        return await _run(self.session, statement, parameters, _tasks)

    async def page(
        self,
        user_id: str,
        *,
        search: str | None = None,
        completed: bool | None = None,
        updated_since: datetime | None = None,
        sort: pages.Sort = "-created",
        limit: int = 50,
        cursor: str | None = None,
    ) -> pages.Page:
        """A page of the user's tasks; pass `next_cursor` back as `cursor` for the next one.

        `search`: every word (split on whitespace, any language) must occur, in any case, in
        the title or the description; `%`, `_` and `\\` match themselves. `completed`,
        `updated_since` (timezone-aware) filter. `sort`: `created`, `updated`, `title` or
        `completed`, `-` first for descending; ties go by id. `limit`: 1..500.

        One statement per page, keyset-paginated: a task that exists unchanged from the first
        page to the last appears exactly once, whatever else is added, edited or deleted
        meanwhile. The cursor is encrypted and bound to this user and these arguments; bad
        arguments, and a cursor that was modified or comes from another query, raise
        `pydantic.ValidationError` (a `ValueError`) naming the field, before any SQL.
        """
        key = pages.cursor_key_of(self.session.info)
        arguments = {
            "user_id": user_id,
            "search": search,
            "completed": completed,
            "updated_since": updated_since,
            "sort": sort,
            "limit": limit,
            "cursor": cursor,
        }
        query = pages.PageQuery.model_validate(arguments, context={"key": key})
        statement = pages.statement(query, TASK_COLUMNS)
        rows = await _run(self.session, statement, pages.parameters(query), _tasks)
        return pages.page_of(query, key, rows)

    async def get(self, user_id: str, task_id: int) -> TaskRecord:
        """The task, or `TaskNotFound` if it is missing or not this user's."""
        ref = TaskRef(user_id=user_id, task_id=task_id)
        parameters = {"owner": ref.user_id, "task": ref.task_id}
        task = await _run(self.session, _GET, parameters, _task_or_none)
        if task is None:
            raise TaskNotFound(ref.user_id, ref.task_id)
        return task

    async def create(
        self, user_id: str, *, title: str, description: str | None = None
    ) -> TaskRecord:
        """A new task owned by `user_id` (title stripped); `UserNotFound` if no such user."""
        owner = UserRef(user_id=user_id)
        data = TaskCreate(title=title, description=description)
        parameters = {
            "user_id": owner.user_id,
            "title": data.title,
            "description": data.description,
        }
        try:
            return await _run(self.session, _CREATE, parameters, _task)
        except UserNotFound:
            raise UserNotFound(owner.user_id) from None

    async def update(
        self,
        user_id: str,
        task_id: int,
        *,
        title: str | _Unset = UNSET,
        description: str | _Unset | None = UNSET,
        completed: bool | _Unset = UNSET,
    ) -> TaskRecord:
        """Write only the fields given (`description=None` clears it); `TaskNotFound` else."""
        ref = TaskRef(user_id=user_id, task_id=task_id)
        given = {"title": title, "description": description, "completed": completed}
        patch = TaskPatch.model_validate({k: v for k, v in given.items() if v is not UNSET})
        changes = patch.changes()
        if not changes:
            return await self.get(ref.user_id, ref.task_id)
        return await self._update_one(ref, changes)

    async def set_completed(self, user_id: str, task_id: int, completed: bool = True) -> TaskRecord:
        """Mark the task done (or not done); `TaskNotFound` if it is not this user's."""
        ref = TaskRef(user_id=user_id, task_id=task_id)
        patch = TaskPatch(completed=completed)
        return await self._update_one(ref, patch.changes())

    async def toggle(self, user_id: str, task_id: int) -> TaskRecord:
        """Flip `completed` atomically in the database (concurrent toggles never lose one)."""
        ref = TaskRef(user_id=user_id, task_id=task_id)
        parameters = {"owner": ref.user_id, "task": ref.task_id}
        return self._found(ref, await _run(self.session, _TOGGLE, parameters, _task_or_none))

    async def delete(self, user_id: str, task_id: int) -> None:
        """Delete the task; `TaskNotFound` if it is missing or not this user's."""
        ref = TaskRef(user_id=user_id, task_id=task_id)
        parameters = {"owner": ref.user_id, "task": ref.task_id}
        if await _run(self.session, _DELETE, parameters, _scalar) is None:
            raise TaskNotFound(ref.user_id, ref.task_id)

    async def count_for(self, user_id: str, *, completed: bool | None = None) -> int:
        """How many tasks the user has (optionally only done / not done ones)."""
        query = TaskListQuery(user_id=user_id, completed=completed)
        parameters = {"owner": query.user_id}
        return int(await _run(self.session, _COUNT[query.completed], parameters, _scalar) or 0)

    async def complete_all(self, user_id: str) -> int:
        """Mark all of the user's open tasks done; returns how many changed."""
        owner = UserRef(user_id=user_id)
        return await _run(self.session, _COMPLETE_ALL, {"owner": owner.user_id}, _rowcount)

    async def delete_completed(self, user_id: str) -> int:
        """Delete the user's done tasks; returns how many were deleted."""
        owner = UserRef(user_id=user_id)
        return await _run(self.session, _DELETE_COMPLETED, {"owner": owner.user_id}, _rowcount)

    async def _update_one(self, ref: TaskRef, values: dict[str, Any]) -> TaskRecord:
        statement = _update_statement(tuple(sorted(values)))
        parameters = {f"new_{name}": value for name, value in values.items()}
        parameters.update(owner=ref.user_id, task=ref.task_id)
        return self._found(ref, await _run(self.session, statement, parameters, _task_or_none))

    @staticmethod
    def _found(ref: TaskRef, task: TaskRecord | None) -> TaskRecord:
        if task is None:
            raise TaskNotFound(ref.user_id, ref.task_id)
        return task


class UserRepo:
    """Users, keyed by the auth provider's id; emails are stored lower-cased.

    Runs on an `AsyncSession` or an `AsyncConnection`, like `TaskRepo`.
    """

    def __init__(self, session: Executor) -> None:
        self.session = session

    async def upsert(self, user_id: str, *, email: str, name: str) -> UserRecord:
        """Create the user or update its email and name; `EmailTaken` if another user has it."""
        data = UserUpsert(user_id=user_id, email=email, name=name)
        parameters = {"id": data.user_id, "email": data.email, "name": data.name}
        # INSERT ... ON CONFLICT DO UPDATE returns the row in both cases.
        return await _run(self.session, _UPSERT, parameters, _user)

    async def get(self, user_id: str) -> UserRecord:
        """The user, or `UserNotFound`."""
        owner = UserRef(user_id=user_id)
        user = await _run(self.session, _USER_GET, {"user": owner.user_id}, _user_or_none)
        if user is None:
            raise UserNotFound(owner.user_id)
        return user

    async def get_by_email(self, email: str) -> UserRecord:
        """The user with this email (any case), or `UserNotFound`."""
        lookup = EmailLookup(email=email)
        user = await _run(self.session, _USER_BY_EMAIL, {"lookup": lookup.email}, _user_or_none)
        if user is None:
            raise UserNotFound(email=lookup.email)
        return user

    async def delete(self, user_id: str) -> None:
        """Delete the user and, by the foreign key's cascade, all of its tasks."""
        owner = UserRef(user_id=user_id)
        if await _run(self.session, _USER_DELETE, {"user": owner.user_id}, _scalar) is None:
            raise UserNotFound(owner.user_id)
