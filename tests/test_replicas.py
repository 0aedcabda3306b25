"""Read replicas against a real streaming standby (`replica_cluster`), direct and through
PgBouncer.

A throwaway primary is started, migrated, and cloned with `pg_basebackup -R`; the standby's
replay is held back with `recovery_min_apply_delay` where a test needs lag. The claims:

- `session(read_only=True)` reads from the replica, everything else from the primary;
- read-your-writes: 1,000 writes, each read back at once with its token (always seen), and
  without it (the replica's lag shows), and an older write read back with its token (seen,
  from the replica once it has replayed it);
- producing a token and reading with one cost no extra round trip;
- a replica stopped and started again under load: 0 failed reads (`store.run(...,
  read_only=True)`), reads back on the replica after it recovers;
- a replica lagging past REPLICA_MAX_LAG is skipped with a log line and used again later;
- bad tokens: malformed (ValueError naming `after`), from another database
  (`ForeignConsistencyToken`), before any SQL;
- `doctor`: one line per replica.

Skipped, saying why, only where PostgreSQL's server programs are not installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass

import asyncpg
import pytest
import pytest_asyncio
from sqlalchemy.ext.asyncio import AsyncSession

from tests.rigs.proxy import RoundTripProxy
from tests.rigs.replica_cluster import (
    ReplicaCluster,
    ReplicaClusterUnavailable,
    replica_cluster,
)
from tests.rigs.secure_server import SecureServerUnavailable, _bindir
from todo_store import (
    DatabaseUnavailable,
    Settings,
    TaskNotFound,
    TaskRepo,
    TodoStore,
    UserRepo,
    migrations,
)
from todo_store.doctor import _replica_checks
from todo_store.replicas import (
    ConsistencyTokenUnavailable,
    ForeignConsistencyToken,
    Position,
    Replica,
    consistency_token,
    ran_on_replica,
)
from todo_store.testing.plugin import start_pgbouncer
from todo_store.testing.postgres import ProvisionedServer

WAIT_S = 15.0  # bound of every wait on a condition
CHECK_INTERVAL_S = 0.05
APPLY_DELAY_S = 0.4
WRITES = 1000


def _server_programs_present() -> str | None:
    try:
        _bindir()
    except SecureServerUnavailable as error:
        return str(error)
    return None


@pytest.fixture(scope="module")
def cluster() -> Iterator[ReplicaCluster]:
    missing = _server_programs_present()
    if missing is not None:
        pytest.skip(f"no PostgreSQL server programs to run a standby: {missing}")
    try:
        with replica_cluster() as running:
            yield running
    except ReplicaClusterUnavailable as error:  # programs present: this is a failure
        pytest.fail(f"the primary + standby cluster did not start: {error}")


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def migrated(cluster: ReplicaCluster) -> ReplicaCluster:
    url = cluster.primary_url
    await migrations.upgrade(Settings(database_url=url, database_url_direct=url))
    standby = await asyncpg.connect(cluster.standby_url)
    try:

        async def replayed() -> bool:
            return bool(await standby.fetchval("SELECT to_regclass('tasks') IS NOT NULL"))

        await _wait_for(replayed, "the standby replays the migrations")
    finally:
        await standby.close()
    return cluster


@dataclass(frozen=True)
class Path:
    """URLs of the primary and the standby, direct or each through its own PgBouncer."""

    name: str
    primary_url: str
    replica_url: str


def _bouncer(port: int, database: str) -> ProvisionedServer:
    url = f"postgresql://postgres@127.0.0.1:{port}/{database}"
    return ProvisionedServer(url, "env", "127.0.0.1", port, "postgres", None)


@pytest.fixture(
    scope="module", params=["direct", pytest.param("pgbouncer", marks=pytest.mark.pgbouncer)]
)
def path(request: pytest.FixtureRequest, migrated: ReplicaCluster) -> Iterator[Path]:
    if request.param == "direct":
        yield Path("direct", migrated.primary_url, migrated.standby_url)
        return
    primary = start_pgbouncer(_bouncer(migrated.primary.port, "postgres"), "postgres")
    # After a failed server login PgBouncer refuses clients for server_login_retry (15 s by
    # default): the replica comes back that much later. 1 s keeps the outage test short.
    standby = start_pgbouncer(
        _bouncer(migrated.standby.port, "postgres"),
        "postgres",
        settings={"server_login_retry": "1"},
    )
    try:
        yield Path("pgbouncer", primary.url, standby.url)
    finally:
        standby.stop()
        primary.stop()


def _settings(primary: str, replica: str | None, **update: object) -> Settings:
    settings = Settings(
        database_url=primary,
        database_url_direct=primary,
        database_url_replica=replica,
        replica_check_interval=CHECK_INTERVAL_S,
    )
    return settings.model_copy(update=update)


@contextlib.asynccontextmanager
async def _store(path: Path, **update: object) -> AsyncIterator[TodoStore]:
    async with TodoStore(_settings(path.primary_url, path.replica_url, **update)) as store:
        yield store


async def _wait_for(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {WAIT_S:g} s: {what}")
        await asyncio.sleep(CHECK_INTERVAL_S)


async def _replica_healthy(store: TodoStore) -> None:
    async def healthy() -> bool:
        async with store.session(read_only=True) as session:
            return ran_on_replica(session)

    await _wait_for(healthy, "reads go to the replica")


_last_unit: list[AsyncSession] = []


async def _new_user(store: TodoStore) -> str:
    user_id = f"u_rep_{uuid.uuid4().hex[:12]}"
    async with store.session() as session:
        await UserRepo(session).upsert(user_id, email=f"{user_id}@example.com", name="Replica")
    _last_unit[:] = [session]
    return user_id


# -- routing ------------------------------------------------------------------------------


async def test_read_only_units_read_from_the_replica_and_writes_go_to_the_primary(
    path: Path, migrated: ReplicaCluster
) -> None:
    migrated.set_apply_delay(0)
    async with _store(path) as store:
        await store.warm(2)
        user_id = await _new_user(store)  # a write: the primary took it
        await _replica_healthy(store)
        async with store.session(read_only=True) as session:
            assert ran_on_replica(session)
            await _wait_for(lambda: _sees_user(store, user_id), "the replica replays the user")
        async with store.session(read_only=True) as session:
            assert ran_on_replica(session)
            assert not (await TaskRepo(session).page(user_id)).items  # its cursor key too
        async with store.session() as session:
            assert not ran_on_replica(session)
            await TaskRepo(session).create(user_id, title="on the primary")


async def _sees_user(store: TodoStore, user_id: str) -> bool:
    async with store.session(read_only=True) as session:
        try:
            await UserRepo(session).get(user_id)
        except LookupError:
            return False
        return True


# -- read-your-writes -----------------------------------------------------------------------


@dataclass
class Written:
    at: float
    token: str
    task_id: int


async def test_read_your_writes_1000_times_while_reads_without_a_token_see_the_lag(
    path: Path, migrated: ReplicaCluster
) -> None:
    migrated.set_apply_delay(APPLY_DELAY_S)
    async with _store(path) as store:
        await store.warm(2)
        user_id = await _new_user(store)
        await _replica_healthy(store)
        tasks = TaskRepo
        at_once_seen = at_once_on_replica = stale_without_token = without_token_on_replica = 0
        older_seen = older_on_replica = 0
        history: list[Written] = []
        for i in range(WRITES):
            async with store.session() as session:
                task = await tasks(session).create(user_id, title=f"write {i}")
            token = consistency_token(session)
            assert token is not None
            history.append(Written(time.monotonic(), token, task.id))

            # 1. Its token, at once: the write is always there.
            async with store.session(read_only=True, after=token) as session:
                at_once_on_replica += ran_on_replica(session)
                assert (await tasks(session).get(user_id, task.id)).title == f"write {i}"
                at_once_seen += 1

            # 2. No token, at once: on the replica, which has not applied it yet.
            async with store.session(read_only=True) as session:
                without_token_on_replica += ran_on_replica(session)
                try:
                    await tasks(session).get(user_id, task.id)
                except TaskNotFound:
                    stale_without_token += 1

            # 3. The newest write older than the replica's delay, with its token.
            due = time.monotonic() - APPLY_DELAY_S - 4 * CHECK_INTERVAL_S
            older = next((w for w in reversed(history) if w.at <= due), None)
            if older is not None:
                async with store.session(read_only=True, after=older.token) as session:
                    older_on_replica += ran_on_replica(session)
                    await tasks(session).get(user_id, older.task_id)  # TaskNotFound fails
                    older_seen += 1

        counts = {
            "writes": WRITES,
            "token read at once: saw the write": at_once_seen,
            "token read at once: on the replica": at_once_on_replica,
            "no-token read at once: on the replica": without_token_on_replica,
            "no-token read at once: missed the write": stale_without_token,
            "older token read: saw the write": older_seen,
            "older token read: on the replica": older_on_replica,
        }
        print(f"\nread-your-writes ({path.name}): {counts}")
        assert at_once_seen == WRITES
        assert stale_without_token > 0, counts  # the lag is real: the token made the difference
        assert older_seen > 0, counts
        assert older_on_replica > 0, counts  # replicas serve reads with a token too


# -- round trips ----------------------------------------------------------------------------


async def test_tokens_cost_no_round_trip(path: Path, migrated: ReplicaCluster) -> None:
    migrated.set_apply_delay(0)
    async with (
        RoundTripProxy.in_front_of(path.primary_url) as on_primary,
        RoundTripProxy.in_front_of(path.replica_url) as on_replica,
    ):
        settings = _settings(
            on_primary.url_for(path.primary_url),
            on_replica.url_for(path.replica_url),
            pool_size=1,
            max_overflow=0,
            replica_check_interval=3600,  # no background check inside a count
            replica_max_lag=7200,
        )
        async with TodoStore(settings) as store:
            user_id = await _new_user(store)
            await store.warm(1)

            with on_primary.counting() as primary, on_replica.counting() as replica:
                async with store.session() as session:
                    await TaskRepo(session).create(user_id, title="counted")
            token = consistency_token(session)
            assert token is not None
            assert (primary.round_trips, replica.round_trips) == (4, 0)  # as without a token
            assert primary.messages["Query"] == 2  # BEGIN; COMMIT (and its position)

            # The replica has not been checked since the write: the token read goes to the
            # primary, at a primary read's cost.
            with on_primary.counting() as primary, on_replica.counting() as replica:
                async with store.session(read_only=True, after=token) as session:
                    assert not ran_on_replica(session)
                    await TaskRepo(session).count_for(user_id)
            assert (primary.round_trips, replica.round_trips) == (4, 0)

            replica_set = store.read_router
            await _wait_for(
                lambda: _checked_past(replica_set.replicas[0], store, token),
                "the replica replays the write",
            )
            for after in (token, None):
                with on_primary.counting() as primary, on_replica.counting() as replica:
                    async with store.session(read_only=True, after=after) as session:
                        assert ran_on_replica(session)
                        await TaskRepo(session).count_for(user_id)
                assert (primary.round_trips, replica.round_trips) == (0, 4), after


async def _checked_past(replica: Replica, store: TodoStore, token: str) -> bool:
    router = store.read_router
    await replica.check(router.primary_system_identifier, router.max_lag)
    status = replica.status
    return status is not None and (status.replay_lsn or 0) >= Position.from_token(token).lsn


# -- outage ---------------------------------------------------------------------------------


async def test_a_replica_stopped_and_started_under_load_fails_no_read(
    path: Path, migrated: ReplicaCluster
) -> None:
    migrated.set_apply_delay(0)
    async with _store(path, pool_size=4) as store:
        user_id = await _new_user(store)
        async with store.session() as session:
            task = await TaskRepo(session).create(user_id, title="read under load")
        token = consistency_token(session)
        await store.warm(4)
        await _replica_healthy(store)
        served = {"replica": 0, "primary": 0, "failed on the replica, run again": 0}
        failed: list[BaseException] = []
        stop = asyncio.Event()

        async def read(session: AsyncSession) -> None:
            try:
                await TaskRepo(session).get(user_id, task.id)
            except DatabaseUnavailable:
                served["failed on the replica, run again"] += 1  # store.run runs it again
                raise
            served["replica" if ran_on_replica(session) else "primary"] += 1

        async def reader(after: str | None) -> None:
            while not stop.is_set():
                try:
                    await store.run(read, read_only=True, after=after)
                except Exception as error:  # counted: the claim is that there are none
                    failed.append(error)
                await asyncio.sleep(0)

        async def served_at_least(where: str, count: int) -> bool:
            return served[where] >= count

        workers = [asyncio.create_task(reader(token if i % 2 else None)) for i in range(4)]
        try:
            await _wait_for(lambda: served_at_least("replica", 50), "reads on the replica")
            await asyncio.to_thread(migrated.stop_standby)
            on_primary = served["primary"]
            await _wait_for(
                lambda: served_at_least("primary", on_primary + 200),
                "reads go on, on the primary",
            )
            await asyncio.to_thread(migrated.start_standby)
            on_replica = served["replica"]
            await _wait_for(
                lambda: served_at_least("replica", on_replica + 200), "reads back on the replica"
            )
        finally:
            stop.set()
            await asyncio.gather(*workers)
        print(f"\nreplica outage under load ({path.name}): served {served}, failed {len(failed)}")
        assert failed == []


# -- lag ------------------------------------------------------------------------------------


async def test_a_lagging_replica_is_skipped_with_a_log_line_and_used_again(
    migrated: ReplicaCluster, caplog: pytest.LogCaptureFixture
) -> None:
    path = Path("direct", migrated.primary_url, migrated.standby_url)
    migrated.set_apply_delay(0)
    caplog.set_level(logging.INFO, logger="todo_store")
    async with _store(path, replica_max_lag=0.5) as store:
        user_id = await _new_user(store)
        await _replica_healthy(store)
        migrated.set_apply_delay(3)

        def states() -> list[tuple[int, str | None]]:
            return [(r.levelno, getattr(r, "replica_state", None)) for r in caplog.records]

        async def reported_lagging() -> bool:
            async with store.session() as session:  # keeps the primary writing
                await TaskRepo(session).create(user_id, title="tick")
            async with store.session(read_only=True):  # reads trigger the checks
                pass
            return (logging.WARNING, "lagging") in states()

        await _wait_for(reported_lagging, "the lagging replica is reported")
        for _ in range(20):
            async with store.session(read_only=True) as session:
                assert not ran_on_replica(session)
        assert states().count((logging.WARNING, "lagging")) == 1, caplog.text  # not per read
        caplog.clear()
        migrated.set_apply_delay(0)
        await _replica_healthy(store)
        assert (logging.INFO, "healthy") in states(), caplog.text


# -- tokens ---------------------------------------------------------------------------------


async def test_bad_tokens_are_refused_before_any_sql(
    migrated: ReplicaCluster, todo_store_settings: Settings
) -> None:
    path = Path("direct", migrated.primary_url, migrated.standby_url)
    async with _store(path) as store:
        user_id = await _new_user(store)
        async with store.session() as session:
            await TaskRepo(session).create(user_id, title="token source")
        token = consistency_token(session)
        assert token is not None

        with pytest.raises(ValueError, match=r"^after: not a consistency token"):
            async with store.session(read_only=True, after="0/16B3F80"):
                pass
        with pytest.raises(ValueError, match="after= needs read_only=True"):
            async with store.session(after=token):
                pass

        async with store.session() as session:
            await UserRepo(session).get(user_id)  # a unit that only reads
        assert consistency_token(session) is None
        async with store.session() as session:
            with pytest.raises(ValueError, match="not committed yet"):
                consistency_token(session)

    # Another database (the suite's own server): its store refuses the cluster's token.
    async with (
        RoundTripProxy.in_front_of(todo_store_settings.database_url.get_secret_value()) as proxy,
        TodoStore(
            todo_store_settings.model_copy(
                update={
                    "database_url": type(todo_store_settings.database_url)(
                        proxy.url_for(todo_store_settings.database_url.get_secret_value())
                    )
                }
            )
        ) as other,
    ):
        async with other.session() as session:
            await TaskRepo(session).count_for("nobody")  # connects; the store learns nothing
        with (
            proxy.counting() as measured,
            pytest.raises(ForeignConsistencyToken, match="another database"),
        ):
            async with other.session(read_only=True, after=token):
                pass
        # Once per process: the primary's system identifier (prepare + execute), nothing else.
        assert measured.round_trips == 2, measured


async def test_a_role_that_may_not_read_the_position_commits_and_says_why(
    migrated: ReplicaCluster,
) -> None:
    admin = await asyncpg.connect(migrated.primary_url)
    role = f"app_{uuid.uuid4().hex[:8]}"
    try:
        await admin.execute(
            f"CREATE ROLE {role} LOGIN; GRANT ALL ON users, tasks TO {role};"
            "REVOKE EXECUTE ON FUNCTION pg_control_system() FROM PUBLIC"
        )
        url = migrated.primary_url.replace("postgres@", f"{role}@")
        user_id = f"u_rep_{uuid.uuid4().hex[:12]}"
        async with (
            TodoStore(_settings(url, None)) as store,
            store.session(user_id=user_id) as session,  # bound: the role is under RLS
        ):
            await UserRepo(session).upsert(user_id, email=f"{user_id}@example.com", name="R")
        with pytest.raises(ConsistencyTokenUnavailable, match="permission denied"):
            consistency_token(session)
        async with TodoStore(_settings(migrated.primary_url, None)) as store:
            assert await _sees_user(store, user_id)  # the unit committed all the same
    finally:
        await admin.execute(
            f"GRANT EXECUTE ON FUNCTION pg_control_system() TO PUBLIC; DROP OWNED BY {role};"
            f"DROP ROLE {role}"
        )
        await admin.close()


# -- doctor ---------------------------------------------------------------------------------


async def test_doctor_has_a_line_per_replica(migrated: ReplicaCluster) -> None:
    migrated.set_apply_delay(0)
    settings = _settings(migrated.primary_url, f"{migrated.standby_url}, {migrated.primary_url}")
    standby, primary = await _replica_checks(settings)
    assert standby.name == "replica 1", standby
    assert standby.ok, standby
    assert "standby of the primary" in standby.detail
    assert "behind at most" in standby.detail
    assert "pooler: direct: no transaction pooler" in standby.detail, standby
    assert primary.name == "replica 2", primary
    assert not primary.ok
    assert "not a standby" in primary.detail


# -- settings -------------------------------------------------------------------------------


def test_replica_urls_are_split_at_each_new_url_and_checked_by_name() -> None:
    from todo_store.replicas import replica_urls  # noqa: PLC0415

    raw = (
        "postgresql://u:pw@ep-a-pooler.eu.aws.neon.tech/db?sslmode=require&channel_binding=require,"
        " postgres://u:pw@h1:5432,h2:5433/db"
    )
    assert replica_urls(raw) == [
        "postgresql://u:pw@ep-a-pooler.eu.aws.neon.tech/db?sslmode=require&channel_binding=require",
        "postgres://u:pw@h1:5432,h2:5433/db",
    ]
    settings = Settings(
        database_url="postgresql://u:pw@127.0.0.1/db",
        database_url_replica="postgresql://u:secret-pw@127.0.0.1/db?bogus=1",
    )
    with pytest.raises(ValueError, match=r"^DATABASE_URL_REPLICA \(URL 1\): .*bogus") as raised:
        TodoStore(settings)
    assert "secret-pw" not in str(raised.value)
    with pytest.raises(
        ValueError, match="REPLICA_CHECK_INTERVAL must be less than REPLICA_MAX_LAG"
    ):
        Settings(database_url="postgresql://u@h/db", replica_check_interval=5, replica_max_lag=5)


async def test_the_test_fixtures_units_need_no_token(
    todo_store: TodoStore, new_user_id: str
) -> None:
    async with todo_store.session() as session:
        await UserRepo(session).upsert(new_user_id, email=f"{new_user_id}@example.com", name="F")
    token = consistency_token(session)  # code that passes tokens on works under the fixture
    assert token is None
    async with todo_store.session(read_only=True, after=token) as session:
        assert (await UserRepo(session).get(new_user_id)).id == new_user_id
