"""Turn any Postgres URL a user pastes into what asyncpg needs.

`to_asyncpg()` takes a URL as Neon's console shows it, or any `postgres://`, `postgresql://`,
`postgresql+asyncpg://`, `postgresql+psycopg://`, `postgresql+psycopg2://` URL, and returns a
`postgresql+asyncpg` URL (its query keeps only `host`/`port`, which SQLAlchemy hands to asyncpg)
plus the connect args the libpq parameters translate to. Guarantees:

- `sslmode` -> `ssl`; `application_name`, `options` -> `server_settings`; `connect_timeout` ->
  `timeout` (0 or less is libpq's "no limit": no `timeout`, the engine's bounded default applies).
- `verify-ca`/`verify-full` check against `sslrootcert` if given, else the system trust store
  (Neon's certificates are publicly trusted), not asyncpg's `~/.postgresql/root.crt`. As in libpq,
  `sslrootcert=system` implies `verify-full`, and a root certificate file makes the weaker
  TLS modes verify (`verify-ca`).
- asyncpg cannot do channel binding: `channel_binding=require` is met by verifying the server
  certificate instead (effective `sslmode` raised to `verify-full`; with `sslmode=disable` it is an
  error). `channel_binding=prefer`/`disable` are ignored.
- `AsyncpgTarget.tls` says which `sslmode` is in force and which part of the URL put it there
  (`TlsIntent`), so a failed certificate check can tell the user why it was checked at all.
- Nothing is silently dropped or weakened: an unknown parameter, a bad value or a foreign scheme
  raises `InvalidDatabaseURL`, naming the offending part. No error message, `mask()` or
  `repr(AsyncpgTarget)` ever contains the password.

No logging, no network; only building an `SSLContext` reads (CA) files.
"""

from __future__ import annotations

import math
import ssl
from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

ASYNCPG_DRIVER = "postgresql+asyncpg"
LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})  # host names that mean this machine
_POSTGRES_SCHEMES = frozenset(
    {"postgres", "postgresql", ASYNCPG_DRIVER, "postgresql+psycopg", "postgresql+psycopg2"}
)
_SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
_VERIFYING_SSLMODES = ("verify-ca", "verify-full")
_CHANNEL_BINDINGS = ("disable", "prefer", "require")
_KEPT_IN_URL = frozenset({"host", "port"})  # SQLAlchemy passes these on to asyncpg itself
_TRANSLATED = frozenset(
    {"sslmode", "sslrootcert", "channel_binding", "application_name", "options", "connect_timeout"}
)
_POOLER_SUFFIX = "-pooler"


class InvalidDatabaseURL(ValueError):
    """The URL cannot be used; the message names the part, never the password."""


@dataclass(frozen=True)
class TlsIntent:
    """The TLS mode in force for a URL, and the part of the URL that put it there.

    `sslmode` is the effective mode (after `channel_binding`/`sslrootcert` raised it).
    `reason` names, as written in the URL, what decided it: `sslmode=verify-full`,
    `channel_binding=require` (asyncpg cannot bind channels, so the certificate is verified
    instead), `sslrootcert=system`, `sslrootcert=<path>` (a root certificate makes the weaker
    modes verify), or simply `sslmode=require`. `rootcert` is the CA file certificates are checked
    against; None means the system trust store (or no check at all, see `verifies`).
    """

    sslmode: str
    reason: str
    rootcert: str | None = None

    @property
    def verifies(self) -> bool:
        """Whether the server certificate is checked against a CA."""
        return self.sslmode in _VERIFYING_SSLMODES

    @property
    def checks_hostname(self) -> bool:
        """Whether the certificate must also name the host connected to."""
        return self.sslmode == "verify-full"


@dataclass(frozen=True)
class AsyncpgTarget:
    """A `postgresql+asyncpg` URL plus the connect args asyncpg needs alongside it.

    `tls` is None when the URL says nothing about TLS (asyncpg's default: try TLS, verify
    nothing).
    """

    url: URL
    connect_args: dict[str, Any]
    tls: TlsIntent | None = None

    def __repr__(self) -> str:
        shown = self.url.render_as_string(hide_password=True)
        return f"AsyncpgTarget(url={shown!r}, connect_args={self.connect_args!r}, tls={self.tls!r})"


def to_asyncpg(raw: str | URL) -> AsyncpgTarget:
    """Translate a pasted Postgres URL into an asyncpg URL and connect args."""
    url = _parse(raw)
    if url.drivername.lower() not in _POSTGRES_SCHEMES:
        raise InvalidDatabaseURL(f"unsupported URL scheme {url.drivername!r}: expected postgresql")
    unknown = sorted(set(url.query) - _KEPT_IN_URL - _TRANSLATED)
    if unknown:
        raise InvalidDatabaseURL(f"unsupported URL parameter(s): {', '.join(unknown)}")
    if not url.host and "host" not in url.query:
        raise InvalidDatabaseURL("URL has no host (give one, or ?host=/socket/dir)")
    params = {key: _single(url, key) for key in _TRANSLATED if key in url.query}

    connect_args: dict[str, Any] = {}
    tls = _tls_intent(url, params)
    if tls is not None:
        connect_args["ssl"] = _asyncpg_ssl(url, tls.sslmode, params.get("sslrootcert"))
    server_settings = {k: params[k] for k in ("application_name", "options") if k in params}
    if server_settings:
        connect_args["server_settings"] = server_settings
    if "connect_timeout" in params:
        timeout = _seconds(url, params["connect_timeout"])
        if timeout > 0:
            connect_args["timeout"] = timeout

    kept = {key: value for key, value in url.query.items() if key in _KEPT_IN_URL}
    return AsyncpgTarget(url.set(drivername=ASYNCPG_DRIVER, query=kept), connect_args, tls)


def is_pooler_host(raw: str | URL) -> bool:
    """True for a Neon pooled endpoint: first host label `ep-...-pooler`."""
    return _is_pooler_label(_parse(raw).host)


def direct_url(raw: str | URL) -> URL:
    """The unpooled URL for a Neon `-pooler` host; any other URL unchanged."""
    url = _parse(raw)
    if url.host is None or not _is_pooler_label(url.host):
        return url
    label, dot, rest = url.host.partition(".")
    return url.set(host=label[: -len(_POOLER_SUFFIX)] + dot + rest)


def mask(raw: str | URL) -> str:
    """The URL for logs and error messages: password (also a `?password=`) shown as ***."""
    try:
        url = _parse(raw)
    except InvalidDatabaseURL:
        return "<unparseable database URL>"
    if "password" in url.query:
        url = url.update_query_dict({"password": "***"})
    return url.render_as_string(hide_password=True)


def _parse(raw: str | URL) -> URL:
    try:
        return make_url(raw)
    except ValueError:  # int() of the port; its text quotes the URL
        raise InvalidDatabaseURL("invalid port in database URL") from None
    except ArgumentError:  # older SQLAlchemy quotes the whole URL, password included
        raise InvalidDatabaseURL(
            "could not parse database URL (expected postgresql://user:password@host/dbname)"
        ) from None


def _is_pooler_label(host: str | None) -> bool:
    label = (host or "").split(".", 1)[0].lower()
    return label.startswith("ep-") and label.endswith(_POOLER_SUFFIX)


def _fail(url: URL, message: str) -> InvalidDatabaseURL:
    """An error for a message that quotes URL values: redact the password if it slipped in."""
    if url.password:
        message = message.replace(str(url.password), "***")
    return InvalidDatabaseURL(message)


def _single(url: URL, key: str) -> str:
    value = url.query[key]
    if not isinstance(value, str):
        raise InvalidDatabaseURL(f"URL parameter {key} given more than once")
    return value


def _tls_intent(url: URL, params: dict[str, str]) -> TlsIntent | None:
    """The sslmode to enforce, raised as channel_binding / sslrootcert demand, and why;
    None when the URL says nothing about TLS."""
    sslmode = params.get("sslmode")
    if sslmode is not None and sslmode not in _SSLMODES:
        raise _fail(url, f"invalid sslmode {sslmode!r}: expected one of {', '.join(_SSLMODES)}")
    channel_binding = params.get("channel_binding", "prefer")
    if channel_binding not in _CHANNEL_BINDINGS:
        choices = ", ".join(_CHANNEL_BINDINGS)
        raise _fail(url, f"invalid channel_binding {channel_binding!r}: expected one of {choices}")
    reason = f"sslmode={sslmode}"

    rootcert = params.get("sslrootcert")
    if rootcert == "system":
        if sslmode not in (None, "verify-full"):
            raise InvalidDatabaseURL("sslrootcert=system requires sslmode=verify-full")
        if sslmode is None:
            sslmode, reason = "verify-full", "sslrootcert=system"
    elif rootcert is not None and sslmode in (None, "allow", "prefer", "require"):
        sslmode, reason = "verify-ca", f"sslrootcert={rootcert}"

    if channel_binding == "require":
        if sslmode == "disable":
            raise InvalidDatabaseURL("channel_binding=require needs TLS, but sslmode=disable")
        if sslmode != "verify-full":
            sslmode, reason = "verify-full", "channel_binding=require"
    if sslmode is None:
        return None
    cafile = None if rootcert in (None, "system") else rootcert
    return TlsIntent(sslmode, reason, cafile)


def _asyncpg_ssl(url: URL, sslmode: str, rootcert: str | None) -> ssl.SSLContext | bool | str:
    if sslmode == "disable":
        return False
    if sslmode in ("allow", "prefer", "require"):
        return sslmode
    cafile = None if rootcert in (None, "system") else rootcert
    try:
        context = ssl.create_default_context(cafile=cafile)
    except OSError as exc:  # ssl.SSLError included
        raise _fail(url, f"sslrootcert {cafile!r} is unusable: {exc.strerror or exc}") from None
    if sslmode == "verify-ca":
        context.check_hostname = False
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _seconds(url: URL, value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds):
        raise _fail(url, f"connect_timeout must be a number of seconds, got {value!r}")
    return seconds
