"""Tokens never reach the logs, whatever the request does with them."""

from __future__ import annotations

import pytest
from sqlalchemy.ext.asyncio import AsyncSession

from tests.auth.conftest import ClientFactory
from tests.factories import bearer, create_user, login


@pytest.mark.parametrize("log_format", ["json", "console"])
async def test_no_token_appears_in_log_output(
    client_with: ClientFactory,
    session: AsyncSession,
    capsys: pytest.CaptureFixture[str],
    log_format: str,
) -> None:
    await create_user(session, username="alice")
    async with client_with(log_level="DEBUG", log_format=log_format) as http:
        tokens = await login(http, "alice")
        access, refresh = tokens["access_token"], tokens["refresh_token"]
        key = (
            await http.post("/auth/api-keys", headers=bearer(access), json={"name": "ci"})
        ).json()["key"]
        await http.get("/auth/me", params={"token": access}, headers=bearer(access))
        await http.get("/auth/me", params={"token": key, "api_key": key})
        renewed = (await http.post("/auth/refresh", json={"refresh_token": refresh})).json()
        await http.post("/auth/refresh", json={"refresh_token": refresh})  # reuse: logged
        await http.post("/auth/token", data={"username": "alice", "password": "wrong-guess"})
        await http.post("/auth/logout", headers=bearer(renewed["access_token"]))
    output = capsys.readouterr()
    logs = output.out + output.err
    # The requests were logged (with their query redacted) ...
    assert "/auth/me?token=[redacted]" in logs
    assert "auth.refresh_token_reused" in logs
    # ... and no credential or password ever was.
    for secret in (access, refresh, key, renewed["access_token"], renewed["refresh_token"]):
        assert secret not in logs
        assert secret.split(".")[-1] not in logs  # not even a JWT's signature
    assert "wrong-guess" not in logs
    assert "correct-horse-battery" not in logs
