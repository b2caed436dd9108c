"""The support agent end to end: the app under uvicorn, real clients, the `fake` model.

What a customer and a human agent see when the agent answers from the knowledge base with
sources, and when it hands the conversation over with its `escalate_to_human` tool.
"""

from __future__ import annotations

import httpx
import pytest

from helpline.agents.graph import HANDOFF_NOTICE
from helpline.agents.providers.fake import FakeChatModel
from tests.knowledge.helpers import REFUNDS
from tests.realtime.fixtures import PartyFactory
from tests.realtime.helpers import eventually, new_conversation, open_socket, with_settings
from tests.servers import LiveServer

pytestmark = pytest.mark.slow


async def test_an_escalation_hands_over_with_a_status_frame_and_tells_the_customer(
    live_server: LiveServer,
    http: httpx.AsyncClient,
    person: PartyFactory,
    fake_model: FakeChatModel,
) -> None:
    alice = await person()
    staff = await person("agent")
    conversation_id = await new_conversation(http, alice)
    async with (
        open_socket(live_server.ws_url, conversation_id, alice.token) as customer,
        open_socket(live_server.ws_url, conversation_id, staff.token) as agent,
    ):
        await agent.ping()
        await customer.chat(
            'I want to talk to someone [[tool=escalate_to_human reason="Asks for a person"]]',
            "esc-1",
        )
        status = await agent.recv_type("status")
        answer = await customer.answer()

    assert status == {"type": "status", "status": "waiting_for_agent", "assigned_agent_id": None}
    assert answer.final is not None
    assert answer.final["type"] == "complete"
    assert answer.text == HANDOFF_NOTICE
    assert answer.final["message"]["content"] == HANDOFF_NOTICE
    conversation = await http.get(f"/conversations/{conversation_id}", headers=alice.headers)
    assert conversation.json()["status"] == "waiting_for_agent"
    queue = await http.get("/agent/queue", headers=staff.headers)
    assert [item["id"] for item in queue.json()["items"]] == [conversation_id]
    assert fake_model.offered_tools[-1] == ("search_knowledge_base", "escalate_to_human")
    # Waiting for a person, the assistant stays silent.
    calls = len(fake_model.requests)
    sent = await http.post(
        f"/conversations/{conversation_id}/messages",
        json={"content": "Hello?"},
        headers=alice.headers,
    )
    assert sent.status_code == 201
    assert sent.json()["assistant_message"] is None
    assert len(fake_model.requests) == calls


@with_settings(embeddings_provider="none")
async def test_an_answer_cites_the_knowledge_base_articles_it_used(
    http: httpx.AsyncClient, person: PartyFactory
) -> None:
    staff = await person("agent")
    alice = await person()
    uploaded = await http.post(
        "/knowledge/documents",
        json={"title": "Refunds for annual plans", "content": REFUNDS},
        headers=staff.headers,
    )
    assert uploaded.status_code == 202, uploaded.text
    job_id = uploaded.json()["job_id"]

    async def ingested() -> bool:
        job = await http.get(f"/jobs/{job_id}", headers=staff.headers)
        return bool(job.json()["status"] == "complete")

    await eventually(ingested, within=30)
    conversation_id = await new_conversation(http, alice)

    sent = await http.post(
        f"/conversations/{conversation_id}/messages",
        json={
            "content": "How long do I have to ask for a refund on my annual plan? "
            '[[reply="Within 30 days of the purchase [1]."]]'
        },
        headers=alice.headers,
    )

    assert sent.status_code == 201, sent.text
    answer = sent.json()["assistant_message"]
    assert answer["content"] == "Within 30 days of the purchase [1]."
    [cited] = answer["sources"]
    assert cited["document_id"] == uploaded.json()["document"]["id"]
    assert cited["title"] == "Refunds for annual plans"
    listed = await http.get(f"/conversations/{conversation_id}/messages", headers=alice.headers)
    assert listed.json()["items"][-1]["sources"] == [cited]
