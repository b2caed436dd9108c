"""The PostgreSQL pool (dead connections found before use, busy ones not checked) and the
sessions outside a request."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from fastapi import FastAPI
from sqlalchemy import (
    BigInteger,
    Column,
    Identity,
    MetaData,
    String,
    Table,
    Uuid,
    bindparam,
    func,
    insert,
    select,
    text,
)
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from helpline.auth.models import User, UserRole
from helpline.core.database import (
    BatchedStatement,
    DatabaseUnavailable,
    DriverConnection,
    DriverStatement,
    SqliteWork,
    create_engine,
    driver_connection,
    in_sqlite_transaction,
    lookup_session,
    unavailable_error,
)
from helpline.kit.models import UTCDateTime, enum_column
from tests.conftest import make_settings
from tests.realtime.helpers import eventually

# Per connection: each test that uses it creates it on its own connection.
PROBES = Table(
    "driver_probes",
    MetaData(),
    Column("id", Uuid, primary_key=True),
    Column("name", String(32), unique=True),
    Column("role", enum_column(UserRole, 16)),
    Column("seen_at", UTCDateTime),
    prefixes=["TEMPORARY"],
)
ADD_PROBE = DriverStatement(insert(PROBES).returning(PROBES.c.id))
AGENT_PROBES = DriverStatement(
    select(PROBES.c.name, PROBES.c.role, PROBES.c.seen_at)
    .where(PROBES.c.role == UserRole.AGENT)
    .order_by(PROBES.c.name)
)
BACKEND_PID = DriverStatement(select(func.pg_backend_pid().label("pid")))
# Added in this order (a role also given as its plain value); AGENT_PROBES reads a and b.
PROBED: tuple[tuple[str, UserRole | str], ...] = (
    ("b", UserRole.AGENT),
    ("c", UserRole.CUSTOMER),
    ("a", "agent"),
)


def assert_the_agents_read_back(rows: list[Any], seen: datetime) -> None:
    """The agents of PROBED, in name order, as SQLAlchemy's types give them back."""
    assert [(row.name, row.role, row.seen_at) for row in rows] == [
        ("a", UserRole.AGENT, seen),
        ("b", UserRole.AGENT, seen),
    ]
    assert all(type(row.role) is UserRole and row.seen_at.tzinfo is UTC for row in rows)


@asynccontextmanager
async def with_probes(database_url: str, tmp_path: Path) -> AsyncIterator[DriverConnection]:
    """A driver connection that has the (temporary) PROBES table: its pool holds only the
    connection that created it."""
    settings = make_settings(database_url, tmp_path, database_pool_size=1, database_max_overflow=0)
    engine = create_engine(settings)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(PROBES.metadata.create_all)
            await connection.commit()
        async with driver_connection(engine) as connection:
            yield connection
    finally:
        await engine.dispose()


async def _terminate(postgres_url: str, pid: int) -> None:
    admin = await asyncpg.connect(postgres_url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        await admin.execute("SELECT pg_terminate_backend($1)", pid)
    finally:
        await admin.close()


async def test_a_pooled_connection_killed_while_idle_is_replaced_unseen(
    postgres_url: str, tmp_path: Path
) -> None:
    engine = create_engine(make_settings(postgres_url, tmp_path), ping_idle_after_s=0.1)
    try:
        async with engine.connect() as connection:
            first_pid = (await connection.execute(text("SELECT pg_backend_pid()"))).scalar_one()
        await _terminate(postgres_url, first_pid)  # as a server restart would
        await asyncio.sleep(0.2)

        async with engine.connect() as connection:
            second_pid = (await connection.execute(text("SELECT pg_backend_pid()"))).scalar_one()
        assert second_pid != first_pid
    finally:
        await engine.dispose()


async def backend_pid(engine: AsyncEngine, via: str) -> int:
    """A pooled connection's server process, asked through SQLAlchemy or on the driver."""
    if via == "sqlalchemy":
        async with engine.connect() as connection:
            return int((await connection.execute(text("SELECT pg_backend_pid()"))).scalar_one())
    async with driver_connection(engine) as driver:
        (row,) = await BACKEND_PID.fetch(driver, {})
    return int(row.pid)


@pytest.mark.parametrize("via", ["sqlalchemy", "driver"])
async def test_a_connection_back_in_use_at_once_is_not_checked(
    postgres_url: str, tmp_path: Path, via: str
) -> None:
    """No check in between: a connection killed right after use fails its next statement
    (and the pool then replaces it), which proves the checkout did not ping it. A statement
    run on the driver itself (`DriverStatement`) has the pool replace it too."""
    engine = create_engine(make_settings(postgres_url, tmp_path), ping_idle_after_s=60)
    try:
        first_pid = await backend_pid(engine, via)
        await _terminate(postgres_url, first_pid)
        await asyncio.sleep(0.1)

        with pytest.raises(DBAPIError) as raised:
            await backend_pid(engine, via)
        assert raised.value.connection_invalidated

        assert await backend_pid(engine, via) != first_pid
    finally:
        await engine.dispose()


async def test_a_driver_statement_converts_values_both_ways_as_sqlalchemy_would(
    database_url: str, tmp_path: Path
) -> None:
    seen = datetime(2026, 3, 4, 5, 6, 7, tzinfo=timezone(timedelta(hours=2)))
    async with with_probes(database_url, tmp_path) as connection:
        for name, role in PROBED:
            probe = {"id": uuid.uuid4(), "name": name, "role": role, "seen_at": seen}
            added = await ADD_PROBE.fetch(connection, probe)
            assert [row.id for row in added] == [probe["id"]]
        rows = await AGENT_PROBES.fetch(connection, {})
        with pytest.raises(KeyError, match="seen_at"):  # never written as NULL unasked
            await ADD_PROBE.fetch(connection, {"id": uuid.uuid4(), "name": "d", "role": "agent"})
    assert_the_agents_read_back(rows, seen)


@pytest.mark.parametrize(
    ("backend", "refusal"), [("sqlite", OperationalError), ("postgres", ConnectionRefusedError)]
)
async def test_a_driver_connection_that_cannot_connect_says_the_database_is_unavailable(
    tmp_path: Path, backend: str, refusal: type[Exception]
) -> None:
    """As `engine.connect()` does: the client is told to retry, not that the server failed."""
    url = {
        "sqlite": f"sqlite+aiosqlite:///{tmp_path}/no-such-directory/helpline.db",
        "postgres": "postgresql+asyncpg://postgres@127.0.0.1:1/helpline",
    }[backend]
    engine = create_engine(make_settings(url, tmp_path))
    threads_before = set(threading.enumerate())
    try:
        with pytest.raises(refusal) as through_sqlalchemy:
            async with engine.connect():
                pass
        with pytest.raises(refusal) as on_the_driver:
            async with driver_connection(engine):
                pass
    finally:
        await engine.dispose()

    def sqlite_threads_stopped() -> bool:
        # aiosqlite stops the thread of a connection that failed to open without waiting for
        # it: it must report back before this test's event loop closes.
        started = set(threading.enumerate()) - threads_before
        return not any("_connection_worker_thread" in thread.name for thread in started)

    await eventually(sqlite_threads_stopped)
    assert isinstance(unavailable_error(through_sqlalchemy.value), DatabaseUnavailable)
    assert isinstance(unavailable_error(on_the_driver.value), DatabaseUnavailable)
    assert type(on_the_driver.value) is type(through_sqlalchemy.value)


async def test_a_driver_statement_fails_a_constraint_with_an_integrity_error(
    database_url: str, tmp_path: Path
) -> None:
    async with with_probes(database_url, tmp_path) as connection:
        probe = {"name": "twice", "role": UserRole.AGENT, "seen_at": None}
        await ADD_PROBE.fetch(connection, {**probe, "id": uuid.uuid4()})
        with pytest.raises(IntegrityError):
            await ADD_PROBE.fetch(connection, {**probe, "id": uuid.uuid4()})


async def test_a_lookup_session_commits_each_statement_by_itself_on_postgresql(
    app: FastAPI, sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    """No transaction around its statements on PostgreSQL (so no `BEGIN` and `COMMIT` round
    trips): a write in it stays even when the session then fails. On SQLite it is a unit of
    work, rolled back."""
    name = f"lookup-{uuid.uuid4().hex[:8]}"

    async def write_then_fail() -> None:
        async with lookup_session(sessionmaker) as session:
            session.add(User(username=name, password_hash="-", role=UserRole.CUSTOMER))
            await session.flush()
            raise RuntimeError("after the write")

    with pytest.raises(RuntimeError):
        await write_then_fail()
    async with sessionmaker() as session:
        kept = await session.scalar(select(User).where(User.username == name))
    on_postgresql = app.state.engine.dialect.name == "postgresql"
    assert (kept is not None) == on_postgresql


async def test_a_burst_of_work_leaves_its_connections_in_the_pool(
    postgres_url: str, tmp_path: Path
) -> None:
    """With the default settings a burst that takes every connection allowed opens them
    once: a second burst as large reuses them all (opening one costs several round trips)."""
    settings = make_settings(postgres_url, tmp_path)
    engine = create_engine(settings)
    burst = settings.database_pool_size + settings.database_max_overflow
    all_out = asyncio.Barrier(burst)

    async def hold_a_connection() -> int:
        async with engine.connect() as connection:
            await all_out.wait()  # every connection of the burst is out at once
            return int((await connection.execute(text("SELECT pg_backend_pid()"))).scalar_one())

    try:
        first = set(await asyncio.gather(*(hold_a_connection() for _ in range(burst))))
        second = set(await asyncio.gather(*(hold_a_connection() for _ in range(burst))))
        assert len(first) == burst
        assert second == first
    finally:
        await engine.dispose()


async def test_after_a_burst_work_one_at_a_time_keeps_to_one_connection(
    postgres_url: str, tmp_path: Path
) -> None:
    """The pool lends the connection used last: taken in turn, each of a burst's connections
    would sit idle long enough to need its check before use."""
    settings = make_settings(postgres_url, tmp_path, database_pool_size=4)
    engine = create_engine(settings)
    all_out = asyncio.Barrier(4)

    async def hold_a_connection() -> None:
        async with driver_connection(engine):
            await all_out.wait()

    try:
        await asyncio.gather(*(hold_a_connection() for _ in range(4)))
        one_at_a_time = {await backend_pid(engine, "driver") for _ in range(6)}
        assert len(one_at_a_time) == 1
    finally:
        await engine.dispose()


async def test_a_sqlite_connection_is_rolled_back_on_its_return_only_when_it_began_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write left uncommitted is rolled back when its connection goes back to the pool; a
    connection that began nothing goes back without a trip to its thread."""
    from sqlalchemy.dialects.sqlite.aiosqlite import AsyncAdapt_aiosqlite_connection

    rollbacks: list[object] = []
    roll_back = AsyncAdapt_aiosqlite_connection.rollback

    def counted(self: AsyncAdapt_aiosqlite_connection) -> None:
        rollbacks.append(self)
        roll_back(self)

    monkeypatch.setattr(AsyncAdapt_aiosqlite_connection, "rollback", counted)
    engine = create_engine(make_settings(f"sqlite+aiosqlite:///{tmp_path}/reset.db", tmp_path))
    try:
        async with engine.begin() as connection:
            await connection.execute(text("CREATE TABLE probes (name TEXT)"))
        rollbacks.clear()
        async with engine.connect() as connection:
            await connection.execute(text("SELECT count(*) FROM probes"))
            await connection.commit()
        assert rollbacks == []

        async with engine.connect() as connection:
            # Begun below SQLAlchemy, which does not know to roll it back.
            driver = (await connection.get_raw_connection()).driver_connection
            assert driver is not None
            await driver.execute("BEGIN IMMEDIATE")
            await driver.execute("INSERT INTO probes VALUES ('left uncommitted')")
        assert len(rollbacks) == 1
        async with engine.connect() as connection:
            assert (await connection.execute(text("SELECT count(*) FROM probes"))).scalar() == 0
    finally:
        await engine.dispose()


async def test_a_sqlite_transaction_runs_driver_statements_and_rolls_back_what_failed(
    tmp_path: Path,
) -> None:
    """`in_sqlite_transaction`: the types convert values as SQLAlchemy would, and work that
    raises leaves nothing behind (a constraint's failure comes as an `IntegrityError`)."""
    seen = datetime(2026, 3, 4, 5, 6, 7, tzinfo=timezone(timedelta(hours=2)))

    def probe(name: str, role: UserRole | str) -> dict[str, object]:
        return {"id": uuid.uuid4(), "name": name, "role": role, "seen_at": seen}

    def add_then_repeat(work: SqliteWork) -> None:
        work.fetch(ADD_PROBE, probe("rolled back", UserRole.AGENT))
        work.fetch(ADD_PROBE, probe("twice", UserRole.AGENT))
        work.fetch(ADD_PROBE, probe("twice", UserRole.AGENT))

    def add_then_read(work: SqliteWork) -> list[Any]:
        for name, role in PROBED:
            work.fetch(ADD_PROBE, probe(name, role))
        return work.fetch(AGENT_PROBES, {})

    async with with_probes(f"sqlite+aiosqlite:///{tmp_path}/work.db", tmp_path) as connection:
        with pytest.raises(IntegrityError):
            await in_sqlite_transaction(connection, add_then_repeat)
        rows = await in_sqlite_transaction(connection, add_then_read)
    assert_the_agents_read_back(rows, seen)


# A batched statement's probes: a table of its own per test (batches run on any connection).
@asynccontextmanager
async def batch_probes(
    database_url: str, tmp_path: Path, pool_size: int
) -> AsyncIterator[tuple[AsyncEngine, BatchedStatement, Table]]:
    """An engine whose pool runs one batch at a time (`pool_size` < 8), and a statement that
    adds a probe and returns it, with the transaction it ran in and its insertion rank."""
    probes = Table(
        f"batch_probes_{uuid.uuid4().hex[:8]}",
        MetaData(),
        Column("id", Uuid, primary_key=True),
        Column("name", String(32), unique=True),
        # Insertion order (PostgreSQL: SQLite numbers only its primary key).
        Column("rank", BigInteger, Identity() if "postgresql" in database_url else None),
    )
    add = BatchedStatement(
        insert(probes)
        .values(id=bindparam("id"), name=bindparam("name"))
        .returning(
            probes.c.id.label("batch_key"),
            probes.c.name,
            probes.c.rank,
            # SQLite has no transaction ids; a value of each call's own stands in for one.
            (func.txid_current() if "postgresql" in database_url else func.random()).label("txid"),
        ),
        key="id",
        lock_order="name",
    )
    settings = make_settings(database_url, tmp_path, database_pool_size=pool_size)
    engine = create_engine(settings)
    try:
        async with engine.begin() as connection:
            await connection.run_sync(probes.metadata.create_all)
        yield engine, add, probes
    finally:
        await engine.dispose()  # whatever state a test left its connections in
        async with engine.begin() as connection:
            await connection.run_sync(probes.metadata.drop_all)
        await engine.dispose()


async def stored_names(engine: AsyncEngine, probes: Table) -> set[str]:
    async with engine.connect() as connection:
        return set((await connection.execute(select(probes.c.name))).scalars())


async def test_calls_of_a_batched_statement_queued_together_share_a_round_trip(
    database_url: str, tmp_path: Path
) -> None:
    """Each call gets its own rows; on PostgreSQL the calls that queued while a batch ran go
    in one transaction, in lock order. On SQLite each runs by itself."""
    async with batch_probes(database_url, tmp_path, pool_size=2) as (engine, add, probes):
        calls = [{"id": uuid.uuid4(), "name": f"probe-{19 - index:02d}"} for index in range(20)]
        results = await asyncio.gather(*(add.fetch(engine, call) for call in calls))
        for call, rows in zip(calls, results, strict=True):
            assert [(row.batch_key, row.name) for row in rows] == [(call["id"], call["name"])]
        assert await stored_names(engine, probes) == {call["name"] for call in calls}
        transactions: dict[int, list[Any]] = {}
        for rows in results:
            transactions.setdefault(rows[0].txid, []).append(rows[0])
        if engine.dialect.name == "postgresql":
            assert len(transactions) < len(calls)
            for batch in transactions.values():  # each batch inserted in name order
                ranked = sorted(batch, key=lambda row: row.rank)
                assert [row.name for row in ranked] == sorted(row.name for row in batch)
        else:
            assert len(transactions) == len(calls)


async def test_a_batch_with_a_conflicting_call_still_stores_the_others(
    postgres_url: str, tmp_path: Path
) -> None:
    """One call breaking a constraint rolls its batch back; the batch's calls are then run one
    by one: the others are stored, the conflicting one gets its `IntegrityError`."""
    async with batch_probes(postgres_url, tmp_path, pool_size=1) as (engine, add, probes):
        await add.fetch(engine, {"id": uuid.uuid4(), "name": "taken"})
        names = ["a", "taken", "b", "c"]
        async with driver_connection(engine):  # the only connection: the calls queue up
            pending = [
                asyncio.create_task(add.fetch(engine, {"id": uuid.uuid4(), "name": name}))
                for name in names
            ]
            await asyncio.sleep(0.05)
        outcomes = await asyncio.gather(*pending, return_exceptions=True)
        assert isinstance(outcomes[1], IntegrityError)
        assert all(isinstance(outcomes[i], list) for i in (0, 2, 3))
        assert await stored_names(engine, probes) == {"a", "b", "c", "taken"}


async def test_a_cancelled_caller_leaves_its_batch_to_finish_and_its_queued_call_unrun(
    postgres_url: str, tmp_path: Path
) -> None:
    """A caller cancelled while its batch (with others' calls) runs does not stop it: the
    others get their rows. One cancelled while its call still waits for a batch: never run."""
    async with batch_probes(postgres_url, tmp_path, pool_size=1) as (engine, add, probes):
        async with driver_connection(engine):  # the only connection: the calls queue up
            runner = asyncio.create_task(add.fetch(engine, {"id": uuid.uuid4(), "name": "r"}))
            await asyncio.sleep(0.01)  # it runs the next batch: it waits for the connection
            others = [
                asyncio.create_task(add.fetch(engine, {"id": uuid.uuid4(), "name": name}))
                for name in ("x", "y")
            ]
            await asyncio.sleep(0.01)
        await asyncio.sleep(0)  # the batch of the three is on its way
        runner.cancel()
        finished = await asyncio.wait_for(asyncio.gather(*others), 5)
        assert all(len(rows) == 1 for rows in finished)
        with pytest.raises(asyncio.CancelledError):
            await runner

        async with driver_connection(engine):
            first = asyncio.create_task(add.fetch(engine, {"id": uuid.uuid4(), "name": "f"}))
            await asyncio.sleep(0.01)
            dropped = asyncio.create_task(add.fetch(engine, {"id": uuid.uuid4(), "name": "d"}))
            await asyncio.sleep(0.01)
            dropped.cancel()
            await asyncio.sleep(0)
        await first
        assert dropped.cancelled()
        assert await stored_names(engine, probes) == {"r", "x", "y", "f"}


async def test_a_runner_that_finds_its_calls_taken_by_another_leaves_its_connection_clean(
    postgres_url: str, tmp_path: Path
) -> None:
    """Two batches wait for the pool and the first takes every call queued: the second gets
    no call to run, and its connection goes back as it came (no statement begun on it, no
    lock held: the table can be changed at once)."""
    async with batch_probes(postgres_url, tmp_path, pool_size=8) as (engine, add, probes):
        async with contextlib.AsyncExitStack() as held:  # the whole pool: the calls queue up
            for _ in range(8):
                await held.enter_async_context(driver_connection(engine))
            calls = [
                asyncio.create_task(add.fetch(engine, {"id": uuid.uuid4(), "name": name}))
                for name in "abc"
            ]
            await asyncio.sleep(0.05)
        await asyncio.gather(*calls)
        async with asyncio.timeout(5), engine.begin() as connection:
            await connection.execute(text(f"LOCK TABLE {probes.name} IN ACCESS EXCLUSIVE MODE"))
        assert await stored_names(engine, probes) == {"a", "b", "c"}


async def test_a_batch_whose_connection_died_fails_each_call_and_the_pool_replaces_it(
    postgres_url: str, tmp_path: Path
) -> None:
    """The connection a batch gets was killed while it sat in the pool: every call of the
    batch fails as a lost connection (worth a retry, `DatabaseUnavailable`), nothing of it is
    stored, and the next call runs on a fresh connection."""
    async with batch_probes(postgres_url, tmp_path, pool_size=1) as (engine, add, probes):
        dead_pid = await backend_pid(engine, "driver")
        async with driver_connection(engine):  # the only connection: the calls queue up
            calls = [
                asyncio.create_task(add.fetch(engine, {"id": uuid.uuid4(), "name": name}))
                for name in "abc"
            ]
            await asyncio.sleep(0.05)
            await _terminate(postgres_url, dead_pid)
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        assert all(isinstance(outcome, DBAPIError) for outcome in outcomes), outcomes
        assert all(
            isinstance(unavailable_error(outcome), DatabaseUnavailable) for outcome in outcomes
        )
        await add.fetch(engine, {"id": uuid.uuid4(), "name": "after"})
        assert await backend_pid(engine, "driver") != dead_pid
        assert await stored_names(engine, probes) == {"after"}


async def test_calls_queued_for_a_batch_fail_alike_when_no_connection_comes(
    postgres_url: str, tmp_path: Path
) -> None:
    settings = make_settings(
        postgres_url, tmp_path, database_pool_size=1, database_pool_timeout_s=0.2
    )
    async with batch_probes(postgres_url, tmp_path, pool_size=1) as (_, add, probes):
        engine = create_engine(settings)
        try:
            async with driver_connection(engine):  # held past the pool's timeout
                outcomes = await asyncio.gather(
                    *(add.fetch(engine, {"id": uuid.uuid4(), "name": n}) for n in "abc"),
                    return_exceptions=True,
                )
            assert all(isinstance(outcome, PoolTimeout) for outcome in outcomes)
            assert await stored_names(engine, probes) == set()
        finally:
            await engine.dispose()
