"""`OwnedRepo`: an application's own user-owned table (`tags`) gets a repository.

The table is this test's, on a MetaData of its own (the package's metadata stays the
package's), created by the test's own DDL in a database of its own that the package's
migrations built first.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any, NamedTuple

import pytest
from conftest import StatementLog
from pydantic import ValidationError
from sqlalchemy import (
    BigInteger,
    Column,
    ForeignKey,
    Identity,
    Index,
    MetaData,
    String,
    Table,
    UniqueConstraint,
    event,
    text,
)
from sqlalchemy.ext.asyncio import AsyncSession

from todo_store import (
    DuplicateKey,
    OwnedRepo,
    RowNotFound,
    TodoStore,
    UserNotFound,
    UserRepo,
    migrations,
)
from todo_store.models import NAMING_CONVENTION, User
from todo_store.testing.plugin import settings_for

metadata = MetaData(naming_convention=NAMING_CONVENTION)
tags = Table(
    "tags",
    metadata,
    Column("id", BigInteger, Identity(always=True), primary_key=True),
    Column("user_id", ForeignKey(User.__table__.c.id, ondelete="CASCADE"), nullable=False),
    Column("name", String(40), nullable=False),
    Column("color", String(7), nullable=True),
    UniqueConstraint("user_id", "name"),
    Index("idx_tags_user_id", "user_id", "id"),
)


class TagRecord(NamedTuple):
    id: int
    user_id: str
    name: str


class TagRepo(OwnedRepo[TagRecord]):
    table = tags
    record = TagRecord


class UntypedTagRepo(OwnedRepo[Any]):
    table = tags


@pytest.fixture
async def tag_store(empty_database: str) -> AsyncIterator[TodoStore]:
    settings = settings_for(empty_database)
    await migrations.upgrade(settings)
    async with TodoStore(settings) as store:
        async with store.engine.begin() as connection:
            await connection.run_sync(metadata.create_all)  # only the test's own table
        yield store


@pytest.fixture
def statements_on(tag_store: TodoStore) -> Iterator[StatementLog]:
    """Every statement the test's store sends."""
    log = StatementLog()

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        log.statements.append(statement)

    event.listen(tag_store.engine.sync_engine, "before_cursor_execute", record)
    yield log
    event.remove(tag_store.engine.sync_engine, "before_cursor_execute", record)


@pytest.fixture
async def session(tag_store: TodoStore) -> AsyncIterator[AsyncSession]:
    """A session rolled back after the test, with users `ann` and `bob`."""
    async with tag_store.session() as session, session.begin_nested() as savepoint:
        await UserRepo(session).upsert("ann", email="ann@example.com", name="Ann")
        await UserRepo(session).upsert("bob", email="bob@example.com", name="Bob")
        yield session
        await savepoint.rollback()


async def test_rows_are_created_read_updated_and_deleted_per_user(session: AsyncSession) -> None:
    repo = TagRepo(session)
    tag = await repo.create("ann", name="home", color="#00ff00")
    assert isinstance(tag, TagRecord)
    assert (tag.user_id, tag.name, tag.color) == ("ann", "home", "#00ff00")
    assert await repo.get("ann", tag.id) == tag
    assert repr(tag) == f"TagRecord(id={tag.id}, user_id='ann')"  # no names, no colors
    with pytest.raises(AttributeError, match="read-only"):
        tag.name = "x"  # type: ignore[misc]

    changed = await repo.update("ann", tag.id, color=None)
    assert (changed.name, changed.color) == ("home", None)
    assert await repo.count_for("ann") == 1
    await repo.delete("ann", tag.id)
    assert await repo.count_for("ann") == 0


async def test_another_users_row_is_missing(session: AsyncSession) -> None:
    repo = TagRepo(session)
    theirs = await repo.create("bob", name="work")
    for call in (
        repo.get("ann", theirs.id),
        repo.update("ann", theirs.id, name="mine"),
        repo.delete("ann", theirs.id),
    ):
        with pytest.raises(RowNotFound) as raised:
            await call
        assert (raised.value.table, raised.value.user_id) == ("tags", "ann")
    assert await repo.get("bob", theirs.id) == theirs


async def test_keyset_pages_newest_first(session: AsyncSession) -> None:
    repo = UntypedTagRepo(session)
    made = [await repo.create("ann", name=f"t{n}") for n in range(5)]
    await repo.create("bob", name="t0")
    first = await repo.list_for("ann", limit=2)
    second = await repo.list_for("ann", limit=2, before=first[-1].id)
    rest = await repo.list_for("ann", limit=2, before=second[-1].id)
    assert [tag.id for tag in first + second + rest] == [tag.id for tag in reversed(made)]
    assert type(first[0]).__name__ == "UntypedTagRecord"
    assert first[0]._fields == ("id", "user_id", "name", "color")
    assert repr(first[0]) == f"UntypedTagRecord(id={first[0].id}, user_id='ann')"


async def test_bad_values_are_refused_before_any_sql(
    session: AsyncSession, statements_on: Any
) -> None:
    repo = TagRepo(session)
    cases: list[tuple[dict[str, Any], tuple[str, ...]]] = [
        ({}, ("name",)),  # NOT NULL without a default: required
        ({"name": "x" * 41}, ("name",)),
        ({"name": 5}, ("name",)),
        ({"name": "a\x00b"}, ("name",)),
        ({"name": "ok", "colour": "#fff"}, ("colour",)),  # unknown keyword
        ({"name": "ok", "id": 5}, ("id",)),  # generated: not settable
    ]
    statements_on.clear()
    for given, location in cases:
        with pytest.raises(ValidationError) as raised:
            await repo.create("ann", **given)
        assert raised.value.errors()[0]["loc"] == location, given
    for bad_key in ("1", True, 1.5):
        with pytest.raises(ValidationError) as raised:
            await repo.get("ann", bad_key)
        assert raised.value.errors()[0]["loc"] == ("row_id",)
    with pytest.raises(ValidationError):
        await repo.update("ann", 1, name=None)  # NOT NULL: not null
    assert statements_on.statements == []


def test_a_repository_needs_a_user_owned_table() -> None:
    with pytest.raises(TypeError, match="must be the application's Table"):

        class NoTable(OwnedRepo[Any]):
            pass

    unowned = Table("unowned", MetaData(), Column("id", BigInteger, primary_key=True))
    with pytest.raises(TypeError, match="needs a 'user_id' column"):

        class Unowned(OwnedRepo[Any]):
            table = unowned

    class MoreTags(TagRepo):  # a subclass keeps its parent's table
        pass

    assert MoreTags.table is tags


async def test_database_errors_are_the_packages(session: AsyncSession) -> None:
    repo = TagRepo(session)
    await repo.create("ann", name="home")
    with pytest.raises(DuplicateKey) as raised:
        async with session.begin_nested():
            await repo.create("ann", name="home")
    assert raised.value.constraint == "uq_tags_user_id_name"
    with pytest.raises(UserNotFound):
        async with session.begin_nested():
            await repo.create("nobody", name="home")


async def test_deleting_the_user_deletes_its_rows(session: AsyncSession) -> None:
    repo = TagRepo(session)
    await repo.create("ann", name="home")
    await UserRepo(session).delete("ann")
    assert await repo.count_for("ann") == 0
    assert await session.scalar(text("SELECT count(*) FROM tags WHERE user_id = 'ann'")) == 0
