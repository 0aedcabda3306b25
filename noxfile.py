"""Developer sessions: `nox -s tests`, `tests_lowest`, `lint`, `typecheck`, `demo`, `bench`.

Needs only Python and `pip install nox`; each session builds its own virtualenv.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import nox

nox.options.sessions = ["tests", "tests_lowest", "lint", "typecheck"]
nox.options.reuse_existing_virtualenvs = True

LINT_TARGETS = ["todo_store", "tests", "alembic", "benchmarks", "examples", "noxfile.py"]


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite against a real PostgreSQL (and PgBouncer where it can run)."""
    session.install("-e", ".[dev]")
    session.run("pytest", *session.posargs)


@nox.session
def tests_lowest(session: nox.Session) -> None:
    """The suite on the lowest versions pyproject.toml admits (each `>=` bound, pinned)."""
    # The pins go on the command line: session.create_tmp() would point TMPDIR inside this
    # repository, where the plugin tests' generated projects would find its pyproject.toml.
    session.install("-e", ".[dev]", *_lowest_pins())
    session.run("pip", "list", "--format=freeze", silent=False)
    session.run("pytest", *session.posargs)


def _lowest_pins() -> list[str]:
    """`name==lower bound` for the runtime requirements of pyproject.toml, the pytest ones the
    plugin runs on (the database provisioning extras are tools, not API), the FastAPI extra's
    and OpenTelemetry's."""
    project = tomllib.loads(Path("pyproject.toml").read_text(encoding="utf-8"))["project"]
    extras = project["optional-dependencies"]
    requirements = (
        project["dependencies"]
        + [r for r in extras["testing"] if r.startswith("pytest")]
        + extras["fastapi"]
        + [r for r in extras["otel"] + extras["dev"] if r.startswith("opentelemetry")]
    )
    pins = []
    for requirement in requirements:
        match = re.match(r"([A-Za-z0-9_.-]+)(\[[^]]*\])?[^>]*>=([^,;\s]+)", requirement)
        if match:
            pins.append(f"{match[1]}=={match[3]}")
    return pins


@nox.session
def lint(session: nox.Session) -> None:
    """ruff: lint rules and formatting."""
    session.install("ruff>=0.8")
    session.run("ruff", "check", *LINT_TARGETS)
    session.run("ruff", "format", "--check", *LINT_TARGETS)


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict on the package and the example app."""
    session.install("-e", ".[dev]")
    session.run("mypy", "--strict", "todo_store", "examples")


@nox.session
def demo(session: nox.Session) -> None:
    """The main job: migrate, then run the schema checks and a repository tour.

    Uses DATABASE_URL when set, else an embedded PostgreSQL it starts and removes.
    """
    session.install("-e", ".[testing]")
    session.run("todo-store", "demo", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks (round trips, peers, scaling); writes benchmarks/results.md and results.png."""
    session.install("-e", ".[dev]")
    # Benchmark-only: the peer measured against, and the chart. Never runtime dependencies.
    session.install("advanced-alchemy>=1.12,<2", "matplotlib>=3.8")
    session.run("python", "-m", "benchmarks", *session.posargs)
