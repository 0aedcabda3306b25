"""Where the benchmarks run: a throwaway database (migrated to head) and a PgBouncer in front.

The server comes from `todo_store.testing.postgres.provision_server()`, exactly as for the tests
(`TODO_STORE_TEST_DATABASE_URL`, else Docker, else an embedded PostgreSQL). Every database made
here is dropped on exit, every PgBouncer stopped.
"""

from __future__ import annotations

import os
import platform
import secrets
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg
import sqlalchemy
from sqlalchemy.engine import make_url

from todo_store import migrations
from todo_store.testing.pgbouncer import PgBouncer
from todo_store.testing.plugin import settings_for
from todo_store.testing.postgres import (
    ProvisionedServer,
    create_database,
    drop_database,
    provision_server,
)

BOUNCER_POOL_SIZE = 4


@dataclass(frozen=True)
class Database:
    """A migrated throwaway database on the provisioned server."""

    server: ProvisionedServer
    name: str
    url: str  # libpq-style, direct

    def bouncer(self, *, max_prepared_statements: int = 0) -> PgBouncer:
        """A PgBouncer (transaction mode, pool of 4) in front of this database; not started."""
        return PgBouncer(
            self.server,
            self.name,
            pool_size=BOUNCER_POOL_SIZE,
            pool_mode="transaction",
            max_prepared_statements=max_prepared_statements,
        )


@asynccontextmanager
async def server() -> AsyncIterator[ProvisionedServer]:
    with provision_server() as provisioned:
        yield provisioned


@asynccontextmanager
async def database(provisioned: ProvisionedServer, purpose: str) -> AsyncIterator[Database]:
    """A fresh database, migrated with `todo_store.migrations.upgrade`, dropped on exit."""
    name = f"todo_store_bench_{purpose}_{secrets.token_hex(3)}"
    url = await create_database(provisioned.admin_url, name)
    try:
        await migrations.upgrade(settings_for(url))
        yield Database(provisioned, name, url)
    finally:
        await drop_database(provisioned.admin_url, name)


def asyncpg_dsn(url: str) -> str:
    """A URL asyncpg accepts (no SQLAlchemy driver suffix)."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def sqlalchemy_url(url: str) -> str:
    """The same URL for SQLAlchemy's asyncpg dialect."""
    parsed = make_url(url).set(drivername="postgresql+asyncpg")
    return parsed.render_as_string(hide_password=False)


def pgbouncer_version(bouncer: PgBouncer) -> tuple[str, tuple[int, int]]:
    """("PgBouncer 1.18.0", (1, 18)) from the admin console's SHOW VERSION."""
    text = str(bouncer.admin_query("SHOW VERSION")[0].get("version") or "")
    numbers = text.rsplit(maxsplit=1)[-1].split(".") if text else []
    try:
        version = (int(numbers[0]), int(numbers[1]))
    except (IndexError, ValueError):
        version = (0, 0)
    return text, version


@dataclass(frozen=True)
class Versions:
    python: str
    sqlalchemy: str
    asyncpg: str
    postgres: str
    pgbouncer: str
    pgbouncer_number: tuple[int, int]
    server_source: str
    machine: str
    date: str


async def versions(db: Database, bouncer: PgBouncer) -> Versions:
    conn = await asyncpg.connect(asyncpg_dsn(db.url))
    try:
        postgres = str(await conn.fetchval("SHOW server_version"))
    finally:
        await conn.close()
    text, number = pgbouncer_version(bouncer)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return Versions(
        python=sys.version.split()[0],
        sqlalchemy=sqlalchemy.__version__,
        asyncpg=asyncpg.__version__,
        postgres=f"PostgreSQL {postgres}",
        pgbouncer=text,
        pgbouncer_number=number,
        server_source=db.server.source,
        machine=f"{platform.system()} {platform.machine()}, {cpus} CPU(s)",
        date=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    )
