"""`IsolatedTodoStore`: a `TodoStore` whose units of work never outlive the test.

What the `todo_store` fixture yields. Every unit of work joins the one transaction the test
holds (on one connection), as a SAVEPOINT, and that transaction is rolled back after the test;
so code under test written the usual way (`async with store.session() as session: ...`, or
`store.run(work)`) is exercised as is, commits included, and leaves nothing behind.

How each kind of unit of work behaves, compared with a real `TodoStore`:

- `session()` (atomic): a SAVEPOINT; released where a real one commits, rolled back where a
  real one rolls back. After a database error inside the block the savepoint is aborted,
  exactly as the real transaction would be.
- `session(read_only=True)`: a SAVEPOINT made READ ONLY, rolled back at the end (nothing in it
  can have changed), so writes fail as they would for real.
- `session(atomic=False)`: every call on the session (`execute`, `scalar`, `scalars`, `get`,
  `get_one`, `run_sync`: so every repository call) runs in a SAVEPOINT of its own, released
  when it succeeds and rolled back when it fails. Each call takes effect by itself, and a failed
  one leaves the session and the test's transaction usable, as with a real autocommit session;
  what succeeded stays, also when the block raises. Two differences: a call made of several
  statements (a `run_sync` function) is all or nothing, where for real each statement would
  stand alone; and objects added with `session.add()` are flushed outside those savepoints,
  so if such a flush fails the session's earlier calls are undone with it.

Units of work run one at a time on the test's connection: nesting them works (each is a
savepoint inside the previous one), but units of work of concurrent tasks must not overlap,
and doing so raises `RuntimeError` saying why. `store.engine` is the test engine: code that
uses it directly, bypassing `session()`, is not isolated.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, async_sessionmaker

from todo_store.engine import TodoStore
from todo_store.settings import Settings

_OTHER_LOOP = (
    "the todo_store fixture was set up on another event loop than the one running this code. "
    "pytest-asyncio runs fixtures on the loop that asyncio_default_fixture_loop_scope names "
    "and tests on the loop of asyncio_default_test_loop_scope (or "
    "@pytest.mark.asyncio(loop_scope=...)): give both the same scope (e.g. both 'session'), "
    "or set neither."
)
_OVERLAP = (
    "a unit of work of another task is still open: the todo_store fixture runs every unit of "
    "work inside the test's one transaction, on one connection, so units of work of "
    "concurrent tasks (asyncio.gather, TaskGroup) cannot overlap. Run them one after another, "
    "or test concurrency with a TodoStore(todo_store_settings) of your own, whose commits are "
    "real (use unique ids: nothing is rolled back)."
)


class IsolatedTodoStore(TodoStore):
    """A `TodoStore` on one connection whose transaction the test fixture rolls back."""

    def __init__(
        self, settings: Settings, engine: AsyncEngine, connection: AsyncConnection
    ) -> None:
        """`connection` must be inside a transaction that its owner rolls back.

        `TodoStore.__init__` is not called: it would create an engine of its own. This store
        does not own `engine` or `connection`; `dispose()` leaves both open.
        """
        self.settings = settings
        self.engine = engine
        self.connection = connection
        self.sessionmaker = async_sessionmaker(
            bind=connection,
            join_transaction_mode="create_savepoint",
            expire_on_commit=False,
            autoflush=False,
        )
        self._call_by_call = async_sessionmaker(
            bind=connection,
            class_=CallByCallSession,
            join_transaction_mode="create_savepoint",
            expire_on_commit=False,
            autoflush=False,
        )
        self._fixture_loop = asyncio.get_running_loop()
        self._open_units: list[asyncio.Task[Any] | None] = []

    @asynccontextmanager
    async def session(
        self, *, atomic: bool = True, read_only: bool = False, after: str | None = None
    ) -> AsyncIterator[AsyncSession]:
        """A unit of work inside the test's transaction; see the module docstring.

        `after=` is accepted and needs nothing: every unit sees the test's own writes.
        """
        if after is not None and not read_only:
            raise ValueError("after= needs read_only=True (writes always go to the primary)")
        if read_only and not atomic:
            raise ValueError("read_only=True needs atomic=True (a READ ONLY transaction)")
        if asyncio.get_running_loop() is not self._fixture_loop:
            raise RuntimeError(_OTHER_LOOP)
        task = asyncio.current_task()
        if any(other is not task for other in self._open_units):
            raise RuntimeError(_OVERLAP)
        self._open_units.append(task)
        try:
            unit: AbstractAsyncContextManager[AsyncSession]
            if read_only:
                unit = self._read_only_unit()
            elif atomic:
                unit = self.sessionmaker.begin()
            else:
                unit = self._statement_unit()
            async with unit as session:
                yield session
        finally:
            self._open_units.remove(task)

    @asynccontextmanager
    async def _read_only_unit(self) -> AsyncIterator[AsyncSession]:
        async with self.sessionmaker() as session:
            await session.execute(text("SET TRANSACTION READ ONLY"))
            try:
                yield session
            finally:
                # Nothing to keep, and rolling back also ends the READ ONLY setting.
                await session.rollback()

    @asynccontextmanager
    async def _statement_unit(self) -> AsyncIterator[AsyncSession]:
        async with self._call_by_call() as session:
            try:
                yield session
            except Exception:
                await _keep_what_succeeded(session)
                raise
            await _keep_what_succeeded(session)

    async def ping(self) -> None:
        """Round-trip to the database on the test's connection."""
        async with self.session(atomic=False) as session:
            await session.execute(text("SELECT 1"))

    async def dispose(self) -> None:
        """Nothing: the fixture that made this store closes its connection after the test."""


class CallByCallSession(AsyncSession):
    """An `AsyncSession` whose every call runs in a savepoint of its own.

    The savepoint is released when the call succeeds and rolled back when it fails, so a call
    takes effect by itself and a failed one leaves the transaction usable: inside a
    transaction, what an autocommit session guarantees.
    """

    _in_call = False  # scalar() and scalars() call execute(): one savepoint is enough

    async def execute(self, *args: Any, **kwargs: Any) -> Any:
        return await self._alone(super().execute, *args, **kwargs)

    async def scalar(self, *args: Any, **kwargs: Any) -> Any:
        return await self._alone(super().scalar, *args, **kwargs)

    async def scalars(self, *args: Any, **kwargs: Any) -> Any:
        return await self._alone(super().scalars, *args, **kwargs)

    async def get(self, *args: Any, **kwargs: Any) -> Any:
        return await self._alone(super().get, *args, **kwargs)

    async def get_one(self, *args: Any, **kwargs: Any) -> Any:
        return await self._alone(super().get_one, *args, **kwargs)

    async def run_sync(self, *args: Any, **kwargs: Any) -> Any:
        return await self._alone(super().run_sync, *args, **kwargs)

    async def _alone(self, call: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any) -> Any:
        if self._in_call:
            return await call(*args, **kwargs)
        self._in_call = True
        try:
            async with self.begin_nested():
                return await call(*args, **kwargs)
        finally:
            self._in_call = False


async def _keep_what_succeeded(session: AsyncSession) -> None:
    # Each statement already succeeded or was undone by itself; release the session's own
    # savepoint so what succeeded stays, as it would without a transaction.
    transaction = session.get_transaction()
    if transaction is not None and transaction.is_active:
        await session.commit()
