"""`helpline create-user`."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncSession
from typer.testing import CliRunner, Result

from helpline import cli
from helpline.core.config import Settings
from tests.factories import bearer, create_user, login


@pytest.fixture
def runner(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.setattr(cli, "_settings", lambda: settings)
    return CliRunner()


async def _invoke(runner: CliRunner, args: list[str], stdin: str | None = None) -> Result:
    # The command runs its own event loop; keep it off the test's.
    return await asyncio.to_thread(runner.invoke, cli.app, args, input=stdin)


async def test_create_user_with_password(runner: CliRunner, client: httpx.AsyncClient) -> None:
    result = await _invoke(
        runner, ["create-user", "Boss", "--role", "admin", "--password", "long-enough-pw"]
    )
    assert result.exit_code == 0, result.output
    assert "Created admin boss" in result.output
    tokens = await login(client, "boss", "long-enough-pw")
    me = (await client.get("/auth/me", headers=bearer(tokens["access_token"]))).json()
    assert me["role"] == "admin"


async def test_create_user_prompts_for_hidden_password(
    runner: CliRunner, client: httpx.AsyncClient
) -> None:
    result = await _invoke(
        runner, ["create-user", "agent7", "--role", "agent"], stdin="prompted-pw1\nprompted-pw1\n"
    )
    assert result.exit_code == 0, result.output
    assert "prompted-pw1" not in result.output  # hidden input
    await login(client, "agent7", "prompted-pw1")


async def test_create_user_refuses_taken_username(runner: CliRunner, session: AsyncSession) -> None:
    await create_user(session, username="taken")
    result = await _invoke(
        runner, ["create-user", "TAKEN", "--role", "agent", "--password", "long-enough-pw"]
    )
    assert result.exit_code == 1
    assert "already taken" in result.output


async def test_create_user_explains_invalid_input(runner: CliRunner, session: AsyncSession) -> None:
    del session  # the tables are emptied after the test
    bad_role = await _invoke(
        runner, ["create-user", "someone", "--role", "boss", "--password", "long-enough-pw"]
    )
    assert bad_role.exit_code == 1
    assert "role" in bad_role.output
    short = await _invoke(runner, ["create-user", "someone", "--role", "agent", "--password", "x"])
    assert short.exit_code == 1
    assert "at least 8" in short.output
