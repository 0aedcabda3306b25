"""A throwaway primary and a streaming standby of it, for the replica tests.

`replica_cluster()` (a context manager) runs `initdb` in a temporary directory, starts the
primary on a free port of 127.0.0.1, clones it with `pg_basebackup -R` (a streaming standby)
and starts the standby on another free port. Both trust local TCP logins as `postgres`.
On exit both are stopped and every file is deleted. Start-up polls the servers' own "ready"
status with a bound; nothing sleeps blindly. As root, the servers run as `postgres` (else
`nobody`). Where no server programs are installed it raises `ReplicaClusterUnavailable`.

`ReplicaCluster.set_apply_delay(seconds)` sets the standby's `recovery_min_apply_delay`
(reloaded, no restart); `stop_standby()` / `start_standby()` stop it ("fast": sessions are
disconnected) and start it again on the same port.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.rigs.secure_server import SecureServerUnavailable, _bindir, _free_port
from tests.rigs.secure_server import _unprivileged_account as unprivileged_account

_TIMEOUT_S = 60.0
_READY_TIMEOUT_S = 30.0
_POLL_S = 0.02
_STOP_TIMEOUT_S = 10.0
_DELAY_FILE = "apply_delay.conf"


class ReplicaClusterUnavailable(RuntimeError):
    """No PostgreSQL server programs here, or the cluster did not come up; says why."""


@dataclass
class _Server:
    pgdata: Path
    port: int
    settings: dict[str, str]
    process: subprocess.Popen[bytes] | None = None


@dataclass
class ReplicaCluster:
    """A running primary and its streaming standby (see the module docstring)."""

    workdir: Path
    bindir: Path
    account: Any
    primary: _Server
    standby: _Server
    database: str = "postgres"
    _log: Path = field(init=False)

    def __post_init__(self) -> None:
        self._log = self.workdir / "servers.log"

    def url(self, port: int, database: str | None = None) -> str:
        return f"postgresql://postgres@127.0.0.1:{port}/{database or self.database}"

    @property
    def primary_url(self) -> str:
        return self.url(self.primary.port)

    @property
    def standby_url(self) -> str:
        return self.url(self.standby.port)

    # -- commands ------------------------------------------------------------------------

    def run(self, program: str, *args: str) -> None:
        try:
            result = subprocess.run(
                [str(self.bindir / program), *args],
                capture_output=True,
                timeout=_TIMEOUT_S,
                check=False,
                cwd=self.workdir,
                **self._as_account(),
            )
        except (OSError, subprocess.TimeoutExpired) as error:
            raise ReplicaClusterUnavailable(f"{program} failed: {error}") from None
        if result.returncode != 0:
            output = (result.stdout + result.stderr).decode(errors="replace")
            raise ReplicaClusterUnavailable(f"{program} failed ({result.returncode}):\n{output}")

    def start(self, server: _Server) -> None:
        command = [str(self.bindir / "postgres"), "-D", str(server.pgdata)]
        for key, value in server.settings.items():
            command += ["-c", f"{key}={value}"]
        with self._log.open("ab") as log:
            server.process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                **self._as_account(),
            )
        self._wait_ready(server)

    def stop(self, server: _Server) -> None:
        process, server.process = server.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGINT)  # fast shutdown: sessions are disconnected
        try:
            process.wait(_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def stop_standby(self) -> None:
        self.stop(self.standby)

    def start_standby(self) -> None:
        self.start(self.standby)

    def set_apply_delay(self, seconds: float) -> None:
        """The standby waits this long before applying a commit (reload, no restart)."""
        path = self.standby.pgdata / _DELAY_FILE
        path.write_text(f"recovery_min_apply_delay = '{int(seconds * 1000)}ms'\n")
        if self.account is not None:
            shutil.chown(path, self.account.pw_uid, self.account.pw_gid)
        if self.standby.process is not None:
            self.standby.process.send_signal(signal.SIGHUP)

    def _wait_ready(self, server: _Server) -> None:
        # postmaster.pid's 8th line becomes "ready" (or "standby" for a hot standby that
        # accepts connections) once connections are accepted.
        deadline = time.monotonic() + _READY_TIMEOUT_S
        pid_file = server.pgdata / "postmaster.pid"
        assert server.process is not None
        while True:
            if server.process.poll() is not None:
                raise ReplicaClusterUnavailable(f"postgres exited during start:\n{self._tail()}")
            try:
                lines = pid_file.read_text(encoding="utf-8").splitlines()
            except OSError:
                lines = []
            if len(lines) >= 8 and lines[7].strip() in ("ready", "standby"):
                return
            if time.monotonic() > deadline:
                raise ReplicaClusterUnavailable(f"postgres not ready:\n{self._tail()}")
            time.sleep(_POLL_S)

    def _as_account(self) -> dict[str, Any]:
        if self.account is None:
            return {}
        return {
            "user": self.account.pw_uid,
            "group": self.account.pw_gid,
            "extra_groups": [],
            "env": {**os.environ, "HOME": self.account.pw_dir or "/"},
        }

    def _tail(self) -> str:
        try:
            return "\n".join(self._log.read_text(errors="replace").splitlines()[-30:])
        except OSError as error:
            return f"(no log: {error})"


def _settings(port: int) -> dict[str, str]:
    return {
        "listen_addresses": "127.0.0.1",
        "port": str(port),
        "unix_socket_directories": "",
        "fsync": "off",
        "shared_buffers": "16MB",
        "max_connections": "60",
        "wal_level": "replica",
        "max_wal_senders": "4",
        "hot_standby": "on",
        "wal_receiver_status_interval": "1s",
    }


@contextmanager
def replica_cluster() -> Iterator[ReplicaCluster]:
    """A primary and its streaming standby; stopped and deleted on exit."""
    try:
        bindir = _bindir()
        account = unprivileged_account()
    except SecureServerUnavailable as error:
        raise ReplicaClusterUnavailable(str(error)) from None
    if not (bindir / "pg_basebackup").is_file():
        raise ReplicaClusterUnavailable(f"no pg_basebackup in {bindir}")
    workdir = Path(tempfile.mkdtemp(prefix="todo-store-replicas-"))
    if account is not None:
        shutil.chown(workdir, account.pw_uid, account.pw_gid)
    primary_port, standby_port = _free_port(), _free_port()
    cluster = ReplicaCluster(
        workdir=workdir,
        bindir=bindir,
        account=account,
        primary=_Server(workdir / "primary", primary_port, _settings(primary_port)),
        standby=_Server(workdir / "standby", standby_port, _settings(standby_port)),
    )
    try:
        cluster.run(
            "initdb",
            "--pgdata",
            str(cluster.primary.pgdata),
            "--username",
            "postgres",
            "--auth",
            "trust",
            "--encoding",
            "UTF8",
            "--locale",
            "C",
            "--no-sync",
        )
        cluster.start(cluster.primary)
        cluster.run(
            "pg_basebackup",
            "--pgdata",
            str(cluster.standby.pgdata),
            "--dbname",
            f"host=127.0.0.1 port={primary_port} user=postgres",
            "--write-recovery-conf",
            "--wal-method=stream",
            "--checkpoint=fast",
            "--no-sync",
        )
        with (cluster.standby.pgdata / "postgresql.conf").open("a") as conf:
            conf.write(f"include_if_exists '{_DELAY_FILE}'\n")
        cluster.start(cluster.standby)
        yield cluster
    finally:
        cluster.stop(cluster.standby)
        cluster.stop(cluster.primary)
        shutil.rmtree(workdir, ignore_errors=True)
