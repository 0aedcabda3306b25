"""Indexes for pages of tasks: one per sort, and one for search where the server can.

`TaskRepo.page` reads `WHERE user_id = ? [AND (column, id) > (?, ?)] ORDER BY column, id
LIMIT n` for each sort column (created_at, updated_at, title, completed): an index on
(user_id, column, id) serves it in order, from the cursor's position, whatever page it is.

Search matches `title || ' ' || coalesce(description, '')` with ILIKE '%word%'. Where the
`pg_trgm` and `btree_gin` extensions are available (PostgreSQL's contrib; Neon has both), this
revision creates them if they are missing and may be created (trusted extensions: the
database owner may), and adds one GIN index on (user_id, the trigrams of that text): a word
rare in a user's tasks is found by reading that user's matches only. Built with
`fastupdate = off` (each write updates it in place, instead of queueing entries that every
search then reads and that the planner counts against the index); the text's statistics are
finer than the default, so that a word in 0.1 % of the tasks is not estimated at 1 %. Both
matter: the planner otherwise reads the user's tasks in order, expecting an early match.

Without those extensions (e.g. an embedded server without contrib) search still works, by
reading the user's tasks in sort order: fine for common words and small lists. The
downgrade drops the indexes, and each extension only if this revision created it (its
comment says so) and nothing else has come to depend on it.

Each index costs writes: every insert, and every update (the trigger changes updated_at),
maintains them. On a large table CREATE INDEX blocks writes to `tasks` while it builds.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SORT_INDEXES = {
    "idx_tasks_user_created": "created_at",
    "idx_tasks_user_updated": "updated_at",
    "idx_tasks_user_title": "title",
    "idx_tasks_user_completed": "completed",
}
SEARCH_INDEX = "idx_tasks_search_trgm"
SEARCH_STATISTICS = 1000
# pg_trgm: trigrams of the searched text; btree_gin: user_id in the same GIN index.
EXTENSIONS = ("pg_trgm", "btree_gin")
CREATED_MARK = "created by todo_store revision 0005"


def upgrade() -> None:
    for name, column in SORT_INDEXES.items():
        op.create_index(name, "tasks", ["user_id", column, "id"])
    for extension in EXTENSIONS:
        op.execute(
            f"""
            DO $migration$
            BEGIN
                IF NOT EXISTS (SELECT 1 FROM pg_extension WHERE extname = '{extension}')
                   AND EXISTS (SELECT 1 FROM pg_available_extensions
                               WHERE name = '{extension}') THEN
                    BEGIN
                        CREATE EXTENSION {extension};
                        COMMENT ON EXTENSION {extension} IS '{CREATED_MARK}';
                    EXCEPTION WHEN insufficient_privilege THEN
                        RAISE NOTICE '{extension} not created (%): search works without its '
                            'index', SQLERRM;
                    END;
                END IF;
            END
            $migration$
            """
        )
    # The operator class is qualified with the extension's schema, which need not be on the
    # search_path (btree_gin's is found as the default for text). The expression must stay
    # exactly the one todo_store/pages.py searches.
    op.execute(
        f"""
        DO $migration$
        DECLARE
            trgm_schema name;
        BEGIN
            SELECT n.nspname INTO trgm_schema
            FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
            WHERE e.extname = 'pg_trgm';
            IF trgm_schema IS NOT NULL
               AND EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'btree_gin') THEN
                EXECUTE format(
                    'CREATE INDEX {SEARCH_INDEX} ON tasks USING gin '
                    '(user_id, (title || %L || coalesce(description, %L)) %I.gin_trgm_ops) '
                    'WITH (fastupdate = off)',
                    ' ', '', trgm_schema
                );
                ALTER INDEX {SEARCH_INDEX} ALTER COLUMN 2 SET STATISTICS {SEARCH_STATISTICS};
            END IF;
        END
        $migration$
        """
    )


def downgrade() -> None:
    op.execute(f"DROP INDEX IF EXISTS {SEARCH_INDEX}")
    for name in SORT_INDEXES:
        op.drop_index(name, table_name="tasks")
    for extension in reversed(EXTENSIONS):
        op.execute(
            f"""
            DO $migration$
            BEGIN
                IF EXISTS (
                    SELECT 1 FROM pg_extension e
                    WHERE e.extname = '{extension}'
                      AND obj_description(e.oid, 'pg_extension') = '{CREATED_MARK}'
                ) THEN
                    BEGIN
                        DROP EXTENSION {extension};  -- RESTRICT: kept if anything uses it
                    EXCEPTION WHEN dependent_objects_still_exist THEN
                        RAISE NOTICE '{extension} kept: other objects use it';
                    END;
                END IF;
            END
            $migration$
            """
        )
