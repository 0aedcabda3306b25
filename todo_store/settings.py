"""Configuration read from the environment and `.env`."""

from __future__ import annotations

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Everything the package reads from the environment (or a `.env` file).

    URLs are held as `SecretStr`: they carry passwords, so neither `repr()` nor a
    validation error ever shows them. `BETTER_AUTH_SECRET` is optional here (the auth
    service owns it) but, when given, must be at least 32 characters.
    """

    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        hide_input_in_errors=True,
    )

    database_url: SecretStr = Field(
        description="Pooled URL the application uses (Neon's `-pooler` host in production).",
    )
    database_url_direct: SecretStr | None = Field(
        default=None,
        description="Direct (unpooled) URL for migrations; derived from a `-pooler` host if unset.",
    )
    better_auth_secret: SecretStr | None = Field(default=None, min_length=32)
    cursor_secret: SecretStr | None = Field(
        default=None,
        min_length=32,
        description=(
            "Key material for page cursors (TaskRepo.page); if unset, BETTER_AUTH_SECRET's is "
            "used, else a random key per process (cursors then fail on other instances)."
        ),
    )

    pool_size: int = Field(default=5, ge=1, le=100)
    max_overflow: int = Field(default=5, ge=0, le=100)
    pool_timeout: float = Field(
        default=10.0, gt=0, description="Seconds to wait for a pooled connection."
    )
    pool_recycle: int = Field(
        default=1800, ge=-1, description="Seconds after which a pooled connection is replaced."
    )
    connect_timeout: float = Field(default=10.0, gt=0, description="Seconds to open a connection.")
    statement_timeout: float = Field(
        default=30.0, gt=0, description="Seconds one statement may run before it is cancelled."
    )
    migration_lock_timeout: float = Field(
        default=10.0, gt=0, description="Seconds a migration's DDL may wait for a table lock."
    )
    statement_cache: bool = Field(
        default=False,
        description=(
            "Cache prepared statements per connection. Safe only on a direct connection or a "
            "pooler that tracks protocol-level prepared statements (PgBouncer >= 1.21 with "
            "max_prepared_statements > 0)."
        ),
    )
    statement_cache_size: int = Field(default=100, ge=1)

    database_url_replica: SecretStr | None = Field(
        default=None,
        description=(
            "Read replicas for `session(read_only=True)`: one URL, or several separated by "
            "commas (pooled URLs and Neon console strings, as for DATABASE_URL)."
        ),
    )
    replica_max_lag: float = Field(
        default=5.0,
        gt=0,
        description="Seconds a replica may lag behind the primary before reads skip it.",
    )
    replica_check_interval: float = Field(
        default=1.0,
        gt=0,
        description="Seconds between checks of a replica's replay position, lag and health.",
    )

    @field_validator("database_url", "database_url_direct", "database_url_replica", mode="before")
    @classmethod
    def _not_blank(cls, value: object) -> object:
        if isinstance(value, str) and not value.strip():
            raise ValueError("must not be empty")
        return value

    @model_validator(mode="after")
    def _checks_within_lag(self) -> Settings:
        # A replica's last check must be able to be younger than the lag it allows.
        if self.replica_check_interval >= self.replica_max_lag:
            raise ValueError(
                "REPLICA_CHECK_INTERVAL must be less than REPLICA_MAX_LAG "
                f"({self.replica_check_interval:g} >= {self.replica_max_lag:g} s)"
            )
        return self
