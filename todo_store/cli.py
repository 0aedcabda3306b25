"""The `todo-store` command: `doctor`, `demo`, `migrate`, `grant`.

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

Exit status, the same for every command: 0 success; 1 a check, the database or a migration
failed; 2 nothing to run on (DATABASE_URL missing, a setting invalid or a URL unparseable, an
unusable `--config`). Every failure is one line, never a traceback.

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
import os
import sys
from collections.abc import Callable
from pathlib import Path

from alembic.util import CommandError

from todo_store import __version__, migrations
from todo_store.binding import GrantRefused, grant
from todo_store.demo import run_demo
from todo_store.doctor import (
    EXIT_CONFIG,
    EXIT_FAILED,
    EXIT_OK,
    REPORTABLE_ERRORS,
    CheckResult,
    SettingsProblem,
    describe_error,
    diagnose,
    load_settings,
    render_json,
    render_lines,
    settings_check,
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
    config = _config(args)
    results: list[CheckResult]
    try:
        settings = load_settings()
    except SettingsProblem as problem:
        results, status = [settings_check(problem)], EXIT_CONFIG
    else:
        results = asyncio.run(diagnose(settings, config))
        status = EXIT_OK if all(result.ok for result in results) else EXIT_FAILED
    print(render_json(results) if args.json else render_lines(results))
    return status


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
    except SettingsProblem as problem:
        print(f"✘ settings: {problem}")
        return EXIT_CONFIG
    print(migrations.direct_settings(settings)[1])
    if config is not None:
        print(f"revisions: todo-store's and those listed in {config}")
    try:
        applied, heads = asyncio.run(_migrate(settings, config))
    except migrations.UnknownRevisions as unknown:
        print(f"✘ migrate: {unknown}")
        return EXIT_FAILED
    except _MIGRATION_ERRORS as error:
        print(f"✘ migrate: {describe_error(error, settings)}")
        return EXIT_FAILED
    for revision in applied:
        print(f"applied {revision.revision}: {revision.description}")
    head = ", ".join(heads)
    print(f"at head {head}" if applied else f"already at head {head}: nothing to apply")
    return EXIT_OK


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
    except SettingsProblem as problem:
        print(f"✘ settings: {problem}")
        return EXIT_CONFIG
    print(migrations.direct_settings(settings)[1].replace("migrations use", "grant uses", 1))
    try:
        granted = asyncio.run(_grant(settings, args.role))
    except GrantRefused as refused:
        print(f"✘ grant: {refused}")
        return EXIT_FAILED
    except _MIGRATION_ERRORS as error:
        print(f"✘ grant: {describe_error(error, settings)}")
        return EXIT_FAILED
    print(f"granted {args.role}: {'; '.join(granted)}")
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    return run_demo(config=_config(args))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="todo-store",
        description=__doc__.splitlines()[0],
        epilog="exit status: 0 success; 1 a check, the database or a migration failed; "
        "2 nothing to run on (a setting missing, invalid or unparseable; a bad --config)",
    )
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
        "doctor",
        parents=[with_config],
        help="check the configured database, one line each",
        description="Check the database DATABASE_URL names: connection, server, pooler, TLS, "
        "round trip, statement caching, row-level security, revision, drift and the schema's "
        "behaviours (in a "
        "transaction that is rolled back). One line per check; exit status 0 only if all pass.",
    )
    doctor.add_argument("--json", action="store_true", help="print a JSON list instead")
    doctor.set_defaults(run=_cmd_doctor)
    demo = commands.add_parser(
        "demo",
        parents=[with_config],
        help="migrate, then run the schema checks and a repository tour (rolled back)",
        description="Migrate the database DATABASE_URL names (without it: an embedded "
        "PostgreSQL, deleted on exit), then run the schema checks and a tour of the "
        "repositories, each in a transaction that is rolled back.",
    )
    demo.set_defaults(run=_cmd_demo)
    migrate = commands.add_parser(
        "migrate",
        parents=[with_config],
        help="upgrade the schema to head (direct URL); says what it applied",
        description="Upgrade the schema to head over the direct URL (DATABASE_URL_DIRECT, "
        "derived from a -pooler host, else DATABASE_URL) and list the revisions applied. "
        "Safe to run from several instances at once.",
    )
    migrate.set_defaults(run=_cmd_migrate)
    grant_command = commands.add_parser(
        "grant",
        help="give an existing role what the application needs at run time (direct URL,"
        " as the tables' owner); refuses a role that bypasses row-level security",
        description="Grant an existing role exactly what the application needs at run time: "
        "SELECT, INSERT, UPDATE and DELETE on the user-owned tables and USAGE on their "
        "sequences. Runs over the direct URL as the tables' owner. Refuses a superuser, a role "
        "with BYPASSRLS or a member of one, and the tables' owner: row-level security would "
        "not hold them. Put the role in DATABASE_URL afterwards.",
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
        status = run(args)
        sys.stdout.flush()  # here, so that a closed pipe is caught below, not at exit
    except _ConfigProblem:
        return EXIT_CONFIG
    except BrokenPipeError:
        # The reader went away (`todo-store doctor | head -1`): what it read is what it
        # wanted. Point stdout at devnull so the interpreter's final flush stays quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED
    return status


if __name__ == "__main__":
    raise SystemExit(main())
