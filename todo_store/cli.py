"""The `todo-store` command: `doctor`, `demo`, `migrate`.

- `todo-store doctor [--json]` checks the configured database (`DATABASE_URL`, migrations on
  the direct URL) and prints one line per check; exit status 0 only if every check passed.
- `todo-store demo` migrates, runs the seed's Step 7 checks and a repository tour, all rolled
  back; without `DATABASE_URL` it uses an embedded PostgreSQL it starts and deletes.
- `todo-store migrate` upgrades the schema to head (on the direct URL).

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

from pydantic import ValidationError

from todo_store import migrations
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


def _cmd_doctor(args: argparse.Namespace) -> int:
    results = diagnose_from_env()
    print(render_json(results) if args.json else render_lines(results))
    return 0 if all(result.ok for result in results) else 1


async def _migrate(settings: Settings) -> str | None:
    await migrations.upgrade(settings)
    return await migrations.current_revision(settings)


def _cmd_migrate(_args: argparse.Namespace) -> int:
    try:
        settings = load_settings()
    except MissingDatabaseURL:
        print("✘ settings: DATABASE_URL is not set (environment or .env)")
        return 2
    except ValidationError as error:
        print(f"✘ settings: {settings_problem(error)}")
        return 2
    print(migrations.direct_settings(settings)[1])
    try:
        print(f"at revision {asyncio.run(_migrate(settings))} (head)")
    except REPORTABLE_ERRORS as error:
        print(f"✘ migrate: {describe_error(error, settings)}")
        return 1
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="todo-store", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    doctor = commands.add_parser("doctor", help="check the configured database, one line each")
    doctor.add_argument("--json", action="store_true", help="print a JSON list instead")
    doctor.set_defaults(run=_cmd_doctor)
    demo = commands.add_parser("demo", help="migrate, Step 7 checks, repository tour (rolled back)")
    demo.set_defaults(run=lambda _args: run_demo())
    migrate = commands.add_parser("migrate", help="upgrade the schema to head (direct URL)")
    migrate.set_defaults(run=_cmd_migrate)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = _parser().parse_args(argv)
    # Only warnings and errors: the migrations' INFO line is printed by the commands themselves.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if isinstance(sys.stdout, io.TextIOWrapper):  # a non-UTF-8 terminal must not crash on ✔
        sys.stdout.reconfigure(errors="replace")
    run: Callable[[argparse.Namespace], int] = args.run
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
