"""The knowledge base REST API (SPEC.md: Knowledge base), on SQLite and PostgreSQL."""

from __future__ import annotations

import codecs
import uuid

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from tests.knowledge.helpers import (
    PASSWORDS,
    REFUNDS,
    Caller,
    ingest_json,
    make_pdf,
    sign_in,
    upload_file,
    upload_json,
    wait_for_job,
)


@pytest.fixture
async def agent(
    sessionmaker: async_sessionmaker[AsyncSession], client: httpx.AsyncClient
) -> Caller:
    return await sign_in(sessionmaker, client, "agent")


@pytest.fixture
async def customer(
    sessionmaker: async_sessionmaker[AsyncSession], client: httpx.AsyncClient
) -> Caller:
    return await sign_in(sessionmaker, client, "customer")


async def test_json_upload_is_accepted_queued_then_ready(
    client: httpx.AsyncClient, agent: Caller
) -> None:
    response = await upload_json(
        client, agent, title="Annual refunds", content=REFUNDS, source_url="https://help/x"
    )

    assert response.status_code == 202
    body = response.json()
    assert body["document"]["status"] == "queued"
    assert body["document"]["title"] == "Annual refunds"
    assert body["document"]["source_url"] == "https://help/x"
    assert set(body["document"]) == {
        "id",
        "title",
        "source_url",
        "status",
        "chunk_count",
        "error",
        "created_at",
    }
    job = await wait_for_job(client, agent, body["job_id"])
    assert job["status"] == "complete"
    assert job["error"] is None
    assert job["result"]["chunks"] >= 3
    document = (
        await client.get(f"/knowledge/documents/{body['document']['id']}", headers=agent.headers)
    ).json()
    assert document["status"] == "ready"
    assert document["chunk_count"] == job["result"]["chunks"]


async def test_search_finds_the_uploaded_passage_best_first(
    client: httpx.AsyncClient, agent: Caller, customer: Caller
) -> None:
    await ingest_json(client, agent, title="Refunds for annual plans", content=REFUNDS)
    await ingest_json(client, agent, title="Reset your password", content=PASSWORDS)

    response = await client.get(
        "/knowledge/search",
        params={
            "q": "Hello! I paid for a year two weeks ago and changed my mind. "
            "Can I still get a refund? Thanks a lot.",
            "k": 3,
        },
        headers=customer.headers,
    )

    assert response.status_code == 200
    results = response.json()["results"]
    assert 1 <= len(results) <= 3
    assert results[0]["title"] == "Refunds for annual plans"
    assert any("within 30 days" in result["content"] for result in results)
    assert set(results[0]) == {"document_id", "title", "chunk_id", "content", "score"}
    scores = [result["score"] for result in results]
    assert scores == sorted(scores, reverse=True)


async def test_search_tolerates_typos_and_fts_syntax(
    client: httpx.AsyncClient, agent: Caller
) -> None:
    await ingest_json(client, agent, title="Reset your password", content=PASSWORDS)

    for query in ['pasword "reset" OR (locked* NEAR', "forgot my passwrod!!", "AND OR NOT -"]:
        response = await client.get("/knowledge/search", params={"q": query}, headers=agent.headers)
        assert response.status_code == 200, query
    found = await client.get(
        "/knowledge/search", params={"q": "forgot my passwrod"}, headers=agent.headers
    )
    assert found.json()["results"][0]["title"] == "Reset your password"


async def test_search_needs_a_signed_in_user_and_a_query(
    client: httpx.AsyncClient, customer: Caller
) -> None:
    assert (await client.get("/knowledge/search", params={"q": "x"})).status_code == 401
    missing = await client.get("/knowledge/search", headers=customer.headers)
    assert missing.status_code == 422
    assert missing.json()["error"]["code"] == "VALIDATION_ERROR"
    too_many = await client.get(
        "/knowledge/search", params={"q": "x", "k": 51}, headers=customer.headers
    )
    assert too_many.status_code == 422


async def test_search_of_an_empty_knowledge_base_finds_nothing(
    client: httpx.AsyncClient, customer: Caller
) -> None:
    response = await client.get(
        "/knowledge/search", params={"q": "refund"}, headers=customer.headers
    )

    assert response.status_code == 200
    assert response.json() == {"results": []}


async def test_customers_cannot_write_or_list(client: httpx.AsyncClient, customer: Caller) -> None:
    upload = await upload_json(client, customer, title="x", content="y")
    listing = await client.get("/knowledge/documents", headers=customer.headers)

    assert upload.status_code == 403
    assert upload.json()["error"]["code"] == "FORBIDDEN"
    assert listing.status_code == 403
    assert (await client.post("/knowledge/documents", json={})).status_code == 401


async def test_reupload_with_the_same_source_url_replaces_the_document(
    client: httpx.AsyncClient, agent: Caller
) -> None:
    first = await ingest_json(
        client, agent, title="Old title", content=PASSWORDS, source_url="https://help/pw"
    )
    second = await ingest_json(
        client,
        agent,
        title="New title",
        content="# Passwords\n\nPasswords now need 12 characters.",
        source_url="https://help/pw/",
    )

    assert second["id"] == first["id"]
    assert second["title"] == "New title"
    listing = (await client.get("/knowledge/documents", headers=agent.headers)).json()
    assert [item["id"] for item in listing["items"]] == [first["id"]]
    results = (
        await client.get(
            "/knowledge/search", params={"q": "locked account attempts"}, headers=agent.headers
        )
    ).json()["results"]
    assert all("failed sign-in attempts" not in result["content"] for result in results)
    new = (
        await client.get("/knowledge/search", params={"q": "12 characters"}, headers=agent.headers)
    ).json()["results"]
    assert new[0]["document_id"] == first["id"]


async def test_reupload_without_url_replaces_by_title(
    client: httpx.AsyncClient, agent: Caller
) -> None:
    first = await ingest_json(client, agent, title="Reset your password", content=PASSWORDS)
    second = await ingest_json(client, agent, title="reset  YOUR password", content=PASSWORDS)
    other = await ingest_json(client, agent, title="Refunds", content=REFUNDS)

    assert second["id"] == first["id"]
    assert other["id"] != first["id"]


async def test_markdown_file_upload_takes_its_title_from_front_matter(
    client: httpx.AsyncClient, agent: Caller
) -> None:
    response = await upload_file(client, agent, "refunds.md", REFUNDS.encode(), "text/markdown")

    assert response.status_code == 202, response.text
    assert response.json()["document"]["title"] == "Refunds for annual plans"
    job = await wait_for_job(client, agent, response.json()["job_id"])
    assert job["status"] == "complete"
    hits = (
        await client.get(
            "/knowledge/search", params={"q": "money-back window"}, headers=agent.headers
        )
    ).json()["results"]
    # Front matter and Markdown markup are gone, the words are kept.
    assert all("category:" not in hit["content"] for hit in hits)
    assert any("30-day money-back window" in hit["content"] for hit in hits)
    assert all("**" not in hit["content"] and "](" not in hit["content"] for hit in hits)


async def test_text_html_and_pdf_files_are_ingested(
    client: httpx.AsyncClient, agent: Caller
) -> None:
    html = (
        "<html><head><title>Storage limits</title><style>p{color:red}</style></head><body>"
        "<nav>Home | Help</nav><h1>Storage limits</h1><p>The Free plan includes "
        "<b>5&nbsp;GB</b> of storage.</p><ul><li>Plus: 2 TB</li><li>Business: 5 TB</li></ul>"
        "<script>track()</script></body></html>"
    )
    uploads = [
        (
            "sso.txt",
            b"Single sign-on\n\nSAML single sign-on is available on Business plans.",
            "text/plain",
        ),
        ("storage.html", html.encode(), "text/html"),
        (
            "export.pdf",
            make_pdf([["Data export", "Exports are ready within 48 hours."]]),
            "application/pdf",
        ),
    ]
    for filename, data, content_type in uploads:
        response = await upload_file(client, agent, filename, data, content_type)
        assert response.status_code == 202, (filename, response.text)
        job = await wait_for_job(client, agent, response.json()["job_id"])
        assert job["status"] == "complete", (filename, job)

    async def top(query: str) -> dict[str, str]:
        response = await client.get("/knowledge/search", params={"q": query}, headers=agent.headers)
        result: dict[str, str] = response.json()["results"][0]
        return result

    assert "SAML single sign-on" in (await top("saml sso"))["content"]
    storage = await top("how much storage on the free plan")
    assert storage["title"] == "Storage limits"
    assert "5 GB" in storage["content"]
    assert "track()" not in storage["content"]
    assert "color" not in storage["content"]
    assert "Home | Help" not in storage["content"]
    assert "48 hours" in (await top("when is my data export ready"))["content"]


async def test_a_declared_legacy_encoding_is_decoded(
    client: httpx.AsyncClient, agent: Caller
) -> None:
    text = "Café opening hours\n\nOur café in Zürich opens at 8 o'clock.".encode("cp1252")

    response = await upload_file(
        client, agent, "cafe.txt", text, "text/plain; charset=windows-1252"
    )

    assert response.status_code == 202, response.text
    await wait_for_job(client, agent, response.json()["job_id"])
    hits = (
        await client.get("/knowledge/search", params={"q": "zurich cafe"}, headers=agent.headers)
    ).json()["results"]
    assert "Zürich" in hits[0]["content"]


async def test_utf16_with_a_byte_order_mark_is_decoded(
    client: httpx.AsyncClient, agent: Caller
) -> None:
    data = codecs.BOM_UTF16_LE + "Ünïcode guide\n\nHello from UTF-16.".encode("utf-16-le")

    response = await upload_file(client, agent, "guide.txt", data, "text/plain")

    assert response.status_code == 202, response.text
    job = await wait_for_job(client, agent, response.json()["job_id"])
    assert job["status"] == "complete"


@pytest.mark.parametrize(
    ("filename", "data", "content_type", "status", "code", "phrase"),
    [
        ("empty.md", b"", "text/markdown", 400, "INVALID_DOCUMENT", "empty"),
        ("blank.txt", b"  \n\n ", "text/plain", 400, "INVALID_DOCUMENT", "empty"),
        (
            "image.md",
            b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",
            "text/markdown",
            400,
            "INVALID_DOCUMENT",
            "binary",
        ),
        (
            "latin1.txt",
            "Caf\u00e9 cr\u00e8me".encode("latin-1"),
            "text/plain",
            400,
            "INVALID_DOCUMENT",
            "UTF-8",
        ),
        (
            "broken.pdf",
            b"%PDF-1.4\n1 0 obj << /Type /Catalog >> garbage",
            "application/pdf",
            400,
            "INVALID_DOCUMENT",
            "PDF",
        ),
        ("fake.pdf", b"just some text", "application/pdf", 400, "INVALID_DOCUMENT", "not a PDF"),
        (
            "sheet.xlsx",
            b"PK\x03\x04",
            "application/octet-stream",
            415,
            "UNSUPPORTED_MEDIA_TYPE",
            ".xlsx",
        ),
        (
            "headings.md",
            b"# Only\n\n## Headings",
            "text/markdown",
            400,
            "INVALID_DOCUMENT",
            "no text",
        ),
        (
            "script.html",
            b"<script>alert(1)</script>",
            "text/html",
            400,
            "INVALID_DOCUMENT",
            "no text",
        ),
    ],
)
async def test_bad_files_are_refused_at_upload_with_their_reason(
    client: httpx.AsyncClient,
    agent: Caller,
    filename: str,
    data: bytes,
    content_type: str,
    status: int,
    code: str,
    phrase: str,
) -> None:
    response = await upload_file(client, agent, filename, data, content_type)

    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert phrase.lower() in error["message"].lower()
    listing = (await client.get("/knowledge/documents", headers=agent.headers)).json()
    assert listing["items"] == []


async def test_an_oversized_file_is_refused_with_413(
    app: object, client: httpx.AsyncClient, agent: Caller
) -> None:
    del app
    limit = 1024 * 1024  # the test settings keep the default 20 MiB; send more than that
    data = b"word " * (4 * limit + 10)

    response = await upload_file(client, agent, "big.txt", data, "text/plain")

    assert response.status_code == 413
    assert response.json()["error"]["code"] == "PAYLOAD_TOO_LARGE"


async def test_a_scanned_pdf_fails_the_document_with_its_error(
    client: httpx.AsyncClient, agent: Caller
) -> None:
    response = await upload_file(
        client, agent, "scan.pdf", make_pdf([[]], title="Scanned manual"), "application/pdf"
    )

    assert response.status_code == 202, response.text
    job = await wait_for_job(client, agent, response.json()["job_id"])
    assert job["status"] == "failed"
    assert "no extractable text" in job["error"]
    document = (
        await client.get(
            f"/knowledge/documents/{response.json()['document']['id']}", headers=agent.headers
        )
    ).json()
    assert document["status"] == "failed"
    assert document["title"] == "Scanned manual"
    assert "no extractable text" in document["error"]
    assert document["chunk_count"] == 0


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b'{"title": "x"}', "application/json"),
        (b'{"title": "", "content": "text"}', "application/json"),
        (b'{"title": "x", "content": "   "}', "application/json"),
        (b"{not json", "application/json"),
    ],
)
async def test_invalid_json_bodies_are_validation_errors(
    client: httpx.AsyncClient, agent: Caller, body: bytes, content_type: str
) -> None:
    response = await client.post(
        "/knowledge/documents",
        content=body,
        headers={**agent.headers, "content-type": content_type},
    )

    assert response.status_code == 422
    assert response.json()["error"]["code"] == "VALIDATION_ERROR"


async def test_other_content_types_and_missing_files_are_refused(
    client: httpx.AsyncClient, agent: Caller
) -> None:
    plain = await client.post(
        "/knowledge/documents",
        content=b"hello",
        headers={**agent.headers, "content-type": "text/plain"},
    )
    no_file = await client.post(
        "/knowledge/documents",
        data={"title": "x"},
        files={"other": ("a.md", b"x")},
        headers=agent.headers,
    )

    assert plain.status_code == 415
    assert plain.json()["error"]["code"] == "UNSUPPORTED_MEDIA_TYPE"
    assert no_file.status_code == 422
    assert no_file.json()["error"]["details"][0]["loc"] == ["body", "file"]


async def test_documents_are_listed_newest_first_with_keyset_pages(
    client: httpx.AsyncClient, agent: Caller
) -> None:
    ids = []
    for index in range(5):
        response = await upload_json(client, agent, title=f"Doc {index}", content=f"Text {index}.")
        ids.append(response.json()["document"]["id"])

    seen: list[str] = []
    cursor = None
    while True:
        params = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        page = (
            await client.get("/knowledge/documents", params=params, headers=agent.headers)
        ).json()
        seen += [item["id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break

    assert seen == list(reversed(ids))
    bad = await client.get(
        "/knowledge/documents", params={"cursor": "nonsense"}, headers=agent.headers
    )
    assert bad.status_code == 400


async def test_delete_removes_the_document_and_its_passages(
    client: httpx.AsyncClient, agent: Caller
) -> None:
    document = await ingest_json(client, agent, title="Reset your password", content=PASSWORDS)

    deleted = await client.delete(f"/knowledge/documents/{document['id']}", headers=agent.headers)

    assert deleted.status_code == 204
    assert deleted.content == b""
    again = await client.get(f"/knowledge/documents/{document['id']}", headers=agent.headers)
    assert again.status_code == 404
    assert again.json()["error"]["code"] == "DOCUMENT_NOT_FOUND"
    results = (
        await client.get("/knowledge/search", params={"q": "reset link"}, headers=agent.headers)
    ).json()["results"]
    assert results == []
    missing = await client.delete(f"/knowledge/documents/{uuid.uuid4()}", headers=agent.headers)
    assert missing.status_code == 404
