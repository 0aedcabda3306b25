"""A minimal client of the PostgreSQL wire protocol, for what asyncpg cannot do.

- `accepts_postgres`: is a PostgreSQL-speaking server listening (a readiness probe)?
- `simple_query`: run one command over the simple query protocol and return the rows as text;
  PgBouncer's admin console speaks only that protocol, and asyncpg always prepares.
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
    params = b"".join(
        key + b"\0" + value.encode() + b"\0"
        for key, value in ((b"user", user), (b"database", database))
    )
    startup = struct.pack("!i", _PROTOCOL_V3) + params + b"\0"
    with socket.create_connection((host, port), timeout=5.0) as sock, sock.makefile("rb") as inp:
        sock.sendall(struct.pack("!i", len(startup) + 4) + startup)
        _read_rows(inp)  # authentication (trust: AuthenticationOk) up to ReadyForQuery
        sock.sendall(_message(b"Q", sql.encode() + b"\0"))
        rows = _read_rows(inp)
        sock.sendall(_message(b"X", b""))
    return rows


def _message(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!i", len(body) + 4) + body


def _read_rows(inp: _Readable) -> list[dict[str, str | None]]:
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
            raise RuntimeError(f"server error: {_error_message(body)}")
        if kind == b"T":
            columns = _column_names(body)
        elif kind == b"D":
            rows.append(dict(zip(columns, _row_values(body), strict=True)))
        elif kind == b"Z":
            return rows


class _Readable(Protocol):
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


def _error_message(body: bytes) -> str:
    for field in body.split(b"\0"):
        if field[:1] == b"M":
            return field[1:].decode(errors="replace")
    return body.decode(errors="replace")
