"""Fixtures for this suite; the database ones come from the `todo_store.testing` plugin."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import pytest_asyncio
from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from todo_store import Settings, TodoStore
from todo_store.binding import grant
from todo_store.engine import create_engine
from todo_store.testing.pgbouncer import PgBouncer, PgBouncerUnavailable, tracking_binary
from todo_store.testing.plugin import REQUIRE_PGBOUNCER, settings_for, start_pgbouncer
from todo_store.testing.postgres import ProvisionedServer, create_database, drop_database


@pytest.fixture
def session(todo_store_session: AsyncSession) -> AsyncSession:
    """A session whose work is rolled back after the test."""
    return todo_store_session


@pytest_asyncio.fixture(loop_scope="session")
async def store(todo_store_settings: Settings) -> AsyncIterator[TodoStore]:
    """A `TodoStore` whose units of work really commit: use unique user ids (`new_user_id`)."""
    async with TodoStore(todo_store_settings) as todo_store:
        yield todo_store


@pytest_asyncio.fixture(loop_scope="session")
async def pooled_store(todo_store_pgbouncer: PgBouncer) -> AsyncIterator[TodoStore]:
    """A `TodoStore` that reaches the test database through PgBouncer (transaction mode)."""
    async with TodoStore(settings_for(todo_store_pgbouncer.url)) as todo_store:
        yield todo_store


@pytest.fixture(params=["direct", "pgbouncer"])
def served_store(request: pytest.FixtureRequest) -> TodoStore:
    """`store` or `pooled_store`: the test runs once directly and once through PgBouncer."""
    name = "store" if request.param == "direct" else "pooled_store"
    served: TodoStore = request.getfixturevalue(name)
    return served


# Neon's pooler runs PgBouncer with this setting; it tracks protocol-level prepared statements.
NEON_MAX_PREPARED_STATEMENTS = 1000


def tracking_pgbouncer_binary() -> str:
    """A PgBouncer >= 1.21 (see `tracking_binary`); skips the test, or fails where required."""
    try:
        return tracking_binary()
    except PgBouncerUnavailable as error:
        if os.environ.get(REQUIRE_PGBOUNCER) == "1":
            pytest.fail(f"PgBouncer is required ({REQUIRE_PGBOUNCER}=1): {error}")
        pytest.skip(f"no PgBouncer that tracks prepared statements: {error}")


def start_tracking_pgbouncer(server: ProvisionedServer, database: str, **options: Any) -> PgBouncer:
    """A started PgBouncer >= 1.21 with `max_prepared_statements = 1000`, as Neon runs it."""
    return start_pgbouncer(
        server,
        database,
        binary=tracking_pgbouncer_binary(),
        max_prepared_statements=NEON_MAX_PREPARED_STATEMENTS,
        **options,
    )


@pytest.fixture(scope="session")
def tracking_pgbouncer(
    todo_store_server: ProvisionedServer, todo_store_settings: Settings
) -> Iterator[PgBouncer]:
    """Beside `todo_store_pgbouncer` (no statement tracking, e.g. Debian's 1.18): a PgBouncer
    that tracks prepared statements, transaction mode, pool of 4, in front of the test database.
    """
    database = make_url(todo_store_settings.database_url.get_secret_value()).database or ""
    bouncer = start_tracking_pgbouncer(todo_store_server, database, pool_size=4)
    try:
        yield bouncer
    finally:
        bouncer.stop()


@pytest_asyncio.fixture(loop_scope="session")
async def empty_database(todo_store_server: ProvisionedServer) -> AsyncIterator[str]:
    """URL of a new database with nothing in it (not even migrations), dropped afterwards."""
    name = f"todo_store_empty_{secrets.token_hex(4)}"
    url = await create_database(todo_store_server.admin_url, name)
    yield url
    await drop_database(todo_store_server.admin_url, name)


def command_env(database_url: str | None) -> dict[str, str]:
    """The environment for a child process: DATABASE_URL (or none) and no other setting."""
    settings_keys = {name.upper() for name in Settings.model_fields}
    env = {key: value for key, value in os.environ.items() if key.upper() not in settings_keys}
    if database_url is not None:
        env["DATABASE_URL"] = database_url
    return env


@dataclass(frozen=True)
class CommandRun:
    """What a command printed, and how it exited."""

    returncode: int
    stdout: str
    stderr: str

    @property
    def lines(self) -> list[str]:
        return [line for line in self.stdout.splitlines() if line.strip()]

    def line(self, name: str) -> str:
        """The doctor line for check `name` (one of ✔/✘, then the name and a colon)."""
        [found] = [line for line in self.lines if line.lstrip()[2:].startswith(f"{name}:")]
        return found.strip()

    def by_name(self) -> dict[str, dict[str, object]]:
        return {check["name"]: check for check in json.loads(self.stdout)}


async def run_command(
    *argv: str, cwd: Path | None = None, database_url: str | None, **extra_env: str
) -> CommandRun:
    """Run `argv` with DATABASE_URL (or none) and no other setting; bounded at 120 s."""
    env = command_env(database_url)
    env.update(extra_env, PYTHONIOENCODING="utf-8")
    process = await asyncio.create_subprocess_exec(
        *argv,
        cwd=cwd,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=120)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return CommandRun(process.returncode, stdout.decode(), stderr.decode())


async def _admin_execute(url: str, *statements: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def granted_role(server: ProvisionedServer, database_url: str) -> AsyncIterator[str]:
    """A new LOGIN role given what the application needs on `database_url`'s database by
    `grant` (what `todo-store grant` does); yields `database_url` as that role. The role is a
    runtime role: row-level security applies to it. Dropped afterwards."""
    name = f"todo_store_rt_{secrets.token_hex(4)}"
    await _admin_execute(server.admin_url, f'CREATE ROLE "{name}" LOGIN')
    try:
        engine = create_engine(settings_for(database_url))
        try:
            async with engine.begin() as conn:
                await grant(conn, name)
        finally:
            await engine.dispose()
        url = make_url(database_url).set(username=name, password=None)
        yield url.render_as_string(hide_password=False)
    finally:
        await _admin_execute(database_url, f'DROP OWNED BY "{name}"')
        await _admin_execute(server.admin_url, f'DROP ROLE "{name}"')


@pytest.fixture
def new_user_id() -> str:
    return f"u_{uuid.uuid4().hex[:12]}"


@dataclass
class StatementLog:
    """SQL statements an engine sent while recording."""

    statements: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.statements)

    def clear(self) -> None:
        self.statements.clear()


@pytest.fixture
def statements(todo_store_engine: AsyncEngine) -> Iterator[StatementLog]:
    """Records every statement sent on the test engine during the test."""
    log = StatementLog()

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        log.statements.append(statement)

    event.listen(todo_store_engine.sync_engine, "before_cursor_execute", record)
    yield log
    event.remove(todo_store_engine.sync_engine, "before_cursor_execute", record)
