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
