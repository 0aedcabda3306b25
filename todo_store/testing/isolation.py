"""Testing row-level security: bound units in the `todo_store` fixture, and a check that a
table is user-owned.

- `bound_scope(connection, user_id)`: what a bound unit of work of the `todo_store` fixture
  does inside the test's transaction. It binds the transaction to `user_id` (the setting a real
  bound unit sets in its BEGIN) and, when the test's role bypasses row-level security (a
  superuser, as test servers usually run), takes for the unit's duration a role that row-level
  security applies to: one made inside the test's transaction and granted what `todo-store
  grant` grants, so it disappears with the rollback. Both are restored when the unit ends.
- `assert_user_owned(store, table, owner=, other=, values=)`: for a user-owned table, each verb
  works for the owner of a row and finds nothing of it for another user.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any, cast

from sqlalchemy import CursorResult, text
from sqlalchemy.ext.asyncio import AsyncConnection

from todo_store.binding import USER_SETTING, grant, quote_ident
from todo_store.engine import TodoStore
from todo_store.errors import AccessRefused, UserNotFound
from todo_store.repositories import UserRepo

_CURRENT = text(
    """SELECT current_setting(:setting, true), current_setting('role'),
              r.rolsuper OR r.rolbypassrls
       FROM pg_roles r WHERE r.rolname = current_user"""
)
_SET = text("SELECT set_config(:setting, :user_id, true), set_config('role', :role, true)")
_ROLE_PREFIX = "todo_store_test_bound_"


# Made inside each test's transaction on first use, so it vanishes with the rollback; one
# name per process (tests in a process run one at a time; processes never share a name).
_ENFORCED_ROLE = f"{_ROLE_PREFIX}{secrets.token_hex(4)}"


async def _enforced_role(connection: AsyncConnection) -> str:
    # A unit that rolled back around the first bound unit took the role with it: check.
    exists = await connection.scalar(
        text("SELECT to_regrole(:r) IS NOT NULL"), {"r": _ENFORCED_ROLE}
    )
    if not exists:
        await connection.execute(text(f"CREATE ROLE {quote_ident(_ENFORCED_ROLE)} NOLOGIN"))
        await grant(connection, _ENFORCED_ROLE)
    return _ENFORCED_ROLE


@asynccontextmanager
async def bound_scope(connection: AsyncConnection, user_id: str) -> AsyncIterator[None]:
    """Bind the test's transaction to `user_id` under a role row-level security applies to,
    until the block ends; see the module docstring. Raises `RuntimeError` if the test's role
    bypasses row-level security and cannot create roles (then bound units could not be
    enforced)."""
    previous_user, previous_role, bypasses = (
        await connection.execute(_CURRENT, {"setting": USER_SETTING})
    ).one()
    role = previous_role
    if bypasses:
        try:
            role = await _enforced_role(connection)
        except AccessRefused:
            raise RuntimeError(
                "the test database's role bypasses row-level security and cannot create a role "
                "that does not: run the tests as a superuser, or as a role granted with "
                "`todo-store grant`"
            ) from None
    await connection.execute(_SET, {"setting": USER_SETTING, "user_id": user_id, "role": role})
    try:
        yield
    finally:
        await connection.execute(
            _SET,
            {"setting": USER_SETTING, "user_id": previous_user or "", "role": previous_role},
        )


async def assert_user_owned(
    store: TodoStore,
    table: str,
    *,
    owner: str,
    other: str,
    values: Mapping[str, Any],
    user_column: str = "user_id",
) -> None:
    """Assert that `table` keeps each user's rows to that user, verb by verb.

    In units of work bound to `owner`: a row inserted with `values` (and `user_column` =
    owner) can be read, updated and deleted. In units bound to `other`: none of it is visible
    to SELECT, UPDATE or DELETE, and inserting a row for `owner` raises `AccessRefused`.
    Both users are created (`UserRepo.upsert`) if missing; use users of the test only: the
    last step deletes the owner's rows in `table`. Raises `AssertionError` naming the verb
    that leaked.
    """
    name, column = quote_ident(table), quote_ident(user_column)
    columns = [column, *map(quote_ident, values)]
    parameters = {"owner_id": owner, **{f"v{i}": value for i, value in enumerate(values.values())}}
    placeholders = [":owner_id", *(f":v{i}" for i in range(len(values)))]
    insert = text(f"INSERT INTO {name} ({', '.join(columns)}) VALUES ({', '.join(placeholders)})")
    mine = f"{column} = :owner_id"
    count = text(f"SELECT count(*) FROM {name} WHERE {mine}")
    touch = text(f"UPDATE {name} SET {column} = {column} WHERE {mine}")
    remove = text(f"DELETE FROM {name} WHERE {mine}")

    for user_id in (owner, other):
        async with store.session(user_id=user_id) as session:
            users = UserRepo(session)
            try:
                await users.get(user_id)
            except UserNotFound:
                email = f"{secrets.token_hex(8)}@example.com"
                await users.upsert(user_id, email=email, name="user-owned check")

    async with store.session(user_id=owner) as session:
        before = await session.scalar(count, parameters)
        await session.execute(insert, parameters)
        seen = await session.scalar(count, parameters)
        _expect(seen == before + 1, f"{table}: INSERT for the owner is not visible to the owner")
    async with store.session(user_id=other) as session:
        _expect(
            await session.scalar(count, parameters) == 0,
            f"{table}: SELECT sees another user's rows",
        )
        _expect(
            _rowcount(await session.execute(touch, parameters)) == 0,
            f"{table}: UPDATE changes another user's rows",
        )
        _expect(
            _rowcount(await session.execute(remove, parameters)) == 0,
            f"{table}: DELETE removes another user's rows",
        )
        refused = False
        try:
            async with session.begin_nested():
                await session.execute(insert, parameters)
        except AccessRefused:
            refused = True
        _expect(refused, f"{table}: INSERT of a row for another user was accepted")
    async with store.session(user_id=owner) as session:
        _expect(
            await session.scalar(count, parameters) == before + 1,
            f"{table}: another user's unit changed the owner's rows",
        )
        _expect(
            _rowcount(await session.execute(touch, parameters)) == before + 1,
            f"{table}: UPDATE by the owner missed the owner's rows",
        )
        _expect(
            _rowcount(await session.execute(remove, parameters)) == before + 1,
            f"{table}: DELETE by the owner missed the owner's rows",
        )


def _rowcount(result: Any) -> int:
    return cast(CursorResult[Any], result).rowcount


def _expect(holds: bool, failure: str) -> None:
    # Not `assert`: the check must hold under `python -O` too.
    if not holds:
        raise AssertionError(failure)
