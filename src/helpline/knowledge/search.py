"""Hybrid retrieval: full-text ranking fused with dense vectors, plus a calibrated relevance.

How one search runs (`KnowledgeBase.search`):

1. **Freshness.** The process's in-memory index (`IndexSnapshot`: the chunk vectors as one
   numpy matrix, each chunk's word stems, the vocabulary) carries the knowledge base version
   it was built from. Reading the one-row `knowledge_state` table tells whether anything
   changed since — in this process, a job worker, `helpline ingest` or another instance — and
   the index is rebuilt (off the event loop) before searching if so.
2. **Query terms.** The meaningful words of the message (stop words and chatter dropped,
   misspellings corrected against the knowledge base's own vocabulary), OR-ed: FTS5 `MATCH`
   and `websearch_to_tsquery` would otherwise require every word of a long message.
3. **Two rankings.** Full-text (SQLite FTS5 `bm25`, PostgreSQL `ts_rank_cd`) in the database,
   and cosine similarity between the query's embedding and every chunk's in memory (skipped
   with `EMBEDDINGS_PROVIDER=none`). The query is embedded in a thread while the database runs
   the full-text query.
4. **Reciprocal rank fusion.** `score = Σ 1 / (60 + rank)` over both lists: robust to the two
   scores' incomparable scales. That `score` orders the results; it says nothing about how good
   the best one is.
5. **Calibrated relevance.** Each result also gets `relevance` in [0, 1], meant to read as a
   probability that the passage answers the question: a logistic function of the query's
   cosine similarity to it and of the IDF-weighted share of the query's words it contains,
   fitted on the development questions of `bench/`. The extractive answerer thresholds it to
   decide between answering and handing over to a person.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import numpy as np
import structlog
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from helpline.core import telemetry
from helpline.knowledge import repository
from helpline.knowledge.embeddings import EmbeddingProvider, Vectors, from_bytes
from helpline.knowledge.lexicon import Vocabulary, corrected_text, coverage, expand, stems

log = structlog.get_logger(__name__)

RRF_K = 60
CANDIDATES = 50  # per ranking, before fusion
# Words sent to the full-text engine: the rarest ones. A word in most passages barely changes
# the ranking but makes the engine score most of the index (the cost grows with the base).
FTS_TERMS = 12
MAX_K = 50
QUERY_CACHE_SIZE = 1024

# Logistic calibration of `relevance` (see `calibrate`); fitted on bench/questions/dev.jsonl.
SEMANTIC_WEIGHT = 14.0
LEXICAL_WEIGHT = 4.0
SEMANTIC_BIAS = -8.0
LEXICAL_ONLY_WEIGHT = 12.0
LEXICAL_ONLY_BIAS = -3.6

SessionSource = AsyncSession | async_sessionmaker[AsyncSession]


@dataclass(frozen=True, slots=True)
class SearchResult:
    """One passage found for a query."""

    document_id: uuid.UUID
    title: str
    chunk_id: uuid.UUID
    content: str
    score: float  # fused rank score: orders results, comparable within one search only
    relevance: float  # calibrated, in [0, 1]: how likely this passage answers the query
    heading_path: str = ""
    source_url: str | None = None
    position: int = 0
    similarity: float | None = None  # cosine similarity to the query, when vectors exist
    term_coverage: float = 0.0  # IDF-weighted share of the query's words in the passage


def calibrate(similarity: float | None, term_coverage: float) -> float:
    """A probability-like relevance from the cosine similarity and the lexical coverage."""
    if similarity is None:
        z = LEXICAL_ONLY_WEIGHT * term_coverage + LEXICAL_ONLY_BIAS
    else:
        z = SEMANTIC_WEIGHT * similarity + LEXICAL_WEIGHT * term_coverage + SEMANTIC_BIAS
    return 1.0 / (1.0 + math.exp(-z))


@dataclass
class IndexSnapshot:
    """The knowledge base as of `version`, as this process searches it."""

    version: str | None
    chunk_ids: list[uuid.UUID] = field(default_factory=list)
    passage_stems: list[frozenset[str]] = field(default_factory=list)
    vocabulary: Vocabulary = field(default_factory=Vocabulary)
    # Rows of `matrix` are the chunks `vector_rows` (indices into `chunk_ids`).
    matrix: Vectors | None = None
    vector_rows: np.ndarray | None = None
    row_of: dict[uuid.UUID, int] = field(default_factory=dict)
    vector_of: dict[uuid.UUID, int] = field(default_factory=dict)  # chunk → row of `matrix`

    @property
    def size(self) -> int:
        return len(self.chunk_ids)

    @classmethod
    def build(
        cls, rows: Sequence[repository.IndexRow], *, version: str | None, model_id: str | None
    ) -> IndexSnapshot:
        """Build from the database's rows (CPU work: run it in a thread for large bases)."""
        texts = [f"{row.heading_path}\n{row.content}" for row in rows]
        snapshot = cls(
            version=version,
            chunk_ids=[row.chunk_id for row in rows],
            passage_stems=[frozenset(stems(passage)) for passage in texts],
            vocabulary=Vocabulary.build(texts),
        )
        snapshot.row_of = {chunk_id: index for index, chunk_id in enumerate(snapshot.chunk_ids)}
        if model_id is not None:
            vectors: list[Vectors] = []
            indices: list[int] = []
            for index, row in enumerate(rows):
                if row.embedding is not None and row.embedding_model == model_id:
                    vectors.append(from_bytes(row.embedding))
                    indices.append(index)
            if vectors and len({vector.shape[0] for vector in vectors}) == 1:
                snapshot.matrix = np.vstack(vectors).astype(np.float32, copy=False)
                snapshot.vector_rows = np.array(indices, dtype=np.int64)
                snapshot.vector_of = {
                    snapshot.chunk_ids[index]: row for row, index in enumerate(indices)
                }
        return snapshot

    @property
    def vector_count(self) -> int:
        return 0 if self.matrix is None else int(self.matrix.shape[0])


def rrf(rankings: Sequence[Sequence[uuid.UUID]], *, k: int = RRF_K) -> dict[uuid.UUID, float]:
    """Reciprocal rank fusion of several best-first lists."""
    fused: dict[uuid.UUID, float] = {}
    for ranking in rankings:
        for rank, chunk_id in enumerate(ranking, start=1):
            fused[chunk_id] = fused.get(chunk_id, 0.0) + 1.0 / (k + rank)
    return fused


class KnowledgeBase:
    """Retrieval for one process: the embeddings provider and the in-memory index.

    Built once per process (the app's lifespan, the job worker, the CLI) and shared; searches
    may run concurrently.
    """

    def __init__(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        embeddings: EmbeddingProvider,
    ) -> None:
        self.sessionmaker = sessionmaker
        self.embeddings = embeddings
        self._snapshot: IndexSnapshot | None = None
        self._refresh_lock = asyncio.Lock()
        self._warm_up: asyncio.Task[None] | None = None
        self.refreshes = 0  # how many times the index was rebuilt (tests, logs)
        self._query_vectors: OrderedDict[str, Vectors] = OrderedDict()

    async def _embed_query(self, text: str) -> Vectors:
        """The query's vector; recent ones are remembered (customers ask the same things)."""
        cached = self._query_vectors.get(text)
        if cached is not None:
            self._query_vectors.move_to_end(text)
            return cached
        vector = await self.embeddings.embed_query(text)
        self._query_vectors[text] = vector
        if len(self._query_vectors) > QUERY_CACHE_SIZE:
            self._query_vectors.popitem(last=False)
        return vector

    @property
    def method(self) -> str:
        return "hybrid" if self.embeddings.model_id else "fulltext"

    def start_warm_up(self) -> None:
        """Load the embeddings model in the background, so the first search does not wait."""
        if self._warm_up is None and self.embeddings.model_id:

            async def warm_up() -> None:
                try:
                    await self.embeddings.warm_up()
                except Exception:
                    log.exception("knowledge.warm_up_failed")

            self._warm_up = asyncio.create_task(warm_up())

    async def close(self) -> None:
        if self._warm_up is not None and not self._warm_up.done():
            self._warm_up.cancel()
        await self.embeddings.aclose()

    @asynccontextmanager
    async def _session(self, source: SessionSource | None) -> AsyncIterator[AsyncSession]:
        if isinstance(source, AsyncSession):
            yield source
            return
        maker = source if source is not None else self.sessionmaker
        async with maker() as session:
            yield session

    async def snapshot(self, session: AsyncSession) -> IndexSnapshot:
        """The in-memory index, rebuilt first if the knowledge base changed since it was built."""
        version = await repository.read_version(session)
        current = self._snapshot
        if current is not None and current.version == version:
            return current
        async with self._refresh_lock:
            current = self._snapshot
            if current is not None and current.version == version:
                return current
            started = time.perf_counter()
            # The version is read before the rows: a write in between makes the next search
            # rebuild again, never keeps stale rows under a new version.
            rows = await repository.load_index_rows(session)
            model_id = self.embeddings.model_id
            if len(rows) > 500:
                built = await asyncio.to_thread(
                    IndexSnapshot.build, rows, version=version, model_id=model_id
                )
            else:
                built = IndexSnapshot.build(rows, version=version, model_id=model_id)
            self._snapshot = built
            self.refreshes += 1
            log.info(
                "knowledge.index_refreshed",
                chunks=built.size,
                vectors=built.vector_count,
                duration_ms=round((time.perf_counter() - started) * 1000, 1),
            )
            return built

    async def search(
        self,
        session_or_sessionmaker: SessionSource | None = None,
        *,
        query: str,
        k: int = 5,
    ) -> list[SearchResult]:
        """The `k` passages that best match `query`, best first (see the module docstring)."""
        k = max(1, min(k, MAX_K))
        with telemetry.retrieval_span(query, method=self.method) as record:
            results = await self._search(session_or_sessionmaker, query=query, k=k)
            record.results = len(results)
        return results

    async def _search(
        self, source: SessionSource | None, *, query: str, k: int
    ) -> list[SearchResult]:
        query = query.strip()
        if not query:
            return []
        async with self._session(source) as session:
            snapshot = await self.snapshot(session)
            if snapshot.size == 0:
                return []
            terms = snapshot.vocabulary.query_terms(query)
            searched = snapshot.vocabulary.informative(expand(terms), limit=FTS_TERMS)
            embedding_task: asyncio.Task[Vectors] | None = None
            if snapshot.matrix is not None:
                # Typos hurt embeddings as much as full-text: embed the corrected words.
                text = corrected_text(query, snapshot.vocabulary)
                embedding_task = asyncio.create_task(self._embed_query(text))
            try:
                lexical = await repository.fulltext_search(session, searched, limit=CANDIDATES)
                similarities = None
                if embedding_task is not None:
                    query_vector = await embedding_task
                    assert snapshot.matrix is not None
                    similarities = snapshot.matrix @ query_vector[0]
            finally:
                if embedding_task is not None and not embedding_task.done():
                    embedding_task.cancel()
            dense: list[uuid.UUID] = []
            if similarities is not None and snapshot.vector_rows is not None:
                count = min(CANDIDATES, similarities.shape[0])
                best = np.argpartition(-similarities, count - 1)[:count]
                best = best[np.argsort(-similarities[best], kind="stable")]
                rows = snapshot.vector_rows
                dense = [snapshot.chunk_ids[int(rows[index])] for index in best]
            # A chunk deleted since the snapshot was built may still be in the FTS results of
            # a concurrent write; only chunks the snapshot knows are ranked.
            fused = rrf([[cid for cid, _ in lexical if cid in snapshot.row_of], dense])
            ranked = sorted(fused.items(), key=lambda item: (-item[1], str(item[0])))[:k]
            hits = {
                hit.chunk_id: hit
                for hit in await repository.get_chunk_hits(session, [cid for cid, _ in ranked])
            }
        results: list[SearchResult] = []
        for chunk_id, score in ranked:
            hit = hits.get(chunk_id)
            if hit is None:
                continue
            vector_row = snapshot.vector_of.get(chunk_id)
            similarity = (
                float(similarities[vector_row])
                if similarities is not None and vector_row is not None
                else None
            )
            passage = snapshot.passage_stems[snapshot.row_of[chunk_id]]
            share = coverage(terms, passage, snapshot.vocabulary)
            results.append(
                SearchResult(
                    document_id=hit.document_id,
                    title=hit.title,
                    chunk_id=hit.chunk_id,
                    content=hit.content,
                    score=round(score, 6),
                    relevance=round(calibrate(similarity, share), 4),
                    heading_path=hit.heading_path,
                    source_url=hit.source_url,
                    position=hit.position,
                    similarity=None if similarity is None else round(similarity, 4),
                    term_coverage=round(share, 4),
                )
            )
        return results


_current: KnowledgeBase | None = None


def set_current(knowledge: KnowledgeBase | None) -> None:
    """The knowledge base of this process (set by the app's lifespan and the worker)."""
    global _current
    _current = knowledge


def get_current() -> KnowledgeBase:
    if _current is None:
        raise RuntimeError("No knowledge base was started in this process")
    return _current
