"""What the benchmarks run: repository calls, the same SQL for raw asyncpg, and the clients.

`CALLS[name](session, owner)` is one repository call; `RAW[name]` is the SQL SQLAlchemy sends
for it (captured from the repositories, `$n::TYPE` casts included) and its parameters, which
`check_raw_sql()` verifies against what the repositories really send before anything is timed.
A client runs one *unit of work* (a transaction holding one call) per `run(name, owner)`.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import asyncpg
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from todo_store import Task, TaskRepo, TodoStore, UserRepo


@dataclass(frozen=True)
class Owner:
    """A user with four tasks, the first one completed."""

    user_id: str
    email: str
    task_ids: tuple[int, ...]


async def make_owner(conn: asyncpg.Connection, tasks: int = 4) -> Owner:
    """Insert a fresh user and its tasks (on a setup connection, outside any measurement)."""
    user_id = f"b_{uuid.uuid4().hex[:12]}"
    email = f"{user_id}@example.com"
    async with conn.transaction():
        await conn.execute(
            "INSERT INTO users (id, email, name) VALUES ($1, $2, 'Bench')", user_id, email
        )
        rows = await conn.fetch(
            """INSERT INTO tasks (user_id, title, completed)
               SELECT $1, 'task ' || g, g = 1 FROM generate_series(1, $2) AS g RETURNING id""",
            user_id,
            tasks,
        )
    return Owner(user_id, email, tuple(sorted(row["id"] for row in rows)))


Call = Callable[[AsyncSession, Owner], Awaitable[object]]

CALLS: dict[str, Call] = {
    "TaskRepo.list_for": lambda s, o: TaskRepo(s).list_for(o.user_id),
    "TaskRepo.get": lambda s, o: TaskRepo(s).get(o.user_id, o.task_ids[1]),
    "TaskRepo.create": lambda s, o: TaskRepo(s).create(o.user_id, title="new"),
    "TaskRepo.update": lambda s, o: TaskRepo(s).update(o.user_id, o.task_ids[1], title="renamed"),
    "TaskRepo.set_completed": lambda s, o: TaskRepo(s).set_completed(o.user_id, o.task_ids[1]),
    "TaskRepo.toggle": lambda s, o: TaskRepo(s).toggle(o.user_id, o.task_ids[1]),
    "TaskRepo.delete": lambda s, o: TaskRepo(s).delete(o.user_id, o.task_ids[1]),
    "TaskRepo.count_for": lambda s, o: TaskRepo(s).count_for(o.user_id),
    "TaskRepo.complete_all": lambda s, o: TaskRepo(s).complete_all(o.user_id),
    "TaskRepo.delete_completed": lambda s, o: TaskRepo(s).delete_completed(o.user_id),
    "UserRepo.upsert": lambda s, o: UserRepo(s).upsert(o.user_id, email=o.email, name="Renamed"),
    "UserRepo.get": lambda s, o: UserRepo(s).get(o.user_id),
    "UserRepo.get_by_email": lambda s, o: UserRepo(s).get_by_email(o.email),
    "UserRepo.delete": lambda s, o: UserRepo(s).delete(o.user_id),
}

_TASK = (
    "tasks.id, tasks.user_id, tasks.title, tasks.description, tasks.completed, "
    "tasks.created_at, tasks.updated_at, tasks.version"
)
_USER = "users.id, users.email, users.name, users.created_at"
_MINE = "tasks.user_id = $1::VARCHAR AND tasks.id = $2::BIGINT"

RAW: dict[str, tuple[str, Callable[[Owner], tuple[Any, ...]]]] = {
    "TaskRepo.list_for": (
        f"SELECT {_TASK} FROM tasks WHERE tasks.user_id = $1::VARCHAR "
        "ORDER BY tasks.id DESC LIMIT $2::INTEGER",
        lambda o: (o.user_id, 50),
    ),
    "TaskRepo.get": (
        f"SELECT {_TASK} FROM tasks WHERE {_MINE}",
        lambda o: (o.user_id, o.task_ids[1]),
    ),
    "TaskRepo.create": (
        "INSERT INTO tasks (user_id, title, description, completed) VALUES "
        f"($1::VARCHAR, $2::VARCHAR, $3::VARCHAR, $4::BOOLEAN) RETURNING {_TASK}",
        lambda o: (o.user_id, "new", None, False),
    ),
    "TaskRepo.update": (
        "UPDATE tasks SET title=$1::VARCHAR WHERE tasks.user_id = $2::VARCHAR "
        f"AND tasks.id = $3::BIGINT RETURNING {_TASK}",
        lambda o: ("renamed", o.user_id, o.task_ids[1]),
    ),
    "TaskRepo.set_completed": (
        "UPDATE tasks SET completed=$1::BOOLEAN WHERE tasks.user_id = $2::VARCHAR "
        f"AND tasks.id = $3::BIGINT RETURNING {_TASK}",
        lambda o: (True, o.user_id, o.task_ids[1]),
    ),
    "TaskRepo.toggle": (
        f"UPDATE tasks SET completed=NOT tasks.completed WHERE {_MINE} RETURNING {_TASK}",
        lambda o: (o.user_id, o.task_ids[1]),
    ),
    "TaskRepo.delete": (
        f"DELETE FROM tasks WHERE {_MINE} RETURNING tasks.id",
        lambda o: (o.user_id, o.task_ids[1]),
    ),
    "TaskRepo.count_for": (
        "SELECT count(*) AS count_1 FROM tasks WHERE tasks.user_id = $1::VARCHAR",
        lambda o: (o.user_id,),
    ),
    "TaskRepo.complete_all": (
        "UPDATE tasks SET completed=$1::BOOLEAN WHERE tasks.user_id = $2::VARCHAR "
        "AND tasks.completed IS false",
        lambda o: (True, o.user_id),
    ),
    "TaskRepo.delete_completed": (
        "DELETE FROM tasks WHERE tasks.user_id = $1::VARCHAR AND tasks.completed IS true",
        lambda o: (o.user_id,),
    ),
    "UserRepo.upsert": (
        "INSERT INTO users (id, email, name) VALUES ($1::VARCHAR, $2::VARCHAR, $3::VARCHAR) "
        "ON CONFLICT (id) DO UPDATE SET email = excluded.email, name = excluded.name "
        f"RETURNING {_USER}",
        lambda o: (o.user_id, o.email, "Renamed"),
    ),
    "UserRepo.get": (
        f"SELECT {_USER} FROM users WHERE users.id = $1::VARCHAR",
        lambda o: (o.user_id,),
    ),
    "UserRepo.get_by_email": (
        f"SELECT {_USER} FROM users WHERE users.email = $1::VARCHAR",
        lambda o: (o.email,),
    ),
    "UserRepo.delete": (
        "DELETE FROM users WHERE users.id = $1::VARCHAR RETURNING users.id",
        lambda o: (o.user_id,),
    ),
}


def _normalised(sql: str) -> str:
    return " ".join(sql.split())


async def check_raw_sql(store: TodoStore, setup: asyncpg.Connection) -> list[str]:
    """Names whose `RAW` SQL or parameters differ from what the repository sends (none, ideally)."""
    sent: list[tuple[str, tuple[Any, ...]]] = []

    def record(_c: Any, _cur: Any, statement: str, parameters: Any, *_: Any) -> None:
        sent.append((_normalised(statement), tuple(parameters or ())))

    mismatches = []
    event.listen(store.engine.sync_engine, "before_cursor_execute", record)
    try:
        for name, call in CALLS.items():
            owner = await make_owner(setup)
            sent.clear()
            async with store.session() as session:
                await call(session, owner)
            sql, params = RAW[name]
            if sent != [(_normalised(sql), params(owner))]:
                mismatches.append(name)
    finally:
        event.remove(store.engine.sync_engine, "before_cursor_execute", record)
    return mismatches


# -- clients: each runs one unit of work (a transaction with one call) per `run` -------------


class Client(Protocol):
    async def run(self, name: str, owner: Owner) -> None: ...
    async def close(self) -> None: ...


class StoreClient:
    """todo_store: `async with store.session() as s: await CALLS[name](s, owner)`."""

    def __init__(self, store: TodoStore) -> None:
        self.store = store

    async def run(self, name: str, owner: Owner) -> None:
        async with self.store.session() as session:
            await CALLS[name](session, owner)

    async def close(self) -> None:
        await self.store.dispose()


class EngineClient:
    """The repositories on any other engine (SQLAlchemy's recipe), one `sessionmaker.begin()`."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.sessionmaker = async_sessionmaker(engine, expire_on_commit=False)

    async def run(self, name: str, owner: Owner) -> None:
        async with self.sessionmaker.begin() as session:
            await CALLS[name](session, owner)

    async def close(self) -> None:
        await self.engine.dispose()


class RawClient:
    """asyncpg with statement_cache_size=0: `async with conn.transaction(): conn.fetch(RAW)`.

    A fixed set of connections handed out in turn (asyncpg's own pool would add a reset
    query per release).
    """

    def __init__(self, connections: list[asyncpg.Connection]) -> None:
        self._idle = list(connections)
        self._all = list(connections)

    @classmethod
    async def connect(cls, dsn: str, size: int = 1) -> RawClient:
        return cls([await asyncpg.connect(dsn, statement_cache_size=0) for _ in range(size)])

    async def run(self, name: str, owner: Owner) -> None:
        conn = self._idle.pop()
        try:
            sql, params = RAW[name]
            async with conn.transaction():
                await conn.fetch(sql, *params(owner))
        finally:
            self._idle.append(conn)

    async def close(self) -> None:
        for conn in self._all:
            await conn.close()


class TutorialClient:
    """Tutorial-style ORM code on the todo_store engine: `add` + `commit` + `refresh`.

    `TaskRepo.create` is `session.add(Task(...)); await session.commit(); await
    session.refresh(task)`; `TaskRepo.update` is `session.get` + setattr + commit + refresh.
    Sessions use SQLAlchemy's defaults (`expire_on_commit=True`).
    """

    names = ("TaskRepo.create", "TaskRepo.update")

    def __init__(self, store: TodoStore) -> None:
        self.store = store

    async def run(self, name: str, owner: Owner) -> None:
        async with AsyncSession(self.store.engine) as session:
            if name == "TaskRepo.create":
                task = Task(user_id=owner.user_id, title="new")
                session.add(task)
            elif name == "TaskRepo.update":
                found = await session.get(Task, owner.task_ids[1])
                if found is None or found.user_id != owner.user_id:
                    raise LookupError(owner.task_ids[1])
                task = found
                task.title = "renamed"
            else:
                raise ValueError(f"no tutorial version of {name}")
            await session.commit()
            await session.refresh(task)

    async def close(self) -> None:
        await self.store.dispose()
