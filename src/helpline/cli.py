"""The `helpline` command: serve, migrate, create-user, openapi."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Annotated

import typer
import uvicorn
from pydantic import ValidationError

from helpline.core import migrations
from helpline.core.config import Settings, get_settings

app = typer.Typer(
    help="Helpline: a self-hostable customer-support AI backend.",
    no_args_is_help=True,
    add_completion=False,
)


def _settings() -> Settings:
    try:
        return get_settings()
    except ValidationError as exc:
        for error in exc.errors():
            where = ".".join(str(part) for part in error["loc"]) or "settings"
            typer.secho(f"Configuration error ({where}): {error['msg']}", fg="red", err=True)
        raise typer.Exit(2) from exc


def _prepare_database(settings: Settings) -> None:
    """Apply migrations (development) or refuse an outdated schema (production)."""
    if settings.should_auto_migrate:
        migrations.upgrade(settings.database_url)
    elif not migrations.is_up_to_date(settings):
        typer.secho(
            "The database schema is not up to date: run `helpline migrate` first "
            "(or set AUTO_MIGRATE=true).",
            fg="red",
            err=True,
        )
        raise typer.Exit(1)


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes (>1 needs REDIS_URL).")] = 1,
    reload: Annotated[bool, typer.Option(help="Restart on code changes (development).")] = False,
    ws: Annotated[str, typer.Option(help="WebSocket implementation.")] = "wsproto",
) -> None:
    """Run the API server (one-time set-up runs first, before any worker starts)."""
    settings = _settings()
    if workers > 1 and not settings.redis_url:
        typer.secho(
            "--workers > 1 needs REDIS_URL: without Redis each worker would keep its own "
            "streams, limits and sockets.",
            fg="red",
            err=True,
        )
        raise typer.Exit(2)
    _prepare_database(settings)
    settings.resolve_jwt_secret()  # generated once here, not raced by the workers
    from helpline import bootstrap

    asyncio.run(bootstrap.prepare(settings))
    from helpline.core import metrics

    metrics.prepare_multiprocess_dir(settings)  # before the workers start: they inherit it
    uvicorn.run(
        "helpline.main:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        reload=reload,
        ws=ws,
        access_log=False,
        log_config=None,
        proxy_headers=True,
        # A backstop only: the app drains within SHUTDOWN_GRACE_S before uvicorn stops.
        timeout_graceful_shutdown=int(settings.shutdown_grace_s) + 5,
    )


@app.command()
def migrate(
    revision: Annotated[str, typer.Argument(help="Target revision.")] = "head",
) -> None:
    """Apply database migrations."""
    settings = _settings()
    migrations.upgrade(settings.database_url, revision)
    typer.echo(f"Database migrated to {revision}.")


class _CommandError(Exception):
    pass


async def _create_user(settings: Settings, *, username: str, password: str, role: str) -> str:
    """Validate like the API does, then create the account in its own unit of work."""
    from sqlalchemy.exc import DBAPIError

    from helpline.auth import service as auth_service
    from helpline.auth.exceptions import UsernameTaken
    from helpline.auth.schemas import AdminUserCreate
    from helpline.core.database import create_engine, create_sessionmaker, unit_of_work

    try:
        data = AdminUserCreate(username=username, password=password, role=role)
    except ValidationError as exc:
        reasons = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise _CommandError(f"Invalid account: {reasons}") from exc
    engine = create_engine(settings)
    try:
        async with unit_of_work(create_sessionmaker(engine)) as session:
            user = await auth_service.admin_create_user(session, data=data)
    except UsernameTaken as exc:
        raise _CommandError(f"The username {data.username!r} is already taken.") from exc
    except DBAPIError as exc:
        raise _CommandError(
            f"Could not write to the database ({type(exc.orig).__name__}); "
            "is it reachable and migrated (`helpline migrate`)?"
        ) from exc
    finally:
        await engine.dispose()
    return f"Created {user.role.value} {user.username} ({user.id})."


@app.command("create-user")
def create_user(
    username: Annotated[str, typer.Argument(help="3 to 40 letters, digits, '.', '_' or '-'.")],
    role: Annotated[str, typer.Option(help="customer, agent or admin.")],
    password: Annotated[
        str | None, typer.Option(help="Prompted for (hidden, twice) when left out.")
    ] = None,
) -> None:
    """Create an account of any role (e.g. the first administrator)."""
    settings = _settings()
    if password is None:
        password = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    try:
        message = asyncio.run(
            _create_user(settings, username=username, password=password, role=role)
        )
    except _CommandError as exc:
        typer.secho(str(exc), fg="red", err=True)
        raise typer.Exit(1) from exc
    typer.echo(message)


@app.command()
def openapi(
    indent: Annotated[int, typer.Option(help="JSON indentation.")] = 2,
) -> None:
    """Print the OpenAPI document (also in production, where /openapi.json is off)."""
    from helpline.main import create_app

    document = create_app(_settings()).openapi()
    sys.stdout.write(json.dumps(document, indent=indent) + "\n")


if __name__ == "__main__":  # pragma: no cover
    app()
