"""A table's columns as they are when first used, and what follows from them.

An application adds columns to `tasks` / `users` (`Table("tasks", Base.metadata,
Column("priority", ...), extend_existing=True)`) or declares its own tables, in modules
imported before or after this package. So nothing here is fixed at import time: a
`TableColumns` builds its `Shape` on first use and builds it again when a column is attached
to its table later (a SQLAlchemy schema event), whatever the import order.

A `Shape` holds:
- the record class: the package's typed record (`TaskRecord`) when the table has only the
  package's columns; otherwise a subclass of it with the application's columns as further
  named fields, so `task.priority` reads like `task.title`, `isinstance(task, TaskRecord)`
  holds, and the repr and read-only rules are the package record's;
- input models for the writable columns it owns (an application's columns on `tasks`, or
  every column of an application's table): one for writing a new row (a NOT NULL column
  without a default is required), one for changing a row (every field optional, null only
  where the column is nullable); each field's rule comes from the column's type (integer
  ranges, string lengths, no NUL characters, time zones, enum values), strict like every
  other input, and an unknown keyword is an error naming it;
- the statements built from those columns, each built once per shape (`built`).
"""

from __future__ import annotations

import datetime as dt
import decimal
import uuid
from collections import namedtuple
from collections.abc import Callable, Collection, Hashable, Mapping
from typing import TYPE_CHECKING, Annotated, Any, Generic, Literal, TypeVar, cast

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    JsonValue,
    StringConstraints,
    create_model,
)
from sqlalchemy import Column, Table, event, types
from sqlalchemy.sql.schema import Computed, Identity

from todo_store.schemas import BIGINT_MAX, INTEGER_MAX, _no_nul

if TYPE_CHECKING:
    from todo_store.units import Rows

R = TypeVar("R", bound=tuple[Any, ...])
S = TypeVar("S")

SMALLINT_MAX = 2**15 - 1

_INPUT_CONFIG = ConfigDict(
    strict=True, extra="forbid", frozen=True, hide_input_in_errors=True, populate_by_name=False
)


def _int_to_decimal(value: object) -> object:
    return decimal.Decimal(value) if type(value) is int else value


def _integer(maximum: int) -> Any:
    return Annotated[int, Field(strict=True, ge=-maximum - 1, le=maximum)]


# Column types whose rule does not depend on the column's parameters, most specific first.
_SIMPLE_RULES: tuple[tuple[type[types.TypeEngine[Any]], Any], ...] = (
    (types.Boolean, bool),
    (types.SmallInteger, _integer(SMALLINT_MAX)),
    (types.BigInteger, _integer(BIGINT_MAX)),
    (types.Integer, _integer(INTEGER_MAX)),
    (types.Float, Annotated[float, Field(strict=True, allow_inf_nan=False)]),
    (types.Date, dt.date),
    (types.Time, dt.time),
    (types.Interval, dt.timedelta),
    (types.Uuid, uuid.UUID),
    (types.JSON, JsonValue),
)


def _rule(column_type: types.TypeEngine[Any]) -> Any:
    """The validation rule for a value of this column type (without nullability)."""
    if isinstance(column_type, types.Enum):
        if column_type.enum_class is not None:
            return column_type.enum_class
        return Literal[tuple(column_type.enums)]
    for kind, rule in _SIMPLE_RULES:
        if isinstance(column_type, kind):
            return rule
    if isinstance(column_type, types.Numeric):  # after Float, which is a Numeric
        # The constraints come first: they belong to the Decimal schema, which the
        # BeforeValidator then wraps (pydantic 2.9 cannot put them on a wrapped schema).
        return Annotated[
            decimal.Decimal,
            Field(
                strict=True,
                max_digits=column_type.precision,
                decimal_places=column_type.scale,
                allow_inf_nan=False,
            ),
            BeforeValidator(_int_to_decimal),  # an int is a fine Decimal; "1.5" is not
        ]
    if isinstance(column_type, types.String):  # Text, Unicode and String(n)
        return Annotated[
            str, StringConstraints(max_length=column_type.length), AfterValidator(_no_nul)
        ]
    if isinstance(column_type, types.DateTime):
        return AwareDatetime if column_type.timezone else dt.datetime
    if isinstance(column_type, types.ARRAY):
        return list[_rule(column_type.item_type)]  # type: ignore[misc]
    try:
        return column_type.python_type
    except NotImplementedError:  # a custom type that does not say: the database decides
        return Any


def _server_generated(column: Column[Any]) -> bool:
    return isinstance(column.server_default, Identity | Computed) or column.computed is not None


def _has_default(column: Column[Any]) -> bool:
    return bool(column.server_default is not None or column.default is not None or column.nullable)


def input_model(name: str, columns: Collection[Column[Any]], *, partial: bool) -> type[BaseModel]:
    """A strict input model whose fields are `columns`, each validated by its type.

    Fields are addressed by the column name (also when it is not a Python identifier or
    shadows a pydantic name); validation errors name it. `partial`: every field optional.
    """
    fields: dict[str, Any] = {}
    for index, column in enumerate(columns):
        rule = _rule(column.type)
        if column.nullable:
            rule = rule | None
        required = not partial and not _has_default(column)
        default = ... if required else None
        fields[f"column_{index}"] = (rule, Field(default, alias=column.name))
    return cast(type[BaseModel], create_model(name, __config__=_INPUT_CONFIG, **fields))


def key_model(column: Column[Any], field: str) -> type[BaseModel]:
    """A strict input model of one required field, `field`, validated as `column`'s values."""
    rule = (_rule(column.type), Field(..., alias=field))
    model: type[BaseModel] = create_model(field, __config__=_INPUT_CONFIG, value=rule)
    return model


def values(model: type[BaseModel], given: Mapping[str, Any]) -> dict[str, Any]:
    """The given values validated by `model`, by column name (only those given)."""
    validated = model.model_validate(given)
    return validated.model_dump(by_alias=True, include=validated.model_fields_set)


def record_type(base: type[R], names: tuple[str, ...]) -> type[R]:
    """`base` if it names exactly `names`, else a subclass of it with the others added."""
    base_fields: tuple[str, ...] = getattr(base, "_fields")  # noqa: B009 (NamedTuple protocol)
    if names == base_fields:
        return base
    plain = namedtuple(base.__name__, names)  # type: ignore[misc]
    body = {
        "__slots__": (),
        "__doc__": base.__doc__,
        "__module__": base.__module__,
        "__qualname__": base.__qualname__,
        # The package record's rules win over namedtuple's: no field values in the repr.
        "__repr__": base.__repr__,
        "__setattr__": base.__setattr__,
    }
    return cast(type[R], type(base.__name__, (plain, base), body))


class ReadOnlyRecord:
    """Rules of an application table's records: read-only, a repr without user data."""

    __slots__ = ()
    _shown: tuple[str, ...] = ()

    def __repr__(self) -> str:
        shown = ", ".join(f"{field}={getattr(self, field)!r}" for field in self._shown)
        return f"{type(self).__name__}({shown})"

    def __setattr__(self, field: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is read-only (tried to set {field!r})")


def read_only(record: type[R], shown: tuple[str, ...]) -> type[R]:
    """`record` (an application's NamedTuple) with `ReadOnlyRecord`'s repr and rules."""
    body = {"__slots__": (), "_shown": shown, "__module__": record.__module__}
    return cast(type[R], type(record.__name__, (ReadOnlyRecord, record), body))


def plain_record(name: str, names: tuple[str, ...], shown: tuple[str, ...]) -> type[Any]:
    """A record class for an application's table, its fields `names`, its repr `shown`."""
    plain = namedtuple(name, names)  # type: ignore[misc]
    # ReadOnlyRecord first: its repr and read-only rule win over namedtuple's.
    return type(name, (ReadOnlyRecord, plain), {"__slots__": (), "_shown": shown})


class Shape(Generic[R]):
    """A table's columns at one moment: the record class, input models, statements."""

    def __init__(self, table: Table, record: type[R], owned: Callable[[Column[Any]], bool]) -> None:
        base_fields: tuple[str, ...] = getattr(record, "_fields")  # noqa: B009
        missing = [name for name in base_fields if name not in table.c]
        if missing:
            raise RuntimeError(f"table {table.name} has no column(s) {', '.join(missing)}")
        rest = [column for column in table.c if column.name not in base_fields]
        self.columns: tuple[Column[Any], ...] = (
            *(table.c[name] for name in base_fields),
            *rest,
        )
        self.record: type[R] = record_type(record, tuple(column.name for column in self.columns))
        self.make: Callable[[Any], R] = getattr(self.record, "_make")  # noqa: B009
        writable = [c for c in self.columns if owned(c) and not _server_generated(c)]
        self.writable = tuple(column.name for column in writable)
        self.required = tuple(column.name for column in writable if not _has_default(column))
        self.create_model = input_model(f"{table.name} values", writable, partial=False)
        changeable = [column for column in writable if not column.primary_key]
        self.update_model = input_model(f"{table.name} changes", changeable, partial=True)
        self._statements: dict[Hashable, Any] = {}

    def create_values(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """`given` validated for a new row (required columns present), by column name."""
        if not given and not self.required:
            return {}
        return values(self.create_model, given)

    def update_values(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """`given` validated as changes to a row, by column name."""
        return values(self.update_model, given) if given else {}

    def built(self, build: Callable[..., S], *args: Hashable) -> S:
        """`build(columns, *args)` (a statement, mostly), built once per shape: SQLAlchemy's
        compiled cache then serves every call without rebuilding a statement or its key."""
        key = (build, *args)
        statement = self._statements.get(key)
        if statement is None:
            statement = self._statements[key] = build(self.columns, *args)
        return cast(S, statement)

    def one(self, result: Rows) -> R:
        return self.make(result.one())

    def one_or_none(self, result: Rows) -> R | None:
        row = result.one_or_none()
        return None if row is None else self.make(row)

    def all(self, result: Rows) -> list[R]:
        return list(map(self.make, result.all()))


class TableColumns(Generic[R]):
    """A table whose rows are read as `record`s: its current `Shape`, rebuilt on change.

    `owned(column)` says which columns the `Shape`'s input models cover (the others are
    validated by the caller's own rules, or never written).
    """

    def __init__(self, table: Table, record: type[R], owned: Callable[[Column[Any]], bool]) -> None:
        self.table = table
        self._record = record
        self._owned = owned
        self._shape: Shape[R] | None = None
        _TRACKED.setdefault(table, []).append(self)

    def shape(self) -> Shape[R]:
        shape = self._shape
        if shape is None:
            shape = self._shape = Shape(self.table, self._record, self._owned)
        return shape

    def forget(self) -> None:
        self._shape = None


_TRACKED: dict[Table, list[TableColumns[Any]]] = {}


@event.listens_for(Column, "after_parent_attach")
def _column_attached(column: Column[Any], table: Any) -> None:
    # A column added to a table after its shape was built (an application's models imported
    # after the first query): the next call builds the shape again, with it.
    for columns in _TRACKED.get(table, ()):
        columns.forget()
