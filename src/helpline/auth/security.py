"""Credentials: password hashing, JWTs, API keys and the widget's identity HMAC.

Passwords are hashed with argon2 (pwdlib) in a worker thread, a few at a time: a hash takes a
noticeable slice of CPU and 64 MiB, so it must neither block the event loop nor run unbounded.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import secrets
import uuid
import weakref
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import anyio
import jwt
from pwdlib import PasswordHash
from pwdlib.hashers.argon2 import Argon2Hasher

from helpline.auth.exceptions import TokenExpired, TokenInvalid
from helpline.core.config import Settings

TokenType = Literal["access", "refresh"]

API_KEY_PREFIX = "hl_"
API_KEY_SHOWN_CHARS = 10
# Tolerated clock difference between the instances that issue and check tokens.
CLOCK_LEEWAY = timedelta(seconds=10)

_password_hash = PasswordHash((Argon2Hasher(),))
_hash_slots: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, anyio.CapacityLimiter] = (
    weakref.WeakKeyDictionary()
)
_dummy_hash: str | None = None


def _hash_limiter() -> anyio.CapacityLimiter:
    # One limiter per event loop: anyio's limiter belongs to the loop it was first used on.
    loop = asyncio.get_running_loop()
    limiter = _hash_slots.get(loop)
    if limiter is None:
        limiter = anyio.CapacityLimiter(max(2, os.cpu_count() or 2))
        _hash_slots[loop] = limiter
    return limiter


async def hash_password(password: str) -> str:
    """The argon2 hash of `password`, computed off the event loop."""
    return await anyio.to_thread.run_sync(_password_hash.hash, password, limiter=_hash_limiter())


async def verify_password(password: str, password_hash: str | None) -> tuple[bool, str | None]:
    """Check `password`; returns (valid, a new hash when the stored one uses old parameters).

    With no hash (unknown user, account without a password) a dummy hash is verified instead,
    so the answer takes as long as for a real account and reveals nothing.
    """
    global _dummy_hash
    if password_hash is None:
        if _dummy_hash is None:
            _dummy_hash = await hash_password(secrets.token_urlsafe(16))
        await anyio.to_thread.run_sync(
            _password_hash.verify, password, _dummy_hash, limiter=_hash_limiter()
        )
        return False, None
    return await anyio.to_thread.run_sync(
        _password_hash.verify_and_update, password, password_hash, limiter=_hash_limiter()
    )


@dataclass(frozen=True, slots=True)
class TokenClaims:
    user_id: uuid.UUID
    login_id: uuid.UUID
    jti: str
    type: TokenType
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class TokenPair:
    access_token: str
    refresh_token: str
    expires_in: int  # seconds until the access token expires


@dataclass(frozen=True, slots=True)
class TokenCodec:
    """Issues and checks the signed JWTs of one deployment."""

    secret: str
    algorithm: str
    access_ttl: timedelta
    refresh_ttl: timedelta

    @classmethod
    def from_settings(cls, settings: Settings, secret: str) -> TokenCodec:
        return cls(
            secret=secret,
            algorithm=settings.auth_jwt_algorithm,
            access_ttl=timedelta(minutes=settings.access_token_expire_minutes),
            refresh_ttl=timedelta(days=settings.refresh_token_expire_days),
        )

    def encode(
        self,
        *,
        token_type: TokenType,
        user_id: uuid.UUID,
        login_id: uuid.UUID,
        jti: str,
        issued_at: datetime,
        expires_at: datetime,
    ) -> str:
        claims: dict[str, Any] = {
            "sub": str(user_id),
            "sid": str(login_id),
            "jti": jti,
            "type": token_type,
            "iat": int(issued_at.timestamp()),
            "exp": int(expires_at.timestamp()),
        }
        return jwt.encode(claims, self.secret, algorithm=self.algorithm)

    def issue_pair(
        self, *, user_id: uuid.UUID, login_id: uuid.UUID, refresh_jti: str, now: datetime
    ) -> TokenPair:
        """A fresh access token and the refresh token whose `jti` the login now expects."""
        access = self.encode(
            token_type="access",
            user_id=user_id,
            login_id=login_id,
            jti=new_jti(),
            issued_at=now,
            expires_at=now + self.access_ttl,
        )
        refresh = self.encode(
            token_type="refresh",
            user_id=user_id,
            login_id=login_id,
            jti=refresh_jti,
            issued_at=now,
            expires_at=now + self.refresh_ttl,
        )
        return TokenPair(access, refresh, int(self.access_ttl.total_seconds()))

    def decode(self, token: str, *, expected_type: TokenType) -> TokenClaims:
        """Verify signature, algorithm, lifetime and type; raise the matching 401 otherwise."""
        try:
            claims = jwt.decode(
                token,
                self.secret,
                # Only the configured algorithm: `none` and algorithm swaps are refused.
                algorithms=[self.algorithm],
                options={"require": ["exp", "iat", "jti", "sub", "sid", "type"]},
                leeway=CLOCK_LEEWAY,
            )
        except jwt.ExpiredSignatureError as exc:
            raise TokenExpired() from exc
        except jwt.InvalidTokenError as exc:
            raise TokenInvalid() from exc
        if claims.get("type") != expected_type:
            raise TokenInvalid(f"Expected an {expected_type} token")
        try:
            return TokenClaims(
                user_id=uuid.UUID(str(claims["sub"])),
                login_id=uuid.UUID(str(claims["sid"])),
                jti=str(claims["jti"]),
                type=expected_type,
                expires_at=datetime.fromtimestamp(int(claims["exp"]), tz=UTC),
            )
        except (TypeError, ValueError) as exc:
            raise TokenInvalid() from exc


def new_jti() -> str:
    return secrets.token_urlsafe(24)


@dataclass(frozen=True, slots=True)
class NewApiKey:
    key: str
    prefix: str
    key_hash: str


def is_api_key(token: str) -> bool:
    return token.startswith(API_KEY_PREFIX)


def hash_api_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def generate_api_key() -> NewApiKey:
    """A new `hl_…` key with 256 bits of randomness; only its hash is stored."""
    key = API_KEY_PREFIX + secrets.token_urlsafe(32)
    return NewApiKey(key=key, prefix=key[:API_KEY_SHOWN_CHARS], key_hash=hash_api_key(key))


def identity_hash(secret: str, external_id: str) -> str:
    """Hex HMAC-SHA256 of `external_id`: what the host application sends as `user_hash`."""
    return hmac.new(secret.encode(), external_id.encode(), hashlib.sha256).hexdigest()


def verify_identity_hash(secret: str, external_id: str, user_hash: str) -> bool:
    expected = identity_hash(secret, external_id)
    return hmac.compare_digest(expected.encode(), user_hash.strip().lower().encode())
