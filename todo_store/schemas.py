"""Validation rules for everything a caller passes in, and read models for results.

Each rule is written once, as an annotated type, and used by the repositories before any
SQL is sent. A rule violation raises `pydantic.ValidationError` (a `ValueError`) whose
error locations name the offending field.

`TaskRecord` / `UserRecord` are what the repositories return: a row as stored, immutable,
detached from any session. `TaskRead` / `UserRead` are the pydantic models an API returns.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, NamedTuple

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    EmailStr,
    Field,
    StringConstraints,
    field_validator,
)

from todo_store.models import EMAIL_MAX, NAME_MAX, TITLE_MAX, USER_ID_MAX

BIGINT_MAX = 2**63 - 1
INTEGER_MAX = 2**31 - 1
DESCRIPTION_MAX = 10_000
LIST_LIMIT_MAX = 500


def _no_nul(value: str) -> str:
    # PostgreSQL text cannot store U+0000; refusing it here beats a driver error later.
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


def _lower(value: str) -> str:
    return value.lower()


UserId = Annotated[
    str, StringConstraints(min_length=1, max_length=USER_ID_MAX), AfterValidator(_no_nul)
]
TaskId = Annotated[int, Field(strict=True, gt=0, le=BIGINT_MAX)]
Title = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=TITLE_MAX),
    AfterValidator(_no_nul),
]
Description = Annotated[str, StringConstraints(max_length=DESCRIPTION_MAX), AfterValidator(_no_nul)]
Email = Annotated[
    EmailStr,
    StringConstraints(max_length=EMAIL_MAX),
    AfterValidator(_no_nul),
    AfterValidator(_lower),
]
Name = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=NAME_MAX),
    AfterValidator(_no_nul),
]
ListLimit = Annotated[int, Field(strict=True, ge=1, le=LIST_LIMIT_MAX)]
Version = Annotated[int, Field(strict=True, ge=1, le=INTEGER_MAX)]


class _Input(BaseModel):
    # strict: "5" is not a task id and 1 is not a title; unknown fields are mistakes.
    # The error names the field and the rule, never the value: titles and emails are user
    # data, and errors end up in logs.
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, hide_input_in_errors=True)


class UserRef(_Input):
    user_id: UserId


class TaskRef(_Input):
    user_id: UserId
    task_id: TaskId


class ExpectedVersion(_Input):
    """The version of a task the caller last saw (`expected_version=`), if any."""

    expected_version: Version | None = None


class TaskCreate(_Input):
    title: Title
    description: Description | None = None


class TaskPatch(_Input):
    """A partial update: only the fields given are written (`model_fields_set`)."""

    title: Title | None = None
    description: Description | None = None
    completed: bool | None = None

    @field_validator("title", "completed")
    @classmethod
    def _not_null(cls, value: object) -> object:
        # Runs only for fields the caller gave: omitting them is fine, null is not.
        if value is None:
            raise ValueError("may be omitted but not null")
        return value

    def changes(self) -> dict[str, Any]:
        """The fields the caller gave, by column name."""
        return self.model_dump(include=self.model_fields_set)


class TaskListQuery(_Input):
    user_id: UserId
    completed: bool | None = None
    limit: ListLimit = 50
    before: TaskId | None = None


class UserProfile(_Input):
    """What a user may set about themselves (e.g. the body of `PUT /me`)."""

    email: Email
    name: Name


class UserUpsert(UserProfile):
    user_id: UserId


class EmailLookup(_Input):
    email: Email


class TaskRead(BaseModel):
    """A task as an API returns it."""

    model_config = ConfigDict(from_attributes=True)

    id: int
    user_id: str
    title: str
    description: str | None
    completed: bool
    created_at: datetime
    updated_at: datetime
    version: int


class UserRead(BaseModel):
    """A user as an API returns it."""

    model_config = ConfigDict(from_attributes=True)

    id: str
    email: str
    name: str
    created_at: datetime


def _no_column(record: tuple[Any, ...], name: str) -> AttributeError:
    fields = ", ".join(getattr(record, "_fields", ()))
    return AttributeError(f"{type(record).__name__} has no field {name!r} (fields: {fields})")


class TaskRecord(NamedTuple):
    """A task as stored, returned by `TaskRepo`: complete, immutable, tied to no session.

    Fields are the `tasks` columns: the package's, typed below, then the ones an application
    adds to the table (`task.priority`), by name. Reading one never touches the database.
    Assigning to one raises `AttributeError`: change a task with `TaskRepo.update(...)` (or
    `toggle`, `set_completed`), which writes it at once.
    """

    id: int
    user_id: str
    title: str
    description: str | None
    completed: bool
    created_at: datetime
    updated_at: datetime
    version: int

    def __getattr__(self, name: str) -> Any:
        # Reached only for a name that is not a column: the application's columns are
        # real fields of the record class built for the table (see `record_type`).
        raise _no_column(self, name)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(
            f"TaskRecord is read-only (tried to set {name!r}): "
            "change a task with TaskRepo.update(), toggle() or set_completed()"
        )

    def __repr__(self) -> str:
        # Titles and descriptions are user data: kept out of reprs, like bound parameters.
        return f"TaskRecord(id={self.id!r}, user_id={self.user_id!r}, completed={self.completed!r})"


class UserRecord(NamedTuple):
    """A user as stored, returned by `UserRepo`: complete, immutable, tied to no session.

    Fields are the `users` columns: the package's, typed below, then the ones an application
    adds to the table, by name. Change a user with
    `UserRepo.upsert(...)`; assigning to a field raises `AttributeError`.
    """

    id: str
    email: str
    name: str
    created_at: datetime

    def __getattr__(self, name: str) -> Any:
        raise _no_column(self, name)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(
            f"UserRecord is read-only (tried to set {name!r}): change a user with UserRepo.upsert()"
        )

    def __repr__(self) -> str:
        return f"UserRecord(id={self.id!r})"
