"""Error categories a caller can act on, each produced by a real server.

- serialization failure and deadlock are `TransactionConflict`, and `TodoStore.run` retries the
  whole unit of work on exactly that, never on anything else;
- a COMMIT that times out or loses its connection is `CommitOutcomeUnknown`, as is a write
  that commits by itself (`atomic=False`);
- a saturated pooler gives `DatabaseUnavailable` without discarding healthy connections;
- duplicate keys are `ConflictError`s; `SchemaNotReady` only for what a migration fixes;
- read-only units of work really are (`SHOW transaction_read_only`);
- no log line, even at DEBUG with `echo=True`, carries an email or a title.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest
import pytest_asyncio
from sqlalchemy import column, event, insert, table, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncSession

from todo_store import (
    CommitOutcomeUnknown,
    ConflictError,
    DatabaseError,
    DatabaseUnavailable,
    DuplicateKey,
    ReadOnlyViolation,
    SchemaNotReady,
    Settings,
    TaskRepo,
    TodoStore,
    TransactionConflict,
    User,
    UserRepo,
)
from todo_store.errors import translate
from todo_store.testing.plugin import settings_for, start_pgbouncer
from todo_store.testing.postgres import ProvisionedServer

WAIT_STEPS = 500
WAIT_STEP_S = 0.01
# A deferred constraint trigger runs at COMMIT (or at the end of an autocommit statement):
# it makes the commit itself slow, so a timeout or a lost connection hits the COMMIT.
SLOW_COMMIT_DDL = """
CREATE TABLE slow_commit (id int);
CREATE FUNCTION slow_commit_wait() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_sleep(3); RETURN NULL; END $$;
CREATE CONSTRAINT TRIGGER slow_commit_wait AFTER INSERT ON slow_commit
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit_wait();
"""


async def _user(session: AsyncSession) -> str:
    user_id = f"u_{uuid.uuid4().hex[:12]}"
    await UserRepo(session).upsert(user_id, email=f"{user_id}@example.com", name="Err")
    return user_id


@pytest_asyncio.fixture(loop_scope="session")
async def slow_commit_url(empty_database: str) -> AsyncIterator[str]:
    connection = await asyncpg.connect(empty_database)
    try:
        await connection.execute(SLOW_COMMIT_DDL)
    finally:
        await connection.close()
    yield empty_database


async def _rows(url: str) -> int:
    connection = await asyncpg.connect(url)
    try:
        return int(await connection.fetchval("SELECT count(*) FROM slow_commit"))
    finally:
        await connection.close()


# -- conflicts: the whole unit of work may be retried ------------------------------------------


async def _serialization_failure(store: TodoStore, user_id: str, task_id: int) -> None:
    """Runs a REPEATABLE READ unit that another unit overtakes: raises 40001."""
    async with store.session() as session:
        await session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
        await TaskRepo(session).get(user_id, task_id)  # the snapshot is taken here
        async with store.session() as other:
            await TaskRepo(other).toggle(user_id, task_id)
        await TaskRepo(session).toggle(user_id, task_id)


async def test_serialization_failure_is_a_transaction_conflict(store: TodoStore) -> None:
    async with store.session() as session:
        user_id = await _user(session)
        task = await TaskRepo(session).create(user_id, title="contended")
    with pytest.raises(TransactionConflict) as raised:
        await _serialization_failure(store, user_id, task.id)
    assert raised.value.sqlstate == "40001"


async def test_deadlock_is_a_transaction_conflict(store: TodoStore) -> None:
    async with store.session() as session:
        user_id = await _user(session)
        first = await TaskRepo(session).create(user_id, title="a")
        second = await TaskRepo(session).create(user_id, title="b")
    locked = [asyncio.Event(), asyncio.Event()]

    async def lock_in_order(mine: int, theirs: int, index: int) -> None:
        async with store.session() as session:
            await TaskRepo(session).toggle(user_id, mine)
            locked[index].set()
            await locked[1 - index].wait()
            await TaskRepo(session).toggle(user_id, theirs)

    outcomes = await asyncio.gather(
        lock_in_order(first.id, second.id, 0),
        lock_in_order(second.id, first.id, 1),
        return_exceptions=True,
    )
    conflicts = [o for o in outcomes if isinstance(o, TransactionConflict)]
    assert len(conflicts) == 1, outcomes
    assert conflicts[0].sqlstate == "40P01"
    assert outcomes.count(None) == 1


async def test_run_retries_the_whole_unit_on_a_conflict(store: TodoStore) -> None:
    async with store.session() as session:
        user_id = await _user(session)
        task = await TaskRepo(session).create(user_id, title="retried")
    attempts = 0

    async def work(session: AsyncSession) -> bool:
        nonlocal attempts
        attempts += 1
        await session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
        await TaskRepo(session).get(user_id, task.id)
        if attempts == 1:  # overtaken once, like a concurrent request would
            async with store.session() as other:
                await TaskRepo(other).toggle(user_id, task.id)
        return (await TaskRepo(session).toggle(user_id, task.id)).completed

    assert await store.run(work) is False  # toggled twice: once by "other", once by work
    assert attempts == 2

    attempts = 0
    with pytest.raises(TransactionConflict):
        await store.run(work, attempts=1)
    assert attempts == 1


async def test_run_never_retries_other_errors(todo_store_settings: Settings) -> None:
    attempts = 0

    async def slow(session: AsyncSession) -> None:
        nonlocal attempts
        attempts += 1
        await session.execute(text("SELECT pg_sleep(5)"))

    quick = todo_store_settings.model_copy(update={"statement_timeout": 0.2})
    async with TodoStore(quick) as store:
        with pytest.raises(DatabaseUnavailable):
            await store.run(slow, attempts=5)
    assert attempts == 1


# -- commits whose outcome is unknown -------------------------------------------------------------


async def test_commit_that_times_out_is_outcome_unknown(slow_commit_url: str) -> None:
    settings = settings_for(slow_commit_url).model_copy(update={"statement_timeout": 0.5})
    async with TodoStore(settings) as store:
        with pytest.raises(CommitOutcomeUnknown, match="may or may not"):
            async with store.session() as session:
                await session.execute(text("INSERT INTO slow_commit VALUES (1)"))
        assert store.engine.pool.checkedout() == 0  # type: ignore[attr-defined]
        async with store.session() as session:  # the store goes on working
            assert await session.scalar(text("SELECT 1")) == 1


async def test_commit_that_loses_its_connection_is_outcome_unknown(
    slow_commit_url: str, todo_store_server: ProvisionedServer
) -> None:
    async with TodoStore(settings_for(slow_commit_url)) as store:

        async def commit_slowly() -> None:
            async with store.session() as session:
                await session.execute(text("INSERT INTO slow_commit VALUES (1)"))

        committing = asyncio.create_task(commit_slowly())
        admin = await asyncpg.connect(todo_store_server.admin_url)
        try:
            for _ in range(WAIT_STEPS):  # until the server runs the COMMIT
                pid = await admin.fetchval(
                    "SELECT pid FROM pg_stat_activity"
                    " WHERE datname = $1 AND query LIKE 'COMMIT%' AND state = 'active'",
                    make_url(slow_commit_url).database,
                )
                if pid is not None:
                    break
                await asyncio.sleep(WAIT_STEP_S)
            assert pid is not None
            await admin.execute("SELECT pg_terminate_backend($1)", pid)
        finally:
            await admin.close()
        with pytest.raises(CommitOutcomeUnknown, match="was lost"):
            await committing


async def test_non_atomic_write_that_times_out_is_outcome_unknown(slow_commit_url: str) -> None:
    settings = settings_for(slow_commit_url).model_copy(update={"statement_timeout": 0.5})
    async with TodoStore(settings) as store:
        with pytest.raises(CommitOutcomeUnknown):
            async with store.session(atomic=False) as session:
                await session.execute(insert(table("slow_commit", column("id"))).values(id=2))
        # ...and a read that times out is only unavailable: nothing could have been written.
        with pytest.raises(DatabaseUnavailable):
            async with store.session(atomic=False) as session:
                await session.execute(text("SELECT pg_sleep(5)").columns())


async def test_commit_outcome_unknown_is_not_unavailable() -> None:
    # A caller that retries on DatabaseUnavailable must not repeat a write that may have happened.
    assert not issubclass(CommitOutcomeUnknown, DatabaseUnavailable)


# -- a saturated pooler ---------------------------------------------------------------------------


@pytest.mark.pgbouncer
async def test_saturated_pooler_is_unavailable_and_keeps_healthy_connections(
    todo_store_server: ProvisionedServer, todo_store_settings: Settings
) -> None:
    database = make_url(todo_store_settings.database_url.get_secret_value()).database or ""
    bouncer = start_pgbouncer(todo_store_server, database, pool_size=1)
    try:
        settings = settings_for(bouncer.url).model_copy(
            update={"statement_timeout": 0.5, "pool_size": 3, "max_overflow": 0}
        )
        async with TodoStore(settings) as store:
            connects = 0

            def count(*_args: object) -> None:
                nonlocal connects
                connects += 1

            event.listen(store.engine.sync_engine, "connect", count)
            await asyncio.gather(*(_hold_briefly(store) for _ in range(3)))  # 3 pooled
            assert connects == 3

            holder = await asyncpg.connect(bouncer.url, statement_cache_size=0)
            try:
                await holder.execute("BEGIN")  # takes PgBouncer's only server connection
                with pytest.raises(DatabaseUnavailable, match="timed out"):
                    async with store.session() as session:
                        await session.execute(text("SELECT 1"))
            finally:
                await holder.execute("ROLLBACK")
                await holder.close()

            await asyncio.gather(*(_hold_briefly(store) for _ in range(3)))
            assert connects == 4  # only the timed-out connection was replaced
    finally:
        bouncer.stop()


async def _hold_briefly(store: TodoStore) -> None:
    async with store.session() as session:
        await session.execute(text("SELECT 1"))


# -- categories -----------------------------------------------------------------------------------


async def test_duplicate_primary_key_is_a_conflict(session: AsyncSession) -> None:
    user_id = await _user(session)
    with pytest.raises(ConflictError) as raised:
        await session.execute(insert(User).values(id=user_id, email="other@example.com", name="X"))
    assert isinstance(raised.value, DuplicateKey)
    assert raised.value.constraint == "pk_users"


async def test_undefined_operator_is_not_schema_not_ready(session: AsyncSession) -> None:
    with pytest.raises(DatabaseError) as raised:
        await session.execute(text("SELECT 1 <-> 'a'::text"))
    assert raised.value.sqlstate == "42883"


async def test_missing_table_is_schema_not_ready(session: AsyncSession) -> None:
    with pytest.raises(SchemaNotReady, match="migrate"):
        await session.execute(text("SELECT * FROM no_such_table"))


@pytest.mark.parametrize("sqlstate", ["53100", "53200", "53400"])
def test_resource_exhaustion_is_not_transient(sqlstate: str) -> None:
    error = translate(sqlstate)
    assert type(error) is DatabaseError
    assert error.sqlstate == sqlstate


def test_too_many_connections_is_transient() -> None:
    assert isinstance(translate("53300"), DatabaseUnavailable)


# -- read-only units of work ----------------------------------------------------------------------


async def test_read_only_session_is_a_read_only_transaction(store: TodoStore) -> None:
    async with store.session(read_only=True) as session:
        assert await session.scalar(text("SHOW transaction_read_only")) == "on"
        with pytest.raises(ReadOnlyViolation) as raised:
            await UserRepo(session).upsert("u_ro", email="ro@example.com", name="RO")
    assert raised.value.sqlstate == "25006"
    assert "the unit of work is read-only" in str(raised.value)
    assert not isinstance(raised.value, DatabaseError)
    async with store.session() as session:  # the option does not stick to the connection
        assert await session.scalar(text("SHOW transaction_read_only")) == "off"


async def test_readonly_execution_option_is_honoured(store: TodoStore) -> None:
    async with store.session() as session:
        await session.connection(
            execution_options={"postgresql_readonly": True, "postgresql_deferrable": True}
        )
        assert await session.scalar(text("SHOW transaction_read_only")) == "on"
        assert await session.scalar(text("SHOW transaction_deferrable")) == "on"


async def test_read_only_needs_a_transaction(store: TodoStore) -> None:
    with pytest.raises(ValueError, match="read_only"):
        async with store.session(atomic=False, read_only=True):
            pass


# -- logs -----------------------------------------------------------------------------------------


async def test_no_log_line_carries_parameters_or_rows(
    todo_store_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    email = f"log-{uuid.uuid4().hex[:8]}@example.com"
    title = f"title-{uuid.uuid4().hex[:8]}"
    caplog.set_level(logging.DEBUG)
    store = TodoStore(todo_store_settings, echo="debug", echo_pool="debug")
    async with store, store.session() as session:
        user_id = f"u_{uuid.uuid4().hex[:12]}"
        await UserRepo(session).upsert(user_id, email=email, name="Logged")
        task = await TaskRepo(session).create(user_id, title=title)
        await TaskRepo(session).list_for(user_id)
        await UserRepo(session).get_by_email(email)
        await UserRepo(session).delete(user_id)
    assert task.title == title
    assert any("INSERT INTO tasks" in r.getMessage() for r in caplog.records)  # echo was on
    leaked = [r.getMessage() for r in caplog.records if email in r.getMessage()]
    leaked += [r.getMessage() for r in caplog.records if title in r.getMessage()]
    assert leaked == []
