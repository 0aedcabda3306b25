"""The pytest plugin (`todo_store.testing.plugin`) and the helpers it uses.

`postgres`: where a test PostgreSQL comes from (env URL, Docker, or embedded) and throwaway
databases on it. `pgbouncer`: a real PgBouncer, in transaction mode, in front of one of them.
`isolated_store`: the `TodoStore` of the `todo_store` fixture.

The names below are imported on first use, so that loading the plugin (at every pytest start)
imports neither SQLAlchemy nor asyncpg.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from todo_store.testing.isolated_store import IsolatedTodoStore
    from todo_store.testing.pgbouncer import PgBouncer, PgBouncerUnavailable
    from todo_store.testing.postgres import (
        ProvisionedServer,
        create_database,
        docker_available,
        drop_database,
        provision_server,
    )

_HOMES = {
    "IsolatedTodoStore": "isolated_store",
    "PgBouncer": "pgbouncer",
    "PgBouncerUnavailable": "pgbouncer",
    "ProvisionedServer": "postgres",
    "create_database": "postgres",
    "docker_available": "postgres",
    "drop_database": "postgres",
    "provision_server": "postgres",
}

__all__ = [
    "IsolatedTodoStore",
    "PgBouncer",
    "PgBouncerUnavailable",
    "ProvisionedServer",
    "create_database",
    "docker_available",
    "drop_database",
    "provision_server",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{home}"), name)
