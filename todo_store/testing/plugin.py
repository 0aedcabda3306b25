"""pytest plugin: a real PostgreSQL (and PgBouncer) with the migrations applied.

Loaded automatically where `todo_store` is installed (entry point `pytest11`, plugin name
`todo_store`; `-p no:todo_store` turns it off). Loading it costs next to nothing and needs only
pytest: everything else is imported by the fixture that uses it, so a project that installed
`todo-store` without the `testing` extra, or never asks for these fixtures, runs as before.

Fixtures that need no event loop (they work with or without pytest-asyncio):

- `todo_store_server`: the PostgreSQL server of this run (see `postgres.provision_server`).
- `todo_store_settings`: `Settings` for a fresh database of this run, migrated to head (with
  the application's own revisions when the project's root holds an `alembic.ini`).
- `todo_store_template`: the name of this run's migrated template database, which the two
  above are copied from (`CREATE DATABASE … TEMPLATE`): migrations run once per run.
- `todo_store_database`: `Settings` for a database of the test's own, copied from the
  template before the test and dropped after it.
- `todo_store_pgbouncer`: a PgBouncer in transaction mode (pool of 4) in front of that
  database. Skipped where PgBouncer cannot run, unless `TODO_STORE_REQUIRE_PGBOUNCER=1`.

Fixtures that run on the test's event loop (they need pytest-asyncio, which the `testing`
extra installs; see `todo_store.testing.store_fixtures`):

- `todo_store`: a `TodoStore` whose every unit of work joins one transaction rolled back
  after the test, so code under test that commits is isolated too. In a test marked
  `@pytest.mark.todo_store_database`: a real `TodoStore` on `todo_store_database` (real
  commits, connections, concurrency and locks).
- `todo_store_session`: an `AsyncSession` in that same transaction.
- `todo_store_connection`: the connection holding that transaction.
- `todo_store_engine`: the engine these come from (one per event loop).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import threading
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pytest

if TYPE_CHECKING:
    from todo_store.settings import Settings
    from todo_store.testing.pgbouncer import PgBouncer
    from todo_store.testing.postgres import ProvisionedServer

REQUIRE_PGBOUNCER = "TODO_STORE_REQUIRE_PGBOUNCER"
ALEMBIC_CONFIG_OPTION = "todo_store_alembic_config"
DATABASE_MARKER = "todo_store_database"
_PACKAGE_MIGRATIONS_ONLY = "none"
_STORE_FIXTURES = "todo_store.testing.store_fixtures"
_STORE_FIXTURES_UNAVAILABLE = "todo_store.testing.store_fixtures_unavailable"

T = TypeVar("T")


def settings_for(url: str) -> Settings:
    """Settings for a test database; the direct URL is the same server."""
    from todo_store.settings import Settings  # noqa: PLC0415 - keep plugin loading cheap

    return Settings(database_url=url, database_url_direct=url)


def start_pgbouncer(server: ProvisionedServer, database: str, **options: Any) -> PgBouncer:
    """A started PgBouncer; skips the test where none can run, or fails if one is required."""
    from todo_store.testing.pgbouncer import PgBouncer, PgBouncerUnavailable  # noqa: PLC0415

    bouncer = PgBouncer(server, database, **options)
    try:
        bouncer.start()
    except PgBouncerUnavailable as error:
        if os.environ.get(REQUIRE_PGBOUNCER) == "1":
            pytest.fail(f"PgBouncer is required ({REQUIRE_PGBOUNCER}=1): {error}")
        pytest.skip(f"PgBouncer unavailable: {error}")
    return bouncer


def run_in_own_loop(make_coroutine: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine to completion on a new event loop in a worker thread; return its result.

    For session-wide setup (creating and migrating the test database) that must not depend on
    which event loop, if any, the tests run on: nothing it opens outlives the call.
    """
    outcome: list[T] = []
    failure: list[BaseException] = []

    def work() -> None:
        try:
            outcome.append(asyncio.run(make_coroutine()))
        except BaseException as error:  # handed to the calling thread as is
            failure.append(error)

    worker = threading.Thread(target=work, name="todo-store-setup", daemon=True)
    worker.start()
    worker.join()
    if failure:
        raise failure[0]
    return outcome[0]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        ALEMBIC_CONFIG_OPTION,
        help=(
            "the alembic.ini (relative to the root directory) whose revisions the test database "
            "gets; default: alembic.ini in the root directory if there is one; 'none': only "
            "todo-store's own migrations"
        ),
        default="",
    )


def pytest_configure(config: pytest.Config) -> None:
    """Add the event-loop fixtures: real ones when pytest-asyncio runs, else ones that say so."""
    config.addinivalue_line(
        "markers",
        f"{DATABASE_MARKER}: the todo_store fixture is a real TodoStore on a database of this "
        "test's own (copied from a migrated template, dropped after the test), for real "
        "commits, concurrency and locks",
    )
    manager = config.pluginmanager
    if manager.has_plugin(_STORE_FIXTURES) or manager.has_plugin(_STORE_FIXTURES_UNAVAILABLE):
        return
    if _asyncio_plugin_active(config):
        import todo_store.testing.store_fixtures as fixtures  # noqa: PLC0415

        manager.register(fixtures, _STORE_FIXTURES)
    else:
        import todo_store.testing.store_fixtures_unavailable as stubs  # noqa: PLC0415

        manager.register(stubs, _STORE_FIXTURES_UNAVAILABLE)


def _asyncio_plugin_active(config: pytest.Config) -> bool:
    try:
        import pytest_asyncio.plugin  # noqa: PLC0415 - already imported when it is active
    except ImportError:
        return False
    return config.pluginmanager.is_registered(pytest_asyncio.plugin)


@pytest.fixture(scope="session")
def todo_store_server() -> Iterator[ProvisionedServer]:
    from todo_store.testing.postgres import provision_server  # noqa: PLC0415

    with provision_server() as server:
        yield server


@pytest.fixture(scope="session")
def todo_store_template(
    todo_store_server: ProvisionedServer, request: pytest.FixtureRequest
) -> Iterator[str]:
    """The name of this run's template database: migrated to head once, then only copied.

    The migrations are the ones `todo-store migrate` would apply in the project's root
    directory: the package's, plus the application's own when an `alembic.ini` is there
    (the ini option `todo_store_alembic_config` names another file, or `none`). Nobody can
    connect to the template, so copies of it can be made at any time; dropped at the end.
    """
    from todo_store import migrations  # noqa: PLC0415
    from todo_store.testing.postgres import (  # noqa: PLC0415
        create_database,
        drop_database,
        make_template,
    )

    alembic_ini = _alembic_config(request.config)
    admin_url = todo_store_server.admin_url
    name = f"todo_store_template_{secrets.token_hex(4)}"
    settings = settings_for(run_in_own_loop(lambda: create_database(admin_url, name)))
    try:
        run_in_own_loop(lambda: migrations.upgrade(settings, config=alembic_ini))
        run_in_own_loop(lambda: make_template(admin_url, name))
        yield name
    finally:
        run_in_own_loop(lambda: drop_database(admin_url, name))


@pytest.fixture(scope="session")
def todo_store_settings(
    todo_store_server: ProvisionedServer, todo_store_template: str
) -> Iterator[Settings]:
    """A database of its own for this run, migrated to head (a copy of the template); dropped
    at the end.

    Created on an event loop of its own, so the database outlives any test loop and works
    whichever loop scope the tests use.
    """
    with _database_copy(todo_store_server, todo_store_template, "todo_store_test") as settings:
        yield settings


@pytest.fixture
def todo_store_database(
    todo_store_server: ProvisionedServer, todo_store_template: str
) -> Iterator[Settings]:
    """A database of this test's own, migrated to head (a copy of the template), dropped after
    the test: what the code under test commits is real, and gone after the test."""
    with _database_copy(todo_store_server, todo_store_template, "todo_store_test") as settings:
        yield settings


@contextmanager
def _database_copy(server: ProvisionedServer, template: str, prefix: str) -> Iterator[Settings]:
    from todo_store.testing.postgres import create_database, drop_database  # noqa: PLC0415

    admin_url = server.admin_url
    name = f"{prefix}_{secrets.token_hex(4)}"
    url = run_in_own_loop(lambda: create_database(admin_url, name, template=template))
    try:
        yield settings_for(url)
    finally:
        run_in_own_loop(lambda: drop_database(admin_url, name))


def _alembic_config(config: pytest.Config) -> Path | None:
    from todo_store import migrations  # noqa: PLC0415

    chosen = str(config.getini(ALEMBIC_CONFIG_OPTION)).strip()
    if chosen.lower() == _PACKAGE_MIGRATIONS_ONLY:
        return None
    if chosen:
        return migrations.find_config(config.rootpath / chosen)
    return migrations.find_config(cwd=config.rootpath)


@pytest.fixture(scope="session")
def todo_store_pgbouncer(
    todo_store_server: ProvisionedServer, todo_store_settings: Settings
) -> Iterator[PgBouncer]:
    from sqlalchemy.engine import make_url  # noqa: PLC0415

    database = make_url(todo_store_settings.database_url.get_secret_value()).database or ""
    bouncer = start_pgbouncer(todo_store_server, database, pool_size=4)
    try:
        yield bouncer
    finally:
        bouncer.stop()
