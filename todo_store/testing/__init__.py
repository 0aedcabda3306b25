"""The pytest plugin (`todo_store.testing.plugin`) and the helpers it uses.

`postgres`: where a test PostgreSQL comes from (env URL, Docker, or embedded) and throwaway
databases on it. `pgbouncer`: a real PgBouncer, in transaction mode, in front of one of them.
"""

from todo_store.testing.pgbouncer import PgBouncer, PgBouncerUnavailable
from todo_store.testing.postgres import (
    ProvisionedServer,
    create_database,
    docker_available,
    drop_database,
    provision_server,
)

__all__ = [
    "PgBouncer",
    "PgBouncerUnavailable",
    "ProvisionedServer",
    "create_database",
    "docker_available",
    "drop_database",
    "provision_server",
]
