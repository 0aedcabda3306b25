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

Where one connection cannot behave as production's many, the store stops at the misuse with
a `RuntimeError` that says what to do, rather than passing what production would fail:

- Units of work run one at a time on the test's connection. A unit opened by another task
  (`asyncio.gather` of requests to an ASGI app, a `TaskGroup`) waits until the open one ends,
  as a statement waits for a lock: concurrent requests work, one after another. If the wait
  outlasts the statement timeout (the open unit is waiting for the waiting one), it fails
  saying so rather than hang.
- A unit of work opened while the same task has one open is refused: in production it would
  run on a second connection, see none of the outer unit's uncommitted rows and wait for its
  locks, a deadlock the shared connection would hide. Pass the outer session down instead.
- Committing the test's connection itself (`await (await session.connection()).commit()`)
  is refused: it would commit the test's transaction, and its rows would outlive the test.
- A read-only unit stays read-only after `session.commit()`, as a real one does.

`store.engine` is the test engine: code that uses it directly, bypassing `session()`, is not
isolated. Tests that need real commits, real concurrency or real locks use the
`todo_store_database` marker (a database of the test's own) instead.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, async_sessionmaker

from todo_store.binding import CallByCallTransactions, unit_arguments
from todo_store.engine import TodoStore
from todo_store.replicas import without_position
from todo_store.settings import Settings
from todo_store.testing.isolation import bound_scope

_OTHER_LOOP = (
    "the todo_store fixture was set up on another event loop than the one running this code. "
    "pytest-asyncio runs fixtures on the loop that asyncio_default_fixture_loop_scope names "
    "and tests on the loop of asyncio_default_test_loop_scope (or "
    "@pytest.mark.asyncio(loop_scope=...)): give both the same scope (e.g. both 'session'), "
    "or set neither."
)
_NESTED = (
    "a unit of work is already open in this task. In production the inner one runs on a second "
    "connection: it sees none of the outer unit's uncommitted rows and waits for its locks "
    "(a deadlock if it touches the same rows); the todo_store fixture's one connection would "
    "hide that. Pass the outer session down instead of opening another unit of work, or open "
    "the second one after the first has ended; for code that really holds two at once, mark "
    "the test @pytest.mark.todo_store_database (a database of its own, real connections)."
)
_WAITED_TOO_LONG = (
    "waited {seconds:g} s for a unit of work of another task to end: the todo_store fixture "
    "runs units of work one at a time on the test's connection, and that one is still open "
    "(is it waiting for this task?). Units of work that must be open at the same time need "
    "real connections: mark the test @pytest.mark.todo_store_database."
)
_LEFT_OPEN = (
    "a unit of work was still open {seconds:g} s after the test ended (a task the test did not "
    "wait for): it was cancelled. Await every task that uses the store before the test returns."
)
_COMMIT_REFUSED = (
    "this connection holds the test's transaction, which the todo_store fixtures roll back after "
    "the test: committing it would keep its rows in the database for the next tests. Let the "
    "unit of work commit (leave the `async with store.session()` block, or session.commit()); "
    "for real commits mark the test @pytest.mark.todo_store_database."
)


class RolledBackConnection(AsyncConnection):
    """The connection that holds the test's transaction: `commit()` is refused.

    Units of work and `todo_store_session` are bound to it, so it is also what
    `await session.connection()` returns inside them.
    """

    async def commit(self) -> None:
        """Refused with `RuntimeError`: see `_COMMIT_REFUSED`."""
        raise RuntimeError(_COMMIT_REFUSED)


class _OneUnitAtATime:
    """Lets one task at a time hold a unit of work on the test's connection.

    Other tasks wait their turn (bounded by `wait_limit` seconds); the task that holds it may
    not open another.
    """

    def __init__(self, wait_limit: float) -> None:
        self.wait_limit = wait_limit
        self._lock = asyncio.Lock()
        self._holder: asyncio.Task[Any] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()  # holding or waiting

    def held_by_current_task(self) -> bool:
        return self._holder is not None and self._holder is asyncio.current_task()

    @asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        if self.held_by_current_task():
            raise RuntimeError(_NESTED)
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            try:
                async with asyncio.timeout(self.wait_limit):
                    await self._lock.acquire()
            except TimeoutError:
                raise RuntimeError(_WAITED_TOO_LONG.format(seconds=self.wait_limit)) from None
            self._holder = task
            try:
                yield
            finally:
                self._holder = None
                self._lock.release()
        finally:
            self._tasks.discard(task)

    async def drain(self) -> None:
        """Wait for every unit of work to end; cancel the ones still open after `wait_limit`
        and raise `RuntimeError` saying so."""
        if not self._lock.locked():
            return
        try:
            async with asyncio.timeout(self.wait_limit):
                async with self._lock:
                    return
        except TimeoutError:
            pass
        stragglers = list(self._tasks)
        for task in stragglers:
            task.cancel()
        await asyncio.gather(*stragglers, return_exceptions=True)
        raise RuntimeError(_LEFT_OPEN.format(seconds=self.wait_limit))


class IsolatedTodoStore(TodoStore):
    """A `TodoStore` on one connection whose transaction the test fixture rolls back."""

    def __init__(
        self,
        settings: Settings,
        engine: AsyncEngine,
        connection: AsyncConnection,
        *,
        wait_limit: float | None = None,
    ) -> None:
        """`connection` must be inside a transaction that its owner rolls back.

        `wait_limit`: seconds a unit of work waits for another task's to end (default: the
        settings' statement timeout, as long as a real statement would wait for a lock).
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
        self._units = _OneUnitAtATime(
            settings.statement_timeout if wait_limit is None else wait_limit
        )

    @asynccontextmanager
    async def session(
        self,
        *,
        atomic: bool = True,
        read_only: bool = False,
        user_id: str | None = None,
        after: str | None = None,
    ) -> AsyncIterator[AsyncSession]:
        """A unit of work inside the test's transaction; see the module docstring.

        `user_id`: bound to that user under row-level security (`testing.isolation.bound_scope`).
        `after=` is accepted and needs nothing: every unit sees the test's own writes.
        """
        bound = unit_arguments(atomic=atomic, read_only=read_only, user_id=user_id)
        if after is not None and not read_only:
            raise ValueError("after= needs read_only=True (writes always go to the primary)")
        if asyncio.get_running_loop() is not self._fixture_loop:
            raise RuntimeError(_OTHER_LOOP)
        async with self._units.turn():
            unit: AbstractAsyncContextManager[AsyncSession]
            if read_only:
                unit = self._read_only_unit()
            elif atomic:
                unit = self.sessionmaker.begin()
            else:
                unit = self._statement_unit()
            if bound is not None:
                unit = _bound(self.connection, bound, unit)
            async with unit as session:
                yield session
            if atomic and not read_only:
                # Every unit here sees the test's writes: no token is needed to read them.
                without_position(session)

    @asynccontextmanager
    async def _read_only_unit(self) -> AsyncIterator[AsyncSession]:
        async with self.sessionmaker() as session:
            # Every savepoint the session begins is made READ ONLY, also the ones after a
            # session.commit(): a real read-only unit's next transaction is read-only too.
            event.listen(session.sync_session, "after_begin", _make_read_only)
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
        """Round-trip to the database on the test's connection (also inside a unit of work,
        where a real store's ping would use a connection of its own)."""
        if self._units.held_by_current_task():
            await self.connection.execute(text("SELECT 1"))
            return
        async with self.session(atomic=False) as session:
            await session.execute(text("SELECT 1"))

    async def dispose(self) -> None:
        """Nothing: the fixture that made this store closes its connection after the test."""

    async def wait_for_units_of_work(self) -> None:
        """Wait until no unit of work is open, so the test's transaction can be rolled back.

        Called by the fixture after the test. Units still open after the wait limit (a task
        the test never awaited) are cancelled, and `RuntimeError` says so.
        """
        await self._units.drain()


class CallByCallSession(CallByCallTransactions):
    """An `AsyncSession` whose every call runs in a savepoint of its own.

    The savepoint is released when the call succeeds and rolled back when it fails, so a call
    takes effect by itself and a failed one leaves the transaction usable: inside a
    transaction, what an autocommit session guarantees.
    """

    async def _one_call(
        self, call: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any
    ) -> Any:
        async with self.begin_nested():
            return await call(*args, **kwargs)


@asynccontextmanager
async def _bound(
    connection: AsyncConnection, user_id: str, unit: AbstractAsyncContextManager[AsyncSession]
) -> AsyncIterator[AsyncSession]:
    async with bound_scope(connection, user_id), unit as session:
        yield session


def _make_read_only(_session: Any, _transaction: Any, connection: Connection) -> None:
    connection.exec_driver_sql("SET TRANSACTION READ ONLY")


async def _keep_what_succeeded(session: AsyncSession) -> None:
    # Each statement already succeeded or was undone by itself; release the session's own
    # savepoint so what succeeded stays, as it would without a transaction.
    transaction = session.get_transaction()
    if transaction is not None and transaction.is_active:
        await session.commit()
