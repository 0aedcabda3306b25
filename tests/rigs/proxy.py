"""A TCP proxy that counts round trips and can add latency (plain asyncio, no dependencies).

`RoundTripProxy(host, port)` listens on 127.0.0.1 (a free port) and forwards every connection to
`host:port` (PostgreSQL or PgBouncer; a `host` starting with `/` is a unix socket directory, as in
libpq). `RoundTripProxy.in_front_of(url)` takes both from a URL. Point a client at
`proxy.url_for(url)`.

What a "round trip" is here: one *client turn*. A turn starts when the client sends bytes on a
connection for the first time, or for the first time after the proxy has forwarded bytes from the
server to it; further client bytes before the next server bytes belong to the same turn. For a
request/response protocol this is exactly the number of times the client waits for the network:
the quantity that multiplies the RTT to a remote database. The counter sums turns over every
connection through this proxy. (A message that expects no reply, such as the Terminate a client
sends when it closes a connection, is a turn too; it does not occur inside a unit of work.)

Why it is deterministic for asyncpg: asyncpg writes each protocol batch in one go (Parse/Describe/
Sync to prepare, Bind/Execute/Sync to run, a simple Query for BEGIN/COMMIT/ROLLBACK) and then waits
for ReadyForQuery before it writes again. Every batch is therefore one turn, however TCP happens to
split the bytes, and the count does not depend on timing. Connecting is counted too: asyncpg's
SSLRequest is a turn (the server answers `N` or `S`), then the StartupMessage, then one turn per
authentication step. So measure units of work on a connection that is already open (warm it up
first), or measure the connect cost separately. Over TLS the handshake is opaque and a TLS 1.3
server sends session tickets on its own, so connect costs over TLS may vary; queries do not.

Latency: `delay` seconds are added to each server-to-client burst (every chunk is held until
`delay` after it arrived, so bursts are delayed, not serialised); client-to-server bytes pass at
once. A request/response exchange therefore takes `delay` longer: `delay` is the injected RTT, and
the median latency of a unit of work divided by `delay` estimates its round trips. `delay` may be
changed while the proxy runs.

Besides turns the proxy counts bytes each way, connections, and the frontend (client) messages by
name ("Parse", "Bind", "Execute", "Sync", "Query", "Close", ...) while they are readable (it stops
parsing a connection once TLS or GSS encryption is negotiated), including how many Parse messages
name a statement (a named prepared statement; the unnamed one has the empty name).

Wire properties a transaction pooler depends on are checked on the way: a *Sync group* is the
run of extended-protocol messages up to and including a Sync (a simple Query is a group of its
own); a pooler may move a client to another server connection only between groups. For every
Bind of the unnamed statement the proxy looks for a Parse of the unnamed statement earlier in
the same group (`unparsed_unnamed_binds` counts those without one: such a Bind could run on a
server where that statement is another client's, or missing). `named_statement_texts` holds
the distinct query texts sent in named Parse messages.

```python
async with RoundTripProxy("127.0.0.1", 5432, delay=0.02) as proxy:
    store = TodoStore(proxy.url_for(url))
    ...  # warm up
    with proxy.counting() as measured:
        async with store.session() as session:
            await TaskRepo(session).get("u_1", 1)
    assert measured.round_trips == 4
```
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType, TracebackType
from typing import Self

from sqlalchemy.engine import make_url

__all__ = ["Measurement", "ProxyStats", "RoundTripProxy"]

_READ_SIZE = 65536
_CONNECT_TIMEOUT_S = 10.0
_STOP_TIMEOUT_S = 5.0
_SSL_REQUEST = 80877103
_GSSENC_REQUEST = 80877104
_CANCEL_REQUEST = 80877102
_UNTYPED_CODES = {
    _SSL_REQUEST: "SSLRequest",
    _GSSENC_REQUEST: "GSSENCRequest",
    _CANCEL_REQUEST: "CancelRequest",
}
_FRONTEND_MESSAGES = {
    "B": "Bind",
    "C": "Close",
    "D": "Describe",
    "E": "Execute",
    "F": "FunctionCall",
    "H": "Flush",
    "P": "Parse",
    "Q": "Query",
    "S": "Sync",
    "X": "Terminate",
    "c": "CopyDone",
    "d": "CopyData",
    "f": "CopyFail",
    "p": "Authentication",  # PasswordMessage, SASLInitialResponse, SASLResponse
}


@dataclass(frozen=True)
class ProxyStats:
    """Counters of a proxy at one moment (or the difference of two such moments)."""

    round_trips: int = 0
    connections: int = 0
    client_bytes: int = 0
    server_bytes: int = 0
    named_statements: int = 0
    """Parse messages that named their statement (anything but the unnamed statement)."""
    unnamed_binds: int = 0
    """Bind messages of the unnamed statement."""
    unparsed_unnamed_binds: int = 0
    """Of those, Binds with no Parse of the unnamed statement earlier in their Sync group."""
    messages: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    """Frontend messages by name, e.g. {"Query": 2, "Parse": 1, "Bind": 1, ...}."""

    def __sub__(self, other: ProxyStats) -> ProxyStats:
        names = set(self.messages) | set(other.messages)
        diff = {n: self.messages.get(n, 0) - other.messages.get(n, 0) for n in names}
        return ProxyStats(
            round_trips=self.round_trips - other.round_trips,
            connections=self.connections - other.connections,
            client_bytes=self.client_bytes - other.client_bytes,
            server_bytes=self.server_bytes - other.server_bytes,
            named_statements=self.named_statements - other.named_statements,
            unnamed_binds=self.unnamed_binds - other.unnamed_binds,
            unparsed_unnamed_binds=self.unparsed_unnamed_binds - other.unparsed_unnamed_binds,
            messages=MappingProxyType({n: v for n, v in sorted(diff.items()) if v}),
        )


class Measurement:
    """What a proxy counted between the start of a `counting()` block and its end.

    Inside the block the properties are live (counted so far); after it they are frozen.
    """

    def __init__(self, proxy: RoundTripProxy) -> None:
        self._proxy = proxy
        self._start = proxy.snapshot()
        self._end: ProxyStats | None = None

    def stop(self) -> None:
        if self._end is None:
            self._end = self._proxy.snapshot()

    @property
    def stats(self) -> ProxyStats:
        end = self._end if self._end is not None else self._proxy.snapshot()
        return end - self._start

    @property
    def round_trips(self) -> int:
        return self.stats.round_trips

    @property
    def connections(self) -> int:
        return self.stats.connections

    @property
    def messages(self) -> Mapping[str, int]:
        return self.stats.messages

    def __repr__(self) -> str:
        return f"Measurement({self.stats!r})"


class _FrontendParser:
    """Counts the client's protocol messages until the stream becomes encrypted."""

    def __init__(self, proxy: RoundTripProxy) -> None:
        self._proxy = proxy
        self._buffer = bytearray()
        self._typed = False  # False until the StartupMessage: messages have no type byte
        self.awaiting_encryption_reply = False
        self.opaque = False  # TLS / GSS encryption negotiated: nothing readable any more
        self._unnamed_parsed = False  # a Parse of the unnamed statement in the current group

    def server_bytes(self, data: bytes) -> None:
        if self.awaiting_encryption_reply and data:
            self.awaiting_encryption_reply = False
            if data[:1] in (b"S", b"G"):
                self.opaque = True
                self._buffer.clear()

    def client_bytes(self, data: bytes) -> None:
        if self.opaque:
            return
        self._buffer += data
        while not self.opaque:
            header = 5 if self._typed else 4
            if len(self._buffer) < header:
                return
            offset = header - 4
            (length,) = struct.unpack_from("!i", self._buffer, offset)
            end = offset + length
            if length < 4 or len(self._buffer) < end:
                return
            message = bytes(self._buffer[:end])
            del self._buffer[:end]
            self._count(message)

    def _count(self, message: bytes) -> None:
        if self._typed:
            kind = chr(message[0])
            self._proxy._count_message(_FRONTEND_MESSAGES.get(kind, f"?{kind}"))
            self._follow_groups(kind, message)
            return
        (code,) = struct.unpack_from("!i", message, 4) if len(message) >= 8 else (0,)
        name = _UNTYPED_CODES.get(code, "StartupMessage")
        self._proxy._count_message(name)
        if code in (_SSL_REQUEST, _GSSENC_REQUEST):
            self.awaiting_encryption_reply = True
        elif code != _CANCEL_REQUEST:
            self._typed = True

    def _follow_groups(self, kind: str, message: bytes) -> None:
        """Named statements, and unnamed Binds checked against their Sync group."""
        proxy = self._proxy
        if kind == "P":  # Parse: statement name, query text, ...
            name, query = _cstrings(message, 5, 2)
            if name:
                proxy._named_statements += 1
                proxy._named_texts.add(query.decode("utf-8", errors="replace"))
            else:
                self._unnamed_parsed = True
        elif kind == "B":  # Bind: portal name, statement name, ...
            _portal, statement = _cstrings(message, 5, 2)
            if not statement:
                proxy._unnamed_binds += 1
                if not self._unnamed_parsed:
                    proxy._unparsed_unnamed_binds += 1
        elif kind in ("S", "Q"):  # the group ends; a pooler may switch servers after it
            self._unnamed_parsed = False


def _cstrings(message: bytes, offset: int, count: int) -> list[bytes]:
    """The first `count` NUL-terminated strings of `message` from `offset`."""
    found = []
    for _ in range(count):
        end = message.index(b"\x00", offset)
        found.append(message[offset:end])
        offset = end + 1
    return found


class _Connection:
    """One client connection and its server-side twin."""

    def __init__(
        self,
        proxy: RoundTripProxy,
        client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        server: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    ) -> None:
        self.proxy = proxy
        self.client_reader, self.client_writer = client
        self.server_reader, self.server_writer = server
        self.new_turn = True  # the next client bytes start a round trip
        self.parser = _FrontendParser(proxy)

    def close(self) -> None:
        for writer in (self.client_writer, self.server_writer):
            writer.close()

    async def run(self) -> None:
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._upstream())
                group.create_task(self._downstream())
        finally:
            self.close()

    async def _upstream(self) -> None:
        """Client -> server, at once; counts turns."""
        try:
            while data := await self.client_reader.read(_READ_SIZE):
                if self.new_turn:
                    self.new_turn = False
                    self.proxy._round_trips += 1
                self.proxy._client_bytes += len(data)
                self.parser.client_bytes(data)
                self.server_writer.write(data)
                await self.server_writer.drain()
        except OSError:
            pass
        finally:
            self.close()  # the client left (or broke): so does its server connection

    async def _downstream(self) -> None:
        """Server -> client, each burst held `delay` seconds after it arrived."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()
        deliver = asyncio.create_task(self._deliver(queue))
        try:
            while data := await self.server_reader.read(_READ_SIZE):
                queue.put_nowait((loop.time() + self.proxy.delay, data))
        except OSError:
            pass
        finally:
            queue.put_nowait(None)  # deliver what arrived (e.g. a FATAL error), then close
            with contextlib.suppress(OSError):
                await deliver
            self.close()

    async def _deliver(self, queue: asyncio.Queue[tuple[float, bytes] | None]) -> None:
        loop = asyncio.get_running_loop()
        while (item := await queue.get()) is not None:
            due, data = item
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            self.proxy._server_bytes += len(data)
            self.parser.server_bytes(data)
            self.client_writer.write(data)
            # Set before yielding: the client cannot answer bytes it has not been given yet.
            self.new_turn = True
            await self.client_writer.drain()


class RoundTripProxy:
    """Forward 127.0.0.1:<free port> to `host:port`, counting round trips; see the module doc."""

    def __init__(self, host: str, port: int, *, delay: float = 0.0) -> None:
        if delay < 0:
            raise ValueError("delay must be >= 0 seconds")
        self.target_host = host
        self.target_port = port
        self.delay = delay
        self.host = "127.0.0.1"
        self._port: int | None = None
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._round_trips = 0
        self._connections_made = 0
        self._client_bytes = 0
        self._server_bytes = 0
        self._named_statements = 0
        self._unnamed_binds = 0
        self._unparsed_unnamed_binds = 0
        self._named_texts: set[str] = set()
        self._messages: Counter[str] = Counter()

    @classmethod
    def in_front_of(cls, url: str, *, delay: float = 0.0) -> RoundTripProxy:
        """A proxy to the server `url` names (its host, or its `?host=` socket directory)."""
        parsed = make_url(url)
        query_host = parsed.query.get("host")
        if isinstance(query_host, tuple):
            query_host = query_host[0] if query_host else None
        host = parsed.host or query_host or "localhost"
        return cls(host, parsed.port or 5432, delay=delay)

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Listen on a free port of 127.0.0.1."""
        if self._server is not None:
            raise RuntimeError("proxy already started")
        self._server = await asyncio.start_server(self._accept, self.host, 0)
        self._port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """Stop listening and close every connection (both sides); safe to call twice."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for connection in list(self._connections):
            connection.close()
        tasks = list(self._tasks)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=_STOP_TIMEOUT_S)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if server is not None:
            await server.wait_closed()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- where to connect --------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("proxy not started")
        return self._port

    def url_for(self, base_url: str) -> str:
        """`base_url` (any Postgres URL) with its host and port replaced by the proxy's."""
        url = make_url(base_url)
        query = {k: v for k, v in url.query.items() if k not in ("host", "port")}
        url = url.set(host=self.host, port=self.port, query=query)
        return url.render_as_string(hide_password=False)

    # -- counters ----------------------------------------------------------------------------

    @property
    def round_trips(self) -> int:
        """Client turns over every connection since start (or the last `reset()`)."""
        return self._round_trips

    @property
    def open_connections(self) -> int:
        """Client connections currently forwarded (closed as soon as either side closes)."""
        return len(self._connections)

    @property
    def named_statement_texts(self) -> frozenset[str]:
        """Distinct query texts of named Parse messages since start (or the last `reset()`)."""
        return frozenset(self._named_texts)

    def snapshot(self) -> ProxyStats:
        return ProxyStats(
            round_trips=self._round_trips,
            connections=self._connections_made,
            client_bytes=self._client_bytes,
            server_bytes=self._server_bytes,
            named_statements=self._named_statements,
            unnamed_binds=self._unnamed_binds,
            unparsed_unnamed_binds=self._unparsed_unnamed_binds,
            messages=MappingProxyType(dict(sorted(self._messages.items()))),
        )

    def reset(self) -> None:
        """Zero every counter (open connections stay open)."""
        self._round_trips = self._connections_made = 0
        self._client_bytes = self._server_bytes = self._named_statements = 0
        self._unnamed_binds = self._unparsed_unnamed_binds = 0
        self._named_texts.clear()
        self._messages.clear()

    @contextlib.contextmanager
    def counting(self) -> Iterator[Measurement]:
        """`with proxy.counting() as m:` ... then `m.round_trips`: what the block cost."""
        measurement = Measurement(self)
        try:
            yield measurement
        finally:
            measurement.stop()

    def _count_message(self, name: str) -> None:
        self._messages[name] += 1

    # -- forwarding --------------------------------------------------------------------------

    async def _accept(
        self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            try:
                server = await asyncio.wait_for(self._open_target(), _CONNECT_TIMEOUT_S)
            except (OSError, TimeoutError):
                client_writer.close()
                return
            connection = _Connection(self, (client_reader, client_writer), server)
            self._connections.add(connection)
            self._connections_made += 1
            try:
                await connection.run()
            finally:
                self._connections.discard(connection)
        finally:
            if task is not None:
                self._tasks.discard(task)

    async def _open_target(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.target_host.startswith("/"):
            socket_path = f"{self.target_host}/.s.PGSQL.{self.target_port}"
            return await asyncio.open_unix_connection(socket_path)
        return await asyncio.open_connection(self.target_host, self.target_port)
