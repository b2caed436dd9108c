"""The database work of one answer, in-process: sending the question and storing the result.

    python bench/answer_db.py            # PostgreSQL (a fresh database) and SQLite

For each of 300 conversations: `post_message` (the question and the `streaming` answer row,
committed before the model is called — on the way to the first token) and the engine's
`store_result` (the final answer, usage, the conversation's activity). The model is not run.
Prints the wall time of each (p50) and the CPU time per answer, beside a floor: one bare
`SELECT 1` round trip on the same engine; then a send (and its store) in conversations that
have a history of 12 exchanges, which the send reads for the model. Apart: the lookups a
socket's handshake makes (its user, its conversation), as it makes them (a statement each on
the driver), beside the same lookups through an ORM session.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.realtime import helpline_env, postgres_database  # noqa: E402

ANSWERS = 300
WARM_UP = 50
# Then sends to conversations with a history: this many exchanges before the measured one.
HISTORY_EXCHANGES = 12
HISTORY_CONVERSATIONS = 60
ON_ITS_WAY = "It is on its way: tracking says it should be with you by Thursday."


async def measure(database_url: str, data: Path) -> None:
    env = helpline_env(data, DATABASE_URL=database_url)
    os.environ.update(env)
    await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "helpline.cli", "migrate"],
        env=env,
        check=True,
        capture_output=True,
    )
    from sqlalchemy import text

    from helpline.agents.chat import ChatAnswerer
    from helpline.agents.providers.fake import FakeChatModel
    from helpline.agents.schemas import Usage
    from helpline.agents.tokens import estimate_tokens
    from helpline.auth import repository as auth_repository
    from helpline.auth.models import User, UserRole
    from helpline.conversations import service
    from helpline.core.config import Settings
    from helpline.core.database import (
        create_engine,
        create_sessionmaker,
        driver_connection,
        lookup_session,
        unit_of_work,
    )
    from helpline.realtime.backends import create_memory_backends
    from helpline.realtime.engine import AnswerJob, AnswerResult, GenerationEngine

    settings = Settings()
    database = create_engine(settings)
    sessionmaker = create_sessionmaker(database)
    store = service.ConversationAnswerStore(
        sessionmaker, queue_when_busy=False, model="fake-1", memory_token_budget=2000
    )
    engine = GenerationEngine(
        backends=create_memory_backends(3600),
        answerer=ChatAnswerer(FakeChatModel()),
        store=store,
        lease_s=15,
    )

    def no_model(job: AnswerJob) -> None:
        del job  # the database alone is measured

    engine.launch = no_model  # type: ignore[method-assign]
    async with unit_of_work(sessionmaker) as session:
        name = f"bench-{uuid.uuid4().hex[:8]}"
        user = User(username=name, password_hash="-", role=UserRole.CUSTOMER)
        session.add(user)
    conversations = []
    for _ in range(ANSWERS):
        async with unit_of_work(sessionmaker) as session:
            conversation = await service.create_conversation(session, user=user, title=None)
            conversations.append(conversation.id)

    async def exchange(
        conversation_id: uuid.UUID, question: str, answer: str
    ) -> tuple[float, float, float]:
        """One send and the store of its answer: the send's wall and CPU time, the store's wall
        time (seconds)."""
        sent_at, cpu_started = time.perf_counter(), time.process_time()
        sent = await service.post_message(
            sessionmaker,
            engine=engine,
            queue_when_busy=False,
            author=user,
            conversation_id=conversation_id,
            content=question,
            client_message_id=uuid.uuid4().hex,
        )
        stored_at, send_cpu_s = time.perf_counter(), time.process_time() - cpu_started
        assert sent.assistant_message is not None
        await store.store_result(
            AnswerResult(
                job_conversation_id=conversation_id,
                message_id=sent.assistant_message.id,
                outcome="complete",
                content=answer,
                last_seq=5,
                usage=Usage(prompt_tokens=40, completion_tokens=estimate_tokens(answer)),
            )
        )
        return stored_at - sent_at, send_cpu_s, time.perf_counter() - stored_at

    sends: list[float] = []
    stores: list[float] = []
    floor: list[float] = []
    handshakes: list[float] = []
    handshake_cpu_s = 0.0
    orm_handshakes: list[float] = []
    orm_handshake_cpu_s = 0.0
    cpu_started = 0.0
    for index, conversation_id in enumerate(conversations):
        if index == WARM_UP:
            cpu_started = time.process_time()
            handshake_cpu_s = orm_handshake_cpu_s = 0.0
        looked_up_at = time.perf_counter()
        lookup_cpu_started = time.process_time()
        async with driver_connection(database) as connection:
            standing = await auth_repository.get_user_standing(connection, user.id)
        assert standing is not None
        await service.get_conversation_owner(
            database, user=standing, conversation_id=conversation_id
        )
        handshake_cpu_s += time.process_time() - lookup_cpu_started
        handshakes.append((time.perf_counter() - looked_up_at) * 1000)
        looked_up_at = time.perf_counter()
        lookup_cpu_started = time.process_time()
        async with lookup_session(sessionmaker) as session:
            found = await auth_repository.get_user(session, user.id)
            assert found is not None
            await service.get_conversation(session, user=found, conversation_id=conversation_id)
        orm_handshake_cpu_s += time.process_time() - lookup_cpu_started
        orm_handshakes.append((time.perf_counter() - looked_up_at) * 1000)
        started = time.perf_counter()
        async with database.connect() as connection:
            await connection.execute(text("SELECT 1"))
        floor.append((time.perf_counter() - started) * 1000)
        send_s, _, store_s = await exchange(conversation_id, "Where is my parcel?", ON_ITS_WAY)
        sends.append(send_s * 1000)
        stores.append(store_s * 1000)
    measured = ANSWERS - WARM_UP
    handshakes_cpu_s = handshake_cpu_s + orm_handshake_cpu_s
    cpu_ms = (time.process_time() - cpu_started - handshakes_cpu_s) / measured * 1000

    with_history = conversations[:HISTORY_CONVERSATIONS]
    follow_up = "And when will it arrive, do you think?"
    for _ in range(HISTORY_EXCHANGES - 1):  # each has one exchange already
        for conversation_id in with_history:
            await exchange(conversation_id, follow_up, ON_ITS_WAY)
    history_sends: list[float] = []
    history_cpu_s = 0.0
    for conversation_id in with_history:
        send_s, send_cpu_s, _ = await exchange(conversation_id, follow_up, ON_ITS_WAY)
        history_sends.append(send_s * 1000)
        history_cpu_s += send_cpu_s
    await database.dispose()

    def p50(values: list[float]) -> float:
        return statistics.median(values[WARM_UP:])

    print(f"{settings.database_url.split(':', 1)[0]}")
    print(f"  send the question (to the first token)  p50 {p50(sends):7.2f} ms")
    print(f"  store the answer's result               p50 {p50(stores):7.2f} ms")
    print(f"  one bare round trip (floor)             p50 {p50(floor):7.2f} ms")
    print(f"  CPU per answer (all of the above)           {cpu_ms:7.2f} ms")
    print(
        f"  send after {HISTORY_EXCHANGES} exchanges                p50 "
        f"{statistics.median(history_sends):7.2f} ms, its CPU "
        f"{history_cpu_s / len(with_history) * 1000:.2f} ms"
    )
    print("  a socket's handshake lookups        driver statements   ORM session")
    for label, driver, orm in (
        ("p50", p50(handshakes), p50(orm_handshakes)),
        (
            "CPU per handshake",
            handshake_cpu_s / measured * 1000,
            orm_handshake_cpu_s / measured * 1000,
        ),
    ):
        print(f"    {label:<32} {driver:7.2f} ms    {orm:7.2f} ms")


async def main() -> None:
    async with postgres_database() as database_url:
        await measure(database_url, Path(tempfile.mkdtemp(prefix="helpline-bench-")))
    data = Path(tempfile.mkdtemp(prefix="helpline-bench-"))
    await measure(f"sqlite+aiosqlite:///{data}/bench.db", data)


if __name__ == "__main__":
    asyncio.run(main())
