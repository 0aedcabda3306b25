"""Stand-ins for the event-loop fixtures where pytest-asyncio is not running.

Registered by the plugin instead of `store_fixtures`, so a test that asks for one of these
fixtures fails with what to do, while every other test runs as if the plugin were absent.
"""

from __future__ import annotations

from typing import NoReturn

import pytest

_ADVICE = (
    "the {name} fixture runs on the test's event loop and needs pytest-asyncio, which is not "
    "running here: install the testing extra (pip install 'todo-store[testing]'), or remove "
    "'-p no:asyncio'"
)


def _unavailable(name: str) -> NoReturn:
    pytest.fail(_ADVICE.format(name=name), pytrace=False)


@pytest.fixture
def todo_store_engine() -> NoReturn:
    _unavailable("todo_store_engine")


@pytest.fixture
def todo_store_connection() -> NoReturn:
    _unavailable("todo_store_connection")


@pytest.fixture
def todo_store_session() -> NoReturn:
    _unavailable("todo_store_session")


@pytest.fixture
def todo_store() -> NoReturn:
    _unavailable("todo_store")
