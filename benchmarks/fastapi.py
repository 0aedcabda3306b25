"""CPU per request: the FastAPI integration against routes that call the store themselves.

    python -m benchmarks.fastapi [--pairs 100] [--batch 40]

Two apps serve the same routes from one `TodoStore`, in this process, through httpx's ASGI
transport (no sockets): `direct`, whose routes open `store.session(atomic=False,
user_id=...)` (bound to the caller, as the integration's units are) themselves
and let errors fall through, and `integration`, whose routes take their unit of work from
`todo_store.fastapi.unit_of_work`, with bounded parameters (`TaskIdPath`, `LimitQuery`) and
the integration installed. Both take the caller's id from the same dependency. CPU time of
this process (`time.process_time`, so the server's work is not counted) per request, in
`pairs` pairs of `batch` sequential requests, one batch per app, back to back, order
alternating (the machine's load then weighs on both alike); the overhead is the median over
the pairs of integration / direct - 1. The figure includes the HTTP client's own CPU, which
both sides pay.
"""

import argparse
import asyncio
import gc
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated

import asyncpg
import httpx
from fastapi import Depends, FastAPI, Header

from benchmarks import environment
from benchmarks.comparison import Plan, make_users
from todo_store import TaskRead, TaskRepo, TodoStore
from todo_store.fastapi import (
    LimitQuery,
    TaskIdPath,
    UnitOfWork,
    install,
    unit_of_work,
    use_store,
)
from todo_store.testing.plugin import settings_for

BUDGET = 0.05  # the integration may add at most 5 % CPU per request
ROUTES = ("GET /tasks/{id}", "GET /tasks?limit=50", "POST /tasks/{id}/toggle")
APPS = ("direct", "integration")


async def current_user_id(x_user_id: Annotated[str, Header()]) -> str:
    return x_user_id


UserId = Annotated[str, Depends(current_user_id)]
OneCall = Annotated[UnitOfWork, unit_of_work(user_id=current_user_id, atomic=False)]


def direct_app(store: TodoStore) -> FastAPI:
    app = FastAPI()

    @app.get("/tasks/{task_id}")
    async def get_task(task_id: int, user_id: UserId) -> TaskRead:
        async with store.session(atomic=False, user_id=user_id) as session:
            return TaskRead.model_validate(await TaskRepo(session).get(user_id, task_id))

    @app.get("/tasks")
    async def list_tasks(user_id: UserId, limit: int = 50) -> list[TaskRead]:
        async with store.session(atomic=False, user_id=user_id) as session:
            tasks = await TaskRepo(session).list_for(user_id, limit=limit)
        return [TaskRead.model_validate(task) for task in tasks]

    @app.post("/tasks/{task_id}/toggle")
    async def toggle_task(task_id: int, user_id: UserId) -> TaskRead:
        async with store.session(atomic=False, user_id=user_id) as session:
            return TaskRead.model_validate(await TaskRepo(session).toggle(user_id, task_id))

    return app


def integration_app(store: TodoStore) -> FastAPI:
    app = FastAPI()
    use_store(app, store)
    install(app)

    @app.get("/tasks/{task_id}")
    async def get_task(task_id: TaskIdPath, work: OneCall) -> TaskRead:
        return TaskRead.model_validate(await work.tasks.get(work.user_id, task_id))

    @app.get("/tasks")
    async def list_tasks(work: OneCall, limit: LimitQuery = 50) -> list[TaskRead]:
        tasks = await work.tasks.list_for(work.user_id, limit=limit)
        return [TaskRead.model_validate(task) for task in tasks]

    @app.post("/tasks/{task_id}/toggle")
    async def toggle_task(task_id: TaskIdPath, work: OneCall) -> TaskRead:
        return TaskRead.model_validate(await work.tasks.toggle(work.user_id, task_id))

    return app


@dataclass(frozen=True)
class RouteCost:
    route: str
    direct_us: float  # median CPU per request, microseconds
    integration_us: float
    overhead: float  # median over pairs of batches of integration / direct - 1
    overhead_low: float  # first quartile
    overhead_high: float  # third quartile
    overall: float  # all the integration's CPU / all the direct routes' CPU - 1


@dataclass(frozen=True)
class FastapiOverhead:
    pairs: int
    batch: int
    fastapi_version: str
    routes: list[RouteCost]

    def markdown(self) -> str:
        rows = [
            f"| `{cost.route}` | {cost.direct_us:,.0f} | {cost.integration_us:,.0f} | "
            f"{cost.overhead:+.1%} ({cost.overhead_low:+.1%} … {cost.overhead_high:+.1%}) | "
            f"{cost.overall:+.1%} |"
            for cost in self.routes
        ]
        worst = max(cost.overhead for cost in self.routes)
        verdict = "within" if worst <= BUDGET else "**over**"
        return "\n".join(
            [
                "## FastAPI integration: CPU per request",
                "",
                f"FastAPI {self.fastapi_version}; `python -m benchmarks.fastapi` (module "
                "docstring: how). Routes that open `store.session(atomic=False, user_id=…)` "
                "themselves "
                "(`direct`) against the same routes on `todo_store.fastapi` (`integration`: "
                "`unit_of_work`, bounded parameters, error handlers), in process through "
                f"httpx's ASGI transport; {self.pairs} pairs of batches of {self.batch} "
                "requests per route, the two apps back to back; CPU of the process (app and "
                "HTTP client) per request, median, and the overhead's median (quartiles) over "
                "the pairs.",
                "",
                "| route | direct µs CPU/request | integration µs CPU/request | overhead, median "
                "(quartiles) | overhead, all pairs summed |",
                "|---|---|---|---|---|",
                *rows,
                "",
                f"Largest median overhead {worst:+.1%}: {verdict} the {BUDGET:.0%} budget.",
                "",
            ]
        )


Request = Callable[[httpx.AsyncClient], Awaitable[httpx.Response]]


def _requests(user_id: str, task_id: int) -> dict[str, Request]:
    headers = {"x-user-id": user_id}

    def get(http: httpx.AsyncClient) -> Awaitable[httpx.Response]:
        return http.get(f"/tasks/{task_id}", headers=headers)

    def listing(http: httpx.AsyncClient) -> Awaitable[httpx.Response]:
        return http.get("/tasks", params={"limit": 50}, headers=headers)

    def toggle(http: httpx.AsyncClient) -> Awaitable[httpx.Response]:
        return http.post(f"/tasks/{task_id}/toggle", headers=headers)

    return dict(zip(ROUTES, (get, listing, toggle), strict=True))


async def _cpu_per_request(http: httpx.AsyncClient, send: Request, requests: int) -> float:
    # The garbage collector runs at moments neither side chooses: collected before, off during.
    gc.collect()
    gc.disable()
    try:
        started = time.process_time()
        for _ in range(requests):
            response = await send(http)
            if response.status_code != 200:
                raise RuntimeError(f"{response.request.url}: {response.status_code}")
        return (time.process_time() - started) / requests * 1e6
    finally:
        gc.enable()


async def measure_fastapi(
    db: environment.Database, *, pairs: int = 100, batch: int = 40
) -> FastapiOverhead:
    """The integration's CPU cost per request on `db` (see the module docstring)."""
    setup = await asyncpg.connect(environment.asyncpg_dsn(db.url))
    try:
        owned = await make_users(setup, Plan(users=1, tasks_per_user=50))
    finally:
        await setup.close()
    [(user_id, task_ids)] = owned.items()
    sends = _requests(user_id, task_ids[0])
    settings = settings_for(db.url).model_copy(update={"pool_size": 1, "max_overflow": 0})
    async with TodoStore(settings) as store:
        clients = {
            "direct": _client(direct_app(store)),
            "integration": _client(integration_app(store)),
        }
        cpu: dict[tuple[str, str], list[float]] = {(r, a): [] for r in ROUTES for a in APPS}
        for send in sends.values():
            for http in clients.values():  # warm up: compiled statements, pool, imports
                await _cpu_per_request(http, send, batch * 5)
        # Short batches, the two apps back to back, order alternating: both sides of a pair
        # run under the same load from the rest of the machine.
        for n in range(pairs):
            for route, send in sends.items():
                for app in APPS if n % 2 == 0 else reversed(APPS):
                    cpu[route, app].append(await _cpu_per_request(clients[app], send, batch))
        for http in clients.values():
            await http.aclose()
    return FastapiOverhead(pairs, batch, _fastapi_version(), [_cost(r, cpu) for r in ROUTES])


def _client(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://bench")


def _cost(route: str, cpu: dict[tuple[str, str], list[float]]) -> RouteCost:
    direct, integration = cpu[route, "direct"], cpu[route, "integration"]
    ratios = [i / d - 1 for d, i in zip(direct, integration, strict=True)]
    quartiles = statistics.quantiles(ratios, n=4)
    return RouteCost(
        route,
        statistics.median(direct),
        statistics.median(integration),
        statistics.median(ratios),
        quartiles[0],
        quartiles[2],
        sum(integration) / sum(direct) - 1,
    )


def _fastapi_version() -> str:
    import fastapi  # noqa: PLC0415

    return fastapi.__version__


async def _main(args: argparse.Namespace) -> FastapiOverhead:
    async with (
        environment.server() as server,
        environment.database(server, "fastapi") as db,
    ):
        return await measure_fastapi(db, pairs=args.pairs, batch=args.batch)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fastapi", description=__doc__)
    parser.add_argument("--pairs", type=int, default=100, help="pairs of batches per route")
    parser.add_argument("--batch", type=int, default=40, help="requests in one batch")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    print(asyncio.run(_main(args)).markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
