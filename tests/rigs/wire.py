"""Extended-protocol messages sent exactly as given, to see what a server or pooler makes of
them: `exchange` sends batches built with `parse`, `bind`, `execute` and `SYNC`, e.g. a Bind in
another Sync group than its Parse (which no well-behaved driver sends). Trust authentication
only: these talk to test servers this suite started.
"""

from __future__ import annotations

import socket
import struct

from todo_store.testing.wire import (
    Readable,
    ServerError,
    message,
    read_until_ready,
    startup,
)


def cstring(value: str) -> bytes:
    """A protocol string: UTF-8, NUL-terminated."""
    return value.encode() + b"\0"


def parse(statement: str, query: str) -> bytes:
    """A Parse message (no parameter types); `statement` "" is the unnamed statement."""
    return message(b"P", cstring(statement) + cstring(query) + struct.pack("!h", 0))


def bind(statement: str) -> bytes:
    """A Bind of `statement` to the unnamed portal, without parameters, text results."""
    return message(b"B", cstring("") + cstring(statement) + struct.pack("!hhh", 0, 0, 0))


def execute() -> bytes:
    """An Execute of the unnamed portal, all rows."""
    return message(b"E", cstring("") + struct.pack("!i", 0))


SYNC = b"S" + struct.pack("!i", 4)


def exchange(host: str, port: int, user: str, database: str, batches: list[bytes]) -> list[str]:
    """Send each batch (it must end with `SYNC`) and wait for ReadyForQuery after it.

    Returns one result per batch: "" if it went through, else the SQLSTATE of its error.
    """
    results = []
    with socket.create_connection((host, port), timeout=5.0) as sock, sock.makefile("rb") as inp:
        sock.sendall(startup(user, database))
        read_until_ready(inp)
        for batch in batches:
            sock.sendall(batch)
            try:
                read_until_ready(inp)
            except ServerError as error:
                results.append(error.sqlstate)
                _skip_to_ready(inp)
            else:
                results.append("")
        sock.sendall(message(b"X", b""))
    return results


def _skip_to_ready(inp: Readable) -> None:
    while True:
        header = inp.read(5)
        if len(header) < 5:
            raise ConnectionError("the server closed the connection")
        inp.read(struct.unpack("!i", header[1:])[0] - 4)
        if header[:1] == b"Z":
            return
