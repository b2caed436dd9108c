"""Helpers of the knowledge-base and jobs tests: signed-in clients, uploads, waiting for jobs."""

from __future__ import annotations

import asyncio
import io
import time
import uuid
from dataclasses import dataclass
from typing import Any

import httpx
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from tests.factories import bearer, create_user, login

REFUNDS = """---
title: "Refunds for annual plans"
category: Billing
---

# Refunds for annual plans

Annual subscriptions come with a **30-day money-back window**. See [billing](https://example.com/b).

## The 30-day window

You can get a full refund of an annual charge if you ask within 30 days of the purchase.
After 30 days, annual payments are non-refundable.

## How to ask

1. Go to Settings > Billing > Billing history.
2. Select *Request refund* next to the charge.
"""

PASSWORDS = """# Reset your password

## Forgotten password

On the sign-in page, select Forgot password and enter your email address. We send a reset
link that works for 60 minutes.

## Locked account

After 10 failed sign-in attempts your account is locked for 15 minutes.
"""


@dataclass
class Caller:
    user_id: uuid.UUID
    headers: dict[str, str]


async def sign_in(
    sessionmaker: async_sessionmaker[AsyncSession], client: httpx.AsyncClient, role: str
) -> Caller:
    async with sessionmaker() as session:
        user = await create_user(session, role=role)
    tokens = await login(client, user.username)
    return Caller(user_id=user.id, headers=bearer(tokens["access_token"]))


async def upload_json(client: httpx.AsyncClient, caller: Caller, **body: Any) -> httpx.Response:
    return await client.post("/knowledge/documents", json=body, headers=caller.headers)


async def upload_file(
    client: httpx.AsyncClient,
    caller: Caller,
    filename: str,
    data: bytes,
    content_type: str = "application/octet-stream",
    **fields: str,
) -> httpx.Response:
    return await client.post(
        "/knowledge/documents",
        files={"file": (filename, io.BytesIO(data), content_type)},
        data=fields,
        headers=caller.headers,
    )


async def wait_for_job(
    client: httpx.AsyncClient, caller: Caller, job_id: str, *, within_s: float = 30.0
) -> dict[str, Any]:
    """Poll `GET /jobs/{id}` until the job has finished (complete or failed)."""
    deadline = time.monotonic() + within_s
    # Backing off keeps a long wait under the API's rate limit (100/minute by default).
    interval = 0.02
    while True:
        response = await client.get(f"/jobs/{job_id}", headers=caller.headers)
        assert response.status_code == 200, response.text
        job: dict[str, Any] = response.json()
        if job["status"] in ("complete", "failed"):
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} still {job['status']} after {within_s} s")
        await asyncio.sleep(interval)
        interval = min(1.0, interval * 1.5)


async def ingest_json(client: httpx.AsyncClient, caller: Caller, **body: Any) -> dict[str, Any]:
    """Upload a JSON document and wait for its ingestion; the document afterwards."""
    response = await upload_json(client, caller, **body)
    assert response.status_code == 202, response.text
    job = await wait_for_job(client, caller, response.json()["job_id"])
    assert job["status"] == "complete", job
    document_id = response.json()["document"]["id"]
    document = await client.get(f"/knowledge/documents/{document_id}", headers=caller.headers)
    result: dict[str, Any] = document.json()
    return result


def make_pdf(pages: list[list[str]], *, title: str | None = None) -> bytes:
    """A small valid PDF with one text line per entry (Helvetica), built by hand."""
    objects: list[bytes] = []
    page_ids = [4 + 2 * index for index in range(len(pages))]
    objects.append(b"<< /Type /Catalog /Pages 2 0 R >>")
    kids = " ".join(f"{page_id} 0 R" for page_id in page_ids)
    objects.append(f"<< /Type /Pages /Kids [{kids}] /Count {len(pages)} >>".encode())
    objects.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    for index, lines in enumerate(pages):
        content = ["BT", "/F1 12 Tf", "14 TL", "72 760 Td"]
        for line in lines:
            escaped = line.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
            content.append(f"({escaped}) Tj T*")
        content.append("ET")
        stream = "\n".join(content).encode("latin-1")
        page_id = page_ids[index]
        objects.append(
            f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
            f"/Resources << /Font << /F1 3 0 R >> >> /Contents {page_id + 1} 0 R >>".encode()
        )
        objects.append(f"<< /Length {len(stream)} >>\nstream\n".encode() + stream + b"\nendstream")
    info_id = None
    if title is not None:
        objects.append(f"<< /Title ({title}) >>".encode())
        info_id = len(objects)
    out = io.BytesIO()
    out.write(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(out.tell())
        out.write(f"{number} 0 obj\n".encode() + body + b"\nendobj\n")
    xref = out.tell()
    out.write(f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode())
    for offset in offsets:
        out.write(f"{offset:010d} 00000 n \n".encode())
    trailer = f"<< /Size {len(objects) + 1} /Root 1 0 R"
    if info_id is not None:
        trailer += f" /Info {info_id} 0 R"
    out.write(f"trailer\n{trailer} >>\nstartxref\n{xref}\n%%EOF\n".encode())
    return out.getvalue()
