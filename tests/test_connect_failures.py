"""Connect failures say what is wrong and what to do, against real password auth and real TLS.

A PostgreSQL that accepts only TLS + SCRAM logins (certificate from a CA made here, valid for
`localhost` only), alone and behind PgBouncer with client TLS and `auth_type=scram-sha-256`
(the installed PgBouncer, and one that tracks prepared statements where there is one, as Neon
runs). Each refusal must arrive as `ConnectionRejected` with the server's, pooler's or TLS
library's reason and one line of advice; what may pass as `DatabaseUnavailable`; the password
nowhere in messages, reprs, logs or tracebacks.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
import traceback
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest
from conftest import CommandRun, run_command, tracking_pgbouncer_binary
from sqlalchemy import text

from tests.rigs.certificates import CertificatesUnavailable
from tests.rigs.secure_server import (
    SecureServer,
    SecureServerUnavailable,
    pgbouncer_options,
    scram_secret,
    secure_server,
)
from todo_store import TodoStore
from todo_store.connect_errors import PGBOUNCER_LOGIN_MESSAGES, explain_connect_failure
from todo_store.errors import ConnectionRejected, DatabaseUnavailable
from todo_store.testing.pgbouncer import PgBouncer
from todo_store.testing.plugin import REQUIRE_PGBOUNCER, start_pgbouncer
from todo_store.urls import to_asyncpg

WRONG_PASSWORD = "wrong-Pa55word-never-shown"
NEON_CONSOLE_TLS = {"sslmode": "require", "channel_binding": "require"}
BOUNDED = {"connect_timeout": "10"}  # no case may hang on a pooler that queues the login
LOGIN_ADVICE = "check the user name and password in DATABASE_URL"
DATABASE_ADVICE = "check the database name in DATABASE_URL"
TLS_FIXES = ("sslrootcert=/path/to/ca.pem", "system trust store", "SSL_CERT_FILE")


@dataclass(frozen=True)
class Endpoint:
    """Where a client connects: the server itself, or a PgBouncer in front of it."""

    name: str
    server: SecureServer
    port: int

    @property
    def pooled(self) -> bool:
        return self.name != "direct"

    def url(self, **parts: Any) -> str:
        """A URL to this endpoint; `query` defaults to a verified TLS connection."""
        query = parts.pop("query", self.server.verified_query)
        return self.server.url(port=self.port, query={**BOUNDED, **query}, **parts)


def endpoint_url(server: SecureServer, **parts: Any) -> str:
    """A verified, bounded URL straight to the server."""
    return Endpoint("direct", server, server.port).url(**parts)


def _unavailable(reason: str) -> None:
    if os.environ.get(REQUIRE_PGBOUNCER) == "1":
        pytest.fail(f"the TLS + password test server is required ({REQUIRE_PGBOUNCER}=1): {reason}")
    pytest.skip(f"no TLS + password test server: {reason}")


@pytest.fixture(scope="module")
def server() -> Iterator[SecureServer]:
    with ExitStack() as stack:
        try:
            started = stack.enter_context(secure_server())
        except (SecureServerUnavailable, CertificatesUnavailable) as error:
            _unavailable(str(error))
        yield started


@pytest.fixture(scope="module")
def secure_pgbouncer(server: SecureServer) -> Iterator[PgBouncer]:
    bouncer = start_pgbouncer(server.upstream, server.database, **pgbouncer_options(server))
    yield bouncer
    bouncer.stop()


@pytest.fixture(scope="module")
def secure_tracking_pgbouncer(server: SecureServer) -> Iterator[PgBouncer]:
    bouncer = start_pgbouncer(
        server.upstream,
        server.database,
        binary=tracking_pgbouncer_binary(),
        **pgbouncer_options(server),
    )
    yield bouncer
    bouncer.stop()


@pytest.fixture(params=["direct", "pgbouncer", "tracking-pgbouncer"])
def endpoint(request: pytest.FixtureRequest, server: SecureServer) -> Endpoint:
    if request.param == "direct":
        return Endpoint("direct", server, server.port)
    fixture = {"pgbouncer": "secure_pgbouncer", "tracking-pgbouncer": "secure_tracking_pgbouncer"}
    bouncer: PgBouncer = request.getfixturevalue(fixture[request.param])
    return Endpoint(request.param, server, bouncer.port)


async def connect_failure(url: str) -> BaseException:
    """What a connection attempt with `url` raises, as the package's engine reports it."""
    async with TodoStore(url) as store:
        with pytest.raises(Exception) as caught:  # noqa: PT011 - the type is what we check
            await store.ping()
    return caught.value


async def rejected(url: str) -> ConnectionRejected:
    error = await connect_failure(url)
    assert isinstance(error, ConnectionRejected), f"{type(error).__name__}: {error}"
    assert not isinstance(error, DatabaseUnavailable)
    return error


def assert_one_line_without_secrets(error: BaseException, *secrets: str) -> None:
    message = str(error)
    assert "\n" not in message
    shown = message + repr(error) + "".join(traceback.format_exception(error))
    for secret in secrets:
        assert secret not in shown


# --- refused logins -------------------------------------------------------------------------


async def test_wrong_password_is_rejected_with_the_servers_reason(endpoint: Endpoint) -> None:
    error = await rejected(endpoint.url(password=WRONG_PASSWORD))

    if endpoint.pooled:  # PgBouncer checks the password itself, and says only this
        assert (error.reason, error.sqlstate) == ("SASL authentication failed", "08P01")
    else:
        assert error.reason == f'password authentication failed for user "{endpoint.server.user}"'
        assert error.sqlstate == "28P01"
    assert LOGIN_ADVICE in error.advice
    assert str(error) == f"connection rejected: {error.reason} — {error.advice}"
    assert_one_line_without_secrets(error, WRONG_PASSWORD, endpoint.server.password)


async def test_unknown_role_is_rejected(endpoint: Endpoint) -> None:
    error = await rejected(endpoint.url(user="nobody_here"))

    if endpoint.pooled:
        assert error.reason == "SASL authentication failed"
    else:
        assert error.reason == 'password authentication failed for user "nobody_here"'
    assert LOGIN_ADVICE in error.advice
    assert_one_line_without_secrets(error, endpoint.server.password)


async def test_unknown_database_is_rejected_naming_it(endpoint: Endpoint) -> None:
    error = await rejected(endpoint.url(database="no_such_db"))

    if endpoint.pooled:
        assert (error.reason, error.sqlstate) == ("no such database: no_such_db", "08P01")
    else:
        assert (error.reason, error.sqlstate) == ('database "no_such_db" does not exist', "3D000")
    assert DATABASE_ADVICE in error.advice
    assert_one_line_without_secrets(error, endpoint.server.password)


async def test_database_the_pooler_knows_but_the_server_does_not(server: SecureServer) -> None:
    """PgBouncer 1.18 relays the server's refusal under 08P01, 1.20 and later keep 3D000."""
    bouncer = start_pgbouncer(server.upstream, "gone_db", **pgbouncer_options(server))
    try:
        url = server.url(port=bouncer.port, database="gone_db", query=server.verified_query)
        error = await rejected(url)
    finally:
        bouncer.stop()

    assert error.reason == 'database "gone_db" does not exist'
    assert DATABASE_ADVICE in error.advice


async def test_plain_connection_to_a_tls_only_server_is_rejected(endpoint: Endpoint) -> None:
    error = await rejected(endpoint.url(query={"sslmode": "disable"}))

    if endpoint.pooled:
        assert error.reason == "SSL required"
    else:
        assert error.reason.startswith("no pg_hba.conf entry for host")
    assert "sslmode=require" in error.advice


# --- TLS ------------------------------------------------------------------------------------


async def test_untrusted_ca_with_neon_console_settings_says_channel_binding_verifies(
    endpoint: Endpoint,
) -> None:
    error = await rejected(endpoint.url(query=NEON_CONSOLE_TLS))

    assert error.reason == "self-signed certificate in certificate chain"
    assert "because of channel_binding=require" in error.advice
    assert "asyncpg cannot bind channels" in error.advice
    for fix in TLS_FIXES:
        assert fix in error.advice
    assert error.sqlstate is None
    assert_one_line_without_secrets(error, endpoint.server.password)


async def test_wrong_root_certificate_names_the_file(endpoint: Endpoint) -> None:
    other_ca = str(endpoint.server.certificates.other_ca_file)
    error = await rejected(endpoint.url(query={"sslmode": "verify-full", "sslrootcert": other_ca}))

    assert error.reason == "self-signed certificate in certificate chain"
    assert "because of sslmode=verify-full" in error.advice
    assert f"check that {other_ca} holds the CA" in error.advice


async def test_hostname_mismatch_with_verify_full(endpoint: Endpoint) -> None:
    error = await rejected(endpoint.url(host="127.0.0.1"))  # the certificate names localhost

    assert error.reason == "IP address mismatch, certificate is not valid for '127.0.0.1'."
    assert "because of sslmode=verify-full" in error.advice
    assert "sslmode=verify-ca" in error.advice
    assert_one_line_without_secrets(error, endpoint.server.password)


async def test_sslmode_require_connects_to_an_untrusted_ca_without_verifying(
    endpoint: Endpoint,
) -> None:
    url = endpoint.url(query={"sslmode": "require"})
    assert to_asyncpg(url).tls is not None
    assert not to_asyncpg(url).tls.verifies  # type: ignore[union-attr]

    async with TodoStore(url) as store, store.engine.connect() as connection:
        # Through PgBouncer this is its own TLS link to the server; the client link is TLS
        # too, since that PgBouncer refuses anything else (see the sslmode=disable case).
        encrypted = await connection.scalar(
            text("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        )
    assert encrypted is True


# --- startup parameters ---------------------------------------------------------------------


async def test_pgbouncer_refuses_options_and_the_error_names_it(endpoint: Endpoint) -> None:
    url = endpoint.url(query={**endpoint.server.verified_query, "options": "endpoint=ep-test-1"})
    error = await rejected(url)

    if endpoint.pooled:
        # 1.18: "unsupported startup parameter: options"; 1.20+: "unsupported options ..."
        assert error.reason.startswith("unsupported")
        assert "options" in error.reason
        assert "the pooler refuses the startup parameter options" in error.advice
        assert "Neon's pooler accepts options=endpoint%3D" in error.advice
    else:  # PostgreSQL itself reads options as command-line switches
        assert error.reason.startswith("invalid command-line argument for server process")
        assert "options=" in error.advice


async def test_options_with_a_setting_reaches_postgresql_directly(server: SecureServer) -> None:
    url = server.url(query={**server.verified_query, "options": "-c statement_timeout=4321"})

    async with TodoStore(url) as store, store.engine.connect() as connection:
        assert await connection.scalar(text("SHOW statement_timeout")) == "4321ms"


# --- transient failures ---------------------------------------------------------------------


def _unused_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def test_refused_tcp_connect_is_unavailable_with_the_os_reason(
    server: SecureServer,
) -> None:
    error = await connect_failure(server.url(port=_unused_port(), query=server.verified_query))

    assert isinstance(error, DatabaseUnavailable)
    assert not isinstance(error, ConnectionRejected)
    assert "connection refused" in str(error)
    assert_one_line_without_secrets(error, server.password)


async def test_silent_server_times_out_as_unavailable(server: SecureServer) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()  # accepts the TCP connect, never answers the TLS request
        port = silent.getsockname()[1]
        url = server.url(port=port, query={**server.verified_query, "connect_timeout": "0.3"})
        error = await connect_failure(url)

    assert isinstance(error, DatabaseUnavailable)
    assert "connect timeout" in str(error)


async def test_role_over_its_connection_limit_is_unavailable(server: SecureServer) -> None:
    admin = await asyncpg.connect(server.admin_url)
    try:
        secret = scram_secret(server.password)
        await admin.execute(
            f"CREATE ROLE limited_role LOGIN CONNECTION LIMIT 0 PASSWORD '{secret}'"
        )
        error = await connect_failure(endpoint_url(server, user="limited_role"))
    finally:
        await admin.execute("DROP ROLE IF EXISTS limited_role")
        await admin.close()

    assert isinstance(error, DatabaseUnavailable), f"{type(error).__name__}: {error}"
    assert 'too many connections for role "limited_role" (SQLSTATE 53300)' in str(error)
    assert_one_line_without_secrets(error, server.password)


async def test_full_pooler_is_unavailable_with_its_reason(server: SecureServer) -> None:
    options = pgbouncer_options(server)
    options["settings"] = {**options["settings"], "max_client_conn": "2"}
    bouncer = start_pgbouncer(server.upstream, server.database, **options)
    url = server.url(port=bouncer.port, query=server.verified_query)
    target = to_asyncpg(url)
    dsn = target.url.set(drivername="postgresql").render_as_string(hide_password=False)
    holders: list[asyncpg.Connection] = []
    try:
        # Fill it up (how many it admits depends on sockets it has not reaped yet), then ask.
        for _ in range(5):
            try:
                holders.append(await asyncpg.connect(dsn, **target.connect_args))
            except asyncpg.ProtocolViolationError:
                break
        else:
            pytest.fail("PgBouncer with max_client_conn = 2 admitted 5 clients")
        error = await connect_failure(url)
    finally:
        for holder in holders:
            await holder.close()
        bouncer.stop()

    assert isinstance(error, DatabaseUnavailable)
    assert "no more connections allowed (max_client_conn)" in str(error)
    assert "check that the server is up" not in str(error)  # it is the pooler that is full
    assert "max_client_conn" in str(error).split("—")[-1]  # the advice names the limit


# --- what is never converted, and never shown -----------------------------------------------


@pytest.mark.parametrize(
    "error",
    [asyncio.CancelledError(), KeyboardInterrupt(), SystemExit(1), ValueError("bad argument")],
    ids=["cancelled", "interrupt", "exit", "not-a-connect-failure"],
)
def test_non_connect_errors_are_left_alone(error: BaseException) -> None:
    assert explain_connect_failure(error, tls=None) is None


def test_unknown_pooler_message_is_unavailable_carrying_the_text() -> None:
    error = asyncpg.exceptions.ProtocolViolationError("some future pooler complaint")

    explained = explain_connect_failure(error, tls=None)

    assert isinstance(explained, DatabaseUnavailable)
    assert "some future pooler complaint (SQLSTATE 08P01)" in str(explained)


def test_pgbouncer_table_rejects_only_configuration_problems() -> None:
    rejecting = {pattern for pattern, kind in PGBOUNCER_LOGIN_MESSAGES.items() if kind.rejected}
    assert "SASL authentication failed" in rejecting
    assert "no such database" in rejecting
    assert "no more connections allowed" not in rejecting
    assert "query_wait_timeout" not in rejecting


def test_password_in_an_os_message_is_redacted() -> None:
    error = ConnectionResetError(104, f"peer said {WRONG_PASSWORD}")

    explained = explain_connect_failure(error, tls=None, password=WRONG_PASSWORD)

    assert isinstance(explained, DatabaseUnavailable)
    assert WRONG_PASSWORD not in str(explained)
    assert "***" in str(explained)


async def test_no_log_line_shows_the_password(
    endpoint: Endpoint, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    for url in (endpoint.url(password=WRONG_PASSWORD), endpoint.url(query=NEON_CONSOLE_TLS)):
        async with TodoStore(url, echo=True, echo_pool="debug") as store:
            with pytest.raises(ConnectionRejected):
                await store.ping()

    logged = caplog.text  # every record as formatted, tracebacks included
    assert "Error on connect()" in logged  # the failures themselves were logged
    assert WRONG_PASSWORD not in logged
    assert endpoint.server.password not in logged


# --- the commands ---------------------------------------------------------------------------


async def run_cli(command: str, database_url: str) -> CommandRun:
    return await run_command(
        sys.executable, "-m", "todo_store.cli", command, database_url=database_url
    )


async def test_commands_print_reason_and_advice_on_one_line(
    server: SecureServer, secure_pgbouncer: PgBouncer
) -> None:
    pooled = {"port": secure_pgbouncer.port}
    cases = {  # command: (DATABASE_URL, reason, advice); one case each keeps this quick
        "doctor": (
            server.url(query={**BOUNDED, **NEON_CONSOLE_TLS}),
            "self-signed certificate in certificate chain",
            "because of channel_binding=require",
        ),
        "migrate": (
            server.url(
                password=WRONG_PASSWORD, query={**BOUNDED, **server.verified_query}, **pooled
            ),
            "SASL authentication failed",
            LOGIN_ADVICE,
        ),
        "demo": (
            server.url(query={**BOUNDED, **server.verified_query, "options": "a=b"}, **pooled),
            "unsupported",
            "the pooler refuses the startup parameter options",
        ),
    }
    runs = await asyncio.gather(*(run_cli(cmd, url) for cmd, (url, _, _) in cases.items()))

    for run, (command, (_, reason, advice)) in zip(runs, cases.items(), strict=True):
        output = run.stdout + run.stderr
        where = f"todo-store {command}:\n{output}"
        assert run.returncode == 1, where
        assert "Traceback" not in output, where
        assert any(reason in line and advice in line for line in output.splitlines()), where
        assert WRONG_PASSWORD not in output, where
        assert server.password not in output, where
