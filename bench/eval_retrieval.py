"""Retrieval quality and speed of the knowledge base, on a folder of articles and question sets.

    python bench/eval_retrieval.py                           # examples/kb, dev + hold-out sets
    python bench/eval_retrieval.py --embeddings none          # full-text only
    python bench/eval_retrieval.py --questions my.jsonl --kb path/to/articles

Each question file is JSONL: `{"question": "...", "article": "<file name without extension>"}`,
or `"article": null` for a question the articles do not answer. For each file it prints

- recall@1, recall@3 and MRR over the answerable questions (articles ranked by their best
  passage among the top 10 search results);
- for the unanswerable ones, how often the extractive answerer says it does not know (and,
  for the answerable ones, how often it answers from the right article);

then the search latency (p50, p95) on the loaded base and on a synthetic base of
`--synthetic-chunks` chunks (10,000 by default), and the time the ingestion of the base took.
Everything runs in this process on a fresh SQLite database in a temporary folder, or on
`--database-url` (which must be empty and migrated).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from helpline.agents.extractive import DONT_KNOW, ExtractiveAnswerer
from helpline.agents.schemas import AnswerRequest
from helpline.core import migrations
from helpline.core.config import Settings
from helpline.core.database import create_engine, create_sessionmaker, unit_of_work
from helpline.knowledge import repository
from helpline.knowledge import service as knowledge_service
from helpline.knowledge.embeddings import to_bytes
from helpline.knowledge.models import Chunk, Document, DocumentKind, DocumentStatus
from helpline.knowledge.search import KnowledgeBase

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_KB = ROOT / "examples" / "kb"
DEFAULT_QUESTIONS = [
    ROOT / "bench" / "questions" / "dev.jsonl",
    ROOT / "bench" / "questions" / "holdout.jsonl",
]
RANKED = 10


@dataclass
class Report:
    name: str
    answerable: int = 0
    hits_at_1: int = 0
    hits_at_3: int = 0
    reciprocal_ranks: list[float] = field(default_factory=list)
    unanswerable: int = 0
    said_dont_know: int = 0
    answered_right: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    cpu_ms: list[float] = field(default_factory=list)  # CPU time of this process per search
    misses: list[str] = field(default_factory=list)

    def line(self) -> str:
        recall1 = self.hits_at_1 / self.answerable if self.answerable else 0.0
        recall3 = self.hits_at_3 / self.answerable if self.answerable else 0.0
        mrr = sum(self.reciprocal_ranks) / self.answerable if self.answerable else 0.0
        dont_know = self.said_dont_know / self.unanswerable if self.unanswerable else 0.0
        right = self.answered_right / self.answerable if self.answerable else 0.0
        return (
            f"{self.name:<10} n={self.answerable:>3}+{self.unanswerable:<3} "
            f"recall@1={recall1:.3f}  recall@3={recall3:.3f}  MRR={mrr:.3f}  "
            f"unanswerable→don't know={dont_know:.3f}  answered from the right article={right:.3f}"
        )


def load_questions(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as file:
        return [json.loads(line) for line in file if line.strip()]


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return 0.0
    index = min(len(ordered) - 1, max(0, round(share * (len(ordered) - 1))))
    return ordered[index]


async def evaluate(
    knowledge: KnowledgeBase,
    answerer: ExtractiveAnswerer,
    questions: list[dict[str, Any]],
    article_of: dict[uuid.UUID, str],
    name: str,
    verbose: bool,
) -> Report:
    report = Report(name=name)
    for item in questions:
        question, expected = item["question"], item.get("article")
        started, cpu_started = time.perf_counter(), time.process_time()
        results = await knowledge.search(query=question, k=RANKED)
        report.latencies_ms.append((time.perf_counter() - started) * 1000)
        report.cpu_ms.append((time.process_time() - cpu_started) * 1000)
        articles: list[str] = []
        for result in results:
            article = article_of.get(result.document_id, "?")
            if article not in articles:
                articles.append(article)
        request = AnswerRequest(
            conversation_id=uuid.uuid4(),
            user_id=uuid.uuid4(),
            assistant_message_id=uuid.uuid4(),
            question=question,
        )
        text, used, _ = await answerer.compose(request)
        said_dont_know = text == DONT_KNOW
        best = results[0] if results else None
        detail = (
            f"  top={articles[:3]} relevance={best.relevance if best else None} "
            f"sim={best.similarity if best else None} cov={best.term_coverage if best else None}"
        )
        if expected is None:
            report.unanswerable += 1
            report.said_dont_know += said_dont_know
            if not said_dont_know:
                report.misses.append(f"answered an unanswerable question: {question!r}{detail}")
            continue
        report.answerable += 1
        rank = articles.index(expected) + 1 if expected in articles else None
        report.hits_at_1 += rank == 1
        report.hits_at_3 += rank is not None and rank <= 3
        report.reciprocal_ranks.append(1.0 / rank if rank else 0.0)
        if used and article_of.get(used[0].document_id) == expected:
            report.answered_right += 1
        if rank != 1 or said_dont_know:
            report.misses.append(
                f"{expected} at rank {rank}{' (said it does not know)' if said_dont_know else ''}: "
                f"{question!r}{detail}"
            )
    if verbose:
        for miss in report.misses:
            print(f"    {miss}")
    return report


async def synthetic_latency(
    settings: Settings, knowledge_template: KnowledgeBase, questions: list[str], chunks: int
) -> tuple[float, float, float]:
    """Search latency (p50, p95 ms) on `chunks` synthetic chunks; and how long loading took.

    Passages are made of sentences of the real articles, shuffled and recombined, so that
    full-text posting lists look like real ones. Their vectors are random unit vectors of the
    model's size: the cost of a search does not depend on what the vectors hold, and
    embedding 10,000 passages would only time the model. Queries are embedded for real.
    """
    engine = create_engine(settings)
    sessionmaker = create_sessionmaker(engine)
    rng = random.Random(7)
    async with sessionmaker() as session:
        rows = await repository.load_index_rows(session)
    sentences = [
        s.strip() for row in rows for s in row.content.replace("\n", " ").split(". ") if s.strip()
    ]
    model_id = knowledge_template.embeddings.model_id
    dimensions = 0
    if model_id:
        dimensions = int((await knowledge_template.embeddings.embed_query("probe")).shape[1])
    per_document = 20
    started = time.perf_counter()
    for first in range(0, chunks, 2000):
        async with unit_of_work(sessionmaker) as session:
            for document_index in range(
                first // per_document, min(chunks, first + 2000) // per_document
            ):
                title = f"Synthetic article {document_index}"
                document = Document(
                    title=title,
                    source_key=knowledge_service.source_key(None, title),
                    kind=DocumentKind.MARKDOWN,
                    status=DocumentStatus.READY,
                    chunk_count=per_document,
                    revision=1,
                    content_hash="synthetic",
                    source_text="synthetic",
                )
                session.add(document)
                await session.flush()
                for position in range(per_document):
                    text = ". ".join(rng.sample(sentences, 4)) + "."
                    vector = None
                    if model_id:
                        import numpy as np

                        raw = np.random.default_rng(rng.randrange(1 << 30)).standard_normal(
                            dimensions
                        )
                        vector = to_bytes((raw / np.linalg.norm(raw)).astype("float32"))
                    session.add(
                        Chunk(
                            document_id=document.id,
                            position=position,
                            heading_path=f"{title} > Section {position}",
                            content=text,
                            token_count=len(text) // 4,
                            embedding=vector,
                            embedding_model=model_id,
                            search_rowid=rng.randrange(1, 1 << 62),
                        )
                    )
            await repository.bump_version(session)
    loading_s = time.perf_counter() - started
    knowledge = KnowledgeBase(sessionmaker, knowledge_template.embeddings)
    await knowledge.search(query="warm up the index", k=5)  # builds the in-memory index once
    latencies = []
    cpu = []
    for question in questions:
        begun, cpu_begun = time.perf_counter(), time.process_time()
        await knowledge.search(query=question, k=5)
        latencies.append((time.perf_counter() - begun) * 1000)
        cpu.append((time.process_time() - cpu_begun) * 1000)
    await engine.dispose()
    print(f"  (synthetic base: CPU time per search p50={percentile(cpu, 0.5):.1f} ms)")
    return percentile(latencies, 0.5), percentile(latencies, 0.95), loading_s


async def main(arguments: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="helpline-eval-"))
    database_url = arguments.database_url or f"sqlite+aiosqlite:///{workdir / 'kb.db'}"
    if not arguments.database_url:
        await asyncio.to_thread(migrations.upgrade, database_url)
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        database_url=database_url,
        embeddings_provider=arguments.embeddings,
        environment="test",
        log_level="WARNING",
    )
    from helpline.core.logging import configure_logging

    configure_logging("WARNING", "console")
    engine = create_engine(settings)
    sessionmaker = create_sessionmaker(engine)
    knowledge = await knowledge_service.start_knowledge_base(settings, sessionmaker, warm_up=False)
    model = knowledge.embeddings.model_id or "full-text only"
    print(f"embeddings: {knowledge.embeddings.name} ({model})")

    model_started = time.perf_counter()
    await knowledge.embeddings.warm_up()
    model_s = time.perf_counter() - model_started
    files = knowledge_service.collect_files([arguments.kb], exclude_names=["README.md"])
    started, cpu_started = time.perf_counter(), time.process_time()
    outcomes = await knowledge_service.ingest_paths(
        sessionmaker, knowledge, files, max_bytes=settings.max_upload_bytes
    )
    ingest_s = time.perf_counter() - started
    ingest_cpu_s = time.process_time() - cpu_started
    failed = [outcome for outcome in outcomes if outcome.status == "failed"]
    if failed:
        for outcome in failed:
            print(f"failed to ingest {outcome.path}: {outcome.error}", file=sys.stderr)
        return 1
    article_of = {
        outcome.document_id: outcome.path.stem for outcome in outcomes if outcome.document_id
    }
    chunks = sum(outcome.chunks for outcome in outcomes)
    print(
        f"ingested {len(outcomes)} articles ({chunks} chunks) in {ingest_s:.1f} s "
        f"(CPU time {ingest_cpu_s:.1f} s; + {model_s:.1f} s loading the embeddings model)"
    )

    answerer = ExtractiveAnswerer(knowledge)
    await knowledge.search(query="warm up", k=1)  # the index is built once, not timed below
    all_latencies: list[float] = []
    all_cpu: list[float] = []
    all_questions: list[str] = []
    for path in arguments.questions:
        questions = load_questions(path)
        report = await evaluate(
            knowledge, answerer, questions, article_of, path.stem, arguments.verbose
        )
        print(report.line())
        all_latencies += report.latencies_ms
        all_cpu += report.cpu_ms
        all_questions += [item["question"] for item in questions]
    print(
        f"search latency, {len(outcomes)} articles: p50={percentile(all_latencies, 0.5):.1f} ms "
        f"p95={percentile(all_latencies, 0.95):.1f} ms (k={RANKED}, {len(all_latencies)} queries; "
        f"CPU time p50={percentile(all_cpu, 0.5):.1f} ms)"
    )
    if knowledge.embeddings.model_id:
        embedding_ms = []
        for question in all_questions:
            begun = time.perf_counter()
            await knowledge.embeddings.embed_query(question)
            embedding_ms.append((time.perf_counter() - begun) * 1000)
        print(
            f"  of which embedding the query alone: p50={percentile(embedding_ms, 0.5):.1f} ms "
            f"p95={percentile(embedding_ms, 0.95):.1f} ms"
        )
    if arguments.synthetic_chunks:
        synthetic_dir = Path(tempfile.mkdtemp(prefix="helpline-eval-synthetic-"))
        synthetic_url = f"sqlite+aiosqlite:///{synthetic_dir / 'kb.db'}"
        await asyncio.to_thread(migrations.upgrade, synthetic_url)
        synthetic_settings = settings.model_copy(update={"database_url": synthetic_url})
        p50, p95, loading_s = await synthetic_latency_with_source(
            synthetic_settings, sessionmaker, knowledge, all_questions, arguments.synthetic_chunks
        )
        print(
            f"search latency, {arguments.synthetic_chunks} synthetic chunks: p50={p50:.1f} ms "
            f"p95={p95:.1f} ms (k=5; base written in {loading_s:.1f} s)"
        )
    await knowledge_service.stop_knowledge_base(knowledge)
    await engine.dispose()
    return 0


async def synthetic_latency_with_source(
    settings: Settings,
    source_sessionmaker: Any,
    knowledge: KnowledgeBase,
    questions: list[str],
    chunks: int,
) -> tuple[float, float, float]:
    """Copy the real sentences over, then measure on the synthetic base."""
    async with source_sessionmaker() as session:
        rows = await repository.load_index_rows(session)
    engine = create_engine(settings)
    sessionmaker = create_sessionmaker(engine)
    async with unit_of_work(sessionmaker) as session:
        seed = Document(
            title="Seed",
            source_key=knowledge_service.source_key(None, "Seed"),
            kind=DocumentKind.MARKDOWN,
            status=DocumentStatus.READY,
            chunk_count=len(rows),
            revision=1,
            content_hash="seed",
            source_text="seed",
        )
        session.add(seed)
        await session.flush()
        for position, row in enumerate(rows):
            session.add(
                Chunk(
                    document_id=seed.id,
                    position=position,
                    heading_path=row.heading_path,
                    content=row.content,
                    token_count=len(row.content) // 4,
                    embedding=row.embedding,
                    embedding_model=row.embedding_model,
                    search_rowid=random.randrange(1, 1 << 62),
                )
            )
        await repository.bump_version(session)
    await engine.dispose()
    return await synthetic_latency(settings, knowledge, questions, max(0, chunks - len(rows)))


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kb", type=Path, default=DEFAULT_KB, help="folder of articles")
    parser.add_argument("--questions", type=Path, nargs="+", default=DEFAULT_QUESTIONS)
    parser.add_argument(
        "--embeddings",
        choices=["local", "openai", "none"],
        default=None,
        help="EMBEDDINGS_PROVIDER (default: what is installed)",
    )
    parser.add_argument("--database-url", default=None)
    parser.add_argument("--synthetic-chunks", type=int, default=10_000, help="0 to skip")
    parser.add_argument("--verbose", "-v", action="store_true", help="list the misses")
    return parser.parse_args()


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_arguments())))
