"""Attacks on tokens, keys and logins: each must be refused with the SPEC's code."""

from __future__ import annotations

import base64
import json
import uuid
from datetime import timedelta

import httpx
import jwt
import pytest
from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncSession

from helpline.auth import security
from helpline.kit.models import utcnow
from tests.auth.conftest import ClientFactory
from tests.auth.helpers import (
    assert_error,
    claims_of,
    codec_of,
    craft_access_token,
    unsigned_token,
)
from tests.factories import DEFAULT_PASSWORD, bearer, create_user, login


async def test_alg_none_is_refused(client: httpx.AsyncClient, session: AsyncSession) -> None:
    await create_user(session, username="alice")
    tokens = await login(client, "alice")
    forged = unsigned_token(claims_of(tokens["access_token"]))
    response = await client.get("/auth/me", headers=bearer(forged))
    assert_error(response, 401, "TOKEN_INVALID")


async def test_tampered_payload_is_refused(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    await create_user(session, username="alice")
    admin = await create_user(session, username="root", role="admin")
    tokens = await login(client, "alice")
    header, _, signature = tokens["access_token"].split(".")
    claims = claims_of(tokens["access_token"])
    claims["sub"] = str(admin.id)  # try to become the admin, keeping alice's signature
    payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    response = await client.get("/admin/users", headers=bearer(f"{header}.{payload}.{signature}"))
    assert_error(response, 401, "TOKEN_INVALID")


async def test_token_signed_with_another_secret_is_refused(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    await create_user(session, username="alice")
    claims = claims_of((await login(client, "alice"))["access_token"])
    forged = jwt.encode(claims, "a-guessed-secret-" + "y" * 40, algorithm="HS256")
    assert_error(await client.get("/auth/me", headers=bearer(forged)), 401, "TOKEN_INVALID")


async def test_expired_token_is_refused(
    app: FastAPI, client: httpx.AsyncClient, session: AsyncSession
) -> None:
    user = await create_user(session, username="alice")
    sid = uuid.UUID(claims_of((await login(client, "alice"))["access_token"])["sid"])
    expired = craft_access_token(
        app, user_id=user.id, login_id=sid, issued_at=utcnow() - timedelta(hours=2)
    )
    assert_error(await client.get("/auth/me", headers=bearer(expired)), 401, "TOKEN_EXPIRED")


async def test_refresh_token_is_not_an_access_token(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    await create_user(session, username="alice")
    tokens = await login(client, "alice")
    response = await client.get("/auth/me", headers=bearer(tokens["refresh_token"]))
    assert_error(response, 401, "TOKEN_INVALID")


async def test_access_token_is_not_a_refresh_token(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    await create_user(session, username="alice")
    tokens = await login(client, "alice")
    response = await client.post("/auth/refresh", json={"refresh_token": tokens["access_token"]})
    assert_error(response, 401, "TOKEN_INVALID")


async def test_token_missing_claims_is_refused(
    app: FastAPI, client: httpx.AsyncClient, session: AsyncSession
) -> None:
    await create_user(session, username="alice")
    claims = claims_of((await login(client, "alice"))["access_token"])
    del claims["sid"]
    forged = jwt.encode(claims, app.state.jwt_secret, algorithm="HS256")
    assert_error(await client.get("/auth/me", headers=bearer(forged)), 401, "TOKEN_INVALID")


async def test_replayed_refresh_token_revokes_the_family(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    await create_user(session, username="alice")
    original = await login(client, "alice")
    other_login = await login(client, "alice")
    rotated = await client.post("/auth/refresh", json={"refresh_token": original["refresh_token"]})
    assert rotated.status_code == 200
    renewed = rotated.json()

    replay = await client.post("/auth/refresh", json={"refresh_token": original["refresh_token"]})
    assert_error(replay, 401, "TOKEN_REVOKED")
    # Every token of that login dies at once: the old and new access tokens, the new refresh.
    for token in (original["access_token"], renewed["access_token"]):
        assert_error(await client.get("/auth/me", headers=bearer(token)), 401, "TOKEN_REVOKED")
    assert_error(
        await client.post("/auth/refresh", json={"refresh_token": renewed["refresh_token"]}),
        401,
        "TOKEN_REVOKED",
    )
    # The user's other login is another family and keeps working.
    assert (
        await client.get("/auth/me", headers=bearer(other_login["access_token"]))
    ).status_code == 200


async def test_expired_refresh_token_is_refused(
    app: FastAPI, client: httpx.AsyncClient, session: AsyncSession
) -> None:
    user = await create_user(session, username="alice")
    sid = uuid.UUID(claims_of((await login(client, "alice"))["access_token"])["sid"])
    issued = utcnow() - timedelta(days=40)
    expired = codec_of(app).encode(
        token_type="refresh",
        user_id=user.id,
        login_id=sid,
        jti="whatever",
        issued_at=issued,
        expires_at=issued + timedelta(days=30),
    )
    response = await client.post("/auth/refresh", json={"refresh_token": expired})
    assert_error(response, 401, "TOKEN_EXPIRED")


async def test_revoked_api_key_is_refused(client: httpx.AsyncClient, session: AsyncSession) -> None:
    await create_user(session, username="alice")
    headers = bearer((await login(client, "alice"))["access_token"])
    key = (await client.post("/auth/api-keys", headers=headers, json={"name": "bot"})).json()
    assert (await client.get("/auth/me", headers=bearer(key["key"]))).status_code == 200
    revoked = await client.delete(f"/auth/api-keys/{key['id']}", headers=headers)
    assert revoked.status_code == 204
    assert_error(await client.get("/auth/me", headers=bearer(key["key"])), 401, "TOKEN_REVOKED")
    listed = (await client.get("/auth/api-keys", headers=headers)).json()["items"]
    assert listed == []


async def test_made_up_api_key_is_refused(client: httpx.AsyncClient) -> None:
    fake = security.generate_api_key().key
    assert_error(await client.get("/auth/me", headers=bearer(fake)), 401, "TOKEN_INVALID")


async def test_guest_token_cannot_reach_admin_routes(client: httpx.AsyncClient) -> None:
    tokens = (await client.post("/auth/guest")).json()
    headers = bearer(tokens["access_token"])
    assert_error(await client.get("/admin/users", headers=headers), 403, "FORBIDDEN")
    created = await client.post(
        "/admin/users",
        headers=headers,
        json={"username": "evil", "password": DEFAULT_PASSWORD, "role": "admin"},
    )
    assert_error(created, 403, "FORBIDDEN")


async def test_forged_user_hash_is_refused(client_with: ClientFactory) -> None:
    async with client_with(identity_secret="the-real-secret") as http:
        forged = security.identity_hash("a-guessed-secret", "victim@shop")
        response = await http.post(
            "/auth/identify", json={"external_id": "victim@shop", "user_hash": forged}
        )
        assert_error(response, 401, "INVALID_CREDENTIALS")
        # A hash for one customer does not open another's account.
        other = security.identity_hash("the-real-secret", "someone-else")
        swapped = await http.post(
            "/auth/identify", json={"external_id": "victim@shop", "user_hash": other}
        )
        assert_error(swapped, 401, "INVALID_CREDENTIALS")


async def test_login_brute_force_is_throttled(
    client_with: ClientFactory, session: AsyncSession
) -> None:
    await create_user(session, username="alice")
    async with client_with(login_max_failures=3) as http:
        for attempt in range(3):
            response = await http.post(
                "/auth/token", data={"username": "alice", "password": f"guess-{attempt}"}
            )
            assert_error(response, 401, "INVALID_CREDENTIALS")
        throttled = await http.post(
            "/auth/token", data={"username": "ALICE", "password": "guess-4"}
        )
        assert_error(throttled, 429, "RATE_LIMITED")
        assert int(throttled.headers["retry-after"]) > 0
        # While throttled even the right password is refused: guessing gains nothing.
        right = await http.post(
            "/auth/token", data={"username": "alice", "password": DEFAULT_PASSWORD}
        )
        assert_error(right, 429, "RATE_LIMITED")
        # Another username is not affected.
        other = await http.post(
            "/auth/token", data={"username": "bob", "password": DEFAULT_PASSWORD}
        )
        assert_error(other, 401, "INVALID_CREDENTIALS")


async def test_unknown_users_are_throttled_too(client_with: ClientFactory) -> None:
    async with client_with(login_max_failures=2) as http:
        for _ in range(2):
            response = await http.post(
                "/auth/token", data={"username": "ghost", "password": "guess-guess"}
            )
            assert_error(response, 401, "INVALID_CREDENTIALS")
        throttled = await http.post(
            "/auth/token", data={"username": "ghost", "password": "guess-guess"}
        )
        assert_error(throttled, 429, "RATE_LIMITED")


async def test_successful_login_resets_the_failure_count(
    client_with: ClientFactory, session: AsyncSession
) -> None:
    await create_user(session, username="alice")
    async with client_with(login_max_failures=2) as http:
        bad = {"username": "alice", "password": "wrong-guess"}
        assert_error(await http.post("/auth/token", data=bad), 401, "INVALID_CREDENTIALS")
        await login(http, "alice")
        assert_error(await http.post("/auth/token", data=bad), 401, "INVALID_CREDENTIALS")
        await login(http, "alice")


async def test_unknown_user_costs_a_full_hash_check(
    client: httpx.AsyncClient, session: AsyncSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    await create_user(session, username="alice")
    checks: list[str] = []
    real_verify = security._password_hash.verify
    real_verify_and_update = security._password_hash.verify_and_update

    def verify(password: str, hashed: str) -> bool:
        checks.append("verify")
        return real_verify(password, hashed)

    def verify_and_update(password: str, hashed: str) -> tuple[bool, str | None]:
        checks.append("verify")
        return real_verify_and_update(password, hashed)

    monkeypatch.setattr(security._password_hash, "verify", verify)
    monkeypatch.setattr(security._password_hash, "verify_and_update", verify_and_update)
    await client.post("/auth/token", data={"username": "alice", "password": "wrong-guess"})
    await client.post("/auth/token", data={"username": "nobody", "password": "wrong-guess"})
    # One argon2 verification each: an unknown name is checked against a dummy hash.
    assert checks == ["verify", "verify"]


async def test_deactivated_user_is_refused_everywhere(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    await create_user(session, username="root", role="admin")
    await create_user(session, username="alice")
    admin = bearer((await login(client, "root"))["access_token"])
    tokens = await login(client, "alice")
    key = (
        await client.post(
            "/auth/api-keys", headers=bearer(tokens["access_token"]), json={"name": "k"}
        )
    ).json()
    me = (await client.get("/auth/me", headers=bearer(tokens["access_token"]))).json()

    response = await client.patch(
        f"/admin/users/{me['id']}", headers=admin, json={"is_active": False}
    )
    assert response.status_code == 200
    assert response.json()["is_active"] is False

    for credential in (tokens["access_token"], key["key"]):
        assert_error(await client.get("/auth/me", headers=bearer(credential)), 403, "INACTIVE_USER")
    refresh = await client.post("/auth/refresh", json={"refresh_token": tokens["refresh_token"]})
    assert_error(refresh, 401, "TOKEN_REVOKED")
    relogin = await client.post(
        "/auth/token", data={"username": "alice", "password": DEFAULT_PASSWORD}
    )
    assert_error(relogin, 403, "INACTIVE_USER")


async def test_www_authenticate_on_every_401(client: httpx.AsyncClient) -> None:
    responses = [
        await client.get("/auth/me"),
        await client.get("/auth/me", headers=bearer("garbage")),
        await client.post("/auth/token", data={"username": "nobody", "password": "x" * 8}),
        await client.post("/auth/refresh", json={"refresh_token": "garbage"}),
    ]
    for response in responses:
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == "Bearer"
