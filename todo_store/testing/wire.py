"""A minimal client of the PostgreSQL wire protocol, for what asyncpg cannot do.

- `accepts_postgres`: is a PostgreSQL-speaking server listening (a readiness probe)?
- `simple_query`: run one command over the simple query protocol and return the rows as text;
  PgBouncer's admin console speaks only that protocol, and asyncpg always prepares.
- the building blocks (`startup`, `message`, `read_until_ready`, `ServerError`) for clients
  that send other messages.
Trust authentication only: these talk to test servers this package started.
"""

from __future__ import annotations

import socket
import struct
from typing import Protocol

_SSL_REQUEST = struct.pack("!ii", 8, 80877103)
_PROTOCOL_V3 = 196608


def accepts_postgres(host: str, port: int) -> bool:
    """Whether a PostgreSQL-speaking server answers at host:port.

    Sends an SSLRequest and expects `N` or `S`: a bare TCP connect is not enough, because
    Docker's port proxy accepts connections before the container listens.
    """
    try:
        with socket.create_connection((host, port), timeout=1.0) as sock:
            sock.sendall(_SSL_REQUEST)
            return sock.recv(1) in (b"N", b"S")
    except OSError:
        return False


def simple_query(
    host: str, port: int, user: str, database: str, sql: str
) -> list[dict[str, str | None]]:
    with socket.create_connection((host, port), timeout=5.0) as sock, sock.makefile("rb") as inp:
        sock.sendall(startup(user, database))
        read_until_ready(inp)  # authentication (trust: AuthenticationOk) up to ReadyForQuery
        sock.sendall(message(b"Q", sql.encode() + b"\0"))
        rows = read_until_ready(inp)
        sock.sendall(message(b"X", b""))
    return rows


def startup(user: str, database: str) -> bytes:
    """A protocol 3.0 StartupMessage for `user` and `database`."""
    params = b"".join(
        key + b"\0" + value.encode() + b"\0"
        for key, value in ((b"user", user), (b"database", database))
    )
    packet = struct.pack("!i", _PROTOCOL_V3) + params + b"\0"
    return struct.pack("!i", len(packet) + 4) + packet


class ServerError(RuntimeError):
    """The server answered with an ErrorResponse; `sqlstate` is its code."""

    def __init__(self, sqlstate: str, text: str) -> None:
        super().__init__(f"server error: {text}")
        self.sqlstate = sqlstate


def message(kind: bytes, body: bytes) -> bytes:
    """A typed protocol message: the kind byte, the length, the body."""
    return kind + struct.pack("!i", len(body) + 4) + body


def read_until_ready(inp: Readable) -> list[dict[str, str | None]]:
    """Read messages up to ReadyForQuery; return the rows described and sent on the way."""
    columns: list[str] = []
    rows: list[dict[str, str | None]] = []
    while True:
        header = inp.read(5)
        if len(header) < 5:
            raise ConnectionError("the server closed the connection")
        kind, length = header[:1], struct.unpack("!i", header[1:])[0]
        body = inp.read(length - 4)
        if kind == b"R" and struct.unpack("!i", body[:4])[0] != 0:
            raise ConnectionError("the server asked for a password; expected auth trust")
        if kind == b"E":
            raise ServerError(_error_field(body, b"C"), _error_message(body))
        if kind == b"T":
            columns = _column_names(body)
        elif kind == b"D":
            values = _row_values(body)
            # Without a Describe there is no RowDescription: the columns are numbered.
            names = columns if len(columns) == len(values) else list(map(str, range(len(values))))
            rows.append(dict(zip(names, values, strict=True)))
        elif kind == b"Z":
            return rows


class Readable(Protocol):
    """What the readers need of a socket's file: `read(n)`."""

    def read(self, size: int, /) -> bytes: ...


def _column_names(body: bytes) -> list[str]:
    (count,) = struct.unpack("!h", body[:2])
    names, pos = [], 2
    for _ in range(count):
        end = body.index(b"\0", pos)
        names.append(body[pos:end].decode())
        pos = end + 1 + 18  # table oid, column no, type oid, type size, modifier, format
    return names


def _row_values(body: bytes) -> list[str | None]:
    (count,) = struct.unpack("!h", body[:2])
    values: list[str | None] = []
    pos = 2
    for _ in range(count):
        (size,) = struct.unpack("!i", body[pos : pos + 4])
        pos += 4
        if size < 0:
            values.append(None)
        else:
            values.append(body[pos : pos + size].decode())
            pos += size
    return values


def _error_field(body: bytes, code: bytes) -> str:
    for field in body.split(b"\0"):
        if field[:1] == code:
            return field[1:].decode(errors="replace")
    return ""


def _error_message(body: bytes) -> str:
    for field in body.split(b"\0"):
        if field[:1] == b"M":
            return field[1:].decode(errors="replace")
    return body.decode(errors="replace")
