"""Row-level security on tasks and users: a unit of work bound to a user sees only its rows.

Both tables get row-level security enabled and FORCED (the owner is subject too) and two
policies (see `todo_store.binding.make_user_owned`): `todo_store_own_rows` lets every role see
and write only the rows of the user the transaction is bound to (`todo_store.user_id`, set by
`store.session(user_id=...)`; empty = no user = no row); `todo_store_maintenance` lets the
role running this migration (the tables' owner) work on every row while unbound, so
migrations, schema checks, `demo` and operator jobs go on working. Foreign keys and their
cascades are not subject to row-level security. No role and no password is created here:
`todo-store grant ROLE` gives an existing runtime role its privileges.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04
"""

from collections.abc import Sequence

from todo_store.binding import drop_user_ownership, make_user_owned

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    make_user_owned("users", user_column="id")
    make_user_owned("tasks", user_column="user_id")


def downgrade() -> None:
    drop_user_ownership("tasks")
    drop_user_ownership("users")
