"""Request and response bodies of `/auth` and `/admin/users`."""

from __future__ import annotations

import re
import uuid
from datetime import datetime
from typing import Annotated, Literal, Self

from pydantic import AfterValidator, EmailStr, Field, StringConstraints, model_validator

from helpline.auth.models import (
    API_KEY_NAME_MAX_LENGTH,
    DISPLAY_NAME_MAX_LENGTH,
    EXTERNAL_ID_MAX_LENGTH,
    USERNAME_MAX_LENGTH,
    UserRole,
)
from helpline.kit.schemas import STORABLE, Schema

USERNAME_MIN_LENGTH = 3
PASSWORD_MIN_LENGTH = 8
PASSWORD_MAX_LENGTH = 128
# Refresh tokens and API keys are a few hundred characters; anything far longer is not one.
TOKEN_MAX_LENGTH = 4096

_USERNAME_CHARACTERS = re.compile(r"^[A-Za-z0-9._-]+$")


def _check_username(value: str) -> str:
    if len(value) < USERNAME_MIN_LENGTH:
        raise ValueError(f"Usernames have at least {USERNAME_MIN_LENGTH} characters")
    if len(value) > USERNAME_MAX_LENGTH:
        raise ValueError(f"Usernames have at most {USERNAME_MAX_LENGTH} characters")
    if not _USERNAME_CHARACTERS.match(value):
        raise ValueError("Usernames may contain only letters, digits, '.', '_' and '-'")
    return value.lower()


def _check_password(value: str) -> str:
    if len(value) < PASSWORD_MIN_LENGTH:
        raise ValueError(f"Passwords have at least {PASSWORD_MIN_LENGTH} characters")
    if len(value) > PASSWORD_MAX_LENGTH:
        raise ValueError(f"Passwords have at most {PASSWORD_MAX_LENGTH} characters")
    if not value.strip():
        raise ValueError("Passwords cannot be only spaces")
    return value


Username = Annotated[
    str,
    AfterValidator(_check_username),
    Field(
        description="3 to 40 letters, digits, '.', '_' or '-'; case-insensitive",
        examples=["alice"],
    ),
]
Password = Annotated[
    str,
    AfterValidator(_check_password),
    Field(description="8 to 128 characters", examples=["correct-horse-battery"]),
]
DisplayName = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=DISPLAY_NAME_MAX_LENGTH),
    STORABLE,
]
Email = Annotated[EmailStr, Field(max_length=320)]
Token = Annotated[str, StringConstraints(min_length=1, max_length=TOKEN_MAX_LENGTH)]


class UserRead(Schema):
    id: uuid.UUID
    username: str
    email: str | None
    display_name: str | None
    role: UserRole
    is_active: bool
    created_at: datetime


class UserRegister(Schema):
    username: Username
    password: Password
    email: Email | None = None
    display_name: DisplayName | None = None

    @model_validator(mode="after")
    def _password_is_not_username(self) -> Self:
        if self.password.lower() == self.username:
            raise ValueError("The password must not be the username")
        return self


class AdminUserCreate(UserRegister):
    role: UserRole = UserRole.CUSTOMER


class UserUpdate(Schema):
    """Fields left out stay as they are; `null` clears them."""

    display_name: DisplayName | None = None
    email: Email | None = None


class AdminUserUpdate(Schema):
    role: UserRole | None = None
    is_active: bool | None = None


class TokenResponse(Schema):
    access_token: str
    refresh_token: str
    token_type: Literal["bearer"] = "bearer"
    expires_in: int = Field(description="Seconds until the access token expires")


class RefreshRequest(Schema):
    refresh_token: Token


class LogoutRequest(Schema):
    refresh_token: Token | None = None


class GuestRequest(Schema):
    display_name: DisplayName | None = None


class IdentifyRequest(Schema):
    external_id: Annotated[
        str,
        StringConstraints(strip_whitespace=True, min_length=1, max_length=EXTERNAL_ID_MAX_LENGTH),
    ]
    user_hash: Annotated[str, StringConstraints(min_length=1, max_length=128)] = Field(
        description="Hex HMAC-SHA256 of external_id under IDENTITY_SECRET"
    )
    display_name: DisplayName | None = None
    email: Email | None = None


class PasswordChange(Schema):
    current_password: Annotated[str, StringConstraints(min_length=1, max_length=1024)]
    new_password: Password


class AccountDeletion(Schema):
    password: Annotated[str, StringConstraints(max_length=1024)] | None = None


class LoginRead(Schema):
    id: uuid.UUID
    created_at: datetime
    last_activity_at: datetime
    user_agent: str | None
    ip: str | None
    current: bool


class ApiKeyCreate(Schema):
    name: Annotated[
        str,
        StringConstraints(strip_whitespace=True, min_length=1, max_length=API_KEY_NAME_MAX_LENGTH),
    ]


class ApiKeyRead(Schema):
    id: uuid.UUID
    name: str
    prefix: str
    created_at: datetime
    last_used_at: datetime | None


class ApiKeyCreated(ApiKeyRead):
    key: str = Field(description="The key itself (`hl_…`); shown only in this answer")
