"""The embeddings providers: local all-MiniLM-L6-v2 (loaded once), OpenAI-compatible, none."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from helpline.knowledge import embeddings
from helpline.knowledge.embeddings import (
    LocalEmbeddings,
    NoEmbeddings,
    OpenAIEmbeddings,
    create_embeddings,
    from_bytes,
    to_bytes,
)
from helpline.knowledge.exceptions import EmbeddingsUnavailable
from tests.conftest import make_settings
from tests.knowledge.embeddings_server import DIMENSIONS, EmbeddingsServer


@pytest.fixture
def server() -> Iterator[EmbeddingsServer]:
    with EmbeddingsServer() as running:
        yield running


async def test_the_local_model_is_loaded_once_and_gives_unit_vectors() -> None:
    first, second = LocalEmbeddings(), LocalEmbeddings()

    vectors = await first.embed_documents(
        ["How do I reset my password?", "Forgot password: use the reset link", "Pizza recipes"]
    )
    query = await second.embed_query("I can't remember my password")

    assert vectors.shape == (3, 384)
    assert query.shape == (1, 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    similarities = vectors @ query[0]
    assert similarities[0] > similarities[2]
    assert similarities[1] > similarities[2]
    assert embeddings.load_local_model("all-MiniLM-L6-v2") is embeddings._models["all-MiniLM-L6-v2"]
    assert len(embeddings._models) == 1
    assert first.model_id == "local:all-MiniLM-L6-v2"


async def test_the_openai_provider_batches_orders_and_normalises(
    server: EmbeddingsServer,
) -> None:
    provider = OpenAIEmbeddings(model="test-embed", base_url=server.base_url, max_retries=0)
    texts = [f"text number {index}" for index in range(300)]

    vectors = await provider.embed_documents(texts)
    query = await provider.embed_query("text number 7")

    assert vectors.shape == (300, DIMENSIONS)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert np.allclose(vectors[7], query[0], atol=1e-6)  # the server answered out of order
    batches = [len(request["body"]["input"]) for request in server.requests]
    assert batches == [128, 128, 44, 1]
    assert all(request["body"]["model"] == "test-embed" for request in server.requests)
    assert provider.model_id == "openai:test-embed"
    await provider.aclose()


async def test_an_openai_failure_is_a_transient_error(server: EmbeddingsServer) -> None:
    provider = OpenAIEmbeddings(base_url=server.base_url, max_retries=0)
    server.fail_next(1)

    with pytest.raises(EmbeddingsUnavailable, match="embeddings server failed"):
        await provider.embed_documents(["hello"])

    assert (await provider.embed_documents(["hello"])).shape == (1, DIMENSIONS)
    await provider.aclose()


async def test_none_makes_no_vectors() -> None:
    provider = NoEmbeddings()

    assert provider.model_id is None
    assert (await provider.embed_documents(["a", "b"])).shape == (2, 0)


def test_the_provider_follows_the_setting(tmp_path: Path) -> None:
    def build(**values: object) -> object:
        return create_embeddings(make_settings("sqlite://", tmp_path, **values))

    assert isinstance(build(embeddings_provider="none"), NoEmbeddings)
    assert isinstance(build(embeddings_provider="local"), LocalEmbeddings)
    openai = build(embeddings_provider="openai", embeddings_model="nomic-embed-text")
    assert isinstance(openai, OpenAIEmbeddings)
    assert openai.model == "nomic-embed-text"
    # Unset: local when the extra is installed (it is, in the test environment).
    assert embeddings.local_available()
    assert isinstance(build(embeddings_provider=None), LocalEmbeddings)


def test_vectors_round_trip_through_bytes() -> None:
    vector = np.array([0.25, -0.5, 1.0], dtype=np.float32)

    assert np.array_equal(from_bytes(to_bytes(vector)), vector)
