"""The fixtures that run on the test's event loop; registered by the plugin with pytest-asyncio.

Every test that asks for `todo_store`, `todo_store_session` or `todo_store_connection` gets one
connection holding one transaction, rolled back after the test; all three share it, so rows
written through one are seen by the others.

Which event loop: these fixtures follow pytest-asyncio's `asyncio_default_fixture_loop_scope`
(without it, "function": a loop per test, pytest-asyncio's default for tests). The engine lives
exactly as long as that loop (per test, or per run with `session`), because asyncpg connections
belong to the loop that opened them. Tests must run on the same loop, which is what pytest-asyncio
does when `asyncio_default_fixture_loop_scope` and `asyncio_default_test_loop_scope` agree (or
neither is set); `todo_store` says so clearly when they do not.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import pytest
import pytest_asyncio

from todo_store.testing.plugin import DATABASE_MARKER

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

    from todo_store.engine import TodoStore
    from todo_store.settings import Settings
    from todo_store.testing.isolated_store import IsolatedTodoStore

_FIXTURE_LOOP_SCOPE = "asyncio_default_fixture_loop_scope"
_MATCH_FIXTURE_SCOPE = "fixture-scope"  # pytest-asyncio's "each fixture's own scope"


def engine_scope(fixture_name: str, config: pytest.Config) -> str:
    """The scope of the loop the function-scoped fixtures here run on: the engine's lifetime."""
    scope = config.getini(_FIXTURE_LOOP_SCOPE)
    if not scope or scope == _MATCH_FIXTURE_SCOPE:
        return "function"
    return str(scope)


@pytest_asyncio.fixture(scope=engine_scope)  # type: ignore[arg-type] # a scope callable is valid
async def todo_store_engine(todo_store_settings: Settings) -> AsyncIterator[AsyncEngine]:
    """The test database's engine, created on the fixtures' event loop, disposed with it."""
    from todo_store.engine import create_engine  # noqa: PLC0415 - keep plugin loading cheap

    engine = create_engine(todo_store_settings)
    try:
        yield engine
    finally:
        await engine.dispose()


@pytest_asyncio.fixture
async def todo_store_connection(todo_store_engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """A connection inside a transaction that is rolled back after the test.

    Its `commit()` is refused (it would keep the test's rows for the next tests).
    """
    from todo_store.testing.isolated_store import RolledBackConnection  # noqa: PLC0415

    connection = RolledBackConnection(todo_store_engine)
    await connection.start()
    try:
        transaction = await connection.begin()
        try:
            yield connection
        finally:
            await transaction.rollback()
    finally:
        await connection.close()


@pytest_asyncio.fixture
async def todo_store_session(todo_store_connection: AsyncConnection) -> AsyncIterator[AsyncSession]:
    """An `AsyncSession` in the test's transaction; code under test may commit (commits become
    savepoint releases) and everything is rolled back after the test."""
    from sqlalchemy.ext.asyncio import AsyncSession  # noqa: PLC0415

    session = AsyncSession(
        bind=todo_store_connection,
        join_transaction_mode="create_savepoint",
        expire_on_commit=False,
        autoflush=False,
    )
    try:
        yield session
    finally:
        await session.close()


@pytest.fixture
def todo_store(request: pytest.FixtureRequest) -> TodoStore:
    """A `TodoStore` for the test: by default an `IsolatedTodoStore`, whose units of work all
    join the test's transaction, so what code under test commits is rolled back after the
    test. In a test marked `@pytest.mark.todo_store_database`: a real `TodoStore` on a
    database of the test's own (`todo_store_database`), dropped after the test."""
    if request.node.get_closest_marker(DATABASE_MARKER) is not None:
        return request.getfixturevalue("_todo_store_on_own_database")  # type: ignore[no-any-return]
    return request.getfixturevalue("_todo_store_rolled_back")  # type: ignore[no-any-return]


@pytest_asyncio.fixture
async def _todo_store_rolled_back(
    todo_store_settings: Settings,
    todo_store_engine: AsyncEngine,
    todo_store_connection: AsyncConnection,
) -> AsyncIterator[IsolatedTodoStore]:
    from todo_store.testing.isolated_store import IsolatedTodoStore  # noqa: PLC0415

    store = IsolatedTodoStore(todo_store_settings, todo_store_engine, todo_store_connection)
    yield store
    # Tasks the test started may still be in a unit of work: the transaction is rolled back
    # once they are done, not under them.
    await store.wait_for_units_of_work()


@pytest_asyncio.fixture
async def _todo_store_on_own_database(todo_store_database: Settings) -> AsyncIterator[TodoStore]:
    from todo_store.engine import TodoStore  # noqa: PLC0415

    store = TodoStore(todo_store_database)
    try:
        yield store
    finally:
        await store.dispose()
