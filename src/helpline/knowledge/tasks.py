"""The knowledge base's background jobs.

- `ingest_document` `{"document_id", "revision"}`: parse, chunk, embed and index an upload.
  Unreadable content fails the document at once with its error; transient failures (the
  embeddings server, the database) are retried with backoff, and a document whose retries run
  out is marked `failed` with the last error — never left `processing`.
- `reembed_all` `{}`: give every chunk a vector of the current embeddings model (queued at
  start-up when the model changed).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

from helpline.jobs.registry import JobContext, task
from helpline.knowledge import service


async def _ingestion_failed(ctx: JobContext, args: Mapping[str, Any], error: str) -> None:
    await service.fail_document(
        ctx.sessionmaker,
        document_id=uuid.UUID(str(args["document_id"])),
        revision=args.get("revision"),
        error=error,
    )


@task(service.INGEST_JOB, on_failure=_ingestion_failed)
async def ingest_document(ctx: JobContext, args: Mapping[str, Any]) -> dict[str, Any]:
    return await service.ingest_document(
        ctx.sessionmaker,
        ctx.knowledge,
        document_id=uuid.UUID(str(args["document_id"])),
        revision=args.get("revision"),
    )


@task(service.REEMBED_JOB)
async def reembed_all(ctx: JobContext, args: Mapping[str, Any]) -> dict[str, Any]:
    del args
    return await service.reembed_all(ctx.sessionmaker, ctx.knowledge)
