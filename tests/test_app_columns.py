"""An application's own column on `tasks` (the README's `priority`), through the repositories.

Each test builds the README's application directory (`alembic.ini`, `app_models.py`, a
revision adding `tasks.priority`) and runs the application in a process of its own, so the
column it adds to the package's table never reaches this suite's process. The application is
run in both import orders: its models first, and the package first and already used before
its models are imported.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import run_command
from test_app_revisions import make_app, todo_store

EXERCISE = '''\
"""Create, update, list and refuse values of the application's column `priority`."""

import asyncio
import json
import sys

from pydantic import ValidationError

ORDER = sys.argv[1]
if ORDER == "models first":
    import app_models  # noqa: F401

from sqlalchemy import event

from todo_store import TaskRecord, TaskRepo, TodoStore, UserRepo


class Rollback(Exception):
    pass


async def main():
    seen = {}
    store = TodoStore.from_env()
    try:
        async with store.session() as session:
            tasks = TaskRepo(session)
            await UserRepo(session).upsert("u_app", email="app@example.com", name="App")
            if ORDER == "package first":
                before = await tasks.create("u_app", title="before the models")
                seen["fields before"] = list(before._fields)
                import app_models  # noqa: F401

            sent = []
            event.listen(
                store.engine.sync_engine,
                "before_cursor_execute",
                lambda *args: sent.append(args[2]),
            )
            task = await tasks.create("u_app", title="Buy milk", priority=3)
            seen["created"] = task.priority
            seen["is a TaskRecord"] = isinstance(task, TaskRecord)
            seen["repr"] = repr(task)
            seen["default"] = (await tasks.create("u_app", title="plain")).priority
            updated = await tasks.update("u_app", task.id, priority=5, title="Buy oat milk")
            seen["updated"] = [updated.priority, updated.title, updated.version]
            seen["statements"] = len(sent)  # create, create, update: one each
            seen["listed"] = [t.priority for t in await tasks.list_for("u_app")]
            seen["read"] = (await tasks.get("u_app", task.id)).priority
            errors = {}
            for label, values in {
                "text": {"priority": "high"},
                "too big": {"priority": 40000},
                "null": {"priority": None},
                "unknown": {"priorty": 1},
            }.items():
                try:
                    await tasks.create("u_app", title="x", **values)
                except ValidationError as error:
                    errors[label] = [list(e["loc"]) for e in error.errors()]
            seen["errors"] = errors
            seen["statements after refusals"] = len(sent) - 3 - 2  # list_for and get
            user = await UserRepo(session).upsert(
                "u_app", email="app@example.com", name="App", locale="fr-CA"
            )
            seen["locale"] = [user.locale, (await UserRepo(session).get("u_app")).locale]
            try:
                await UserRepo(session).upsert(
                    "u_app", email="app@example.com", name="App", locale="x" * 11
                )
            except ValidationError as error:
                seen["locale refused"] = [list(e["loc"]) for e in error.errors()]
            try:
                task.priority = 1
            except AttributeError as error:
                seen["assign"] = str(error)
            raise Rollback
    except Rollback:
        pass
    finally:
        await store.dispose()
    print(json.dumps(seen))


asyncio.run(main())
'''


LOCALE_MODELS = """
Table("users", Base.metadata, Column("locale", String(10), nullable=True), extend_existing=True)
"""

LOCALE_REVISION = '''\
"""Users get a locale.

Revision ID: 1002
Revises: 1001
"""

import sqlalchemy as sa
from alembic import op

revision = "1002"
down_revision = "1001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("users", sa.Column("locale", sa.String(length=10), nullable=True))


def downgrade() -> None:
    op.drop_column("users", "locale")
'''


def with_locale(app: Path) -> None:
    """The application also adds `users.locale`, with a revision of its own."""
    models = app / "app_models.py"
    source = models.read_text().replace("SmallInteger, Table", "SmallInteger, String, Table")
    models.write_text(
        source.replace(
            "metadata = Base.metadata", LOCALE_MODELS.strip() + "\nmetadata = Base.metadata"
        )
    )
    (app / "migrations" / "1002_user_locale.py").write_text(LOCALE_REVISION)


@pytest.mark.parametrize("order", ["models first", "package first"])
async def test_the_applications_column_in_either_import_order(
    empty_database: str, tmp_path: Path, order: str
) -> None:
    app = tmp_path / "app"
    make_app(app)
    with_locale(app)
    (app / "exercise.py").write_text(EXERCISE)
    migrated = await todo_store(app, "migrate", database_url=empty_database)
    assert migrated.returncode == 0, migrated.stdout + migrated.stderr

    run = await run_command(
        sys.executable, "exercise.py", order, cwd=app, database_url=empty_database
    )
    assert run.returncode == 0, run.stdout + run.stderr
    seen = json.loads(run.lines[-1])
    if order == "package first":
        # Built before the models were imported; the next call saw the new column.
        assert "priority" not in seen.pop("fields before")
        assert seen.pop("listed") == [0, 5, 0]
    else:
        assert seen.pop("listed") == [0, 5]
    assert seen.pop("repr").startswith("TaskRecord(id=")
    assert seen == {
        "created": 3,
        "is a TaskRecord": True,
        "default": 0,
        "updated": [5, "Buy oat milk", 2],
        "statements": 3,
        "statements after refusals": 0,
        "locale": ["fr-CA", "fr-CA"],
        "locale refused": [["locale"]],
        "read": 5,
        "errors": {
            "text": [["priority"]],
            "too big": [["priority"]],
            "null": [["priority"]],
            "unknown": [["priorty"]],
        },
        "assign": (
            "TaskRecord is read-only (tried to set 'priority'): "
            "change a task with TaskRepo.update(), toggle() or set_completed()"
        ),
    }


SERVICE = """\
from todo_store import TaskRepo, TodoStore, UserRepo


async def sign_up(store: TodoStore, user_id: str, email: str, name: str, first_task: str) -> int:
    async with store.session() as session:
        await UserRepo(session).upsert(user_id, email=email, name=name)
        task = await TaskRepo(session).create(user_id, title=first_task, priority=2)
    return task.id
"""

SERVICE_TESTS = """\
import pytest
from pydantic import ValidationError
from todo_store import TaskRepo

from service import sign_up


@pytest.mark.asyncio
@pytest.mark.parametrize("attempt", [1, 2])
async def test_the_first_task_has_a_priority(todo_store, attempt):
    task_id = await sign_up(todo_store, "u_ada", "ada@example.com", "Ada", "Buy milk")
    async with todo_store.session() as session:
        tasks = await TaskRepo(session).list_for("u_ada")
    assert [(task.id, task.priority) for task in tasks] == [(task_id, 2)]


@pytest.mark.asyncio
async def test_a_bad_priority_is_refused(todo_store):
    await sign_up(todo_store, "u_bob", "bob@example.com", "Bob", "first")
    async with todo_store.session() as session:
        [task] = await TaskRepo(session).list_for("u_bob")
        with pytest.raises(ValidationError, match="priority"):
            await TaskRepo(session).update("u_bob", task.id, priority="urgent")
        raised = await TaskRepo(session).update("u_bob", task.id, priority=9)
    assert raised.priority == 9
"""


async def test_a_downstream_suite_with_the_pytest_plugin(tmp_path: Path) -> None:
    app = tmp_path / "app"
    make_app(app)
    (app / "service.py").write_text(SERVICE)
    (app / "test_service.py").write_text(SERVICE_TESTS)
    run = await run_command(
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        cwd=app,
        database_url=None,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "3 passed" in run.stdout
