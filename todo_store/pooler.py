"""Is a transaction pooler in front of the database, and does it track prepared statements?

Found out by experiment, never from the host name, on two connections of the application's
own (same URL, credentials and TLS), with statement caching off:

1. In one transaction on connection A, a named (protocol-level) statement is prepared and
   `pg_prepared_statements` is read on the same server backend. A pooler that tracks prepared
   statements (PgBouncer >= 1.21 with `max_prepared_statements > 0`, as Neon runs it) prepares
   its own copy under a name of its own (`PGBOUNCER_<n>`); directly, or through a pooler that
   passes statements on as they are, the server holds it under ours. In that case it is
   deallocated in the same transaction: it never outlives it.
2. A few rounds: connection B opens a transaction and, while B holds it, A runs a statement
   (the named one when the pooler renamed it). Directly (or through a session pooler) A keeps
   its server backend and B never gets it. Through a transaction pooler, B is given the backend
   A has just released, or A's next transaction runs on another backend: either proves it.
   A statement prepared in one transaction and run in a later one on another backend proves
   that the pooler tracks it.

`STATEMENT_CACHE` is safe when no transaction pooler was seen, or the pooler tracks
statements. Safe on production: three or four short transactions, no writes, nothing left on
the server; a tracking pooler keeps its own copy of one fixed statement, the same one on every
run, within its `max_prepared_statements` bound.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

import asyncpg
from sqlalchemy.ext.asyncio import AsyncConnection

from todo_store.engine import create_engine
from todo_store.settings import Settings

__all__ = ["PROBE_STATEMENT", "PoolerFindings", "probe", "probe_connections"]

# Fixed text: a tracking pooler keys its server-side copies by text, so every run reuses one.
PROBE_STATEMENT = "SELECT pg_backend_pid() /* todo_store pooler probe */"
_ROUNDS = 4  # rounds of step 2; the first one settles it for PgBouncer's default (LIFO) reuse
_SERVER_NAMES = """SELECT coalesce(array_agg(name::text ORDER BY name), '{}')
                   FROM pg_prepared_statements WHERE statement = $1"""


@dataclass(frozen=True)
class PoolerFindings:
    """What the experiment saw. `statement_cache_safe` is the verdict on `STATEMENT_CACHE`."""

    moved: bool
    """Transactions of one client connection ran on more than one server backend."""
    shared: bool
    """Another client connection was given the server backend this one had just used."""
    renamed: bool
    """The server held our named statement under another name: the pooler tracks them."""
    ran_on_another_backend: bool
    """A statement prepared in one transaction ran in a later one on another server backend."""
    statement_lost: bool
    """A statement prepared in one transaction did not exist in a later one (SQLSTATE 26000)."""

    @property
    def transaction_pooling(self) -> bool:
        """Only a transaction pooler moves a connection's transactions between backends."""
        return self.moved or self.shared

    @property
    def tracks_statements(self) -> bool:
        return self.renamed and not self.statement_lost

    @property
    def statement_cache_safe(self) -> bool:
        if self.statement_lost:
            return False
        return self.tracks_statements or not self.transaction_pooling

    @property
    def summary(self) -> str:
        """One sentence for `doctor`."""
        if self.tracks_statements:
            how = (
                "a statement prepared in one transaction ran in a later one on another server"
                if self.ran_on_another_backend
                else "the server holds its own copy of our prepared statement"
            )
            return f"pooled: a transaction pooler that tracks prepared statements ({how})"
        if self.statement_lost:
            return (
                "pooled: a transaction pooler that loses prepared statements (one prepared in a "
                "transaction was missing in the next)"
            )
        if self.transaction_pooling:
            seen = (
                "transactions of one connection ran on different server connections"
                if self.moved
                else "another connection was given this one's server connection"
            )
            return f"pooled: a transaction pooler that does not track prepared statements ({seen})"
        return (
            f"direct: no transaction pooler ({_ROUNDS + 1} transactions of one connection ran "
            "on one server backend that no other connection was given)"
        )


async def probe(settings: Settings) -> PoolerFindings:
    """Run the experiment on two new connections made from `settings` (caching forced off)."""
    probe_settings = settings.model_copy(
        update={"statement_cache": False, "pool_size": 2, "max_overflow": 0}
    )
    engine = create_engine(probe_settings, isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as first, engine.connect() as second:
            return await probe_connections(await _driver(first), await _driver(second))
    finally:
        await engine.dispose()


async def _driver(connection: AsyncConnection) -> asyncpg.Connection:
    raw: Any = await connection.get_raw_connection()
    driver: asyncpg.Connection = raw.driver_connection
    return driver


async def probe_connections(a: asyncpg.Connection, b: asyncpg.Connection) -> PoolerFindings:
    """The experiment (module docstring) on two open connections whose statement cache is off.

    Leaves no prepared statement of its own on any server connection: it is deallocated in its
    own transaction unless a tracking pooler renamed it, and then the pooler owns the copy.
    """
    name = f"todo_store_probe_{secrets.token_hex(8)}"
    async with a.transaction():
        first = await a.fetchval("SELECT pg_backend_pid()")
        statement = await a.prepare(PROBE_STATEMENT, name=name)
        names = await a.fetchval(_SERVER_NAMES, PROBE_STATEMENT)
        renamed = name not in names
        if not renamed:
            # It would outlive the transaction on a server connection other clients share.
            await a.execute(f'DEALLOCATE "{name}"')

    seen_by_a = {first}
    shared = lost = ran_elsewhere = False
    for _ in range(_ROUNDS):
        async with b.transaction():
            # B holds whichever backend it got until the end of this block.
            if await b.fetchval("SELECT pg_backend_pid()") in seen_by_a:
                shared = True
            if renamed:
                try:
                    pid = await statement.fetchval()
                except asyncpg.InvalidSQLStatementNameError:
                    lost = True
                    break
                ran_elsewhere |= pid != first
            else:
                pid = await a.fetchval("SELECT pg_backend_pid()")
            seen_by_a.add(pid)
        if (shared or len(seen_by_a) > 1) and (not renamed or ran_elsewhere):
            break
    return PoolerFindings(
        moved=len(seen_by_a) > 1,
        shared=shared,
        renamed=renamed,
        ran_on_another_backend=ran_elsewhere,
        statement_lost=lost,
    )
