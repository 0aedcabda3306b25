"""`TaskRepo.page`: sorts, filters and search on keyset pages, and the cursor that resumes them.

Most tests run in the rolled-back `session`. The test of changes between pages uses `store`
(real commits, so every edit gets its own `updated_at`) with unique user ids, deleted after.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import pytest_asyncio
from pydantic import SecretStr, ValidationError
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from tests.conftest import StatementLog
from todo_store import Settings, TaskRepo, TodoStore, UserRepo
from todo_store.pages import Page
from todo_store.schemas import TaskRecord

SORTS = ["created", "-created", "updated", "-updated", "title", "-title", "completed", "-completed"]
FIELD = {
    "created": "created_at",
    "updated": "updated_at",
    "title": "title",
    "completed": "completed",
}
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _uid(prefix: str = "p") -> str:
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


def expected_order(tasks: list[TaskRecord], sort: str) -> list[int]:
    """The ids in the order `sort` promises: the column, then id, both in its direction."""
    column = FIELD[sort.lstrip("-")]
    ordered = sorted(tasks, key=lambda t: (getattr(t, column), t.id))
    if sort.startswith("-"):
        ordered.reverse()
    return [t.id for t in ordered]


async def all_pages(
    repo: TaskRepo,
    user_id: str,
    between: Callable[[Page], Any] | None = None,
    cursor: str | None = None,
    **query: Any,
) -> list[TaskRecord]:
    """Every page of a listing (from `cursor`), in order; `between(page)` runs after each."""
    seen: list[TaskRecord] = []
    for _ in range(1000):
        page = await repo.page(user_id, cursor=cursor, **query)
        seen.extend(page.items)
        if page.next_cursor is None:
            return seen
        cursor = page.next_cursor
        if between is not None:
            await between(page)
    raise AssertionError("the listing never ended")


async def _user(session: AsyncSession, user_id: str | None = None) -> str:
    user_id = user_id or _uid()
    await UserRepo(session).upsert(user_id, email=f"{user_id}@example.com", name="Pager")
    return user_id


async def _spread(session: AsyncSession, user_id: str, count: int) -> list[TaskRecord]:
    """`count` tasks with repeated titles, mixed completion and timestamps with ties."""
    repo = TaskRepo(session)
    titles = ["banana", "Apple", "apple", "cherry", "Äpfel", "zebra", "banana"]
    ids = []
    for n in range(count):
        task = await repo.create(user_id, title=titles[n % len(titles)])
        ids.append(task.id)
    # One transaction gives every row the same now(): spread them, keeping some ties. The
    # updated_at trigger is held off (replica role: this transaction only) to set updated_at.
    await session.execute(text("SELECT set_config('session_replication_role', 'replica', true)"))
    await session.execute(
        text(
            """UPDATE tasks SET completed = (id % 3 = 0),
                   created_at = CAST(:t0 AS timestamptz) + ((id * 7) % 5) * interval '1 hour',
                   updated_at = CAST(:t0 AS timestamptz) + ((id * 11) % 4) * interval '1 minute'
               WHERE user_id = :user_id"""
        ),
        {"t0": T0, "user_id": user_id},
    )
    await session.execute(text("SELECT set_config('session_replication_role', 'origin', true)"))
    return [await repo.get(user_id, task_id) for task_id in ids]


# ------------------------------------------------------------------------------ sorts


@pytest.mark.parametrize("sort", SORTS)
async def test_pages_of_every_sort_add_up_to_the_sorted_list(
    session: AsyncSession, sort: str
) -> None:
    user_id = await _user(session)
    tasks = await _spread(session, user_id, 23)
    repo = TaskRepo(session)

    listed = await all_pages(repo, user_id, sort=sort, limit=4)

    assert [t.id for t in listed] == expected_order(tasks, sort)
    assert listed == sorted(listed, key=lambda t: expected_order(tasks, sort).index(t.id))
    first = await repo.page(user_id, sort=sort, limit=23)
    assert first.next_cursor is None  # exactly full: no empty page after it
    assert len(first.items) == 23


async def test_default_is_newest_first_and_50(session: AsyncSession) -> None:
    user_id = await _user(session)
    tasks = await _spread(session, user_id, 60)
    page = await TaskRepo(session).page(user_id)
    assert [t.id for t in page.items] == expected_order(tasks, "-created")[:50]
    assert page.next_cursor is not None


async def test_an_empty_listing_is_one_empty_page(session: AsyncSession) -> None:
    page = await TaskRepo(session).page(await _user(session))
    assert page.items == ()
    assert page.next_cursor is None


@pytest.mark.parametrize("sort", ["-created", "title", "-updated"])
async def test_filters_page_like_the_filtered_list(session: AsyncSession, sort: str) -> None:
    user_id = await _user(session)
    tasks = await _spread(session, user_id, 30)
    repo = TaskRepo(session)
    since = T0 + timedelta(minutes=2)

    done = await all_pages(repo, user_id, completed=True, sort=sort, limit=3)
    recent_open = await all_pages(
        repo, user_id, completed=False, updated_since=since, sort=sort, limit=3
    )

    assert [t.id for t in done] == expected_order([t for t in tasks if t.completed], sort)
    wanted = [t for t in tasks if not t.completed and t.updated_at >= since]
    assert wanted  # the filter is not trivially empty
    assert [t.id for t in recent_open] == expected_order(wanted, sort)


async def test_one_statement_per_page(session: AsyncSession, statements: StatementLog) -> None:
    user_id = await _user(session)
    await _spread(session, user_id, 12)
    repo = TaskRepo(session)
    statements.clear()
    first = await repo.page(user_id, search="a", completed=False, sort="title", limit=2)
    assert len(statements) == 1
    assert first.next_cursor is not None
    await repo.page(
        user_id, search="a", completed=False, sort="title", limit=2, cursor=first.next_cursor
    )
    assert len(statements) == 2


# ------------------------------------------------------------------ changes between pages


@pytest_asyncio.fixture(loop_scope="session")
async def committed_user(store: TodoStore) -> AsyncIterator[str]:
    user_id = _uid("pc")
    async with store.session() as session:
        await UserRepo(session).upsert(user_id, email=f"{user_id}@example.com", name="Pager")
    yield user_id
    async with store.session() as session:
        await UserRepo(session).delete(user_id)


@pytest.mark.parametrize("sort", SORTS)
async def test_changes_between_pages_never_skip_or_repeat_an_unchanged_task(
    store: TodoStore, committed_user: str, sort: str
) -> None:
    """Between every two pages, another unit of work adds two tasks, renames and toggles the
    last task of the page just read (the cursor's anchor), renames, toggles or deletes tasks
    on both sides of it: every task untouched from start to end appears exactly once."""
    user_id = committed_user
    titles = ["m", "c", "x", "c", "q", "a", "z", "m"]
    async with store.session() as session:
        repo = TaskRepo(session)
        for n in range(60):
            await repo.create(user_id, title=f"{titles[n % len(titles)]} {n % 5}")
    async with store.session() as session:
        initial = await all_pages(TaskRepo(session), user_id, limit=500)
    touched: set[int] = set()
    rounds = 0

    async def edit(page: Page) -> None:
        nonlocal rounds
        if rounds == 6:  # edits land at the end of an `updated` listing: let it end
            return
        rounds += 1
        anchor = page.items[-1]
        async with store.session() as session:
            repo = TaskRepo(session)
            alive = [t for t in await all_pages(repo, user_id, limit=500) if t.id != anchor.id]
            for n in range(2):
                created = await repo.create(user_id, title=f"{'bn'[n]}{rounds} new")
                touched.add(created.id)
            # The anchor moves: renamed to the other end of the title order, toggled.
            await repo.update(user_id, anchor.id, title="aaa moved", completed=not anchor.completed)
            touched.add(anchor.id)
            victims = alive[rounds % 3 :: 9]
            for n, victim in enumerate(victims):
                touched.add(victim.id)
                if n % 3 == 0:
                    await repo.delete(user_id, victim.id)
                elif n % 3 == 1:
                    await repo.update(user_id, victim.id, title=f"zz {rounds}")
                else:
                    await repo.toggle(user_id, victim.id)

    async with store.session() as session:
        listed = await all_pages(TaskRepo(session), user_id, between=edit, sort=sort, limit=5)

    assert rounds == 6  # the listing really was interleaved with changes
    unchanged = {t.id for t in initial} - touched
    assert len(unchanged) >= 10
    listed_ids = [t.id for t in listed]
    for task_id in unchanged:
        assert listed_ids.count(task_id) == 1, (sort, task_id)


async def test_a_deleted_anchor_still_resumes_where_it_was(session: AsyncSession) -> None:
    user_id = await _user(session)
    tasks = await _spread(session, user_id, 12)
    repo = TaskRepo(session)
    first = await repo.page(user_id, sort="title", limit=5)
    await repo.delete(user_id, first.items[-1].id)
    rest = await all_pages(repo, user_id, sort="title", limit=5, cursor=first.next_cursor)
    assert [t.id for t in [*first.items, *rest]] == expected_order(tasks, "title")


# ----------------------------------------------------------------------------- cursors


def _cursor_error(caught: pytest.ExceptionInfo[ValidationError]) -> str:
    errors = caught.value.errors()
    assert [e["loc"] for e in errors] == [("cursor",)], errors
    return str(errors[0]["msg"])


async def test_a_cursor_is_bound_to_its_query(session: AsyncSession) -> None:
    user_id = await _user(session)
    await _spread(session, user_id, 12)
    repo = TaskRepo(session)
    query: dict[str, Any] = {
        "search": "A",
        "completed": False,
        "updated_since": T0,
        "sort": "title",
    }
    cursor = (await repo.page(user_id, limit=2, **query)).next_cursor
    assert cursor is not None
    # The same query resumes, with any page size.
    assert (await repo.page(user_id, limit=3, cursor=cursor, **query)).items

    others: list[dict[str, Any]] = [
        {"sort": "-title"},
        {"sort": "created"},
        {"search": "an"},
        {"search": None},
        {"completed": True},
        {"completed": None},
        {"updated_since": T0 + timedelta(microseconds=1)},
        {"updated_since": None},
    ]
    for change in others:
        with pytest.raises(ValidationError) as caught:
            await repo.page(user_id, cursor=cursor, **{**query, **change})
        assert "different query" in _cursor_error(caught), change


async def test_search_words_are_bound_regardless_of_case_and_spacing(
    session: AsyncSession,
) -> None:
    user_id = await _user(session)
    await _spread(session, user_id, 12)
    repo = TaskRepo(session)
    cursor = (await repo.page(user_id, search="an  A", limit=2)).next_cursor
    # Same words, same matches: the cursor fits.
    assert (await repo.page(user_id, search="AN a", cursor=cursor, limit=2)).items


def _flipped_cursors(cursor: str) -> list[str]:
    """The cursor with each character replaced, and with each decoded byte's bits flipped."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    variants = []
    for i, char in enumerate(cursor):
        other = alphabet[(alphabet.index(char) + 1) % len(alphabet)]
        variants.append(cursor[:i] + other + cursor[i + 1 :])
    raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
    for i in range(len(raw)):
        for bit in (0x01, 0x80):
            changed = raw[:i] + bytes([raw[i] ^ bit]) + raw[i + 1 :]
            variants.append(base64.urlsafe_b64encode(changed).rstrip(b"=").decode())
    variants += [cursor[:-1], cursor[1:], cursor + "A", cursor + "=", "", " " + cursor]
    return variants


async def test_a_modified_cursor_is_refused_before_any_sql(
    session: AsyncSession, statements: StatementLog
) -> None:
    user_id = await _user(session)
    await _spread(session, user_id, 8)
    repo = TaskRepo(session)
    cursor = (await repo.page(user_id, sort="title", limit=3)).next_cursor
    assert cursor is not None
    statements.clear()

    variants = _flipped_cursors(cursor)
    for variant in variants:
        with pytest.raises(ValidationError) as caught:
            await repo.page(user_id, sort="title", limit=3, cursor=variant)
        assert "not a cursor this service issued" in _cursor_error(caught)
        assert cursor not in str(caught.value)  # the input is not echoed

    assert len(variants) > 2 * len(cursor)  # every character, every byte twice
    assert len(statements) == 0
    await repo.page(user_id, sort="title", limit=3, cursor=cursor)
    assert len(statements) == 1  # the untouched cursor runs


async def test_a_cursor_holds_no_title_email_or_user_id(session: AsyncSession) -> None:
    user_id = await _user(session, "owner_visible_id")
    repo = TaskRepo(session)
    title = "Geheimnis Überweisung 123"
    for _ in range(3):
        await repo.create(user_id, title=title, description="owner_visible_id@example.com")
    for sort in ("title", "-created"):
        cursor = (await repo.page(user_id, sort=sort, search="Geheimnis", limit=1)).next_cursor
        assert cursor is not None
        # Readable neither as text nor as base64 at any alignment.
        decoded = [
            base64.urlsafe_b64decode(cursor[i:] + "=" * (-len(cursor[i:]) % 4))
            for i in range(4)
            if len(cursor[i:]) % 4 != 1
        ]
        for secret in (title, "Geheimnis", "Überweisung", "owner_visible_id", "example.com"):
            assert secret not in cursor
            for piece in (secret.encode(), secret.encode("utf-16-le")):
                assert all(piece not in raw for raw in decoded), (sort, secret)


async def test_another_users_cursor_shows_nothing_of_theirs(session: AsyncSession) -> None:
    ada, bob = await _user(session), await _user(session)
    await _spread(session, ada, 10)
    await _spread(session, bob, 10)
    repo = TaskRepo(session)
    adas_cursor = (await repo.page(ada, limit=3)).next_cursor
    with pytest.raises(ValidationError) as caught:
        await repo.page(bob, cursor=adas_cursor, limit=3)
    assert "different query" in _cursor_error(caught)

    for sort in SORTS:
        for listed in (
            await all_pages(repo, bob, sort=sort, limit=3),
            await all_pages(repo, bob, sort=sort, limit=3, search="a"),
        ):
            assert listed
            assert {t.user_id for t in listed} == {bob}


async def test_cursors_survive_another_store_with_the_same_secret(
    todo_store_settings: Settings, new_user_id: str
) -> None:
    """Two instances of a service (same CURSOR_SECRET) resume each other's cursors; a store
    with another secret refuses them; a bare connection of the store has its key too."""
    same = todo_store_settings.model_copy(update={"cursor_secret": SecretStr("s" * 40)})
    other = todo_store_settings.model_copy(update={"cursor_secret": SecretStr("t" * 40)})
    async with TodoStore(same) as one, TodoStore(same) as two, TodoStore(other) as three:
        async with one.session() as session:
            await UserRepo(session).upsert(new_user_id, email=f"{new_user_id}@e.com", name="Key")
            for n in range(5):
                await TaskRepo(session).create(new_user_id, title=f"t{n}")
        try:
            async with one.session() as session:
                page = await TaskRepo(session).page(new_user_id, limit=2)
            async with two.session(atomic=False) as session:
                resumed = await TaskRepo(session).page(
                    new_user_id, limit=2, cursor=page.next_cursor
                )
            async with two.engine.connect() as connection:
                on_connection = await TaskRepo(connection).page(
                    new_user_id, limit=2, cursor=page.next_cursor
                )
            assert resumed.items == on_connection.items
            assert {t.id for t in resumed.items}.isdisjoint(t.id for t in page.items)
            async with three.session() as session:
                with pytest.raises(ValidationError) as caught:
                    await TaskRepo(session).page(new_user_id, limit=2, cursor=page.next_cursor)
            assert "not a cursor this service issued" in _cursor_error(caught)
        finally:
            async with one.session() as session:
                await UserRepo(session).delete(new_user_id)


# ------------------------------------------------------------------------------ search


async def _tasks(session: AsyncSession, user_id: str, *items: tuple[str, str | None]) -> list[int]:
    repo = TaskRepo(session)
    return [(await repo.create(user_id, title=t, description=d)).id for t, d in items]


async def _found(session: AsyncSession, user_id: str, search: str) -> set[int]:
    return {t.id for t in await all_pages(TaskRepo(session), user_id, search=search, limit=2)}


async def test_search_treats_percent_underscore_and_backslash_literally(
    session: AsyncSession,
) -> None:
    user_id = await _user(session)
    percent, underscore, backslash, plain = await _tasks(
        session,
        user_id,
        ("discount 100% off", None),
        ("file_name", None),
        ("path", "C:\\temp"),
        ("plain words filexname 100 percent", "C:/temp"),
    )
    assert await _found(session, user_id, "%") == {percent}
    assert await _found(session, user_id, "100%") == {percent}
    assert await _found(session, user_id, "_") == {underscore}
    assert await _found(session, user_id, "file_name") == {underscore}
    assert await _found(session, user_id, "\\") == {backslash}
    assert await _found(session, user_id, "C:\\temp") == {backslash}
    assert await _found(session, user_id, "\\t") == {backslash}
    assert await _found(session, user_id, "filexname") == {plain}


async def test_search_is_case_insensitive_in_any_script_and_needs_every_word(
    session: AsyncSession,
) -> None:
    user_id = await _user(session)
    russian, greek, japanese, both, title_only = await _tasks(
        session,
        user_id,
        ("Купить МОЛОКО", "в магазине"),
        ("ΣΟΦΊΑ και γνώση", None),
        ("買い物リスト", "牛乳とパン"),
        ("milk", "and BREAD from the shop"),
        ("milk only", None),
    )
    assert await _found(session, user_id, "молоко") == {russian}
    assert await _found(session, user_id, "купить Магазине") == {russian}
    assert await _found(session, user_id, "σοφία") == {greek}
    assert await _found(session, user_id, "ΓΝΏΣΗ") == {greek}
    assert await _found(session, user_id, "牛乳") == {japanese}
    assert await _found(session, user_id, "リスト パン") == {japanese}
    # Every word, in the title or the description.
    assert await _found(session, user_id, "MILK bread") == {both}
    assert await _found(session, user_id, "milk") == {both, title_only}
    assert await _found(session, user_id, "milk cheese") == set()
    # Blank search: no filter.
    assert len(await _found(session, user_id, "   ")) == 5


async def test_search_never_shows_another_users_tasks(session: AsyncSession) -> None:
    ada, bob = await _user(session), await _user(session)
    await _tasks(session, ada, ("shared word", None))
    (bobs,) = await _tasks(session, bob, ("shared word", None))
    assert await _found(session, bob, "shared") == {bobs}


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("arguments", "field"),
    [
        ({"sort": "name"}, "sort"),
        ({"sort": "+title"}, "sort"),
        ({"limit": 0}, "limit"),
        ({"limit": 501}, "limit"),
        ({"limit": "5"}, "limit"),
        ({"limit": True}, "limit"),
        ({"search": "x" * 201}, "search"),
        ({"search": "a\x00b"}, "search"),
        ({"search": " ".join(f"w{n}" for n in range(9))}, "search"),
        ({"search": 5}, "search"),
        ({"updated_since": datetime(2026, 1, 1)}, "updated_since"),  # naive
        ({"updated_since": "2026-01-01T00:00:00Z"}, "updated_since"),
        ({"completed": "yes"}, "completed"),
        ({"cursor": 5}, "cursor"),
        ({"cursor": "x" * 5000}, "cursor"),
    ],
)
async def test_bad_arguments_name_the_field_before_any_sql(
    session: AsyncSession, statements: StatementLog, arguments: dict[str, Any], field: str
) -> None:
    user_id = await _user(session)
    statements.clear()
    with pytest.raises(ValidationError) as caught:
        await TaskRepo(session).page(user_id, **arguments)
    assert [e["loc"][0] for e in caught.value.errors()] == [field]
    assert len(statements) == 0


async def test_a_bad_user_id_is_refused(session: AsyncSession) -> None:
    with pytest.raises(ValidationError) as caught:
        await TaskRepo(session).page("")
    assert caught.value.errors()[0]["loc"] == ("user_id",)


async def test_repr_of_a_page_shows_no_titles(session: AsyncSession) -> None:
    user_id = await _user(session)
    await _tasks(session, user_id, ("private title", None), ("another", None))
    page = await TaskRepo(session).page(user_id, limit=1)
    assert "private" not in repr(page)
    assert page.next_cursor is not None
    assert page.next_cursor not in repr(page)


# ------------------------------------------------------------------------------- plans


async def _plan_of_page(
    session: AsyncSession, todo_store_engine: AsyncEngine, user_id: str, **query: Any
) -> str:
    """EXPLAIN of the statement `page` sends, with its parameters."""
    captured: list[tuple[str, Any]] = []

    def capture(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        captured.append((statement, parameters))

    event.listen(todo_store_engine.sync_engine, "before_cursor_execute", capture)
    try:
        page = await TaskRepo(session).page(user_id, **query)
    finally:
        event.remove(todo_store_engine.sync_engine, "before_cursor_execute", capture)
    assert page.items  # the query is not trivially empty
    ((sql, parameters),) = captured
    connection = await session.connection()
    result = await connection.exec_driver_sql(f"EXPLAIN {sql}", parameters)
    return "\n".join(row[0] for row in result)


async def test_every_sort_reads_its_index_in_order_on_any_page(
    session: AsyncSession, todo_store_engine: AsyncEngine
) -> None:
    """Migration 0005's indexes serve each sort from the cursor's position: no Sort node, no
    sequential scan, so page 100 reads what page 1 reads."""
    prefix = _uid("bulk")
    await session.execute(
        text(
            """INSERT INTO users (id, email, name)
               SELECT :p || '_' || g, :p || '_' || g || '@example.com', 'Bulk'
               FROM generate_series(1, 100) AS g;
               """
        ),
        {"p": prefix},
    )
    await session.execute(
        text(
            """INSERT INTO tasks (user_id, title, completed, created_at)
               SELECT :p || '_' || (g % 100 + 1), 'task ' || (g * 7919 % 10007), g % 3 = 0,
                      CAST(:t0 AS timestamptz) + g * interval '1 second'
               FROM generate_series(1, 20000) AS g"""
        ),
        {"p": prefix, "t0": T0},
    )
    await session.execute(text("ANALYZE tasks"))
    user_id = f"{prefix}_7"
    for sort in SORTS:
        cursor = (await TaskRepo(session).page(user_id, sort=sort, limit=20)).next_cursor
        plan = await _plan_of_page(
            session, todo_store_engine, user_id, sort=sort, limit=20, cursor=cursor
        )
        assert f"idx_tasks_user_{sort.lstrip('-')}" in plan, (sort, plan)
        assert "Sort" not in plan, (sort, plan)
        assert "Seq Scan" not in plan, (sort, plan)


async def test_a_rare_word_is_found_through_the_search_index_where_it_exists(
    session: AsyncSession, todo_store_engine: AsyncEngine
) -> None:
    available = await session.scalar(
        text(
            """SELECT count(*) = 2 FROM pg_available_extensions
               WHERE name IN ('pg_trgm', 'btree_gin')"""
        )
    )
    index = await session.scalar(
        text("SELECT count(*) = 1 FROM pg_indexes WHERE indexname = 'idx_tasks_search_trgm'")
    )
    assert index == available  # created wherever the server has the extensions
    if not available:
        pytest.skip("no pg_trgm and btree_gin here: search reads the user's tasks in order")
    user_id = await _user(session)
    await session.execute(
        text(
            """INSERT INTO tasks (user_id, title)
               SELECT :u, 'task ' || g || CASE WHEN g % 1000 = 0 THEN ' quokka' ELSE '' END
               FROM generate_series(1, 20000) AS g"""
        ),
        {"u": user_id},
    )
    await session.execute(text("ANALYZE tasks"))
    plan = await _plan_of_page(session, todo_store_engine, user_id, search="quokka", limit=10)
    assert "idx_tasks_search_trgm" in plan, plan
