"""The seed's Step 7 and Validation list, automated against the migrated schema."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest
from conftest import command_env
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from todo_store import DatabaseError, InvalidData, UserNotFound, migrations
from todo_store.engine import create_engine
from todo_store.testing.plugin import settings_for

ROOT = Path(__file__).resolve().parent.parent


async def _rows(session: AsyncSession, sql: str, **params: object) -> list[tuple[object, ...]]:
    return [tuple(row) for row in await session.execute(text(sql), params)]


async def _add_user(session: AsyncSession, user_id: str) -> None:
    await session.execute(
        text("INSERT INTO users (id, email, name) VALUES (:id, :email, 'Test User')"),
        {"id": user_id, "email": f"{user_id}@example.com"},
    )


async def _add_task(session: AsyncSession, user_id: str, title: str) -> int:
    task_id = await session.scalar(
        text("INSERT INTO tasks (user_id, title) VALUES (:u, :t) RETURNING id"),
        {"u": user_id, "t": title},
    )
    assert isinstance(task_id, int)
    return task_id


async def test_tables_and_column_types(session: AsyncSession) -> None:
    columns = await _rows(
        session,
        """SELECT table_name, column_name, data_type, character_maximum_length, is_nullable
           FROM information_schema.columns
           WHERE table_schema = 'public' AND table_name IN ('users', 'tasks')
           ORDER BY table_name, ordinal_position""",
    )
    assert columns == [
        ("tasks", "id", "bigint", None, "NO"),
        ("tasks", "user_id", "text", None, "NO"),
        ("tasks", "title", "character varying", 200, "NO"),
        ("tasks", "description", "text", None, "YES"),
        ("tasks", "completed", "boolean", None, "NO"),
        ("tasks", "created_at", "timestamp with time zone", None, "NO"),
        ("tasks", "updated_at", "timestamp with time zone", None, "NO"),
        ("users", "id", "text", None, "NO"),
        ("users", "email", "character varying", 255, "NO"),
        ("users", "name", "character varying", 200, "NO"),
        ("users", "created_at", "timestamp with time zone", None, "NO"),
    ]
    identity = await _rows(
        session,
        """SELECT is_identity, identity_generation FROM information_schema.columns
           WHERE table_name = 'tasks' AND column_name = 'id'""",
    )
    assert identity == [("YES", "ALWAYS")]


async def test_owner_index_and_cascading_foreign_key(session: AsyncSession) -> None:
    index = await session.scalar(
        text("SELECT indexdef FROM pg_indexes WHERE indexname = 'idx_tasks_user_id'")
    )
    assert index is not None
    assert "(user_id, id)" in index
    delete_rule = await session.scalar(
        text(
            """SELECT delete_rule FROM information_schema.referential_constraints
               WHERE constraint_name = 'fk_tasks_user_id_users'"""
        )
    )
    assert delete_rule == "CASCADE"


async def test_updated_at_trigger_is_installed(session: AsyncSession) -> None:
    triggers = await _rows(
        session,
        """SELECT t.tgname, p.proname, t.tgtype & 2 = 2 AS before, t.tgtype & 1 = 1 AS per_row,
                  t.tgtype & 16 = 16 AS on_update
           FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid
           WHERE t.tgrelid = 'tasks'::regclass AND NOT t.tgisinternal""",
    )
    assert triggers == [("update_tasks_updated_at", "update_updated_at_column", True, True, True)]


async def test_ids_are_sequential_and_never_reused(session: AsyncSession) -> None:
    await _add_user(session, "test_user_1")
    first = await _add_task(session, "test_user_1", "Task 1")
    second = await _add_task(session, "test_user_1", "Task 2")
    third = await _add_task(session, "test_user_1", "Task 3")
    assert [second, third] == [first + 1, first + 2]

    await session.execute(text("DELETE FROM tasks WHERE id = :id"), {"id": second})
    fourth = await _add_task(session, "test_user_1", "Task 4")

    remaining = await _rows(
        session, "SELECT id FROM tasks WHERE user_id = 'test_user_1' ORDER BY id"
    )
    assert [row[0] for row in remaining] == [first, third, fourth]
    assert fourth == third + 1  # the deleted id is not handed out again


async def test_caller_cannot_supply_a_task_id(session: AsyncSession) -> None:
    await _add_user(session, "test_user_1")
    with pytest.raises(DatabaseError) as raised:
        async with session.begin_nested():
            await session.execute(
                text("INSERT INTO tasks (id, user_id, title) VALUES (1, 'test_user_1', 'x')")
            )
    assert raised.value.sqlstate == "428C9"  # generated always


async def test_deleting_a_user_cascades_to_its_tasks(session: AsyncSession) -> None:
    await _add_user(session, "test_user_1")
    await _add_user(session, "test_user_3")
    for title in ("Task 1", "Task 2", "Task 3"):
        await _add_task(session, "test_user_1", title)
    await _add_task(session, "test_user_3", "kept")

    await session.execute(text("DELETE FROM users WHERE id = 'test_user_1'"))

    counts = await _rows(session, "SELECT user_id, count(*) FROM tasks GROUP BY user_id")
    assert counts == [("test_user_3", 1)]


async def test_update_moves_updated_at_and_keeps_created_at(session: AsyncSession) -> None:
    await _add_user(session, "test_user_2")
    # Start from timestamps in the past, so the trigger's now() is visibly different without
    # waiting for the clock (the whole test is one transaction, and now() is its start).
    task_id = await session.scalar(
        text(
            """INSERT INTO tasks (user_id, title, created_at, updated_at)
               VALUES ('test_user_2', 'Test Task', '2001-01-01Z', '2001-01-01Z') RETURNING id"""
        )
    )
    await session.execute(
        text("UPDATE tasks SET title = 'Updated Task' WHERE id = :id"), {"id": task_id}
    )
    created, updated, now = (
        await session.execute(
            text("SELECT created_at, updated_at, now() FROM tasks WHERE id = :id"),
            {"id": task_id},
        )
    ).one()
    assert created.year == 2001
    assert updated == now


async def test_completed_defaults_to_false(session: AsyncSession) -> None:
    await _add_user(session, "test_user_1")
    task_id = await _add_task(session, "test_user_1", "Task 1")
    completed = await session.scalar(
        text("SELECT completed FROM tasks WHERE id = :id"), {"id": task_id}
    )
    assert completed is False


@pytest.mark.parametrize("title", ["", "   ", "x" * 201])
async def test_database_rejects_bad_titles(session: AsyncSession, title: str) -> None:
    await _add_user(session, "test_user_1")
    with pytest.raises(InvalidData):
        async with session.begin_nested():
            await _add_task(session, "test_user_1", title)


async def test_database_rejects_task_of_unknown_user(session: AsyncSession) -> None:
    with pytest.raises(UserNotFound):
        async with session.begin_nested():
            await _add_task(session, "nobody", "Task 1")


async def test_database_rejects_upper_case_email(session: AsyncSession) -> None:
    with pytest.raises(InvalidData) as raised:
        async with session.begin_nested():
            await session.execute(
                text("INSERT INTO users (id, email, name) VALUES ('u', 'Ada@X.com', 'Ada')")
            )
    assert raised.value.constraint == "ck_users_email_lowercase"


async def test_models_match_the_migrations(todo_store_settings: object) -> None:
    await migrations.check(todo_store_settings)  # type: ignore[arg-type]


async def _schema_objects(url: str) -> tuple[set[str], set[str]]:
    engine = create_engine(settings_for(url))
    try:
        async with engine.connect() as connection:
            tables = await connection.scalars(
                text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
            )
            table_names = set(tables)
            functions = await connection.scalars(
                text(
                    """SELECT proname FROM pg_proc
                       WHERE pronamespace = 'public'::regnamespace"""
                )
            )
            return table_names, set(functions)
    finally:
        await engine.dispose()


async def test_migration_round_trip(empty_database: str) -> None:
    settings = settings_for(empty_database)
    await migrations.upgrade(settings)
    assert await _schema_objects(empty_database) == (
        {"users", "tasks", "alembic_version"},
        {"update_updated_at_column"},
    )
    await migrations.downgrade(settings, "base")
    assert await _schema_objects(empty_database) == ({"alembic_version"}, set())
    await migrations.upgrade(settings)
    assert await migrations.current_revision(settings) == migrations.head_revision()
    await migrations.check(settings)


def _alembic(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = command_env(url)
    return subprocess.run(
        [sys.executable, "-m", "alembic", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def test_alembic_command_line_round_trip(empty_database: str) -> None:
    logs = []
    for args in (["upgrade", "head"], ["downgrade", "base"], ["upgrade", "head"], ["check"]):
        result = _alembic(empty_database, *args)
        assert result.returncode == 0, (args, result.stderr)
        logs.append(result.stderr)
    assert "migrations use postgresql://postgres" in logs[0]
    assert "(DATABASE_URL)" in logs[0]
    assert await migrations.current_revision(settings_for(empty_database)) == "0001"


async def test_migration_ddl_gives_up_behind_a_long_transaction(empty_database: str) -> None:
    settings = settings_for(empty_database).model_copy(update={"migration_lock_timeout": 0.2})
    await migrations.upgrade(settings)
    reader = await asyncpg.connect(empty_database)
    try:
        async with reader.transaction():
            await reader.fetch("SELECT * FROM tasks")  # holds ACCESS SHARE until it ends
            with pytest.raises(DatabaseError) as raised:
                await migrations.downgrade(settings, "base")  # DROP TABLE needs ACCESS EXCLUSIVE
    finally:
        await reader.close()
    assert raised.value.sqlstate == "55P03"  # lock_not_available: lock_timeout fired
    assert await migrations.current_revision(settings) == "0001"  # nothing half-done
