"""A throwaway PostgreSQL that accepts only password logins over TLS, like a hosted database.

`secure_server()` (a context manager) makes a cluster in a temporary directory with the
system PostgreSQL's `initdb`, starts `postgres` on a free TCP port with TLS on, and yields a
`SecureServer`. Guarantees once it yields:

- the only way in is TCP + TLS + SCRAM-SHA-256 password (`pg_hba.conf` holds just
  `hostssl ... scram-sha-256` lines; no unix socket, no trust);
- its certificate is signed by a CA made for this server (`certificates.ca_file`, unknown to
  every trust store) and valid for `localhost` only, so `127.0.0.1` is a hostname mismatch;
- role `user` (SCRAM password `password`) owns database `database`; `superuser` exists too;
- on exit the server is stopped and every file is deleted, whatever happened.

Start-up is bounded and polls the server's own "ready" status, never sleeps blindly. As root,
the server runs as the `postgres` (else `nobody`) account. Where no PostgreSQL with TLS can run,
it raises `SecureServerUnavailable` saying why. The suite's usual test server is never touched.

`PgBouncer(server.upstream, server.database, **pgbouncer_options(server))` is a PgBouncer in
front of it with client TLS (the same certificate) and `auth_type = scram-sha-256`.
"""

from __future__ import annotations

import base64
import glob
import hashlib
import hmac
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import URL

from tests.rigs.certificates import TestCertificates, issue_certificates
from todo_store.testing.postgres import ProvisionedServer

if TYPE_CHECKING:
    import pwd

SOURCE = "secure"
_SUPERUSER = "postgres"
_APP_USER = "todo_app"
_APP_DATABASE = "todo_app"
_INITDB_TIMEOUT_S = 60.0
_START_TIMEOUT_S = 15.0
_STOP_TIMEOUT_S = 10.0
_POLL_INTERVAL_S = 0.02
_SCRAM_ITERATIONS = 4096  # PostgreSQL's default scram_iterations
_HBA = """\
# TLS + SCRAM password only: what a hosted PostgreSQL enforces.
hostssl all all 127.0.0.1/32 scram-sha-256
hostssl all all ::1/128 scram-sha-256
"""


class SecureServerUnavailable(RuntimeError):
    """No PostgreSQL with TLS can be run here, or it did not come up; says why."""


@dataclass(frozen=True)
class SecureServer:
    """A running TLS + SCRAM-only PostgreSQL (see the module docstring)."""

    host: str  # a name the server certificate is valid for
    port: int
    certificates: TestCertificates
    superuser: str
    superuser_password: str = field(repr=False)
    user: str
    password: str = field(repr=False)
    password_secret: str = field(repr=False)  # the role's SCRAM verifier, as the server keeps it
    database: str

    def url(
        self,
        *,
        user: str | None = None,
        password: str | None = None,
        database: str | None = None,
        host: str | None = None,
        port: int | None = None,
        query: Mapping[str, str] | None = None,
    ) -> str:
        """A libpq-style URL with the password in it; defaults: the app role and database."""
        rendered = URL.create(
            "postgresql",
            username=user or self.user,
            password=self.password if password is None else password,
            host=host or self.host,
            port=port or self.port,
            database=database or self.database,
            query=dict(query or {}),
        )
        return rendered.render_as_string(hide_password=False)

    @property
    def verified_query(self) -> dict[str, str]:
        """URL parameters that verify this server's certificate (`sslmode=verify-full`)."""
        return {"sslmode": "verify-full", "sslrootcert": str(self.certificates.ca_file)}

    @property
    def admin_url(self) -> str:
        """The superuser's URL (database `postgres`), certificate verified."""
        return self.url(
            user=self.superuser,
            password=self.superuser_password,
            database="postgres",
            query=self.verified_query,
        )

    @property
    def upstream(self) -> ProvisionedServer:
        """The server as `PgBouncer` takes it: TCP on 127.0.0.1, logging in as `user`.

        Not as the superuser: after a SCRAM client login PgBouncer logs in to the server with
        that client's SCRAM keys, so the role it logs in as must be the client's own.
        """
        return ProvisionedServer(
            admin_url=self.url(query=self.verified_query),
            source=SOURCE,
            host="127.0.0.1",
            port=self.port,
            user=self.user,
            password=self.password,
        )


def pgbouncer_options(server: SecureServer) -> dict[str, Any]:
    """`PgBouncer(server.upstream, server.database, **pgbouncer_options(server))` keywords.

    Clients must use TLS (the server's certificate) and log in with SCRAM as `server.user`;
    PgBouncer itself reaches the server over TLS. No startup parameter is ignored beyond the
    usual `extra_float_digits`, so `options=` is refused as by a stock PgBouncer.
    """
    certificates = server.certificates
    return {
        "settings": {
            "auth_type": "scram-sha-256",
            "client_tls_sslmode": "require",
            "client_tls_cert_file": str(certificates.server_cert_file),
            "client_tls_key_file": str(certificates.server_key_file),
            "server_tls_sslmode": "require",
            "ignore_startup_parameters": "extra_float_digits",
        },
        # The server's own verifier: PgBouncer logs in with the keys of the client's SCRAM
        # exchange, which fit the server only if salt and iteration count are the same.
        "users": {server.user: server.password_secret},
    }


def scram_secret(password: str, *, salt: bytes | None = None) -> str:
    """The SCRAM-SHA-256 verifier PostgreSQL stores for `password` (RFC 5802/7677 format).

    Both PostgreSQL (`CREATE ROLE ... PASSWORD '<secret>'`) and PgBouncer's auth_file accept it,
    so the plain password is written nowhere.
    """
    salt = salt or secrets.token_bytes(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, _SCRAM_ITERATIONS)
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.digest(salted, b"Server Key", "sha256")

    def b64(raw: bytes) -> str:
        return base64.b64encode(raw).decode()

    return f"SCRAM-SHA-256${_SCRAM_ITERATIONS}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


@contextmanager
def secure_server() -> Iterator[SecureServer]:
    """Start a TLS + SCRAM-only PostgreSQL; stop it and delete its files on exit."""
    bindir = _bindir()
    account = _unprivileged_account()
    workdir = Path(tempfile.mkdtemp(prefix="todo-store-secure-pg-"))
    process: subprocess.Popen[bytes] | None = None
    try:
        certificates = issue_certificates(workdir)
        password = f"pw-{secrets.token_hex(8)}"
        server = SecureServer(
            host=certificates.hostnames[0],
            port=_free_port(),
            certificates=certificates,
            superuser=_SUPERUSER,
            superuser_password=f"su-{secrets.token_hex(8)}",
            user=_APP_USER,
            password=password,
            password_secret=scram_secret(password),
            database=_APP_DATABASE,
        )
        (workdir / "pg_hba.conf").write_text(_HBA, encoding="utf-8")
        (workdir / "superuser-password").write_text(server.superuser_password, encoding="utf-8")
        if account is not None:
            # postgres refuses to run as root; its account must own the files (and the key).
            for path in [workdir, *workdir.iterdir()]:
                shutil.chown(path, account.pw_uid, account.pw_gid)
        cluster = _Cluster(bindir, workdir, account)
        cluster.initdb(server)
        process = cluster.start(server)
        yield server
    finally:
        if process is not None:
            _stop(process)
        shutil.rmtree(workdir, ignore_errors=True)


class _Cluster:
    """The commands run on one data directory, as the unprivileged account when root."""

    def __init__(self, bindir: Path, workdir: Path, account: pwd.struct_passwd | None) -> None:
        self.bindir = bindir
        self.workdir = workdir
        self.pgdata = workdir / "pgdata"
        self.log = workdir / "postgres.log"
        self.account = account

    def initdb(self, server: SecureServer) -> None:
        self._run(
            "initdb",
            "--pgdata",
            str(self.pgdata),
            "--username",
            server.superuser,
            "--pwfile",
            str(self.workdir / "superuser-password"),
            "--auth",
            "scram-sha-256",
            "--encoding",
            "UTF8",
            "--locale",
            "C",
            "--no-sync",
        )
        # Single-user mode creates the app role and database before anyone can connect.
        script = (
            f"CREATE ROLE {server.user} LOGIN PASSWORD '{server.password_secret}'\n"
            f"CREATE DATABASE {server.database} OWNER {server.user}\n"
        )
        self._run("postgres", "--single", "-D", str(self.pgdata), "postgres", stdin=script)

    def start(self, server: SecureServer) -> subprocess.Popen[bytes]:
        certificates = server.certificates
        settings = {
            "listen_addresses": server.host,
            "port": str(server.port),
            "unix_socket_directories": "",
            "hba_file": str(self.workdir / "pg_hba.conf"),
            "ssl": "on",
            "ssl_cert_file": str(certificates.server_cert_file),
            "ssl_key_file": str(certificates.server_key_file),
            "password_encryption": "scram-sha-256",
            "fsync": "off",
            "shared_buffers": "16MB",
            "max_connections": "40",
        }
        command = [str(self.bindir / "postgres"), "-D", str(self.pgdata)]
        for key, value in settings.items():
            command += ["-c", f"{key}={value}"]
        with self.log.open("ab") as log:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                **self._as_account(),
            )
        try:
            self._wait_ready(process)
        except BaseException:
            _stop(process)
            raise
        return process

    def _wait_ready(self, process: subprocess.Popen[bytes]) -> None:
        # postmaster.pid's 8th line becomes "ready" once connections are accepted (PG >= 10).
        deadline = time.monotonic() + _START_TIMEOUT_S
        pid_file = self.pgdata / "postmaster.pid"
        while True:
            if process.poll() is not None:
                raise SecureServerUnavailable(f"postgres exited during start:\n{self._log_tail()}")
            try:
                lines = pid_file.read_text(encoding="utf-8").splitlines()
            except OSError:
                lines = []
            if len(lines) >= 8 and lines[7].strip() == "ready":
                return
            if time.monotonic() > deadline:
                raise SecureServerUnavailable(
                    f"postgres not ready after {_START_TIMEOUT_S:.0f} s:\n{self._log_tail()}"
                )
            time.sleep(_POLL_INTERVAL_S)

    def _run(self, program: str, *args: str, stdin: str | None = None) -> None:
        try:
            result = subprocess.run(
                [str(self.bindir / program), *args],
                input=(stdin or "").encode(),
                capture_output=True,
                timeout=_INITDB_TIMEOUT_S,
                check=False,
                cwd=self.workdir,
                **self._as_account(),
            )
        except (OSError, subprocess.TimeoutExpired) as error:
            raise SecureServerUnavailable(f"{program} failed: {error}") from None
        output = (result.stdout + result.stderr).decode(errors="replace")
        if result.returncode != 0 or "ERROR:" in output:
            raise SecureServerUnavailable(f"{program} failed ({result.returncode}):\n{output}")

    def _as_account(self) -> dict[str, Any]:
        if self.account is None:
            return {}
        return {
            "user": self.account.pw_uid,
            "group": self.account.pw_gid,
            "extra_groups": [],  # drop root's groups too
            "env": {**os.environ, "HOME": self.account.pw_dir or "/"},
        }

    def _log_tail(self) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-30:])
        except OSError as error:
            return f"(no log: {error})"


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGINT)  # "fast" shutdown: disconnects clients, no waiting
    try:
        process.wait(_STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _bindir() -> Path:
    """The system PostgreSQL's programs (the embedded wheel's server is built without TLS)."""
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        try:
            found = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=False
            ).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            found = ""
        if found:
            candidates.append(Path(found))
    versions = glob.glob("/usr/lib/postgresql/*/bin")
    candidates += sorted((Path(p) for p in versions), key=_major_version, reverse=True)
    for bindir in candidates:
        if (bindir / "initdb").is_file() and (bindir / "postgres").is_file():
            return bindir
    raise SecureServerUnavailable(
        "no PostgreSQL server programs (initdb, postgres) found; apt-get install postgresql"
    )


def _major_version(bindir: Path) -> int:
    name = bindir.parent.name
    return int(name) if name.isdigit() else 0


def _unprivileged_account() -> pwd.struct_passwd | None:
    """The account to run postgres as: None unless we are root (postgres refuses root)."""
    if sys.platform == "win32" or os.geteuid() != 0:
        return None
    import pwd  # noqa: PLC0415 - POSIX only

    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise SecureServerUnavailable("running as root, and no 'postgres' or 'nobody' account")


def _free_port() -> int:
    import socket  # noqa: PLC0415

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
