"""The `/auth` endpoints, as a client sees them (SPEC.md: Auth)."""

from __future__ import annotations

import uuid

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncSession

from helpline.auth.security import identity_hash
from tests.auth.conftest import ClientFactory
from tests.auth.helpers import assert_error, claims_of
from tests.factories import DEFAULT_PASSWORD, bearer, create_user, login

USER_FIELDS = {"id", "username", "email", "display_name", "role", "is_active", "created_at"}


# --- registration ------------------------------------------------------------------------


async def test_register_creates_customer(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/auth/register",
        json={
            "username": "Alice.Smith",
            "password": DEFAULT_PASSWORD,
            "email": "alice@example.com",
            "display_name": "Alice",
        },
    )
    assert response.status_code == 201, response.text
    user = response.json()
    assert set(user) == USER_FIELDS
    assert user["username"] == "alice.smith"
    assert user["role"] == "customer"
    assert user["is_active"] is True
    assert user["email"] == "alice@example.com"
    assert "hash" not in response.text


async def test_register_duplicate_username_is_case_insensitive(client: httpx.AsyncClient) -> None:
    first = await client.post("/auth/register", json={"username": "bob", "password": "s3cret-pass"})
    assert first.status_code == 201
    second = await client.post(
        "/auth/register", json={"username": "BOB", "password": "another-pass"}
    )
    assert_error(second, 409, "USERNAME_TAKEN")


@pytest.mark.parametrize(
    ("body", "field", "reason"),
    [
        ({"username": "ab", "password": DEFAULT_PASSWORD}, "username", "at least 3"),
        ({"username": "x" * 41, "password": DEFAULT_PASSWORD}, "username", "at most 40"),
        ({"username": "bad name!", "password": DEFAULT_PASSWORD}, "username", "only letters"),
        ({"username": "ünïcode", "password": DEFAULT_PASSWORD}, "username", "only letters"),
        ({"username": "carol", "password": "short"}, "password", "at least 8"),
        ({"username": "carol", "password": "p" * 129}, "password", "at most 128"),
        ({"username": "carol", "password": " " * 10}, "password", "only spaces"),
        ({"username": "carol", "password": DEFAULT_PASSWORD, "email": "nope"}, "email", "email"),
        ({"username": "carol"}, "password", "required"),
        (
            {"username": "carol", "password": DEFAULT_PASSWORD, "display_name": "C\u0000"},
            "display_name",
            "NUL",
        ),
        ({"username": "carol", "password": DEFAULT_PASSWORD, "role": "admin"}, "role", "xtra"),
    ],
)
async def test_register_validation_gives_reasons(
    client: httpx.AsyncClient, body: dict[str, str], field: str, reason: str
) -> None:
    response = await client.post("/auth/register", json=body)
    error = assert_error(response, 422, "VALIDATION_ERROR")
    matching = [item for item in error["details"] if item["loc"][-1] == field]
    assert matching, error["details"]
    assert reason.lower() in matching[0]["msg"].lower()


async def test_register_refuses_password_equal_to_username(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/auth/register", json={"username": "dave12345", "password": "DAVE12345"}
    )
    error = assert_error(response, 422, "VALIDATION_ERROR")
    assert "username" in str(error["details"])


# --- token -------------------------------------------------------------------------------


async def test_token_returns_pair(client: httpx.AsyncClient, session: AsyncSession) -> None:
    user = await create_user(session, username="erin")
    tokens = await login(client, "ERIN")
    assert tokens["token_type"] == "bearer"
    assert tokens["expires_in"] == 30 * 60
    access = claims_of(tokens["access_token"])
    refresh = claims_of(tokens["refresh_token"])
    assert access["type"] == "access"
    assert refresh["type"] == "refresh"
    assert access["sub"] == str(user.id)
    assert access["sid"] == refresh["sid"]
    assert {"exp", "iat", "jti", "sub", "sid", "type"} <= set(access)
    me = await client.get("/auth/me", headers=bearer(tokens["access_token"]))
    assert me.json()["id"] == str(user.id)


async def test_unknown_user_and_wrong_password_look_the_same(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    await create_user(session, username="frank")
    wrong = await client.post("/auth/token", data={"username": "frank", "password": "wrong-pw"})
    unknown = await client.post(
        "/auth/token", data={"username": "nobody-here", "password": "wrong-pw"}
    )
    wrong_error = assert_error(wrong, 401, "INVALID_CREDENTIALS")
    unknown_error = assert_error(unknown, 401, "INVALID_CREDENTIALS")
    assert wrong_error["message"] == unknown_error["message"]


async def test_token_requires_form_fields(client: httpx.AsyncClient) -> None:
    response = await client.post("/auth/token", data={"username": "x"})
    assert_error(response, 422, "VALIDATION_ERROR")


async def test_token_for_inactive_user_is_refused(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    await create_user(session, username="gone", is_active=False)
    response = await client.post(
        "/auth/token", data={"username": "gone", "password": DEFAULT_PASSWORD}
    )
    assert_error(response, 403, "INACTIVE_USER")


async def test_login_records_user_agent_and_ip(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    await create_user(session, username="gina")
    response = await client.post(
        "/auth/token",
        data={"username": "gina", "password": DEFAULT_PASSWORD},
        headers={"User-Agent": "HelplineTest/1.0"},
    )
    tokens = response.json()
    sessions = await client.get("/auth/sessions", headers=bearer(tokens["access_token"]))
    (item,) = sessions.json()["items"]
    assert item["user_agent"] == "HelplineTest/1.0"
    assert item["ip"] == "127.0.0.1"
    assert item["current"] is True


# --- refresh and logout ------------------------------------------------------------------


async def test_refresh_rotates_the_pair(client: httpx.AsyncClient, session: AsyncSession) -> None:
    await create_user(session, username="hank")
    tokens = await login(client, "hank")
    response = await client.post("/auth/refresh", json={"refresh_token": tokens["refresh_token"]})
    assert response.status_code == 200, response.text
    renewed = response.json()
    assert renewed["refresh_token"] != tokens["refresh_token"]
    assert claims_of(renewed["access_token"])["sid"] == claims_of(tokens["access_token"])["sid"]
    me = await client.get("/auth/me", headers=bearer(renewed["access_token"]))
    assert me.status_code == 200
    again = await client.post("/auth/refresh", json={"refresh_token": renewed["refresh_token"]})
    assert again.status_code == 200


async def test_refresh_requires_a_token(client: httpx.AsyncClient) -> None:
    assert_error(await client.post("/auth/refresh", json={}), 422, "VALIDATION_ERROR")
    garbage = await client.post("/auth/refresh", json={"refresh_token": "not-a-jwt"})
    assert_error(garbage, 401, "TOKEN_INVALID")


async def test_logout_kills_the_login_but_not_other_logins(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    await create_user(session, username="ivy")
    phone = await login(client, "ivy")
    laptop = await login(client, "ivy")
    response = await client.post(
        "/auth/logout",
        headers=bearer(phone["access_token"]),
        json={"refresh_token": phone["refresh_token"]},
    )
    assert response.status_code == 204
    assert response.content == b""
    gone = await client.get("/auth/me", headers=bearer(phone["access_token"]))
    assert_error(gone, 401, "TOKEN_REVOKED")
    refresh = await client.post("/auth/refresh", json={"refresh_token": phone["refresh_token"]})
    assert_error(refresh, 401, "TOKEN_REVOKED")
    still = await client.get("/auth/me", headers=bearer(laptop["access_token"]))
    assert still.status_code == 200


async def test_logout_without_body(client: httpx.AsyncClient, session: AsyncSession) -> None:
    await create_user(session, username="jack")
    tokens = await login(client, "jack")
    response = await client.post("/auth/logout", headers=bearer(tokens["access_token"]))
    assert response.status_code == 204
    refresh = await client.post("/auth/refresh", json={"refresh_token": tokens["refresh_token"]})
    assert_error(refresh, 401, "TOKEN_REVOKED")


async def test_logout_ignores_someone_elses_refresh_token(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    await create_user(session, username="kim")
    await create_user(session, username="lee")
    kim = await login(client, "kim")
    lee = await login(client, "lee")
    response = await client.post(
        "/auth/logout",
        headers=bearer(kim["access_token"]),
        json={"refresh_token": lee["refresh_token"]},
    )
    assert response.status_code == 204
    assert (await client.get("/auth/me", headers=bearer(lee["access_token"]))).status_code == 200


async def test_routes_need_authentication(client: httpx.AsyncClient) -> None:
    for method, path in [
        ("GET", "/auth/me"),
        ("POST", "/auth/logout"),
        ("GET", "/auth/sessions"),
        ("GET", "/auth/api-keys"),
        ("GET", "/admin/users"),
    ]:
        response = await client.request(method, path)
        assert_error(response, 401, "NOT_AUTHENTICATED")


# --- guests and identified customers -----------------------------------------------------


async def test_guest_gets_a_customer_account(client: httpx.AsyncClient) -> None:
    response = await client.post("/auth/guest", json={"display_name": "Visitor"})
    assert response.status_code == 201, response.text
    tokens = response.json()
    me = (await client.get("/auth/me", headers=bearer(tokens["access_token"]))).json()
    assert me["role"] == "customer"
    assert me["display_name"] == "Visitor"
    other = (await client.post("/auth/guest")).json()
    other_me = (await client.get("/auth/me", headers=bearer(other["access_token"]))).json()
    assert other_me["id"] != me["id"]


async def test_guest_creation_is_rate_limited_per_ip(client_with: ClientFactory) -> None:
    async with client_with(rate_limit_guest="2/minute") as http:
        assert (await http.post("/auth/guest")).status_code == 201
        assert (await http.post("/auth/guest")).status_code == 201
        refused = await http.post("/auth/guest")
        assert_error(refused, 429, "RATE_LIMITED")
        assert int(refused.headers["retry-after"]) >= 1


async def test_identify_is_off_without_secret(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/auth/identify", json={"external_id": "42", "user_hash": "00" * 32}
    )
    assert_error(response, 404, "NOT_FOUND")


async def test_identify_creates_then_updates_the_customer(client_with: ClientFactory) -> None:
    secret = "host-app-secret"
    async with client_with(identity_secret=secret) as http:
        body = {"external_id": "shop-42", "user_hash": identity_hash(secret, "shop-42")}
        first = await http.post("/auth/identify", json={**body, "display_name": "Ann"})
        assert first.status_code == 200, first.text
        me = (await http.get("/auth/me", headers=bearer(first.json()["access_token"]))).json()
        assert me["role"] == "customer"
        assert me["display_name"] == "Ann"
        second = await http.post(
            "/auth/identify", json={**body, "display_name": "Ann B.", "email": "ann@example.com"}
        )
        again = (await http.get("/auth/me", headers=bearer(second.json()["access_token"]))).json()
        assert again["id"] == me["id"]
        assert again["display_name"] == "Ann B."
        assert again["email"] == "ann@example.com"


async def test_identify_hash_is_case_insensitive_hex(client_with: ClientFactory) -> None:
    secret = "host-app-secret"
    async with client_with(identity_secret=secret) as http:
        user_hash = identity_hash(secret, "u-1").upper()
        response = await http.post(
            "/auth/identify", json={"external_id": "u-1", "user_hash": user_hash}
        )
        assert response.status_code == 200


# --- the signed-in user ------------------------------------------------------------------


async def test_patch_me_changes_only_sent_fields(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    await create_user(session, username="mia", email="mia@example.com", display_name="Mia")
    tokens = await login(client, "mia")
    headers = bearer(tokens["access_token"])
    renamed = await client.patch("/auth/me", headers=headers, json={"display_name": "Mia R."})
    assert renamed.json()["display_name"] == "Mia R."
    assert renamed.json()["email"] == "mia@example.com"
    cleared = await client.patch("/auth/me", headers=headers, json={"email": None})
    assert cleared.json()["email"] is None
    assert cleared.json()["display_name"] == "Mia R."
    bad = await client.patch("/auth/me", headers=headers, json={"role": "admin"})
    assert_error(bad, 422, "VALIDATION_ERROR")


async def test_delete_me_needs_the_password(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    await create_user(session, username="ned")
    tokens = await login(client, "ned")
    headers = bearer(tokens["access_token"])
    wrong = await client.request("DELETE", "/auth/me", headers=headers, json={"password": "nope"})
    assert_error(wrong, 401, "INVALID_CREDENTIALS")
    missing = await client.request("DELETE", "/auth/me", headers=headers)
    assert_error(missing, 401, "INVALID_CREDENTIALS")
    assert (await client.get("/auth/me", headers=headers)).status_code == 200


async def test_delete_me_erases_the_account(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    await create_user(session, username="olga")
    tokens = await login(client, "olga")
    headers = bearer(tokens["access_token"])
    key = (await client.post("/auth/api-keys", headers=headers, json={"name": "ci"})).json()
    response = await client.request(
        "DELETE", "/auth/me", headers=headers, json={"password": DEFAULT_PASSWORD}
    )
    assert response.status_code == 204
    assert_error(await client.get("/auth/me", headers=headers), 401, "TOKEN_REVOKED")
    assert_error(await client.get("/auth/me", headers=bearer(key["key"])), 401, "TOKEN_INVALID")
    relogin = await client.post(
        "/auth/token", data={"username": "olga", "password": DEFAULT_PASSWORD}
    )
    assert_error(relogin, 401, "INVALID_CREDENTIALS")
    # The name is free again: the row is gone, not flagged.
    again = await client.post(
        "/auth/register", json={"username": "olga", "password": DEFAULT_PASSWORD}
    )
    assert again.status_code == 201


async def test_guest_deletes_account_without_password(client: httpx.AsyncClient) -> None:
    tokens = (await client.post("/auth/guest")).json()
    headers = bearer(tokens["access_token"])
    response = await client.request("DELETE", "/auth/me", headers=headers)
    assert response.status_code == 204
    assert_error(await client.get("/auth/me", headers=headers), 401, "TOKEN_REVOKED")


async def test_change_password_revokes_other_logins_only(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    await create_user(session, username="pat")
    current = await login(client, "pat")
    other = await login(client, "pat")
    response = await client.post(
        "/auth/password",
        headers=bearer(current["access_token"]),
        json={"current_password": DEFAULT_PASSWORD, "new_password": "brand-new-secret"},
    )
    assert response.status_code == 204, response.text
    assert (
        await client.get("/auth/me", headers=bearer(current["access_token"]))
    ).status_code == 200
    assert_error(
        await client.get("/auth/me", headers=bearer(other["access_token"])), 401, "TOKEN_REVOKED"
    )
    assert_error(
        await client.post("/auth/refresh", json={"refresh_token": other["refresh_token"]}),
        401,
        "TOKEN_REVOKED",
    )
    refreshed = await client.post("/auth/refresh", json={"refresh_token": current["refresh_token"]})
    assert refreshed.status_code == 200
    old = await client.post("/auth/token", data={"username": "pat", "password": DEFAULT_PASSWORD})
    assert_error(old, 401, "INVALID_CREDENTIALS")
    await login(client, "pat", "brand-new-secret")


async def test_change_password_with_wrong_current_password(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    await create_user(session, username="quinn")
    tokens = await login(client, "quinn")
    response = await client.post(
        "/auth/password",
        headers=bearer(tokens["access_token"]),
        json={"current_password": "not-it-at-all", "new_password": "brand-new-secret"},
    )
    assert_error(response, 401, "INVALID_CREDENTIALS")
    await login(client, "quinn")


async def test_change_password_validates_the_new_one(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    await create_user(session, username="rita")
    tokens = await login(client, "rita")
    response = await client.post(
        "/auth/password",
        headers=bearer(tokens["access_token"]),
        json={"current_password": DEFAULT_PASSWORD, "new_password": "short"},
    )
    error = assert_error(response, 422, "VALIDATION_ERROR")
    assert error["details"][0]["loc"] == ["body", "new_password"]


async def test_guest_has_no_password_to_change(client: httpx.AsyncClient) -> None:
    tokens = (await client.post("/auth/guest")).json()
    response = await client.post(
        "/auth/password",
        headers=bearer(tokens["access_token"]),
        json={"current_password": "anything", "new_password": "brand-new-secret"},
    )
    assert_error(response, 403, "FORBIDDEN")


# --- sessions ----------------------------------------------------------------------------


async def test_sessions_list_marks_the_current_one(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    await create_user(session, username="sam")
    first = await login(client, "sam")
    second = await login(client, "sam")
    response = await client.get("/auth/sessions", headers=bearer(second["access_token"]))
    items = response.json()["items"]
    assert len(items) == 2
    by_id = {item["id"]: item for item in items}
    assert by_id[claims_of(second["access_token"])["sid"]]["current"] is True
    assert by_id[claims_of(first["access_token"])["sid"]]["current"] is False
    assert set(items[0]) == {"id", "created_at", "last_activity_at", "user_agent", "ip", "current"}


async def test_deleting_a_session_revokes_it(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    await create_user(session, username="tess")
    mine = await login(client, "tess")
    stolen = await login(client, "tess")
    stolen_sid = claims_of(stolen["access_token"])["sid"]
    response = await client.delete(
        f"/auth/sessions/{stolen_sid}", headers=bearer(mine["access_token"])
    )
    assert response.status_code == 204
    assert_error(
        await client.get("/auth/me", headers=bearer(stolen["access_token"])), 401, "TOKEN_REVOKED"
    )
    assert_error(
        await client.post("/auth/refresh", json={"refresh_token": stolen["refresh_token"]}),
        401,
        "TOKEN_REVOKED",
    )
    listed = await client.get("/auth/sessions", headers=bearer(mine["access_token"]))
    assert [item["id"] for item in listed.json()["items"]] == [
        claims_of(mine["access_token"])["sid"]
    ]
    again = await client.delete(
        f"/auth/sessions/{stolen_sid}", headers=bearer(mine["access_token"])
    )
    assert_error(again, 404, "NOT_FOUND")


async def test_cannot_delete_another_users_session(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    await create_user(session, username="uma")
    await create_user(session, username="vic")
    uma = await login(client, "uma")
    vic = await login(client, "vic")
    vic_sid = claims_of(vic["access_token"])["sid"]
    response = await client.delete(f"/auth/sessions/{vic_sid}", headers=bearer(uma["access_token"]))
    assert_error(response, 404, "NOT_FOUND")
    unknown = await client.delete(
        f"/auth/sessions/{uuid.uuid4()}", headers=bearer(uma["access_token"])
    )
    assert_error(unknown, 404, "NOT_FOUND")
    assert (await client.get("/auth/me", headers=bearer(vic["access_token"]))).status_code == 200


# --- API keys ----------------------------------------------------------------------------


async def test_api_key_is_shown_once_and_works_as_bearer(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    user = await create_user(session, username="walt")
    tokens = await login(client, "walt")
    headers = bearer(tokens["access_token"])
    created = await client.post("/auth/api-keys", headers=headers, json={"name": "CI"})
    assert created.status_code == 201, created.text
    body = created.json()
    assert set(body) == {"id", "name", "prefix", "key", "created_at", "last_used_at"}
    assert body["key"].startswith("hl_")
    assert body["key"].startswith(body["prefix"])
    assert body["last_used_at"] is None
    listed = (await client.get("/auth/api-keys", headers=headers)).json()["items"]
    assert len(listed) == 1
    assert "key" not in listed[0]
    assert body["key"] not in str(listed)
    me = await client.get("/auth/me", headers=bearer(body["key"]))
    assert me.status_code == 200
    assert me.json()["id"] == str(user.id)
    used = (await client.get("/auth/api-keys", headers=headers)).json()["items"]
    assert used[0]["last_used_at"] is not None


async def test_api_key_name_is_validated(client: httpx.AsyncClient, session: AsyncSession) -> None:
    await create_user(session, username="xena")
    tokens = await login(client, "xena")
    response = await client.post(
        "/auth/api-keys", headers=bearer(tokens["access_token"]), json={"name": ""}
    )
    assert_error(response, 422, "VALIDATION_ERROR")


async def test_revoking_unknown_api_key_is_not_found(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    await create_user(session, username="yuri")
    tokens = await login(client, "yuri")
    response = await client.delete(
        f"/auth/api-keys/{uuid.uuid4()}", headers=bearer(tokens["access_token"])
    )
    assert_error(response, 404, "NOT_FOUND")


async def test_openapi_declares_error_envelopes(app: FastAPI, client: httpx.AsyncClient) -> None:
    document = (await client.get("/openapi.json")).json()
    token = document["paths"]["/auth/token"]["post"]["responses"]
    assert {"401", "422", "429"} <= set(token)
    assert "ErrorResponse" in str(token["401"])
    assert app.state.revocations is not None
