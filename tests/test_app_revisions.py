"""An application's own revisions on top of the package's, through the installed command.

Each test builds an application directory the way the README tells a user to: an
`alembic.ini` naming `todo_store:_alembic` and the application's own `migrations/` folder, a
revision adding `priority` to tasks, and models naming it (`target_metadata`). The
`todo-store` console script then runs with that directory as its working directory, so
nothing of this repository (no alembic.ini, no sys.path entry) helps it.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import asyncpg
import pytest
from alembic.script import ScriptDirectory
from conftest import CommandRun, granted_role, run_command

from todo_store import migrations
from todo_store.doctor import diagnose
from todo_store.schema_checks import SCHEMA_CHECKS
from todo_store.testing.plugin import settings_for
from todo_store.testing.postgres import ProvisionedServer

TODO_STORE = Path(sys.executable).with_name("todo-store")
PACKAGE_SCRIPTS = ScriptDirectory(str(migrations.package_script_location()))
APP_REVISION = "1001"
COMMANDS = ("migrate", "doctor", "demo")
DOCTOR = [
    "connect",
    "server",
    "pooler",
    "tls",
    "round trip",
    "statement cache",
    "row-level security",
    "revision",
    "drift",
    *(name for name, _ in SCHEMA_CHECKS),
]

ALEMBIC_INI = """\
[alembic]
# todo-store's migration environment and revisions, wherever the package is installed
script_location = todo_store:_alembic
# todo-store's revisions, then this application's own
version_locations = todo_store:_alembic/versions %(here)s/migrations
path_separator = space
prepend_sys_path = %(here)s
file_template = %%(rev)s_%%(slug)s
{target_metadata}
"""

APP_MODELS = '''\
"""The application's models: todo-store's, and a priority on tasks."""

from sqlalchemy import Column, SmallInteger, Table, text

from todo_store import Base

Table(
    "tasks",
    Base.metadata,
    Column("priority", SmallInteger, nullable=False, server_default=text("0")),
    extend_existing=True,
)
metadata = Base.metadata
'''

APP_REVISION_FILE = '''\
"""Tasks get a priority (0: none).

Revision ID: {revision}
Revises: {down_revision}
"""

import sqlalchemy as sa
from alembic import op

revision = "{revision}"
down_revision = "{down_revision}"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "tasks",
        sa.Column("priority", sa.SmallInteger(), server_default=sa.text("0"), nullable=False),
    )


def downgrade() -> None:
    op.drop_column("tasks", "priority")
'''


async def todo_store(
    cwd: Path, *args: str, database_url: str | None, **extra_env: str
) -> CommandRun:
    """The installed `todo-store` command, in `cwd`, with DATABASE_URL (and `extra_env`)."""
    return await run_command(TODO_STORE, *args, cwd=cwd, database_url=database_url, **extra_env)


def make_app(directory: Path, *, with_models: bool = True) -> Path:
    """The application directory; returns its alembic.ini."""
    (directory / "migrations").mkdir(parents=True)
    (directory / "migrations" / f"{APP_REVISION}_task_priority.py").write_text(
        APP_REVISION_FILE.format(revision=APP_REVISION, down_revision=migrations.head_revision())
    )
    (directory / "app_models.py").write_text(APP_MODELS)
    target = "target_metadata = app_models:metadata" if with_models else ""
    ini = directory / "alembic.ini"
    ini.write_text(ALEMBIC_INI.format(target_metadata=target))
    return ini


async def _priority_column(url: str) -> str | None:
    conn = await asyncpg.connect(url)
    try:
        found: str | None = await conn.fetchval(
            """SELECT format_type(atttypid, atttypmod) FROM pg_attribute
               WHERE attrelid = 'tasks'::regclass AND attname = 'priority'"""
        )
    finally:
        await conn.close()
    return found


async def test_migrate_doctor_and_demo_follow_the_applications_revisions(
    empty_database: str, tmp_path: Path, todo_store_server: ProvisionedServer
) -> None:
    app = tmp_path / "app"
    ini = make_app(app)
    package = [s.revision for s in migrations.script_directory().walk_revisions()][::-1]

    run = await todo_store(app, "migrate", database_url=empty_database)
    assert run.returncode == 0, run.stdout + run.stderr
    applied = [line.split(":")[0] for line in run.lines if line.startswith("applied ")]
    assert applied == [f"applied {revision}" for revision in [*package, APP_REVISION]]
    assert f"applied {APP_REVISION}: Tasks get a priority (0: none)." in run.lines
    assert run.lines[-1] == f"at head {APP_REVISION}"
    assert await _priority_column(empty_database) == "smallint"

    # From anywhere else, --config names the application's file. Independent: run together.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    async with granted_role(todo_store_server, empty_database) as runtime_url:
        owner = {"DATABASE_URL_DIRECT": empty_database}  # doctor: the app's role, as it runs
        doctor, by_path, again, demo = await asyncio.gather(
            todo_store(app, "doctor", database_url=runtime_url, **owner),
            todo_store(
                elsewhere, "doctor", "--config", str(ini), database_url=runtime_url, **owner
            ),
            todo_store(app, "migrate", database_url=empty_database),
            todo_store(app, "demo", database_url=empty_database),
        )
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    assert [line.split(":")[0] for line in doctor.lines] == [f"✔ {name}" for name in DOCTOR]
    assert doctor.line("revision").startswith(f"✔ revision: {APP_REVISION} = head, via ")
    assert doctor.line("drift") == "✔ drift: models match the database (alembic check)"

    assert by_path.returncode == 0, by_path.stdout + by_path.stderr
    assert by_path.line("revision").startswith(f"✔ revision: {APP_REVISION} = head")

    assert again.returncode == 0, again.stdout + again.stderr
    assert again.lines[-1] == f"already at head {APP_REVISION}: nothing to apply"

    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert f"migrate: already at head {APP_REVISION}" in demo.lines


WHERE_TO_RUN = (
    f"the database is at {APP_REVISION}, which is not in todo-store's own migrations: run in"
    " your application's directory (its alembic.ini) or pass --config PATH"
)


async def test_without_the_applications_file_the_commands_say_where_to_run(
    empty_database: str, tmp_path: Path
) -> None:
    # No models named: nothing of the application is imported into this process.
    ini = make_app(tmp_path / "app", with_models=False)
    await migrations.upgrade(settings_for(empty_database), config=ini)
    bare = tmp_path / "bare"
    bare.mkdir()

    run, doctor, demo = await asyncio.gather(
        *(todo_store(bare, command, database_url=empty_database) for command in COMMANDS)
    )
    assert run.returncode == 1
    assert run.lines[-1] == f"✘ migrate: {WHERE_TO_RUN}"
    assert run.stderr == ""  # no traceback

    assert doctor.returncode == 1
    hint = WHERE_TO_RUN.replace(f"the database is at {APP_REVISION}, which", APP_REVISION)
    revision = doctor.line("revision")
    assert revision.startswith(f"✘ revision: {APP_REVISION}, head is ")
    assert revision.endswith(f"— {hint}")
    drift = doctor.line("drift")
    assert drift.startswith("✘ drift: not compared: ")
    assert drift.endswith(f"— {hint}")
    assert "alembic upgrade head" not in doctor.stdout
    assert "todo-store migrate" not in doctor.stdout  # migrating cannot fix this
    assert doctor.stderr == ""

    assert demo.returncode == 1
    assert demo.lines[-1] == f"✘ demo: {WHERE_TO_RUN}"
    assert demo.stderr == ""


async def test_upgrade_refuses_a_database_at_revisions_it_does_not_have(
    empty_database: str, tmp_path: Path
) -> None:
    ini = make_app(tmp_path / "app", with_models=False)
    settings = settings_for(empty_database)
    applied = await migrations.upgrade(settings, config=ini)
    priority = migrations.AppliedRevision(APP_REVISION, "Tasks get a priority (0: none).")
    assert applied[-1] == priority

    with pytest.raises(migrations.UnknownRevisions) as refused:
        await migrations.upgrade(settings)
    assert str(refused.value) == WHERE_TO_RUN
    assert refused.value.revisions == [APP_REVISION]
    assert await migrations.current_heads(settings) == (APP_REVISION,)
    assert await migrations.upgrade(settings, config=ini) == []


async def test_doctor_in_process(empty_database: str, tmp_path: Path) -> None:
    """Drift without the application's models, and hints naming the file given."""
    ini = make_app(tmp_path / "app", with_models=False)
    settings = settings_for(empty_database)

    before = {check.name: check for check in await diagnose(settings, ini)}
    assert before["revision"].detail.startswith(f"none (empty database), head is {APP_REVISION}")
    assert before["revision"].hint == f"run `todo-store migrate --config {ini}`"

    await migrations.upgrade(settings, config=ini)
    after = await diagnose(settings, ini)
    # The database's own role is a superuser: row-level security does not hold it.
    assert [check.name for check in after if not check.ok] == ["row-level security", "drift"]
    [drift] = [check for check in after if check.name == "drift"]
    assert drift.detail == "models and database differ: remove_column tasks.priority"
    assert "target_metadata = module:metadata" in drift.hint


@pytest.mark.parametrize(
    ("problem", "command", "message"),
    [
        ("no package revisions", "migrate", "`todo_store:_alembic/versions` in version_locations"),
        ("no script_location", "doctor", "has no script_location: add `script_location ="),
        ("missing file", "demo", "no-such.ini: no such file"),
    ],
)
async def test_an_unusable_alembic_ini_is_one_line(
    tmp_path: Path, problem: str, command: str, message: str
) -> None:
    ini = make_app(tmp_path / "app")
    text = ini.read_text()
    if problem == "no package revisions":
        ini.write_text(text.replace("todo_store:_alembic/versions ", ""))
        shipped = ", ".join(sorted(script.revision for script in PACKAGE_SCRIPTS.walk_revisions()))
        message = f"does not include todo-store's migrations (revision {shipped}): list {message}"
    elif problem == "no script_location":
        ini.write_text(text.replace("script_location = todo_store:_alembic\n", ""))
    args = ["--config", str(ini.with_name("no-such.ini"))] if problem == "missing file" else []

    # Checked before any database is reached (this URL names none that exists).
    run = await todo_store(ini.parent, command, *args, database_url="postgresql://h/db")
    assert run.returncode == 2, run.stdout + run.stderr
    [line] = run.lines
    assert line.startswith("✘ config: ")
    assert message in line
    assert run.stderr == ""
