"""Say why a connection attempt failed, and what to do about it.

`explain_connect_failure(error, tls=...)` turns whatever a failed connect raised (asyncpg
0.30-0.32 directly, or wrapped by SQLAlchemy 2.0/2.1) into:

- `ConnectionRejected(reason, advice, sqlstate=)` for what no retry fixes: authentication
  (28000, 28P01), an unknown database (3D000), a refused certificate (untrusted CA, hostname
  mismatch), a startup setting the server or pooler refuses, and PgBouncer's own login
  failures (see `PGBOUNCER_LOGIN_MESSAGES`);
- `DatabaseUnavailable` for what may pass: refused or timed-out TCP connects, lost
  connections, a server shutting down or starting up (57P01-57P03), too many connections,
  pooler queue and login timeouts, and any server error not known to be permanent.

Guarantees: the message is one line, carries the server's, the pooler's, the TLS library's or
the operating system's own reason, and never the password (the server never sends it back; a
`password` given here is also redacted) nor any bound parameter (none exists at connect time).
`BaseException`s that are not `Exception`s (cancellation, Ctrl-C, exit) and errors that are not
connect failures give None: the caller re-raises those unchanged.

The SQLSTATE decides wherever there is one; message texts are read in one place only: PgBouncer
reports all of its own login failures under 08P01, told apart by their fixed texts.
"""

from __future__ import annotations

import os
import re
import socket
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import asyncpg

from todo_store.errors import (
    AUTH_CLASS,
    UNKNOWN_DATABASE,
    ConnectionRejected,
    DatabaseUnavailable,
    TodoStoreError,
)
from todo_store.urls import TlsIntent

__all__ = [
    "PGBOUNCER_LOGIN_MESSAGES",
    "driver_error",
    "error_chain",
    "explain_connect_failure",
    "pooler_cannot_reach_server",
]

_CHECK_LOGIN = "check the user name and password in DATABASE_URL"
_CHECK_DATABASE = "check the database name in DATABASE_URL (the path after the host: /dbname)"
_RETRY = "safe to retry; if it persists, check that the server is up and reachable"
_TLS_FIXES = (
    "add sslrootcert=/path/to/ca.pem to DATABASE_URL, add the CA to the system trust store, "
    "or point SSL_CERT_FILE at a CA bundle that has it"
)
_WHY_BINDING = (
    "channel_binding=require (asyncpg cannot bind channels, so the certificate is verified instead)"
)
_OPTIONS_ADVICE = (
    "remove options= from DATABASE_URL or add the parameter to the pooler's "
    "ignore_startup_parameters; a stock PgBouncer refuses options=, Neon's pooler accepts "
    "options=endpoint%3D<endpoint-id>"
)


@dataclass(frozen=True)
class _Kind:
    """What a failure means for the user: rejected (fix the configuration) or unavailable."""

    rejected: bool
    advice: str


_AUTH = _Kind(rejected=True, advice=_CHECK_LOGIN)
_POOLER_AUTH = _Kind(
    rejected=True,
    advice=f"{_CHECK_LOGIN} (the pooler does not say whether the user or the password is wrong)",
)
_POOLER_DATABASE = _Kind(
    rejected=True,
    advice=f"the pooler has no such database configured; {_CHECK_DATABASE}",
)
_UNKNOWN_DATABASE = _Kind(rejected=True, advice=_CHECK_DATABASE)
_STARTUP_PARAMETER = _Kind(rejected=True, advice="")  # names the parameter: see below
_TLS_REQUIRED = _Kind(
    rejected=True,
    advice="the server accepts only TLS connections: use sslmode=require or verify-full",
)
_POOLER_BUSY = _Kind(rejected=False, advice=_RETRY)
_POOLER_FULL = _Kind(
    rejected=False,
    advice=(
        "the pooler is up but admits no more clients (max_client_conn): retry later, and "
        "lower POOL_SIZE / MAX_OVERFLOW or the number of processes, or raise the pooler's limit"
    ),
)
_POOLER_NO_SERVER = _Kind(
    rejected=False,
    advice="the pooler is up but cannot log in to the database server (suspended, restarting "
    "or down): retry later",
)
_POOLER_QUEUE = _Kind(
    rejected=False,
    advice="the pooler got no free server connection in time (all busy, or the server is "
    "unreachable): retry later",
)
_TLS_REFUSED = (
    "the server (or pooler) does not offer TLS, and the URL requires it: connect to an "
    "endpoint with TLS, or, only on a trusted network, use sslmode=disable or prefer"
)
_UNKNOWN_HOST = "check the host name in DATABASE_URL (the name does not resolve)"

# PgBouncer's fixed login-failure texts, all sent under SQLSTATE 08P01, taken from src/client.c,
# src/objects.c and src/janitor.c of PgBouncer 1.25.2. The tests produce the main ones with
# Debian's 1.18 and with 1.25: the same texts, except that 1.18 refuses `options` as a whole
# ("unsupported startup parameter: options") where 1.20+ read `-c` switches in it. Each key is a
# regular expression matched at the start of the message; what follows is PgBouncer's detail
# (a name, a parameter). Before 1.20 PgBouncer also relayed the server's own login failure
# under 08P01 (1.20+ keep the server's SQLSTATE): the "relays" group holds PostgreSQL's texts
# for those. Anything not listed becomes `DatabaseUnavailable`, carrying the text.
PGBOUNCER_LOGIN_MESSAGES: dict[str, _Kind] = {
    # PgBouncer's own login checks: no retry helps.
    "password authentication failed": _POOLER_AUTH,  # also PostgreSQL's relayed text
    "SASL authentication failed": _POOLER_AUTH,  # SCRAM: wrong password or unknown user
    '"trust" authentication failed': _POOLER_AUTH,  # user not in auth_file
    "no such user": _POOLER_AUTH,  # auth_query found none
    "login rejected": _POOLER_AUTH,
    "no authentication method is found": _POOLER_AUTH,  # auth_hba_file
    "certificate authentication failed": _POOLER_AUTH,
    "unix socket login rejected": _POOLER_AUTH,
    "empty password returned by client": _POOLER_AUTH,
    "no username supplied": _POOLER_AUTH,
    "username too long": _POOLER_AUTH,
    "password too long": _POOLER_AUTH,
    "no such database": _POOLER_DATABASE,  # ": <name>", not in [databases]
    "unsupported startup parameter": _STARTUP_PARAMETER,  # ": <name>", or " in options: <name>"
    "unsupported options startup parameter": _STARTUP_PARAMETER,  # options not "-c name=value"
    "SSL required": _TLS_REQUIRED,  # client_tls_sslmode = require, client sent no TLS
    # Relays: PostgreSQL's login failures as PgBouncer before 1.20 passes them on.
    'database ".*" does not exist': _UNKNOWN_DATABASE,
    'role ".*" does not exist': _AUTH,
    "no pg_hba.conf entry for": _AUTH,
    "permission denied for database": _AUTH,
    # Transient: the pooler is busy, restarting or cannot reach the server right now.
    "no more connections allowed": _POOLER_FULL,  # max_client_conn
    "client connections exceeded": _POOLER_FULL,  # max_db/user_client_connections
    "query_wait_timeout": _POOLER_QUEUE,
    "client_login_timeout": _POOLER_BUSY,
    "server login has been failing": _POOLER_NO_SERVER,  # server_login_retry, cached error
    "server shutting down": _POOLER_BUSY,
    "pooler is shutting down": _POOLER_BUSY,
    'database ".*" is disabled': _POOLER_BUSY,  # DISABLE on the admin console
    "suspend_timeout": _POOLER_BUSY,
}

_PROTOCOL_VIOLATION = "08P01"  # PgBouncer's SQLSTATE for everything it reports itself
_INSUFFICIENT_PRIVILEGE = "42501"  # e.g. CONNECT revoked on the database
_SETTING_CLASSES = ("22", "42")  # a startup setting the server refuses (bad name or value)
_HOSTNAME_MISMATCH_CODES = frozenset({62, 64})  # X509_V_ERR_HOSTNAME/IP_ADDRESS_MISMATCH


def explain_connect_failure(
    error: BaseException, *, tls: TlsIntent | None, password: str | None = None
) -> TodoStoreError | None:
    """The package's error for a failed connection attempt, or None if `error` is not one.

    `tls` is the URL's TLS intent (`to_asyncpg(url).tls`), used to say why a certificate was
    checked; `password`, if given, is replaced by *** in every text taken from the error.
    """
    if not isinstance(error, Exception) or isinstance(error, TodoStoreError):
        return None
    cause = driver_error(error)

    def said(text: str) -> str:
        """A text from the error: one line, password redacted."""
        line = " ".join(text.split())
        return line.replace(password, "***") if password else line

    if isinstance(cause, asyncpg.PostgresError) and not isinstance(
        cause, asyncpg.ConnectionDoesNotExistError
    ):
        message = getattr(cause, "message", None) or str(cause)
        return _server_error(cause.sqlstate or "", said(message))
    if isinstance(cause, ssl.SSLCertVerificationError):
        return _certificate_error(cause, said(cause.verify_message or str(cause)), tls)
    if isinstance(cause, asyncpg.ConnectionDoesNotExistError):
        return DatabaseUnavailable(
            f"could not connect: the server closed the connection during login "
            f"({said(str(cause))}) — {_RETRY}"
        )
    if isinstance(cause, socket.gaierror) and cause.errno == socket.EAI_NONAME:
        return ConnectionRejected(said(str(cause)), _UNKNOWN_HOST)
    if type(cause) is ConnectionError and cause.errno is None and tls is not None:
        # asyncpg's own "rejected SSL upgrade": the server answered "no TLS" to a URL that
        # requires it (a bare ConnectionError; every OS-level one is a subclass with errno).
        return ConnectionRejected(said(str(cause)), _TLS_REFUSED)
    if isinstance(cause, TimeoutError):  # asyncio's too; before OSError, its base class
        return DatabaseUnavailable(
            f"could not connect: no answer within the connect timeout (connect_timeout) — {_RETRY}"
        )
    if isinstance(cause, OSError):
        return DatabaseUnavailable(f"could not connect: {_os_reason(cause, said)} — {_RETRY}")
    return None


def driver_error(error: BaseException) -> BaseException | None:
    """The error asyncpg, ssl or the OS raised, under any SQLAlchemy wrapping, or None.

    SQLAlchemy 2.1 raises its own `AsyncAdapt_asyncpg_dbapi.Error` from asyncpg's (as
    `__cause__`), `DBAPIError` keeps it in `.orig`; 2.0 passes asyncpg's error through. When
    the server or pooler said why before closing the connection (a FATAL error, PgBouncer's
    `query_wait_timeout` or `server login has been failing`), asyncpg raises
    `ConnectionDoesNotExistError` from that error: the server's own error is returned.
    """
    for candidate in error_chain(error):
        if isinstance(candidate, asyncpg.ConnectionDoesNotExistError):
            said = candidate.__cause__
            return said if isinstance(said, asyncpg.PostgresError) else candidate
        if isinstance(candidate, asyncpg.PostgresError):
            return candidate
        if isinstance(candidate, OSError):  # ssl errors and TimeoutError included
            return candidate
    return None


def error_chain(error: BaseException) -> Iterator[BaseException]:
    """`error`, then what it wraps (`.orig`, `__cause__`, `__context__`), breadth first."""
    seen: set[int] = set()
    pending: list[BaseException] = [error]
    while pending:
        current = pending.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        orig = getattr(current, "orig", None)
        for linked in (orig, current.__cause__, current.__context__):
            if isinstance(linked, Exception):
                pending.append(linked)


def _server_error(sqlstate: str, reason: str) -> TodoStoreError:
    if sqlstate == _PROTOCOL_VIOLATION:
        return _pooler_error(reason)
    if sqlstate.startswith(AUTH_CLASS):
        advice = _CHECK_LOGIN
        if sqlstate == "28000":  # pg_hba.conf: this user/database/host/TLS combination
            advice = (
                "the server's access rules refuse this user, database or connection type: "
                "check them in DATABASE_URL, and use sslmode=require if it accepts only TLS"
            )
        return ConnectionRejected(reason, advice, sqlstate=sqlstate)
    if sqlstate == UNKNOWN_DATABASE:
        return ConnectionRejected(reason, _CHECK_DATABASE, sqlstate=sqlstate)
    if sqlstate == _INSUFFICIENT_PRIVILEGE:
        advice = "grant the role CONNECT on the database, or use a role that has it"
        return ConnectionRejected(reason, advice, sqlstate=sqlstate)
    if sqlstate.startswith(_SETTING_CLASSES):
        advice = (
            "the server refused a setting sent at connect (options= or application_name= in "
            "DATABASE_URL): fix or remove it; options=endpoint%3D... is for Neon's proxy only"
        )
        return ConnectionRejected(reason, advice, sqlstate=sqlstate)
    # Shutting down / starting up (57P01-57P03), too many connections (53300), other
    # connection exceptions (08xxx) and anything unknown: may pass, say what the server said.
    return DatabaseUnavailable(f"could not connect: {reason} (SQLSTATE {sqlstate}) — {_RETRY}")


def _pooler_error(reason: str) -> TodoStoreError:
    kind = pooler_message_kind(reason)
    if kind is not None and kind.rejected:
        advice = _startup_parameter_advice(reason) if kind is _STARTUP_PARAMETER else kind.advice
        return ConnectionRejected(reason, advice, sqlstate=_PROTOCOL_VIOLATION)
    advice = kind.advice if kind is not None else _RETRY
    return DatabaseUnavailable(
        f"could not connect: {reason} (SQLSTATE {_PROTOCOL_VIOLATION}) — {advice}"
    )


def pooler_message_kind(reason: str) -> _Kind | None:
    """The entry of `PGBOUNCER_LOGIN_MESSAGES` a PgBouncer message (SQLSTATE 08P01) matches."""
    for pattern, kind in PGBOUNCER_LOGIN_MESSAGES.items():
        if re.match(pattern, reason):
            return kind
    return None


def pooler_cannot_reach_server(reason: str) -> bool:
    """Whether a PgBouncer message says the pooler is up but cannot log in to its server
    (`server login has been failing`): a suspended, restarting or down database."""
    return pooler_message_kind(reason) is _POOLER_NO_SERVER


def _startup_parameter_advice(reason: str) -> str:
    """Name the refused parameter: "unsupported startup parameter: <name>" (any version),
    "... in options: <setting>" and "unsupported options startup parameter: ..." (1.20+)."""
    head, _, detail = reason.partition(":")
    name = "options" if "options" in head else detail.strip()
    if name != "options":
        return (
            f"the pooler refuses the startup parameter {name}: remove it from DATABASE_URL or "
            "add it to the pooler's ignore_startup_parameters"
        )
    return f"the pooler refuses the startup parameter options: {_OPTIONS_ADVICE}"


def _certificate_error(
    error: ssl.SSLCertVerificationError, reason: str, tls: TlsIntent | None
) -> TodoStoreError:
    why = _why_verified(tls)
    if error.verify_code in _HOSTNAME_MISMATCH_CODES:
        if tls is not None and tls.reason == "channel_binding=require":
            fix = "connect by the host name the certificate names (as the provider shows it)"
        else:
            fix = (
                "connect by a host name the certificate names, or use sslmode=verify-ca "
                "(checks the CA but not the name)"
            )
        return ConnectionRejected(reason, f"{why}, and the name does not match: {fix}")
    if tls is not None and tls.rootcert is not None:
        fix = f"check that {tls.rootcert} holds the CA that signed the server's certificate"
    else:
        fix = _TLS_FIXES
    return ConnectionRejected(reason, f"{why}: {fix}")


def _why_verified(tls: TlsIntent | None) -> str:
    if tls is None or not tls.verifies:
        return "the server certificate was verified"
    if tls.reason == "channel_binding=require":
        return f"the server certificate is verified because of {_WHY_BINDING}"
    return f"the server certificate is verified because of {tls.reason}"


def _os_reason(error: OSError, said: Callable[[str], str]) -> str:
    """The operating system's wording ("connection refused"), plus what Python added."""
    detail = said(str(error))
    if error.errno is None or error.errno <= 0 or isinstance(error, ssl.SSLError):
        return detail or type(error).__name__  # e.g. name resolution: "[Errno -2] Name or ..."
    name = os.strerror(error.errno).lower()
    return f"{name} ({detail})" if detail else name
