"""The `helpline` command: serve, worker, migrate, create-user, ingest, openapi."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
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
        # The app answers frames over WS_MAX_FRAME_BYTES with an error frame; the transport
        # refuses only much larger ones (1009), so a client's mistake doesn't cost its socket.
        ws_max_size=settings.ws_max_frame_bytes * 16,
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


async def _ingest(settings: Settings, paths: list[Path]) -> int:
    """Load files into the knowledge base with a progress bar; the number of failures."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
    from rich.table import Table

    from helpline.core.database import create_engine, create_sessionmaker
    from helpline.knowledge import service as knowledge_service

    console = Console()
    files = knowledge_service.collect_files(paths)
    if not files:
        console.print("[yellow]No .md, .txt, .html or .pdf files found.[/yellow]")
        return 0
    engine = create_engine(settings)
    knowledge = await knowledge_service.start_knowledge_base(
        settings, create_sessionmaker(engine), warm_up=False
    )
    try:
        with Progress(
            TextColumn("[bold]Ingesting"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.description}"),
            console=console,
        ) as progress:
            task = progress.add_task("", total=len(files))

            def advance(outcome: knowledge_service.IngestOutcome) -> None:
                progress.update(task, advance=1, description=outcome.path.name)

            outcomes = await knowledge_service.ingest_paths(
                knowledge.sessionmaker,
                knowledge,
                files,
                max_bytes=settings.max_upload_bytes,
                on_progress=advance,
            )
    finally:
        await knowledge_service.stop_knowledge_base(knowledge)
        await engine.dispose()
    table = Table(title=f"Knowledge base ({knowledge.embeddings.name} embeddings)")
    for column in ("file", "status", "chunks", "title / error"):
        table.add_column(column)
    colours = {"added": "green", "updated": "cyan", "unchanged": "dim", "failed": "red"}
    for outcome in outcomes:
        colour = colours.get(outcome.status, "white")
        table.add_row(
            str(outcome.path),
            f"[{colour}]{outcome.status}[/{colour}]",
            str(outcome.chunks),
            outcome.error or outcome.title or "",
        )
    console.print(table)
    return sum(1 for outcome in outcomes if outcome.status == "failed")


@app.command()
def ingest(
    paths: Annotated[
        list[Path], typer.Argument(help="Files or folders (.md, .txt, .html, .pdf).", exists=True)
    ],
) -> None:
    """Load files into the knowledge base now, in this process (replacing earlier copies)."""
    settings = _settings()
    _prepare_database(settings)
    failures = asyncio.run(_ingest(settings, paths))
    if failures:
        raise typer.Exit(1)


@app.command()
def worker() -> None:
    """Run background jobs from Redis (needs REDIS_URL; without it `serve` runs them itself)."""
    settings = _settings()
    if not settings.redis_url:
        typer.secho(
            "helpline worker needs REDIS_URL: without Redis, `helpline serve` runs the jobs "
            "in-process.",
            fg="red",
            err=True,
        )
        raise typer.Exit(2)
    from helpline.core import metrics
    from helpline.core.logging import configure_logging
    from helpline.jobs.worker import run_worker

    configure_logging(settings.log_level, settings.log_format)
    server, _ = metrics.start_worker_metrics_server(settings.worker_metrics_port)
    try:
        asyncio.run(run_worker(settings))
    finally:
        server.shutdown()
        server.server_close()


if __name__ == "__main__":  # pragma: no cover
    app()
