"""The `todo-store` command, run as a real subprocess against real databases.

`doctor` and `demo` call `asyncio.run`, which cannot nest in this suite's running loop, so
each test starts `python -m todo_store.cli` with its own environment (no `.env` is read: the
working directory is a temporary one).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest
import pytest_asyncio
from conftest import CommandRun, command_env, granted_role, run_command
from sqlalchemy.engine import URL, make_url

import todo_store
from todo_store import cli, migrations
from todo_store.schema_checks import SCHEMA_CHECKS
from todo_store.testing.pgbouncer import PgBouncer
from todo_store.testing.plugin import settings_for
from todo_store.testing.postgres import (
    DATABASE_URL_ENV,
    SOURCE_ENV,
    ProvisionedServer,
)

SCHEMA = [name for name, _ in SCHEMA_CHECKS]
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
    *SCHEMA,
]
UPGRADE_HINT = "run `todo-store migrate`"


async def run_cli(cwd: Path, *args: str, database_url: str | None, **extra_env: str) -> CommandRun:
    """`todo-store ARGS` from this checkout, in `cwd`."""
    return await run_command(
        sys.executable,
        "-m",
        "todo_store.cli",
        *args,
        cwd=cwd,
        database_url=database_url,
        **extra_env,
    )


@pytest_asyncio.fixture(loop_scope="session")
async def migrated_url(empty_database: str) -> str:
    await migrations.upgrade(settings_for(empty_database))
    return empty_database


async def row_counts(url: str) -> tuple[int, int]:
    conn = await asyncpg.connect(url)
    try:
        users = await conn.fetchval("SELECT count(*) FROM users")
        tasks = await conn.fetchval("SELECT count(*) FROM tasks")
    finally:
        await conn.close()
    return users, tasks


async def test_doctor_passes_every_check_on_a_migrated_database(
    migrated_url: str, tmp_path: Path, todo_store_server: ProvisionedServer
) -> None:
    async with granted_role(todo_store_server, migrated_url) as runtime_url:
        env = {"DATABASE_URL_DIRECT": migrated_url}  # the owner's
        text_run = await run_cli(tmp_path, "doctor", database_url=runtime_url, **env)
        json_run = await run_cli(tmp_path, "doctor", "--json", database_url=runtime_url, **env)
    assert text_run.returncode == 0, text_run.stdout + text_run.stderr
    assert [line.split(":")[0] for line in text_run.lines] == [f"✔ {name}" for name in DOCTOR]
    assert "direct" in text_run.line("pooler")
    assert text_run.line("revision").startswith(f"✔ revision: {migrations.head_revision()} = head")
    assert json_run.returncode == 0
    checks = json.loads(json_run.stdout)
    assert [check["name"] for check in checks] == DOCTOR
    assert all(check["ok"] is True and check["hint"] == "" for check in checks)
    assert all(set(check) == {"name", "ok", "detail", "hint"} for check in checks)
    # The schema checks wrote users and tasks; both runs rolled them back.
    assert await row_counts(migrated_url) == (0, 0)


async def test_doctor_reports_a_dropped_trigger(migrated_url: str, tmp_path: Path) -> None:
    conn = await asyncpg.connect(migrated_url)
    try:
        await conn.execute("DROP TRIGGER update_tasks_updated_at ON tasks")
    finally:
        await conn.close()

    run = await run_cli(tmp_path, "doctor", database_url=migrated_url)
    assert run.returncode == 1
    failed = {line.split(":")[0][2:] for line in run.lines if line.startswith("✘")}
    # (This database's role is a superuser: row-level security cannot hold it.)
    assert failed == {"trigger update_tasks_updated_at", "updated_at trigger", "row-level security"}
    assert "trigger update_tasks_updated_at on tasks is missing" in run.line(
        "trigger update_tasks_updated_at"
    )
    assert "updated_at stayed 2001-01-01" in run.line("updated_at trigger")
    # Alembic's autogenerate does not compare triggers: drift cannot see this.
    assert run.line("drift").startswith("✔")


@pytest.mark.parametrize("history", ["never migrated", "downgraded to base"])
async def test_doctor_on_a_schema_behind_head(
    empty_database: str, tmp_path: Path, history: str
) -> None:
    if history == "downgraded to base":
        await migrations.upgrade(settings_for(empty_database))
        await migrations.downgrade(settings_for(empty_database), "base")

    run = await run_cli(tmp_path, "doctor", database_url=empty_database)
    assert run.returncode == 1
    assert run.line("connect").startswith("✔")
    revision = run.line("revision")
    assert revision.startswith("✘ revision: none (empty database), head is")
    assert revision.endswith(f"— {UPGRADE_HINT}")
    assert run.line("drift").startswith("✘ drift: not compared: Target database is not up to date")
    checks = (await run_cli(tmp_path, "doctor", "--json", database_url=empty_database)).by_name()
    for name in SCHEMA:  # reported, not crashed: each names the fix
        assert checks[name]["ok"] is False
        assert UPGRADE_HINT in f"{checks[name]['detail']} {checks[name]['hint']}"


def _unusable_url(server: ProvisionedServer, problem: str) -> str:
    if problem == "nothing listening":  # connection refused on TCP port 1
        return "postgresql://postgres:secretpw@127.0.0.1:1/db"
    # A role that does not exist fails with SQLSTATE 28000 even where every password is trusted.
    if server.is_unix_socket:
        query = {"host": server.host, "port": str(server.port)}
        url = URL.create("postgresql", "no_such_role", "secretpw", database="db", query=query)
    else:
        url = URL.create("postgresql", "no_such_role", "secretpw", server.host, server.port, "db")
    return url.render_as_string(hide_password=False)


@pytest.mark.parametrize(
    ("problem", "reason"),
    [
        ("unknown role", 'connection rejected: role "no_such_role" does not exist'),
        ("nothing listening", "could not connect: connection refused"),
    ],
)
async def test_doctor_without_a_connection_never_shows_the_password(
    todo_store_server: ProvisionedServer, tmp_path: Path, problem: str, reason: str
) -> None:
    url = _unusable_url(todo_store_server, problem)
    assert "secretpw" in url

    run = await run_cli(tmp_path, "doctor", database_url=url)
    assert run.returncode == 1
    connect = run.line("connect")
    assert connect.startswith("✘ connect: postgresql://")
    assert ":***@" in connect
    assert reason in connect
    # The reason once, then one line naming the checks that could not run.
    assert run.lines[1:] == [
        f"✘ other checks: not run without a connection: {', '.join(DOCTOR[1:])}"
    ]

    json_run = await run_cli(tmp_path, "doctor", "--json", database_url=url)
    assert json_run.returncode == 1
    assert not any(check["ok"] for check in json.loads(json_run.stdout))
    for output in (run.stdout, run.stderr, json_run.stdout, json_run.stderr):
        assert "secretpw" not in output


@pytest.mark.pgbouncer
async def test_doctor_flags_statement_caching_through_pgbouncer(
    todo_store_pgbouncer: PgBouncer, tmp_path: Path
) -> None:
    url = todo_store_pgbouncer.url
    # This PgBouncer logs in as the server's superuser: row-level security cannot hold it.
    rls = "✘ row-level security"
    safe = await run_cli(tmp_path, "doctor", database_url=url)
    assert [line for line in safe.lines if line.startswith("✘")] == [
        safe.line("row-level security")
    ], safe.stdout
    assert safe.line("row-level security").startswith(rls)
    assert safe.line("pooler").startswith("✔ pooler: pooled: ")
    assert safe.line("statement cache") == "✔ statement cache: off: safe through any pooler"

    cached = await run_cli(tmp_path, "doctor", database_url=url, STATEMENT_CACHE="true")
    assert cached.returncode == 1
    assert [line for line in cached.lines if line.startswith("✘") and not line.startswith(rls)] == [
        "✘ statement cache: on, through a pooler: prepared statements can land on another server"
        " connection — set STATEMENT_CACHE=false, or use PgBouncer >= 1.21 with"
        " max_prepared_statements"
    ]


async def test_demo_on_database_url_persists_only_the_schema(
    empty_database: str, tmp_path: Path
) -> None:
    run = await run_cli(tmp_path, "demo", database_url=empty_database)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.lines[0] == f"database: {make_url(empty_database).render_as_string()} (DATABASE_URL)"
    for name in SCHEMA:
        assert run.line(name).startswith(f"✔ {name}: ")
    assert "TaskNotFound: task" in run.stdout
    assert "(cascade)" in run.stdout
    assert len(run.lines) <= 25

    settings = settings_for(empty_database)
    assert await migrations.current_revision(settings) == migrations.head_revision()
    assert await row_counts(empty_database) == (0, 0)


async def test_demo_without_database_url_uses_an_embedded_postgres(tmp_path: Path) -> None:
    # Neither a test server nor a forced source may leak in: the demo must start its own.
    unset = {DATABASE_URL_ENV: "", SOURCE_ENV: "docker"}
    run = await run_cli(tmp_path, "demo", database_url=None, **unset)
    assert run.returncode == 0, run.stdout + run.stderr
    first = run.lines[0]
    assert first.endswith("(embedded PostgreSQL, deleted on exit)")
    for name in SCHEMA:
        assert run.line(name).startswith(f"✔ {name}: ")
    # The server lived in a temporary directory (its socket dir is in the URL); it is gone.
    socket_dir = make_url(first.split()[1]).query["host"]
    assert isinstance(socket_dir, str)
    assert not Path(socket_dir).parent.exists()


async def test_migrate_says_what_it_applied(empty_database: str, tmp_path: Path) -> None:
    run = await run_cli(tmp_path, "migrate", database_url=empty_database)
    assert run.returncode == 0, run.stderr
    head = migrations.head_revision()
    assert run.lines[:4] == [
        f"migrations use {make_url(empty_database).render_as_string()} (DATABASE_URL)",
        "applied 0001: Initial schema: users, tasks, the owner index and the updated_at trigger.",
        "applied 0002: Move the updated_at trigger onto the package's own function,"
        " todo_store_set_updated_at().",
        "applied 0003: Tasks carry a version that every change increments: edits can say which"
        " one they saw.",
    ]
    # Later revisions, one line each, then the head.
    assert all(line.startswith("applied ") for line in run.lines[4:-1]), run.lines
    assert run.lines[-1] == f"at head {head}"
    assert await migrations.current_revision(settings_for(empty_database)) == head

    again = await run_cli(tmp_path, "migrate", database_url=empty_database)
    assert again.returncode == 0, again.stderr
    assert again.lines[1:] == [f"already at head {head}: nothing to apply"]


async def test_version(tmp_path: Path) -> None:
    run = await run_cli(tmp_path, "--version", database_url=None)
    assert run.returncode == 0
    assert run.stdout.strip() == f"todo-store {todo_store.__version__}"
    assert todo_store.__version__ == importlib.metadata.version("todo-store")


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    [commands] = [
        action
        for action in cli._parser()._actions
        if isinstance(action, argparse._SubParsersAction)
    ]
    return dict(commands.choices)


@pytest.mark.parametrize("args", [["--help"], *([name, "--help"] for name in _subcommands())])
async def test_help_speaks_the_users_words(tmp_path: Path, args: list[str]) -> None:
    run = await run_cli(tmp_path, *args, database_url=None)
    assert run.returncode == 0
    for internal in ("seed", "step 7", "step7"):
        assert internal not in run.stdout.lower()


@pytest.mark.parametrize("name", list(_subcommands()))
async def test_every_subcommand_help_says_what_it_does(tmp_path: Path, name: str) -> None:
    description = _subcommands()[name].description
    assert description, f"todo-store {name} has no description"

    run = await run_cli(tmp_path, name, "--help", database_url=None)
    assert run.returncode == 0
    assert " ".join(description.split()[:6]) in " ".join(run.stdout.split())


@pytest.mark.parametrize("url", ["not a url", "host:notaport"])
@pytest.mark.parametrize("command", ["migrate", "doctor", "demo"])
async def test_an_unparseable_url_is_one_line_and_exit_status_2(
    tmp_path: Path, command: str, url: str
) -> None:
    run = await run_cli(tmp_path, command, database_url=url)

    assert run.returncode == 2
    assert run.lines == [
        "✘ settings: DATABASE_URL: could not parse database URL"
        " (expected postgresql://user:password@host/dbname)"
    ]
    assert run.stderr == ""


@pytest.mark.parametrize("args", [["migrate"], ["doctor"], ["doctor", "--json"]])
async def test_a_missing_database_url_is_exit_status_2_in_every_command(
    tmp_path: Path, args: list[str]
) -> None:
    run = await run_cli(tmp_path, *args, database_url=None)

    assert run.returncode == 2
    if "--json" in args:
        assert (
            run.by_name()["settings"]["detail"] == "DATABASE_URL is not set (environment or .env)"
        )
    else:
        assert run.lines == ["✘ settings: DATABASE_URL is not set (environment or .env)"]
    assert run.stderr == ""


def test_doctor_into_a_closed_pipe_exits_quietly(migrated_url: str, tmp_path: Path) -> None:
    # `todo-store doctor --json | head -1`, where the reader has gone before doctor writes.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        run = subprocess.run(
            [sys.executable, "-m", "todo_store.cli", "doctor", "--json"],
            cwd=tmp_path,
            env={**command_env(migrated_url), "PYTHONIOENCODING": "utf-8"},
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
            check=False,
        )
    finally:
        os.close(write_end)

    assert run.stderr == ""
    assert run.returncode == 1
