"""The package's exceptions, and the one place server errors are translated into them.

Translation uses only the SQLSTATE and the constraint name the server reports (never the
message text), so it survives server upgrades and locales. The one exception is PgBouncer,
which reports its own login failures under one SQLSTATE (08P01) with fixed texts: those are
told apart by `pooler_login_failure`, a small table of PgBouncer's fixed messages.

What a caller can do with each error:

| error | meaning | retry? |
|---|---|---|
| `NotFoundError` (`TaskNotFound`, `UserNotFound`) | no such row for this caller | no |
| `ConflictError` (`EmailTaken`, `DuplicateKey`) | a uniqueness rule refused the write | no |
| `VersionConflict` (a `ConflictError`) | the task changed since the expected version | re-read |
| `InvalidData` | a CHECK / NOT NULL rule refused a value | no |
| `SchemaNotReady` | a table or column is missing: migrate | after migrating |
| `TransactionConflict` | serialization failure or deadlock | the whole unit of work |
| `DatabaseUnavailable` | lost, refused or timed-out connection, pooler queue full | reads |
| `CommitOutcomeUnknown` | failed while committing: the write may have happened | not blindly |
| `ConnectionRejected` | login refused: password, role, database, TLS, parameter | fix config |
| `ReadOnlyViolation` | a write in `session(read_only=True)` | no: use a writing unit |
| `AccessRefused` | a write for another user than the bound one; a role without grants | no |
| `DatabaseError` | anything else, with `.sqlstate` | no |
"""

from __future__ import annotations


class TodoStoreError(Exception):
    """Root of every error this package raises on purpose."""


class NotFoundError(TodoStoreError, LookupError):
    """The row does not exist for this caller (another user's row counts as missing)."""


class TaskNotFound(NotFoundError):
    def __init__(self, user_id: str, task_id: int) -> None:
        super().__init__(f"task {task_id} not found for user {user_id!r}")
        self.user_id = user_id
        self.task_id = task_id


class RowNotFound(NotFoundError):
    """A row of an application's user-owned table (`OwnedRepo`) missing for this caller."""

    def __init__(self, table: str, user_id: str, row_id: object) -> None:
        super().__init__(f"{table} row {row_id!r} not found for user {user_id!r}")
        self.table = table
        self.user_id = user_id
        self.row_id = row_id


class UserNotFound(NotFoundError):
    """No such user. The message names the user id when one was looked up, never an email
    (`.email` keeps the address for the caller's own code)."""

    def __init__(self, user_id: str | None = None, *, email: str | None = None) -> None:
        if user_id is not None:
            what = f"user {user_id!r}"
        elif email is not None:
            what = "the user with this email"
        else:
            what = "the owning user"
        super().__init__(f"{what} not found")
        self.user_id = user_id
        self.email = email


class ConflictError(TodoStoreError):
    """The write contradicts a uniqueness rule; retrying it unchanged will fail again."""


class EmailTaken(ConflictError):
    def __init__(self) -> None:
        super().__init__("email is already used by another user")


class DuplicateKey(ConflictError):
    """A unique key other than the email already holds this value; `constraint` names it."""

    def __init__(self, constraint: str | None) -> None:
        super().__init__(f"duplicate key (constraint {constraint or 'unknown'})")
        self.constraint = constraint


class VersionConflict(ConflictError):
    """The task has moved on from the version the caller expected; nothing was changed.

    `current_version` is the version the task has now: re-read it, merge, and write again
    with that version (or show the conflict to the user).
    """

    def __init__(self, user_id: str, task_id: int, *, expected: int, current: int) -> None:
        super().__init__(f"task {task_id} is at version {current}, not {expected}")
        self.user_id = user_id
        self.task_id = task_id
        self.expected_version = expected
        self.current_version = current


class InvalidData(TodoStoreError, ValueError):
    """The database refused a value (a CHECK or NOT NULL rule) that validation let through."""

    def __init__(self, constraint: str | None) -> None:
        super().__init__(f"value rejected by the database (constraint {constraint or 'unknown'})")
        self.constraint = constraint


UPGRADE_COMMAND = "todo-store migrate"


class SchemaNotReady(TodoStoreError):
    """A table or column is missing: the schema is behind the code; migrating fixes it."""

    def __init__(self, sqlstate: str | None = None) -> None:
        super().__init__(
            f"the database schema is missing or out of date; run `{UPGRADE_COMMAND}`"
            + (f" (SQLSTATE {sqlstate})" if sqlstate else "")
        )
        self.sqlstate = sqlstate


class TransactionConflict(TodoStoreError):
    """Serialization failure or deadlock: nothing was written; the whole unit of work may
    be run again (see `TodoStore.run`)."""

    def __init__(self, sqlstate: str) -> None:
        what = "deadlock detected" if sqlstate == _DEADLOCK else "serialization failure"
        super().__init__(f"{what}; the unit of work was rolled back (SQLSTATE {sqlstate})")
        self.sqlstate = sqlstate


class DatabaseUnavailable(TodoStoreError):
    """The connection was lost, refused or timed out, or the pooler's queue is full.

    Transient: safe to retry a read. A write in an atomic unit of work was rolled back;
    a write whose outcome is unknown raises `CommitOutcomeUnknown` instead.
    """


class ReadOnlyViolation(TodoStoreError):
    """A write was attempted in a read-only unit of work (`session(read_only=True)`);
    nothing was written. Run the write in `store.session()` instead."""

    def __init__(self, sqlstate: str = "25006") -> None:
        super().__init__(
            "the unit of work is read-only (session(read_only=True)): nothing was written; "
            f"run writes in store.session() (SQLSTATE {sqlstate})"
        )
        self.sqlstate = sqlstate


class CommitOutcomeUnknown(TodoStoreError):
    """The connection failed or timed out while a write was committing: it may or may not
    have been applied. The package never retries it; check before doing it again."""


class ConnectionRejected(TodoStoreError):
    """The server or pooler refused the login; no retry can succeed until the configuration
    changes. The message carries the server's (or TLS library's) reason and the fix."""

    def __init__(self, reason: str, advice: str, *, sqlstate: str | None = None) -> None:
        super().__init__(f"connection rejected: {reason} — {advice}")
        self.reason = reason
        self.advice = advice
        self.sqlstate = sqlstate


class AccessRefused(TodoStoreError):
    """The database refused the statement (SQLSTATE 42501), nothing was written: a write for
    another user than the one the unit of work is bound to (or in an unbound unit, under a
    role that row-level security applies to), or a role lacking a privilege (`todo-store
    grant ROLE`). Another user's existing row is never reported this way: it looks missing.
    """

    def __init__(self) -> None:
        super().__init__(
            "refused by the database: a write for another user than the unit of work is bound"
            " to, or a role without the privilege (SQLSTATE 42501)"
        )
        self.sqlstate = _INSUFFICIENT_PRIVILEGE


class DatabaseError(TodoStoreError):
    """Any other error the server reported; `sqlstate` says which."""

    def __init__(self, sqlstate: str | None, reason: str = "database error") -> None:
        super().__init__(f"{reason} (SQLSTATE {sqlstate or 'unknown'})")
        self.sqlstate = sqlstate


# SQLSTATE classes / codes, see https://www.postgresql.org/docs/current/errcodes-appendix.html
_UNIQUE_VIOLATION = "23505"
_FOREIGN_KEY_VIOLATION = "23503"
_CHECK_AND_NOT_NULL = {"23502", "23514", "22001"}  # not null, check, value too long
_SCHEMA_MISSING = {"42P01", "42703", "3F000"}  # undefined table, column, schema
_SERIALIZATION_FAILURE = "40001"
_DEADLOCK = "40P01"
_QUERY_CANCELED = "57014"  # statement timeout / cancel request
_READ_ONLY_TRANSACTION = "25006"
# Connection exception (08) and operator intervention: shutdown, crash, cannot connect now
# (57P01-57P03). The one definition of "the connection is gone" by SQLSTATE.
DISCONNECT_SQLSTATE_CLASSES = ("08", "57P")
_TOO_MANY_CONNECTIONS = "53300"
_RESOURCES_CLASS = "53"  # disk full, out of memory: retrying does not help
AUTH_CLASS = "28"  # invalid authorization: wrong user or password, pg_hba.conf refusal
UNKNOWN_DATABASE = "3D000"
_INSUFFICIENT_PRIVILEGE = "42501"  # row-level security WITH CHECK, or a missing GRANT

OWNER_KEYS: set[str] = {"fk_tasks_user_id_users"}
"""Foreign keys from a table's owner column to `users.id`, ON DELETE CASCADE (so only a write
can violate one): a violation means the owning user does not exist. `OwnedRepo` subclasses
add their table's."""


def translate(sqlstate: str | None, *, constraint: str | None = None) -> TodoStoreError:
    """Map one server error (SQLSTATE, constraint name) to the package's exception.

    `constraint` is the server-reported constraint name; model constraint names are fixed
    by the naming convention in `models.py`.
    """
    if sqlstate == _UNIQUE_VIOLATION:
        return EmailTaken() if constraint == "uq_users_email" else DuplicateKey(constraint)
    if sqlstate == _FOREIGN_KEY_VIOLATION and constraint in OWNER_KEYS:
        return UserNotFound()
    if sqlstate in _CHECK_AND_NOT_NULL:
        return InvalidData(constraint)
    if sqlstate in _SCHEMA_MISSING:
        return SchemaNotReady(sqlstate)
    if sqlstate == _INSUFFICIENT_PRIVILEGE:
        return AccessRefused()
    if sqlstate in (_SERIALIZATION_FAILURE, _DEADLOCK):
        return TransactionConflict(sqlstate)
    if sqlstate == _READ_ONLY_TRANSACTION:
        return ReadOnlyViolation(sqlstate)
    if sqlstate == _QUERY_CANCELED:
        return DatabaseUnavailable("statement cancelled (statement timeout or cancel request)")
    if sqlstate == _TOO_MANY_CONNECTIONS:
        return DatabaseUnavailable(f"the server has too many connections (SQLSTATE {sqlstate})")
    return _by_class(sqlstate)


def _by_class(sqlstate: str | None) -> TodoStoreError:
    """The errors told apart by their SQLSTATE class only."""
    if sqlstate is None:
        return DatabaseError(sqlstate)
    if sqlstate.startswith(DISCONNECT_SQLSTATE_CLASSES):
        return DatabaseUnavailable(f"database unavailable (SQLSTATE {sqlstate})")
    if sqlstate.startswith(_RESOURCES_CLASS):
        return DatabaseError(sqlstate, "the server is out of resources (disk or memory)")
    if sqlstate.startswith(AUTH_CLASS):
        return DatabaseError(sqlstate, "authentication failed: check the user and password")
    return DatabaseError(sqlstate)


def is_connection_loss(exc: BaseException) -> bool:
    """True for the client-side failures that mean the connection is gone.

    A timeout is not one: the connection may be healthy and merely slow or queued.
    """
    return isinstance(exc, OSError) and not isinstance(exc, TimeoutError)
