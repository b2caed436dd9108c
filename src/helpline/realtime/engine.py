"""The generation engine: answers run as server-side tasks that belong to the conversation.

An answer is launched once its user message and its `streaming` assistant row are committed.
Its task holds a lease on the answer (renewed while it runs) and takes the answerer's text
pieces; a publisher task of the answer's own turns them into `token` events numbered by `seq`
(1, 2, …), appends each to the answer's event log and publishes it to every subscriber of the
conversation, on every instance. A piece per event while the process keeps up; pieces that come
while an event is on its way, or while the process is behind (`helpline.realtime.pressure`),
are joined into one event, so publishing never slows the answer. When the answer ends —
complete, cancelled, failed, or cut by shutdown — the result is stored first and the final event
published after, so a client that sees it can read the stored message.

Consequences: a client that leaves does not stop the answer; a client that comes back replays the
log after the last `seq` it saw; cancel reaches the task wherever it runs (control bus); an
answer whose instance died (its lease expired) is stored `failed` with the partial text from the
log, by whichever instance notices first.

The engine knows nothing of the database schema: an `AnswerStore` (the conversations domain)
stores results and finds queued questions and orphaned answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import structlog

from helpline.agents.chat import closing_stream
from helpline.agents.exceptions import LLMServiceError
from helpline.agents.schemas import (
    Answerer,
    AnswerRequest,
    ChatMessage,
    Source,
    SourcesFound,
    TextDelta,
    ToolActivity,
    Usage,
)
from helpline.core import metrics, telemetry
from helpline.core.errors import ShuttingDown
from helpline.realtime.backends import Backends, FrameListener, Unsubscribe
from helpline.realtime.frames import Frame, token_frame
from helpline.realtime.pressure import LoopLagMonitor

log = structlog.get_logger(__name__)

Outcome = Literal["complete", "cancelled", "failed"]

# While the process is behind, an answer's pieces gather this long before they are published
# (the first piece never waits): at 50 pieces/s, five to an event, and well inside the 250 ms
# a paced client allows (`bench/realtime.py paced`)...
COALESCE_PIECES_S = 0.1
COALESCE_MAX_CHARS = 4 * 1024  # ...into events of at most this much text (or one piece).


@dataclass(frozen=True, slots=True)
class AnswerJob:
    """What an instance needs to run one answer (all of it committed already)."""

    conversation_id: uuid.UUID
    user_id: uuid.UUID
    user_message_id: uuid.UUID
    assistant_message_id: uuid.UUID
    reply_to: str | None
    question: str
    history: Sequence[ChatMessage] = ()
    summary: str | None = None  # the conversation's running summary (older messages)


@dataclass(slots=True)
class AnswerResult:
    """How an answer ended, for the store."""

    job_conversation_id: uuid.UUID
    message_id: uuid.UUID
    outcome: Outcome
    content: str
    last_seq: int
    usage: Usage | None
    sources: Sequence[Source] = ()
    error_code: str | None = None
    error_detail: str | None = None
    model: str | None = None
    asked_by: uuid.UUID | None = None  # the question's author, when known


@dataclass(frozen=True, slots=True)
class StoredAnswer:
    message: dict[str, Any]  # the Message as JSON (SPEC)
    usage: Usage
    reply_to: str | None
    changed: bool = True  # False when the answer had been stored as final already


class AnswerStore(Protocol):
    async def store_result(self, result: AnswerResult) -> StoredAnswer:
        """Persist the final state of an answer.

        `result.usage` is None when the provider reported none (cancelled, failed, cut): the
        store then estimates it (prompt estimated when the answer started, completion from text).
        """
        ...

    async def next_queued(self, conversation_id: uuid.UUID) -> AnswerJob | None:
        """Under `GENERATION_POLICY=queue`: start the next waiting question's answer, if any."""
        ...

    async def streaming_answers(self, older_than_s: float) -> list[tuple[uuid.UUID, uuid.UUID]]:
        """(conversation_id, message_id) of answers stored as `streaming` for a while."""
        ...


@dataclass(eq=False)
class RunningAnswer:
    job: AnswerJob
    task: asyncio.Task[None] | None = None
    started_at: float = field(default_factory=time.perf_counter)
    seq: int = 0
    pieces: list[str] = field(default_factory=list)
    cancel_requested: bool = False
    shutdown: bool = False
    generating: bool = False  # the answerer runs: a stop cancels the task
    finishing: bool = False  # storing the result: no longer cancellable
    first_token_s: float | None = None
    message_id_text: str = ""  # the answer's id as frames carry it, formatted once
    # Pieces taken from the answerer and not yet published, and the task publishing them.
    unsent: list[str] = field(default_factory=list)
    unsent_chars: int = 0
    publisher: asyncio.Task[None] | None = None

    def __post_init__(self) -> None:
        self.message_id_text = str(self.job.assistant_message_id)


class AnswerNotRunning(Exception):
    pass


def lease_key(message_id: uuid.UUID) -> str:
    return f"answer:{message_id}"


class GenerationEngine:
    def __init__(
        self,
        *,
        backends: Backends,
        answerer: Answerer,
        store: AnswerStore,
        lease_s: float,
        instance_id: str | None = None,
        provider: str = "",
    ) -> None:
        self.backends = backends
        self.answerer = answerer
        self.store = store
        self.lease_s = lease_s
        self.instance_id = instance_id or uuid.uuid4().hex
        self.provider = provider
        self.running: dict[uuid.UUID, RunningAnswer] = {}
        self.accepting = True
        self._background: set[asyncio.Task[Any]] = set()
        self._reaper: asyncio.Task[None] | None = None
        self.loop_lag = LoopLagMonitor()
        self._closing_hooks: list[Callable[[], Awaitable[None]]] = []
        # In one process, while behind: the answers with pieces waiting for the next flush.
        self._gathering: dict[uuid.UUID, RunningAnswer] = {}
        self._flush: asyncio.TimerHandle | None = None
        # Cancels that came for an answer not (yet) running here, with when they came: one
        # committed but not launched yet is stopped as it starts.
        self._early_cancels: dict[uuid.UUID, float] = {}

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        await self.backends.start()
        self.backends.control.listen(self._on_control)
        self._reaper = asyncio.create_task(self._reap_orphans_forever(), name="answer-reaper")
        self.loop_lag.start()

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await self.loop_lag.stop()
        if self._flush is not None:
            self._flush.cancel()
            self._flush_gathered()
        await self.backends.close()

    def ensure_accepting(self) -> None:
        """Raise `503 SHUTTING_DOWN` once draining has begun."""
        if not self.accepting:
            raise ShuttingDown()

    async def drain(self, deadline: float) -> None:
        """Refuse new answers, let those in flight finish until `deadline`, then cut them."""
        self.accepting = False
        loop = asyncio.get_running_loop()
        tasks = [r.task for r in self.running.values() if r.task is not None]
        if tasks:
            log.info("engine.draining", answers=len(tasks))
            await asyncio.wait(tasks, timeout=max(0.0, deadline - loop.time()))
        for running in list(self.running.values()):
            if not running.finishing:
                running.shutdown = True
                self._interrupt(running)
        remaining = [r.task for r in self.running.values() if r.task is not None]
        if remaining:
            # Storing the partial answers is quick; bound it all the same.
            await asyncio.wait(remaining, timeout=10)

    # -- subscribing and publishing ----------------------------------------------------------

    async def subscribe(self, conversation_id: uuid.UUID, listener: FrameListener) -> Unsubscribe:
        """Call `listener` for each frame of the conversation, from every instance once this
        returns: what is replayed from a log after that joins the live frames."""
        unsubscribe = self.backends.broker.subscribe(conversation_id, listener)
        try:
            await self.backends.broker.subscribed(conversation_id)
        except BaseException:
            unsubscribe()
            raise
        return unsubscribe

    async def publish(self, frame: Frame) -> None:
        """Send a frame that is not part of an answer (message, status, typing)."""
        try:
            await self.backends.broker.publish(frame)
        except Exception:
            log.exception("engine.publish_failed", frame_type=frame.type)

    async def replay(self, message_id: uuid.UUID, after_seq: int) -> list[Frame] | None:
        """The answer's events after `after_seq` from its log; None when the log is gone."""
        return await self.backends.event_log.read_after(message_id, after_seq)

    async def is_running_anywhere(self, message_id: uuid.UUID) -> bool:
        if message_id in self.running:
            return True
        try:
            return await self.backends.leases.holder(lease_key(message_id)) is not None
        except Exception as exc:
            # Unknown while the shared backend is away: never declare an answer dead on a guess.
            log.warning("engine.lease_lookup_failed", error=str(exc))
            return True

    # -- running answers ---------------------------------------------------------------------

    def launch(self, job: AnswerJob) -> None:
        """Start the answer's task (call once the job's rows are committed)."""
        running = RunningAnswer(job=job)
        if self._early_cancels.pop(job.assistant_message_id, None) is not None:
            running.cancel_requested = True
        self.running[job.assistant_message_id] = running
        running.task = asyncio.create_task(
            self._run(running), name=f"answer-{job.assistant_message_id}"
        )

    async def request_cancel(self, message_id: uuid.UUID) -> None:
        """Ask whichever instance runs the answer to stop it."""
        await self.backends.control.send({"kind": "cancel", "message_id": str(message_id)})

    def on_control(self, handler: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        """Listen to control commands (e.g. closing a user's sockets on every instance)."""
        self.backends.control.listen(handler)

    async def send_control(self, command: dict[str, Any]) -> None:
        await self.backends.control.send(command)

    async def _on_control(self, command: dict[str, Any]) -> None:
        if command.get("kind") != "cancel":
            return
        message_id = uuid.UUID(str(command["message_id"]))
        running = self.running.get(message_id)
        if running is None:
            self._remember_early_cancel(message_id)
        elif not running.finishing:
            running.cancel_requested = True
            self._interrupt(running)

    def _remember_early_cancel(self, message_id: uuid.UUID) -> None:
        """Keep a cancel for an answer that may start here soon (for a lease's time)."""
        now = asyncio.get_running_loop().time()
        stale = [key for key, at in self._early_cancels.items() if now - at > self.lease_s]
        for key in stale:
            del self._early_cancels[key]
        self._early_cancels[message_id] = now

    @staticmethod
    def _interrupt(running: RunningAnswer) -> None:
        """Stop the answerer. Before it started (the task may not have run yet: a cancelled
        task would end before storing anything), `_generate` sees the request and never
        calls it."""
        if running.generating and running.task is not None:
            running.task.cancel()

    async def _run(self, running: RunningAnswer) -> None:
        job = running.job
        key = lease_key(job.assistant_message_id)
        try:
            owned = await self.backends.leases.acquire(key, self.instance_id, self.lease_s)
        except Exception as exc:
            # The shared backend is away: only this instance launched the answer, so run it
            # for the local clients rather than drop it.
            log.warning("engine.lease_unavailable", error=str(exc))
            owned = True
        if not owned:
            log.warning("engine.answer_owned_elsewhere", message_id=str(job.assistant_message_id))
            self.running.pop(job.assistant_message_id, None)
            return
        renewer = asyncio.create_task(self._renew_lease(key))
        model = self.answerer.model
        metrics.ANSWERS_IN_FLIGHT.inc()
        try:
            with telemetry.generation_span(
                provider=self.provider,
                model=model,
                conversation_id=job.conversation_id,
                message_id=job.assistant_message_id,
            ) as span:
                result = await self._generate(running)
                span.outcome = result.outcome
                span.time_to_first_token_s = running.first_token_s
                try:
                    stored = await self._finish(result)
                except Exception:
                    # The database is unreachable: the lease is released below, and the reaper
                    # stores the answer from its log once the database is back.
                    log.exception("engine.answer_store_failed", message_id=str(result.message_id))
                    return
                span.prompt_tokens = stored.usage.prompt_tokens
                span.completion_tokens = stored.usage.completion_tokens
        finally:
            renewer.cancel()
            try:
                await self.backends.leases.release(key, self.instance_id)
            except Exception as exc:
                log.warning("engine.lease_release_failed", error=str(exc))
            self.running.pop(job.assistant_message_id, None)
            metrics.ANSWERS_IN_FLIGHT.dec()
        self._record_metrics(running, result, stored.usage, model)
        await self.start_next_queued(job.conversation_id)

    async def _generate(self, running: RunningAnswer) -> AnswerResult:
        """Run the answerer to its end, whatever the end; the text so far is always kept."""
        job = running.job
        outcome: Outcome = "complete"
        usage: Usage | None = None
        sources: Sequence[Source] = ()
        error_code: str | None = None
        error_detail: str | None = None
        request = AnswerRequest(
            conversation_id=job.conversation_id,
            user_id=job.user_id,
            assistant_message_id=job.assistant_message_id,
            question=job.question,
            history=job.history,
            summary=job.summary,
        )
        running.generating = True
        try:
            if running.cancel_requested or running.shutdown:
                raise asyncio.CancelledError  # stopped before the model was called
            async with closing_stream(self.answerer.answer(request)) as events:
                async for event in events:
                    if isinstance(event, TextDelta):
                        if event.text:
                            self._take_piece(running, event.text)
                    elif isinstance(event, Usage):
                        usage = event
                    elif isinstance(event, SourcesFound):
                        sources = tuple(event.sources)
                    elif isinstance(event, ToolActivity):
                        log.info(
                            "engine.tool_activity",
                            tool=event.name,
                            status=event.status,
                            message_id=str(job.assistant_message_id),
                        )
        except asyncio.CancelledError:
            # The task goes on to store what it has; it is not cancelled as a whole.
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            if running.shutdown:
                outcome, error_code = "failed", "SHUTTING_DOWN"
                error_detail = "The server shut down before the answer was finished"
            else:
                outcome = "cancelled"
        except LLMServiceError as exc:
            outcome, error_code, error_detail = "failed", exc.code, exc.message
        except Exception:
            log.exception("engine.answer_crashed", message_id=str(job.assistant_message_id))
            outcome, error_code = "failed", "INTERNAL_ERROR"
            error_detail = "The answer could not be generated"
        finally:
            running.finishing = True
        # Every piece is out before the final event.
        await self._publish_rest(running)
        return AnswerResult(
            job_conversation_id=job.conversation_id,
            message_id=job.assistant_message_id,
            outcome=outcome,
            content="".join(running.pieces),
            last_seq=running.seq + 1,
            # A provider reports no usage for a cut stream: the store estimates it.
            usage=usage if outcome == "complete" else None,
            sources=sources,
            error_code=error_code,
            error_detail=error_detail,
            model=self.answerer.model,
            asked_by=job.user_id,
        )

    def _take_piece(self, running: RunningAnswer, text: str) -> None:
        """Keep a piece and have it published; the answerer is never held up by publishing.

        In one process (no shared backend) publishing is no I/O: while the loop keeps up, a
        piece is logged and delivered right here (a task per piece would cost more than the
        delivery); while it is behind, every answer's pieces gather for one flush of them all.
        Otherwise a task publishes, and pieces that come meanwhile join its next event.
        """
        running.pieces.append(text)
        running.unsent.append(text)
        running.unsent_chars += len(text)
        if running.publisher is not None and not running.publisher.done():
            return
        if not self.backends.in_process:
            running.publisher = asyncio.create_task(
                self._publish_unsent(running), name=f"publish-{running.message_id_text}"
            )
        elif (
            running.seq == 0
            or not self.loop_lag.behind
            # A whole event's worth: gathering longer would only make a burst of events.
            or running.unsent_chars >= COALESCE_MAX_CHARS
        ):
            self._gathering.pop(running.job.assistant_message_id, None)
            self._publish_now(running)
        else:
            self._gathering[running.job.assistant_message_id] = running
            if self._flush is None:
                self._flush = asyncio.get_running_loop().call_later(
                    COALESCE_PIECES_S, self._flush_gathered
                )

    def _publish_now(self, running: RunningAnswer) -> None:
        while running.unsent:
            frame = self._next_token_frame(running)
            self.backends.log_and_publish_now(running.job.assistant_message_id, frame)

    def _flush_gathered(self) -> None:
        self._flush = None
        gathered, self._gathering = self._gathering, {}
        for running in gathered.values():
            self._publish_now(running)

    async def _publish_unsent(self, running: RunningAnswer, *, wait: bool = True) -> None:
        """Log and publish the unsent pieces, as `token` events numbered by `seq`.

        Pieces that come while an event is on its way (a Redis round trip, with several
        instances) are joined into the next event, and while the process is behind they gather
        for a moment first: a busy process or a slow shared backend means fewer, larger events,
        never a slower answer. The first piece goes out at once.
        """
        if wait and running.seq > 0 and self.loop_lag.behind:
            await asyncio.sleep(COALESCE_PIECES_S)
        while running.unsent:
            frame = self._next_token_frame(running)
            await self._emit(running.job.assistant_message_id, frame)

    def _next_token_frame(self, running: RunningAnswer) -> Frame:
        """The next `token` event: the unsent pieces, joined up to `COALESCE_MAX_CHARS`."""
        taken, size = 0, 0
        for piece in running.unsent:
            if taken and size + len(piece) > COALESCE_MAX_CHARS:
                break
            taken += 1
            size += len(piece)
        pieces = running.unsent[:taken]
        del running.unsent[:taken]
        running.unsent_chars -= size
        if running.seq == 0:
            running.first_token_s = time.perf_counter() - running.started_at
        running.seq += 1
        job = running.job
        return token_frame(
            job.conversation_id,
            running.message_id_text,
            job.reply_to,
            running.seq,
            pieces[0] if taken == 1 else "".join(pieces),
        )

    async def _publish_rest(self, running: RunningAnswer) -> None:
        """Wait for the pieces on their way, then publish any left, without gathering more."""
        self._gathering.pop(running.job.assistant_message_id, None)
        publisher = running.publisher
        if publisher is not None and not publisher.done():
            # Shielded: the answer's task may be cut (shutdown) while its text is still going out.
            with contextlib.suppress(Exception):
                await asyncio.shield(publisher)
        if running.unsent:
            await self._publish_unsent(running, wait=False)
        # One turn of the loop before the store: the sockets' writers send the last pieces
        # now rather than after the store's work (a short answer's first token is its last).
        await asyncio.sleep(0)

    def _record_metrics(
        self, running: RunningAnswer, result: AnswerResult, usage: Usage, model: str
    ) -> None:
        """Accounting is best effort: it never breaks an answer."""
        try:
            metrics.LLM_TOKENS.labels(model=model, kind="prompt").inc(usage.prompt_tokens)
            metrics.LLM_TOKENS.labels(model=model, kind="completion").inc(usage.completion_tokens)
            metrics.LLM_REQUEST_DURATION.labels(model=model, outcome=result.outcome).observe(
                time.perf_counter() - running.started_at
            )
            if running.first_token_s is not None:
                metrics.LLM_TIME_TO_FIRST_TOKEN.labels(model=model).observe(running.first_token_s)
            if result.outcome == "cancelled":
                metrics.LLM_CANCELLATIONS.labels(model=model).inc()
            elif result.outcome == "failed":
                metrics.LLM_ERRORS.labels(model=model, type=result.error_code or "UNKNOWN").inc()
        except Exception:
            log.warning("engine.metrics_failed", exc_info=True)

    async def _emit(self, message_id: uuid.UUID, frame: Frame) -> None:
        """Log, then publish: a client that resumes after seeing a frame finds it in the log."""
        await self.backends.log_and_publish(message_id, frame)

    async def _finish(self, result: AnswerResult) -> StoredAnswer:
        stored = await self.store.store_result(result)
        if not stored.changed:
            # Another instance stored this answer first (e.g. it judged it orphaned): its
            # final event stands.
            log.warning("engine.answer_already_final", message_id=str(result.message_id))
            return stored
        message, usage = stored.message, stored.usage
        data: dict[str, Any] = {
            "type": result.outcome,
            "message_id": str(result.message_id),
            "reply_to": stored.reply_to,
            "seq": result.last_seq,
        }
        if result.outcome == "complete":
            data["message"] = message
            data["usage"] = {
                "prompt_tokens": usage.prompt_tokens,
                "completion_tokens": usage.completion_tokens,
            }
        elif result.outcome == "failed":
            data["code"] = result.error_code
            data["detail"] = result.error_detail
            data["message"] = message
        else:
            data["message"] = message
        frame = Frame(data=data, conversation_id=result.job_conversation_id)
        await self._emit(result.message_id, frame)
        try:
            await self.backends.event_log.seal(result.message_id)
        except Exception:
            log.warning("engine.event_log_seal_failed", message_id=str(result.message_id))
        log.info(
            "chat.answer_finished",
            conversation_id=str(result.job_conversation_id),
            message_id=str(result.message_id),
            outcome=result.outcome,
            completion_tokens=usage.completion_tokens,
            error_code=result.error_code,
        )
        return stored

    async def start_next_queued(self, conversation_id: uuid.UUID) -> None:
        """Under `GENERATION_POLICY=queue`: answer the next waiting question, if any."""
        if not self.accepting:
            return
        try:
            job = await self.store.next_queued(conversation_id)
        except Exception:
            log.exception("engine.next_queued_failed", conversation_id=str(conversation_id))
            return
        if job is not None:
            self.launch(job)

    async def _renew_lease(self, key: str) -> None:
        interval = self.lease_s / 3
        while True:
            await asyncio.sleep(interval)
            try:
                if not await self.backends.leases.renew(key, self.instance_id, self.lease_s):
                    log.warning("engine.lease_lost", key=key)
            except Exception:
                log.warning("engine.lease_renew_failed", key=key)

    # -- orphans -----------------------------------------------------------------------------

    async def fail_if_orphaned(self, conversation_id: uuid.UUID, message_id: uuid.UUID) -> bool:
        """Store an answer that runs nowhere any more as `failed` (partial text from its log)."""
        if await self.is_running_anywhere(message_id):
            return False
        frames = await self.backends.event_log.read_after(message_id, 0) or []
        if any(frame.is_final for frame in frames):
            return False
        tokens = [frame for frame in frames if frame.type == "token"]
        content = "".join(str(frame.data["content"]) for frame in tokens)
        last_seq = max((frame.seq or 0 for frame in tokens), default=0)
        result = AnswerResult(
            job_conversation_id=conversation_id,
            message_id=message_id,
            outcome="failed",
            content=content,
            last_seq=last_seq + 1,
            usage=None,
            error_code="SERVICE_UNAVAILABLE",
            error_detail="The server generating this answer stopped before it was finished",
        )
        log.warning("engine.orphan_failed", message_id=str(message_id), seq=last_seq)
        await self._finish(result)
        return True

    async def reap_orphans(self) -> int:
        """One pass: fail every `streaming` answer whose lease has expired."""
        count = 0
        for conversation_id, message_id in await self.store.streaming_answers(self.lease_s):
            if message_id in self.running:
                continue
            try:
                if await self.fail_if_orphaned(conversation_id, message_id):
                    count += 1
            except Exception:
                log.exception("engine.reap_failed", message_id=str(message_id))
        return count

    async def _reap_orphans_forever(self) -> None:
        while True:
            try:
                await self.reap_orphans()
            except Exception as exc:
                # Usually the database is away; say so once per pass, without a traceback.
                log.warning("engine.reaper_failed", error=f"{type(exc).__name__}: {exc}"[:300])
            await asyncio.sleep(self.lease_s)
