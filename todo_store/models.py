"""ORM models: the todo application's schema (`users`, `tasks`)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Identity,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    func,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Stable constraint names: errors.py maps violations by these names, and migrations can
# drop them by name on any database.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

TITLE_MAX = 200
NAME_MAX = 200
EMAIL_MAX = 255
USER_ID_MAX = 255


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class User(Base):
    """An account, keyed by the auth provider's (Better Auth) id."""

    __tablename__ = "users"
    __table_args__ = (
        CheckConstraint("id <> ''", name="id_not_empty"),
        # Emails are stored lower-cased so the plain unique index is case-insensitive.
        CheckConstraint("email = lower(email)", name="email_lowercase"),
    )

    id: Mapped[str] = mapped_column(Text, primary_key=True)
    email: Mapped[str] = mapped_column(String(EMAIL_MAX), unique=True)
    name: Mapped[str] = mapped_column(String(NAME_MAX))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    def __repr__(self) -> str:
        return f"User(id={self.id!r})"


class Task(Base):
    """A todo item; always owned by exactly one user."""

    __tablename__ = "tasks"
    __table_args__ = (
        CheckConstraint(
            f"char_length(btrim(title)) BETWEEN 1 AND {TITLE_MAX}", name="title_length"
        ),
        # Shaped for the list query: WHERE user_id = ? [AND id < ?] ORDER BY id DESC.
        Index("idx_tasks_user_id", "user_id", "id"),
        # One per sort of TaskRepo.page (migration 0005; its trigram index is left out here,
        # as it exists only where pg_trgm does).
        Index("idx_tasks_user_created", "user_id", "created_at", "id"),
        Index("idx_tasks_user_updated", "user_id", "updated_at", "id"),
        Index("idx_tasks_user_title", "user_id", "title", "id"),
        Index("idx_tasks_user_completed", "user_id", "completed", "id"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(always=True), primary_key=True)
    user_id: Mapped[str] = mapped_column(Text, ForeignKey("users.id", ondelete="CASCADE"))
    title: Mapped[str] = mapped_column(String(TITLE_MAX))
    description: Mapped[str | None] = mapped_column(Text)
    completed: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    # Incremented by the database on every UPDATE (trigger update_tasks_version), so an edit
    # can say which version it saw (`expected_version=`) and raw SQL updates count too.
    version: Mapped[int] = mapped_column(Integer, server_default=text("1"))

    def __repr__(self) -> str:
        return f"Task(id={self.id!r}, user_id={self.user_id!r}, completed={self.completed!r})"
