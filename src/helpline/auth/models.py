"""Accounts, logins (token families) and API keys."""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum

from sqlalchemy import CheckConstraint, ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column

from helpline.kit.models import Base, IdMixin, TimestampMixin, enum_column, utcnow

USERNAME_MAX_LENGTH = 40
EMAIL_MAX_LENGTH = 320
DISPLAY_NAME_MAX_LENGTH = 100
EXTERNAL_ID_MAX_LENGTH = 255
USER_AGENT_MAX_LENGTH = 512
API_KEY_NAME_MAX_LENGTH = 100


class UserRole(StrEnum):
    CUSTOMER = "customer"
    AGENT = "agent"
    ADMIN = "admin"


class User(IdMixin, TimestampMixin, Base):
    """A person who talks to Helpline: a customer (registered, guest or identified) or staff."""

    __tablename__ = "users"
    __table_args__ = (CheckConstraint("role IN ('customer', 'agent', 'admin')", name="role"),)

    # Stored lower-cased, so the unique constraint is case-insensitive on every backend.
    username: Mapped[str] = mapped_column(String(USERNAME_MAX_LENGTH), unique=True)
    email: Mapped[str | None] = mapped_column(String(EMAIL_MAX_LENGTH))
    display_name: Mapped[str | None] = mapped_column(String(DISPLAY_NAME_MAX_LENGTH))
    role: Mapped[UserRole] = mapped_column(
        enum_column(UserRole, 16),
        default=UserRole.CUSTOMER,
    )
    is_active: Mapped[bool] = mapped_column(default=True)
    is_guest: Mapped[bool] = mapped_column(default=False)
    # The host application's id for a customer signed in through `/auth/identify`.
    external_id: Mapped[str | None] = mapped_column(String(EXTERNAL_ID_MAX_LENGTH), unique=True)
    # None for guests and identified customers: they never sign in with a password.
    password_hash: Mapped[str | None] = mapped_column(String(255))

    @property
    def has_password(self) -> bool:
        return self.password_hash is not None


class Login(IdMixin, Base):
    """One sign-in: a family of tokens sharing the id carried as `sid` in each of them."""

    __tablename__ = "logins"

    user_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), index=True
    )
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_activity_at: Mapped[datetime] = mapped_column(default=utcnow)
    user_agent: Mapped[str | None] = mapped_column(String(USER_AGENT_MAX_LENGTH))
    ip: Mapped[str | None] = mapped_column(String(64))
    # The `jti` of the one refresh token of this family that may still be used.
    refresh_jti: Mapped[str] = mapped_column(String(64))
    expires_at: Mapped[datetime]
    revoked_at: Mapped[datetime | None]

    def is_active_at(self, moment: datetime) -> bool:
        return self.revoked_at is None and self.expires_at > moment


class ApiKey(IdMixin, Base):
    """A long-lived credential (`hl_…`) usable wherever a Bearer token is."""

    __tablename__ = "api_keys"

    user_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), index=True
    )
    name: Mapped[str] = mapped_column(String(API_KEY_NAME_MAX_LENGTH))
    prefix: Mapped[str] = mapped_column(String(16))
    # sha256 of the whole key: keys carry 256 bits of entropy, so a slow hash adds nothing.
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_used_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]
