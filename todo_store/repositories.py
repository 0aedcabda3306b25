"""User-scoped data access: `TaskRepo` and `UserRepo`.

Guarantees:
- every `TaskRepo` statement filters on the `user_id` it is given; another user's task is
  reported exactly like a missing one (`TaskNotFound`);
- each method sends one SQL statement, and validates its input before that (a
  `pydantic.ValidationError`, a `ValueError`, naming the field);
- repositories never commit: the caller's unit of work (`TodoStore.session()`) does;
- returned objects are fully loaded and stay readable after the session closes.
"""

from __future__ import annotations

from typing import Any, Final, cast

from sqlalchemy import CursorResult, delete, func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from todo_store.errors import TaskNotFound, UserNotFound
from todo_store.models import Task, User
from todo_store.schemas import (
    EmailLookup,
    TaskCreate,
    TaskListQuery,
    TaskPatch,
    TaskRef,
    UserRef,
    UserUpsert,
)


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


UNSET: Final = _Unset()
"""Default of `TaskRepo.update` arguments: the field is left as it is."""

# Refresh objects already in the session's identity map with the row the statement returned.
_FRESH = {"populate_existing": True}


def _rowcount(result: object) -> int:
    return cast(CursorResult[Any], result).rowcount


class TaskRepo:
    """Tasks of one user at a time: every method takes the owner's `user_id` first."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def list_for(
        self,
        user_id: str,
        *,
        completed: bool | None = None,
        limit: int = 50,
        before: int | None = None,
    ) -> list[Task]:
        """The user's tasks, newest first; `before` (a task id) pages backwards by keyset.

        `limit` is 1..500. An unknown user simply has no tasks.
        """
        query = TaskListQuery(user_id=user_id, completed=completed, limit=limit, before=before)
        stmt = select(Task).where(Task.user_id == query.user_id)
        if query.completed is not None:
            stmt = stmt.where(Task.completed.is_(query.completed))
        if query.before is not None:
            stmt = stmt.where(Task.id < query.before)
        stmt = stmt.order_by(Task.id.desc()).limit(query.limit).execution_options(**_FRESH)
        return list(await self.session.scalars(stmt))

    async def get(self, user_id: str, task_id: int) -> Task:
        """The task, or `TaskNotFound` if it is missing or not this user's."""
        ref = TaskRef(user_id=user_id, task_id=task_id)
        task = await self.session.scalar(
            select(Task)
            .where(Task.user_id == ref.user_id, Task.id == ref.task_id)
            .execution_options(**_FRESH)
        )
        if task is None:
            raise TaskNotFound(ref.user_id, ref.task_id)
        return task

    async def create(self, user_id: str, *, title: str, description: str | None = None) -> Task:
        """A new task owned by `user_id` (title stripped); `UserNotFound` if no such user."""
        owner = UserRef(user_id=user_id)
        data = TaskCreate(title=title, description=description)
        stmt = (
            insert(Task)
            .values(user_id=owner.user_id, title=data.title, description=data.description)
            .returning(Task)
        )
        try:
            return (await self.session.scalars(stmt)).one()
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
    ) -> Task:
        """Write only the fields given (`description=None` clears it); `TaskNotFound` else."""
        ref = TaskRef(user_id=user_id, task_id=task_id)
        given = {"title": title, "description": description, "completed": completed}
        patch = TaskPatch.model_validate({k: v for k, v in given.items() if v is not UNSET})
        if not patch.changes():
            return await self.get(ref.user_id, ref.task_id)
        return await self._update_one(ref, patch.changes())

    async def set_completed(self, user_id: str, task_id: int, completed: bool = True) -> Task:
        """Mark the task done (or not done); `TaskNotFound` if it is not this user's."""
        ref = TaskRef(user_id=user_id, task_id=task_id)
        patch = TaskPatch(completed=completed)
        return await self._update_one(ref, patch.changes())

    async def toggle(self, user_id: str, task_id: int) -> Task:
        """Flip `completed` atomically in the database (concurrent toggles never lose one)."""
        ref = TaskRef(user_id=user_id, task_id=task_id)
        return await self._update_one(ref, {"completed": ~Task.completed})

    async def delete(self, user_id: str, task_id: int) -> None:
        """Delete the task; `TaskNotFound` if it is missing or not this user's."""
        ref = TaskRef(user_id=user_id, task_id=task_id)
        deleted = await self.session.scalar(
            delete(Task)
            .where(Task.user_id == ref.user_id, Task.id == ref.task_id)
            .returning(Task.id)
        )
        if deleted is None:
            raise TaskNotFound(ref.user_id, ref.task_id)

    async def count_for(self, user_id: str, *, completed: bool | None = None) -> int:
        """How many tasks the user has (optionally only done / not done ones)."""
        query = TaskListQuery(user_id=user_id, completed=completed)
        stmt = select(func.count()).select_from(Task).where(Task.user_id == query.user_id)
        if query.completed is not None:
            stmt = stmt.where(Task.completed.is_(query.completed))
        return (await self.session.scalar(stmt)) or 0

    async def complete_all(self, user_id: str) -> int:
        """Mark all of the user's open tasks done; returns how many changed."""
        owner = UserRef(user_id=user_id)
        result = await self.session.execute(
            update(Task)
            .where(Task.user_id == owner.user_id, Task.completed.is_(False))
            .values(completed=True)
        )
        return _rowcount(result)

    async def delete_completed(self, user_id: str) -> int:
        """Delete the user's done tasks; returns how many were deleted."""
        owner = UserRef(user_id=user_id)
        result = await self.session.execute(
            delete(Task).where(Task.user_id == owner.user_id, Task.completed.is_(True))
        )
        return _rowcount(result)

    async def _update_one(self, ref: TaskRef, values: dict[str, Any]) -> Task:
        task = await self.session.scalar(
            update(Task)
            .where(Task.user_id == ref.user_id, Task.id == ref.task_id)
            .values(values)
            .returning(Task)
            .execution_options(**_FRESH)
        )
        if task is None:
            raise TaskNotFound(ref.user_id, ref.task_id)
        return task


class UserRepo:
    """Users, keyed by the auth provider's id; emails are stored lower-cased."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def upsert(self, user_id: str, *, email: str, name: str) -> User:
        """Create the user or update its email and name; `EmailTaken` if another user has it."""
        data = UserUpsert(user_id=user_id, email=email, name=name)
        stmt = insert(User).values(id=data.user_id, email=data.email, name=data.name)
        stmt = stmt.on_conflict_do_update(
            index_elements=[User.id],
            set_={"email": stmt.excluded.email, "name": stmt.excluded.name},
        )
        # INSERT ... ON CONFLICT DO UPDATE returns the row in both cases.
        return (await self.session.scalars(stmt.returning(User).execution_options(**_FRESH))).one()

    async def get(self, user_id: str) -> User:
        """The user, or `UserNotFound`."""
        owner = UserRef(user_id=user_id)
        user = await self.session.scalar(
            select(User).where(User.id == owner.user_id).execution_options(**_FRESH)
        )
        if user is None:
            raise UserNotFound(owner.user_id)
        return user

    async def get_by_email(self, email: str) -> User:
        """The user with this email (any case), or `UserNotFound`."""
        lookup = EmailLookup(email=email)
        user = await self.session.scalar(
            select(User).where(User.email == lookup.email).execution_options(**_FRESH)
        )
        if user is None:
            raise UserNotFound(email=lookup.email)
        return user

    async def delete(self, user_id: str) -> None:
        """Delete the user and, by the foreign key's cascade, all of its tasks."""
        owner = UserRef(user_id=user_id)
        deleted = await self.session.scalar(
            delete(User).where(User.id == owner.user_id).returning(User.id)
        )
        if deleted is None:
            raise UserNotFound(owner.user_id)
