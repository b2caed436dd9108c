"""`GET /jobs/{job_id}` (SPEC.md)."""

from __future__ import annotations

import uuid

import httpx
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from helpline.core.database import unit_of_work
from helpline.jobs import service as jobs_service
from tests.knowledge.helpers import sign_in, upload_json, wait_for_job


async def test_an_upload_job_is_visible_to_its_creator_until_complete(
    sessionmaker: async_sessionmaker[AsyncSession], client: httpx.AsyncClient
) -> None:
    agent = await sign_in(sessionmaker, client, "agent")
    response = await upload_json(client, agent, title="Hours", content="We open at 9.")

    job = await wait_for_job(client, agent, response.json()["job_id"])

    assert set(job) == {"id", "status", "result", "error"}
    assert job["id"] == response.json()["job_id"]
    assert job["status"] == "complete"
    assert job["result"] == {"document_id": response.json()["document"]["id"], "chunks": 1}


async def test_an_unknown_job_is_404(
    sessionmaker: async_sessionmaker[AsyncSession], client: httpx.AsyncClient
) -> None:
    agent = await sign_in(sessionmaker, client, "agent")

    response = await client.get(f"/jobs/{uuid.uuid4()}", headers=agent.headers)

    assert response.status_code == 404
    assert response.json()["error"]["code"] == "JOB_NOT_FOUND"


async def test_customers_see_only_their_own_jobs_and_staff_see_all(
    sessionmaker: async_sessionmaker[AsyncSession], client: httpx.AsyncClient
) -> None:
    owner = await sign_in(sessionmaker, client, "customer")
    other = await sign_in(sessionmaker, client, "customer")
    admin = await sign_in(sessionmaker, client, "admin")
    async with unit_of_work(sessionmaker) as session:
        job = await jobs_service.enqueue(
            session, None, name="ingest_document", args={}, created_by=owner.user_id
        )

    mine = await client.get(f"/jobs/{job.id}", headers=owner.headers)
    theirs = await client.get(f"/jobs/{job.id}", headers=other.headers)
    staff = await client.get(f"/jobs/{job.id}", headers=admin.headers)
    anonymous = await client.get(f"/jobs/{job.id}")

    assert (mine.status_code, mine.json()["status"]) == (200, "queued")
    assert theirs.status_code == 404
    assert staff.status_code == 200
    assert anonymous.status_code == 401
