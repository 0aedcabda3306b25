"""A new process's first call, round trip by round trip.

`python -m benchmarks.cold_start [--rtt SECONDS]` starts a throwaway PostgreSQL that accepts
only TLS + SCRAM logins (`tests.rigs.secure_server`), a PgBouncer in front of it with client
TLS and SCRAM (as Neon's pooler), and a `RoundTripProxy` adding `--rtt` (default 20 ms) in
front of that. It prints, for a brand-new `TodoStore`:

- the round trips of a bare asyncpg login (without its closing Terminate);
- the round trips and the time of the first call, `session(atomic=False)` and `session()`
  (one statement each, `SELECT 1`: a repository call costs the same; caching off);

then the same first calls without TLS (directly to the test server, trust login), where every
message is readable: one line per round trip with the messages the client sent in it.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections import defaultdict

import asyncpg
from sqlalchemy import text
from sqlalchemy.engine import make_url

from tests.rigs.proxy import RoundTripProxy
from tests.rigs.secure_server import pgbouncer_options, secure_server
from todo_store import Settings, TodoStore
from todo_store.testing.pgbouncer import PgBouncer
from todo_store.testing.postgres import provision_server


class _Recording(RoundTripProxy):
    """Remembers which messages each round trip carried (while they are readable)."""

    def __init__(self, host: str, port: int, *, delay: float = 0.0) -> None:
        super().__init__(host, port, delay=delay)
        self.turns: dict[int, list[str]] = defaultdict(list)

    def _count_message(self, name: str) -> None:
        super()._count_message(name)
        self.turns[self.round_trips].append(name)


async def _first_calls(proxy: _Recording, url: str, *, show: bool) -> None:
    with proxy.counting() as login:
        connection = await asyncpg.connect(url)
    await connection.close()
    print(f"  asyncpg login alone: {login.round_trips} round trips")
    for atomic in (False, True):
        settings = Settings(database_url=url, pool_size=1, max_overflow=0)
        async with TodoStore(settings) as store:
            proxy.turns.clear()
            first = proxy.round_trips + 1
            started = time.perf_counter()
            with proxy.counting() as measured:
                async with store.session(atomic=atomic) as session:
                    await session.execute(text("SELECT 1"))
            elapsed_ms = (time.perf_counter() - started) * 1000
        kind = "session()" if atomic else "session(atomic=False)"
        print(f"  first call in {kind}: {measured.round_trips} round trips, {elapsed_ms:.0f} ms")
        if show:
            for turn in range(first, first + measured.round_trips):
                print(f"    {turn - first + 1:>2}: {', '.join(proxy.turns.get(turn, ['?']))}")


async def _through_tls_pgbouncer(bouncer_url: str, rtt: float) -> None:
    proxy = _Recording.in_front_of(bouncer_url, delay=rtt)
    assert isinstance(proxy, _Recording)
    async with proxy:
        print(f"through PgBouncer with TLS + SCRAM, {rtt * 1000:g} ms RTT:")
        await _first_calls(proxy, proxy.url_for(bouncer_url), show=False)


async def _readable(url: str) -> None:
    proxy = _Recording.in_front_of(url)
    assert isinstance(proxy, _Recording)
    async with proxy:
        print("direct, no TLS (every message readable):")
        await _first_calls(proxy, proxy.url_for(url), show=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rtt", type=float, default=0.02, help="injected RTT, seconds")
    args = parser.parse_args(argv)
    with secure_server() as server:
        bouncer = PgBouncer(server.upstream, server.database, **pgbouncer_options(server))
        bouncer.start()
        try:
            url = make_url(bouncer.url).set(
                username=server.user, password=server.password, query={"sslmode": "require"}
            )
            asyncio.run(_through_tls_pgbouncer(url.render_as_string(hide_password=False), args.rtt))
        finally:
            bouncer.stop()
    with provision_server() as provisioned:
        asyncio.run(_readable(provisioned.admin_url))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
