"""The schema the migrations build, checked against a live database; and the migrations
themselves: round trips, lock timeout, offline SQL, the trigger function's name."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from conftest import command_env
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from todo_store import DatabaseError, InvalidData, Settings, UserNotFound, migrations
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
        ("tasks", "version", "integer", None, "NO"),
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
           WHERE t.tgrelid = 'tasks'::regclass AND NOT t.tgisinternal ORDER BY t.tgname""",
    )
    assert triggers == [
        ("update_tasks_updated_at", "todo_store_set_updated_at", True, True, True),
        ("update_tasks_version", "todo_store_increment_version", True, True, True),
    ]


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

    counts = await _rows(
        session,
        "SELECT user_id, count(*) FROM tasks"
        " WHERE user_id IN ('test_user_1', 'test_user_3') GROUP BY user_id",
    )
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
                # An extension's functions (pg_trgm's, where revision 0005 installs it) are
                # the extension's, not the schema's own.
                text(
                    """SELECT proname FROM pg_proc p
                       WHERE pronamespace = 'public'::regnamespace
                         AND NOT EXISTS (SELECT 1 FROM pg_depend d
                                         WHERE d.classid = 'pg_proc'::regclass
                                           AND d.objid = p.oid AND d.deptype = 'e')"""
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
        {"todo_store_set_updated_at", "todo_store_increment_version"},
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
    current = await migrations.current_revision(settings_for(empty_database))
    assert current == migrations.head_revision()


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
    # nothing half-done
    assert await migrations.current_revision(settings) == migrations.head_revision()


# ----------------------------------------------------------------- lock timeout, offline SQL


def _record_statements(engine: AsyncEngine) -> list[str]:
    sent: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        sent.append(statement)

    event.listen(engine.sync_engine, "before_cursor_execute", record)
    return sent


@pytest.mark.parametrize(
    ("seconds", "sent"), [(0.0004, "1ms"), (0.001, "1ms"), (0.1, "100ms"), (2.5, "2500ms")]
)
async def test_lock_timeout_is_never_zero(empty_database: str, seconds: float, sent: str) -> None:
    settings = settings_for(empty_database).model_copy(update={"migration_lock_timeout": seconds})
    engine = migrations.create_migration_engine(settings)
    statements = _record_statements(engine)
    try:
        await migrations.upgrade(settings, on=engine)
    finally:
        await engine.dispose()
    # 0 would mean "wait forever": anything under a millisecond is rounded up to one.
    lock = f"SELECT pg_advisory_xact_lock({migrations.MIGRATION_LOCK_KEY})"
    first = statements.index(lock)
    assert statements[first : first + 2] == [lock, f"SET LOCAL lock_timeout = '{sent}'"]
    assert statements[first : first + 2] == migrations.lock_statements(settings)
    # Before the lock only reads (which revision the database is at); DDL comes after.
    assert all(s.lstrip().upper().startswith("SELECT") for s in statements[:first])
    assert any(s.lstrip().startswith("CREATE TABLE") for s in statements[first:])


OFFLINE_URLS = {
    "postgres://": "postgres://ada:pw@db.example.com/app",
    "postgresql://": "postgresql://ada:pw@db.example.com:6543/app",
    "postgresql+asyncpg://": "postgresql+asyncpg://ada:pw@db.example.com/app",
    "Neon console string": (
        "postgresql://ada:pw@ep-cool-darkness-123456-pooler.us-east-2.aws.neon.tech/neondb"
        "?sslmode=require&channel_binding=require"
    ),
}


@pytest.mark.parametrize("form", list(OFFLINE_URLS))
def test_offline_sql_works_for_every_url_form(form: str) -> None:
    env = command_env(OFFLINE_URLS[form])
    env["MIGRATION_LOCK_TIMEOUT"] = "0.0004"
    result = subprocess.run(
        [sys.executable, "-m", "alembic", "upgrade", "head", "--sql"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    statements = [s.strip() for s in result.stdout.split(";\n") if s.strip()]
    settings = Settings(database_url=OFFLINE_URLS[form], migration_lock_timeout=0.0004)
    # The same lock and lock_timeout an online run sends, first thing in the transaction.
    assert statements[:3] == ["BEGIN", *migrations.lock_statements(settings)]
    assert "SET LOCAL lock_timeout = '1ms'" in statements
    assert any(s.startswith("CREATE TABLE tasks") for s in statements)
    assert statements[-1] == "COMMIT"
    assert "pw@" not in result.stdout + result.stderr


# ------------------------------------------------------------------ trigger function name

OTHER_APP_FUNCTION = """
    CREATE FUNCTION update_updated_at_column() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN NEW.modified = now(); RETURN NEW; END; $$
"""
OTHER_APP_TABLE = """
    CREATE TABLE notes (id int PRIMARY KEY, modified timestamptz);
    CREATE TRIGGER notes_modified BEFORE UPDATE ON notes
        FOR EACH ROW EXECUTE FUNCTION update_updated_at_column();
"""


async def _trigger_functions(conn: asyncpg.Connection) -> dict[str, str]:
    rows = await conn.fetch(
        "SELECT tgname, tgfoid::regprocedure::text AS f FROM pg_trigger WHERE NOT tgisinternal"
    )
    return {row["tgname"]: row["f"] for row in rows}


async def _function_source(conn: asyncpg.Connection, name: str) -> str | None:
    source: str | None = await conn.fetchval("SELECT prosrc FROM pg_proc WHERE proname = $1", name)
    return source


async def _updated_at_moves(conn: asyncpg.Connection) -> bool:
    async with conn.transaction():
        await conn.execute("INSERT INTO users (id, email, name) VALUES ('t', 't@x.org', 'T')")
        task_id = await conn.fetchval(
            """INSERT INTO tasks (user_id, title, updated_at)
               VALUES ('t', 'x', '2001-01-01Z') RETURNING id"""
        )
        await conn.execute("UPDATE tasks SET title = 'y' WHERE id = $1", task_id)
        moved: bool = await conn.fetchval(
            "SELECT updated_at = now() FROM tasks WHERE id = $1", task_id
        )
        await conn.execute("DELETE FROM users WHERE id = 't'")
    return moved


async def test_another_applications_trigger_function_is_left_alone(empty_database: str) -> None:
    conn = await asyncpg.connect(empty_database)
    try:
        await conn.execute(OTHER_APP_FUNCTION)
        await conn.execute(OTHER_APP_TABLE)
        theirs = await _function_source(conn, "update_updated_at_column")
        settings = settings_for(empty_database)

        await migrations.upgrade(settings)
        assert await _trigger_functions(conn) == {
            "notes_modified": "update_updated_at_column()",
            "update_tasks_updated_at": "todo_store_set_updated_at()",
            "update_tasks_version": "todo_store_increment_version()",
        }
        assert await _function_source(conn, "update_updated_at_column") == theirs
        assert await _updated_at_moves(conn)

        await migrations.downgrade(settings, "base")
        assert await _trigger_functions(conn) == {"notes_modified": "update_updated_at_column()"}
        assert await _function_source(conn, "update_updated_at_column") == theirs
    finally:
        await conn.close()


LEGACY_0001_TRIGGER = """
    DROP TRIGGER update_tasks_updated_at ON tasks;
    DROP FUNCTION todo_store_set_updated_at();
    CREATE FUNCTION update_updated_at_column() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN NEW.updated_at = now(); RETURN NEW; END; $$;
    CREATE TRIGGER update_tasks_updated_at BEFORE UPDATE ON tasks
        FOR EACH ROW EXECUTE FUNCTION update_updated_at_column();
"""


@pytest.mark.parametrize("other_app", [False, True], ids=["alone", "shared with another app"])
async def test_a_database_at_the_earlier_0001_moves_to_the_own_function(
    empty_database: str, other_app: bool
) -> None:
    settings = settings_for(empty_database)
    await migrations.upgrade(settings, "0001")
    conn = await asyncpg.connect(empty_database)
    try:
        # What 0001 created before the trigger function got the package's own name.
        await conn.execute(LEGACY_0001_TRIGGER)
        if other_app:
            await conn.execute(OTHER_APP_TABLE)

        applied = await migrations.upgrade(settings)
        assert applied[0].revision == "0002"
        functions = await _trigger_functions(conn)
        assert functions["update_tasks_updated_at"] == "todo_store_set_updated_at()"
        assert await _updated_at_moves(conn)
        # The old function goes unless another application's trigger still uses it.
        old = await _function_source(conn, "update_updated_at_column")
        assert (old is not None) is other_app

        await migrations.downgrade(settings, "base")
        await migrations.upgrade(settings)
        assert (await _trigger_functions(conn))["update_tasks_updated_at"] == (
            "todo_store_set_updated_at()"
        )
        if not other_app:  # check would report the other application's table
            await migrations.check(settings)
    finally:
        await conn.close()
