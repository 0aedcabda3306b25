"""Schema checks: what the migrations promise, checked on a live database.

Tables and column types, the owner index, the `updated_at` trigger, ids never reused, cascade
delete, the `completed` default and task versions: each is checked by reading the catalogs or
by writing.

Each `check_*` coroutine runs inside the caller's transaction, returns one line saying what it
saw, and raises `SchemaCheckFailed` when the schema does not behave as the migrations promise.
Guarantees:

- a check only reads the catalogs or writes rows of throwaway users (`doctor_<random hex>`) in
  the caller's transaction; `run_schema_checks` wraps each check in a savepoint it always rolls
  back, and the caller rolls back the rest, so running them on production leaves no row behind
  (identity values are consumed, as any rolled-back insert consumes them);
- no check sleeps: the `updated_at` check inserts timestamps in the past instead;
- `run_schema_checks` never raises for a failing check: a `SchemaCheckFailed` or a `TodoStoreError`
  (e.g. `SchemaNotReady` when the tables are missing) becomes a failed `CheckResult`.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from todo_store.binding import USER_SETTING
from todo_store.errors import (
    UPGRADE_COMMAND,
    DatabaseError,
    NotFoundError,
    SchemaNotReady,
    TodoStoreError,
)

_PAST = "2001-01-01T00:00:00Z"
UPGRADE_HINT = f"run `{UPGRADE_COMMAND}`"
_RECREATE_HINT = "the schema was altered after migrating: recreate it as the migrations do"

# (table, column) -> format_type() of what migration 0001 creates.
EXPECTED_COLUMNS = {
    ("users", "id"): "text",
    ("users", "email"): "character varying(255)",
    ("users", "name"): "character varying(200)",
    ("users", "created_at"): "timestamp with time zone",
    ("tasks", "id"): "bigint",
    ("tasks", "user_id"): "text",
    ("tasks", "title"): "character varying(200)",
    ("tasks", "description"): "text",
    ("tasks", "completed"): "boolean",
    ("tasks", "created_at"): "timestamp with time zone",
    ("tasks", "updated_at"): "timestamp with time zone",
    ("tasks", "version"): "integer",
}


class SchemaCheckFailed(Exception):
    """The schema does not behave as the migrations promise; `hint` says what to do."""

    def __init__(self, reason: str, hint: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.hint = hint


@dataclass(frozen=True)
class CheckResult:
    """One checked behaviour: `detail` is what was seen, or why it failed."""

    name: str
    ok: bool
    detail: str
    hint: str = ""


async def _new_user(session: AsyncSession) -> str:
    user_id = f"doctor_{secrets.token_hex(6)}"
    # Bound to the throwaway user (until the check's savepoint is rolled back), so the checks
    # work under row-level security for the runtime role as for the owner.
    await session.execute(
        text("SELECT set_config(:setting, :id, true)"), {"setting": USER_SETTING, "id": user_id}
    )
    await session.execute(
        text("INSERT INTO users (id, email, name) VALUES (:id, :email, 'schema check')"),
        {"id": user_id, "email": f"{user_id}@example.invalid"},
    )
    return user_id


async def _new_task(session: AsyncSession, user_id: str, title: str = "schema check") -> int:
    task_id: int = await session.scalar(
        text("INSERT INTO tasks (user_id, title) VALUES (:u, :t) RETURNING id"),
        {"u": user_id, "t": title},
    )
    return task_id


async def check_tables(session: AsyncSession) -> str:
    """`users` and `tasks` exist with the migration's column types; `tasks.id` is identity."""
    # attidentity / tgenabled are of type "char", which asyncpg returns as bytes: cast to text.
    rows = await session.execute(
        text(
            """SELECT c.relname, a.attname, format_type(a.atttypid, a.atttypmod),
                      a.attidentity::text
               FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
               WHERE c.relnamespace = current_schema()::regnamespace AND c.relkind = 'r'
                 AND c.relname IN ('users', 'tasks') AND a.attnum > 0 AND NOT a.attisdropped"""
        )
    )
    found = {(table, column): (type_, identity) for table, column, type_, identity in rows}
    missing_tables = sorted({t for t, _ in EXPECTED_COLUMNS} - {t for t, _ in found})
    if missing_tables:
        raise SchemaCheckFailed(f"table(s) missing: {', '.join(missing_tables)}", UPGRADE_HINT)
    wrong = []
    for (table, column), expected in EXPECTED_COLUMNS.items():
        actual = found.get((table, column), ("missing", ""))[0]
        if actual != expected:
            wrong.append(f"{table}.{column} is {actual} (expected {expected})")
    if found.get(("tasks", "id"), ("", ""))[1] != "a":
        wrong.append("tasks.id is not GENERATED ALWAYS AS IDENTITY")
    if wrong:
        raise SchemaCheckFailed("; ".join(wrong), _RECREATE_HINT)
    return "users, tasks; tasks.id bigint GENERATED ALWAYS AS IDENTITY; timestamps timestamptz"


async def _require_tasks_table(session: AsyncSession) -> None:
    # Without the table, "index/trigger missing" would misdirect: the schema is simply behind.
    if await session.scalar(text("SELECT to_regclass('tasks')")) is None:
        raise SchemaNotReady


async def check_index(session: AsyncSession) -> str:
    """Index `idx_tasks_user_id` on `tasks` exists and leads on `user_id`."""
    await _require_tasks_table(session)
    definition = await session.scalar(
        text(
            """SELECT indexdef FROM pg_indexes WHERE schemaname = current_schema()
               AND tablename = 'tasks' AND indexname = 'idx_tasks_user_id'"""
        )
    )
    if definition is None:
        raise SchemaCheckFailed("index idx_tasks_user_id on tasks is missing", _RECREATE_HINT)
    columns = definition[definition.index("(") :]
    if not columns.startswith("(user_id"):
        raise SchemaCheckFailed(f"idx_tasks_user_id is on {columns}, not leading on user_id")
    return f"tasks {columns}"


async def check_trigger(session: AsyncSession) -> str:
    """Trigger `update_tasks_updated_at` exists, is enabled, BEFORE UPDATE FOR EACH ROW."""
    await _require_tasks_table(session)
    row = (
        await session.execute(
            text(
                """SELECT p.proname, t.tgtype, t.tgenabled::text FROM pg_trigger t
                   JOIN pg_proc p ON p.oid = t.tgfoid
                   WHERE t.tgrelid = to_regclass('tasks') AND NOT t.tgisinternal
                     AND t.tgname = 'update_tasks_updated_at'"""
            )
        )
    ).first()
    if row is None:
        raise SchemaCheckFailed(
            "trigger update_tasks_updated_at on tasks is missing", _RECREATE_HINT
        )
    function, tgtype, enabled = row
    # pg_trigger.tgtype bits: 1 = FOR EACH ROW, 2 = BEFORE, 16 = UPDATE.
    if tgtype & 19 != 19 or enabled == "D":
        raise SchemaCheckFailed(
            "update_tasks_updated_at is not an enabled BEFORE UPDATE FOR EACH ROW trigger",
            _RECREATE_HINT,
        )
    return f"BEFORE UPDATE FOR EACH ROW -> {function}()"


async def check_ids_never_reused(session: AsyncSession) -> str:
    """Task ids increase with each insert, and a deleted id is not handed out again."""
    user_id = await _new_user(session)
    first, second, third = [await _new_task(session, user_id) for _ in range(3)]
    await session.execute(text("DELETE FROM tasks WHERE id = :id"), {"id": second})
    fourth = await _new_task(session, user_id)
    # Other sessions may insert concurrently (gaps are fine); only order and reuse matter.
    if not first < second < third < fourth:
        raise SchemaCheckFailed(f"ids {first}, {second}, {third}, {fourth} are not increasing")
    return f"ids {first}, {third}, {fourth} after deleting {second}: never reused"


async def check_cascade(session: AsyncSession) -> str:
    """Deleting a user deletes its tasks (foreign key ON DELETE CASCADE)."""
    user_id = await _new_user(session)
    for _ in range(2):
        await _new_task(session, user_id)
    count = text("SELECT count(*) FROM tasks WHERE user_id = :u")
    before = await session.scalar(count, {"u": user_id})
    try:
        await session.execute(text("DELETE FROM users WHERE id = :u"), {"u": user_id})
    except (NotFoundError, DatabaseError) as error:  # 23503 maps to UserNotFound by FK name
        raise SchemaCheckFailed(
            f"deleting a user with tasks was refused ({error})", _RECREATE_HINT
        ) from None
    after = await session.scalar(count, {"u": user_id})
    if after != 0:
        raise SchemaCheckFailed(f"{after} task(s) left after deleting their user", _RECREATE_HINT)
    return f"deleting a user removed its tasks ({before} -> {after})"


async def check_updated_at_trigger(session: AsyncSession) -> str:
    """An UPDATE sets `updated_at` to now() and leaves `created_at` alone."""
    user_id = await _new_user(session)
    # Timestamps in the past make the trigger's now() visibly different without sleeping.
    task_id = await session.scalar(
        text(
            """INSERT INTO tasks (user_id, title, created_at, updated_at)
               VALUES (:u, 'schema check', :past, :past) RETURNING id"""
        ),
        {"u": user_id, "past": datetime.fromisoformat(_PAST)},
    )
    await session.execute(
        text("UPDATE tasks SET title = 'updated' WHERE id = :id"), {"id": task_id}
    )
    created, updated, now = (
        await session.execute(
            text("SELECT created_at, updated_at, now() FROM tasks WHERE id = :id"), {"id": task_id}
        )
    ).one()
    if updated != now:
        raise SchemaCheckFailed(
            f"updated_at stayed {updated:%Y-%m-%d} after an UPDATE (trigger missing or disabled)",
            _RECREATE_HINT,
        )
    if created.year != 2001:
        raise SchemaCheckFailed(f"an UPDATE changed created_at to {created:%Y-%m-%d}")
    return "UPDATE moved updated_at from 2001-01-01 to now(), kept created_at"


async def check_completed_default(session: AsyncSession) -> str:
    """A task inserted without `completed` is not completed (server default false)."""
    user_id = await _new_user(session)
    task_id = await _new_task(session, user_id)
    completed = await session.scalar(
        text("SELECT completed FROM tasks WHERE id = :id"), {"id": task_id}
    )
    if completed is not False:
        raise SchemaCheckFailed(f"a new task has completed = {completed}", _RECREATE_HINT)
    return "INSERT without completed -> false"


async def check_version_increments(session: AsyncSession) -> str:
    """A new task is at version 1; every UPDATE, even one that sets `version`, adds one."""
    user_id = await _new_user(session)
    task_id = await _new_task(session, user_id)
    version = text("SELECT version FROM tasks WHERE id = :id")
    first = await session.scalar(version, {"id": task_id})
    await session.execute(text("UPDATE tasks SET completed = true WHERE id = :id"), {"id": task_id})
    # A writer that sets the version itself cannot move it anywhere but forward by one.
    await session.execute(text("UPDATE tasks SET version = 1 WHERE id = :id"), {"id": task_id})
    third = await session.scalar(version, {"id": task_id})
    if (first, third) != (1, 3):
        raise SchemaCheckFailed(
            f"versions {first} -> {third} after two UPDATEs, expected 1 -> 3 "
            "(trigger update_tasks_version missing or disabled)",
            _RECREATE_HINT,
        )
    return "INSERT -> version 1; each UPDATE adds 1 (1 -> 3 after two)"


SchemaCheck = Callable[[AsyncSession], Awaitable[str]]

SCHEMA_CHECKS: list[tuple[str, SchemaCheck]] = [
    ("tables and types", check_tables),
    ("index idx_tasks_user_id", check_index),
    ("trigger update_tasks_updated_at", check_trigger),
    ("ids never reused", check_ids_never_reused),
    ("cascade delete", check_cascade),
    ("updated_at trigger", check_updated_at_trigger),
    ("completed default", check_completed_default),
    ("version increments", check_version_increments),
]


async def run_schema_checks(session: AsyncSession) -> list[CheckResult]:
    """Run every schema check, each in a savepoint rolled back afterwards, in order."""
    results = []
    for name, check in SCHEMA_CHECKS:
        savepoint = await session.begin_nested()
        try:
            detail = await check(session)
        except SchemaCheckFailed as failed:
            results.append(CheckResult(name, False, failed.reason, failed.hint))
        except TodoStoreError as error:  # SchemaNotReady's message carries its own hint
            results.append(CheckResult(name, False, str(error)))
        else:
            results.append(CheckResult(name, True, detail))
        finally:
            await savepoint.rollback()
    return results
