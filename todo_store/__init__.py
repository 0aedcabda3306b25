"""todo_store: async, user-scoped data access for a multi-user todo app on Neon PostgreSQL."""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _installed_version

from todo_store.engine import TodoStore, create_engine, create_sessionmaker
from todo_store.errors import (
    CommitOutcomeUnknown,
    ConflictError,
    ConnectionRejected,
    DatabaseError,
    DatabaseUnavailable,
    DuplicateKey,
    EmailTaken,
    InvalidData,
    NotFoundError,
    SchemaNotReady,
    TaskNotFound,
    TodoStoreError,
    TransactionConflict,
    UserNotFound,
)
from todo_store.models import Base, Task, User
from todo_store.repositories import UNSET, TaskRepo, UserRepo
from todo_store.schemas import (
    TaskCreate,
    TaskPatch,
    TaskRead,
    UserProfile,
    UserRead,
    UserUpsert,
)
from todo_store.settings import Settings

try:
    __version__ = _installed_version("todo-store")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "UNSET",
    "Base",
    "CommitOutcomeUnknown",
    "ConflictError",
    "ConnectionRejected",
    "DatabaseError",
    "DatabaseUnavailable",
    "DuplicateKey",
    "EmailTaken",
    "InvalidData",
    "NotFoundError",
    "SchemaNotReady",
    "Settings",
    "Task",
    "TaskCreate",
    "TaskNotFound",
    "TaskPatch",
    "TaskRead",
    "TaskRepo",
    "TodoStore",
    "TodoStoreError",
    "TransactionConflict",
    "User",
    "UserNotFound",
    "UserProfile",
    "UserRead",
    "UserRepo",
    "UserUpsert",
    "__version__",
    "create_engine",
    "create_sessionmaker",
]
