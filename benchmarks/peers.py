"""The hot calls, written once per implementation the comparison measures.

Every implementation runs each operation as its own unit of work and returns the row(s), on
the same PostgreSQL, with the same connect arguments (todo_store's engine: statement caching
off, unnamed prepared statements) and the same pool size. The peers are written the way their
documentation teaches:

- tutorial ORM: `AsyncSession(engine)` with SQLAlchemy's defaults; reads with `session.get` /
  `select(Task)`; writes as `session.get` + attribute set + `commit()` + `refresh()`;
- advanced-alchemy: `SQLAlchemyAsyncRepository` `get_one` / `list` / `add` / `update` /
  `count`, writes with `auto_commit=True`;
- SQLAlchemy Core: `engine.begin()` and a `select` / `insert` / `update` built in the call,
  rows returned as `Row`s;
- raw asyncpg: the exact SQL text todo_store sends (checked before measuring), with
  `statement_cache_size=0`, inside `conn.transaction()` (or without one, for the
  per-statement-commit comparison).
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any, cast

import asyncpg
from sqlalchemy import Table, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from benchmarks.workload import RAW
from todo_store import Task, TaskRepo, TodoStore

HOT_CALLS = ("get", "list_for", "create", "toggle", "update", "count_for")
LIST_LIMIT = 50

Operation = Callable[[str, int], Awaitable[object]]
"""One unit of work for (user id, task id of that user)."""


class Implementation:
    """A named set of operations, one per hot call."""

    label = ""

    def operations(self) -> dict[str, Operation]:
        return {name: getattr(self, name) for name in HOT_CALLS}

    async def close(self) -> None:
        return None


def supports_non_atomic(store: TodoStore) -> bool:
    """Whether this todo_store has `session(atomic=False)` (per-statement commits)."""
    return "atomic" in inspect.signature(store.session).parameters


class TodoStoreImpl(Implementation):
    """`async with store.session() as s: await TaskRepo(s).<call>(...)`."""

    def __init__(self, store: TodoStore, *, atomic: bool = True) -> None:
        self.store = store
        self.atomic = atomic
        self.label = "todo_store" if atomic else "todo_store atomic=False"

    def _session(self) -> Any:
        if self.atomic:
            return self.store.session()
        return cast(Any, self.store.session)(atomic=False)

    async def get(self, user_id: str, task_id: int) -> object:
        async with self._session() as s:
            return await TaskRepo(s).get(user_id, task_id)

    async def list_for(self, user_id: str, task_id: int) -> object:
        async with self._session() as s:
            return await TaskRepo(s).list_for(user_id, limit=LIST_LIMIT)

    async def create(self, user_id: str, task_id: int) -> object:
        async with self._session() as s:
            return await TaskRepo(s).create(user_id, title="new")

    async def toggle(self, user_id: str, task_id: int) -> object:
        async with self._session() as s:
            return await TaskRepo(s).toggle(user_id, task_id)

    async def update(self, user_id: str, task_id: int) -> object:
        async with self._session() as s:
            return await TaskRepo(s).update(user_id, task_id, title="renamed")

    async def count_for(self, user_id: str, task_id: int) -> object:
        async with self._session() as s:
            return await TaskRepo(s).count_for(user_id)


class TodoStoreOnConnection(TodoStoreImpl):
    """The repositories on an `AsyncConnection` in autocommit mode: no ORM session at all.

    What a connection-based unit of work would cost (the engine has no public one yet): an
    autocommit connection from the store's engine, `TaskRepo(connection).<call>(...)`.
    """

    def __init__(self, store: TodoStore) -> None:
        super().__init__(store, atomic=False)
        self.label = "todo_store on AsyncConnection, atomic=False"
        self.engine = store.engine.execution_options(isolation_level="AUTOCOMMIT")

    def _session(self) -> Any:
        return self.engine.connect()


class TutorialOrm(Implementation):
    """The ORM as tutorials write it, on the same engine."""

    label = "tutorial ORM"

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    @staticmethod
    async def _owned(session: AsyncSession, user_id: str, task_id: int) -> Task:
        task = await session.get(Task, task_id)
        if task is None or task.user_id != user_id:
            raise LookupError(task_id)
        return task

    async def get(self, user_id: str, task_id: int) -> object:
        async with AsyncSession(self.engine) as session:
            return await self._owned(session, user_id, task_id)

    async def list_for(self, user_id: str, task_id: int) -> object:
        async with AsyncSession(self.engine) as session:
            query = (
                select(Task)
                .where(Task.user_id == user_id)
                .order_by(Task.id.desc())
                .limit(LIST_LIMIT)
            )
            return (await session.scalars(query)).all()

    async def create(self, user_id: str, task_id: int) -> object:
        async with AsyncSession(self.engine) as session:
            task = Task(user_id=user_id, title="new")
            session.add(task)
            await session.commit()
            await session.refresh(task)
            return task

    async def toggle(self, user_id: str, task_id: int) -> object:
        async with AsyncSession(self.engine) as session:
            task = await self._owned(session, user_id, task_id)
            task.completed = not task.completed
            await session.commit()
            await session.refresh(task)
            return task

    async def update(self, user_id: str, task_id: int) -> object:
        async with AsyncSession(self.engine) as session:
            task = await self._owned(session, user_id, task_id)
            task.title = "renamed"
            await session.commit()
            await session.refresh(task)
            return task

    async def count_for(self, user_id: str, task_id: int) -> object:
        async with AsyncSession(self.engine) as session:
            query = select(func.count()).select_from(Task).where(Task.user_id == user_id)
            return await session.scalar(query)


class AdvancedAlchemy(Implementation):
    """advanced-alchemy's async repository (a benchmark-only dependency), on the same engine."""

    label = "advanced-alchemy"

    def __init__(self, engine: AsyncEngine) -> None:
        # Imported here: a benchmark-only dependency, and the run goes on without it.
        from advanced_alchemy.filters import LimitOffset, OrderBy  # noqa: PLC0415
        from advanced_alchemy.repository import SQLAlchemyAsyncRepository  # noqa: PLC0415

        class TaskRepository(SQLAlchemyAsyncRepository[Task]):  # type: ignore[type-var]
            model_type = Task

        self.repository = TaskRepository
        self.newest = (OrderBy(field_name="id", sort_order="desc"), LimitOffset(LIST_LIMIT, 0))
        self.sessionmaker = async_sessionmaker(engine, expire_on_commit=False)

    async def get(self, user_id: str, task_id: int) -> object:
        async with self.sessionmaker() as session:
            return await self.repository(session=session).get_one(id=task_id, user_id=user_id)

    async def list_for(self, user_id: str, task_id: int) -> object:
        async with self.sessionmaker() as session:
            repository = self.repository(session=session)
            return await repository.list(Task.user_id == user_id, *self.newest)

    async def create(self, user_id: str, task_id: int) -> object:
        async with self.sessionmaker() as session:
            repository = self.repository(session=session)
            return await repository.add(Task(user_id=user_id, title="new"), auto_commit=True)

    async def toggle(self, user_id: str, task_id: int) -> object:
        async with self.sessionmaker() as session:
            repository = self.repository(session=session)
            task = await repository.get_one(id=task_id, user_id=user_id)
            task.completed = not task.completed
            return await repository.update(task, auto_commit=True)

    async def update(self, user_id: str, task_id: int) -> object:
        async with self.sessionmaker() as session:
            repository = self.repository(session=session)
            task = await repository.get_one(id=task_id, user_id=user_id)
            task.title = "renamed"
            return await repository.update(task, auto_commit=True)

    async def count_for(self, user_id: str, task_id: int) -> object:
        async with self.sessionmaker() as session:
            return await self.repository(session=session).count(user_id=user_id)


TASKS = cast(Table, Task.__table__)


class CoreRows(Implementation):
    """SQLAlchemy Core as its tutorial writes it: statements built in the call, `Row`s back."""

    label = "SQLAlchemy Core"

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def get(self, user_id: str, task_id: int) -> object:
        async with self.engine.begin() as conn:
            query = select(TASKS).where(TASKS.c.user_id == user_id, TASKS.c.id == task_id)
            return (await conn.execute(query)).one()

    async def list_for(self, user_id: str, task_id: int) -> object:
        async with self.engine.begin() as conn:
            query = (
                select(TASKS)
                .where(TASKS.c.user_id == user_id)
                .order_by(TASKS.c.id.desc())
                .limit(LIST_LIMIT)
            )
            return (await conn.execute(query)).all()

    async def create(self, user_id: str, task_id: int) -> object:
        async with self.engine.begin() as conn:
            stmt = insert(TASKS).values(user_id=user_id, title="new").returning(TASKS)
            return (await conn.execute(stmt)).one()

    async def _update(self, user_id: str, task_id: int, values: dict[str, Any]) -> object:
        async with self.engine.begin() as conn:
            stmt = (
                update(TASKS)
                .where(TASKS.c.user_id == user_id, TASKS.c.id == task_id)
                .values(values)
                .returning(TASKS)
            )
            return (await conn.execute(stmt)).one()

    async def toggle(self, user_id: str, task_id: int) -> object:
        return await self._update(user_id, task_id, {"completed": ~TASKS.c.completed})

    async def update(self, user_id: str, task_id: int) -> object:
        return await self._update(user_id, task_id, {"title": "renamed"})

    async def count_for(self, user_id: str, task_id: int) -> object:
        async with self.engine.begin() as conn:
            query = select(func.count()).select_from(TASKS).where(TASKS.c.user_id == user_id)
            return (await conn.execute(query)).scalar_one()


# The SQL todo_store sends (benchmarks.workload.RAW, verified by check_raw_sql) and the
# parameters for (user id, task id).
RAW_SQL: dict[str, tuple[str, Callable[[str, int], tuple[Any, ...]]]] = {
    "get": (RAW["TaskRepo.get"][0], lambda u, t: (u, t)),
    "list_for": (RAW["TaskRepo.list_for"][0], lambda u, t: (u, LIST_LIMIT)),
    "create": (RAW["TaskRepo.create"][0], lambda u, t: (u, "new", None, False)),
    "toggle": (RAW["TaskRepo.toggle"][0], lambda u, t: (u, t)),
    "update": (RAW["TaskRepo.update"][0], lambda u, t: ("renamed", u, t)),
    "count_for": (RAW["TaskRepo.count_for"][0], lambda u, t: (u,)),
}


class RawAsyncpg(Implementation):
    """asyncpg, `statement_cache_size=0`, a fixed set of connections handed out in turn."""

    def __init__(self, connections: list[asyncpg.Connection], *, atomic: bool = True) -> None:
        self._idle = connections
        self.atomic = atomic
        self.label = "raw asyncpg" if atomic else "raw asyncpg, no transaction"

    @classmethod
    async def connect(cls, dsn: str, size: int) -> list[asyncpg.Connection]:
        return [await asyncpg.connect(dsn, statement_cache_size=0) for _ in range(size)]

    def operations(self) -> dict[str, Operation]:
        return {name: self._operation(name) for name in HOT_CALLS}

    def _operation(self, name: str) -> Operation:
        sql, parameters = RAW_SQL[name]

        async def run(user_id: str, task_id: int) -> object:
            conn = self._idle.pop()
            try:
                if not self.atomic:
                    return await conn.fetch(sql, *parameters(user_id, task_id))
                async with conn.transaction():
                    return await conn.fetch(sql, *parameters(user_id, task_id))
            finally:
                self._idle.append(conn)

        return run
