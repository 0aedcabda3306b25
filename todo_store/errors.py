"""The package's exceptions, and the one place database errors are translated into them.

Translation uses only the SQLSTATE and the constraint / table name the server reports
(never the message text), so it survives server upgrades and locales.
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


class UserNotFound(NotFoundError):
    def __init__(self, user_id: str | None = None, *, email: str | None = None) -> None:
        if user_id is not None:
            what = f"user {user_id!r}"
        elif email is not None:
            what = f"user with email {email!r}"
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


class InvalidData(TodoStoreError, ValueError):
    """The database refused a value (a CHECK or NOT NULL rule) that validation let through."""

    def __init__(self, constraint: str | None) -> None:
        super().__init__(f"value rejected by the database (constraint {constraint or 'unknown'})")
        self.constraint = constraint


class SchemaNotReady(TodoStoreError):
    """A table, column or function is missing: the schema is behind the code."""

    def __init__(self) -> None:
        super().__init__(
            "the database schema is missing or out of date; run `alembic upgrade head`"
        )


class DatabaseUnavailable(TodoStoreError):
    """The connection was lost, refused or timed out. Transient: safe to retry a read."""


class DatabaseError(TodoStoreError):
    """Any other error the server reported; `sqlstate` says which."""

    def __init__(self, sqlstate: str | None, reason: str = "database error") -> None:
        super().__init__(f"{reason} (SQLSTATE {sqlstate or 'unknown'})")
        self.sqlstate = sqlstate


# SQLSTATE classes / codes, see https://www.postgresql.org/docs/current/errcodes-appendix.html
_UNIQUE_VIOLATION = "23505"
_FOREIGN_KEY_VIOLATION = "23503"
_CHECK_AND_NOT_NULL = {"23502", "23514", "22001"}  # not null, check, value too long
_SCHEMA_MISSING = {"42P01", "42703", "42883"}  # undefined table, column, function
_UNAVAILABLE_CLASSES = ("08", "53", "57P")  # connection, resources, operator intervention
_QUERY_CANCELED = "57014"  # statement timeout / cancel request
_AUTH_CLASS = "28"  # invalid authorization: wrong user or password
_UNKNOWN_DATABASE = "3D000"


def translate(sqlstate: str | None, *, constraint: str | None = None) -> TodoStoreError:
    """Map one server error to the package's exception.

    `constraint` is the server-reported constraint name; model constraint names are fixed
    by the naming convention in `models.py`.
    """
    if sqlstate == _UNIQUE_VIOLATION and constraint == "uq_users_email":
        return EmailTaken()
    if sqlstate == _FOREIGN_KEY_VIOLATION and constraint == "fk_tasks_user_id_users":
        return UserNotFound()
    if sqlstate in _CHECK_AND_NOT_NULL:
        return InvalidData(constraint)
    if sqlstate in _SCHEMA_MISSING:
        return SchemaNotReady()
    if sqlstate == _QUERY_CANCELED:
        return DatabaseUnavailable("statement cancelled (statement timeout)")
    if sqlstate is not None and sqlstate.startswith(_UNAVAILABLE_CLASSES):
        return DatabaseUnavailable(f"database unavailable (SQLSTATE {sqlstate})")
    if sqlstate is not None and sqlstate.startswith(_AUTH_CLASS):
        return DatabaseError(sqlstate, "authentication failed: check the user and password")
    if sqlstate == _UNKNOWN_DATABASE:
        return DatabaseError(sqlstate, "the database named in the URL does not exist")
    return DatabaseError(sqlstate)


def is_connection_loss(exc: BaseException) -> bool:
    """True for the client-side failures that mean the connection is gone or timed out."""
    return isinstance(exc, OSError)  # ConnectionError and TimeoutError are OSErrors
