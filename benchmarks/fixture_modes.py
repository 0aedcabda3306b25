"""`python -m benchmarks.fixture_modes [--tests N]`: what each isolation mode of the `todo_store`
fixture costs per test.

Generates a small downstream project whose tests each make one unit of work (a user and a
task), alternately in the default rollback mode and marked `@pytest.mark.todo_store_database`
(a database of the test's own, copied from the migrated template), runs pytest on it in a
child process, and reads each test's setup + call + teardown time from pytest's own reports.
The first test of each mode is left out: it also pays for the run's one-time setup (server,
template, migrations), reported separately. Uses the server the tests use
(`TODO_STORE_TEST_DATABASE_URL`, else Docker, else embedded).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

RECORDER = """
import json, os

_times = {}


def pytest_runtest_logreport(report):
    _times.setdefault(report.nodeid, 0.0)
    _times[report.nodeid] += report.duration


def pytest_sessionfinish(session):
    with open(os.environ["FIXTURE_MODES_OUT"], "w") as out:
        json.dump(_times, out)
"""

TESTS = """
import pytest
from todo_store import TaskRepo, UserRepo

N = {n}


async def one_unit_of_work(store, n):
    async with store.session() as session:
        await UserRepo(session).upsert(f"u_{{n}}", email=f"u{{n}}@example.com", name="U")
        await TaskRepo(session).create(f"u_{{n}}", title="Buy milk")


@pytest.mark.parametrize("n", range(N))
async def test_rollback(todo_store, n):
    await one_unit_of_work(todo_store, n)


@pytest.mark.todo_store_database
@pytest.mark.parametrize("n", range(N))
async def test_database(todo_store, n):
    await one_unit_of_work(todo_store, n)
"""

INI = """
[pytest]
asyncio_mode = auto
"""


def _alternate(ids: list[str]) -> list[str]:
    rollback = [i for i in ids if "test_rollback" in i]
    database = [i for i in ids if "test_database" in i]
    return [i for pair in zip(rollback, database, strict=True) for i in pair]


def measure(tests: int) -> dict[str, list[float]]:
    with tempfile.TemporaryDirectory(prefix="todo-store-fixture-modes-") as tmp:
        root = Path(tmp)
        (root / "conftest.py").write_text(RECORDER)
        (root / "test_modes.py").write_text(TESTS.format(n=tests))
        (root / "pytest.ini").write_text(INI)
        out = root / "times.json"
        ids = [
            f"test_modes.py::test_{mode}[{n}]"
            for mode in ("rollback", "database")
            for n in range(tests)
        ]
        subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *_alternate(ids)],
            cwd=root,
            check=True,
            env={**os.environ, "FIXTURE_MODES_OUT": str(out)},
        )
        times: dict[str, float] = json.loads(out.read_text())
    return {
        mode: [seconds for node, seconds in times.items() if f"test_{mode}[" in node]
        for mode in ("rollback", "database")
    }


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fixture_modes", description=__doc__)
    parser.add_argument("--tests", type=int, default=40, help="tests per mode")
    args = parser.parse_args(argv)
    by_mode = measure(args.tests)
    print(f"\n{args.tests} tests per mode, alternating; setup + call + teardown per test (ms)")
    print("| mode | first test | median of the others | p90 of the others |")
    print("|---|---|---|---|")
    for mode, times in by_mode.items():
        rest = sorted(times[1:])
        p90 = rest[int(0.9 * (len(rest) - 1))]
        print(
            f"| {mode} | {times[0] * 1000:.0f} | {statistics.median(rest) * 1000:.1f} "
            f"| {p90 * 1000:.1f} |"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
