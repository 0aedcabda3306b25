"""Configuration from the environment and `.env`, and secrets kept out of sight."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from todo_store import DatabaseUnavailable, Settings, TodoStore

PASSWORD = "hunter2-s3cr3t"
URL = f"postgresql://app:{PASSWORD}@ep-cool-123-pooler.us-east-2.aws.neon.tech/neondb"
AUTH_SECRET = "x" * 40


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No inherited configuration: an empty working directory and no relevant variables."""
    for name in ("DATABASE_URL", "DATABASE_URL_DIRECT", "BETTER_AUTH_SECRET", "STATEMENT_CACHE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_reads_the_environment(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", URL)
    monkeypatch.setenv("BETTER_AUTH_SECRET", AUTH_SECRET)
    monkeypatch.setenv("STATEMENT_CACHE", "true")
    settings = Settings()
    assert settings.database_url.get_secret_value() == URL
    assert settings.better_auth_secret is not None
    assert settings.better_auth_secret.get_secret_value() == AUTH_SECRET
    assert settings.statement_cache is True


def test_reads_a_dotenv_file(clean_env: Path) -> None:
    (clean_env / ".env").write_text(f"DATABASE_URL={URL}\nPOOL_SIZE=7\n")
    settings = Settings()
    assert settings.database_url.get_secret_value() == URL
    assert settings.pool_size == 7


def test_database_url_is_required(clean_env: Path) -> None:
    with pytest.raises(ValidationError) as raised:
        Settings()
    assert [e["loc"] for e in raised.value.errors()] == [("database_url",)]


def test_short_auth_secret_is_refused_without_echoing_it(clean_env: Path) -> None:
    with pytest.raises(ValidationError) as raised:
        Settings(database_url=URL, better_auth_secret="short-secret-value")
    assert [e["loc"] for e in raised.value.errors()] == [("better_auth_secret",)]
    assert "short-secret-value" not in str(raised.value)


def test_reprs_hide_passwords_and_secrets(clean_env: Path) -> None:
    settings = Settings(database_url=URL, better_auth_secret=AUTH_SECRET)
    store = TodoStore(settings)
    for text in (repr(settings), str(settings), repr(store), repr(store.engine.url)):
        assert PASSWORD not in text
        assert AUTH_SECRET not in text
    assert "ep-cool-123-pooler" in repr(store)


async def test_connection_error_does_not_show_the_password(clean_env: Path) -> None:
    async with TodoStore(f"postgresql://app:{PASSWORD}@127.0.0.1:9/none") as store:
        with pytest.raises(DatabaseUnavailable) as raised:
            await store.ping()
    shown = str(raised.value) + repr(raised.value)
    assert PASSWORD not in shown
