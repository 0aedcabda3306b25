"""Unit tests for `todo_store.urls`: no database, no network."""

from __future__ import annotations

import dataclasses
import ssl
import traceback
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import URL, make_url

from todo_store.urls import (
    AsyncpgTarget,
    InvalidDatabaseURL,
    TlsIntent,
    direct_url,
    is_pooler_host,
    mask,
    to_asyncpg,
)

PASSWORD = "s3cr3t"
POOLER_HOST = "ep-cool-123-pooler.us-east-2.aws.neon.tech"
DIRECT_HOST = "ep-cool-123.us-east-2.aws.neon.tech"
NEON_CONSOLE = (
    f"postgresql://alice:{PASSWORD}@{POOLER_HOST}/neondb?sslmode=require&channel_binding=require"
)
BASE = f"postgresql://alice:{PASSWORD}@db.example.com:5432/app"
ASYNCPG_BASE = f"postgresql+asyncpg://alice:{PASSWORD}@db.example.com:5432/app"

# Stand-ins for SSLContext objects in the table: (check_hostname, verify_mode).
VERIFY_FULL = ("SSLContext", True, ssl.CERT_REQUIRED)
VERIFY_CA = ("SSLContext", False, ssl.CERT_REQUIRED)

# A self-signed CA certificate (EC P-256, valid until 2126) for the sslrootcert tests.
TEST_CA_PEM = """\
-----BEGIN CERTIFICATE-----
MIIBkTCCATegAwIBAgIUVcYs1HkdfQAYVwt2kCPkLhAfaxAwCgYIKoZIzj0EAwIw
HTEbMBkGA1UEAwwSdG9kby1zdG9yZSB0ZXN0IENBMCAXDTI2MTEyODE5NTk0NVoY
DzIxMjYxMTA0MTk1OTQ1WjAdMRswGQYDVQQDDBJ0b2RvLXN0b3JlIHRlc3QgQ0Ew
WTATBgcqhkjOPQIBBggqhkjOPQMBBwNCAAQ8JqA4NeZFuzkU6geI1Xq6LJkUSrJJ
blfWqdUsymcoeZ1YB2JMIWnO+bJ9sZogGtt4cD4klyd0eX9ZCbSYr5kYo1MwUTAd
BgNVHQ4EFgQU/cGE0uUo/UbwOxxOPHNlae6eVQ4wHwYDVR0jBBgwFoAU/cGE0uUo
/UbwOxxOPHNlae6eVQ4wDwYDVR0TAQH/BAUwAwEB/zAKBggqhkjOPQQDAgNIADBF
AiB5gzAq0p4QbW659v4NAhMr7eKTEwGmgtjYArpHPcpBCwIhALJk/WwEX48kb+/+
F6XGz5RURYhC/e4LJ4AwwKpFTsvA
-----END CERTIFICATE-----
"""
TEST_CA_SUBJECT = ((("commonName", "todo-store test CA"),),)


def _comparable(connect_args: dict[str, Any]) -> dict[str, Any]:
    """connect_args with each SSLContext replaced by what matters about it."""
    ssl_arg = connect_args.get("ssl")
    if isinstance(ssl_arg, ssl.SSLContext):
        return {**connect_args, "ssl": ("SSLContext", ssl_arg.check_hostname, ssl_arg.verify_mode)}
    return connect_args


def _full_text(exc: BaseException) -> str:
    """Everything a traceback would show about the exception, chained ones included."""
    return "".join(traceback.format_exception(exc)) + repr(exc)


@pytest.fixture
def ca_file(tmp_path: Path) -> Path:
    path = tmp_path / "root.crt"
    path.write_text(TEST_CA_PEM)
    return path


# --- translation table ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected_url", "expected_args"),
    [
        pytest.param(
            NEON_CONSOLE,
            f"postgresql+asyncpg://alice:{PASSWORD}@{POOLER_HOST}/neondb",
            {"ssl": VERIFY_FULL},
            id="neon-console",
        ),
        pytest.param(BASE.replace("postgresql", "postgres", 1), ASYNCPG_BASE, {}, id="postgres"),
        pytest.param(BASE, ASYNCPG_BASE, {}, id="postgresql"),
        pytest.param(ASYNCPG_BASE, ASYNCPG_BASE, {}, id="postgresql+asyncpg"),
        pytest.param(BASE.replace("postgresql", "postgresql+psycopg", 1), ASYNCPG_BASE, {}),
        pytest.param(BASE.replace("postgresql", "postgresql+psycopg2", 1), ASYNCPG_BASE, {}),
        pytest.param(f"{BASE}?sslmode=disable", ASYNCPG_BASE, {"ssl": False}),
        pytest.param(f"{BASE}?sslmode=allow", ASYNCPG_BASE, {"ssl": "allow"}),
        pytest.param(f"{BASE}?sslmode=prefer", ASYNCPG_BASE, {"ssl": "prefer"}),
        pytest.param(f"{BASE}?sslmode=require", ASYNCPG_BASE, {"ssl": "require"}),
        pytest.param(f"{BASE}?sslmode=verify-ca", ASYNCPG_BASE, {"ssl": VERIFY_CA}),
        pytest.param(f"{BASE}?sslmode=verify-full", ASYNCPG_BASE, {"ssl": VERIFY_FULL}),
        pytest.param(
            f"{BASE}?channel_binding=require", ASYNCPG_BASE, {"ssl": VERIFY_FULL}, id="cb-alone"
        ),
        pytest.param(
            f"{BASE}?sslmode=verify-ca&channel_binding=require",
            ASYNCPG_BASE,
            {"ssl": VERIFY_FULL},
            id="cb-raises-verify-ca",
        ),
        pytest.param(
            f"{BASE}?sslmode=require&channel_binding=prefer",
            ASYNCPG_BASE,
            {"ssl": "require"},
            id="cb-prefer-ignored",
        ),
        pytest.param(
            f"{BASE}?sslmode=disable&channel_binding=disable",
            ASYNCPG_BASE,
            {"ssl": False},
            id="cb-disable-ignored",
        ),
        pytest.param(
            f"{BASE}?sslrootcert=system", ASYNCPG_BASE, {"ssl": VERIFY_FULL}, id="rootcert-system"
        ),
        pytest.param(
            f"{BASE}?application_name=todo-api&options=endpoint%3Dep-cool-123",
            ASYNCPG_BASE,
            {
                "server_settings": {
                    "application_name": "todo-api",
                    "options": "endpoint=ep-cool-123",
                }
            },
            id="server-settings",
        ),
        pytest.param(f"{BASE}?connect_timeout=5", ASYNCPG_BASE, {"timeout": 5.0}, id="timeout"),
        pytest.param(f"{BASE}?connect_timeout=2.5", ASYNCPG_BASE, {"timeout": 2.5}),
        pytest.param(f"{BASE}?connect_timeout=0", ASYNCPG_BASE, {}, id="timeout-0-no-limit"),
        pytest.param(
            "postgresql://postgres@/db?host=/tmp/sock",
            "postgresql+asyncpg://postgres@/db?host=/tmp/sock",
            {},
            id="unix-socket",
        ),
        pytest.param(
            "postgres://postgres@/db?host=/tmp/sock&port=5433&sslmode=disable",
            "postgresql+asyncpg://postgres@/db?host=/tmp/sock&port=5433",
            {"ssl": False},
            id="unix-socket-port",
        ),
        pytest.param(
            f"postgresql://alice:{PASSWORD}@db.example.com",
            f"postgresql+asyncpg://alice:{PASSWORD}@db.example.com",
            {},
            id="no-database",
        ),
    ],
)
def test_translation(raw: str, expected_url: str, expected_args: dict[str, Any]) -> None:
    target = to_asyncpg(raw)

    assert target.url == make_url(expected_url)
    assert target.url.drivername == "postgresql+asyncpg"
    assert _comparable(target.connect_args) == expected_args
    if "timeout" in target.connect_args:
        assert type(target.connect_args["timeout"]) is float


def test_neon_console_url_keeps_host_and_password_and_verifies_certificate() -> None:
    target = to_asyncpg(NEON_CONSOLE)

    assert target.url.host == POOLER_HOST
    assert target.url.password == PASSWORD
    assert dict(target.url.query) == {}
    context = target.connect_args["ssl"]
    assert isinstance(context, ssl.SSLContext)
    assert context.check_hostname is True
    assert context.verify_mode == ssl.CERT_REQUIRED


def test_url_object_is_accepted() -> None:
    target = to_asyncpg(make_url(f"{BASE}?sslmode=require"))

    assert target.url == make_url(ASYNCPG_BASE)
    assert target.connect_args == {"ssl": "require"}


@pytest.mark.parametrize(
    ("sslmode", "check_hostname"), [("verify-full", True), ("verify-ca", False), ("require", False)]
)
def test_sslrootcert_file_is_the_trust_anchor(
    ca_file: Path, sslmode: str, check_hostname: bool
) -> None:
    target = to_asyncpg(f"{BASE}?sslmode={sslmode}&sslrootcert={ca_file}")

    context = target.connect_args["ssl"]
    assert isinstance(context, ssl.SSLContext)  # require + a root cert file -> verify-ca
    assert context.check_hostname is check_hostname
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert [cert["subject"] for cert in context.get_ca_certs()] == [TEST_CA_SUBJECT]


@pytest.mark.parametrize(
    ("query", "sslmode", "reason"),
    [
        pytest.param(
            "sslmode=require&channel_binding=require",
            "verify-full",
            "channel_binding=require",
            id="neon-console",
        ),
        pytest.param(
            "sslmode=verify-full&channel_binding=require",
            "verify-full",
            "sslmode=verify-full",
            id="verify-full-and-binding",
        ),
        pytest.param(
            "sslmode=verify-ca&channel_binding=require",
            "verify-full",
            "channel_binding=require",
            id="binding-raises-verify-ca",
        ),
        pytest.param("sslmode=verify-ca", "verify-ca", "sslmode=verify-ca", id="verify-ca"),
        pytest.param("sslrootcert=system", "verify-full", "sslrootcert=system", id="system"),
        pytest.param(
            "sslmode=verify-full&sslrootcert=system",
            "verify-full",
            "sslmode=verify-full",
            id="system-explicit",
        ),
        pytest.param("sslmode=require", "require", "sslmode=require", id="require"),
        pytest.param("sslmode=disable", "disable", "sslmode=disable", id="disable"),
        pytest.param(
            "channel_binding=require", "verify-full", "channel_binding=require", id="binding-alone"
        ),
    ],
)
def test_tls_intent_says_why_the_certificate_is_verified(
    query: str, sslmode: str, reason: str
) -> None:
    tls = to_asyncpg(f"{BASE}?{query}").tls

    assert tls is not None
    assert (tls.sslmode, tls.reason, tls.rootcert) == (sslmode, reason, None)
    assert tls.verifies is sslmode.startswith("verify-")
    assert tls.checks_hostname is (sslmode == "verify-full")


def test_tls_intent_names_the_root_certificate_file(ca_file: Path) -> None:
    raised = to_asyncpg(f"{BASE}?sslmode=require&sslrootcert={ca_file}").tls
    explicit = to_asyncpg(f"{BASE}?sslmode=verify-full&sslrootcert={ca_file}").tls
    bound = to_asyncpg(f"{BASE}?sslrootcert={ca_file}&channel_binding=require").tls

    assert raised == TlsIntent("verify-ca", f"sslrootcert={ca_file}", str(ca_file))
    assert explicit == TlsIntent("verify-full", "sslmode=verify-full", str(ca_file))
    assert bound == TlsIntent("verify-full", "channel_binding=require", str(ca_file))


def test_tls_intent_is_none_when_the_url_says_nothing_about_tls() -> None:
    assert to_asyncpg(BASE).tls is None
    assert to_asyncpg(f"{BASE}?channel_binding=prefer").tls is None


def test_target_repr_masks_password() -> None:
    target = to_asyncpg(NEON_CONSOLE)

    for text in (repr(target), str(target), f"{target}", f"{target!r}"):
        assert PASSWORD not in text
        assert "alice:***@" in text
        assert POOLER_HOST in text


def test_target_is_frozen() -> None:
    target = to_asyncpg(BASE)

    with pytest.raises(dataclasses.FrozenInstanceError):
        target.url = make_url(BASE)  # type: ignore[misc]
    assert isinstance(target, AsyncpgTarget)


# --- invalid URLs --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "names"),
    [
        pytest.param(
            f"{BASE}?target_session_attrs=any&sslmode=require&foo=1&sslcert=c&gsslib=gssapi&zz=1",
            "unsupported URL parameter(s): foo, gsslib, sslcert, target_session_attrs, zz",
            id="unknown-params-sorted",
        ),
        pytest.param(f"{BASE}?password={PASSWORD}", "password", id="password-param"),
        pytest.param(f"{BASE}?sslmode=verify", "sslmode", id="bad-sslmode"),
        pytest.param(f"{BASE}?sslmode=REQUIRE", "sslmode", id="sslmode-case"),
        pytest.param(f"{BASE}?sslmode={PASSWORD}", "sslmode", id="sslmode-is-password"),
        pytest.param(
            f"{BASE}?sslmode=require&sslmode=disable",
            "sslmode given more than once",
            id="sslmode-twice",
        ),
        pytest.param(f"{BASE}?connect_timeout=soon", "connect_timeout", id="timeout-text"),
        pytest.param(f"{BASE}?connect_timeout=nan", "connect_timeout", id="timeout-nan"),
        pytest.param(f"{BASE}?connect_timeout=inf", "connect_timeout", id="timeout-inf"),
        pytest.param(f"{BASE}?connect_timeout={PASSWORD}", "connect_timeout"),
        pytest.param(f"{BASE}?channel_binding=maybe", "channel_binding", id="bad-cb"),
        pytest.param(
            f"{BASE}?sslmode=disable&channel_binding=require", "channel_binding", id="cb-no-tls"
        ),
        pytest.param(
            f"{BASE}?sslmode=require&sslrootcert=system", "sslrootcert", id="system-weak-mode"
        ),
        pytest.param(
            f"{BASE}?sslmode=verify-full&sslrootcert=/nonexistent/{PASSWORD}.crt",
            "sslrootcert",
            id="rootcert-missing",
        ),
        pytest.param(f"mysql://alice:{PASSWORD}@db.example.com/app", "mysql", id="mysql"),
        pytest.param("sqlite:///todo.db", "sqlite", id="sqlite"),
        pytest.param(f"postgresql+pg8000://alice:{PASSWORD}@h/app", "postgresql+pg8000"),
        pytest.param(f"postgresql://alice:{PASSWORD}@/app", "host", id="no-host"),
        pytest.param(f"postgresql://alice:{PASSWORD}@db.example.com:54x2/app", "port"),
        pytest.param(f"alice:{PASSWORD}@db.example.com/app", "parse", id="no-scheme"),
    ],
)
def test_invalid_url_names_the_part_and_hides_password(raw: str, names: str) -> None:
    with pytest.raises(InvalidDatabaseURL) as info:
        to_asyncpg(raw)

    assert isinstance(info.value, ValueError)
    assert names in str(info.value)
    assert PASSWORD not in _full_text(info.value)


def test_parse_failure_does_not_chain_the_driver_error() -> None:
    with pytest.raises(InvalidDatabaseURL) as info:
        to_asyncpg(f"postgresql://alice:{PASSWORD}@h:{PASSWORD}/app")

    assert info.value.__cause__ is None
    assert info.value.__suppress_context__ is True


# --- direct URL ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "pooled"),
    [
        (POOLER_HOST, True),
        ("EP-COOL-123-POOLER.us-east-2.aws.neon.tech", True),
        ("ep-cool-123-pooler.westus3.azure.neon.tech", True),
        (DIRECT_HOST, False),
        ("db-pooler.example.com", False),
        ("pooler.ep-cool-123-pooler.neon.tech", False),
        ("localhost", False),
    ],
)
def test_is_pooler_host(host: str, pooled: bool) -> None:
    assert is_pooler_host(f"postgresql://alice:{PASSWORD}@{host}/neondb") is pooled


def test_is_pooler_host_without_host() -> None:
    assert is_pooler_host("postgresql://postgres@/db?host=/tmp/sock") is False


def test_direct_url_strips_pooler_suffix_and_keeps_everything_else() -> None:
    direct = direct_url(NEON_CONSOLE)

    assert isinstance(direct, URL)
    assert direct.host == DIRECT_HOST
    assert direct.password == PASSWORD
    assert direct.username == "alice"
    assert direct.database == "neondb"
    assert direct.drivername == "postgresql"
    assert dict(direct.query) == {"sslmode": "require", "channel_binding": "require"}
    assert PASSWORD not in repr(direct)
    assert PASSWORD not in str(direct)


def test_direct_url_accepts_url_object_and_feeds_to_asyncpg() -> None:
    direct = direct_url(make_url(NEON_CONSOLE))

    assert to_asyncpg(direct).url.host == DIRECT_HOST


@pytest.mark.parametrize(
    "raw",
    [
        f"postgresql://alice:{PASSWORD}@{DIRECT_HOST}/neondb?sslmode=require",
        f"postgresql://alice:{PASSWORD}@db-pooler.example.com/app",
        "postgresql://postgres@/db?host=/tmp/sock",
        f"mysql://alice:{PASSWORD}@db.example.com/app",
    ],
)
def test_direct_url_leaves_other_urls_unchanged(raw: str) -> None:
    direct = direct_url(raw)

    assert isinstance(direct, URL)
    assert direct == make_url(raw)


def test_direct_url_error_hides_password() -> None:
    with pytest.raises(InvalidDatabaseURL) as info:
        direct_url(f"alice:{PASSWORD}@{POOLER_HOST}/neondb")

    assert PASSWORD not in _full_text(info.value)


# --- mask ----------------------------------------------------------------------------------


def test_mask_hides_password_and_keeps_the_rest() -> None:
    masked = mask(NEON_CONSOLE)

    assert PASSWORD not in masked
    assert masked.startswith(f"postgresql://alice:***@{POOLER_HOST}/neondb?")
    assert "sslmode=require" in masked


@pytest.mark.parametrize(
    "raw",
    [
        NEON_CONSOLE,
        make_url(NEON_CONSOLE),
        f"postgresql://alice@db.example.com/app?password={PASSWORD}",
        f"not a url alice:{PASSWORD}@somewhere",
        f"postgresql://alice:{PASSWORD}@h:{PASSWORD}/app",
    ],
)
def test_mask_never_shows_password(raw: str | URL) -> None:
    masked = mask(raw)

    assert PASSWORD not in masked
    assert masked


def test_mask_without_password_is_the_url() -> None:
    assert mask("postgresql://postgres@localhost:5432/db") == (
        "postgresql://postgres@localhost:5432/db"
    )
