"""The repositories against an in-memory model (hypothesis), and under real concurrency.

1. A rule-based state machine drives random operations of several users through `TaskRepo`
   and `UserRepo` on the real database and compares every user's view with a model after
   every step. Each example runs in its own transaction, rolled back in `teardown`. The
   machine is synchronous, so it drives the async calls through its own `asyncio.Runner` and
   its own engine, not the pytest event loop.
2. Concurrent `toggle`s and `upsert`s, each in its own committed unit of work (`store`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Coroutine
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, AsyncTransaction

from todo_store import (
    EmailTaken,
    Settings,
    TaskNotFound,
    TaskRepo,
    TodoStore,
    UserNotFound,
    UserRepo,
    create_engine,
)
from todo_store.schemas import TaskRecord, UserRecord

T = TypeVar("T")

USERS = ("sm_ann", "sm_bob", "sm_cat")
PAGE = 3
NEVER_ISSUED_ID = 2**63 - 1


@dataclass(frozen=True)
class Row:
    """What the model knows about a task."""

    title: str
    description: str | None
    completed: bool


def _row(task: TaskRecord) -> Row:
    return Row(task.title, task.description, task.completed)


titles = st.text(alphabet="ab xyz\t", min_size=1, max_size=12).filter(lambda s: s.strip())
descriptions = st.none() | st.text(alphabet="cd é\n", max_size=8)
user_ids = st.sampled_from(USERS)


class RepositoryMachine(RuleBasedStateMachine):
    """Random work of three users, checked against `self.model` after every step."""

    runner: ClassVar[asyncio.Runner]
    engine: ClassVar[AsyncEngine]
    examples: ClassVar[int] = 0
    steps: ClassVar[int] = 0

    def __init__(self) -> None:
        super().__init__()
        type(self).examples += 1
        self.connection: AsyncConnection = self.run(self.engine.connect())
        self.transaction: AsyncTransaction = self.run(self.connection.begin())
        self.session = AsyncSession(
            bind=self.connection,
            join_transaction_mode="create_savepoint",
            expire_on_commit=False,
            autoflush=False,
        )
        self.tasks = TaskRepo(self.session)
        self.users = UserRepo(self.session)
        # user id -> {task id -> Row}; a user missing from the dict does not exist.
        self.model: dict[str, dict[int, Row]] = {}
        self.issued: list[int] = []  # every task id ever created in this example

    def run(self, awaitable: Awaitable[T]) -> T:
        """Await on the machine's own event loop."""

        async def wait() -> T:
            return await awaitable

        return self.runner.run(wait())

    def teardown(self) -> None:
        self.run(self.session.close())
        self.run(self.transaction.rollback())
        self.run(self.connection.close())

    # ------------------------------------------------------------------------- helpers

    def _step(self) -> None:
        type(self).steps += 1

    def _owner(self, task_id: int) -> str | None:
        return next((u for u, rows in self.model.items() if task_id in rows), None)

    def _candidate_ids(self) -> list[int]:
        return [*self.issued, NEVER_ISSUED_ID]

    def _expect_not_found(
        self, user: str, task_id: int, coroutine: Coroutine[Any, Any, Any]
    ) -> None:
        """The call must raise `TaskNotFound`, and the real owner's task must be unchanged."""
        with pytest.raises(TaskNotFound) as caught:
            self.run(coroutine)
        assert type(caught.value) is TaskNotFound
        assert (caught.value.user_id, caught.value.task_id) == (user, task_id)
        owner = self._owner(task_id)
        if owner is not None:
            assert _row(self.run(self.tasks.get(owner, task_id))) == self.model[owner][task_id]

    def _in_savepoint(self, coroutine: Coroutine[Any, Any, T]) -> T:
        async def attempt() -> T:
            async with self.session.begin_nested():
                return await coroutine

        return self.run(attempt())

    def _upsert(self, user: str, email: str, name: str) -> UserRecord:
        return self.run(self.users.upsert(user, email=email, name=name))

    # --------------------------------------------------------------------------- rules

    @initialize()
    def create_users(self) -> None:
        for user in USERS:
            created = self._upsert(user, f"{user}@Example.com", user.title())
            assert created.email == f"{user}@example.com"
            self.model[user] = {}

    @rule(user=user_ids, title=titles, description=descriptions)
    def create(self, user: str, title: str, description: str | None) -> None:
        self._step()
        if user not in self.model:
            with pytest.raises(UserNotFound):
                self._in_savepoint(self.tasks.create(user, title=title, description=description))
            return
        task = self.run(self.tasks.create(user, title=title, description=description))
        assert task.user_id == user
        assert all(task.id > issued for issued in self.issued)  # sequential, never reused
        self.issued.append(task.id)
        self.model[user][task.id] = Row(title.strip(), description, False)
        assert _row(task) == self.model[user][task.id]

    @rule(user=user_ids, data=st.data())
    def get(self, user: str, data: st.DataObject) -> None:
        self._step()
        task_id = data.draw(st.sampled_from(self._candidate_ids()), label="task_id")
        if task_id in self.model.get(user, {}):
            assert _row(self.run(self.tasks.get(user, task_id))) == self.model[user][task_id]
        else:
            self._expect_not_found(user, task_id, self.tasks.get(user, task_id))

    @rule(
        user=user_ids,
        data=st.data(),
        changes=st.fixed_dictionaries(
            {},
            optional={"title": titles, "description": descriptions, "completed": st.booleans()},
        ),
    )
    def update(self, user: str, data: st.DataObject, changes: dict[str, Any]) -> None:
        self._step()
        task_id = data.draw(st.sampled_from(self._candidate_ids()), label="task_id")
        call = self.tasks.update(user, task_id, **changes)
        if task_id not in self.model.get(user, {}):
            self._expect_not_found(user, task_id, call)
            return
        old = self.model[user][task_id]
        new = Row(
            changes["title"].strip() if "title" in changes else old.title,
            changes.get("description", old.description),
            changes.get("completed", old.completed),
        )
        assert _row(self.run(call)) == new
        self.model[user][task_id] = new

    @rule(user=user_ids, data=st.data(), completed=st.booleans())
    def set_completed(self, user: str, data: st.DataObject, completed: bool) -> None:
        self._step()
        task_id = data.draw(st.sampled_from(self._candidate_ids()), label="task_id")
        call = self.tasks.set_completed(user, task_id, completed)
        if task_id not in self.model.get(user, {}):
            self._expect_not_found(user, task_id, call)
            return
        old = self.model[user][task_id]
        self.model[user][task_id] = Row(old.title, old.description, completed)
        assert _row(self.run(call)) == self.model[user][task_id]

    @rule(user=user_ids, data=st.data())
    def toggle(self, user: str, data: st.DataObject) -> None:
        self._step()
        task_id = data.draw(st.sampled_from(self._candidate_ids()), label="task_id")
        call = self.tasks.toggle(user, task_id)
        if task_id not in self.model.get(user, {}):
            self._expect_not_found(user, task_id, call)
            return
        old = self.model[user][task_id]
        self.model[user][task_id] = Row(old.title, old.description, not old.completed)
        assert _row(self.run(call)) == self.model[user][task_id]

    @rule(user=user_ids, data=st.data())
    def delete(self, user: str, data: st.DataObject) -> None:
        self._step()
        task_id = data.draw(st.sampled_from(self._candidate_ids()), label="task_id")
        call = self.tasks.delete(user, task_id)
        if task_id not in self.model.get(user, {}):
            self._expect_not_found(user, task_id, call)
            return
        assert self.run(call) is None
        del self.model[user][task_id]

    @precondition(lambda self: len(self.model) >= 2 and any(self.model.values()))
    @rule(data=st.data())
    def foreign_access(self, data: st.DataObject) -> None:
        """User A tries each single-task call on a task of user B: all look like 'missing'."""
        self._step()
        owner = data.draw(st.sampled_from([u for u, rows in self.model.items() if rows]))
        task_id = data.draw(st.sampled_from(sorted(self.model[owner])), label="task_id")
        intruder = data.draw(st.sampled_from([u for u in USERS if u != owner]), label="intruder")
        repo = self.tasks
        for call in (
            lambda: repo.get(intruder, task_id),
            lambda: repo.update(intruder, task_id, title="mine now", completed=True),
            lambda: repo.update(intruder, task_id),
            lambda: repo.set_completed(intruder, task_id, False),
            lambda: repo.toggle(intruder, task_id),
            lambda: repo.delete(intruder, task_id),
        ):
            self._expect_not_found(intruder, task_id, call())

    @rule(user=user_ids)
    def complete_all(self, user: str) -> None:
        self._step()
        rows = self.model.get(user, {})
        expected = sum(not row.completed for row in rows.values())
        assert self.run(self.tasks.complete_all(user)) == expected
        for task_id, row in rows.items():
            rows[task_id] = Row(row.title, row.description, True)

    @rule(user=user_ids)
    def delete_completed(self, user: str) -> None:
        self._step()
        rows = self.model.get(user, {})
        done = [task_id for task_id, row in rows.items() if row.completed]
        assert self.run(self.tasks.delete_completed(user)) == len(done)
        for task_id in done:
            del rows[task_id]

    @rule(user=user_ids)
    def delete_user(self, user: str) -> None:
        self._step()
        if user not in self.model:
            with pytest.raises(UserNotFound):
                self.run(self.users.delete(user))
            return
        assert self.run(self.users.delete(user)) is None
        del self.model[user]
        with pytest.raises(UserNotFound):
            self.run(self.users.get(user))

    @rule(user=user_ids, name=st.sampled_from(["Ann", "Bob", " Cat ", "Dee"]), shout=st.booleans())
    def upsert_user(self, user: str, name: str, shout: bool) -> None:
        """Create a deleted user again, or rename an existing one (email in any case)."""
        self._step()
        email = f"{user}@example.com"
        saved = self._upsert(user, email.upper() if shout else email, name)
        assert (saved.id, saved.email, saved.name) == (user, email, name.strip())
        self.model.setdefault(user, {})
        assert self.run(self.users.get_by_email(email.upper())).id == user

    @rule(user=user_ids, data=st.data())
    def take_someone_elses_email(self, user: str, data: st.DataObject) -> None:
        self._step()
        victim = data.draw(st.sampled_from([u for u in USERS if u != user]), label="victim")
        if victim not in self.model:
            return
        with pytest.raises(EmailTaken):
            self._in_savepoint(self.users.upsert(user, email=f"{victim}@EXAMPLE.COM", name="Thief"))
        if user in self.model:
            assert self.run(self.users.get(user)).email == f"{user}@example.com"
        else:
            with pytest.raises(UserNotFound):
                self.run(self.users.get(user))

    # ---------------------------------------------------------------------- invariant

    @invariant()
    def every_users_view_matches_the_model(self) -> None:
        for user in USERS:
            rows = self.model.get(user, {})
            for completed in (None, True, False):
                expected = {
                    task_id: row
                    for task_id, row in rows.items()
                    if completed is None or row.completed is completed
                }
                assert self.run(self.tasks.count_for(user, completed=completed)) == len(expected)
                assert self._walk_pages(user, completed) == [
                    (task_id, expected[task_id]) for task_id in sorted(expected, reverse=True)
                ]

    def _walk_pages(self, user: str, completed: bool | None) -> list[tuple[int, Row]]:
        walked: list[tuple[int, Row]] = []
        before: int | None = None
        while True:
            page = self.run(
                self.tasks.list_for(user, completed=completed, limit=PAGE, before=before)
            )
            assert len(page) <= PAGE
            assert all(task.user_id == user for task in page)
            walked.extend((task.id, _row(task)) for task in page)
            if len(page) < PAGE:
                return walked
            before = page[-1].id


def test_repositories_match_the_model(todo_store_settings: Settings) -> None:
    with asyncio.Runner(loop_factory=asyncio.new_event_loop) as runner:
        engine = create_engine(todo_store_settings)
        machine = type(
            "BoundRepositoryMachine",
            (RepositoryMachine,),
            {"runner": runner, "engine": engine, "examples": 0, "steps": 0},
        )
        try:
            run_state_machine_as_test(
                machine,
                settings=settings(
                    max_examples=40,
                    stateful_step_count=30,
                    deadline=None,
                    database=None,
                    suppress_health_check=[HealthCheck.too_slow],
                ),
            )
        finally:
            runner.run(engine.dispose())
    print(f"\nstate machine: {machine.examples} examples, {machine.steps} steps")
    assert machine.examples >= 40
    assert machine.steps > machine.examples  # examples did run rules, not only setup


# ----------------------------------------------------------------------- real concurrency


async def _delete_users(store: TodoStore, user_ids: list[str]) -> None:
    async with store.session() as s:
        await s.execute(text("DELETE FROM users WHERE id = ANY(:ids)"), {"ids": user_ids})


@pytest.mark.parametrize(("toggles", "flipped"), [(50, False), (51, True)])
async def test_concurrent_toggles_never_lose_one(
    store: TodoStore, new_user_id: str, toggles: int, flipped: bool
) -> None:
    async with store.session() as s:
        await UserRepo(s).upsert(new_user_id, email=f"{new_user_id}@example.com", name="T")
        task_id = (await TaskRepo(s).create(new_user_id, title="flip me")).id

    async def toggle_once() -> bool:
        async with store.session() as s:
            return (await TaskRepo(s).toggle(new_user_id, task_id)).completed

    try:
        results = await asyncio.gather(*(toggle_once() for _ in range(toggles)))

        # Serialised by the row lock: the returned states alternate True, False, True, ...
        assert results.count(True) == (toggles + 1) // 2
        assert results.count(False) == toggles // 2
        async with store.session() as s:
            assert (await TaskRepo(s).get(new_user_id, task_id)).completed is flipped
    finally:
        await _delete_users(store, [new_user_id])


async def test_concurrent_upserts_of_one_email_let_exactly_one_win(
    store: TodoStore, new_user_id: str
) -> None:
    email = f"race.{new_user_id}@example.com"
    ids = [f"{new_user_id}_{n:02d}" for n in range(20)]

    async def upsert(n: int, user_id: str) -> UserRecord:
        spelling = email.upper() if n % 2 else email  # the same email, in either case
        async with store.session() as s:
            return await UserRepo(s).upsert(user_id, email=spelling, name=f"Racer {n}")

    try:
        results = await asyncio.gather(
            *(upsert(n, user_id) for n, user_id in enumerate(ids)), return_exceptions=True
        )

        winners = [r for r in results if isinstance(r, UserRecord)]
        losers = [r for r in results if isinstance(r, EmailTaken)]
        assert len(winners) == 1, results
        assert len(losers) == 19, results
        async with store.session() as s:
            assert (await UserRepo(s).get_by_email(email)).id == winners[0].id
            stored = await s.scalar(
                text("SELECT count(*) FROM users WHERE id = ANY(:ids) OR email = :email"),
                {"ids": ids, "email": email},
            )
            assert stored == 1
    finally:
        await _delete_users(store, ids)
