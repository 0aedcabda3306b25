"""Validation rules derived from column types, and records extended by added columns.

On tables of this test's own MetaData: the package's tables are left alone.
"""

from __future__ import annotations

import datetime as dt
import decimal
import enum
import uuid
from typing import Any

import pytest
from pydantic import ValidationError
from sqlalchemy import (
    ARRAY,
    JSON,
    BigInteger,
    Boolean,
    Column,
    Date,
    DateTime,
    Enum,
    Integer,
    MetaData,
    Numeric,
    SmallInteger,
    String,
    Table,
    Text,
    Uuid,
    text,
)

from todo_store.columns import TableColumns, input_model, values
from todo_store.schemas import TaskRecord


class Mood(enum.Enum):
    HAPPY = "happy"
    SAD = "sad"


metadata = MetaData()
kinds = Table(
    "kinds",
    metadata,
    Column("small", SmallInteger),
    Column("plain", Integer),
    Column("big", BigInteger),
    Column("short", String(3)),
    Column("long", Text),
    Column("flag", Boolean),
    Column("money", Numeric(5, 2)),
    Column("at", DateTime(timezone=True)),
    Column("day", Date),
    Column("mood", Enum(Mood)),
    Column("size", Enum("s", "m", "l", name="size")),
    Column("ref", Uuid),
    Column("data", JSON),
    Column("labels", ARRAY(String(5))),
    Column("required", Integer, nullable=False),
    Column("defaulted", Integer, nullable=False, server_default=text("0")),
)
MODEL = input_model("kinds values", list(kinds.c), partial=False)
REQUIRED = {"required": 1}

NOW = dt.datetime.now(dt.UTC)


@pytest.mark.parametrize(
    ("column", "good", "bad"),
    [
        ("small", [-(2**15), 2**15 - 1], [2**15, "1", 1.0, True]),
        ("plain", [2**31 - 1], [2**31]),
        ("big", [2**63 - 1], [2**63]),
        ("short", ["abc", ""], ["abcd", "a\x00", 1]),
        ("long", ["x" * 100_000], [b"x"]),
        ("flag", [True, False], [1, "true"]),
        ("money", [decimal.Decimal("999.99"), 5], [decimal.Decimal("1000.00"), "1.5", 1.5, True]),
        ("at", [NOW], [NOW.replace(tzinfo=None), "2020-01-01T00:00:00Z"]),
        ("day", [dt.date(2020, 1, 1)], ["2020-01-01"]),
        ("mood", [Mood.HAPPY], ["angry"]),
        ("size", ["m"], ["xl"]),
        ("ref", [uuid.uuid4()], ["not-a-uuid"]),
        ("data", [{"a": [1, None]}], [{1, 2}]),
        ("labels", [["a", "bcdef"]], [["abcdef"], "a"]),
    ],
)
def test_each_column_type_has_its_rule(column: str, good: list[Any], bad: list[Any]) -> None:
    for value in good:
        assert values(MODEL, {**REQUIRED, column: value})[column] == value
    for value in bad:
        with pytest.raises(ValidationError) as raised:
            values(MODEL, {**REQUIRED, column: value})
        assert raised.value.errors()[0]["loc"][0] == column, value
        assert "input_value" not in str(raised.value)  # the value is not echoed


def test_required_nullable_and_partial() -> None:
    assert values(MODEL, {"required": 1, "long": None}) == {"required": 1, "long": None}
    with pytest.raises(ValidationError) as raised:
        values(MODEL, {})
    assert [e["loc"] for e in raised.value.errors()] == [("required",)]
    with pytest.raises(ValidationError):
        values(MODEL, {"required": 1, "defaulted": None})  # NOT NULL: not null
    partial = input_model("kinds changes", list(kinds.c), partial=True)
    assert values(partial, {}) == {}
    with pytest.raises(ValidationError) as raised:
        values(partial, {"nope": 1})
    assert raised.value.errors()[0]["loc"] == ("nope",)


def test_a_column_added_later_extends_the_record() -> None:
    own = MetaData()
    tasks = Table("tasks", own, *(Column(name, Integer) for name in TaskRecord._fields))
    columns = TableColumns(tasks, TaskRecord, lambda column: column.name not in TaskRecord._fields)
    assert columns.shape().record is TaskRecord
    assert columns.shape().create_values({}) == {}

    Table("tasks", own, Column("priority", SmallInteger), extend_existing=True)
    shape = columns.shape()
    assert shape.record is not TaskRecord
    assert issubclass(shape.record, TaskRecord)
    record = shape.make([1, "u", "secret title", "secret text", False, None, None, 1, 3])
    assert (record.title, record.priority) == ("secret title", 3)
    assert record._asdict()["priority"] == 3
    assert "secret" not in repr(record)
    with pytest.raises(AttributeError, match="read-only"):
        record.priority = 4
    with pytest.raises(AttributeError, match="has no field 'priorty'"):
        _ = record.priorty
    assert shape.create_values({"priority": 3}) == {"priority": 3}
    with pytest.raises(ValidationError):
        shape.create_values({"title": "not an application column"})
