"""Read replicas: routing read-only units of work, consistency tokens, lag and fallback.

`DATABASE_URL_REPLICA` names one or more read replicas (streaming standbys of the primary, e.g.
Neon read replicas, each through its own pooler). `TodoStore.session(read_only=True)` reads
from one of them; everything else goes to the primary. Guarantees:

- **Same rules as the primary.** Replica engines come from `engine.create_engine`: the same
  pooler-safe statements, dead-connection check at checkout, timeouts and typed errors.
- **Read-your-writes.** After an atomic unit of work that wrote has committed,
  `consistency_token(session)` is a short string naming the position of its commit in the
  primary's write-ahead log, and the database it belongs to (the system identifier).
  `session(read_only=True, after=token)` reads from a replica only if that replica is known
  to have replayed past the position, else from the primary: never an older state. A token
  from another database raises `ForeignConsistencyToken`; a malformed one a `ValueError`
  naming `after`, before any SQL is sent.
- **Round trips.** A read without a token costs what a read on the primary costs. Producing a
  token costs no round trip: the position travels back in the COMMIT's own round trip (see
  `PositionReportingConnection`). A read with a token costs no extra round trip either: each
  replica's replay position is checked in the background at most every
  `REPLICA_CHECK_INTERVAL` seconds and the cached value decides. The first read with a token
  of a process that has produced none costs 2 round trips once, to learn the primary's
  system identifier.
- **Lag and failure.** A replica that is down, refuses connections, is not a standby of this
  database, or lags more than `REPLICA_MAX_LAG` seconds (its measured lag plus the age of the
  measurement) is skipped: its reads go to the primary, with a log line on logger `todo_store`
  when its state changes (never one per read). It is used again once a check finds it healthy.
  A replica connection that fails inside a read unit raises `DatabaseUnavailable` there (as
  the primary would) and takes the replica out of rotation; `TodoStore.run(work,
  read_only=True)` then runs `work` again, on the primary.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Any, NewType

import asyncpg
from pydantic import SecretStr
from sqlalchemy import column, event, exc, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.pool import PoolProxiedConnection

from todo_store.errors import CommitOutcomeUnknown, DatabaseUnavailable, TodoStoreError
from todo_store.settings import Settings
from todo_store.urls import mask, to_asyncpg

log = logging.getLogger("todo_store")

ConsistencyToken = NewType("ConsistencyToken", str)
"""A short string (safe in a cookie or a header): a position in one database's history."""

EngineFactory = Callable[[Settings], AsyncEngine]
SessionFactory = Callable[[AsyncEngine], async_sessionmaker[AsyncSession]]

_COMMITTED_AT = "todo_store.consistency_token"  # in Session.info, once the unit has committed
_UNFINISHED = "todo_store.unit_open"  # in Session.info while the unit's block runs
_REPLICA = "todo_store.replica"  # in Session.info: the replica a read unit runs on
_WROTE = "todo_store.wrote"  # in Connection.info: a statement that may write ran
_POSITION_NOTICE = "todo_store commit position"
# Appended to the COMMIT of a unit that wrote, in the same simple query (one round trip).
# It runs after the commit, so the insert position is at or past the commit record's end.
# The notice is forced through whatever client_min_messages says, for that statement only.
_UNAVAILABLE = "unavailable: "
# The position is read in a block of its own: should the server refuse (a function not
# granted), the committed unit does not fail; the token says why it has no position.
_COMMIT_REPORTING_POSITION = (
    "COMMIT;DO $todo_store$DECLARE position text; BEGIN "
    "PERFORM set_config('client_min_messages', 'notice', true); "
    "BEGIN "
    "position := (SELECT system_identifier::text FROM pg_control_system()) || ' ' "
    "|| pg_current_wal_insert_lsn()::text; "
    f"EXCEPTION WHEN OTHERS THEN position := '{_UNAVAILABLE}' || SQLERRM; "
    "END; "
    f"RAISE NOTICE USING MESSAGE = '{_POSITION_NOTICE}', DETAIL = position; "
    "END$todo_store$;"
)
_TOKEN_SHAPE = re.compile(r"^([0-9a-f]{1,16})\.([0-9a-f]{1,16})$")
_LSN_SHAPE = re.compile(r"^([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})$")
_SCHEME_START = re.compile(r",\s*(?=[A-Za-z][A-Za-z0-9+.-]*://)")
# One statement (2 round trips with caching off) on the replica, outside any transaction.
_CHECK = text(
    """SELECT pg_is_in_recovery(),
              pg_last_wal_replay_lsn()::text,
              pg_last_wal_receive_lsn() IS NOT DISTINCT FROM pg_last_wal_replay_lsn(),
              extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8,
              (SELECT system_identifier FROM pg_control_system())"""
).columns(  # a SELECT to the engine: a failure is never a write of unknown outcome
    column("in_recovery"),
    column("replay"),
    column("caught_up"),
    column("upper_bound"),
    column("system_identifier"),
)
_SYSTEM_IDENTIFIER = text("SELECT system_identifier FROM pg_control_system()").columns(
    column("system_identifier")
)


class ForeignConsistencyToken(TodoStoreError, ValueError):
    """`after=` holds a token of another database (its system identifier differs)."""


class ConsistencyTokenUnavailable(TodoStoreError):
    """The unit committed, but the database did not tell where (the message says why)."""


# -- tokens -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Position:
    """A point in one database's write-ahead log: its system identifier and an LSN."""

    system_identifier: int
    lsn: int

    @property
    def token(self) -> ConsistencyToken:
        return ConsistencyToken(f"{self.system_identifier:x}.{self.lsn:x}")

    @classmethod
    def from_token(cls, token: str) -> Position:
        """Raises `ValueError` naming `after` for anything that is not a token."""
        if not isinstance(token, str):
            kind = type(token).__name__
            raise TypeError(f"after: expected a consistency token (str), got {kind}")
        match = _TOKEN_SHAPE.match(token)
        if match is None:
            raise ValueError("after: not a consistency token (from todo_store.consistency_token)")
        return cls(int(match.group(1), 16), int(match.group(2), 16))


def parse_lsn(value: str) -> int:
    """PostgreSQL's `X/Y` LSN notation as one integer."""
    match = _LSN_SHAPE.match(value)
    if match is None:
        raise ValueError(f"not an LSN: {value!r}")
    return (int(match.group(1), 16) << 32) | int(match.group(2), 16)


def consistency_token(session: AsyncSession) -> ConsistencyToken | None:
    """The consistency token of a unit of work from `TodoStore.session()`, after its block.

    Call it once the `async with store.session() as session:` block has exited (committed).
    Returns None when the unit wrote nothing. Pass the token to
    `store.session(read_only=True, after=token)` (in this process or another one, e.g. in a
    cookie) to read a state at least as new as this unit's commit.

    Raises `ConsistencyTokenUnavailable` when the unit committed but the database refused to
    say where (e.g. `pg_control_system()` not granted to the role; the message has the
    server's reason). Raises `ValueError` while the block still runs, and for a session that
    is not an atomic
    unit of work of a `TodoStore` (a non-atomic unit commits each statement by itself and has
    no COMMIT to carry the position: use an atomic unit where a token is needed).
    """
    info = session.info
    if info.get(_UNFINISHED):
        raise ValueError("consistency_token: the unit of work has not committed yet")
    if _COMMITTED_AT not in info:
        raise ValueError(
            "consistency_token: not an atomic unit of work of a TodoStore (store.session())"
        )
    token: ConsistencyToken | ConsistencyTokenUnavailable | None = info[_COMMITTED_AT]
    if isinstance(token, ConsistencyTokenUnavailable):
        raise token
    return token


def without_position(session: AsyncSession) -> None:
    """Mark a committed unit as having no token (`consistency_token` returns None): for units
    whose later reads see their writes anyway (the test fixture's units share a transaction)."""
    session.info[_COMMITTED_AT] = None


class PositionReportingConnection(asyncpg.Connection):
    """An asyncpg connection that reports where its COMMIT landed, in the COMMIT's round trip.

    When a unit of work that wrote commits, the COMMIT goes out as one simple query together
    with a statement that runs after it and sends back the primary's WAL insert position and
    system identifier as a notice. Every other query is sent unchanged.
    """

    _todo_store_position_sink: list[str] | None = None

    async def execute(
        self,
        query: str,
        *args: Any,
        timeout: float | None = None,  # noqa: ASYNC109 - asyncpg's own signature
    ) -> str:
        sink = self._todo_store_position_sink
        if sink is None or args or query != "COMMIT;":
            return await super().execute(query, *args, timeout=timeout)
        self._todo_store_position_sink = None
        reported: list[str] = []

        def listen(_connection: object, message: Any) -> None:
            if getattr(message, "message", None) == _POSITION_NOTICE:
                reported.append(str(getattr(message, "detail", "")))

        # Notices are delivered (call_soon) before the waiting COMMIT resumes: the notice
        # arrives before the ReadyForQuery that completes the query.
        self.add_log_listener(listen)
        try:
            status = await super().execute(_COMMIT_REPORTING_POSITION, timeout=timeout)
        finally:
            self.remove_log_listener(listen)
        sink.extend(reported)
        return status


def track_writes(engine: AsyncEngine) -> None:
    """Note, per connection and transaction, whether a statement that may write has run."""
    event.listen(engine.sync_engine, "begin", forget_writes_listener)
    event.listen(engine.sync_engine, "before_cursor_execute", note_write_listener, retval=True)


def forget_writes_listener(conn: Connection) -> None:
    """`begin` listener: `forget_writes` on the connection's pool connection."""
    if not conn.invalidated:
        forget_writes(conn.connection)


def forget_writes(pool_connection: PoolProxiedConnection) -> None:
    """A transaction begins on `pool_connection`: it has written nothing yet."""
    pool_connection.info.pop(_WROTE, None)
    driver = pool_connection.driver_connection
    if isinstance(driver, PositionReportingConnection):
        driver._todo_store_position_sink = None  # a unit that failed before its COMMIT


def note_write_listener(
    conn: Connection, _cursor: Any, statement: str, parameters: Any, context: Any, _many: bool
) -> tuple[str, Any]:
    """`before_cursor_execute` (retval=True): `note_write` for every statement."""
    compiled = getattr(context, "compiled", None)
    note_write(conn.info, compiled.statement if compiled is not None else None)
    return statement, parameters


def unit_opened(info: dict[Any, Any]) -> None:
    """An atomic unit of work's block has started: no token until it has committed."""
    info[_UNFINISHED] = True


def unit_ended(
    info: dict[Any, Any], sink: list[str] | None, learn: Callable[[Position], None]
) -> None:
    """The unit has committed (`sink`: what its COMMIT reported, None if it wrote nothing) or
    rolled back (`sink` None): leave its consistency token in `info`."""
    info.pop(_UNFINISHED, None)
    info[_COMMITTED_AT] = None
    if sink and sink[-1].startswith(_UNAVAILABLE):
        reason = sink[-1].removeprefix(_UNAVAILABLE)
        info[_COMMITTED_AT] = ConsistencyTokenUnavailable(
            f"the unit committed, but the database did not report where: {reason}"
        )
        return
    position = _reported_position(sink)
    if position is not None:
        info[_COMMITTED_AT] = position.token
        learn(position)


def request_position(pool_connection: PoolProxiedConnection | None) -> list[str] | None:
    """Ask `pool_connection` to report its COMMIT's position, if its transaction wrote; the
    list the report will land in (None: nothing will be reported)."""
    if (
        pool_connection is None
        or not pool_connection.is_valid
        or not pool_connection.info.get(_WROTE)
    ):
        return None
    driver = pool_connection.driver_connection
    if not isinstance(driver, PositionReportingConnection):
        return None
    sink: list[str] = []
    driver._todo_store_position_sink = sink
    return sink


def note_write(info: dict[Any, Any], statement: Any) -> None:
    """`statement` is about to run on the connection whose `info` this is: note it if it may
    write."""
    if not getattr(statement, "is_select", False):
        # Anything but a SELECT may write (DML, DDL, textual SQL): counted as a write.
        info[_WROTE] = True


def _reported_position(sink: list[str] | None) -> Position | None:
    if not sink:
        return None
    system_identifier, _, lsn = sink[-1].partition(" ")
    return Position(int(system_identifier), parse_lsn(lsn))


# -- replicas ---------------------------------------------------------------------------------


class CommitClock:
    """When this process saw the primary's recent commits (from their consistency tokens).

    A replica's lag is the age of the oldest commit it has not replayed. The replica itself
    can only give an upper bound once WAL is waiting to be replayed (the time since the last
    commit it did replay, however long ago that was); this process's own commits narrow it
    down, at no round trip.
    """

    _KEPT = 4096
    _RESOLUTION_S = 0.01  # commits this close together share one entry: ~40 s of history

    def __init__(self) -> None:
        self._commits: deque[tuple[float, int]] = deque(maxlen=self._KEPT)

    def saw(self, lsn: int) -> None:
        now = time.monotonic()
        if self._commits and now - self._commits[-1][0] < self._RESOLUTION_S:
            # The entry keeps the earlier time: a replica missing this commit is reported
            # up to the resolution later than it is, never earlier.
            at, latest = self._commits[-1]
            self._commits[-1] = (at, max(latest, lsn))
            return
        self._commits.append((now, lsn))

    def lag(
        self, replay_lsn: int | None, caught_up: bool, upper_bound: float | None, now: float
    ) -> float | None:
        """Seconds the replica is behind; None when nothing tells."""
        if replay_lsn is None:
            return None
        oldest_missing = next((at for at, lsn in self._commits if lsn > replay_lsn), None)
        if oldest_missing is not None:
            return now - oldest_missing  # one of our commits is not replayed: it is this late
        if caught_up:
            return 0.0  # it replayed everything it received (and each of our commits)
        newest_replayed = next(
            (at for at, lsn in reversed(self._commits) if lsn <= replay_lsn), None
        )
        if newest_replayed is None:
            return upper_bound
        since = now - newest_replayed  # it has everything up to that commit of ours
        return since if upper_bound is None else min(since, upper_bound)


def replica_urls(raw: str) -> list[str]:
    """The URLs in `DATABASE_URL_REPLICA`: split at commas that start a new `scheme://`, so
    a multi-host URL's commas are kept."""
    urls = [part.strip() for part in _SCHEME_START.split(raw)]
    return [url for url in urls if url]


@dataclass(frozen=True)
class ReplicaStatus:
    """What one check of a replica found."""

    checked_at: float  # time.monotonic()
    in_recovery: bool
    replay_lsn: int | None
    lag: float | None  # seconds; None when the replica cannot say
    system_identifier: int


class Replica:
    """One replica: its engine, its last check, and whether reads may go to it."""

    def __init__(
        self,
        settings: Settings,
        engines: EngineFactory,
        sessions: SessionFactory,
        clock: CommitClock | None = None,
    ) -> None:
        self.name = mask(settings.database_url.get_secret_value())
        self.clock = clock or CommitClock()
        self.engine = engines(settings)
        self.sessionmaker = sessions(self.engine.execution_options(postgresql_readonly=True))
        self._autocommit = self.engine.execution_options(isolation_level="AUTOCOMMIT")
        self.status: ReplicaStatus | None = None
        self.problem: str | None = "not checked yet"
        self._state: str | None = "unchecked"
        self._disposed = False
        self._checking: asyncio.Task[None] | None = None
        event.listen(self.engine.sync_engine, "connect", _note_opened)
        event.listen(self.engine.sync_engine, "invalidate", self._connection_lost)

    def _connection_lost(self, _dbapi: Any, _record: Any, error: BaseException | None) -> None:
        if error is not None and not self._disposed:
            self.mark_down(f"connection lost ({type(error).__name__})")

    def mark_down(self, reason: str) -> None:
        """Nothing it said before counts any more: reads skip it until a check succeeds."""
        self.status = None
        self._report("down", f"down: {reason}")

    def _report(self, state: str | None, problem: str | None = None, **details: Any) -> None:
        """Record the replica's state (None: healthy); log only when the state changes (not
        when only its numbers do), never once per read."""
        self.problem = problem
        if state == self._state:
            return
        self._state = state
        extra = {"replica": self.name, "replica_state": state or "healthy", **details}
        if state is None:
            log.info("replica %s is healthy: reads go to it", self.name, extra=extra)
        else:
            log.warning(
                "replica %s skipped, its reads go to the primary: %s",
                self.name,
                problem,
                extra=extra,
            )

    def covers(
        self, position: Position | None, now: float, max_lag: float, opened_at: float | None = None
    ) -> bool:
        """Whether a read (after `position`, if given) may go to this replica now.

        `opened_at`: when the connection the read would use was opened, if known. A read with
        a token does not trust a connection opened after the last check: it may reach a
        restarted server, which can be behind what the check saw.
        """
        status = self.status
        if status is None or self.problem is not None:
            return False
        if position is not None:
            if status.replay_lsn is None or status.replay_lsn < position.lsn:
                return False
            if status.system_identifier != position.system_identifier:
                return False
            if opened_at is not None and opened_at > status.checked_at:
                return False
        # The lag may have grown by the check's age since.
        return status.lag is not None and status.lag + (now - status.checked_at) <= max_lag

    def stale(self, now: float, interval: float) -> bool:
        return self.status is None or now - self.status.checked_at >= interval

    def check_soon(self, primary_system_identifier: int | None, max_lag: float) -> None:
        """Start a background check unless one is running."""
        if self._checking is None or self._checking.done():
            self._checking = asyncio.get_running_loop().create_task(
                self.check(primary_system_identifier, max_lag)
            )

    async def check(self, primary_system_identifier: int | None, max_lag: float) -> None:
        """Ask the replica for its replay position, lag and identity (2 round trips)."""
        started = time.monotonic()
        try:
            # A replica that does not answer within REPLICA_MAX_LAG is no use for reads
            # (a pooler in front of a stopped server queues the query instead of failing).
            async with asyncio.timeout(max_lag), self._autocommit.connect() as connection:
                row = (await connection.execute(_CHECK)).one()
        except TimeoutError:
            self.mark_down(f"no answer within {max_lag:g} s")
            return
        except Exception as error:  # whatever failed, the finding is that it is not usable
            self.mark_down(_reason(error))
            return
        in_recovery, replay, caught_up, upper_bound, system_identifier = row
        replay_lsn = parse_lsn(replay) if replay else None
        # `started`: a connection opened during this check is not newer than what it saw.
        status = ReplicaStatus(
            checked_at=started,
            in_recovery=bool(in_recovery),
            replay_lsn=replay_lsn,
            lag=self.clock.lag(replay_lsn, bool(caught_up), upper_bound, started),
            system_identifier=int(system_identifier),
        )
        self.status = status
        if not status.in_recovery:
            self._report("not a standby", "not a standby (pg_is_in_recovery() is false)")
        elif primary_system_identifier not in (None, status.system_identifier):
            self._report(
                "another database", "a standby of another database (system identifier differs)"
            )
        elif status.lag is None or status.lag > max_lag:
            shown = "unknown" if status.lag is None else f"{status.lag:.1f} s"
            self._report(
                "lagging",
                f"lagging {shown} behind the primary (REPLICA_MAX_LAG {max_lag:g} s)",
                replica_lag=status.lag,
            )
        else:
            self._report(None)

    async def dispose(self) -> None:
        self._disposed = True
        if self._checking is not None:
            self._checking.cancel()
            with suppress(asyncio.CancelledError, Exception):
                await self._checking
        await self.engine.dispose()


_OPENED_AT = "todo_store.opened_at"  # in the pooled connection's info: time.monotonic()


def _note_opened(_dbapi: Any, record: Any) -> None:
    record.info[_OPENED_AT] = time.monotonic()


def _reason(error: BaseException) -> str:
    return str(error).splitlines()[0] if str(error) else type(error).__name__


class ReplicaSet:
    """The replicas of one `TodoStore`, and where each read-only unit of work goes."""

    def __init__(
        self,
        settings: Settings,
        *,
        primary: AsyncEngine,
        primary_read_only: async_sessionmaker[AsyncSession],
        engines: EngineFactory,
        sessions: SessionFactory,
    ) -> None:
        self.max_lag = settings.replica_max_lag
        self.interval = settings.replica_check_interval
        self._primary = primary.execution_options(isolation_level="AUTOCOMMIT")
        self._primary_read_only = primary_read_only
        self.primary_system_identifier: int | None = None
        self.clock = CommitClock()
        self.replicas = [
            Replica(replica, engines, sessions, self.clock)
            for replica in replica_settings(settings)
        ]
        self._turn = itertools.count()

    @staticmethod
    def validate(settings: Settings) -> None:
        """Raises `ValueError` naming DATABASE_URL_REPLICA for a URL that cannot be used."""
        raw = settings.database_url_replica
        if raw is None:
            return
        urls = replica_urls(raw.get_secret_value())
        if not urls:
            raise ValueError("DATABASE_URL_REPLICA: no URL in it")
        for number, url in enumerate(urls, start=1):
            try:
                to_asyncpg(url)
            except ValueError as error:
                raise ValueError(f"DATABASE_URL_REPLICA (URL {number}): {error}") from None

    def learn(self, position: Position) -> None:
        """A commit of the primary: its system identifier, and when it happened."""
        self.primary_system_identifier = position.system_identifier
        self.clock.saw(position.lsn)

    async def _check_token(self, position: Position) -> None:
        if self.primary_system_identifier is None:
            async with self._primary.connect() as connection:
                found = (await connection.execute(_SYSTEM_IDENTIFIER)).scalar_one()
            self.primary_system_identifier = int(found)
        if position.system_identifier != self.primary_system_identifier:
            raise ForeignConsistencyToken(
                "after: the consistency token is from another database (its system identifier "
                "is not this primary's)"
            )

    def choose(self, position: Position | None) -> Replica | None:
        """A replica that may serve this read now, or None for the primary. Sends nothing;
        starts background checks of replicas whose last check is older than the interval."""
        now = time.monotonic()
        usable = []
        for replica in self.replicas:
            if replica.stale(now, self.interval):
                replica.check_soon(self.primary_system_identifier, self.max_lag)
            if replica.covers(position, now, self.max_lag):
                usable.append(replica)
        if not usable:
            return None
        return usable[next(self._turn) % len(usable)]

    @asynccontextmanager
    async def read_unit(self, after: str | None) -> AsyncIterator[AsyncSession]:
        """A READ ONLY unit of work on a replica that may serve it, else on the primary."""
        position = Position.from_token(after) if after is not None else None
        if position is not None:
            await self._check_token(position)
        replica = self.choose(position)
        session = await self._open_on(replica, position) if replica is not None else None
        if session is None:
            replica, session = None, self._primary_read_only()
        async with session:
            try:
                yield session
            except DatabaseUnavailable as error:
                if replica is not None:
                    replica.mark_down(_reason(error))
                raise
            try:
                await session.commit()
            except (DatabaseUnavailable, CommitOutcomeUnknown) as error:
                if replica is None:
                    raise
                # Everything was read already, and a READ ONLY transaction has nothing to
                # commit: the unit succeeded. The replica is taken out of rotation.
                replica.mark_down(_reason(error))

    async def _open_on(self, replica: Replica, position: Position | None) -> AsyncSession | None:
        """A session holding a replica connection (a checkout: no round trip on a live
        pooled connection), or None when the replica cannot take this read after all."""
        session = replica.sessionmaker()
        session.info[_REPLICA] = replica.name
        try:
            connection = await session.connection()
        except exc.TimeoutError:  # its pool is exhausted: this read goes to the primary
            await session.close()
            return None
        except (TodoStoreError, OSError) as error:
            await session.close()
            replica.mark_down(_reason(error))
            return None
        sync_connection = connection.sync_connection
        opened_at = sync_connection.info.get(_OPENED_AT) if sync_connection else None
        if not replica.covers(position, time.monotonic(), self.max_lag, opened_at):
            await session.close()
            return None
        return session

    async def warm(self, n: int) -> None:
        """Open up to n connections to each replica and check each; failures are logged."""
        await asyncio.gather(*(self._warm_one(replica, n) for replica in self.replicas))

    async def _warm_one(self, replica: Replica, n: int) -> None:
        try:
            await open_connections(replica.engine, n)
        except (TodoStoreError, OSError) as error:
            replica.mark_down(_reason(error))
            return
        await replica.check(self.primary_system_identifier, self.max_lag)

    async def dispose(self) -> None:
        for replica in self.replicas:
            await replica.dispose()


def ran_on_replica(session: AsyncSession) -> bool:
    """Whether a read unit's session was on a replica (False: on the primary)."""
    return _REPLICA in session.info


async def open_connections(engine: AsyncEngine, n: int) -> None:
    """Open n pooled connections at once (each waits until all n are open, so the pool
    cannot hand one connection out twice), then return them all to the pool."""
    if n < 1:
        return
    barrier = asyncio.Barrier(n)

    async def hold() -> None:
        async with engine.connect():
            await barrier.wait()

    async with asyncio.TaskGroup() as group:
        for _ in range(n):
            group.create_task(hold())


# -- doctor ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReplicaFinding:
    """What `doctor` says about one replica URL."""

    name: str
    ok: bool
    detail: str
    hint: str = ""


def replica_settings(settings: Settings) -> list[Settings]:
    """`settings` once per replica URL, with that URL as `database_url`."""
    raw = settings.database_url_replica
    urls = replica_urls(raw.get_secret_value()) if raw is not None else []
    return [settings.model_copy(update={"database_url": SecretStr(url)}) for url in urls]


async def inspect_replicas(settings: Settings, engines: EngineFactory) -> list[ReplicaFinding]:
    """Each replica: a standby (pg_is_in_recovery()) of the same database as the primary
    (same system identifier), and its lag. Failures are findings, not exceptions."""
    replicas = replica_settings(settings)
    if not replicas:
        return []
    primary_engine = engines(settings)
    try:
        async with primary_engine.connect() as connection:
            primary_id = int((await connection.execute(_SYSTEM_IDENTIFIER)).scalar_one())
    except Exception as error:  # the finding is that the primary could not say
        reason = f"the primary's system identifier cannot be read: {_reason(error)}"
        return [
            ReplicaFinding(mask(r.database_url.get_secret_value()), False, reason) for r in replicas
        ]
    finally:
        await primary_engine.dispose()
    return [
        await _inspect(replica, primary_id, settings.replica_max_lag, engines)
        for replica in replicas
    ]


async def _inspect(
    settings: Settings, primary_id: int, max_lag: float, engines: EngineFactory
) -> ReplicaFinding:
    shown = mask(settings.database_url.get_secret_value())
    try:
        engine = engines(settings)
    except ValueError as error:  # a URL that cannot be used
        return ReplicaFinding(shown, False, str(error), "fix DATABASE_URL_REPLICA")
    try:
        async with engine.connect() as connection:
            row = (await connection.execute(_CHECK)).one()
    except Exception as error:  # unreachable, refused, ...: reads will use the primary
        return ReplicaFinding(
            shown,
            False,
            f"cannot connect: {_reason(error)}",
            "reads go to the primary until it answers",
        )
    finally:
        await engine.dispose()
    in_recovery, _replay, caught_up, upper_bound, system_identifier = row
    lag = 0.0 if caught_up else upper_bound  # at most this far behind
    if not in_recovery:
        return ReplicaFinding(
            shown,
            False,
            "not a standby (pg_is_in_recovery() is false)",
            "point DATABASE_URL_REPLICA at a read replica",
        )
    if int(system_identifier) != primary_id:
        return ReplicaFinding(
            shown,
            False,
            "a standby of another database (system identifier differs from the primary's)",
            "point DATABASE_URL_REPLICA at a replica of DATABASE_URL's database",
        )
    if lag is None:
        return ReplicaFinding(
            shown, False, "standby of the primary; lag unknown (nothing replayed yet)"
        )
    detail = f"standby of the primary, {float(lag):.2f} s behind at most"
    if float(lag) > max_lag:
        return ReplicaFinding(
            shown, False, detail, f"more than REPLICA_MAX_LAG ({max_lag:g} s): reads skip it"
        )
    return ReplicaFinding(shown, True, detail)
