"""Units of work bound to one user, enforced by PostgreSQL's row-level security.

A unit of work bound to a user (`store.session(user_id=...)`) starts its transaction with
`BEGIN ...;SELECT set_config('todo_store.user_id', '<id>', true)`: ONE simple query, the BEGIN
the unit sends anyway, so binding costs no round trip. The setting is transaction-local: it
ends with the transaction, so the next client of a pooled server connection (PgBouncer in
transaction mode, Neon's pooler) never sees it. The policies `make_user_owned` creates read it
once per statement; an empty setting means no user, so an unbound unit under a role that
row-level security applies to sees no row and writes none.

What each part guarantees:

- `BoundConnection` (asyncpg's `connection_class`): the user id goes into the BEGIN text as a
  quoted literal, so any string `users.id` admits (`u1' OR true --` included) binds exactly
  that user. The pending id is consumed by the BEGIN it was meant for, and every SQLAlchemy
  transaction start overwrites it (with `None` when unbound), and a connection returned to
  the pool forgets it: it cannot reach another unit, also after errors or cancellation.
- `make_user_owned(table, user_column)` inside an Alembic revision: row-level security
  enabled and forced, and two policies. `todo_store_own_rows` (every role): a row is visible
  and writable only when its user column equals the bound user (`WITH CHECK` too, so a row
  cannot be written for, or moved to, another user). `todo_store_maintenance` (only the role
  that ran the migration, i.e. the tables' owner): unbound units see and write every row, so
  migrations, schema checks, `demo` and operator jobs work as before; a bound unit of the
  owner is held to its user like any other.
- `bypass_routes(conn, role)`: every way `role` escapes the policies (superuser, BYPASSRLS,
  membership of a role with either, owning a user-owned table or being a member of its owner,
  the maintenance policy); `grant(conn, role)` refuses such a role, else grants exactly the
  runtime's privileges: DML on the user-owned tables, their sequences.

This wall stops mistakes (a forgotten `WHERE user_id = ...`), not code that sets the setting
itself.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import asyncpg
from sqlalchemy import event, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession
from sqlalchemy.pool import PoolProxiedConnection

from todo_store.schemas import UserRef

USER_SETTING = "todo_store.user_id"
"""The transaction-local setting that holds the bound user's id ('' or unset: no user)."""

USER_OPTION = "todo_store_user_id"
"""The execution option that carries a unit's user id to its connection's BEGIN."""

OWN_ROWS_POLICY = "todo_store_own_rows"
MAINTENANCE_POLICY = "todo_store_maintenance"

# The bound user, read once per statement (an InitPlan), so an index on the user column serves.
BOUND_USER = f"(SELECT nullif(current_setting('{USER_SETTING}', true), ''))"

_BEGIN = "BEGIN"


def quote_literal(value: str) -> str:
    """`value` as an SQL string literal, correct whatever `standard_conforming_strings` is.

    An escape string (`E'...'`) with quotes and backslashes doubled; NUL characters cannot be
    represented and are refused by the user id's validation before this is reached.
    """
    return "E'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def quote_ident(name: str) -> str:
    """`name` as an SQL identifier (always quoted, so case and any character survive)."""
    return '"' + name.replace('"', '""') + '"'


def bind_statement(user_id: str) -> str:
    """The statement that binds the current transaction to `user_id` (appended to BEGIN)."""
    return f"SELECT set_config('{USER_SETTING}', {quote_literal(user_id)}, true)"


class BoundConnection(asyncpg.Connection):
    """An asyncpg connection whose next BEGIN can carry a user binding.

    `bind_next_transaction(user_id)` makes the next `BEGIN` this connection sends (asyncpg's
    `Transaction.start()` sends it through `execute`, as one simple query) also bind the
    transaction to `user_id`, in the same query: no extra round trip.
    """

    _pending_user: str | None = None

    def bind_next_transaction(self, user_id: str | None) -> None:
        """Bind the next transaction to `user_id`, or to nobody (`None`)."""
        self._pending_user = user_id

    def pending_binding(self) -> str | None:
        """The user id the next BEGIN will bind (None: nobody)."""
        return self._pending_user

    async def execute(
        self,
        query: str,
        *args: Any,
        timeout: float | None = None,  # noqa: ASYNC109 - asyncpg's own signature
    ) -> str:
        user_id = self._pending_user
        if user_id is not None and not args and query.startswith(_BEGIN):
            # Consumed before anything is sent: a failed or cancelled BEGIN binds nothing later.
            self._pending_user = None
            query = f"{query.rstrip().rstrip(';')};{bind_statement(user_id)}"
        result: str = await super().execute(query, *args, timeout=timeout)
        return result


def add_binding_events(engine: AsyncEngine) -> None:
    """Carry each unit's `USER_OPTION` to its connection's BEGIN; forget it on check-in."""
    sync_engine = engine.sync_engine
    event.listen(sync_engine, "begin", bind_transaction_listener)
    event.listen(sync_engine, "checkin", _forget_binding)


def _driver(dbapi_connection: Any) -> Any:
    return getattr(dbapi_connection, "driver_connection", None)


def bind_transaction_listener(conn: Connection) -> None:
    """`begin` listener: `bind_transaction` on the connection's pool connection."""
    bind_transaction(conn.connection, conn.get_execution_options())


def bind_transaction(pool_connection: PoolProxiedConnection, options: Mapping[str, Any]) -> None:
    """A transaction begins on `pool_connection` with execution `options`: its BEGIN binds
    the user the options name, or nobody."""
    # Called at every begin, before the adapter's lazy BEGIN: always set, so a binding left by
    # a unit that never sent its BEGIN is overwritten, never inherited.
    driver = _driver(pool_connection)
    if isinstance(driver, BoundConnection):
        driver.bind_next_transaction(options.get(USER_OPTION))


def _forget_binding(dbapi_connection: Any, _record: Any) -> None:
    driver = _driver(dbapi_connection)
    if isinstance(driver, BoundConnection):
        driver.bind_next_transaction(None)


def unit_arguments(*, atomic: bool, read_only: bool, user_id: str | None) -> str | None:
    """Check `session()`'s arguments before anything is sent; return the user id to bind.

    Raises `ValueError` naming the argument: `read_only=True` needs a transaction, and
    `user_id` must be a valid user id (1..255 characters, no NUL).
    """
    if read_only and not atomic:
        raise ValueError("read_only=True needs atomic=True (a READ ONLY transaction)")
    if user_id is None:
        return None
    return UserRef(user_id=user_id).user_id


class CallByCallTransactions(AsyncSession):
    """An `AsyncSession` whose every call is a transaction of its own, committed at once.

    What `session(user_id=..., atomic=False)` yields: the binding needs a transaction, so
    each call gets one (BEGIN with the binding, the statement, COMMIT); a call takes effect by
    itself and a failed one is rolled back alone, leaving the session usable. The test
    fixture's non-atomic units override `_one_call` to use a savepoint per call instead.
    """

    _in_call = False  # scalar() and scalars() call execute(): one transaction is enough

    async def execute(self, *args: Any, **kwargs: Any) -> Any:
        return await self._alone(super().execute, *args, **kwargs)

    async def scalar(self, *args: Any, **kwargs: Any) -> Any:
        return await self._alone(super().scalar, *args, **kwargs)

    async def scalars(self, *args: Any, **kwargs: Any) -> Any:
        return await self._alone(super().scalars, *args, **kwargs)

    async def get(self, *args: Any, **kwargs: Any) -> Any:
        return await self._alone(super().get, *args, **kwargs)

    async def get_one(self, *args: Any, **kwargs: Any) -> Any:
        return await self._alone(super().get_one, *args, **kwargs)

    async def run_sync(self, *args: Any, **kwargs: Any) -> Any:
        return await self._alone(super().run_sync, *args, **kwargs)

    async def _alone(self, call: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any) -> Any:
        if self._in_call:
            return await call(*args, **kwargs)
        self._in_call = True
        try:
            return await self._one_call(call, *args, **kwargs)
        finally:
            self._in_call = False

    async def _one_call(
        self, call: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any
    ) -> Any:
        """Run one call so that it takes effect by itself: here, a transaction of its own."""
        try:
            result = await call(*args, **kwargs)
            await self.commit()
        except Exception:
            await self.rollback()
            raise
        return result


# -- migrations: making a table user-owned ----------------------------------------------------


def user_owned_statements(table: str, user_column: str = "user_id") -> list[str]:
    """The DDL `make_user_owned` runs (also usable with `alembic upgrade --sql`)."""
    name, column = quote_ident(table), quote_ident(user_column)
    own = f"{column} = {BOUND_USER}"
    unbound = f"{BOUND_USER} IS NULL"
    return [
        f"ALTER TABLE {name} ENABLE ROW LEVEL SECURITY",
        f"ALTER TABLE {name} FORCE ROW LEVEL SECURITY",
        f"CREATE POLICY {OWN_ROWS_POLICY} ON {name} FOR ALL TO PUBLIC"
        f" USING ({own}) WITH CHECK ({own})",
        f"CREATE POLICY {MAINTENANCE_POLICY} ON {name} FOR ALL TO CURRENT_USER"
        f" USING ({unbound}) WITH CHECK ({unbound})",
    ]


def not_user_owned_statements(table: str) -> list[str]:
    """The DDL `drop_user_ownership` runs: the exact reverse of `user_owned_statements`."""
    name = quote_ident(table)
    return [
        f"DROP POLICY {MAINTENANCE_POLICY} ON {name}",
        f"DROP POLICY {OWN_ROWS_POLICY} ON {name}",
        f"ALTER TABLE {name} NO FORCE ROW LEVEL SECURITY",
        f"ALTER TABLE {name} DISABLE ROW LEVEL SECURITY",
    ]


def make_user_owned(table: str, user_column: str = "user_id") -> None:
    """In an Alembic revision's `upgrade()`: rows of `table` belong to the user in
    `user_column`; bound units see and write only their user's rows, unbound units of any
    role but the migrating one (the owner) see none. `todo-store grant` and `doctor` cover
    the table from then on. Undo with `drop_user_ownership(table)` in `downgrade()`."""
    from alembic import op  # noqa: PLC0415 - only inside a migration

    for statement in user_owned_statements(table, user_column):
        op.execute(statement)


def drop_user_ownership(table: str) -> None:
    """In an Alembic revision's `downgrade()`: undo `make_user_owned(table, ...)`."""
    from alembic import op  # noqa: PLC0415 - only inside a migration

    for statement in not_user_owned_statements(table):
        op.execute(statement)


# -- roles: who escapes the policies, and granting the runtime role ---------------------------

_USER_OWNED_TABLES = text(
    f"""SELECT c.relname, c.relrowsecurity, c.relforcerowsecurity
        FROM pg_class c
        WHERE c.relnamespace = current_schema()::regnamespace AND c.relkind = 'r'
          AND (c.relname IN ('tasks', 'users') OR EXISTS (
                SELECT 1 FROM pg_policy p
                WHERE p.polrelid = c.oid AND p.polname = '{OWN_ROWS_POLICY}'))
        ORDER BY c.relname"""
)
_ROLE_ATTRIBUTES = text(
    """SELECT r.rolname, r.rolsuper, r.rolbypassrls FROM pg_roles r
       WHERE (r.rolsuper OR r.rolbypassrls) AND pg_has_role(:role, r.oid, 'MEMBER')
       ORDER BY r.rolname <> :role, r.rolname"""
)
_OWNED = text(
    """SELECT c.relname, pg_get_userbyid(c.relowner) FROM pg_class c
       WHERE c.relnamespace = current_schema()::regnamespace AND c.relname = ANY(:tables)
         AND pg_has_role(:role, c.relowner, 'MEMBER')
       ORDER BY c.relname"""
)
_MAINTAINS = text(
    f"""SELECT DISTINCT c.relname FROM pg_policy p JOIN pg_class c ON c.oid = p.polrelid
        WHERE c.relnamespace = current_schema()::regnamespace
          AND p.polname = '{MAINTENANCE_POLICY}'
          AND EXISTS (SELECT 1 FROM unnest(p.polroles) AS r(oid)
                      WHERE r.oid <> 0 AND pg_has_role(:role, r.oid, 'MEMBER'))
        ORDER BY c.relname"""
)
_SEQUENCES = text(
    """SELECT DISTINCT s.relname FROM pg_depend d
       JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S'
       JOIN pg_class t ON t.oid = d.refobjid
       WHERE d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass
         AND d.deptype IN ('a', 'i')
         AND t.relnamespace = current_schema()::regnamespace AND t.relname = ANY(:tables)
       ORDER BY s.relname"""
)


@dataclass(frozen=True)
class UserOwnedTable:
    """A table whose rows belong to users, and whether row-level security guards it."""

    name: str
    enabled: bool
    forced: bool

    @property
    def guarded(self) -> bool:
        return self.enabled and self.forced


async def user_owned_tables(conn: AsyncConnection) -> list[UserOwnedTable]:
    """`tasks`, `users` and every table `make_user_owned` covered, in the current schema."""
    rows = await conn.execute(_USER_OWNED_TABLES)
    return [UserOwnedTable(name, bool(enabled), bool(forced)) for name, enabled, forced in rows]


async def bypass_routes(conn: AsyncConnection, role: str) -> list[str]:
    """Every way `role` can escape the user policies, in words; empty if it cannot."""
    routes: list[str] = []
    attributes = list(await conn.execute(_ROLE_ATTRIBUTES, {"role": role}))
    if any(name == role and superuser for name, superuser, _ in attributes):
        # A superuser is a member of every role: that one route says it all.
        return ["is a superuser"]
    for name, superuser, _bypass in attributes:
        if name == role:
            routes.append("is a superuser" if superuser else "has BYPASSRLS")
        else:
            what = "is a superuser" if superuser else "has BYPASSRLS"
            routes.append(f"is a member of {name}, which {what}")
    tables = [table.name for table in await user_owned_tables(conn)]
    owned: dict[str, list[str]] = {}
    for table, owner in await conn.execute(_OWNED, {"role": role, "tables": tables}):
        owned.setdefault(owner, []).append(table)
    for owner, names in owned.items():
        shown = ", ".join(names)
        routes.append(
            f"owns {shown}" if owner == role else f"is a member of {owner}, owner of {shown}"
        )
    maintained = [name for (name,) in await conn.execute(_MAINTAINS, {"role": role})]
    if maintained:
        routes.append(f"may work unbound on {', '.join(maintained)} (the migrating role)")
    return routes


class GrantRefused(Exception):
    """The role would escape row-level security, or does not exist; nothing was granted."""


async def grant(conn: AsyncConnection, role: str) -> list[str]:
    """Grant `role` exactly what the runtime needs; return what was granted, in words.

    DML (SELECT, INSERT, UPDATE, DELETE) on every user-owned table, USAGE on the schema and
    USAGE, SELECT on the tables' sequences; nothing else (no DDL, no other table). Runs in the
    caller's transaction, as the tables' owner. Raises `GrantRefused` if the role does not
    exist or could bypass row-level security (see `bypass_routes`).
    """
    exists = await conn.scalar(
        text("SELECT to_regrole(:role) IS NOT NULL"), {"role": quote_ident(role)}
    )
    if not exists:
        raise GrantRefused(f"role {role!r} does not exist: create it first (CREATE ROLE ... LOGIN)")
    routes = await bypass_routes(conn, role)
    if routes:
        raise GrantRefused(
            f"role {role!r} {'; '.join(routes)}: row-level security would not apply to it"
        )
    tables = [table.name for table in await user_owned_tables(conn)]
    sequences = [name for (name,) in await conn.execute(_SEQUENCES, {"tables": tables})]
    grantee = quote_ident(role)
    schema = await conn.scalar(text("SELECT current_schema()"))
    await conn.execute(text(f"GRANT USAGE ON SCHEMA {quote_ident(str(schema))} TO {grantee}"))
    for table in tables:
        await conn.execute(
            text(f"GRANT SELECT, INSERT, UPDATE, DELETE ON {quote_ident(table)} TO {grantee}")
        )
    for sequence in sequences:
        await conn.execute(
            text(f"GRANT USAGE, SELECT ON SEQUENCE {quote_ident(sequence)} TO {grantee}")
        )
    granted = [f"SELECT, INSERT, UPDATE, DELETE on {', '.join(tables)}"]
    if sequences:
        granted.append(f"USAGE, SELECT on {', '.join(sequences)}")
    return granted
