"""The `todo-store` command: `doctor`, `demo`, `migrate`.

- `todo-store doctor [--json]` checks the configured database (`DATABASE_URL`, migrations on
  the direct URL) and prints one line per check; exit status 0 only if every check passed.
- `todo-store demo` migrates, runs the schema checks and a repository tour, all rolled back;
  without `DATABASE_URL` it uses an embedded PostgreSQL it starts and deletes.
- `todo-store migrate` upgrades the schema to head (on the direct URL) and says which
  revisions it applied, or that the database was already at head.
- `todo-store grant ROLE` gives an existing role exactly what the application needs at run
  time (DML on the user-owned tables, their sequences), over the direct URL as the tables'
  owner; it refuses a role that could bypass row-level security.
- `todo-store --version` prints the installed version.

Each command uses the package's migrations, plus an application's own revisions when an
`alembic.ini` is in the working directory or given with `--config PATH` (see
`todo_store.migrations.alembic_config`); doctor then compares against that head and models.

Guarantees: nothing printed contains a password (URLs are shown through `urls.mask`, error
messages are redacted); doctor and demo write nothing that outlives their transactions except
the schema `demo` and `migrate` migrate to head.

This module parses arguments and dispatches; `doctor` and `demo` do the work.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from alembic.util import CommandError
from pydantic import ValidationError

from todo_store import __version__, migrations
from todo_store.binding import GrantRefused, grant
from todo_store.demo import run_demo
from todo_store.doctor import (
    REPORTABLE_ERRORS,
    MissingDatabaseURL,
    describe_error,
    diagnose_from_env,
    load_settings,
    render_json,
    render_lines,
    settings_problem,
)
from todo_store.settings import Settings


class _ConfigProblem(Exception):
    """The alembic.ini to use cannot be used; already reported."""


def _config(args: argparse.Namespace) -> Path | None:
    """The alembic.ini the command uses (`--config`, else ./alembic.ini), checked."""
    try:
        path = migrations.find_config(args.config)
        if path is not None:
            migrations.script_directory(path)
    except (migrations.MigrationConfigError, CommandError) as error:
        print(f"✘ config: {error}")
        raise _ConfigProblem from None
    return path


def _cmd_doctor(args: argparse.Namespace) -> int:
    results = diagnose_from_env(_config(args))
    print(render_json(results) if args.json else render_lines(results))
    return 0 if all(result.ok for result in results) else 1


# Failures a command reports on one line: the database's, and alembic's (e.g. a revision the
# migrations do not have, or an application's models that do not import).
_MIGRATION_ERRORS = (*REPORTABLE_ERRORS, CommandError, migrations.MigrationConfigError)


async def _migrate(
    settings: Settings, config: Path | None
) -> tuple[list[migrations.AppliedRevision], tuple[str, ...]]:
    applied = await migrations.upgrade(settings, config=config)
    return applied, await migrations.current_heads(settings)


def _cmd_migrate(args: argparse.Namespace) -> int:
    config = _config(args)
    try:
        settings = load_settings()
    except MissingDatabaseURL:
        print("✘ settings: DATABASE_URL is not set (environment or .env)")
        return 2
    except ValidationError as error:
        print(f"✘ settings: {settings_problem(error)}")
        return 2
    print(migrations.direct_settings(settings)[1])
    if config is not None:
        print(f"revisions: todo-store's and those listed in {config}")
    try:
        applied, heads = asyncio.run(_migrate(settings, config))
    except migrations.UnknownRevisions as unknown:
        print(f"✘ migrate: {unknown}")
        return 1
    except _MIGRATION_ERRORS as error:
        print(f"✘ migrate: {describe_error(error, settings)}")
        return 1
    for revision in applied:
        print(f"applied {revision.revision}: {revision.description}")
    head = ", ".join(heads)
    print(f"at head {head}" if applied else f"already at head {head}: nothing to apply")
    return 0


async def _grant(settings: Settings, role: str) -> list[str]:
    engine = migrations.create_migration_engine(settings)
    try:
        async with engine.begin() as conn:
            return await grant(conn, role)
    finally:
        await engine.dispose()


def _cmd_grant(args: argparse.Namespace) -> int:
    try:
        settings = load_settings()
    except MissingDatabaseURL:
        print("✘ settings: DATABASE_URL is not set (environment or .env)")
        return 2
    except ValidationError as error:
        print(f"✘ settings: {settings_problem(error)}")
        return 2
    print(migrations.direct_settings(settings)[1].replace("migrations use", "grant uses", 1))
    try:
        granted = asyncio.run(_grant(settings, args.role))
    except GrantRefused as refused:
        print(f"✘ grant: {refused}")
        return 1
    except _MIGRATION_ERRORS as error:
        print(f"✘ grant: {describe_error(error, settings)}")
        return 1
    print(f"granted {args.role}: {'; '.join(granted)}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    return run_demo(config=_config(args))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="todo-store", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"todo-store {__version__}")
    with_config = argparse.ArgumentParser(add_help=False)
    with_config.add_argument(
        "-c",
        "--config",
        metavar="PATH",
        help="an alembic.ini listing your own revisions next to todo-store's"
        " (default: ./alembic.ini if there is one)",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    doctor = commands.add_parser(
        "doctor", parents=[with_config], help="check the configured database, one line each"
    )
    doctor.add_argument("--json", action="store_true", help="print a JSON list instead")
    doctor.set_defaults(run=_cmd_doctor)
    demo = commands.add_parser(
        "demo",
        parents=[with_config],
        help="migrate, then run the schema checks and a repository tour (rolled back)",
    )
    demo.set_defaults(run=_cmd_demo)
    migrate = commands.add_parser(
        "migrate",
        parents=[with_config],
        help="upgrade the schema to head (direct URL); says what it applied",
    )
    migrate.set_defaults(run=_cmd_migrate)
    grant_command = commands.add_parser(
        "grant",
        help="give an existing role what the application needs at run time (direct URL,"
        " as the tables' owner); refuses a role that bypasses row-level security",
    )
    grant_command.add_argument("role", metavar="ROLE", help="the role in DATABASE_URL")
    grant_command.set_defaults(run=_cmd_grant)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = _parser().parse_args(argv)
    # Only warnings and errors: the migrations' INFO line is printed by the commands themselves.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if isinstance(sys.stdout, io.TextIOWrapper):  # a non-UTF-8 terminal must not crash on ✔
        sys.stdout.reconfigure(errors="replace")
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except _ConfigProblem:
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
