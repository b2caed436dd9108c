"""Async SQLAlchemy engine, sessions and the unit of work.

One request is one unit of work: the `DbSession` dependency commits before the response is sent
(declared with `scope="function"`, because FastAPI runs the code after a dependency's `yield`
only once the response is out otherwise) and rolls back on error. Work that must happen only
once the data is durable (enqueueing a job, publishing an event) registers an after-commit hook
with `on_commit(session, callback)`; hooks are dropped on rollback.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
import weakref
from collections import namedtuple
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any, TypeVar, cast

import asyncpg
import structlog
from fastapi import Depends, Request
from opentelemetry.trace import SpanKind, Tracer
from sqlalchemy import Dialect, Engine, event, text
from sqlalchemy.exc import DBAPIError, DisconnectionError, IntegrityError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.pool import PoolProxiedConnection
from sqlalchemy.util import greenlet_spawn

from helpline.core.config import Settings
from helpline.core.errors import ServiceUnavailable

log = structlog.get_logger(__name__)

AfterCommitHook = Callable[[], Awaitable[None]]
_HOOKS_KEY = "after_commit_hooks"


class DatabaseUnavailable(ServiceUnavailable):
    message = "The database is unreachable; try again shortly"


# What a client told the server is too busy waits before it tries again (`Retry-After`).
BUSY_RETRY_AFTER_S = 1


class DatabaseBusy(ServiceUnavailable):
    """No pooled connection came free within the pool's timeout: the server is overloaded."""

    message = "The server is too busy to take this now; try again shortly"

    def __init__(self) -> None:
        super().__init__(headers={"Retry-After": str(BUSY_RETRY_AFTER_S)})


# A pooled PostgreSQL connection idle this long is checked before it is used again.
PING_IDLE_AFTER_S = 2.0


def create_engine(
    settings: Settings, *, ping_idle_after_s: float = PING_IDLE_AFTER_S
) -> AsyncEngine:
    """The engine for `DATABASE_URL`: SQLite (WAL, foreign keys on) or pooled PostgreSQL."""
    url = settings.database_url
    kwargs: dict[str, Any] = {
        "echo": settings.database_echo,
        "pool_timeout": settings.database_pool_timeout_s,
    }
    if settings.is_sqlite:
        kwargs["connect_args"] = {"timeout": 30}
        # Reset by `_configure_sqlite`: a rollback only when a transaction is open.
        kwargs["pool_reset_on_return"] = None
    else:
        kwargs.update(
            pool_size=settings.database_pool_size,
            max_overflow=settings.database_max_overflow,
            # The connection used last goes out first: after a burst, steady work keeps using
            # the same few, and they never sit idle long enough to need the check before use
            # (`_ping_idle_connections`); taken in turn, every one of them would.
            pool_use_lifo=True,
            connect_args={"timeout": settings.database_pool_timeout_s},
        )
    engine = create_async_engine(url, **kwargs)
    if settings.is_sqlite:
        _configure_sqlite(engine)
    else:
        _ping_idle_connections(engine, ping_idle_after_s)
    return engine


def _ping_idle_connections(engine: AsyncEngine, idle_after_s: float) -> None:
    """Check a pooled connection before use only when it sat idle for `idle_after_s`.

    SQLAlchemy's `pool_pre_ping` checks every checkout, and on asyncpg a check is three round
    trips (`BEGIN`, `;`, `ROLLBACK`): about a sixth of an answer's database CPU
    (`bench/answer_db.py`). A connection back in use within seconds is as good as the
    statement that used it; one idle longer (the server may have restarted or dropped it) is
    checked, and replaced when dead — raising `DisconnectionError` in a checkout handler
    makes the pool retry with a fresh connection.
    """

    @event.listens_for(engine.sync_engine, "checkin")
    def _on_checkin(_: Any, record: Any) -> None:
        record.info["checked_in_at"] = time.monotonic()

    @event.listens_for(engine.sync_engine, "checkout")
    def _on_checkout(dbapi_connection: Any, record: Any, _: Any) -> None:
        checked_in_at = record.info.get("checked_in_at")
        if checked_in_at is None or time.monotonic() - checked_in_at < idle_after_s:
            return
        try:
            engine.dialect.do_ping(dbapi_connection)
        except Exception as exc:
            raise DisconnectionError("a pooled connection was dead") from exc


_SQLITE_WRITES = ("INSERT", "UPDATE", "DELETE", "REPLACE", "SAVEPOINT")


def _configure_sqlite(engine: AsyncEngine) -> None:
    """WAL, foreign keys, and write transactions that take the write lock up front.

    In WAL mode a transaction that reads and then writes fails at once ("database is locked",
    no busy wait) if another connection committed in between. So a transaction begins only at
    its first write, with `BEGIN IMMEDIATE` (which waits its turn up to `busy_timeout`); reads
    before it see the latest committed data, as under PostgreSQL's READ COMMITTED.
    """

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()
        # Transactions are begun by us (below), not by pysqlite.
        dbapi_connection.isolation_level = None

    @event.listens_for(engine.sync_engine, "before_cursor_execute")
    def _begin_before_first_write(connection: Any, cursor: Any, statement: str, *_: Any) -> None:
        dbapi_connection = connection.connection.driver_connection
        if dbapi_connection is None or dbapi_connection.in_transaction:
            return
        if statement.lstrip()[:9].upper().startswith(_SQLITE_WRITES):
            cursor.execute("BEGIN IMMEDIATE")

    @event.listens_for(engine.sync_engine, "reset")
    def _roll_back_if_begun(dbapi_connection: Any, _: Any, reset_state: Any) -> None:
        # Every call on an aiosqlite connection is a trip to its thread and back: a connection
        # going back to the pool with no transaction open (most: reads begin none) skips it.
        if not reset_state.asyncio_safe:
            return  # outside the event loop (garbage collected): as SQLAlchemy's own reset
        try:
            begun = dbapi_connection.driver_connection.in_transaction
        except ValueError:
            return  # closed: nothing to roll back
        if begun:
            dbapi_connection.rollback()


def create_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False, autoflush=False)


def on_commit(session: AsyncSession, hook: AfterCommitHook) -> None:
    """Run `hook` once the session's transaction has committed (never if it rolls back)."""
    session.info.setdefault(_HOOKS_KEY, []).append(hook)


async def commit(session: AsyncSession) -> None:
    """Commit, then run the after-commit hooks (a failing hook is logged, not raised)."""
    await session.commit()
    hooks: list[AfterCommitHook] = session.info.pop(_HOOKS_KEY, [])
    for hook in hooks:
        try:
            await hook()
        except Exception:
            log.exception("db.after_commit_hook_failed", hook=getattr(hook, "__name__", "?"))


async def release(session: AsyncSession) -> None:
    """Commit what the request's session did so far and let go of its locks.

    For endpoints that go on in units of work of their own (streaming, waiting for an answer):
    the request's session must not hold a write lock that those would wait for.
    """
    await commit(session)


async def rollback(session: AsyncSession) -> None:
    session.info.pop(_HOOKS_KEY, None)
    await session.rollback()


@asynccontextmanager
async def unit_of_work(
    sessionmaker: async_sessionmaker[AsyncSession],
) -> AsyncIterator[AsyncSession]:
    """A session that commits on success (then runs hooks) and rolls back on error.

    For jobs and streams, which live outside a request's unit of work.
    """
    async with sessionmaker() as session:
        try:
            yield session
        except BaseException:
            await rollback(session)
            raise
        else:
            await commit(session)


# A row of a `DriverStatement`: a named tuple of its columns.
DriverRow = Any
T = TypeVar("T")

# Engines traced (`helpline.core.telemetry`), with their tracer: statements run on the driver
# get spans as those SQLAlchemy runs do.
_driver_tracers: weakref.WeakKeyDictionary[Engine, Tracer] = weakref.WeakKeyDictionary()


def trace_driver_statements(engine: AsyncEngine, tracer: Tracer) -> None:
    _driver_tracers[engine.sync_engine] = tracer


@contextmanager
def _driver_span(
    connection: DriverConnection, operation: str, statements: Callable[[], str]
) -> Iterator[None]:
    """A client span for statements run on the driver, when the engine is traced
    (`statements`: the SQL run, read once it ran)."""
    tracer = _driver_tracers.get(connection.engine)
    if tracer is None:
        yield
        return
    database = connection.engine.url.database or ""
    with tracer.start_as_current_span(
        f"{operation} {database}".strip(),
        kind=SpanKind.CLIENT,
        attributes={"db.system": connection.dialect.name, "db.name": database},
    ) as span:
        try:
            yield
        finally:
            span.set_attribute("db.statement", statements())


@dataclass(frozen=True, slots=True)
class _Compiled:
    """A `DriverStatement` for one dialect: its SQL, and how values go in and come out."""

    sql: str
    names: list[str]
    fixed: dict[str, Any]  # the values the statement holds itself (the others must be given)
    bind_processors: list[Callable[[Any], Any] | None]
    # The columns whose values need converting, by position: most come out of the driver as
    # they are, and looking at each one's (absent) processor costs a quarter of a row's time.
    result_processors: list[tuple[int, Callable[[Any], Any]]]
    make_row: Callable[[Any], Any]

    @classmethod
    def of(cls, statement: Any, dialect: Dialect) -> _Compiled:
        compiled = statement.compile(dialect=dialect)
        binds = compiled.binds
        names = list(compiled.positiontup or ())
        columns = list(statement.exported_columns)  # selected or returned
        row_type: Any = namedtuple("DriverRow", [column.name for column in columns])  # type: ignore[misc]
        return cls(
            sql=compiled.string,
            names=names,
            fixed={name: binds[name].value for name in names if not binds[name].required},
            bind_processors=[
                binds[name].type.dialect_impl(dialect).bind_processor(dialect) for name in names
            ],
            result_processors=[
                (index, processor)
                for index, column in enumerate(columns)
                if (processor := column.type.dialect_impl(dialect).result_processor(dialect, None))
                is not None
            ],
            make_row=row_type._make,
        )

    def args(self, params: Mapping[str, Any]) -> list[Any]:
        """The positional arguments for `params`; a `KeyError` names one not given."""
        args = []
        for name, processor in zip(self.names, self.bind_processors, strict=True):
            value = params[name] if name in params else self.fixed[name]
            args.append(value if processor is None else processor(value))
        return args

    def rows(self, records: Iterable[Iterable[Any]]) -> list[DriverRow]:
        processors = self.result_processors
        make_row = self.make_row
        rows = []
        for record in records:
            values = list(record)
            for index, processor in processors:
                value = values[index]
                if value is not None:
                    values[index] = processor(value)
            rows.append(make_row(values))
        return rows


class DriverConnection:
    """A pooled connection lent to the database driver alone, for `DriverStatement`s.

    Checked out of the engine's pool and back in as SQLAlchemy's `Connection` would be (the
    pool's events, its timeout and its reset on return all apply), but without that object
    around it: `engine.connect()` and `get_raw_connection()` cost twice the CPU of the checkout
    itself (108 µs against 51 on asyncpg), and the statements here never use them. Outside a
    transaction each statement commits by itself.
    """

    __slots__ = ("engine", "pooled")

    def __init__(self, engine: Engine, pooled: PoolProxiedConnection) -> None:
        self.engine = engine
        self.pooled = pooled

    @property
    def dialect(self) -> Dialect:
        return self.engine.dialect

    @property
    def driver(self) -> Any:
        """asyncpg's or aiosqlite's own connection."""
        return self.pooled.driver_connection

    async def invalidate(self, exc: BaseException) -> None:
        """Close it for good: the pool replaces it (after a lost connection)."""
        await greenlet_spawn(self.pooled.invalidate, exc)

    async def check_in(self) -> None:
        """Back to the pool (its reset on return applies)."""
        await greenlet_spawn(self.pooled.close)


@asynccontextmanager
async def driver_connection(database: AsyncEngine) -> AsyncIterator[DriverConnection]:
    """A connection out of `database`'s pool for `DriverStatement`s, back in when done.

    A pool that stays exhausted raises `sqlalchemy.exc.TimeoutError` as ever; a driver error
    at connect comes as SQLAlchemy's, as `engine.connect()` would raise it."""
    connection = await _check_out(database)
    try:
        yield connection
    finally:
        await connection.check_in()


async def _check_out(database: AsyncEngine) -> DriverConnection:
    engine = database.sync_engine
    dbapi_error = engine.dialect.loaded_dbapi.Error
    try:
        pooled = await greenlet_spawn(engine.raw_connection)
    except dbapi_error as exc:
        raise DBAPIError.instance(
            None,
            None,
            exc,
            dbapi_error,
            connection_invalidated=engine.dialect.is_disconnect(exc, None, None),
            dialect=engine.dialect,
        ) from exc
    return DriverConnection(engine, pooled)


class DriverStatement:
    """A Core statement compiled once and run on the database driver's own connection.

    For the statements every answer runs — its send and its store — SQLAlchemy's work at each
    execution (the compiled cache's lookup, the parameters' and the rows' processing, the
    greenlet hop) costs more CPU than asyncpg's own (a bare select: 161 µs against 70), and on
    SQLite each call is a trip to the connection's thread (`in_sqlite_transaction`). The
    statement is still built with SQLAlchemy and its types still convert the values both ways;
    only the execution skips the engine. Rows have the statement's column names as attributes.
    """

    def __init__(self, statement: Any) -> None:
        self.statement = statement
        self._compiled: dict[str, _Compiled] = {}

    def compiled(self, dialect: Dialect) -> _Compiled:
        compiled = self._compiled.get(dialect.name)
        if compiled is None:
            compiled = self._compiled[dialect.name] = _Compiled.of(self.statement, dialect)
        return compiled

    async def fetch(
        self, connection: DriverConnection, params: Mapping[str, Any]
    ) -> list[DriverRow]:
        """The statement's rows, in autocommit: on PostgreSQL one round trip; on SQLite one
        trip to the connection's thread (to run several in one transaction there, see
        `in_sqlite_transaction`).

        Errors come as SQLAlchemy's: a constraint's as `IntegrityError`, a lost connection as a
        `DBAPIError` that invalidated it (the pool then replaces it)."""
        compiled = self.compiled(connection.dialect)
        operation = compiled.sql.split(None, 1)[0]
        if connection.dialect.name == "sqlite":
            return await _in_sqlite_thread(
                connection, lambda work: work.fetch(self, params), operation=operation
            )
        args = compiled.args(params)
        async with _as_sqlalchemy_errors(connection, compiled.sql, args):
            with _driver_span(connection, operation, lambda: compiled.sql):
                records = await connection.driver.fetch(compiled.sql, *args)
        return compiled.rows(record.values() for record in records)


@asynccontextmanager
async def _as_sqlalchemy_errors(
    connection: DriverConnection, sql: str, args: Any
) -> AsyncIterator[None]:
    """asyncpg's errors as SQLAlchemy raises them: a constraint's as `IntegrityError`, a lost
    connection as a `DBAPIError` that invalidated it (the pool then replaces it)."""
    try:
        yield
    except asyncpg.IntegrityConstraintViolationError as exc:
        raise IntegrityError(sql, args, exc) from exc
    except (
        asyncpg.PostgresConnectionError,
        asyncpg.InterfaceError,
        # A connection the server closed while it sat in the pool fails the first statement
        # prepared on it this way (its protocol still thinks an operation is under way).
        asyncpg.exceptions.InternalClientError,
        OSError,
    ) as exc:
        await connection.invalidate(exc)
        raise DBAPIError(sql, args, exc, connection_invalidated=True) from exc
    except asyncpg.PostgresError as exc:
        raise DBAPIError(sql, args, exc) from exc


# A batched statement runs at most this share of the pool's connections at once: a burst of it
# leaves the rest of the pool to everything else.
BATCHES_PER_POOL_SHARE = 4
MAX_BATCH_CALLS = 100


@dataclass(eq=False, slots=True)
class _BatchCall:
    params: Mapping[str, Any]
    future: asyncio.Future[list[DriverRow]]


@dataclass(eq=False, slots=True)
class _BatchQueue:
    """One engine's calls of a `BatchedStatement` waiting for a batch, and its batches."""

    most_running: int  # batches at once
    calls: list[_BatchCall] = field(default_factory=list)
    running: int = 0
    helpers: set[asyncio.Task[None]] = field(default_factory=set)


class BatchedStatement:
    """A `DriverStatement` that runs on PostgreSQL for all the callers queued at once, in one
    round trip.

    A busy event loop keeps a pooled connection out for a turn or two of the loop (tens of
    milliseconds), not for the round trip's millisecond: a burst of calls, each with its own
    connection, then queues for the pool (2,000 sends within a second waited up to 2 s for 40
    connections: `bench/realtime.py paced`). Here a call that finds the statement's share of
    the pool busy joins the next batch: one connection and one pipelined round trip (asyncpg's
    `fetchmany`) for every call queued by then, in one transaction. A call alone runs as a
    `DriverStatement` would.

    The statement's rows carry a column `batch_key` holding the parameter `key`, unique per
    call: that is how a batch's rows go back to their calls. A batch runs its calls in order
    of the parameter `lock_order`, so that two batches take their row locks in the same order
    and never deadlock. A batch that fails on the database's side (a call conflicted with a
    write outside it: the whole batch is rolled back) runs its calls again one by one, each to
    its own outcome. On SQLite every call runs by itself.
    """

    def __init__(
        self,
        statement: Any,
        *,
        key: str,
        lock_order: str,
        max_calls: int = MAX_BATCH_CALLS,
    ) -> None:
        self.statement = DriverStatement(statement)
        self.key = key
        self.lock_order = lock_order
        self.max_calls = max_calls
        self._queues: weakref.WeakKeyDictionary[Engine, _BatchQueue] = weakref.WeakKeyDictionary()

    async def fetch(self, database: AsyncEngine, params: Mapping[str, Any]) -> list[DriverRow]:
        """The call's rows, committed (with its batch) when this returns."""
        engine = database.sync_engine
        if engine.dialect.name != "postgresql":
            async with driver_connection(database) as connection:
                return await self.statement.fetch(connection, params)
        queue = self._queues.get(engine)
        if queue is None:
            size = getattr(engine.pool, "size", None)
            most = max(1, size() // BATCHES_PER_POOL_SHARE) if callable(size) else 1
            queue = self._queues[engine] = _BatchQueue(most)
        call = _BatchCall(params, asyncio.get_running_loop().create_future())
        queue.calls.append(call)
        try:
            if queue.running < queue.most_running:
                queue.running += 1
                try:
                    await self._run_batches(database, queue, until=call)
                finally:
                    queue.running -= 1
                    self._hand_over(database, queue)
            return await call.future
        except asyncio.CancelledError:
            if call in queue.calls:  # not in a batch yet: it never runs
                queue.calls.remove(call)
            raise

    async def _run_batches(
        self, database: AsyncEngine, queue: _BatchQueue, *, until: _BatchCall | None
    ) -> None:
        """Run batches of the queued calls until `until` has its outcome (None: until none
        is queued). A call of another caller's batch gets its outcome however this one ends."""
        while queue.calls and (until is None or not until.future.done()):
            try:
                connection = await _check_out(database)
            except Exception as exc:
                # No connection (the pool's timeout, the database away): the calls queued
                # meanwhile would fare no better.
                batch, queue.calls = queue.calls, []
                _settle(batch, exc)
                return
            batch = queue.calls[: self.max_calls]
            del queue.calls[: self.max_calls]
            if not batch:  # another runner took them while this one waited for the pool
                await connection.check_in()
            elif batch == [until]:
                # Alone: run as any statement is, stopped if its caller is.
                try:
                    await self._run(connection, batch)
                finally:
                    await connection.check_in()
            else:
                # Others' calls: the batch finishes (and the connection goes back) even if
                # this caller is cancelled meanwhile.
                task = asyncio.get_running_loop().create_task(
                    self._run_and_check_in(connection, batch), name="batched-statement"
                )
                queue.helpers.add(task)
                task.add_done_callback(queue.helpers.discard)
                await asyncio.shield(task)

    async def _run_and_check_in(
        self, connection: DriverConnection, batch: list[_BatchCall]
    ) -> None:
        try:
            await self._run(connection, batch)
        except BaseException as exc:
            _settle(batch, exc if isinstance(exc, Exception) else ConnectionAbortedError())
            raise
        finally:
            await connection.check_in()

    async def _run(self, connection: DriverConnection, batch: list[_BatchCall]) -> None:
        if len(batch) == 1:
            await self._run_one_by_one(connection, batch)
            return
        compiled = self.statement.compiled(connection.dialect)
        batch.sort(key=lambda call: str(call.params[self.lock_order]))
        args = [compiled.args(call.params) for call in batch]
        operation = compiled.sql.split(None, 1)[0]
        try:
            async with _as_sqlalchemy_errors(connection, compiled.sql, args):
                with _driver_span(connection, operation, lambda: compiled.sql):
                    records = await connection.driver.fetchmany(compiled.sql, args)
        except DBAPIError as exc:
            if exc.connection_invalidated:
                _settle(batch, exc)
            else:  # rolled back as a whole: each call to its own outcome
                await self._run_one_by_one(connection, batch)
            return
        found: dict[str, list[DriverRow]] = {str(call.params[self.key]): [] for call in batch}
        for row in compiled.rows(record.values() for record in records):
            found[str(row.batch_key)].append(row)
        for call in batch:
            if not call.future.done():
                call.future.set_result(found[str(call.params[self.key])])

    async def _run_one_by_one(self, connection: DriverConnection, batch: list[_BatchCall]) -> None:
        for index, call in enumerate(batch):
            try:
                rows = await self.statement.fetch(connection, call.params)
            except Exception as exc:
                _settle([call], exc)
                if isinstance(exc, DBAPIError) and exc.connection_invalidated:
                    _settle(batch[index:], exc)
                    return
            else:
                if not call.future.done():
                    call.future.set_result(rows)

    def _hand_over(self, database: AsyncEngine, queue: _BatchQueue) -> None:
        """Calls left queued by callers that stopped running batches get a runner of their own."""
        if not queue.calls or queue.running >= queue.most_running:
            return
        queue.running += 1

        async def drain() -> None:
            try:
                await self._run_batches(database, queue, until=None)
            finally:
                queue.running -= 1
                self._hand_over(database, queue)

        task = asyncio.get_running_loop().create_task(drain(), name="batched-statement")
        queue.helpers.add(task)
        task.add_done_callback(queue.helpers.discard)


def _settle(calls: Iterable[_BatchCall], exc: BaseException) -> None:
    """Fail the calls that have no outcome yet."""
    for call in calls:
        if not call.future.done():
            call.future.set_exception(exc)


class SqliteWork:
    """Statements run in a SQLite connection's own thread, in one trip there."""

    def __init__(self, sqlite: sqlite3.Connection, dialect: Dialect, log: list[str]) -> None:
        self.sqlite = sqlite
        self.dialect = dialect
        self.log = log  # the statements run, for the transaction's span

    def fetch(self, statement: DriverStatement, params: Mapping[str, Any]) -> list[DriverRow]:
        compiled = statement.compiled(self.dialect)
        self.log.append(compiled.sql)
        return compiled.rows(self.sqlite.execute(compiled.sql, compiled.args(params)).fetchall())


async def in_sqlite_transaction(connection: DriverConnection, work: Callable[[SqliteWork], T]) -> T:
    """Run `work` in one write transaction (`BEGIN IMMEDIATE` … `COMMIT`, rolled back if it
    raises) on the SQLite connection behind `connection`, in one trip to its thread.

    aiosqlite runs each call in the connection's thread and waits for the answer: a trip there
    and back costs more than SQLite's work on a small statement (a send took 14 of them, 2.2 ms
    in all: `bench/answer_db.py`). This queues the whole transaction as one call, as
    SQLAlchemy's own aiosqlite adapter queues some of its calls (aiosqlite has no public way).
    Errors come as SQLAlchemy's (`IntegrityError`, `OperationalError`, `DBAPIError`).
    """

    def transaction(sqlite_work: SqliteWork) -> T:
        sqlite_work.sqlite.execute("BEGIN IMMEDIATE")
        try:
            result = work(sqlite_work)
        except BaseException:
            sqlite_work.sqlite.execute("ROLLBACK")
            raise
        sqlite_work.sqlite.execute("COMMIT")
        return result

    return await _in_sqlite_thread(connection, transaction, operation="BEGIN")


async def _in_sqlite_thread(
    connection: DriverConnection, work: Callable[[SqliteWork], T], *, operation: str
) -> T:
    """Run `work` on the SQLite connection behind `connection` in one trip to its thread,
    where each statement outside a transaction commits by itself."""
    driver = connection.driver
    dialect = connection.dialect
    statements: list[str] = []

    def in_thread() -> T:
        return work(SqliteWork(driver._conn, dialect, statements))

    try:
        with _driver_span(connection, operation, lambda: ";\n".join(statements)):
            return cast(T, await driver._execute(in_thread))
    except sqlite3.IntegrityError as exc:
        raise IntegrityError(None, None, exc) from exc
    except sqlite3.OperationalError as exc:
        raise OperationalError(None, None, exc) from exc
    except sqlite3.Error as exc:
        raise DBAPIError(None, None, exc) from exc


@asynccontextmanager
async def lookup_session(
    sessionmaker: async_sessionmaker[AsyncSession],
) -> AsyncIterator[AsyncSession]:
    """A session for lookups outside a request (a resume, a stream that follows an answer).

    On PostgreSQL its statements run in autocommit: a lookup is one round trip, not three
    (`BEGIN`, the query, `COMMIT`; ~0.2 ms of CPU each), and a lone write in it commits by
    itself. SQLite begins a transaction only at a write anyway: there it is a unit of work.
    """
    async with unit_of_work(sessionmaker) as session:
        if session.get_bind().dialect.name == "postgresql":
            await session.connection(execution_options={"isolation_level": "AUTOCOMMIT"})
        yield session


def is_connection_error(exc: BaseException) -> bool:
    """True when `exc` says the database could not be reached (not a bad query)."""
    if isinstance(exc, (OSError, ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    if isinstance(exc, OperationalError):
        text_ = str(exc.orig).lower()
        return any(
            marker in text_
            for marker in ("connect", "unable to open", "connection", "could not translate")
        )
    return False


def unavailable_error(exc: BaseException) -> ServiceUnavailable | None:
    """The `503` that `exc` stands for, if it says the database is out of reach or of connections.

    Both are worth a retry, unlike a bad query: clients get `SERVICE_UNAVAILABLE` rather than
    `INTERNAL_ERROR`, and a busy server says when to come back.
    """
    if isinstance(exc, PoolTimeout):
        return DatabaseBusy()
    if is_connection_error(exc):
        return DatabaseUnavailable()
    return None


async def get_db_session(request: Request) -> AsyncIterator[AsyncSession]:
    sessionmaker: async_sessionmaker[AsyncSession] = request.app.state.sessionmaker
    async with sessionmaker() as session:
        try:
            yield session
        except BaseException as exc:
            await rollback(session)
            if (unavailable := unavailable_error(exc)) is not None:
                raise unavailable from exc
            raise
        else:
            try:
                await commit(session)
            except Exception as exc:
                if (unavailable := unavailable_error(exc)) is not None:
                    raise unavailable from exc
                raise


DbSession = Annotated[AsyncSession, Depends(get_db_session, scope="function")]


async def ping(engine: AsyncEngine) -> float:
    """Round-trip a `SELECT 1`; returns the latency in milliseconds."""
    started = time.perf_counter()
    async with engine.connect() as connection:
        await connection.execute(text("SELECT 1"))
    return (time.perf_counter() - started) * 1000
