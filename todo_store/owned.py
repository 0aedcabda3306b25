"""Repositories for an application's own tables whose rows belong to one user: `OwnedRepo`.

A subclass names the table; the statements, the record class and the validation come from the
table's columns (see `columns.py`), with the guarantees `TaskRepo` gives for tasks.
"""

from __future__ import annotations

from typing import Any, ClassVar, Generic, TypeVar

from pydantic import BaseModel
from sqlalchemy import (
    Column,
    ColumnElement,
    Insert,
    Integer,
    Select,
    Table,
    Update,
    and_,
    bindparam,
    delete,
    func,
    insert,
    select,
    update,
)

from todo_store.columns import Shape, TableColumns, key_model, plain_record, read_only, values
from todo_store.errors import OWNER_KEYS, RowNotFound, UserNotFound
from todo_store.repositories import Columns, Executor, _run, _scalar
from todo_store.schemas import TaskListQuery, UserRef

R = TypeVar("R")


OWNER_COLUMN = "user_id"


def _owned_key(table: Table) -> Column[Any]:
    [key] = table.primary_key.columns
    return key


def _owned_where(table: Table) -> ColumnElement[bool]:
    return and_(table.c[OWNER_COLUMN] == bindparam("owner"), _owned_key(table) == bindparam("key"))


def _owned_list(columns: Columns, paged: bool) -> Select[Any]:
    table = columns[0].table
    key = _owned_key(table)
    keyset = [key < bindparam("before")] if paged else []
    return (
        select(*columns)
        .where(table.c[OWNER_COLUMN] == bindparam("owner"), *keyset)
        .order_by(key.desc())
        .limit(bindparam("row_limit", type_=Integer))
    )


def _owned_get(columns: Columns) -> Select[Any]:
    return select(*columns).where(_owned_where(columns[0].table))


def _owned_create(columns: Columns) -> Insert:
    return insert(columns[0].table).returning(*columns)


def _owned_update(columns: Columns, fields: tuple[str, ...]) -> Update:
    table = columns[0].table
    values: dict[str, Any] = {name: bindparam(f"new_{name}") for name in fields}
    return update(table).where(_owned_where(table)).values(values).returning(*columns)


def _owned_delete(columns: Columns) -> Any:
    table = columns[0].table
    return delete(table).where(_owned_where(table)).returning(_owned_key(table))


def _owned_count(columns: Columns) -> Select[Any]:
    table = columns[0].table
    return (
        select(func.count()).select_from(table).where(table.c[OWNER_COLUMN] == bindparam("owner"))
    )


def _owned_key_model(columns: Columns, field: str) -> type[BaseModel]:
    return key_model(_owned_key(columns[0].table), field)


class OwnedRepo(Generic[R]):
    """A repository for an application's own table whose rows belong to one user.

    Declare the table, and for typed fields a `NamedTuple` naming some or all of its columns:

        class TagRepo(OwnedRepo[TagRecord]):
            table = Tag.__table__
            record = TagRecord      # optional: without it, a record of all the columns

    The table needs a `user_id` column referencing `users.id` (ON DELETE CASCADE, so deleting
    a user deletes its rows) and a one-column primary key, best with an index on
    `(user_id, <key>)`. Guarantees, as for `TaskRepo`:

    - every statement filters on the `user_id` given; another user's row is reported exactly
      like a missing one (`RowNotFound`, a `NotFoundError`);
    - one statement per call; values are validated by their column's type before any SQL
      (`pydantic.ValidationError` naming the field; an unknown keyword is one too);
    - database errors arrive as the package's (`UserNotFound` for a missing owner,
      `DuplicateKey`, `InvalidData`, ...); repositories never commit;
    - results are immutable records whose repr shows only the key and the owner;
      `list_for` pages newest first by keyset on the key (`before=`).
    """

    table: ClassVar[Table]
    record: ClassVar[type[Any] | None] = None
    _rows: ClassVar[TableColumns[Any]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        declared = cls.__dict__.get("table")
        if declared is None and "_rows" in dir(cls):
            return  # a subclass of a repository that named its table: the same table
        table = getattr(declared, "__table__", declared)  # a declarative model or its Table
        if not isinstance(table, Table):
            raise TypeError(f"{cls.__name__}.table must be the application's Table (or model)")
        if OWNER_COLUMN not in table.c or len(table.primary_key.columns) != 1:
            raise TypeError(
                f"{cls.__name__}.table {table.name!r} needs a {OWNER_COLUMN!r} column and a "
                "one-column primary key"
            )
        key = _owned_key(table)
        shown = (key.name, OWNER_COLUMN)
        name = cls.__name__.removesuffix("Repo") + "Record"
        record = cls.__dict__.get("record")
        base = (
            plain_record(name, tuple(table.c.keys()), shown)
            if record is None
            else read_only(record, shown)
        )
        cls.table = table
        cls._rows = TableColumns(table, base, lambda column: column.name != OWNER_COLUMN)
        OWNER_KEYS.update(
            str(foreign_key.constraint.name)
            for foreign_key in table.c[OWNER_COLUMN].foreign_keys
            if foreign_key.constraint is not None
            and foreign_key.constraint.name
            and (foreign_key.ondelete or "").upper() == "CASCADE"
        )

    def __init__(self, session: Executor) -> None:
        self.session = session

    async def get(self, user_id: str, row_id: Any) -> R:
        """The row, or `RowNotFound` if it is missing or not this user's."""
        owner, key, shape = self._ref(user_id, row_id)
        row = await _run(
            self.session,
            shape.built(_owned_get),
            {"owner": owner, "key": key},
            shape.one_or_none,
        )
        return self._found(row, owner, key)

    async def list_for(
        self, user_id: str, *, limit: int = 50, before: Any | None = None
    ) -> list[R]:
        """The user's rows, newest (highest key) first; `before` (a key) pages by keyset."""
        query = TaskListQuery(user_id=user_id, limit=limit)
        shape = self._rows.shape()
        parameters: dict[str, Any] = {"owner": query.user_id, "row_limit": query.limit}
        if before is not None:
            parameters["before"] = self._key(shape, before, "before")
        statement = shape.built(_owned_list, before is not None)
        return await _run(self.session, statement, parameters, shape.all)

    async def create(self, user_id: str, **values: Any) -> R:
        """A new row owned by `user_id`; `UserNotFound` if no such user."""
        owner = UserRef(user_id=user_id).user_id
        shape = self._rows.shape()
        parameters = {**shape.create_values(values), OWNER_COLUMN: owner}
        try:
            return await _run(self.session, shape.built(_owned_create), parameters, shape.one)
        except UserNotFound:
            raise UserNotFound(owner) from None

    async def update(self, user_id: str, row_id: Any, **values: Any) -> R:
        """Write only the columns given; with none, the row as it is (one SELECT)."""
        owner, key, shape = self._ref(user_id, row_id)
        changes = shape.update_values(values)
        if not changes:
            return await self.get(owner, key)
        statement = shape.built(_owned_update, tuple(sorted(changes)))
        parameters = {f"new_{name}": value for name, value in changes.items()}
        parameters.update(owner=owner, key=key)
        row = await _run(self.session, statement, parameters, shape.one_or_none)
        return self._found(row, owner, key)

    async def delete(self, user_id: str, row_id: Any) -> None:
        """Delete the row; `RowNotFound` if it is missing or not this user's."""
        owner, key, shape = self._ref(user_id, row_id)
        parameters = {"owner": owner, "key": key}
        if await _run(self.session, shape.built(_owned_delete), parameters, _scalar) is None:
            raise RowNotFound(self.table.name, owner, key)

    async def count_for(self, user_id: str) -> int:
        """How many rows the user has."""
        owner = UserRef(user_id=user_id).user_id
        statement = self._rows.shape().built(_owned_count)
        return int(await _run(self.session, statement, {"owner": owner}, _scalar) or 0)

    def _ref(self, user_id: str, row_id: Any) -> tuple[str, Any, Shape[Any]]:
        shape = self._rows.shape()
        return UserRef(user_id=user_id).user_id, self._key(shape, row_id, "row_id"), shape

    @staticmethod
    def _key(shape: Shape[Any], value: Any, field: str) -> Any:
        """`value` validated by the key column's type; an error names `field`."""
        return values(shape.built(_owned_key_model, field), {field: value})[field]

    def _found(self, row: R | None, owner: str, key: Any) -> R:
        if row is None:
            raise RowNotFound(self.table.name, owner, key)
        return row
