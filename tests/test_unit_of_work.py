"""What a caller can do inside one atomic unit of work (`store.session()`), and what it gets.

A unit is one transaction on one server connection. Repository calls (`TaskRepo`, `UserRepo`)
and the caller's own use of the yielded `AsyncSession` (ORM objects, `select`, `text`,
`session.connection()`) share it: each sees the other's changes, and all of it commits when
the block returns, or none of it when the block raises. Pinned here as well:

- the caller's own `commit()`, `rollback()` and `begin_nested()` inside the block;
- `in_transaction()`, `session.connection()` and `consistency_token` after repository calls;
- units bound to a user (row-level security) for repository calls and ORM queries alike;
- what leaving the block does after an error the caller caught (without a savepoint).

Everything runs against the real database, the important cases directly and through
PgBouncer (`served_store`). What a unit committed is read back over a connection of its own
(plain asyncpg), never through the store being tested.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest
import pytest_asyncio
from conftest import granted_role
from sqlalchemy import event, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import InvalidRequestError, PendingRollbackError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from todo_store import (
    AccessRefused,
    CommitOutcomeUnknown,
    DatabaseError,
    EmailTaken,
    Settings,
    Task,
    TaskNotFound,
    TaskRepo,
    TodoStore,
    User,
    UserNotFound,
    UserRepo,
    consistency_token,
)
from todo_store.testing.plugin import settings_for, start_pgbouncer
from todo_store.testing.postgres import ProvisionedServer
from todo_store.units import DIRECT_SUPPORTED

NEVER_ISSUED_ID = 2**63 - 1  # a valid bigint no task will ever get
XID_MODULUS = 2**32  # txid_current() carries an epoch above the 32-bit xid that xmin holds
TRANSACTION_ABORTED = "25P02"  # in_failed_sql_transaction

Work = Callable[[AsyncSession, str], Awaitable[Any]]


# -- reading back what was committed, outside the store under test -----------------------------


async def _fetch(url: str, query: str, *args: Any) -> list[asyncpg.Record]:
    connection = await asyncpg.connect(url)
    try:
        return await connection.fetch(query, *args)
    finally:
        await connection.close()


async def _committed_titles(url: str, user_id: str) -> list[str]:
    rows = await _fetch(url, "SELECT title FROM tasks WHERE user_id = $1 ORDER BY id", user_id)
    return [row["title"] for row in rows]


async def _committed_users(url: str, prefix: str) -> list[str]:
    rows = await _fetch(url, "SELECT id FROM users WHERE starts_with(id, $1) ORDER BY id", prefix)
    return [row["id"] for row in rows]


@pytest.fixture
def database_url(todo_store_settings: Settings) -> str:
    """The test database, as the superuser: reads back every user's committed rows."""
    return todo_store_settings.database_url.get_secret_value()


@pytest_asyncio.fixture(loop_scope="session")
async def owner(store: TodoStore, new_user_id: str, database_url: str) -> AsyncIterator[str]:
    """A committed user without tasks. Afterwards it is deleted with every user whose id it
    prefixes (those a test makes from it), and by the cascade all their tasks."""
    async with store.session() as session:
        await UserRepo(session).upsert(new_user_id, email=f"{new_user_id}@example.com", name="O")
    try:
        yield new_user_id
    finally:
        await _fetch(database_url, "DELETE FROM users WHERE starts_with(id, $1)", new_user_id)


def _ghost(owner: str) -> str:
    """A user id that is never created: writes for it fail on the foreign key."""
    return f"{owner}_ghost"


# -- 1. repository calls and the ORM in one unit ------------------------------------------------


async def _orm_get(session: AsyncSession, task_id: int) -> Task | None:
    return await session.get(Task, task_id)


async def _orm_select(session: AsyncSession, task_id: int) -> Task | None:
    result = await session.execute(select(Task).where(Task.id == task_id))
    return result.scalar_one_or_none()


@pytest.mark.parametrize("orm_read", [_orm_get, _orm_select], ids=["session.get", "select"])
async def test_repository_calls_and_orm_work_see_each_other_and_commit_together(
    served_store: TodoStore,
    owner: str,
    database_url: str,
    orm_read: Callable[[AsyncSession, int], Awaitable[Task | None]],
) -> None:
    async with served_store.session() as session:
        tasks = TaskRepo(session)
        created = await tasks.create(owner, title="by repository")
        loaded = await orm_read(session, created.id)
        assert loaded is not None
        assert (loaded.id, loaded.user_id, loaded.title, loaded.version) == (
            created.id,
            owner,
            "by repository",
            1,
        )
        loaded.title = "edited through the ORM"
        session.add(Task(user_id=owner, title="added through the ORM"))
        listed = await tasks.list_for(owner)
        assert [task.title for task in listed] == [
            "added through the ORM",
            "edited through the ORM",
        ]
        await tasks.create(owner, title="second by repository")
        seen = await session.execute(
            select(Task.title).where(Task.user_id == owner).order_by(Task.id)
        )
        assert seen.scalars().all() == [
            "edited through the ORM",
            "added through the ORM",
            "second by repository",
        ]
        assert await _committed_titles(database_url, owner) == []  # nothing before the end

    assert await _committed_titles(database_url, owner) == [
        "edited through the ORM",
        "added through the ORM",
        "second by repository",
    ]


async def test_orm_queries_do_not_flush_pending_objects_and_repository_calls_do(
    served_store: TodoStore, owner: str, database_url: str
) -> None:
    # The units' sessions do not autoflush: an ORM query runs without the pending object,
    # a repository call flushes it first (so its statement sees it).
    async with served_store.session() as session:
        pending = Task(user_id=owner, title="pending")
        session.add(pending)
        orm_seen = await session.execute(select(Task).where(Task.user_id == owner))
        assert orm_seen.scalars().all() == []
        assert pending in session.new

        assert await TaskRepo(session).count_for(owner) == 1
        assert not session.new
        orm_seen = await session.execute(select(Task).where(Task.user_id == owner))
        assert orm_seen.scalars().all() == [pending]

    assert await _committed_titles(database_url, owner) == ["pending"]


async def test_a_repository_write_leaves_a_loaded_orm_object_as_it_was_loaded(
    served_store: TodoStore, owner: str, database_url: str
) -> None:
    async with served_store.session() as session:
        tasks = TaskRepo(session)
        created = await tasks.create(owner, title="as loaded")
        loaded = await session.get(Task, created.id)
        assert loaded is not None

        written = await tasks.update(owner, created.id, title="as written")

        assert (written.title, written.version) == ("as written", 2)
        assert await session.get(Task, created.id) is loaded  # from the identity map
        assert (loaded.title, loaded.version) == ("as loaded", 1)
        await session.refresh(loaded)
        assert (loaded.title, loaded.version) == ("as written", 2)

    assert await _committed_titles(database_url, owner) == ["as written"]


# -- 2. ORM first, then a repository call ---------------------------------------------------------


async def _listed_titles(session: AsyncSession, owner: str) -> list[str]:
    return [task.title for task in await TaskRepo(session).list_for(owner)]


async def _counted(session: AsyncSession, owner: str) -> int:
    return await TaskRepo(session).count_for(owner)


async def _completed(session: AsyncSession, owner: str) -> int:
    return await TaskRepo(session).complete_all(owner)


@pytest.mark.parametrize(
    ("call", "expected", "committed_done"),
    [
        pytest.param(_listed_titles, ["pending"], False, id="TaskRepo.list_for"),
        pytest.param(_counted, 1, False, id="TaskRepo.count_for"),
        pytest.param(_completed, 1, True, id="TaskRepo.complete_all"),
    ],
)
async def test_a_pending_orm_task_is_flushed_before_a_repository_call_and_commits(  # noqa: PLR0917 - fixtures
    served_store: TodoStore,
    owner: str,
    database_url: str,
    call: Work,
    expected: object,
    committed_done: bool,
) -> None:
    async with served_store.session() as session:
        pending = Task(user_id=owner, title="pending")
        session.add(pending)

        assert await call(session, owner) == expected

        assert not session.new
        assert (await TaskRepo(session).get(owner, pending.id)).title == "pending"

    rows = await _fetch(database_url, "SELECT id, completed FROM tasks WHERE user_id = $1", owner)
    assert [(row["id"], row["completed"]) for row in rows] == [(pending.id, committed_done)]


async def test_a_pending_orm_user_is_flushed_before_a_user_repository_call_and_commits(
    served_store: TodoStore, owner: str, database_url: str
) -> None:
    newcomer = f"{owner}_new"
    async with served_store.session() as session:
        session.add(User(id=newcomer, email=f"{newcomer}@example.com", name="Pending"))

        found = await UserRepo(session).get_by_email(f"{newcomer}@EXAMPLE.com")
        assert found.id == newcomer
        # Its row is in the transaction: the task's foreign key finds it.
        await TaskRepo(session).create(newcomer, title="for the pending user")

    assert await _committed_users(database_url, newcomer) == [newcomer]
    assert await _committed_titles(database_url, newcomer) == ["for the pending user"]


# -- 3. a block that raises ------------------------------------------------------------------------


class CallerGaveUp(Exception):
    """The caller's own exception, raised from inside the block."""


async def _caller_raises(_session: AsyncSession, _owner: str) -> None:
    raise CallerGaveUp("the caller gave up")


async def _repository_raises(session: AsyncSession, owner: str) -> None:
    await TaskRepo(session).get(owner, NEVER_ISSUED_ID)


async def _database_raises(session: AsyncSession, owner: str) -> None:
    await TaskRepo(session).create(_ghost(owner), title="never")


@pytest.mark.parametrize(
    ("failure", "expected"),
    [
        pytest.param(_caller_raises, CallerGaveUp, id="the-callers-own-exception"),
        pytest.param(_repository_raises, TaskNotFound, id="TaskNotFound-from-a-repository"),
        pytest.param(_database_raises, UserNotFound, id="UserNotFound-from-the-database"),
    ],
)
async def test_a_unit_that_raises_writes_nothing_and_its_exception_leaves_unchanged(
    served_store: TodoStore,
    owner: str,
    database_url: str,
    failure: Work,
    expected: type[Exception],
) -> None:
    newcomer = f"{owner}_new"
    raised: list[Exception] = []

    async def unit_of_work() -> None:
        async with served_store.session() as session:
            tasks = TaskRepo(session)
            await UserRepo(session).upsert(newcomer, email=f"{newcomer}@example.com", name="N")
            first = await tasks.create(owner, title="repository write")
            await tasks.toggle(owner, first.id)
            loaded = await session.get(Task, first.id)
            assert loaded is not None
            loaded.title = "flushed ORM edit"
            session.add(Task(user_id=owner, title="flushed ORM insert"))
            await session.flush()
            session.add(Task(user_id=newcomer, title="pending ORM insert"))
            try:
                await failure(session, owner)
            except Exception as error:
                raised.append(error)
                raise

    with pytest.raises(expected) as caught:
        await unit_of_work()

    assert raised
    assert caught.value is raised[0]
    assert await _committed_titles(database_url, owner) == []
    assert await _committed_users(database_url, newcomer) == []


# -- 4, 5. the caller's own commit and rollback inside the block ----------------------------------


async def test_a_commit_inside_a_unit_that_then_raises_keeps_only_what_came_before_it(
    served_store: TodoStore, owner: str, database_url: str
) -> None:
    async def unit_of_work() -> None:
        async with served_store.session() as session:
            tasks = TaskRepo(session)
            await tasks.create(owner, title="before the commit")
            await session.commit()
            assert not session.in_transaction()
            await tasks.create(owner, title="after the commit")
            raise CallerGaveUp

    with pytest.raises(CallerGaveUp):
        await unit_of_work()

    assert await _committed_titles(database_url, owner) == ["before the commit"]


async def test_a_commit_inside_a_unit_that_returns_keeps_both_sides_and_yields_a_token(
    served_store: TodoStore, owner: str, database_url: str
) -> None:
    async with served_store.session() as session:
        tasks = TaskRepo(session)
        await tasks.create(owner, title="before the commit")
        await session.commit()
        await tasks.create(owner, title="after the commit")

    assert await _committed_titles(database_url, owner) == ["before the commit", "after the commit"]
    assert consistency_token(session)


async def test_a_rollback_inside_a_unit_drops_what_came_before_it_and_later_writes_commit(
    served_store: TodoStore, owner: str, database_url: str
) -> None:
    async with served_store.session() as session:
        tasks = TaskRepo(session)
        dropped = await tasks.create(owner, title="rolled back")
        await session.rollback()
        assert not session.in_transaction()
        with pytest.raises(TaskNotFound):
            await tasks.get(owner, dropped.id)
        await tasks.create(owner, title="after the rollback")

    assert await _committed_titles(database_url, owner) == ["after the rollback"]


async def _commit_last(session: AsyncSession, owner: str) -> None:
    await TaskRepo(session).create(owner, title="kept")
    await session.commit()


async def _rollback_last(session: AsyncSession, owner: str) -> None:
    await TaskRepo(session).create(owner, title="dropped")
    await session.rollback()


async def _explicit_begin_block(session: AsyncSession, owner: str) -> None:
    async with session.begin():
        await TaskRepo(session).create(owner, title="kept")


@pytest.mark.parametrize(
    ("work", "committed"),
    [
        pytest.param(_commit_last, ["kept"], id="session.commit"),
        pytest.param(_rollback_last, [], id="session.rollback"),
        pytest.param(_explicit_begin_block, ["kept"], id="async-with-session.begin"),
    ],
)
async def test_a_unit_may_end_with_the_callers_own_commit_or_rollback(
    served_store: TodoStore, owner: str, database_url: str, work: Work, committed: list[str]
) -> None:
    async with served_store.session() as session:
        await work(session, owner)
    assert await _committed_titles(database_url, owner) == committed


# -- 6. a savepoint around a call that fails -------------------------------------------------------


async def _create_for_missing_user(session: AsyncSession, owner: str) -> None:
    await TaskRepo(session).create(_ghost(owner), title="for nobody")


async def _upsert_taken_email(session: AsyncSession, owner: str) -> None:
    await UserRepo(session).upsert(_ghost(owner), email=f"{owner}@example.com", name="Twin")


async def _in_savepoint(session: AsyncSession, owner: str, failing: Work) -> None:
    async with session.begin_nested():
        await TaskRepo(session).create(owner, title="inside the failed savepoint")
        await failing(session, owner)


@pytest.mark.parametrize(
    ("failing", "expected"),
    [
        pytest.param(_create_for_missing_user, UserNotFound, id="TaskRepo.create-UserNotFound"),
        pytest.param(_upsert_taken_email, EmailTaken, id="UserRepo.upsert-EmailTaken"),
    ],
)
async def test_a_failed_call_inside_begin_nested_leaves_the_rest_of_the_unit_to_commit(
    served_store: TodoStore,
    owner: str,
    database_url: str,
    failing: Work,
    expected: type[Exception],
) -> None:
    async with served_store.session() as session:
        tasks = TaskRepo(session)
        await tasks.create(owner, title="before the savepoint")
        with pytest.raises(expected):
            await _in_savepoint(session, owner, failing)
        assert session.in_transaction()
        assert [task.title for task in await tasks.list_for(owner)] == ["before the savepoint"]
        await tasks.create(owner, title="after the savepoint")

    assert await _committed_titles(database_url, owner) == [
        "before the savepoint",
        "after the savepoint",
    ]
    assert await _committed_users(database_url, _ghost(owner)) == []
    assert await _committed_titles(database_url, _ghost(owner)) == []


# -- 7. the transaction and connection the session reports -----------------------------------------


async def _shares_the_units_transaction(
    session: AsyncSession, connection: AsyncConnection, owner: str, database_url: str
) -> None:
    """Repository calls and `connection` see each other's uncommitted writes; nobody else
    sees them."""
    tasks = TaskRepo(session)
    created = await tasks.create(owner, title="uncommitted")
    assert session.in_transaction()
    by_id = text("SELECT title FROM tasks WHERE id = :id")
    assert await connection.scalar(by_id, {"id": created.id}) == "uncommitted"
    await connection.execute(
        text("UPDATE tasks SET title = 'through the connection' WHERE id = :id"),
        {"id": created.id},
    )
    assert (await tasks.get(owner, created.id)).title == "through the connection"
    assert await _committed_titles(database_url, owner) == []


async def test_after_a_repository_call_the_unit_is_in_a_transaction_its_connection_shares(
    served_store: TodoStore, owner: str, database_url: str
) -> None:
    async with served_store.session() as session:
        assert not session.in_transaction()  # nothing has begun before the first statement
        await TaskRepo(session).count_for(owner)
        assert session.in_transaction()
        connection = await session.connection()
        await _shares_the_units_transaction(session, connection, owner, database_url)

    assert await _committed_titles(database_url, owner) == ["through the connection"]


async def test_the_connection_taken_before_any_repository_call_shares_its_transaction(
    served_store: TodoStore, owner: str, database_url: str
) -> None:
    async with served_store.session() as session:
        connection = await session.connection()
        assert session.in_transaction()
        await _shares_the_units_transaction(session, connection, owner, database_url)

    assert await _committed_titles(database_url, owner) == ["through the connection"]


async def test_after_a_repository_call_session_begin_is_refused_and_the_unit_goes_on(
    served_store: TodoStore, owner: str, database_url: str
) -> None:
    async with served_store.session() as session:
        tasks = TaskRepo(session)
        await tasks.create(owner, title="before begin")
        with pytest.raises(InvalidRequestError, match="already begun"):
            await session.begin()
        await tasks.create(owner, title="after begin")

    assert await _committed_titles(database_url, owner) == ["before begin", "after begin"]


# -- 8. consistency tokens -------------------------------------------------------------------------


async def _repository_writes(session: AsyncSession, owner: str) -> None:
    created = await TaskRepo(session).create(owner, title="written")
    await TaskRepo(session).toggle(owner, created.id)


async def _orm_write_flushed(session: AsyncSession, owner: str) -> None:
    session.add(Task(user_id=owner, title="written"))
    await session.flush()


async def _orm_write_left_pending(session: AsyncSession, owner: str) -> None:
    session.add(Task(user_id=owner, title="written"))  # flushed by the unit's commit


async def _repository_and_orm_writes(session: AsyncSession, owner: str) -> None:
    await TaskRepo(session).create(owner, title="written")
    session.add(Task(user_id=owner, title="written too"))


async def _repository_reads(session: AsyncSession, owner: str) -> None:
    await TaskRepo(session).list_for(owner)
    await TaskRepo(session).count_for(owner)
    await UserRepo(session).get(owner)


async def _orm_reads(session: AsyncSession, owner: str) -> None:
    await session.get(Task, NEVER_ISSUED_ID)
    await session.execute(select(Task).where(Task.user_id == owner))


async def _nothing(_session: AsyncSession, _owner: str) -> None:
    pass


@pytest.mark.parametrize(
    "work",
    [
        pytest.param(_repository_writes, id="repository-writes"),
        pytest.param(_orm_write_flushed, id="orm-write-flushed-in-the-block"),
        pytest.param(_repository_and_orm_writes, id="repository-and-orm-writes"),
        pytest.param(
            _orm_write_left_pending,
            id="orm-write-flushed-by-the-commit",
        ),
    ],
)
async def test_a_unit_that_wrote_has_a_consistency_token_that_reads_its_writes(
    served_store: TodoStore, owner: str, database_url: str, work: Work
) -> None:
    async with served_store.session() as session:
        await work(session, owner)
        with pytest.raises(ValueError, match="not committed yet"):
            consistency_token(session)

    token = consistency_token(session)
    assert isinstance(token, str)
    assert token
    committed = await _committed_titles(database_url, owner)
    assert committed
    async with served_store.session(read_only=True, after=token) as reader:
        assert await TaskRepo(reader).count_for(owner) == len(committed)


@pytest.mark.parametrize(
    "work",
    [_repository_reads, _orm_reads, _nothing],
    ids=["repository-reads", "orm-reads", "no-statement"],
)
async def test_a_unit_that_only_read_has_no_consistency_token(
    served_store: TodoStore, owner: str, work: Work
) -> None:
    async with served_store.session() as session:
        await work(session, owner)

    assert consistency_token(session) is None


# -- 9. a unit bound to a user ---------------------------------------------------------------------


@pytest_asyncio.fixture(
    loop_scope="session",
    params=["direct", pytest.param("pgbouncer", marks=pytest.mark.pgbouncer)],
)
async def runtime_store(
    request: pytest.FixtureRequest,
    todo_store_server: ProvisionedServer,
    database_url: str,
) -> AsyncIterator[TodoStore]:
    """A store whose role row-level security applies to (granted as `todo-store grant`
    does), directly and through a PgBouncer that logs in as that role."""
    async with granted_role(todo_store_server, database_url) as role_url:
        bouncer = None
        target = role_url
        if request.param == "pgbouncer":
            role = make_url(role_url).username or ""
            as_role = dataclasses.replace(todo_store_server, user=role, password=None)
            bouncer = start_pgbouncer(as_role, make_url(database_url).database or "")
            target = bouncer.url
        try:
            async with TodoStore(settings_for(target)) as runtime:
                yield runtime
        finally:
            if bouncer is not None:
                bouncer.stop()


@dataclass(frozen=True)
class Pair:
    """Two committed users: ada with two tasks, bob with one."""

    ada: str
    bob: str
    ada_tasks: list[int]
    bob_task: int


@pytest_asyncio.fixture(loop_scope="session")
async def pair(store: TodoStore, owner: str) -> Pair:
    ada, bob = owner, f"{owner}_bob"
    async with store.session() as session:
        tasks = TaskRepo(session)
        await UserRepo(session).upsert(bob, email=f"{bob}@example.com", name="Bob")
        ada_tasks = [(await tasks.create(ada, title=f"ada {n}")).id for n in range(2)]
        bob_task = (await tasks.create(bob, title="bob 0")).id
    return Pair(ada, bob, ada_tasks, bob_task)


async def test_a_bound_unit_shows_repository_calls_and_orm_queries_only_its_users_rows(
    runtime_store: TodoStore, pair: Pair, database_url: str
) -> None:
    ada, bob = pair.ada, pair.bob
    async with runtime_store.session(user_id=ada) as session:
        tasks = TaskRepo(session)
        assert sorted(task.id for task in await tasks.list_for(ada)) == pair.ada_tasks
        assert await tasks.list_for(bob) == []
        assert await tasks.count_for(bob) == 0
        with pytest.raises(UserNotFound):
            await UserRepo(session).get(bob)

        orm_tasks = (await session.execute(select(Task).order_by(Task.id))).scalars().all()
        assert [task.id for task in orm_tasks] == pair.ada_tasks
        assert await session.get(Task, pair.bob_task) is None
        orm_users = (await session.execute(select(User.id))).scalars().all()
        assert orm_users == [ada]

        await tasks.create(ada, title="bound repository write")
        session.add(Task(user_id=ada, title="bound ORM write"))
        assert await tasks.count_for(ada) == 4
        titles = await session.execute(select(Task.title).order_by(Task.id))
        assert titles.scalars().all() == [
            "ada 0",
            "ada 1",
            "bound repository write",
            "bound ORM write",
        ]

    assert await _committed_titles(database_url, ada) == [
        "ada 0",
        "ada 1",
        "bound repository write",
        "bound ORM write",
    ]
    assert await _committed_titles(database_url, bob) == ["bob 0"]


async def _repository_write_for(session: AsyncSession, user_id: str) -> None:
    await TaskRepo(session).create(user_id, title="planted")


async def _orm_write_for(session: AsyncSession, user_id: str) -> None:
    session.add(Task(user_id=user_id, title="planted"))
    await session.flush()


@pytest.mark.parametrize(
    "write", [_repository_write_for, _orm_write_for], ids=["repository", "orm-flush"]
)
async def test_a_bound_unit_refuses_a_write_for_another_user_and_keeps_its_own(
    runtime_store: TodoStore, pair: Pair, database_url: str, write: Work
) -> None:
    async with runtime_store.session(user_id=pair.ada) as session:
        await TaskRepo(session).create(pair.ada, title="own")
        with pytest.raises(AccessRefused):
            async with session.begin_nested():
                await write(session, pair.bob)

    assert await _committed_titles(database_url, pair.ada) == ["ada 0", "ada 1", "own"]
    assert await _committed_titles(database_url, pair.bob) == ["bob 0"]


# -- 10. one transaction on one server connection --------------------------------------------------


async def test_repository_calls_in_a_unit_run_in_one_transaction_on_one_server_connection(
    served_store: TodoStore, owner: str
) -> None:
    probe = text("SELECT pg_backend_pid(), txid_current() % :modulus")
    row_versions = text("SELECT xmin::text::bigint FROM tasks WHERE user_id = :owner")
    async with served_store.session() as session:
        tasks = TaskRepo(session)
        first = await tasks.create(owner, title="first")  # the unit's first statement
        pid, xid = (await session.execute(probe, {"modulus": XID_MODULUS})).one()
        await tasks.create(owner, title="second")
        await tasks.toggle(owner, first.id)
        pid_at_end, xid_at_end = (await session.execute(probe, {"modulus": XID_MODULUS})).one()
        # Every row version the repository calls wrote carries the transaction's id.
        writers = (await session.execute(row_versions, {"owner": owner})).scalars().all()

    assert pid_at_end == pid
    assert xid_at_end == xid
    assert writers == [xid, xid]


# -- 11. an error caught inside the block, without a savepoint -------------------------------------


async def test_a_database_error_caught_in_the_block_leaves_it_quietly_with_nothing_committed(
    served_store: TodoStore, owner: str, database_url: str
) -> None:
    # The server aborted the transaction at the error; the COMMIT that leaving the block sends
    # then ends it as a rollback, and no error reaches the caller.
    async with served_store.session() as session:
        tasks = TaskRepo(session)
        await tasks.create(owner, title="before the error")
        with pytest.raises(UserNotFound):
            await tasks.create(_ghost(owner), title="never")
        assert session.in_transaction()

    assert await _committed_titles(database_url, owner) == []


async def _text_select(session: AsyncSession, _owner: str) -> None:
    await session.execute(text("SELECT 1"))


async def _orm_get_task(session: AsyncSession, _owner: str) -> None:
    await session.get(Task, NEVER_ISSUED_ID)


@pytest.mark.parametrize(
    "after",
    [_counted, _repository_writes, _orm_get_task, _orm_write_for, _text_select],
    ids=["repository-read", "repository-write", "orm-get", "orm-flush", "text"],
)
async def test_a_statement_after_a_caught_database_error_raises_transaction_aborted(
    served_store: TodoStore, owner: str, database_url: str, after: Work
) -> None:
    async def unit_of_work() -> None:
        async with served_store.session() as session:
            tasks = TaskRepo(session)
            await tasks.create(owner, title="before the error")
            with pytest.raises(UserNotFound):
                await tasks.create(_ghost(owner), title="never")
            await after(session, owner)

    with pytest.raises(DatabaseError) as caught:
        await unit_of_work()

    assert type(caught.value) is DatabaseError
    assert caught.value.sqlstate == TRANSACTION_ABORTED
    assert await _committed_titles(database_url, owner) == []


async def _flush(session: AsyncSession, _owner: str) -> None:
    await session.flush()


@pytest.mark.parametrize(
    "flushing", [_flush, _counted], ids=["session.flush", "a-repository-calls-flush"]
)
async def test_a_caught_flush_error_makes_leaving_the_block_raise_pending_rollback(
    served_store: TodoStore, owner: str, database_url: str, flushing: Work
) -> None:
    async def unit_of_work() -> None:
        async with served_store.session() as session:
            await TaskRepo(session).create(owner, title="before the failed flush")
            session.add(Task(user_id=_ghost(owner), title="never"))
            with pytest.raises(UserNotFound):
                await flushing(session, owner)

    with pytest.raises(PendingRollbackError):
        await unit_of_work()

    assert await _committed_titles(database_url, owner) == []


async def test_a_repository_call_after_a_caught_flush_error_raises_pending_rollback(
    served_store: TodoStore, owner: str, database_url: str
) -> None:
    async def unit_of_work() -> None:
        async with served_store.session() as session:
            tasks = TaskRepo(session)
            await tasks.create(owner, title="before the failed flush")
            session.add(Task(user_id=_ghost(owner), title="never"))
            with pytest.raises(UserNotFound):
                await session.flush()
            with pytest.raises(PendingRollbackError):
                await tasks.count_for(owner)

    with pytest.raises(PendingRollbackError):  # and leaving the block says so again
        await unit_of_work()

    assert await _committed_titles(database_url, owner) == []


# -- repository calls leave the ORM session alone, and listeners still see them ----------------


async def test_repository_calls_leave_the_orm_session_unbegun_until_the_orm_is_used(
    served_store: TodoStore, owner: str
) -> None:
    async with served_store.session() as session:
        task = await TaskRepo(session).create(owner, title="direct")
        assert await TaskRepo(session).get(owner, task.id) == task
        assert session.in_transaction()
        # The calls ran on the unit's connection without the ORM session's bookkeeping.
        assert session.sync_session.get_transaction() is None
        loaded = await session.get(Task, task.id)
        assert loaded is not None
        assert loaded.title == "direct"
        assert session.sync_session.get_transaction() is not None


async def test_a_statement_listener_sees_every_repository_statement_of_a_unit(
    served_store: TodoStore, owner: str, database_url: str
) -> None:
    seen: list[str] = []

    def listener(*args: Any) -> None:
        seen.append(args[2].split(None, 1)[0])  # the statement's first word

    engine = served_store.engine.sync_engine
    event.listen(engine, "before_cursor_execute", listener)
    try:
        async with served_store.session() as session:
            task = await TaskRepo(session).create(owner, title="seen")
            await TaskRepo(session).get(owner, task.id)
            await TaskRepo(session).count_for(owner)
            assert session.sync_session.get_transaction() is None
    finally:
        event.remove(engine, "before_cursor_execute", listener)
    assert seen == ["INSERT", "SELECT", "SELECT"]
    assert await _committed_titles(database_url, owner) == ["seen"]


def test_this_sqlalchemy_lets_units_send_statements_directly() -> None:
    # Where a SQLAlchemy lacks what it needs, units fall back to Connection.execute: correct,
    # but slower; every admitted version must keep the direct path.
    assert DIRECT_SUPPORTED


async def test_repository_statements_of_a_unit_bypass_connection_execute_unless_listened_to(
    served_store: TodoStore, owner: str
) -> None:
    engine = served_store.engine.sync_engine
    # Connection.execute compiles through the engine's cache (SQLAlchemy's own, private); a
    # statement sent directly is compiled once by the unit and never reaches it.
    compiled_cache = engine._compiled_cache
    assert compiled_cache is not None
    cached = len(compiled_cache)
    async with served_store.session() as session:
        assert await TaskRepo(session).count_for(owner) == 0
    assert len(compiled_cache) == cached

    executed: list[object] = []

    def before_execute(*args: Any) -> None:
        executed.append(args[1])

    event.listen(engine, "before_execute", before_execute)
    try:
        async with served_store.session() as session:
            assert await TaskRepo(session).count_for(owner) == 0
    finally:
        event.remove(engine, "before_execute", before_execute)
    assert len(executed) == 1  # with a listener, the statement went through Connection.execute
    assert len(compiled_cache) == cached + 1


async def test_a_units_repository_calls_hold_the_pool_connection_until_the_orm_needs_one(
    served_store: TodoStore, owner: str, database_url: str
) -> None:
    async with served_store.session() as session:
        task = await TaskRepo(session).create(owner, title="created")
    async with served_store.session() as session:
        await TaskRepo(session).update(owner, task.id, title="held")
        unit = session.unit  # type: ignore[attr-defined]
        # No SQLAlchemy Connection yet: the unit holds the pool's connection itself.
        assert unit.connection is None
        held = unit.pool_connection
        assert held is not None
        before = await session.scalar(text("SELECT txid_current()"))
        # The ORM's connection wraps the same pool connection, in the same transaction.
        assert unit.connection is not None
        assert unit.connection.connection is held
        assert unit.pool_connection is None
        await TaskRepo(session).toggle(owner, task.id)
        assert await session.scalar(text("SELECT txid_current()")) == before
    assert served_store.engine.pool.checkedout() == 0
    assert consistency_token(session) is not None  # the write before the ORM was used counts
    assert await _committed_titles(database_url, owner) == ["held"]
    assert (await _fetch(database_url, "SELECT completed FROM tasks WHERE id = $1", task.id))[0][0]


class Calls:
    """What an application's listeners on the engine's connection events saw."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def listen(self, engine: Any) -> None:
        for name in ("engine_connect", "begin", "commit", "rollback"):
            event.listen(engine, name, self._recorder(name))

    def _recorder(self, name: str) -> Callable[..., None]:
        def record(*_args: Any) -> None:
            self.seen.append(name)

        return record


async def test_an_applications_connection_listeners_see_every_unit_begin_and_end(
    served_store: TodoStore, owner: str, database_url: str
) -> None:
    calls = Calls()
    # A store of its own: listeners cannot be removed from the shared store's engine by name.
    async with TodoStore(served_store.settings) as store:
        async with store.session() as session:
            task = await TaskRepo(session).create(owner, title="created")
        calls.listen(store.engine.sync_engine)
        async with store.session() as session:
            await TaskRepo(session).update(owner, task.id, title="listened")
        assert calls.seen == ["engine_connect", "begin", "commit"]
        calls.seen.clear()

        async def unit_of_work() -> None:
            async with store.session() as session:
                await TaskRepo(session).update(owner, task.id, title="rolled back")
                raise CallerGaveUp

        with pytest.raises(CallerGaveUp):
            await unit_of_work()
        assert calls.seen == ["engine_connect", "begin", "rollback"]
    assert await _committed_titles(database_url, owner) == ["listened"]


@pytest.mark.parametrize("orm_used", [False, True], ids=["repository-calls-only", "orm-used"])
async def test_a_commit_that_loses_its_connection_is_outcome_unknown_however_the_unit_ran(
    store: TodoStore,
    owner: str,
    database_url: str,
    todo_store_server: ProvisionedServer,
    orm_used: bool,
) -> None:
    async with store.session() as session:
        task = await TaskRepo(session).create(owner, title="before")

    async def unit_of_work() -> None:
        async with store.session() as session:
            await TaskRepo(session).update(owner, task.id, title="lost")
            if orm_used:
                await session.execute(text("SELECT 1"))
            held = session.unit.connection is None  # type: ignore[attr-defined]
            assert held is not orm_used
            # The unit's server connection ends before the COMMIT is sent.
            await _fetch(
                todo_store_server.admin_url,
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = $1 AND state = 'idle in transaction'",
                make_url(database_url).database,
            )

    with pytest.raises(CommitOutcomeUnknown):
        await unit_of_work()
    assert store.engine.pool.checkedout() == 0
    assert await _committed_titles(database_url, owner) == ["before"]
    async with store.session() as session:  # the store goes on working
        assert await TaskRepo(session).get(owner, task.id) == task


async def test_concurrent_calls_on_one_unit_never_take_a_second_connection(
    served_store: TodoStore, owner: str
) -> None:
    async with served_store.session() as session:
        tasks = TaskRepo(session)
        first, second = await asyncio.gather(
            tasks.count_for(owner), tasks.count_for(owner), return_exceptions=True
        )
        assert first == 0
        # Refused while the first opens the unit's connection; once it is open, the calls
        # take turns on it. Never a second connection.
        if not (isinstance(second, InvalidRequestError) and "concurrent" in str(second)):
            assert second == 0
        assert served_store.engine.pool.checkedout() == 1
    assert served_store.engine.pool.checkedout() == 0


async def test_a_call_left_running_when_its_unit_ends_is_refused_and_returns_its_connection(
    served_store: TodoStore, owner: str
) -> None:
    async with served_store.session() as session:
        left_running = asyncio.ensure_future(TaskRepo(session).count_for(owner))
    # Whether it reached the pool before the unit ended or not, it may not run after it.
    with pytest.raises(InvalidRequestError, match="has ended"):
        await left_running
    assert served_store.engine.pool.checkedout() == 0


async def test_a_unit_refuses_work_after_its_block_has_ended(
    served_store: TodoStore, owner: str, database_url: str
) -> None:
    async with served_store.session() as session:
        await TaskRepo(session).create(owner, title="inside")
    with pytest.raises(InvalidRequestError, match="has ended"):
        await TaskRepo(session).create(owner, title="after")
    with pytest.raises(InvalidRequestError, match="has ended"):
        await session.execute(select(Task).where(Task.user_id == owner))
    assert served_store.engine.pool.checkedout() == 0
    assert await _committed_titles(database_url, owner) == ["inside"]
