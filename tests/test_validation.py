"""Bad input is refused before any SQL is sent, with an error naming the caller's argument.

Each row of the matrix is one bad input to one repository method. Every case asserts: the
error is a `ValueError` (pydantic's `ValidationError`), one of its locations names the
argument the caller used, no statement reached the database, and no table changed.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_asyncio
from pydantic import ValidationError
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from todo_store import TaskRepo, UserRepo
from todo_store.schemas import TaskCreate


@dataclass
class Ctx:
    """A valid user with a valid task, so only the bad argument can be wrong."""

    tasks: TaskRepo
    users: UserRepo
    uid: str
    tid: int


@pytest_asyncio.fixture(loop_scope="session")
async def ctx(session: AsyncSession) -> Ctx:
    tasks, users = TaskRepo(session), UserRepo(session)
    uid = f"v_{uuid.uuid4().hex[:12]}"
    await users.upsert(uid, email=f"{uid}@example.com", name="Valid")
    task = await tasks.create(uid, title="valid", description="valid")
    return Ctx(tasks, users, uid, task.id)


Call = Callable[[Ctx], Awaitable[Any]]

# 256 characters, otherwise well formed (64-character local part, labels of at most 63).
LONG_EMAIL = "a" * 64 + "@" + ".".join(["b" * 63, "c" * 63, "d" * 51]) + ".example.com"


def case(call: Call, field: str, case_id: str, *, marks: Any = ()) -> Any:
    return pytest.param(call, field, id=case_id, marks=marks)


BAD_INPUTS = [
    # TaskRepo.list_for
    case(lambda c: c.tasks.list_for(123), "user_id", "list_for-user_id-int"),
    case(lambda c: c.tasks.list_for(""), "user_id", "list_for-user_id-empty"),
    case(lambda c: c.tasks.list_for("u" * 256), "user_id", "list_for-user_id-256"),
    case(lambda c: c.tasks.list_for("u\x00"), "user_id", "list_for-user_id-NUL"),
    case(lambda c: c.tasks.list_for(c.uid, limit=0), "limit", "list_for-limit-0"),
    case(lambda c: c.tasks.list_for(c.uid, limit=501), "limit", "list_for-limit-501"),
    case(lambda c: c.tasks.list_for(c.uid, limit=-1), "limit", "list_for-limit-negative"),
    case(lambda c: c.tasks.list_for(c.uid, limit="10"), "limit", "list_for-limit-str"),
    case(lambda c: c.tasks.list_for(c.uid, limit=True), "limit", "list_for-limit-bool"),
    case(lambda c: c.tasks.list_for(c.uid, before=0), "before", "list_for-before-0"),
    case(lambda c: c.tasks.list_for(c.uid, before=-7), "before", "list_for-before-negative"),
    case(lambda c: c.tasks.list_for(c.uid, before="5"), "before", "list_for-before-str"),
    case(lambda c: c.tasks.list_for(c.uid, before=2**63), "before", "list_for-before-2**63"),
    case(lambda c: c.tasks.list_for(c.uid, completed="yes"), "completed", "list_for-completed-str"),
    case(lambda c: c.tasks.list_for(c.uid, completed=1), "completed", "list_for-completed-int"),
    # TaskRepo.get
    case(lambda c: c.tasks.get(c.uid, 0), "task_id", "get-task_id-0"),
    case(lambda c: c.tasks.get(c.uid, -1), "task_id", "get-task_id-negative"),
    case(lambda c: c.tasks.get(c.uid, 2**63), "task_id", "get-task_id-2**63"),
    case(lambda c: c.tasks.get(c.uid, "5"), "task_id", "get-task_id-str"),
    case(lambda c: c.tasks.get(c.uid, True), "task_id", "get-task_id-bool"),
    case(lambda c: c.tasks.get(c.uid, 1.0), "task_id", "get-task_id-float"),
    case(lambda c: c.tasks.get(c.uid, None), "task_id", "get-task_id-None"),
    case(lambda c: c.tasks.get(None, c.tid), "user_id", "get-user_id-None"),
    # TaskRepo.create
    case(lambda c: c.tasks.create(c.uid, title=""), "title", "create-title-empty"),
    case(lambda c: c.tasks.create(c.uid, title=" \t\n "), "title", "create-title-whitespace"),
    case(lambda c: c.tasks.create(c.uid, title="t" * 201), "title", "create-title-201"),
    case(lambda c: c.tasks.create(c.uid, title="a\x00b"), "title", "create-title-NUL"),
    case(lambda c: c.tasks.create(c.uid, title=None), "title", "create-title-None"),
    case(lambda c: c.tasks.create(c.uid, title=5), "title", "create-title-int"),
    case(lambda c: c.tasks.create(c.uid, title=b"bytes"), "title", "create-title-bytes"),
    case(
        lambda c: c.tasks.create(c.uid, title="ok", description="d\x00"),
        "description",
        "create-description-NUL",
    ),
    case(
        lambda c: c.tasks.create(c.uid, title="ok", description="d" * 10_001),
        "description",
        "create-description-10001",
    ),
    case(
        lambda c: c.tasks.create(c.uid, title="ok", description=42),
        "description",
        "create-description-int",
    ),
    case(lambda c: c.tasks.create("", title="ok"), "user_id", "create-user_id-empty"),
    case(lambda c: c.tasks.create("u\x00", title="ok"), "user_id", "create-user_id-NUL"),
    # TaskRepo.update
    case(lambda c: c.tasks.update(c.uid, c.tid, title=None), "title", "update-title-None"),
    case(lambda c: c.tasks.update(c.uid, c.tid, title="  "), "title", "update-title-blank"),
    case(lambda c: c.tasks.update(c.uid, c.tid, title="t" * 201), "title", "update-title-201"),
    case(lambda c: c.tasks.update(c.uid, c.tid, title="\x00"), "title", "update-title-NUL"),
    case(
        lambda c: c.tasks.update(c.uid, c.tid, completed="yes"),
        "completed",
        "update-completed-str",
    ),
    case(
        lambda c: c.tasks.update(c.uid, c.tid, completed=None),
        "completed",
        "update-completed-None",
    ),
    case(
        lambda c: c.tasks.update(c.uid, c.tid, description="d" * 10_001),
        "description",
        "update-description-10001",
    ),
    case(
        lambda c: c.tasks.update(c.uid, c.tid, description="x\x00y"),
        "description",
        "update-description-NUL",
    ),
    case(lambda c: c.tasks.update(c.uid, "5", title="ok"), "task_id", "update-task_id-str"),
    case(lambda c: c.tasks.update(c.uid, 0), "task_id", "update-task_id-0-no-fields"),
    # TaskRepo.set_completed / toggle / delete
    case(
        lambda c: c.tasks.set_completed(c.uid, c.tid, "yes"),
        "completed",
        "set_completed-completed-str",
    ),
    case(
        lambda c: c.tasks.set_completed(c.uid, c.tid, None),
        "completed",
        "set_completed-completed-None",
    ),
    case(lambda c: c.tasks.set_completed(c.uid, 0), "task_id", "set_completed-task_id-0"),
    case(lambda c: c.tasks.toggle(c.uid, 2**63), "task_id", "toggle-task_id-2**63"),
    case(lambda c: c.tasks.toggle(c.uid, True), "task_id", "toggle-task_id-bool"),
    case(lambda c: c.tasks.toggle("u" * 256, c.tid), "user_id", "toggle-user_id-256"),
    case(lambda c: c.tasks.delete(c.uid, -5), "task_id", "delete-task_id-negative"),
    case(lambda c: c.tasks.delete(c.uid, "1"), "task_id", "delete-task_id-str"),
    case(lambda c: c.tasks.delete("", c.tid), "user_id", "delete-user_id-empty"),
    # TaskRepo bulk methods
    case(lambda c: c.tasks.count_for(c.uid, completed="no"), "completed", "count_for-completed"),
    case(lambda c: c.tasks.count_for(None), "user_id", "count_for-user_id-None"),
    case(lambda c: c.tasks.complete_all(""), "user_id", "complete_all-user_id-empty"),
    case(lambda c: c.tasks.complete_all(7), "user_id", "complete_all-user_id-int"),
    case(lambda c: c.tasks.delete_completed("u\x00"), "user_id", "delete_completed-user_id-NUL"),
    case(lambda c: c.tasks.delete_completed("u" * 256), "user_id", "delete_completed-user_id-256"),
    # UserRepo.upsert
    case(
        lambda c: c.users.upsert(c.uid, email="not-an-email", name="n"),
        "email",
        "upsert-email-invalid",
    ),
    case(lambda c: c.users.upsert(c.uid, email="", name="n"), "email", "upsert-email-empty"),
    case(lambda c: c.users.upsert(c.uid, email=LONG_EMAIL, name="n"), "email", "upsert-email-256"),
    case(
        lambda c: c.users.upsert(c.uid, email="a\x00b@example.com", name="n"),
        "email",
        "upsert-email-NUL",
    ),
    case(lambda c: c.users.upsert(c.uid, email=None, name="n"), "email", "upsert-email-None"),
    case(
        lambda c: c.users.upsert(c.uid, email="a@example.com", name=""), "name", "upsert-name-empty"
    ),
    case(
        lambda c: c.users.upsert(c.uid, email="a@example.com", name="   "),
        "name",
        "upsert-name-whitespace",
    ),
    case(
        lambda c: c.users.upsert(c.uid, email="a@example.com", name="n" * 201),
        "name",
        "upsert-name-201",
    ),
    case(
        lambda c: c.users.upsert(c.uid, email="a@example.com", name="Ada\x00"),
        "name",
        "upsert-name-NUL",
    ),
    case(lambda c: c.users.upsert(c.uid, email="a@example.com", name=3), "name", "upsert-name-int"),
    *[
        case(
            lambda c, bad=bad: c.users.upsert(bad, email="a@example.com", name="n"),
            "user_id",
            f"upsert-user_id-{label}",
        )
        for bad, label in [("", "empty"), ("u\x00", "NUL"), ("u" * 256, "256"), (9, "int")]
    ],
    # UserRepo.get / get_by_email / delete
    case(lambda c: c.users.get(""), "user_id", "user_get-user_id-empty"),
    case(lambda c: c.users.get("u\x00"), "user_id", "user_get-user_id-NUL"),
    case(lambda c: c.users.get_by_email("nope"), "email", "get_by_email-invalid"),
    case(lambda c: c.users.get_by_email(LONG_EMAIL), "email", "get_by_email-256"),
    case(lambda c: c.users.get_by_email(None), "email", "get_by_email-None"),
    case(lambda c: c.users.delete("u" * 256), "user_id", "user_delete-user_id-256"),
    case(lambda c: c.users.delete(""), "user_id", "user_delete-user_id-empty"),
]


async def _row_counts(session: AsyncSession) -> tuple[int, int]:
    row = (
        await session.execute(
            text("SELECT (SELECT count(*) FROM users), (SELECT count(*) FROM tasks)")
        )
    ).one()
    return row[0], row[1]


@pytest.mark.parametrize(("call", "field"), BAD_INPUTS)
async def test_bad_input_is_refused_before_any_sql(
    ctx: Ctx, session: AsyncSession, statements: Any, call: Call, field: str
) -> None:
    before = await _row_counts(session)
    statements.clear()

    with pytest.raises(ValidationError) as caught:
        await call(ctx)

    sent = list(statements.statements)
    assert isinstance(caught.value, ValueError)
    locations = [error["loc"] for error in caught.value.errors()]
    assert field in {loc[0] for loc in locations if loc}, locations
    assert sent == []
    assert await _row_counts(session) == before


# The other side of each boundary: the largest / smallest legal values pass validation.
EMAIL_254 = "a" * 64 + "@" + ".".join(["b" * 63, "c" * 63, "d" * 49]) + ".example.com"
EDGE_INPUTS = [
    pytest.param(lambda c: c.tasks.create(c.uid, title="t" * 200), id="title-200"),
    pytest.param(lambda c: c.tasks.create(c.uid, title=f"  {'t' * 200}  "), id="title-200-padded"),
    pytest.param(
        lambda c: c.tasks.create(c.uid, title="t", description="d" * 10_000), id="description-10000"
    ),
    pytest.param(lambda c: c.tasks.update(c.uid, c.tid, description=""), id="description-empty"),
    pytest.param(lambda c: c.tasks.list_for(c.uid, limit=1), id="limit-1"),
    pytest.param(lambda c: c.tasks.list_for(c.uid, limit=500), id="limit-500"),
    pytest.param(lambda c: c.tasks.list_for(c.uid, before=2**63 - 1), id="before-max-bigint"),
    pytest.param(lambda c: c.tasks.list_for(c.uid, before=1), id="before-1"),
    pytest.param(
        lambda c: c.users.upsert("u" * 255, email="e@example.com", name="n"), id="uid-255"
    ),
    pytest.param(lambda c: c.users.upsert(c.uid, email=EMAIL_254, name="n"), id="email-254"),
    pytest.param(
        lambda c: c.users.upsert(c.uid, email="e@example.com", name="n" * 200), id="name-200"
    ),
]


@pytest.mark.parametrize("call", EDGE_INPUTS)
async def test_boundary_values_are_accepted(ctx: Ctx, call: Call) -> None:
    await call(ctx)  # no ValidationError, and the database takes the value too


def test_validation_errors_never_show_the_value() -> None:
    secret = "my-private-title-" * 20
    with pytest.raises(ValidationError) as raised:
        TaskCreate(title=secret)
    assert "title" in str(raised.value)
    assert "my-private-title" not in str(raised.value)
    assert "my-private-title" not in repr(raised.value)
