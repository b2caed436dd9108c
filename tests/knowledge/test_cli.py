"""`helpline ingest PATH…` on a temporary folder, and the demo knowledge base at start-up."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from helpline import bootstrap
from helpline.cli import app as cli
from helpline.core import migrations
from helpline.core.config import Settings, get_settings
from helpline.core.database import create_engine, create_sessionmaker
from helpline.knowledge.models import Document, DocumentStatus
from tests.conftest import make_settings
from tests.knowledge.helpers import PASSWORDS, REFUNDS, make_pdf


@pytest.fixture
def database_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    url = f"sqlite+aiosqlite:///{tmp_path / 'cli.db'}"
    migrations.upgrade(url)
    monkeypatch.setenv("DATABASE_URL", url)
    monkeypatch.setenv("ENVIRONMENT", "test")
    monkeypatch.setenv("EMBEDDINGS_PROVIDER", "none")
    monkeypatch.setenv("AUTO_MIGRATE", "false")
    monkeypatch.setenv("LOG_LEVEL", "WARNING")
    get_settings.cache_clear()
    yield url
    get_settings.cache_clear()


def documents(url: str) -> list[Document]:
    async def load() -> list[Document]:
        engine = create_engine(Settings(_env_file=None, database_url=url))  # type: ignore[call-arg]
        try:
            async with create_sessionmaker(engine)() as session:
                result = await session.execute(select(Document).order_by(Document.title))
                return list(result.scalars())
        finally:
            await engine.dispose()

    return asyncio.run(load())


def test_ingest_loads_a_folder_reports_each_file_and_fails_on_bad_ones(
    database_file: str, tmp_path: Path
) -> None:
    folder = tmp_path / "articles"
    (folder / "nested").mkdir(parents=True)
    (folder / "refunds.md").write_text(REFUNDS)
    (folder / "nested" / "passwords.md").write_text(PASSWORDS)
    (folder / "guide.pdf").write_bytes(make_pdf([["Exports take 48 hours."]], title="Exports"))
    (folder / "broken.pdf").write_bytes(b"%PDF-1.4 broken")
    (folder / "image.png").write_bytes(b"\x89PNG")  # not a supported type: not even listed
    (folder / ".hidden.md").write_text("# Hidden\n\nSkipped.")

    result = CliRunner().invoke(cli, ["ingest", str(folder)], terminal_width=200)

    assert result.exit_code == 1, result.output
    assert "refunds.md" in result.output
    assert "added" in result.output
    assert "malformed" in result.output
    assert "image.png" not in result.output
    titles = {document.title: document.status for document in documents(database_file)}
    assert titles == {
        "Exports": DocumentStatus.READY,
        "Refunds for annual plans": DocumentStatus.READY,
        "Reset your password": DocumentStatus.READY,
    }


def test_ingesting_again_changes_nothing_that_did_not_change(
    database_file: str, tmp_path: Path
) -> None:
    article = tmp_path / "refunds.md"
    article.write_text(REFUNDS)
    runner = CliRunner()
    assert runner.invoke(cli, ["ingest", str(article)]).exit_code == 0
    first = documents(database_file)

    again = runner.invoke(cli, ["ingest", str(article)], terminal_width=200)
    article.write_text(REFUNDS.replace("30 days", "45 days"))
    changed = runner.invoke(cli, ["ingest", str(article)], terminal_width=200)

    assert "unchanged" in again.output
    assert "updated" in changed.output
    [document] = documents(database_file)
    assert document.id == first[0].id
    assert document.revision == first[0].revision + 1


def test_a_missing_path_is_a_usage_error(database_file: str, tmp_path: Path) -> None:
    del database_file
    result = CliRunner().invoke(cli, ["ingest", str(tmp_path / "nope")])

    assert result.exit_code == 2


async def test_the_demo_knowledge_base_fills_an_empty_database_once(
    database_url: str, tmp_path: Path
) -> None:
    settings = make_settings(database_url, tmp_path, embeddings_provider="none", demo_kb=True)
    folder = bootstrap.find_demo_kb()
    assert folder is not None
    assert (folder / "billing-refunds.md").is_file()

    loaded = await bootstrap.load_demo_kb(settings)
    again = await bootstrap.load_demo_kb(settings)

    try:
        assert len(loaded) == 30
        assert all(outcome.status == "added" for outcome in loaded)
        assert "README.md" not in {outcome.path.name for outcome in loaded}
        assert again == []  # not empty any more: nothing loaded
    finally:
        engine = create_engine(settings)
        from sqlalchemy import delete

        from helpline.knowledge.models import Chunk

        async with engine.begin() as connection:
            await connection.execute(delete(Chunk))
            await connection.execute(delete(Document))
        await engine.dispose()
