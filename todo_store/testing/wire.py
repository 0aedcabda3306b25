"""A minimal client of the PostgreSQL wire protocol, for what asyncpg cannot do.

- `accepts_postgres`: is a PostgreSQL-speaking server listening (a readiness probe)?
- `simple_query`: run one command over the simple query protocol and return the rows as text;
  PgBouncer's admin console speaks only that protocol, and asyncpg always prepares.
- `exchange`: send batches of extended-protocol messages built with `parse`, `bind`,
  `execute` and `SYNC`, exactly as given, e.g. a Bind in another Sync group than its Parse
  (which no well-behaved driver sends), to see what a server or pooler makes of them.
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
        sock.sendall(_startup(user, database))
        _read_rows(inp)  # authentication (trust: AuthenticationOk) up to ReadyForQuery
        sock.sendall(_message(b"Q", sql.encode() + b"\0"))
        rows = _read_rows(inp)
        sock.sendall(_message(b"X", b""))
    return rows


def parse(statement: str, query: str) -> bytes:
    """A Parse message (no parameter types); `statement` "" is the unnamed statement."""
    return _message(b"P", _cstr(statement) + _cstr(query) + struct.pack("!h", 0))


def bind(statement: str) -> bytes:
    """A Bind of `statement` to the unnamed portal, without parameters, text results."""
    return _message(b"B", _cstr("") + _cstr(statement) + struct.pack("!hhh", 0, 0, 0))


def execute() -> bytes:
    """An Execute of the unnamed portal, all rows."""
    return _message(b"E", _cstr("") + struct.pack("!i", 0))


SYNC = b"S" + struct.pack("!i", 4)


def exchange(host: str, port: int, user: str, database: str, batches: list[bytes]) -> list[str]:
    """Send each batch (it must end with `SYNC`) and wait for ReadyForQuery after it.

    Returns one result per batch: "" if it went through, else the SQLSTATE of its error.
    """
    results = []
    with socket.create_connection((host, port), timeout=5.0) as sock, sock.makefile("rb") as inp:
        sock.sendall(_startup(user, database))
        _read_rows(inp)
        for batch in batches:
            sock.sendall(batch)
            try:
                _read_rows(inp)
            except _ServerError as error:
                results.append(error.sqlstate)
                _skip_to_ready(inp)
            else:
                results.append("")
        sock.sendall(_message(b"X", b""))
    return results


def _cstr(value: str) -> bytes:
    return value.encode() + b"\0"


def _startup(user: str, database: str) -> bytes:
    params = b"".join(
        key + b"\0" + value.encode() + b"\0"
        for key, value in ((b"user", user), (b"database", database))
    )
    startup = struct.pack("!i", _PROTOCOL_V3) + params + b"\0"
    return struct.pack("!i", len(startup) + 4) + startup


class _ServerError(RuntimeError):
    def __init__(self, sqlstate: str, message: str) -> None:
        super().__init__(f"server error: {message}")
        self.sqlstate = sqlstate


def _skip_to_ready(inp: _Readable) -> None:
    while True:
        header = inp.read(5)
        if len(header) < 5:
            raise ConnectionError("the server closed the connection")
        inp.read(struct.unpack("!i", header[1:])[0] - 4)
        if header[:1] == b"Z":
            return


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
            raise _ServerError(_error_field(body, b"C"), _error_message(body))
        if kind == b"T":
            columns = _column_names(body)
        elif kind == b"D":
            values = _row_values(body)
            # Without a Describe there is no RowDescription: the columns are numbered.
            names = columns if len(columns) == len(values) else list(map(str, range(len(values))))
            rows.append(dict(zip(names, values, strict=True)))
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
