"""FastAPI integration (extra `[fastapi]`): the store's lifespan, a unit of work per request,
and the HTTP response of every error the package raises.

```python
from typing import Annotated
from fastapi import FastAPI
from todo_store import TaskRead
from todo_store.fastapi import TaskIdPath, UnitOfWork, install, store_lifespan, unit_of_work

app = FastAPI(lifespan=store_lifespan())
install(app)
# current_user_id: your auth dependency, returning the verified caller's id
OneCall = Annotated[UnitOfWork, unit_of_work(user_id=current_user_id, atomic=False)]

@app.get("/tasks/{task_id}")
async def get_task(task_id: TaskIdPath, work: OneCall) -> TaskRead:
    return TaskRead.model_validate(await work.tasks.get(work.user_id, task_id))
```

Guarantees:
- a unit of work from `unit_of_work` ends before any of the response is sent: committed when
  the route answers with a status below 400, rolled back for an error status or when the
  route raises; so a 2xx means the write is committed, and a failed commit is answered with
  its error's response, never with the route's;
- every package error becomes a fixed response (see `install`): no driver text, no
  input value and no user data reaches a client;
- 422 bodies have one shape, `{"detail": [{"loc": [where, field, ...], "msg", "type"}]}`, where
  `where` is `body`, `query`, `path` or `header`, whether FastAPI or a repository refused it.

Importing `todo_store` never imports this module, nor FastAPI.
"""

# No `from __future__ import annotations`: FastAPI reads the dependencies' annotations at
# runtime, and those of `unit_of_work` refer to the caller's dependency in a closure.

import inspect
import logging
import re
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from contextvars import ContextVar
from typing import Annotated, Any, Final, NamedTuple, cast

from fastapi import Depends, FastAPI, Header, HTTPException, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.datastructures import State
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from todo_store.engine import TodoStore
from todo_store.errors import (
    AccessRefused,
    CommitOutcomeUnknown,
    ConflictError,
    ConnectionRejected,
    DatabaseError,
    DatabaseUnavailable,
    InvalidData,
    NotFoundError,
    ReadOnlyViolation,
    SchemaNotReady,
    TaskNotFound,
    TransactionConflict,
    UserNotFound,
    VersionConflict,
)
from todo_store.repositories import TaskRepo, UserRepo
from todo_store.schemas import BIGINT_MAX, INTEGER_MAX, LIST_LIMIT_MAX
from todo_store.settings import Settings

__all__ = [
    "BeforeQuery",
    "ErrorBody",
    "LimitQuery",
    "TaskIdPath",
    "UnitOfWork",
    "error_responses",
    "etag",
    "get_store",
    "if_match",
    "install",
    "store_lifespan",
    "unit_of_work",
    "use_store",
]

log = logging.getLogger("todo_store.fastapi")

_STATE_KEY: Final = "todo_store"
ERRORS_SHOWN: Final = 20  # errors listed in one 422 body
TEXT_MAX: Final = 100  # characters of a field name or message shown in a 422 body
RETRY_AFTER_S: Final = 1
OUTCOME_UNKNOWN: Final = (
    "outcome unknown: the database did not confirm the write; read before retrying"
)

# -- parameters, with the bounds the repositories enforce --------------------------------------

TaskIdPath = Annotated[int, Path(gt=0, le=BIGINT_MAX, description="The task's id.")]
LimitQuery = Annotated[
    int, Query(ge=1, le=LIST_LIMIT_MAX, description="Tasks on one page, newest first.")
]
BeforeQuery = Annotated[
    int | None,
    Query(gt=0, le=BIGINT_MAX, description="Only tasks older than this id (the next page)."),
]

# -- the store: created at startup, disposed at shutdown ---------------------------------------


def use_store(app: FastAPI, store: TodoStore) -> None:
    """Serve `app` from `store`, which the caller keeps and disposes (tests, or a store built
    elsewhere). `store_lifespan` then neither creates nor disposes one."""
    setattr(app.state, _STATE_KEY, store)


async def get_store(request: Request) -> TodoStore:
    """Dependency: the app's `TodoStore` (`Annotated[TodoStore, Depends(get_store)]`, e.g. for
    `store.run(...)`). `RuntimeError` if the app has none (neither `store_lifespan` ran nor
    `use_store` was called)."""
    return _store_in(request.app.state)


def _store_in(state: State) -> TodoStore:
    store: TodoStore | None = getattr(state, _STATE_KEY, None)
    if store is None:
        raise RuntimeError(
            "this app has no TodoStore: create it with FastAPI(lifespan=store_lifespan()) "
            "or call use_store(app, store)"
        )
    return store


def store_lifespan(
    settings: Settings | str | None = None, *, warm: int = 0
) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """A lifespan for `FastAPI(lifespan=...)`: at startup a `TodoStore` from `settings` (a
    `Settings` or a URL; default `TodoStore.from_env()`, i.e. `DATABASE_URL` and `.env`), at
    shutdown its connections closed. An app given a store with `use_store` keeps it as is.

    `warm=n`: at startup, open n connections at once (`TodoStore.warm`), so that the first
    requests do not each wait for a login; startup then fails with `DatabaseUnavailable` or
    `ConnectionRejected` when the database cannot be reached, and with `ValueError` naming `n`
    when n is more than `POOL_SIZE`.

    To run it inside a lifespan of your own: `async with store_lifespan()(app): ...`.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if getattr(app.state, _STATE_KEY, None) is not None:
            yield
            return
        store = TodoStore.from_env() if settings is None else TodoStore(settings)
        try:
            if warm:
                await store.warm(warm)
        except BaseException:
            await store.dispose()
            raise
        use_store(app, store)
        try:
            yield
        finally:
            setattr(app.state, _STATE_KEY, None)
            await store.dispose()

    return lifespan


# -- a unit of work per request ----------------------------------------------------------------
#
# FastAPI's dependencies with `yield` would close the unit of work for us, but measured, their
# machinery (context managers, cancel scopes) costs 5-7 % of a one-call request's CPU; a plain
# dependency opening the unit, and this middleware closing it when the response starts, costs
# a third of that. The dependency finds the request's store and open units in a context
# variable the middleware sets: a `Request` parameter would cost FastAPI another resolution.

Units = list[AbstractAsyncContextManager[AsyncSession]]
_REQUEST_UNITS: ContextVar[tuple[State, Units] | None] = ContextVar(
    "todo_store_request_units", default=None
)


class _ErrorStatus(Exception):
    """Ends a unit of work as failed: the route answered with an error status."""


_ERROR_STATUS: Final = _ErrorStatus()


class _UnitsOfWork:
    """ASGI middleware: ends the request's units of work when the response starts, before any
    of it is sent. Committed for a status below 400, rolled back otherwise and when the app
    raises. An error at commit is answered by the app's handler for it instead."""

    def __init__(self, app: ASGIApp, handlers: Mapping[Any, Any], state: State) -> None:
        self.app = app
        self.handlers = handlers  # the app's own mapping: handlers added later count too
        self.state = state  # the app's state, which holds its store

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        units: Units = []
        request_units = _REQUEST_UNITS.set((self.state, units))
        try:
            await self._serve(units, scope, receive, send)
        finally:
            _REQUEST_UNITS.reset(request_units)

    async def _serve(self, units: Units, scope: Scope, receive: Receive, send: Send) -> None:
        replaced = False

        async def send_after_the_units(message: Message) -> None:
            nonlocal replaced
            if replaced:
                return  # the app's own response, superseded by a commit error's
            if message["type"] == "http.response.start" and units:
                failed = message["status"] >= 400
                try:
                    await _end(units, _ERROR_STATUS if failed else None)
                except Exception as error:
                    response = await self._response_for(error, scope, receive)
                    replaced = True
                    await response(scope, receive, send)
                    return
            await send(message)

        try:
            await self.app(scope, receive, send_after_the_units)
        except BaseException as error:
            await _end(units, error)
            raise
        await _end(units, _ERROR_STATUS)  # a unit left open by an app that never answered

    async def _response_for(self, error: Exception, scope: Scope, receive: Receive) -> Response:
        for cls in type(error).__mro__:
            handler = self.handlers.get(cls)
            if handler is not None:
                response = handler(Request(scope, receive), error)
                return cast(Response, await response if inspect.isawaitable(response) else response)
        raise error


async def _end(units: Units, error: BaseException | None) -> None:
    """End each unit (the last opened first): committed when `error` is None, else rolled
    back. When a commit fails, the units after it are rolled back and its error raised."""
    while units:
        unit = units.pop()
        if error is None:
            try:
                await unit.__aexit__(None, None, None)
            except BaseException as failure:
                await _end(units, failure)
                raise
        else:
            try:
                await unit.__aexit__(type(error), error, error.__traceback__)
            except Exception:
                # Rolling back failed too (the connection is gone): the pool discards it, and
                # the error that ended the unit is the one to report.
                log.warning("rolling back a unit of work failed", exc_info=True)


class UnitOfWork(NamedTuple):
    """A route's unit of work: its `session`, bound to the caller `user_id`."""

    session: AsyncSession
    user_id: str

    @property
    def tasks(self) -> TaskRepo:
        return TaskRepo(self.session)

    @property
    def users(self) -> UserRepo:
        return UserRepo(self.session)


def unit_of_work(
    *,
    user_id: Callable[..., Any] | None,
    atomic: bool = True,
    read_only: bool = False,
) -> Any:
    """The dependency marker giving a route its unit of work: `Annotated[UnitOfWork,
    unit_of_work(user_id=current_user_id)]`. Needs `install(app)`.

    `user_id` is the application's dependency that returns the caller's id (e.g. from a
    verified Better Auth token): the unit of work is bound to that user in the database
    (`TodoStore.session(user_id=...)`) and carries the id (`work.user_id`), so a route need
    not declare that dependency again (each declaration costs FastAPI another resolution).
    `user_id=None` gives an unbound unit (work across users), a plain `AsyncSession`:
    `Annotated[AsyncSession, unit_of_work(user_id=None)]`; it must be asked for by name.

    `atomic` and `read_only` are `TodoStore.session`'s. The unit of work ends when the route
    has answered and before any of the response is sent: committed when the status is below
    400; rolled back for an error status or when the route raises. An error at commit is
    answered with that error's response, never with the route's. One unit per request and
    marker: parameters with the same marker share it.
    """
    if user_id is not None and not callable(user_id):
        raise TypeError("user_id must be the dependency that returns the caller's user id")
    options: dict[str, Any] = {"atomic": atomic, "read_only": read_only}

    if user_id is None:

        async def unbound_unit_of_work() -> AsyncSession:
            return await _open(options)

        return Depends(unbound_unit_of_work)

    async def unit_of_work_for_caller(caller: Annotated[str, Depends(user_id)]) -> UnitOfWork:
        return UnitOfWork(await _open({**options, "user_id": caller}), caller)

    return Depends(unit_of_work_for_caller)


async def _open(options: dict[str, Any]) -> AsyncSession:
    request_units = _REQUEST_UNITS.get()
    if request_units is None:
        raise RuntimeError(
            "unit_of_work needs todo_store.fastapi.install(app) (and an HTTP request)"
        )
    state, units = request_units
    unit = _store_in(state).session(**options)
    session = await unit.__aenter__()
    units.append(unit)
    return session


# -- versions over HTTP: ETag and If-Match ------------------------------------------------------

_ENTITY_TAG = re.compile(r'"([1-9][0-9]{0,9})"')
STALE: Final = "precondition failed: the task has changed; read it again"


def etag(version: int) -> str:
    """The `ETag` header value of a task at `version` (a strong entity tag, `"7"`)."""
    return f'"{version}"'


def if_match(*, required: bool = False) -> Any:
    """The dependency marker for a route's `If-Match` header, as the version a write expects:
    `Annotated[int | None, if_match()]`.

    No header: `None` (the write applies to any version), or 428 when `required`. `*`: `None`.
    One strong entity tag from `etag()`: its version; pass it as `expected_version=`, and a
    task that has moved on is a `VersionConflict`, answered 412 with the current `ETag`. A weak
    tag or any other tag can never match a task's version: 412. More than one tag: 422.
    """

    # async: FastAPI runs a plain function in a worker thread.
    async def expected_version(
        if_match: Annotated[str | None, Header(description="ETag of the version you read.")] = None,
    ) -> int | None:
        if if_match is None:
            if required:
                raise HTTPException(428, "If-Match required: send the ETag you read")
            return None
        value = if_match.strip()
        if value == "*":
            return None
        if "," in value:
            raise RequestValidationError(
                [{"loc": ("header", "if-match"), "msg": "one entity tag, or *", "type": "value"}]
            )
        match = _ENTITY_TAG.fullmatch(value)
        if match is None or int(match[1]) > INTEGER_MAX:
            raise HTTPException(412, STALE)
        return int(match[1])

    return Depends(expected_version)


# -- error responses ----------------------------------------------------------------------------


class ErrorBody(BaseModel):
    """The body of every error response but 422."""

    detail: str


class ValidationErrorItem(BaseModel):
    """One entry of a 422 body's `detail`."""

    loc: list[str | int]
    msg: str
    type: str


_RETRY_AFTER_HEADER = {
    "Retry-After": {
        "description": "Seconds after which the same request may succeed.",
        "schema": {"type": "integer"},
    }
}
_RESPONSES: Final[Mapping[int, dict[str, Any]]] = {
    404: {"model": ErrorBody, "description": "Not found, or another user's (the same body)."},
    409: {"model": ErrorBody, "description": "A uniqueness rule refused the write."},
    412: {
        "model": ErrorBody,
        "description": "If-Match names a version the task no longer has.",
        "headers": {"ETag": {"description": "The current version.", "schema": {"type": "string"}}},
    },
    428: {"model": ErrorBody, "description": "If-Match is required on this route."},
    500: {"model": ErrorBody, "description": "A database error the package does not classify."},
    503: {
        "model": ErrorBody,
        "description": (
            "The database is unavailable or busy (with Retry-After), refuses the service's "
            "login, is not migrated, or did not confirm a write (the outcome is unknown: read "
            "before retrying)."
        ),
        "headers": _RETRY_AFTER_HEADER,
    },
}


def error_responses(*status_codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` for these error statuses (404, 409, 412, 428, 500, 503), as
    `install` sends them. E.g. `FastAPI(responses=error_responses(500, 503))` and
    `@router.get(..., responses=error_responses(404))`. FastAPI lists 422 by itself on every
    route that takes input; `install` gives it the shape sent."""
    unknown = set(status_codes) - set(_RESPONSES)
    if unknown:
        raise ValueError(f"no error response for status {sorted(unknown)}")
    return {code: dict(_RESPONSES[code]) for code in status_codes}


def _detail(status: int, detail: object, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def _short(part: object) -> object:
    if isinstance(part, str) and len(part) > TEXT_MAX:
        return part[:TEXT_MAX] + "…"
    return part


def _located(loc: Sequence[object], request: Request) -> list[object]:
    """A repository's `loc` (a field name) with where the request carried that field."""
    if not loc:
        return ["body"]
    field = loc[0]
    if field in request.path_params:
        return ["path", *loc]
    if isinstance(field, str) and field in request.query_params:
        return ["query", *loc]
    return ["body", *loc]


def _validation_errors(errors: Sequence[Any]) -> list[dict[str, object]]:
    # `loc` may hold a key the client sent (an unknown field): names and messages are cut to
    # TEXT_MAX characters and at most ERRORS_SHOWN errors are listed, so a huge body never
    # comes back in the response.
    return [
        {
            "loc": [_short(part) for part in error["loc"]],
            "msg": _short(error["msg"]),
            "type": error["type"],
        }
        for error in errors[:ERRORS_SHOWN]
    ]


async def _request_invalid(_request: Request, error: RequestValidationError) -> JSONResponse:
    return _detail(422, _validation_errors(error.errors()))


async def _input_invalid(request: Request, error: ValidationError) -> JSONResponse:
    # A repository refused an argument before any SQL; `loc` names the field.
    errors = [
        {**item, "loc": _located(item["loc"], request)}
        for item in error.errors(include_input=False, include_url=False)
    ]
    return _detail(422, _validation_errors(errors))


async def _rejected(_request: Request, _error: Exception) -> JSONResponse:
    item = {"loc": ["body"], "msg": "a value was rejected by the database", "type": "invalid"}
    return _detail(422, [item])


async def _not_found(_request: Request, error: Exception) -> JSONResponse:
    # Fixed bodies: another user's task is indistinguishable from a missing one.
    if isinstance(error, TaskNotFound):
        return _detail(404, "task not found")
    return _detail(404, "user not found" if isinstance(error, UserNotFound) else "not found")


async def _stale(_request: Request, error: VersionConflict) -> JSONResponse:
    return _detail(412, STALE, {"ETag": etag(error.current_version)})


async def _conflict(_request: Request, error: Exception) -> JSONResponse:
    # The package's own message (e.g. "email is already used by another user"): it never
    # carries a value the client sent.
    return _detail(409, str(error))


async def _unavailable(_request: Request, _error: Exception) -> JSONResponse:
    return _detail(503, "database unavailable, retry shortly", _retry_after())


async def _busy(_request: Request, _error: Exception) -> JSONResponse:
    # Still conflicting after the retries of `store.run`: nothing was written, and the same
    # request can succeed in a moment. A 409 would tell the client its request is wrong.
    return _detail(503, "database busy, retry shortly", _retry_after())


async def _misconfigured(_request: Request, error: Exception) -> JSONResponse:
    # The database refuses this service's login or TLS: the operator must act, a client
    # retrying soon will not help (no Retry-After).
    log.error("database connection rejected: %s", error)
    return _detail(503, "database unavailable")


async def _outcome_unknown(_request: Request, error: Exception) -> JSONResponse:
    log.warning("commit outcome unknown: %s", error)
    return _detail(503, OUTCOME_UNKNOWN)


async def _not_migrated(_request: Request, error: Exception) -> JSONResponse:
    log.error("%s", error)
    return _detail(503, "database schema not ready")


async def _service_bug(_request: Request, error: Exception) -> JSONResponse:
    # The route wrote in a unit of work it asked to be read-only, or for another user than the
    # caller its unit is bound to, or the service's role lacks a grant: not the client's doing.
    log.error("%s", error)
    return _detail(500, "internal error")


async def _database_error(_request: Request, error: Exception) -> JSONResponse:
    # Unclassified: a bug or a server fault, not the client's doing. The message holds the
    # SQLSTATE and the package's words only.
    log.error("database error: %s", error)
    return _detail(500, "internal error")


def _retry_after() -> dict[str, str]:
    return {"Retry-After": str(RETRY_AFTER_S)}


# Starlette picks the handler of the nearest class in the exception's MRO, so a subclass an
# application adds gets its base's response. Typed `Any`: Starlette's handler type takes any
# `Exception`, these take their own class.
_HANDLERS: Final[Mapping[type[Exception], Any]] = {
    RequestValidationError: _request_invalid,
    ValidationError: _input_invalid,
    InvalidData: _rejected,
    NotFoundError: _not_found,
    VersionConflict: _stale,
    ConflictError: _conflict,
    DatabaseUnavailable: _unavailable,
    TransactionConflict: _busy,
    ConnectionRejected: _misconfigured,
    CommitOutcomeUnknown: _outcome_unknown,
    SchemaNotReady: _not_migrated,
    ReadOnlyViolation: _service_bug,
    AccessRefused: _service_bug,
    DatabaseError: _database_error,
}


def install(app: FastAPI) -> None:
    """Add the integration to `app`: units of work (`unit_of_work`) ended before the response,
    every package error mapped to its response, and 422s in one shape (also in OpenAPI):

    | error | status | body `detail` |
    |---|---|---|
    | request validation; a repository's `pydantic.ValidationError` | 422 | `[{loc, msg, type}]` |
    | `InvalidData` (a CHECK refused a value) | 422 | `[{loc: ["body"], ...}]` |
    | `TaskNotFound`, `UserNotFound`, other `NotFoundError` | 404 | fixed text |
    | `VersionConflict` (`expected_version=` stale) | 412 + current `ETag` | fixed text |
    | other `ConflictError` (`EmailTaken`, `DuplicateKey`) | 409 | the error's message |
    | `DatabaseUnavailable`, `TransactionConflict` | 503 + `Retry-After: 1` | fixed text |
    | `ConnectionRejected`, `SchemaNotReady` (logged) | 503 | fixed text |
    | `CommitOutcomeUnknown` (logged) | 503 | "outcome unknown: ... read before retrying" |
    | `ReadOnlyViolation`, `AccessRefused`, other `DatabaseError` (logged) | 500 | fixed text |
    """
    for error, handler in _HANDLERS.items():
        app.add_exception_handler(error, handler)
    app.add_middleware(_UnitsOfWork, handlers=app.exception_handlers, state=app.state)
    _document_422(app)


def _document_422(app: FastAPI) -> None:
    """Make OpenAPI's validation-error schemas (FastAPI lists them on every route that takes
    input) the shape the handlers send."""
    make_schema = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = make_schema()
            components = schema.get("components", {}).get("schemas", {})
            if "HTTPValidationError" in components:
                components["HTTPValidationError"] = _HTTP_VALIDATION_ERROR
                components["ValidationError"] = ValidationErrorItem.model_json_schema()
        return app.openapi_schema or make_schema()

    app.openapi = openapi  # type: ignore[method-assign]


_HTTP_VALIDATION_ERROR: Final = {
    "title": "HTTPValidationError",
    "description": (
        "Bad input: where (`loc`: `body`, `query`, `path` or `header`, then the field) and "
        "why, never the value given."
    ),
    "type": "object",
    "properties": {
        "detail": {
            "title": "Detail",
            "type": "array",
            "items": {"$ref": "#/components/schemas/ValidationError"},
            "maxItems": ERRORS_SHOWN,
        }
    },
    "required": ["detail"],
}
