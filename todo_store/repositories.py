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
from typing import Any, Final, NoReturn, TypeVar, cast

from sqlalchemy import (
    Column,
    ColumnElement,
    Executable,
    Insert,
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
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlalchemy.orm import Session

from todo_store import pages
from todo_store.columns import TableColumns
from todo_store.errors import TaskNotFound, UserNotFound, VersionConflict
from todo_store.models import Task, User
from todo_store.schemas import (
    EmailLookup,
    ExpectedVersion,
    TaskCreate,
    TaskListQuery,
    TaskPatch,
    TaskRecord,
    TaskRef,
    UserRecord,
    UserRef,
    UserUpsert,
)
from todo_store.units import Rows, UnitSession

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
_TASK_FIELDS = frozenset(TaskRecord._fields)
_USER_FIELDS = frozenset(UserRecord._fields)

# The columns as they are when first used: an application's own columns included, whether
# its models were imported before or after this module (see `columns.py`).
TASK_TABLE: Final = TableColumns(TASKS, TaskRecord, lambda column: column.name not in _TASK_FIELDS)
USER_TABLE: Final = TableColumns(USERS, UserRecord, lambda column: column.name not in _USER_FIELDS)

# -- statements, built once per set of columns ------------------------------------------------
# Bound parameter names never equal a column name: SQLAlchemy reserves those in INSERT/UPDATE.

Columns = tuple[Column[Any], ...]

_OWNER = TASKS.c.user_id == bindparam("owner")
_THE_TASK = and_(_OWNER, TASKS.c.id == bindparam("task"))
_AT_VERSION = TASKS.c.version == bindparam("expected")


def _status(completed: bool | None) -> list[ColumnElement[bool]]:
    # `IS true` / `IS false` as literals, one statement per value: PostgreSQL has no `IS $1`.
    return [] if completed is None else [TASKS.c.completed.is_(completed)]


def _the_task(versioned: bool) -> ColumnElement[bool]:
    return and_(_THE_TASK, _AT_VERSION) if versioned else _THE_TASK


def _list_statement(columns: Columns, completed: bool | None, paged: bool) -> Select[Any]:
    keyset = [TASKS.c.id < bindparam("before")] if paged else []
    return (
        select(*columns)
        .where(_OWNER, *_status(completed), *keyset)
        .order_by(TASKS.c.id.desc())
        .limit(bindparam("row_limit", type_=Integer))
    )


def _get_statement(columns: Columns) -> Select[Any]:
    return select(*columns).where(_THE_TASK)


def _create_statement(columns: Columns) -> Insert:
    # Column values come from the parameter names (user_id, title, description, ...).
    return insert(TASKS).returning(*columns)


def _toggle_statement(columns: Columns, versioned: bool) -> Update:
    return (
        update(TASKS)
        .where(_the_task(versioned))
        .values(completed=~TASKS.c.completed)
        .returning(*columns)
    )


def _update_statement(columns: Columns, fields: tuple[str, ...], versioned: bool) -> Update:
    values: dict[str, Any] = {name: bindparam(f"new_{name}") for name in fields}
    return update(TASKS).where(_the_task(versioned)).values(values).returning(*columns)


_DELETE: Final = {
    versioned: delete(TASKS).where(_the_task(versioned)).returning(TASKS.c.id)
    for versioned in (False, True)
}
_VERSION_OF: Final = select(TASKS.c.version).where(_THE_TASK)
_COUNT: Final = {
    completed: select(func.count()).select_from(TASKS).where(_OWNER, *_status(completed))
    for completed in (None, True, False)
}
_COMPLETE_ALL: Final = update(TASKS).where(_OWNER, *_status(False)).values(completed=True)
_DELETE_COMPLETED: Final = delete(TASKS).where(_OWNER, *_status(True))


def _upsert_statement(columns: Columns, app_fields: tuple[str, ...]) -> Insert:
    upsert = pg_insert(USERS)
    changed = ("email", "name", *app_fields)
    return upsert.on_conflict_do_update(
        index_elements=[USERS.c.id],
        set_={name: upsert.excluded[name] for name in changed},
    ).returning(*columns)


def _user_get_statement(columns: Columns) -> Select[Any]:
    return select(*columns).where(USERS.c.id == bindparam("user"))


def _user_by_email_statement(columns: Columns) -> Select[Any]:
    return select(*columns).where(USERS.c.email == bindparam("lookup"))


_USER_DELETE: Final = delete(USERS).where(USERS.c.id == bindparam("user")).returning(USERS.c.id)


# -- running them -----------------------------------------------------------------------------


def _in_session(
    session: Session,
    statement: Executable,
    parameters: Mapping[str, Any],
    shape: Callable[[Rows], R],
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
    shape: Callable[[Rows], R],
) -> R:
    """Execute on the session's connection and shape the result, in one hop to the driver."""
    if isinstance(executor, AsyncConnection):
        return shape(await executor.execute(statement, parameters))
    if isinstance(executor, UnitSession) and executor.runs_directly():
        return shape(await executor.unit.fetch(statement, parameters))
    return await executor.run_sync(_in_session, statement, parameters, shape)


def _scalar(result: Rows) -> Any:
    return result.scalar_one_or_none()


def _rowcount(result: Rows) -> int:
    return result.rowcount


class TaskRepo:
    """Tasks of one user at a time: every method takes the owner's `user_id` first.

    Runs on an `AsyncSession` (`store.session()`), or on an `AsyncConnection`, which skips
    the ORM session's bookkeeping: the same statements, results and errors.

    Columns an application adds to `tasks` are fields of the records returned, and keyword
    arguments of `create` and `update`, validated by the column's type before any SQL.

    `expected_version=` (on `update`, `set_completed`, `toggle`, `delete`): the write happens
    only if the task is still at that version; otherwise `VersionConflict` (with
    `.current_version`) and nothing changes. Without it, the last write wins.
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
        shape = TASK_TABLE.shape()
        statement = shape.built(_list_statement, query.completed, query.before is not None)
        parameters = {"owner": query.user_id, "row_limit": query.limit, "before": query.before}
        if query.before is None:
            del parameters["before"]
        return await _run(self.session, statement, parameters, shape.all)

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
        shape = TASK_TABLE.shape()
        statement = shape.built(pages.statement, pages.statement_key(query))
        rows = await _run(self.session, statement, pages.parameters(query), shape.all)
        return pages.page_of(query, key, rows)

    async def get(self, user_id: str, task_id: int) -> TaskRecord:
        """The task, or `TaskNotFound` if it is missing or not this user's."""
        ref = TaskRef(user_id=user_id, task_id=task_id)
        shape = TASK_TABLE.shape()
        parameters = {"owner": ref.user_id, "task": ref.task_id}
        task = await _run(self.session, shape.built(_get_statement), parameters, shape.one_or_none)
        if task is None:
            raise TaskNotFound(ref.user_id, ref.task_id)
        return task

    async def create(
        self, user_id: str, *, title: str, description: str | None = None, **app_columns: Any
    ) -> TaskRecord:
        """A new task owned by `user_id` (title stripped), at version 1; `UserNotFound` if no
        such user. `app_columns`: values of the application's own columns of `tasks`."""
        owner = UserRef(user_id=user_id)
        data = TaskCreate(title=title, description=description)
        shape = TASK_TABLE.shape()
        parameters = {
            "user_id": owner.user_id,
            "title": data.title,
            "description": data.description,
            **shape.create_values(app_columns),
        }
        try:
            return await _run(self.session, shape.built(_create_statement), parameters, shape.one)
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
        expected_version: int | None = None,
        **app_columns: Any,
    ) -> TaskRecord:
        """Write only the fields given (`description=None` clears it; `app_columns` are the
        application's own columns); `TaskNotFound` if the task is not this user's.

        With no field given, returns the task as it is (one SELECT), after checking
        `expected_version` if given.
        """
        ref = TaskRef(user_id=user_id, task_id=task_id)
        expected = ExpectedVersion(expected_version=expected_version).expected_version
        given = {"title": title, "description": description, "completed": completed}
        patch = TaskPatch.model_validate({k: v for k, v in given.items() if v is not UNSET})
        shape = TASK_TABLE.shape()
        changes = {**patch.changes(), **shape.update_values(app_columns)}
        if not changes:
            task = await self.get(ref.user_id, ref.task_id)
            if expected is not None and task.version != expected:
                raise VersionConflict(
                    ref.user_id, ref.task_id, expected=expected, current=task.version
                )
            return task
        return await self._update_one(ref, changes, expected)

    async def set_completed(
        self,
        user_id: str,
        task_id: int,
        completed: bool = True,
        *,
        expected_version: int | None = None,
    ) -> TaskRecord:
        """Mark the task done (or not done); `TaskNotFound` if it is not this user's."""
        ref = TaskRef(user_id=user_id, task_id=task_id)
        expected = ExpectedVersion(expected_version=expected_version).expected_version
        patch = TaskPatch(completed=completed)
        return await self._update_one(ref, patch.changes(), expected)

    async def toggle(
        self, user_id: str, task_id: int, *, expected_version: int | None = None
    ) -> TaskRecord:
        """Flip `completed` atomically in the database (concurrent toggles never lose one)."""
        ref = TaskRef(user_id=user_id, task_id=task_id)
        expected = ExpectedVersion(expected_version=expected_version).expected_version
        shape = TASK_TABLE.shape()
        statement = shape.built(_toggle_statement, expected is not None)
        task = await _run(
            self.session, statement, _task_parameters(ref, expected), shape.one_or_none
        )
        return task if task is not None else await self._not_written(ref, expected)

    async def delete(
        self, user_id: str, task_id: int, *, expected_version: int | None = None
    ) -> None:
        """Delete the task; `TaskNotFound` if it is missing or not this user's."""
        ref = TaskRef(user_id=user_id, task_id=task_id)
        expected = ExpectedVersion(expected_version=expected_version).expected_version
        statement = _DELETE[expected is not None]
        parameters = _task_parameters(ref, expected)
        if await _run(self.session, statement, parameters, _scalar) is None:
            await self._not_written(ref, expected)

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

    async def _update_one(
        self, ref: TaskRef, values: dict[str, Any], expected: int | None
    ) -> TaskRecord:
        shape = TASK_TABLE.shape()
        statement = shape.built(_update_statement, tuple(sorted(values)), expected is not None)
        parameters = _task_parameters(ref, expected)
        parameters.update({f"new_{name}": value for name, value in values.items()})
        task = await _run(self.session, statement, parameters, shape.one_or_none)
        return task if task is not None else await self._not_written(ref, expected)

    async def _not_written(self, ref: TaskRef, expected: int | None) -> NoReturn:
        """Why a write matched no row: a missing task, or (one more statement, only when a
        version was expected) a task that has moved on from it."""
        if expected is not None:
            parameters = {"owner": ref.user_id, "task": ref.task_id}
            current = await _run(self.session, _VERSION_OF, parameters, _scalar)
            if current is not None:
                raise VersionConflict(ref.user_id, ref.task_id, expected=expected, current=current)
        raise TaskNotFound(ref.user_id, ref.task_id)


def _task_parameters(ref: TaskRef, expected: int | None) -> dict[str, Any]:
    parameters: dict[str, Any] = {"owner": ref.user_id, "task": ref.task_id}
    if expected is not None:
        parameters["expected"] = expected
    return parameters


class UserRepo:
    """Users, keyed by the auth provider's id; emails are stored lower-cased.

    Runs on an `AsyncSession` or an `AsyncConnection`, like `TaskRepo`. Columns an
    application adds to `users` are fields of the records and keyword arguments of `upsert`.
    """

    def __init__(self, session: Executor) -> None:
        self.session = session

    async def upsert(
        self, user_id: str, *, email: str, name: str, **app_columns: Any
    ) -> UserRecord:
        """Create the user or update its email and name (and the application's columns
        given); `EmailTaken` if another user has the email."""
        data = UserUpsert(user_id=user_id, email=email, name=name)
        shape = USER_TABLE.shape()
        app_values = shape.create_values(app_columns)
        parameters = {"id": data.user_id, "email": data.email, "name": data.name, **app_values}
        statement = shape.built(_upsert_statement, tuple(sorted(app_values)))
        # INSERT ... ON CONFLICT DO UPDATE returns the row in both cases.
        return await _run(self.session, statement, parameters, shape.one)

    async def get(self, user_id: str) -> UserRecord:
        """The user, or `UserNotFound`."""
        owner = UserRef(user_id=user_id)
        shape = USER_TABLE.shape()
        statement = shape.built(_user_get_statement)
        user = await _run(self.session, statement, {"user": owner.user_id}, shape.one_or_none)
        if user is None:
            raise UserNotFound(owner.user_id)
        return user

    async def get_by_email(self, email: str) -> UserRecord:
        """The user with this email (any case), or `UserNotFound`."""
        lookup = EmailLookup(email=email)
        shape = USER_TABLE.shape()
        statement = shape.built(_user_by_email_statement)
        user = await _run(self.session, statement, {"lookup": lookup.email}, shape.one_or_none)
        if user is None:
            raise UserNotFound(email=lookup.email)
        return user

    async def delete(self, user_id: str) -> None:
        """Delete the user and, by the foreign key's cascade, all of its tasks."""
        owner = UserRef(user_id=user_id)
        if await _run(self.session, _USER_DELETE, {"user": owner.user_id}, _scalar) is None:
            raise UserNotFound(owner.user_id)
