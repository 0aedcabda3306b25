"""todo_store: async, user-scoped data access for a multi-user todo app on Neon PostgreSQL.

The names below are imported on first use: `import todo_store` alone (which every pytest start
does, to load the package's pytest plugin) then costs almost nothing.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _installed_version
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from todo_store.engine import TodoStore, create_engine, create_sessionmaker
    from todo_store.errors import (
        AccessRefused,
        CommitOutcomeUnknown,
        ConflictError,
        ConnectionRejected,
        DatabaseError,
        DatabaseUnavailable,
        DuplicateKey,
        EmailTaken,
        InvalidData,
        NotFoundError,
        ReadOnlyViolation,
        RowNotFound,
        SchemaNotReady,
        TaskNotFound,
        TodoStoreError,
        TransactionConflict,
        UserNotFound,
        VersionConflict,
    )
    from todo_store.models import Base, Task, User
    from todo_store.owned import OwnedRepo
    from todo_store.pages import Page
    from todo_store.replicas import (
        ConsistencyToken,
        ConsistencyTokenUnavailable,
        ForeignConsistencyToken,
        consistency_token,
    )
    from todo_store.repositories import UNSET, TaskRepo, UserRepo
    from todo_store.schemas import (
        TaskCreate,
        TaskPatch,
        TaskRead,
        TaskRecord,
        UserProfile,
        UserRead,
        UserRecord,
        UserUpsert,
    )
    from todo_store.settings import Settings

try:
    __version__ = _installed_version("todo-store")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

# Where each public name lives.
_HOMES = {
    "TodoStore": "engine",
    "create_engine": "engine",
    "create_sessionmaker": "engine",
    "AccessRefused": "errors",
    "CommitOutcomeUnknown": "errors",
    "ConflictError": "errors",
    "ConnectionRejected": "errors",
    "DatabaseError": "errors",
    "DatabaseUnavailable": "errors",
    "DuplicateKey": "errors",
    "EmailTaken": "errors",
    "InvalidData": "errors",
    "NotFoundError": "errors",
    "ReadOnlyViolation": "errors",
    "SchemaNotReady": "errors",
    "RowNotFound": "errors",
    "TaskNotFound": "errors",
    "TodoStoreError": "errors",
    "TransactionConflict": "errors",
    "UserNotFound": "errors",
    "ConsistencyToken": "replicas",
    "ConsistencyTokenUnavailable": "replicas",
    "ForeignConsistencyToken": "replicas",
    "consistency_token": "replicas",
    "VersionConflict": "errors",
    "Base": "models",
    "Task": "models",
    "User": "models",
    "Page": "pages",
    "UNSET": "repositories",
    "OwnedRepo": "owned",
    "TaskRepo": "repositories",
    "UserRepo": "repositories",
    "TaskCreate": "schemas",
    "TaskRecord": "schemas",
    "TaskPatch": "schemas",
    "TaskRead": "schemas",
    "UserProfile": "schemas",
    "UserRead": "schemas",
    "UserRecord": "schemas",
    "UserUpsert": "schemas",
    "Settings": "settings",
}

__all__ = [
    "UNSET",
    "AccessRefused",
    "Base",
    "CommitOutcomeUnknown",
    "ConflictError",
    "ConnectionRejected",
    "ConsistencyToken",
    "ConsistencyTokenUnavailable",
    "DatabaseError",
    "DatabaseUnavailable",
    "DuplicateKey",
    "EmailTaken",
    "ForeignConsistencyToken",
    "InvalidData",
    "NotFoundError",
    "OwnedRepo",
    "Page",
    "ReadOnlyViolation",
    "RowNotFound",
    "SchemaNotReady",
    "Settings",
    "Task",
    "TaskCreate",
    "TaskNotFound",
    "TaskPatch",
    "TaskRead",
    "TaskRecord",
    "TaskRepo",
    "TodoStore",
    "TodoStoreError",
    "TransactionConflict",
    "User",
    "UserNotFound",
    "UserProfile",
    "UserRead",
    "UserRecord",
    "UserRepo",
    "UserUpsert",
    "VersionConflict",
    "__version__",
    "consistency_token",
    "create_engine",
    "create_sessionmaker",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
