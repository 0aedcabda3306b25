"""Units of work bound to a user: row-level security, enforced by PostgreSQL.

The test server's own role (`postgres`) is a superuser and bypasses row-level security, as
Neon's console roles do through `neon_superuser`. These tests run the application's side as a
runtime role made here and given its privileges by `grant` (exactly what `todo-store grant`
does); the owner's side (setting up rows, cleaning up) runs as the superuser.

- binding: any user id binds exactly that user (quoting), also `u1' OR true --`;
- enforcement: repository methods whose owner filter is removed at runtime, and raw SQL, in
  bound units see and change only the bound user's rows, or are refused (`AccessRefused`);
  unbound units of the runtime role see nothing and write nothing (fail closed);
- the `todo_store` fixture's bound units are enforced too, and `assert_user_owned` holds for
  `tasks` and for an application's own table made user-owned by one call in its revision;
- round trips: a bound unit of n calls costs 2n + 2 (n + 2 cached), as an unbound one;
  `session(user_id=..., atomic=False)` costs 4 per call (3 cached);
- a gauntlet through PgBouncer 1.18 and 1.25 (server pool of 2, 24 clients, alternating users,
  some units cancelled): every unit sees only its user's rows; every unbound unit, including
  those right after a bound one on the same server connection, sees the setting empty;
- `doctor`'s row-level security line and `grant`: ✘/refused for an owner-like role (a member of
  a BYPASSRLS role, owning the tables), ✔/granted for a runtime role; owner work (migrations,
  schema checks) still functions under FORCE for a non-superuser owner.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import secrets
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import pytest_asyncio
from conftest import run_command, start_tracking_pgbouncer
from sqlalchemy import CursorResult, select, text, true
from sqlalchemy.engine import make_url
from sqlalchemy.sql import visitors

from tests.rigs.proxy import RoundTripProxy
from todo_store import (
    AccessRefused,
    Settings,
    Task,
    TaskNotFound,
    TaskRepo,
    TodoStore,
    UserNotFound,
    UserRepo,
    columns,
    migrations,
    repositories,
)
from todo_store.binding import USER_SETTING, GrantRefused, bypass_routes, grant, quote_ident
from todo_store.doctor import diagnose
from todo_store.engine import create_engine
from todo_store.testing.isolated_store import IsolatedTodoStore
from todo_store.testing.isolation import assert_user_owned
from todo_store.testing.pgbouncer import PgBouncer
from todo_store.testing.plugin import settings_for, start_pgbouncer
from todo_store.testing.postgres import ProvisionedServer

pytestmark = pytest.mark.asyncio(loop_scope="session")

READ_SETTING = text("SELECT current_setting('todo_store.user_id', true)")
HOSTILE_IDS = [
    "u1' OR true --",
    "u1\\' OR true --",
    "x'); SELECT set_config('todo_store.user_id', 'u2', true); --",
    "$$ OR true $$",
    "ünïcødé 用户",
    "a" * 255,
]


def _url_as(url: str, role: str) -> str:
    return make_url(url).set(username=role, password=None).render_as_string(hide_password=False)


async def _create_role(admin_url: str, name: str, *attributes: str) -> None:
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f"CREATE ROLE {quote_ident(name)} {' '.join(attributes)}")
    finally:
        await conn.close()


async def _drop_role(admin_url: str, database_urls: list[str], name: str) -> None:
    for url in database_urls:  # privileges and objects in each database, then the role
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(f"DROP OWNED BY {quote_ident(name)} CASCADE")
        finally:
            await conn.close()
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f"DROP ROLE IF EXISTS {quote_ident(name)}")
    finally:
        await conn.close()


async def _grant(owner_url: str, role: str) -> list[str]:
    engine = create_engine(settings_for(owner_url))
    try:
        async with engine.begin() as conn:
            return await grant(conn, role)
    finally:
        await engine.dispose()


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def runtime_role(
    todo_store_server: ProvisionedServer, todo_store_settings: Settings
) -> AsyncIterator[str]:
    """A LOGIN role granted by `grant` on the test database: what production runs as."""
    name = f"todo_store_rt_{secrets.token_hex(4)}"
    database_url = todo_store_settings.database_url.get_secret_value()
    await _create_role(todo_store_server.admin_url, name, "LOGIN")
    try:
        await _grant(database_url, name)
        yield name
    finally:
        await _drop_role(todo_store_server.admin_url, [database_url], name)


@pytest.fixture(scope="session")
def runtime_settings(todo_store_settings: Settings, runtime_role: str) -> Settings:
    return settings_for(_url_as(todo_store_settings.database_url.get_secret_value(), runtime_role))


@pytest_asyncio.fixture(loop_scope="session")
async def runtime(runtime_settings: Settings) -> AsyncIterator[TodoStore]:
    """A store whose role row-level security applies to; its commits are real."""
    async with TodoStore(runtime_settings) as store:
        yield store


@dataclass
class Pair:
    """Two committed users with tasks (ada: 3, the first completed; bob: 2); deleted after."""

    ada: str
    bob: str
    ada_tasks: list[int]
    bob_tasks: list[int]


@contextlib.asynccontextmanager
async def _pair(owner_store: TodoStore) -> AsyncIterator[Pair]:
    tag = secrets.token_hex(5)
    ada, bob = f"u_ada_{tag}", f"u_bob_{tag}"
    async with owner_store.session() as session:
        users, tasks = UserRepo(session), TaskRepo(session)
        for user_id in (ada, bob):
            await users.upsert(user_id, email=f"{user_id}@example.com", name=user_id)
        ada_tasks = [(await tasks.create(ada, title=f"ada {i}")).id for i in range(3)]
        bob_tasks = [(await tasks.create(bob, title=f"bob {i}")).id for i in range(2)]
        await tasks.set_completed(ada, ada_tasks[0])
        await tasks.set_completed(bob, bob_tasks[0])
    try:
        yield Pair(ada, bob, ada_tasks, bob_tasks)
    finally:
        async with owner_store.session() as session:
            for user_id in (ada, bob):
                with contextlib.suppress(UserNotFound):
                    await UserRepo(session).delete(user_id)


@pytest_asyncio.fixture(loop_scope="session")
async def pair(store: TodoStore) -> AsyncIterator[Pair]:
    async with _pair(store) as made:
        yield made


async def _titles(owner_store: TodoStore, user_id: str) -> dict[int, tuple[str, bool]]:
    # Plain SQL with its own filter: the repositories may be mutated by the test.
    query = text("SELECT id, title, completed FROM tasks WHERE user_id = :u")
    async with owner_store.session() as session:
        rows = (await session.execute(query, {"u": user_id})).all()
    return {task_id: (title, completed) for task_id, title, completed in rows}


# -- binding ------------------------------------------------------------------------------------


@pytest.mark.parametrize("user_id", HOSTILE_IDS)
@pytest.mark.parametrize("atomic", [True, False], ids=["atomic", "non-atomic"])
async def test_any_user_id_binds_exactly_that_user(
    runtime: TodoStore, user_id: str, atomic: bool
) -> None:
    read = text("SELECT current_setting(:s, true)")
    async with runtime.session(user_id=user_id, atomic=atomic) as session:
        assert await session.scalar(read, {"s": USER_SETTING}) == user_id
        # Nobody's tasks: the hostile text bound a user that does not exist, nothing more.
        assert await session.scalar(text("SELECT count(*) FROM tasks")) == 0
    async with runtime.session(read_only=True, user_id=user_id) as session:
        assert await session.scalar(read, {"s": USER_SETTING}) == user_id


@pytest.mark.parametrize("bad", ["", "a" * 256, "nul\x00"])
async def test_invalid_user_id_is_refused_before_any_sql(runtime: TodoStore, bad: str) -> None:
    for kind in ({}, {"atomic": False}, {"read_only": True}):
        with pytest.raises(ValueError, match="user_id"):
            async with runtime.session(user_id=bad, **kind):
                pass
    with pytest.raises(ValueError, match="user_id"):
        await runtime.run(lambda session: asyncio.sleep(0), user_id=bad)


async def _fail_before_any_statement(store: TodoStore, user_id: str) -> None:
    async with store.session(user_id=user_id) as session:
        await session.connection()  # the transaction has begun; its BEGIN is not sent yet
        raise RuntimeError("before any statement")


async def test_a_binding_never_outlives_its_unit(runtime: TodoStore, pair: Pair) -> None:
    """On the same pooled connection: bound, failed bound, unbound units one after another."""
    runtime_one = TodoStore(runtime.settings.model_copy(update={"pool_size": 1, "max_overflow": 0}))
    read = text("SELECT current_setting(:s, true), pg_backend_pid()")
    try:
        async with runtime_one.session(user_id=pair.ada) as session:
            setting, pid = (await session.execute(read, {"s": USER_SETTING})).one()
        assert setting == pair.ada
        with pytest.raises(TaskNotFound):
            async with runtime_one.session(user_id=pair.bob) as session:
                await TaskRepo(session).get(pair.bob, pair.ada_tasks[0])
        with pytest.raises(RuntimeError):  # fails after BEGIN was decided, before it was sent
            await _fail_before_any_statement(runtime_one, pair.bob)
        for atomic in (True, False):
            async with runtime_one.session(atomic=atomic) as session:
                again, same_pid = (await session.execute(read, {"s": USER_SETTING})).one()
                assert await TaskRepo(session).count_for(pair.ada) == 0  # fail closed
            assert same_pid == pid
            assert again in (None, "")
    finally:
        await runtime_one.dispose()


# -- enforcement --------------------------------------------------------------------------------


@contextlib.contextmanager
def _owner_filters_removed(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every TaskRepo statement without its `user_id = :owner` condition (a mutant): the ones
    built once per record shape, and the module's own."""
    owner = repositories._OWNER  # the mutant needs the statements' own condition

    def drop(element: Any) -> Any:
        return true() if element is owner else None

    def strip(statement: Any) -> Any:
        return visitors.replacement_traverse(statement, {}, drop)

    built = columns.Shape.built

    def built_without_owner(self: Any, build: Any, *args: Any) -> Any:
        return strip(built(self, build, *args))

    monkeypatch.setattr(columns.Shape, "built", built_without_owner)
    for name in dir(repositories):
        value = getattr(repositories, name)
        if name.startswith("_") and name.isupper():
            if isinstance(value, dict):
                monkeypatch.setattr(repositories, name, {k: strip(v) for k, v in value.items()})
            elif hasattr(value, "whereclause"):
                monkeypatch.setattr(repositories, name, strip(value))
    yield


async def test_the_mutant_leaks_without_row_level_security(
    store: TodoStore, pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The superuser bypasses row-level security: the mutant really drops the filter."""
    with _owner_filters_removed(monkeypatch):
        async with store.session(user_id=pair.ada) as session:
            tasks = TaskRepo(session)
            assert {t.user_id for t in await tasks.list_for(pair.ada, limit=500)} >= {
                pair.ada,
                pair.bob,
            }
            assert (await tasks.get(pair.ada, pair.bob_tasks[1])).user_id == pair.bob


async def test_repository_methods_without_owner_filter_touch_only_the_bound_user(
    runtime: TodoStore, store: TodoStore, pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    bob_before = await _titles(store, pair.bob)
    with _owner_filters_removed(monkeypatch):
        async with runtime.session(user_id=pair.ada) as session:
            tasks = TaskRepo(session)
            listed = await tasks.list_for(pair.ada, limit=500)
            assert sorted(t.id for t in listed) == sorted(pair.ada_tasks)
            assert await tasks.count_for(pair.ada) == 3
            assert await tasks.count_for(pair.ada, completed=True) == 1
            for call in (
                lambda: tasks.get(pair.ada, pair.bob_tasks[1]),
                lambda: tasks.toggle(pair.ada, pair.bob_tasks[1]),
                lambda: tasks.update(pair.ada, pair.bob_tasks[1], title="stolen"),
                lambda: tasks.set_completed(pair.ada, pair.bob_tasks[1]),
                lambda: tasks.delete(pair.ada, pair.bob_tasks[1]),
            ):
                with pytest.raises(TaskNotFound):
                    await call()
            assert await tasks.complete_all(pair.ada) == 2
            assert await tasks.delete_completed(pair.ada) == 3
            users = UserRepo(session)
            with pytest.raises(UserNotFound):
                await users.get_by_email(f"{pair.bob}@example.com")
            with pytest.raises(UserNotFound):
                await users.get(pair.bob)
            with pytest.raises(UserNotFound):
                await users.delete(pair.bob)
            # A write *for* another user is refused, not silently dropped.
            with pytest.raises(AccessRefused):
                async with session.begin_nested():
                    await users.upsert(pair.bob, email="bob2@example.com", name="Bob")
            with pytest.raises(AccessRefused):
                async with session.begin_nested():
                    await tasks.create(pair.bob, title="planted")
    assert await _titles(store, pair.bob) == bob_before
    assert await _titles(store, pair.ada) == {}


async def test_raw_sql_in_a_bound_unit_touches_only_the_bound_user(
    runtime: TodoStore, store: TodoStore, pair: Pair
) -> None:
    bob_before = await _titles(store, pair.bob)
    async with runtime.session(user_id=pair.ada) as session:
        rows = (await session.execute(text("SELECT user_id FROM tasks"))).scalars().all()
        assert rows == [pair.ada] * 3
        orm = (await session.execute(select(Task))).scalars().all()
        assert {task.user_id for task in orm} == {pair.ada}
        joined = await session.scalar(
            text("SELECT count(*) FROM users u JOIN tasks t ON t.user_id = u.id")
        )
        assert joined == 3
        assert await session.scalar(text("SELECT count(*) FROM users")) == 1
        sub = await session.scalar(
            text("SELECT count(*) FROM tasks WHERE user_id IN (SELECT id FROM users)")
        )
        assert sub == 3
        updated = await session.execute(text("UPDATE tasks SET title = 'x'"))
        assert isinstance(updated, CursorResult)
        assert updated.rowcount == 3
        parameters = {"bob": pair.bob, "ada": pair.ada, "mine": pair.ada_tasks[1]}
        own = await session.execute(text("UPDATE users SET name = 'x' WHERE id = :ada"), parameters)
        assert isinstance(own, CursorResult)
        assert own.rowcount == 1  # the bound user's own row
        for refused in (
            text("INSERT INTO tasks (user_id, title) VALUES (:bob, 'planted')"),
            text("UPDATE tasks SET user_id = :bob WHERE id = :mine"),  # moving a task away
            text("INSERT INTO users (id, email, name) VALUES (:bob || '2', 'e@x.io', 'n')"),
        ):
            with pytest.raises(AccessRefused):
                async with session.begin_nested():
                    await session.execute(refused, parameters)
        deleted = await session.execute(text("DELETE FROM tasks"))
        assert isinstance(deleted, CursorResult)
        assert deleted.rowcount == 3
    assert await _titles(store, pair.bob) == bob_before
    assert await _titles(store, pair.ada) == {}


async def test_unbound_units_of_the_runtime_role_fail_closed(
    runtime: TodoStore, pair: Pair
) -> None:
    for atomic in (True, False):
        async with runtime.session(atomic=atomic) as session:
            assert await session.scalar(text("SELECT count(*) FROM tasks")) == 0
            assert await session.scalar(text("SELECT count(*) FROM users")) == 0
            assert await TaskRepo(session).list_for(pair.ada) == []
            with pytest.raises(AccessRefused):
                await TaskRepo(session).create(pair.ada, title="unbound")


async def test_run_binds_every_attempt(runtime: TodoStore, pair: Pair) -> None:
    async def work(session: Any) -> list[int]:
        return [task.id for task in await TaskRepo(session).list_for(pair.bob, limit=500)]

    assert await runtime.run(work, user_id=pair.ada) == []
    assert sorted(await runtime.run(work, user_id=pair.bob)) == sorted(pair.bob_tasks)


# -- the todo_store fixture, and a user-owned table checked verb by verb -------------------------


async def test_the_fixture_runs_bound_units_enforced(todo_store: IsolatedTodoStore) -> None:
    async with todo_store.session() as session:
        for user_id in ("u_a", "u_b"):
            await UserRepo(session).upsert(user_id, email=f"{user_id}@x.io", name=user_id)
            await TaskRepo(session).create(user_id, title=f"{user_id}'s")
    for atomic in (True, False):
        async with todo_store.session(user_id="u_a", atomic=atomic) as session:
            assert await session.scalar(text("SELECT count(*) FROM tasks")) == 1
            with pytest.raises(AccessRefused):
                async with session.begin_nested():
                    await TaskRepo(session).create("u_b", title="planted")
            assert await session.scalar(READ_SETTING) == "u_a"
        async with todo_store.session() as session:  # binding and role restored after the unit
            setting, role = (
                await session.execute(text(f"{READ_SETTING.text}, current_user = session_user"))
            ).one()
            assert (setting or "", role) == ("", True)
    async with todo_store.session(user_id="u_b", read_only=True) as session:
        assert [task.user_id for task in await TaskRepo(session).list_for("u_a")] == []
    assert (
        await todo_store.run(lambda session: TaskRepo(session).count_for("u_b"), user_id="u_a") == 0
    )
    async with todo_store.session() as session:  # unbound: the test's own role again
        both = text("SELECT count(*) FROM tasks WHERE user_id IN ('u_a', 'u_b')")
        assert await session.scalar(both) == 2


async def test_tasks_are_user_owned_verb_by_verb(todo_store: IsolatedTodoStore) -> None:
    await assert_user_owned(
        todo_store, "tasks", owner="u_owner", other="u_other", values={"title": "mine"}
    )


async def test_the_helper_catches_a_table_that_is_not_user_owned(
    todo_store: IsolatedTodoStore,
) -> None:
    async with todo_store.session() as session:
        await session.execute(
            text("CREATE TABLE notes (id serial PRIMARY KEY, user_id text NOT NULL, body text)")
        )
        await session.execute(text("GRANT ALL ON notes, notes_id_seq TO PUBLIC"))
    with pytest.raises(AssertionError, match="notes: SELECT sees another user's rows"):
        await assert_user_owned(
            todo_store, "notes", owner="u_owner", other="u_other", values={"body": "mine"}
        )


# -- round trips: binding rides on the BEGIN ------------------------------------------------------

PGBOUNCER, TRACKING = "pgbouncer-1.18", "pgbouncer-1.25"
_BOUNCER = pytest.mark.pgbouncer
# Caching only where it is safe: direct, or a PgBouncer that tracks prepared statements.
PATHS_AND_CACHE = [
    pytest.param("direct", False, id="direct-cache-off"),
    pytest.param(PGBOUNCER, False, id=f"{PGBOUNCER}-cache-off", marks=_BOUNCER),
    pytest.param(TRACKING, False, id=f"{TRACKING}-cache-off", marks=_BOUNCER),
    pytest.param("direct", True, id="direct-cache-on"),
    pytest.param(TRACKING, True, id=f"{TRACKING}-cache-on", marks=_BOUNCER),
]


def _target(request: pytest.FixtureRequest, path: str, settings: Settings) -> str:
    if path == PGBOUNCER:
        return str(request.getfixturevalue("todo_store_pgbouncer").url)
    if path == TRACKING:
        return str(request.getfixturevalue("tracking_pgbouncer").url)
    return settings.database_url.get_secret_value()


async def _calls(session: Any, pair: Pair, n: int) -> None:
    """n calls; the last one reads the binding, so the measured unit proves it was bound."""
    tasks = TaskRepo(session)
    steps = [
        lambda: tasks.count_for(pair.ada),
        lambda: tasks.get(pair.ada, pair.ada_tasks[1]),
        lambda: tasks.list_for(pair.ada, limit=2),
        lambda: tasks.toggle(pair.ada, pair.ada_tasks[2]),
    ]
    for step in steps[: n - 1]:
        await step()
    assert await session.scalar(READ_SETTING) == pair.ada


@pytest.mark.parametrize(("path", "cache"), PATHS_AND_CACHE)
@pytest.mark.parametrize("atomic", [True, False], ids=["atomic", "non-atomic"])
async def test_a_bound_unit_costs_what_an_unbound_one_does(  # noqa: PLR0917 - fixtures
    request: pytest.FixtureRequest,
    todo_store_settings: Settings,
    pair: Pair,
    path: str,
    cache: bool,
    atomic: bool,
) -> None:
    """Atomic: 2n + 2 (n + 2 cached), BEGIN and the binding in ONE simple query. Non-atomic
    (each call its own bound transaction): 4 per call (3 cached)."""
    target = _target(request, path, todo_store_settings)
    async with RoundTripProxy.in_front_of(target) as proxy:
        settings = settings_for(proxy.url_for(target)).model_copy(
            update={"pool_size": 1, "max_overflow": 0, "statement_cache": cache}
        )
        async with TodoStore(settings) as store:
            for n in (1, 3, 5):
                async with store.session(user_id=pair.ada, atomic=atomic) as session:
                    await _calls(session, pair, n)  # connects, and fills the cache if on
                with proxy.counting() as measured:
                    async with store.session(user_id=pair.ada, atomic=atomic) as session:
                        await _calls(session, pair, n)
                per_call = 2 if not cache else 1
                expected = per_call * n + 2 if atomic else (per_call + 2) * n
                assert measured.round_trips == expected, (n, measured)
                # BEGIN;SELECT set_config(...) is one Query message, then COMMIT.
                assert measured.messages.get("Query") == (2 if atomic else 2 * n), measured
                assert measured.connections == 0, measured


# -- the gauntlet: many clients, few server connections, alternating users, cancellations ---------


@dataclass(frozen=True)
class Seen:
    order: int
    pid: int
    bound: str | None
    setting: str | None
    owners: frozenset[str]


@pytest.mark.pgbouncer
@pytest.mark.parametrize("tracking", [False, True], ids=[PGBOUNCER, TRACKING])
async def test_gauntlet_through_pgbouncer_leaks_nothing(
    todo_store_server: ProvisionedServer,
    todo_store_settings: Settings,
    runtime_role: str,
    pair: Pair,
    tracking: bool,
) -> None:
    """24 clients on 2 server connections, each unit bound to ada or bob in turn and followed
    by an unbound unit; every fifth bound unit is cancelled while its transaction is open."""
    workers, rounds = 24, 6
    database = make_url(todo_store_settings.database_url.get_secret_value()).database or ""
    as_runtime = dataclasses.replace(todo_store_server, user=runtime_role, password=None)
    start = start_tracking_pgbouncer if tracking else start_pgbouncer
    bouncer: PgBouncer = start(as_runtime, database, pool_size=2)
    seen: list[Seen] = []
    counter = iter(range(10**9))
    cancelled = 0
    probe = text(
        """SELECT current_setting('todo_store.user_id', true), pg_backend_pid(),
                  coalesce((SELECT array_agg(DISTINCT user_id) FROM tasks), '{}')"""
    )

    async def unit(store: TodoStore, user_id: str | None, hold: asyncio.Event | None) -> None:
        async with store.session(user_id=user_id) as session:
            setting, pid, owners = (await session.execute(probe)).one()
            seen.append(Seen(next(counter), pid, user_id, setting, frozenset(owners)))
            if hold is not None:
                hold.set()
                await asyncio.Event().wait()  # held open until cancelled

    async def worker(store: TodoStore, number: int) -> None:
        nonlocal cancelled
        for round_ in range(rounds):
            user_id = pair.ada if (number + round_) % 2 else pair.bob
            if (number * rounds + round_) % 5 == 0:
                held = asyncio.Event()
                task = asyncio.create_task(unit(store, user_id, held))
                await held.wait()
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                cancelled += 1
            else:
                await unit(store, user_id, None)
            await unit(store, None, None)

    try:
        settings = settings_for(bouncer.url).model_copy(
            update={"pool_size": workers, "max_overflow": 0}
        )
        async with TodoStore(settings) as store, asyncio.timeout(120):
            await asyncio.gather(*(worker(store, number) for number in range(workers)))
    finally:
        bouncer.stop()

    bound = [s for s in seen if s.bound is not None]
    unbound = [s for s in seen if s.bound is None]
    assert len(bound) == len(unbound) == workers * rounds
    assert cancelled >= workers * rounds // 5
    leaks = [s for s in bound if s.setting != s.bound or not s.owners <= {s.bound}]
    leaks += [s for s in unbound if s.setting not in (None, "") or s.owners]
    assert leaks == []
    assert {s.owners for s in bound} == {frozenset({pair.ada}), frozenset({pair.bob})}
    # Unbound units that ran on a server connection right after a bound unit on it.
    previous: dict[int, Seen] = {}
    right_after_bound = 0
    for s in sorted(seen, key=lambda s: s.order):
        if s.bound is None and s.pid in previous and previous[s.pid].bound is not None:
            right_after_bound += 1
        previous[s.pid] = s
    assert len(previous) <= 2 + 2  # the server pool (a cancelled client's server may be replaced)
    assert right_after_bound > 0
    print(  # the figures behind the claim, for the record (-s)
        f"\n{bouncer.version}: {len(bound)} bound units ({cancelled} cancelled), "
        f"{len(unbound)} unbound, {right_after_bound} of them right after a bound unit on "
        f"the same server connection, {len(previous)} server connections, {len(leaks)} leaks"
    )


# -- owner-like roles, grant, doctor, and an application's own user-owned table -----------------

APP_INI = """\
[alembic]
script_location = todo_store:_alembic
version_locations = todo_store:_alembic/versions %(here)s/migrations
path_separator = space
"""

NOTES_REVISION = '''\
"""Notes, owned by users.

Revision ID: 2001
Revises: {head}
"""

import sqlalchemy as sa
from alembic import op

from todo_store.binding import drop_user_ownership, make_user_owned

revision = "2001"
down_revision = "{head}"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "notes",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=True), primary_key=True),
        sa.Column("author", sa.Text(), sa.ForeignKey("users.id", ondelete="CASCADE")),
        sa.Column("body", sa.Text(), nullable=False),
    )
    make_user_owned("notes", user_column="author")


def downgrade() -> None:
    drop_user_ownership("notes")
    op.drop_table("notes")
'''


def _app_with_notes(directory: Path) -> Path:
    (directory / "migrations").mkdir(parents=True)
    head = migrations.head_revision()
    (directory / "migrations" / "2001_notes.py").write_text(NOTES_REVISION.format(head=head))
    ini = directory / "alembic.ini"
    ini.write_text(APP_INI)
    return ini


async def _rls_line(settings: Settings, config: Path | None = None) -> Any:
    [line] = [
        check for check in await diagnose(settings, config) if check.name == "row-level security"
    ]
    return line


async def test_owner_like_role_is_refused_and_its_work_still_functions(
    todo_store_server: ProvisionedServer,
    empty_database: str,
    tmp_path: Path,
) -> None:
    """A console-style owner: not a superuser, no BYPASSRLS of its own, but a member of a role
    with it (as Neon's neondb_owner is of neon_superuser). It migrates (an application table
    included), its unbound work spans users under FORCE, its bound units are held to their
    user; doctor says ✘ for it, grant refuses it, and the role it grants gets doctor's ✔."""
    tag = secrets.token_hex(3)
    group, owner, runtime_name, direct_bypass = (
        f"ts_superuser_{tag}",
        f"ts_owner_{tag}",
        f"ts_app_{tag}",
        f"ts_bypass_{tag}",
    )
    admin = todo_store_server.admin_url
    database = make_url(empty_database).database or ""
    await _create_role(admin, group, "NOLOGIN BYPASSRLS")
    await _create_role(admin, owner, "LOGIN", f"IN ROLE {quote_ident(group)}")
    await _create_role(admin, runtime_name, "LOGIN")
    await _create_role(admin, direct_bypass, "LOGIN BYPASSRLS")
    conn = await asyncpg.connect(admin)
    await conn.execute(f"ALTER DATABASE {quote_ident(database)} OWNER TO {quote_ident(owner)}")
    await conn.close()
    owner_url = _url_as(empty_database, owner)
    owner_settings = settings_for(owner_url)
    ini = _app_with_notes(tmp_path / "app")
    try:
        await migrations.upgrade(owner_settings, config=ini)

        # The owner's unbound work spans users (as migrations, checks and demo need).
        async with TodoStore(owner_settings) as owner_store:
            async with _pair(owner_store) as made:
                async with owner_store.session() as session:
                    everyone = await session.scalar(text("SELECT count(*) FROM tasks"))
                    assert everyone == 5
                async with owner_store.session(user_id=made.ada) as session:
                    assert await session.scalar(text("SELECT count(*) FROM tasks")) == 3
            checks = await diagnose(owner_settings, ini)
        by_name = {check.name: check for check in checks}
        # (drift: this test names no models for the notes table)
        schema_checks = [c for c in checks if c.name not in ("row-level security", "drift")]
        assert all(check.ok for check in schema_checks), [c for c in schema_checks if not c.ok]
        verdict = by_name["row-level security"]
        assert not verdict.ok
        assert f"is a member of {group}, which has BYPASSRLS" in verdict.detail
        assert "owns notes, tasks, users" in verdict.detail
        assert "todo-store grant" in verdict.hint

        engine = create_engine(owner_settings)
        try:
            for refused, why in (
                (owner, f"is a member of {group}, which has BYPASSRLS"),
                (direct_bypass, "has BYPASSRLS"),
                ("postgres", "is a superuser"),
                (f"no_such_{tag}", "does not exist"),
            ):
                async with engine.begin() as conn_:
                    with pytest.raises(GrantRefused, match=why):
                        await grant(conn_, refused)
            async with engine.begin() as conn_:
                granted = await grant(conn_, runtime_name)
            assert granted == [
                "SELECT, INSERT, UPDATE, DELETE on notes, tasks, users",
                "USAGE, SELECT on notes_id_seq, tasks_id_seq",
            ]
            async with engine.connect() as conn_:
                assert await bypass_routes(conn_, runtime_name) == []
        finally:
            await engine.dispose()

        runtime_settings = settings_for(_url_as(empty_database, runtime_name)).model_copy(
            update={"database_url_direct": owner_settings.database_url}
        )
        line = await _rls_line(runtime_settings, ini)
        assert line.ok, line
        assert (
            line.detail == f"role {runtime_name} cannot bypass it; enforced on notes, tasks, users"
        )
        async with TodoStore(runtime_settings) as runtime_store:
            await assert_user_owned(
                runtime_store,
                "notes",
                owner="u_n1",
                other="u_n2",
                values={"body": "mine"},
                user_column="author",
            )
        conn = await asyncpg.connect(owner_url)
        await conn.execute("ALTER TABLE notes NO FORCE ROW LEVEL SECURITY")
        await conn.close()
        line = await _rls_line(runtime_settings, ini)
        assert not line.ok
        assert line.detail == "not enabled and forced on notes"
        await migrations.downgrade(owner_settings, "base", config=ini)  # reversible
    finally:
        conn = await asyncpg.connect(admin)
        await conn.execute(f"ALTER DATABASE {quote_ident(database)} OWNER TO postgres")
        await conn.close()
        await _drop_role(admin, [empty_database], runtime_name)
        await _drop_role(admin, [empty_database], owner)
        for role in (group, direct_bypass):
            await _drop_role(admin, [], role)


async def test_grant_command(
    todo_store_server: ProvisionedServer, todo_store_settings: Settings, tmp_path: Path
) -> None:
    """`todo-store grant ROLE`: one line saying what was granted, or why not (exit 1)."""
    url = todo_store_settings.database_url.get_secret_value()
    name = f"todo_store_cli_{secrets.token_hex(4)}"
    command = (sys.executable, "-m", "todo_store.cli", "grant")
    await _create_role(todo_store_server.admin_url, name, "LOGIN")
    try:
        granted = await run_command(*command, name, cwd=tmp_path, database_url=url)
        refused = await run_command(*command, "postgres", cwd=tmp_path, database_url=url)
    finally:
        await _drop_role(todo_store_server.admin_url, [url], name)
    assert granted.returncode == 0, granted.stdout + granted.stderr
    assert granted.lines[-1] == (
        f"granted {name}: SELECT, INSERT, UPDATE, DELETE on tasks, users; "
        "USAGE, SELECT on tasks_id_seq"
    )
    assert refused.returncode == 1
    assert refused.lines[-1] == (
        "✘ grant: role 'postgres' is a superuser: row-level security would not apply to it"
    )
