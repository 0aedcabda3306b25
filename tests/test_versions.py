"""Task versions: every change increments `version`; `expected_version=` refuses stale edits.

Most tests run in the rolled-back `session`. The contended-edits experiment runs two editors
of one task through PgBouncer (transaction mode) with real commits, on a user of its own that
it deletes at the end; the migration test runs on an empty database of its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest
from pydantic import ValidationError
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from todo_store import (
    ConflictError,
    TaskNotFound,
    TaskRecord,
    TaskRepo,
    TodoStore,
    UserRepo,
    VersionConflict,
    migrations,
)
from todo_store.testing.plugin import settings_for


@pytest.fixture
async def tasks(session: AsyncSession) -> TaskRepo:
    users = UserRepo(session)
    await users.upsert("v_me", email="me@example.com", name="Me")
    await users.upsert("v_other", email="other@example.com", name="Other")
    return TaskRepo(session)


async def _stored(session: AsyncSession, task_id: int) -> tuple[Any, ...] | None:
    row = (
        await session.execute(
            text("SELECT title, description, completed, version FROM tasks WHERE id = :id"),
            {"id": task_id},
        )
    ).one_or_none()
    return None if row is None else tuple(row)


async def test_every_change_increments_the_version(tasks: TaskRepo, session: AsyncSession) -> None:
    task = await tasks.create("v_me", title="first")
    assert task.version == 1
    assert (await tasks.update("v_me", task.id, title="second")).version == 2
    assert (await tasks.toggle("v_me", task.id)).version == 3
    assert (await tasks.set_completed("v_me", task.id, False)).version == 4
    # Raw SQL counts too (the trigger), and cannot set a version of its own choosing.
    await session.execute(text("UPDATE tasks SET version = 1 WHERE id = :id"), {"id": task.id})
    assert (await tasks.get("v_me", task.id)).version == 5
    assert await tasks.complete_all("v_me") == 1
    assert (await tasks.get("v_me", task.id)).version == 6


Write = Callable[[TaskRepo, int, int], Awaitable[object]]

WRITES: dict[str, Write] = {
    "update": lambda repo, task_id, v: repo.update(
        "v_me", task_id, title="mine", expected_version=v
    ),
    "set_completed": lambda repo, task_id, v: repo.set_completed(
        "v_me", task_id, True, expected_version=v
    ),
    "toggle": lambda repo, task_id, v: repo.toggle("v_me", task_id, expected_version=v),
    "delete": lambda repo, task_id, v: repo.delete("v_me", task_id, expected_version=v),
}


@pytest.mark.parametrize("method", WRITES)
async def test_the_expected_version_is_one_statement(
    tasks: TaskRepo, session: AsyncSession, statements: Any, method: str
) -> None:
    task = await tasks.create("v_me", title="theirs")
    statements.clear()
    result = await WRITES[method](tasks, task.id, 1)
    assert len(statements) == 1, statements.statements
    if isinstance(result, TaskRecord):
        assert result.version == 2
    else:
        assert await _stored(session, task.id) is None


@pytest.mark.parametrize("method", WRITES)
async def test_a_stale_version_changes_nothing(
    tasks: TaskRepo, session: AsyncSession, statements: Any, method: str
) -> None:
    task = await tasks.create("v_me", title="theirs")
    await tasks.update("v_me", task.id, description="moved on")  # now at version 2
    before = await _stored(session, task.id)
    statements.clear()
    with pytest.raises(VersionConflict) as raised:
        await WRITES[method](tasks, task.id, 1)
    assert isinstance(raised.value, ConflictError)
    assert raised.value.current_version == 2
    assert raised.value.expected_version == 1
    assert "theirs" not in str(raised.value)
    assert "moved on" not in str(raised.value)
    assert len(statements) == 2  # the write that matched nothing, then the version it has
    assert await _stored(session, task.id) == before


@pytest.mark.parametrize("method", WRITES)
async def test_a_missing_or_anothers_task_is_not_found_whatever_the_version(
    tasks: TaskRepo, method: str
) -> None:
    theirs = await tasks.create("v_other", title="not yours")
    for task_id in (theirs.id, theirs.id + 1_000_000):
        with pytest.raises(TaskNotFound):
            await WRITES[method](tasks, task_id, 1)
    # The other user's task was not touched (still version 1).
    assert (await tasks.get("v_other", theirs.id)).version == 1


async def test_an_empty_update_checks_the_expected_version(tasks: TaskRepo) -> None:
    task = await tasks.create("v_me", title="x")
    assert await tasks.update("v_me", task.id, expected_version=1) == task
    with pytest.raises(VersionConflict) as raised:
        await tasks.update("v_me", task.id, expected_version=7)
    assert raised.value.current_version == 1


@pytest.mark.parametrize("bad", [0, -1, 2**31, "1", True, 1.0])
@pytest.mark.parametrize("method", WRITES)
async def test_a_bad_expected_version_is_refused_before_any_sql(
    tasks: TaskRepo, statements: Any, method: str, bad: Any
) -> None:
    task = await tasks.create("v_me", title="x")
    statements.clear()
    with pytest.raises(ValidationError) as raised:
        await WRITES[method](tasks, task.id, bad)
    assert raised.value.errors()[0]["loc"] == ("expected_version",)
    assert len(statements) == 0


# -------------------------------------------------------------- two editors, one task


@dataclass
class Editors:
    """What two editors of one task did: edits written, conflicts met, the task after."""

    written: int = 0
    conflicts: int = 0
    counter: int = 0
    version: int = 0


async def _edit_concurrently(
    store: TodoStore, user_id: str, task_id: int, *, edits: int, expected: bool
) -> Editors:
    """Two editors each read the task, wait until both have read it (the interleaving that
    loses updates), then write counter + 1; they stop once `edits` edits were written."""
    outcome = Editors()
    barrier = asyncio.Barrier(2)

    async def editor() -> None:
        while True:
            async with store.session(atomic=False) as session:
                task = await TaskRepo(session).get(user_id, task_id)
            await barrier.wait()  # both editors now hold the same version
            try:
                async with store.session(atomic=False) as session:
                    await TaskRepo(session).update(
                        user_id,
                        task_id,
                        description=str(int(task.description or "0") + 1),
                        expected_version=task.version if expected else None,
                    )
                outcome.written += 1
            except VersionConflict:
                outcome.conflicts += 1
            await barrier.wait()  # both see the same count, so both stop together
            if outcome.written >= edits:
                return

    await asyncio.wait_for(asyncio.gather(editor(), editor()), timeout=150)
    async with store.session() as session:
        task = await TaskRepo(session).get(user_id, task_id)
    outcome.counter = int(task.description or "0")
    outcome.version = task.version
    return outcome


@pytest.mark.pgbouncer
@pytest.mark.parametrize("expected", [True, False], ids=["expected_version", "last write wins"])
async def test_two_editors_through_pgbouncer(
    pooled_store: TodoStore, new_user_id: str, expected: bool
) -> None:
    async with pooled_store.session() as session:
        await UserRepo(session).upsert(new_user_id, email=f"{new_user_id}@x.io", name="E")
        task = await TaskRepo(session).create(new_user_id, title="shared", description="0")
    try:
        outcome = await _edit_concurrently(
            pooled_store, new_user_id, task.id, edits=1000, expected=expected
        )
    finally:
        async with pooled_store.session() as session:
            await UserRepo(session).delete(new_user_id)
    print(f"\n{'with' if expected else 'without'} expected_version: {outcome}")
    assert outcome.written == 1000
    assert outcome.version == 1 + outcome.written  # every write counted, none silently merged
    if expected:
        # Each round one editor wins and the other is told: no increment is lost.
        assert outcome.counter == 1000
        assert outcome.conflicts == 1000
    else:
        # Both writes of a round succeed from the same read: one increment of each pair lost.
        assert outcome.conflicts == 0
        assert outcome.counter == 500


# -------------------------------------------------------------------------- migration


async def test_migration_0003_versions_existing_tasks_and_downgrades(empty_database: str) -> None:
    settings = settings_for(empty_database)
    await migrations.upgrade(settings, "0002")
    conn = await asyncpg.connect(empty_database)
    try:
        await conn.execute("INSERT INTO users (id, email, name) VALUES ('m', 'm@x.org', 'M')")
        task_id = await conn.fetchval(
            "INSERT INTO tasks (user_id, title) VALUES ('m', 'before') RETURNING id"
        )
        await migrations.upgrade(settings, "0003")
        assert await conn.fetchval("SELECT version FROM tasks WHERE id = $1", task_id) == 1
        await conn.execute("UPDATE tasks SET title = 'after' WHERE id = $1", task_id)
        assert await conn.fetchval("SELECT version FROM tasks WHERE id = $1", task_id) == 2

        await migrations.downgrade(settings, "0002")
        leftovers = await conn.fetchval(
            """SELECT (SELECT count(*) FROM pg_attribute WHERE attrelid = 'tasks'::regclass
                         AND attname = 'version' AND NOT attisdropped)
                    + (SELECT count(*) FROM pg_proc
                       WHERE proname = 'todo_store_increment_version')
                    + (SELECT count(*) FROM pg_trigger WHERE tgname = 'update_tasks_version')"""
        )
        assert leftovers == 0
        assert await conn.fetchval("SELECT title FROM tasks WHERE id = $1", task_id) == "after"

        await migrations.upgrade(settings)
        assert await conn.fetchval("SELECT version FROM tasks WHERE id = $1", task_id) == 1
    finally:
        await conn.close()
