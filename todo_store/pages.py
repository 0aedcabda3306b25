"""Pages of one user's tasks: the query, its validation, and the cursor that resumes it.

Guarantees (`TaskRepo.page` is the public entry point):
- one SQL statement per page, scoped to the user; keyset pagination on (sort column, id), so
  page 100 reads what page 1 reads, and a task that exists unchanged through the whole
  listing appears exactly once across the pages, whatever is added, edited or deleted between
  them (ties are broken by id);
- the cursor is opaque: AES-GCM encrypted and authenticated, so it reveals nothing (not the
  anchor task's title) and any modification is refused before SQL is sent;
- a cursor is bound to the query that produced it (user, sort, search, filters): used with
  another query it is refused with a `ValueError` naming `cursor`;
- bad arguments raise `pydantic.ValidationError` (a `ValueError`) naming the field, before SQL.

Why encrypted, not just signed: resuming a title sort after the anchor task was renamed or
deleted needs the anchor's title as it was; a signed cursor would carry it readable.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import os
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Final, Literal, NamedTuple, cast

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pydantic import (
    AfterValidator,
    AwareDatetime,
    Field,
    SecretStr,
    ValidationInfo,
    field_validator,
)
from sqlalchemy import (
    ColumnElement,
    Integer,
    Select,
    Table,
    Text,
    bindparam,
    literal_column,
    select,
    tuple_,
)

from todo_store.models import Task
from todo_store.schemas import ListLimit, TaskRecord, UserId, _Input, _no_nul

log = logging.getLogger("todo_store")

TASKS = cast(Table, Task.__table__)

Sort = Literal[
    "created", "-created", "updated", "-updated", "title", "-title", "completed", "-completed"
]
SORT_COLUMNS: Final = {
    "created": TASKS.c.created_at,
    "updated": TASKS.c.updated_at,
    "title": TASKS.c.title,
    "completed": TASKS.c.completed,
}

SEARCH_MAX = 200
SEARCH_WORDS_MAX = 8
CURSOR_MAX = 2048  # a 200-character title of 4-byte characters, encrypted, in base64: ~1.1 kB

# The text a search looks in. Written out (not built from bound parameters) because migration
# 0005's search index is on exactly this expression: the planner matches it textually.
HAYSTACK: Final = literal_column("(tasks.title || ' ' || coalesce(tasks.description, ''))", Text)


@dataclass(frozen=True)
class Page:
    """One page of tasks and the cursor of the next (`None` on the last page)."""

    items: tuple[TaskRecord, ...]
    next_cursor: str | None

    def __repr__(self) -> str:
        more = "more" if self.next_cursor is not None else "last page"
        return f"Page({len(self.items)} items, {more})"


# -- the key ----------------------------------------------------------------------------------

CURSOR_KEY_INFO: Final = "todo_store.cursor_key"
"""Where a session's or connection's `info` holds the `CursorKey` (`TodoStore` puts it there)."""

_KEY_LABEL = b"todo_store page cursor v1"
_VERSION = b"\x01"
_NONCE_BYTES = 12


class CursorKey:
    """The AES-256-GCM key that encrypts page cursors; its repr never shows the key."""

    __slots__ = ("_aead",)

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError("a cursor key is 32 bytes")
        self._aead = AESGCM(key)

    @classmethod
    def derive(cls, secret: str) -> CursorKey:
        """The key for `secret` (`CURSOR_SECRET`, or `BETTER_AUTH_SECRET`): HMAC-SHA256 under
        a label of its own, so the cursor key reveals nothing about the secret it came from."""
        return cls(hmac.new(secret.encode(), _KEY_LABEL, hashlib.sha256).digest())

    def __repr__(self) -> str:
        return "CursorKey(...)"

    def seal(self, plaintext: bytes) -> str:
        # Random 96-bit nonces: a repeat is unlikely (< 2^-32) until ~2^32 cursors per key.
        nonce = os.urandom(_NONCE_BYTES)
        sealed = _VERSION + nonce + self._aead.encrypt(nonce, plaintext, _VERSION)
        return base64.urlsafe_b64encode(sealed).rstrip(b"=").decode("ascii")

    def open(self, cursor: str) -> bytes:
        """The plaintext, or `ValueError` if the cursor was modified or made with another key."""
        try:
            raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        except (binascii.Error, ValueError):
            raise ValueError(_INVALID) from None
        # Base64 can spell the same bytes several ways (unused low bits of the last
        # character): only the one this module writes is accepted, so no edit goes unnoticed.
        if base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii") != cursor:
            raise ValueError(_INVALID)
        if len(raw) < 1 + _NONCE_BYTES + 16 or raw[:1] != _VERSION:
            raise ValueError(_INVALID)
        nonce, body = raw[1 : 1 + _NONCE_BYTES], raw[1 + _NONCE_BYTES :]
        try:
            return self._aead.decrypt(nonce, body, _VERSION)
        except InvalidTag:
            raise ValueError(_INVALID) from None


_INVALID = (
    "is not a cursor this service issued (modified, truncated, or made with another "
    "CURSOR_SECRET): start again without a cursor"
)
_OTHER_QUERY = (
    "comes from a different query (another user, sort, search or filter): "
    "pass the cursor only with the arguments of the page that returned it"
)

_process_key: CursorKey | None = None
_process_key_used = False


def process_cursor_key() -> CursorKey:
    """The key used when no secret is configured: random, made once per process.

    Cursors it seals are refused by any other process (another instance, or this one after a
    restart): set `CURSOR_SECRET` when more than one process serves pages. The first cursor
    sealed with it says so in the log (a process that never pages is not warned).
    """
    global _process_key  # noqa: PLW0603 (one key per process is the point)
    if _process_key is None:
        _process_key = CursorKey(AESGCM.generate_key(bit_length=256))
    return _process_key


def _warn_if_process_key(key: CursorKey) -> None:
    global _process_key_used  # noqa: PLW0603 (one warning per process)
    if key is _process_key and not _process_key_used:
        _process_key_used = True
        log.warning(
            "neither CURSOR_SECRET nor BETTER_AUTH_SECRET is set: page cursors are valid "
            "only in this process (not on another instance, nor after a restart)"
        )


def cursor_key_for(*secrets: SecretStr | None) -> CursorKey:
    """The key of the first secret set (`CURSOR_SECRET`, then `BETTER_AUTH_SECRET`), else the
    process's random key."""
    for secret in secrets:
        if secret is not None and secret.get_secret_value():
            return CursorKey.derive(secret.get_secret_value())
    return process_cursor_key()


def cursor_key_of(info: dict[Any, Any]) -> CursorKey:
    """The key a session's or connection's `info` carries, else the process's key."""
    key = info.get(CURSOR_KEY_INFO)
    return key if isinstance(key, CursorKey) else process_cursor_key()


# -- the query --------------------------------------------------------------------------------


def words_of(search: str | None) -> tuple[str, ...]:
    """The words a search matches, split on any Unicode whitespace; a word repeated in
    another case adds nothing to an AND of case-insensitive matches."""
    seen: dict[str, str] = {}
    for word in (search or "").split():
        seen.setdefault(word.lower(), word)
    return tuple(seen.values())


def _few_words(value: str) -> str:
    if len(words_of(value)) > SEARCH_WORDS_MAX:
        raise ValueError(f"at most {SEARCH_WORDS_MAX} different words")
    return value


Search = Annotated[
    str, Field(max_length=SEARCH_MAX), AfterValidator(_no_nul), AfterValidator(_few_words)
]


@dataclass(frozen=True)
class Anchor:
    """The last task of the previous page: its sort value and id."""

    value: datetime | str | bool
    task_id: int


class PageQuery(_Input):
    """`TaskRepo.page`'s arguments, validated; `cursor` is decoded into its `Anchor`.

    Validate with `context={"key": CursorKey}`. Fields are validated in this order, and
    `cursor` last: it is checked against the others.
    """

    user_id: UserId
    search: Search | None = None
    completed: bool | None = None
    updated_since: AwareDatetime | None = None
    sort: Sort = "-created"
    limit: ListLimit = 50
    cursor: Anchor | None = None

    @field_validator("cursor", mode="plain")
    @classmethod
    def _open_cursor(cls, value: object, info: ValidationInfo) -> Anchor | None:
        if value is None:
            return None
        if not isinstance(value, str) or not value or len(value) > CURSOR_MAX:
            raise ValueError(_INVALID)
        if not {"user_id", "search", "completed", "updated_since", "sort"} <= info.data.keys():
            # Another field is already invalid; that error is reported, not this one.
            raise ValueError("not checked: another argument is invalid")
        key = cast(CursorKey, (info.context or {})["key"])
        return _anchor_from(key.open(value), _fingerprint(info.data), info.data["sort"])

    @property
    def words(self) -> tuple[str, ...]:
        return words_of(self.search)

    def next_cursor(self, key: CursorKey, last: TaskRecord) -> str:
        """The cursor of the page after the one that ended with `last`."""
        value = getattr(last, SORT_COLUMNS[self.sort.lstrip("-")].key)
        if isinstance(value, datetime):
            value = _micros(value)
        payload = [_fingerprint(dict(self)), value, last.id]
        _warn_if_process_key(key)
        return key.seal(json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode())


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _micros(moment: datetime) -> int:
    # Exact (integer microseconds, like timestamptz), unlike a float timestamp.
    return (moment - _EPOCH) // timedelta(microseconds=1)


def _fingerprint(fields: dict[str, Any]) -> str:
    """A digest of what a cursor is bound to; stored inside the encrypted cursor."""
    since = fields["updated_since"]
    canonical = [
        fields["user_id"],
        [word.lower() for word in words_of(fields["search"])],
        fields["completed"],
        None if since is None else _micros(since),
        fields["sort"],
    ]
    digest = hashlib.sha256(json.dumps(canonical, ensure_ascii=False).encode()).digest()
    return base64.b64encode(digest[:16]).decode("ascii")


def _anchor_from(plaintext: bytes, fingerprint: str, sort: str) -> Anchor:
    try:
        bound_to, value, task_id = json.loads(plaintext)
    except (ValueError, TypeError):
        raise ValueError(_INVALID) from None
    if bound_to != fingerprint:
        raise ValueError(_OTHER_QUERY)
    column = sort.lstrip("-")
    expected = {"created": int, "updated": int, "title": str, "completed": bool}[column]
    if type(value) is not expected or type(task_id) is not int:
        raise ValueError(_INVALID)
    if expected is int:
        value = _EPOCH + timedelta(microseconds=cast(int, value))
    return Anchor(value, task_id)


# -- the statement ----------------------------------------------------------------------------


class StatementKey(NamedTuple):
    """What tells the statements of pages apart."""

    sort: str
    words: int
    completed: bool | None
    since: bool
    after_anchor: bool


def statement_key(query: PageQuery) -> StatementKey:
    return StatementKey(
        query.sort,
        len(query.words),
        query.completed,
        query.updated_since is not None,
        query.cursor is not None,
    )


def statement(columns: tuple[Any, ...], key: StatementKey) -> Select[Any]:
    """The page's SELECT of `columns`, its values bound by name (`parameters`)."""
    sort, words, completed, since, after_anchor = key
    column = SORT_COLUMNS[sort.lstrip("-")]
    descending = sort.startswith("-")
    where: list[ColumnElement[bool]] = [TASKS.c.user_id == bindparam("owner")]
    # `IS true` / `IS false` as literals, one statement per value: PostgreSQL has no `IS $1`.
    if completed is not None:
        where.append(TASKS.c.completed.is_(completed))
    if since:
        where.append(TASKS.c.updated_at >= bindparam("since"))
    # Backslash is the escape character (`like_pattern`): % _ \ in a word match themselves.
    where += [HAYSTACK.ilike(bindparam(f"word_{n}"), escape="\\") for n in range(words)]
    if after_anchor:
        # A row comparison: served by the (user_id, column, id) index as one range.
        position = tuple_(column, TASKS.c.id)
        anchor = tuple_(bindparam("anchor_value", type_=column.type), bindparam("anchor_id"))
        where.append(position < anchor if descending else position > anchor)
    order = [column.desc(), TASKS.c.id.desc()] if descending else [column.asc(), TASKS.c.id.asc()]
    return (
        select(*columns).where(*where).order_by(*order).limit(bindparam("row_limit", type_=Integer))
    )


def like_pattern(word: str) -> str:
    """`%word%` with the word's own %, _ and \\ matching themselves."""
    escaped = word.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def parameters(query: PageQuery) -> dict[str, Any]:
    """The bound values of `statement(query)`; one row more than the page, to see if another
    page follows."""
    values: dict[str, Any] = {"owner": query.user_id, "row_limit": query.limit + 1}
    if query.updated_since is not None:
        values["since"] = query.updated_since
    for n, word in enumerate(query.words):
        values[f"word_{n}"] = like_pattern(word)
    if query.cursor is not None:
        values["anchor_value"] = query.cursor.value
        values["anchor_id"] = query.cursor.task_id
    return values


def page_of(query: PageQuery, key: CursorKey, rows: list[TaskRecord]) -> Page:
    """The page the statement's rows make (it asked for one row more than the page)."""
    if len(rows) <= query.limit:
        return Page(tuple(rows), None)
    items = tuple(rows[: query.limit])
    return Page(items, query.next_cursor(key, items[-1]))
