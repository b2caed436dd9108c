"""`/admin/users`: administrators create, list, promote and deactivate users."""

from __future__ import annotations

import uuid

import httpx
from sqlalchemy.ext.asyncio import AsyncSession

from tests.auth.helpers import assert_error
from tests.factories import DEFAULT_PASSWORD, bearer, create_user, login


async def _admin_headers(client: httpx.AsyncClient, session: AsyncSession) -> dict[str, str]:
    await create_user(session, username="root", role="admin")
    return bearer((await login(client, "root"))["access_token"])


async def test_admin_creates_user_of_any_role(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    headers = await _admin_headers(client, session)
    response = await client.post(
        "/admin/users",
        headers=headers,
        json={"username": "Agent.Smith", "password": DEFAULT_PASSWORD, "role": "agent"},
    )
    assert response.status_code == 201, response.text
    assert response.json()["role"] == "agent"
    assert response.json()["username"] == "agent.smith"
    tokens = await login(client, "agent.smith")
    assert (await client.get("/auth/me", headers=bearer(tokens["access_token"]))).json()[
        "role"
    ] == "agent"
    duplicate = await client.post(
        "/admin/users",
        headers=headers,
        json={"username": "AGENT.SMITH", "password": DEFAULT_PASSWORD},
    )
    assert_error(duplicate, 409, "USERNAME_TAKEN")


async def test_agents_are_not_admins(client: httpx.AsyncClient, session: AsyncSession) -> None:
    await create_user(session, username="agent", role="agent")
    headers = bearer((await login(client, "agent"))["access_token"])
    assert_error(await client.get("/admin/users", headers=headers), 403, "FORBIDDEN")
    patch = await client.patch(
        f"/admin/users/{uuid.uuid4()}", headers=headers, json={"role": "admin"}
    )
    assert_error(patch, 403, "FORBIDDEN")


async def test_list_users_walks_pages_without_gaps(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    headers = await _admin_headers(client, session)
    created = {str((await create_user(session, role="agent")).id) for _ in range(3)}
    created |= {str((await create_user(session)).id) for _ in range(2)}
    seen: list[str] = []
    cursor: str | None = None
    while True:
        params: dict[str, str | int] = {"limit": 2}
        if cursor:
            params["cursor"] = cursor
        page = (await client.get("/admin/users", headers=headers, params=params)).json()
        assert len(page["items"]) <= 2
        seen += [item["id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == len(set(seen)) == 6  # five plus the admin
    assert created <= set(seen)


async def test_list_users_filters_by_role(client: httpx.AsyncClient, session: AsyncSession) -> None:
    headers = await _admin_headers(client, session)
    agents = {str((await create_user(session, role="agent")).id) for _ in range(2)}
    await create_user(session)
    page = (await client.get("/admin/users", headers=headers, params={"role": "agent"})).json()
    assert {item["id"] for item in page["items"]} == agents
    assert page["next_cursor"] is None


async def test_list_users_rejects_bad_parameters(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    headers = await _admin_headers(client, session)
    for params in ({"limit": 0}, {"limit": 101}, {"role": "superuser"}):
        response = await client.get("/admin/users", headers=headers, params=params)
        assert_error(response, 422, "VALIDATION_ERROR")
    bad_cursor = await client.get("/admin/users", headers=headers, params={"cursor": "%%%"})
    assert_error(bad_cursor, 400, "BAD_REQUEST")


async def test_admin_changes_role(client: httpx.AsyncClient, session: AsyncSession) -> None:
    headers = await _admin_headers(client, session)
    user = await create_user(session, username="carol")
    response = await client.patch(
        f"/admin/users/{user.id}", headers=headers, json={"role": "agent"}
    )
    assert response.status_code == 200
    assert response.json()["role"] == "agent"
    tokens = await login(client, "carol")
    assert (await client.get("/auth/me", headers=bearer(tokens["access_token"]))).json()[
        "role"
    ] == "agent"


async def test_deactivation_revokes_logins_and_reactivation_allows_new_ones(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    headers = await _admin_headers(client, session)
    user = await create_user(session, username="dan")
    tokens = await login(client, "dan")
    off = await client.patch(f"/admin/users/{user.id}", headers=headers, json={"is_active": False})
    assert off.json()["is_active"] is False
    assert_error(
        await client.get("/auth/me", headers=bearer(tokens["access_token"])), 403, "INACTIVE_USER"
    )
    on = await client.patch(f"/admin/users/{user.id}", headers=headers, json={"is_active": True})
    assert on.json()["is_active"] is True
    # The old login stays revoked; signing in again works.
    assert_error(
        await client.get("/auth/me", headers=bearer(tokens["access_token"])), 401, "TOKEN_REVOKED"
    )
    fresh = await login(client, "dan")
    assert (await client.get("/auth/me", headers=bearer(fresh["access_token"]))).status_code == 200


async def test_admin_cannot_lock_themselves_out(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    headers = await _admin_headers(client, session)
    me = (await client.get("/auth/me", headers=headers)).json()
    for body in ({"is_active": False}, {"role": "agent"}):
        response = await client.patch(f"/admin/users/{me['id']}", headers=headers, json=body)
        assert_error(response, 409, "CONFLICT")
    assert (await client.get("/auth/me", headers=headers)).json()["role"] == "admin"


async def test_patch_unknown_user_is_not_found(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    headers = await _admin_headers(client, session)
    response = await client.patch(
        f"/admin/users/{uuid.uuid4()}", headers=headers, json={"role": "agent"}
    )
    assert_error(response, 404, "NOT_FOUND")
    malformed = await client.patch("/admin/users/not-a-uuid", headers=headers, json={})
    assert_error(malformed, 422, "VALIDATION_ERROR")
