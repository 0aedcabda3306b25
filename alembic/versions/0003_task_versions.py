"""Tasks carry a version that every change increments: edits can say which one they saw.

`tasks.version integer NOT NULL DEFAULT 1`, and a BEFORE UPDATE trigger
`update_tasks_version` calling `todo_store_increment_version()`, which sets
`NEW.version = OLD.version + 1` on every UPDATE: raw SQL updates count too, and no UPDATE can
set a version of its own choosing. Adding a column with a constant default rewrites no rows
(PostgreSQL 11+). Like `todo_store_set_updated_at()`, the function carries the package's name
and is created without OR REPLACE, so it can neither clash with nor overwrite another
application's function.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "tasks",
        sa.Column("version", sa.Integer(), server_default=sa.text("1"), nullable=False),
    )
    op.execute(
        """
        CREATE FUNCTION todo_store_increment_version() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            NEW.version = OLD.version + 1;
            RETURN NEW;
        END;
        $$
        """
    )
    op.execute(
        """
        CREATE TRIGGER update_tasks_version
            BEFORE UPDATE ON tasks
            FOR EACH ROW
            EXECUTE FUNCTION todo_store_increment_version()
        """
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER IF EXISTS update_tasks_version ON tasks")
    op.execute("DROP FUNCTION IF EXISTS todo_store_increment_version()")
    op.drop_column("tasks", "version")
