"""Assertions and token crafting for the auth tests."""

from __future__ import annotations

import base64
import json
import uuid
from datetime import datetime, timedelta
from typing import Any

import httpx
import jwt
from fastapi import FastAPI

from helpline.auth.security import TokenCodec, new_jti
from helpline.kit.models import utcnow


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """The SPEC envelope with `code`; 401s must also ask for a Bearer token."""
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert error["code"] == code
    assert error["message"]
    if status == 401:
        assert response.headers["www-authenticate"] == "Bearer"
    return error


def codec_of(app: FastAPI) -> TokenCodec:
    return TokenCodec.from_settings(app.state.settings, app.state.jwt_secret)


def claims_of(token: str) -> dict[str, Any]:
    """The payload of a JWT, without checking anything (to build forgeries from)."""
    claims: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return claims


def craft_access_token(
    app: FastAPI,
    *,
    user_id: uuid.UUID,
    login_id: uuid.UUID,
    issued_at: datetime | None = None,
    lifetime: timedelta = timedelta(minutes=30),
) -> str:
    """A correctly signed access token with chosen times."""
    issued_at = issued_at or utcnow()
    return codec_of(app).encode(
        token_type="access",
        user_id=user_id,
        login_id=login_id,
        jti=new_jti(),
        issued_at=issued_at,
        expires_at=issued_at + lifetime,
    )


def unsigned_token(claims: dict[str, Any]) -> str:
    """`alg: none`: the claims with no signature at all."""

    def part(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    header = part(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    payload = part(json.dumps(claims).encode())
    return f"{header}.{payload}."
