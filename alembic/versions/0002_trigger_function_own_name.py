"""Move the updated_at trigger onto the package's own function, todo_store_set_updated_at().

Databases migrated by an earlier 0001 have the trigger calling `update_updated_at_column()`,
a name other applications commonly use in the same schema (one `CREATE OR REPLACE` of theirs
would silently change what our trigger does; our downgrade would drop theirs). This revision:

- creates `todo_store_set_updated_at()` unless it exists (0001 now creates it);
- if the trigger still calls another function, re-creates the trigger on ours, then drops the
  old function only if nothing else depends on it (another application's trigger keeps it).

Databases created by the current 0001 are already in that state: nothing changes. The
downgrade leaves the schema as the current 0001 creates it, so it has nothing to undo.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(
        """
        DO $migration$
        DECLARE
            old_function regprocedure;
        BEGIN
            IF NOT EXISTS (
                SELECT 1 FROM pg_proc
                WHERE proname = 'todo_store_set_updated_at' AND pronargs = 0
                  AND pronamespace = current_schema()::regnamespace
            ) THEN
                CREATE FUNCTION todo_store_set_updated_at() RETURNS trigger
                LANGUAGE plpgsql AS $function$
                BEGIN
                    NEW.updated_at = now();
                    RETURN NEW;
                END;
                $function$;
            END IF;

            SELECT t.tgfoid::regprocedure INTO old_function
            FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid
            WHERE t.tgrelid = 'tasks'::regclass AND t.tgname = 'update_tasks_updated_at'
              AND p.proname <> 'todo_store_set_updated_at';
            IF old_function IS NULL THEN
                RETURN;
            END IF;

            DROP TRIGGER update_tasks_updated_at ON tasks;
            CREATE TRIGGER update_tasks_updated_at
                BEFORE UPDATE ON tasks
                FOR EACH ROW
                EXECUTE FUNCTION todo_store_set_updated_at();
            -- Another application's trigger (or anything else) may use the old function.
            IF NOT EXISTS (
                SELECT 1 FROM pg_depend
                WHERE refclassid = 'pg_proc'::regclass AND refobjid = old_function
            ) THEN
                EXECUTE format('DROP FUNCTION %s', old_function);
            END IF;
        END
        $migration$
        """
    )


def downgrade() -> None:
    # 0001 creates todo_store_set_updated_at() and the trigger on it: nothing to undo.
    pass
