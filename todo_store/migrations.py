"""Run the Alembic migrations from code: upgrade, downgrade, check, current revision.

Migrations always use the direct (unpooled) URL: `DATABASE_URL_DIRECT`, else the URL derived
from a Neon `-pooler` host, else `DATABASE_URL`. Concurrent upgrades (several instances
booting at once) serialise on a transaction-scoped advisory lock: one applies, the others
then find the schema at head. DDL waits at most `migration_lock_timeout` (at least 1 ms) for a
table lock; offline SQL (`alembic upgrade head --sql`) carries the same lock and timeout.

An application keeps its own revisions on top of the package's with an `alembic.ini` (see
`alembic_config`): every function here takes `config=` (the path of that file); without it,
only the package's migrations are used.
"""

from __future__ import annotations

import importlib
import io
import logging
import math
import os
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext, MigrationInfo
from alembic.script import Script, ScriptDirectory
from alembic.script.revision import RevisionError
from alembic.util import CommandError
from sqlalchemy import Connection, MetaData
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from todo_store.engine import add_store_events, connect_args_for
from todo_store.models import Base
from todo_store.settings import Settings
from todo_store.urls import direct_url, is_pooler_host, mask

log = logging.getLogger("todo_store.migrations")

# pg_advisory_xact_lock key: the first 8 bytes of "todo_store" read as a signed bigint, so
# it will not collide with another application's lock by accident.
MIGRATION_LOCK_KEY = int.from_bytes(b"todo_sto", "big", signed=True)

# How an alembic.ini names the package's migrations: Alembic's "package:path" resource form,
# so the same file works wherever the package is installed.
PACKAGE_MIGRATIONS = "todo_store:_alembic"
CONFIG_FILE_NAME = "alembic.ini"
# The alembic.ini key naming the application's models, for `check` and `doctor`'s drift.
TARGET_METADATA_KEY = "target_metadata"

ConfigPath = str | os.PathLike[str]


class MigrationConfigError(Exception):
    """An `alembic.ini` the migrations cannot use; the message names the file and the fix."""


class UnknownRevisions(MigrationConfigError):
    """The database is at revisions the migrations in use do not have: an application's,
    run without its `alembic.ini`. Migrating cannot fix that; using the file does."""

    def __init__(self, revisions: Sequence[str], config: ConfigPath | None) -> None:
        known_to = config or "todo-store's own migrations"
        super().__init__(
            f"the database is at {', '.join(revisions)}, which is not in {known_to}: run in"
            " your application's directory (its alembic.ini) or pass --config PATH"
        )
        self.revisions = list(revisions)


@dataclass(frozen=True)
class AppliedRevision:
    """One revision an upgrade applied: its id and the first line of its docstring."""

    revision: str
    description: str


def package_script_location() -> Path:
    """Where the package's migration environment (env.py, versions/) is on this machine."""
    here = Path(__file__).resolve().parent
    packaged = here / "_alembic"  # inside a built wheel
    return packaged if packaged.is_dir() else here.parent / "alembic"


def find_config(explicit: ConfigPath | None = None, cwd: Path | None = None) -> Path | None:
    """The `alembic.ini` to use: `explicit` (which must exist), else one in `cwd`, else None."""
    if explicit is not None:
        path = Path(explicit)
        if not path.is_file():
            raise MigrationConfigError(f"{path}: no such file")
        return path
    candidate = (cwd or Path.cwd()) / CONFIG_FILE_NAME
    return candidate if candidate.is_file() else None


def alembic_config(settings: Settings | None = None, config: ConfigPath | None = None) -> Config:
    """An Alembic `Config`: the package's migrations only, or the `alembic.ini` at `config`.

    An application's `alembic.ini` names the package's migrations as `todo_store:_alembic`
    (`script_location`) and `todo_store:_alembic/versions` (in `version_locations`, next to
    its own folder). Raises `MigrationConfigError` if the file lacks either.
    """
    # Alembic's commands print to stdout (e.g. check's "No new upgrade operations detected.");
    # callers of this module get return values and exceptions instead.
    if config is None:
        alembic = Config(stdout=io.StringIO())
        alembic.set_main_option("script_location", str(package_script_location()))
    else:
        alembic = Config(file_=str(config), stdout=io.StringIO())
        _point_at_package(alembic, Path(config))
    if settings is not None:
        alembic.attributes["settings"] = settings
    return alembic


def _point_at_package(alembic: Config, path: Path) -> None:
    """Replace `todo_store:_alembic` by the package's real location (also in a source tree)."""
    parser, section = alembic.file_config, alembic.config_ini_section
    if not parser.has_section(section) or not parser.get(section, "script_location", fallback=""):
        raise MigrationConfigError(
            f"{path} has no script_location: add `script_location = {PACKAGE_MIGRATIONS}`"
        )
    location = str(package_script_location()).replace("%", "%%")
    for key in ("script_location", "version_locations"):
        raw = parser.get(section, key, raw=True, fallback=None)
        if raw and PACKAGE_MIGRATIONS in raw:
            parser.set(section, key, raw.replace(PACKAGE_MIGRATIONS, location))


def script_directory(config: ConfigPath | None = None) -> ScriptDirectory:
    """The revisions `config` sees, checked to include every revision the package ships.

    Raises `MigrationConfigError` naming the file and what to change.
    """
    scripts = ScriptDirectory.from_config(alembic_config(config=config))
    if config is None:
        return scripts
    package = _package_revisions()
    missing_package = MigrationConfigError(
        f"{config} does not include todo-store's migrations (revision "
        f"{', '.join(sorted(package))}): list `{PACKAGE_MIGRATIONS}/versions` in version_locations"
    )
    try:
        with warnings.catch_warnings():  # alembic warns, then fails: the error says it all
            warnings.simplefilter("ignore")
            known = {script.revision for script in scripts.walk_revisions()}
    except KeyError as error:  # a down_revision no file has
        if not _lists_package_versions(scripts):
            raise missing_package from None
        raise MigrationConfigError(
            f"{config}: a revision names down_revision {error} but no revision file has it"
        ) from None
    except (CommandError, RevisionError) as error:
        raise MigrationConfigError(f"{config}: {error}") from None
    if package - known:
        raise missing_package
    return scripts


def _lists_package_versions(scripts: ScriptDirectory) -> bool:
    package_versions = (package_script_location() / "versions").resolve()
    locations = scripts.version_locations or [str(Path(scripts.dir) / "versions")]
    return any(Path(location).resolve() == package_versions for location in locations)


def _package_revisions() -> set[str]:
    scripts = ScriptDirectory.from_config(alembic_config())
    return {script.revision for script in scripts.walk_revisions()}


def head_revisions(config: ConfigPath | None = None) -> tuple[str, ...]:
    """Every head the migrations have (one, unless an application's revisions branch off)."""
    return tuple(sorted(script_directory(config).get_heads()))


def head_revision(config: ConfigPath | None = None) -> str | None:
    """The newest revision the migrations have; `CommandError` if there are several heads."""
    return script_directory(config).get_current_head()


def target_metadata(alembic: Config) -> MetaData | list[MetaData]:
    """The models `check` compares with the database.

    The package's `Base.metadata`, plus what the `target_metadata = module:attribute` line of
    the `alembic.ini` names (an application's `MetaData`; if it is the package's own, extended
    with the application's tables or columns, it is used alone).
    """
    reference = alembic.get_main_option(TARGET_METADATA_KEY)
    if not reference:
        return Base.metadata
    module_name, _, attribute = reference.partition(":")
    try:
        found: Any = importlib.import_module(module_name.strip())
        for part in attribute.strip().split(".") if attribute.strip() else []:
            found = getattr(found, part)
    except (ImportError, AttributeError) as error:
        raise MigrationConfigError(
            f"{TARGET_METADATA_KEY} = {reference}: {type(error).__name__}: {error}"
        ) from None
    if not isinstance(found, MetaData):
        raise MigrationConfigError(
            f"{TARGET_METADATA_KEY} = {reference} is a {type(found).__name__}, not a MetaData"
        )
    return found if found is Base.metadata else [Base.metadata, found]


def lock_timeout_ms(seconds: float) -> int:
    """`seconds` as whole milliseconds, rounded up: PostgreSQL reads 0 as "no limit"."""
    # round() first: 0.1 * 1000 is 100.00000000000001, which must stay 100.
    return max(1, math.ceil(round(seconds * 1000, 6)))


def lock_statements(settings: Settings) -> list[str]:
    """What every migration transaction runs first, online and in offline SQL alike."""
    # The lock_timeout is set only after the advisory lock is held: waiting for another
    # instance's migration is expected; waiting forever behind a long application
    # transaction is not.
    return [
        f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK_KEY})",
        f"SET LOCAL lock_timeout = '{lock_timeout_ms(settings.migration_lock_timeout)}ms'",
    ]


def record_applied(alembic: Config) -> Callable[..., None]:
    """An `on_version_apply` hook adding each applied revision to `attributes["applied"]`."""
    applied: list[AppliedRevision] = alembic.attributes.setdefault("applied", [])

    def hook(*, step: MigrationInfo, **_: Any) -> None:
        if step.is_upgrade and step.is_migration:
            applied.extend(
                AppliedRevision(script.revision, script.doc.strip())
                for script in step.up_revisions
                if isinstance(script, Script)
            )

    return hook


def direct_settings(settings: Settings) -> tuple[Settings, str]:
    """`settings` pointed at the direct URL, and a line saying which URL was chosen and why."""
    if settings.database_url_direct is not None:
        url, why = settings.database_url_direct.get_secret_value(), "DATABASE_URL_DIRECT"
    elif is_pooler_host(settings.database_url.get_secret_value()):
        url = direct_url(settings.database_url.get_secret_value()).render_as_string(
            hide_password=False
        )
        why = "derived from the -pooler host in DATABASE_URL"
    else:
        url, why = settings.database_url.get_secret_value(), "DATABASE_URL"
    chosen = settings.model_copy(update={"database_url": type(settings.database_url)(url)})
    return chosen, f"migrations use {mask(url)} ({why})"


def create_migration_engine(settings: Settings) -> AsyncEngine:
    """A pool-less engine on the direct URL; DDL may run longer than a request's timeout."""
    chosen, line = direct_settings(settings)
    log.info(line)
    url, connect_args = connect_args_for(chosen)
    connect_args["command_timeout"] = None
    engine = create_async_engine(url, connect_args=connect_args, poolclass=NullPool)
    add_store_events(engine)
    return engine


def run_migrations(connection: Connection, settings: Settings, run: Callable[[], None]) -> None:
    """Run Alembic's migrations on `connection`, serialised and with a bounded lock wait."""
    with nullcontext() if connection.in_transaction() else connection.begin():
        for statement in lock_statements(settings):
            connection.exec_driver_sql(statement)
        run()


async def _with_alembic(
    target: AsyncEngine | AsyncConnection, alembic: Config, action: Callable[[Config], Any]
) -> Any:
    def invoke(sync_connection: Connection) -> Any:
        alembic.attributes["connection"] = sync_connection
        return action(alembic)

    if isinstance(target, AsyncConnection):
        return await target.run_sync(invoke)
    async with target.connect() as connection:
        return await connection.run_sync(invoke)


async def upgrade(
    settings: Settings,
    revision: str = "heads",
    *,
    on: AsyncEngine | AsyncConnection | None = None,
    config: ConfigPath | None = None,
) -> list[AppliedRevision]:
    """Apply migrations up to `revision` on the direct URL (or on the engine/connection given).

    Returns the revisions applied, oldest first: empty if the database was already there.
    Raises `UnknownRevisions` (before changing anything) if the database is at a revision
    these migrations do not have.
    """

    def refuse_unknown_then_upgrade(alembic: Config) -> None:
        connection: Connection = alembic.attributes["connection"]
        ours = not connection.in_transaction()
        current = MigrationContext.configure(connection).get_current_heads()
        if ours:  # reading began a transaction: end it, or the upgrade would run inside it
            connection.rollback()
        unknown = unknown_revisions(current, config)
        if unknown:
            raise UnknownRevisions(unknown, config)
        command.upgrade(alembic, revision)

    alembic = await _run(settings, on, config, refuse_unknown_then_upgrade)
    applied: list[AppliedRevision] = alembic.attributes.get("applied", [])
    return applied


async def downgrade(
    settings: Settings,
    revision: str = "base",
    *,
    on: AsyncEngine | AsyncConnection | None = None,
    config: ConfigPath | None = None,
) -> None:
    """Revert migrations down to `revision`."""
    await _run(settings, on, config, lambda cfg: command.downgrade(cfg, revision))


async def check(
    settings: Settings,
    *,
    on: AsyncEngine | AsyncConnection | None = None,
    config: ConfigPath | None = None,
) -> None:
    """Raise `alembic.util.exc.AutogenerateDiffsDetected` if the models and schema differ.

    The models are the package's, plus those `config`'s `target_metadata` line names.
    """
    await _run(settings, on, config, command.check)


async def current_heads(
    settings: Settings, *, on: AsyncEngine | AsyncConnection | None = None
) -> tuple[str, ...]:
    """The revisions the database is at (empty for a database never migrated)."""

    def read(sync_connection: Connection) -> tuple[str, ...]:
        return tuple(sorted(MigrationContext.configure(sync_connection).get_current_heads()))

    if isinstance(on, AsyncConnection):
        return await on.run_sync(read)
    engine = on or create_migration_engine(settings)
    try:
        async with engine.connect() as connection:
            return await connection.run_sync(read)
    finally:
        if on is None:
            await engine.dispose()


async def current_revision(
    settings: Settings, *, on: AsyncEngine | AsyncConnection | None = None
) -> str | None:
    """The revision the database is at (`None` for an empty database; several heads: ', ')."""
    heads = await current_heads(settings, on=on)
    return ", ".join(heads) if heads else None


def unknown_revisions(current: Sequence[str], config: ConfigPath | None = None) -> list[str]:
    """The revisions in `current` that `config`'s migrations do not have (an app's, say)."""
    scripts = script_directory(config)
    unknown = []
    for revision in current:
        try:
            scripts.get_revision(revision)
        except (CommandError, RevisionError):
            unknown.append(revision)
    return unknown


async def _run(
    settings: Settings,
    on: AsyncEngine | AsyncConnection | None,
    config: ConfigPath | None,
    action: Callable[[Config], Any],
) -> Config:
    alembic = alembic_config(settings, config)
    if config is not None:
        script_directory(config)  # a clear MigrationConfigError before touching the database
    if on is not None:
        await _with_alembic(on, alembic, action)
        return alembic
    engine = create_migration_engine(settings)
    try:
        await _with_alembic(engine, alembic, action)
    finally:
        await engine.dispose()
    return alembic
