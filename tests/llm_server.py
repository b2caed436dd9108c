"""A scriptable model server for tests: OpenAI- and Anthropic-compatible, on 127.0.0.1.

A real HTTP/1.1 server (raw asyncio, in a thread with its own event loop), so the providers are
tested through their SDKs, sockets and timeouts — nothing is mocked. It serves

- `POST /v1/chat/completions` — OpenAI chat completions, streamed as `chat.completion.chunk`
  server-sent events, a finishing chunk, a usage chunk when the request asks for it
  (`stream_options.include_usage`) and `data: [DONE]`;
- `POST /v1/messages` — Anthropic messages, streamed as `message_start`, `content_block_*`,
  `message_delta` (usage) and `message_stop` events;
- `GET /v1/models` — a model list in the format of whichever SDK asks.

Each completion request plays one `Script`: queued ones first (`enqueue`), then whatever
`responder` picks, then `default`. A script sets the pieces of text, a delay per piece, an HTTP
error status, a hang (before the headers or after N pieces), a connection dropped after N
pieces, an error event or a cleanly cut body after N pieces, whether usage is reported, and the
tool calls that follow the text (`ScriptedToolCall`: OpenAI `delta.tool_calls` chunks, or
Anthropic `tool_use` blocks with `input_json_delta`s, their arguments in the given pieces).

Everything the server saw is recorded: `requests` (method, path, headers, JSON body) and
`closed_early`, the completion requests whose client closed the connection before the
response was over — how tests prove from the server's side that a cancelled answer really
closed its upstream stream. `wait_for_requests` / `wait_for_closed_early` block until a count
is reached (the `async_` variants wait in a thread, for tests running an event loop).

    with LLMTestServer() as server:
        server.enqueue(Script(chunks=["Hel", "lo"], delay_s=0.01))
        model = OpenAIChatModel(base_url=server.openai_base_url, ...)
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    529: "Overloaded",
}


@dataclass(frozen=True)
class ScriptedToolCall:
    """A tool call the scripted model makes after its text; `arguments` is streamed in pieces."""

    id: str
    name: str
    arguments: Sequence[str] = ("{}",)


@dataclass(frozen=True)
class Script:
    """What the server does for one completion request."""

    chunks: Sequence[str] = ("Hello", "!", " How", " can", " I", " help", "?")
    delay_s: float = 0.0  # before each piece
    status: int = 200  # anything else: an error response in the provider's format, no stream
    hang_before_headers: bool = False  # accept the request, never answer
    hang_after: int | None = None  # send N pieces, then nothing more, keeping the connection open
    drop_after: int | None = None  # send N pieces, then drop the TCP connection (an RST)
    error_after: int | None = None  # send N pieces, then an error event, then end the body
    truncate_after: int | None = None  # send N pieces, then end the body without finishing
    usage: bool = True  # report usage (OpenAI: only when the request asks for it)
    prompt_tokens: int = 17
    completion_tokens: int | None = None  # default: one per piece
    error_message: str = "scripted failure"
    tool_calls: Sequence[ScriptedToolCall] = ()

    @property
    def text(self) -> str:
        return "".join(self.chunks)


@dataclass
class RecordedRequest:
    index: int
    method: str
    path: str
    headers: dict[str, str]
    body: Any
    outcome: str = "pending"  # "complete", "closed_early", "dropped"

    @property
    def is_anthropic(self) -> bool:
        return self.path.endswith("/messages") or "anthropic-version" in self.headers


@dataclass(eq=False)
class _Connection(asyncio.Protocol):
    server: LLMTestServer
    buffer: bytearray = field(default_factory=bytearray)
    transport: asyncio.Transport | None = None
    ended: bool = False
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    lost: asyncio.Event = field(default_factory=asyncio.Event)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.server._connections.add(self)
        self.server._spawn(self.serve())

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self.changed.set()

    def eof_received(self) -> bool:
        self.ended = True
        self.changed.set()
        return False  # close our side too: an HTTP client that half-closes has left

    def connection_lost(self, _exc: Exception | None) -> None:
        self.server._connections.discard(self)
        self.ended = True
        self.changed.set()
        self.lost.set()

    async def read_until(self, separator: bytes) -> bytes | None:
        while True:
            position = self.buffer.find(separator)
            if position >= 0:
                end = position + len(separator)
                data = bytes(self.buffer[:end])
                del self.buffer[:end]
                return data
            if self.ended:
                return None
            self.changed.clear()
            await self.changed.wait()

    async def read_exactly(self, size: int) -> bytes | None:
        while len(self.buffer) < size:
            if self.ended:
                return None
            self.changed.clear()
            await self.changed.wait()
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        return data

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        if not self.transport.is_closing():
            self.transport.write(data)

    def write_chunk(self, data: bytes) -> None:
        self.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")

    async def serve(self) -> None:
        try:
            while True:
                head = await self.read_until(b"\r\n\r\n")
                if head is None:
                    return
                request = await self._read_request(head)
                if request is None:
                    return
                respond = asyncio.ensure_future(self.server._respond(self, request))
                lost = asyncio.ensure_future(self.lost.wait())
                try:
                    await asyncio.wait({respond, lost}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    lost.cancel()
                    if not respond.done():
                        respond.cancel()
                        self.server._finish(request, "closed_early")
                if not respond.done() or respond.cancelled() or not respond.result():
                    return
        finally:
            if self.transport is not None:
                self.transport.close()

    async def _read_request(self, head: bytes) -> RecordedRequest | None:
        lines = head.decode("latin-1").split("\r\n")
        method, target, _version = lines[0].split(" ", 2)
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if ":" in line:
                name, value = line.split(":", 1)
                headers[name.strip().lower()] = value.strip()
        raw = b""
        if length := int(headers.get("content-length", "0")):
            body = await self.read_exactly(length)
            if body is None:
                return None
            raw = body
        parsed: Any = json.loads(raw) if raw else None
        return self.server._record(method, target.split("?", 1)[0], headers, parsed)


class LLMTestServer:
    """An OpenAI/Anthropic-compatible streaming server on 127.0.0.1 with scripted answers."""

    def __init__(
        self,
        default: Script | None = None,
        *,
        responder: Callable[[RecordedRequest], Script | None] | None = None,
        models: Sequence[str] = ("test-model",),
    ) -> None:
        self.default = default or Script()
        self.responder = responder
        self.models = list(models)
        self.models_status = 200
        self.models_delay_s = 0.0
        self.port = 0
        self._scripts: deque[Script] = deque()
        self._requests: list[RecordedRequest] = []
        self._condition = threading.Condition()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._connections: set[_Connection] = set()
        self._thread: threading.Thread | None = None
        self._started = threading.Event()

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> Self:
        self._thread = threading.Thread(target=self._run, name="llm-test-server", daemon=True)
        self._thread.start()
        if not self._started.wait(10):
            raise RuntimeError("the LLM test server did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def openai_base_url(self) -> str:
        """`LLM_BASE_URL` for the `openai` provider."""
        return f"{self.url}/v1"

    @property
    def anthropic_base_url(self) -> str:
        """`LLM_BASE_URL` for the `anthropic` provider (its SDK adds `/v1/messages`)."""
        return self.url

    # -- scripting and records ---------------------------------------------------------------

    def enqueue(self, *scripts: Script) -> None:
        """Play these scripts for the next completion requests, in order."""
        with self._condition:
            self._scripts.extend(scripts)

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._condition:
            return list(self._requests)

    @property
    def completion_requests(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.method == "POST"]

    @property
    def closed_early(self) -> list[RecordedRequest]:
        """Completion requests whose client closed the connection before the response ended."""
        return [r for r in self.requests if r.outcome == "closed_early"]

    def wait_for_requests(self, count: int, timeout: float = 5.0) -> bool:
        """Block until `count` completion requests have arrived."""
        return self._wait(lambda: len(self.completion_requests) >= count, timeout)

    def wait_for_closed_early(self, count: int = 1, timeout: float = 5.0) -> bool:
        """Block until `count` completion requests were abandoned by their client."""
        return self._wait(lambda: len(self.closed_early) >= count, timeout)

    async def async_wait_for_requests(self, count: int, within_s: float = 5.0) -> bool:
        return await asyncio.to_thread(self.wait_for_requests, count, within_s)

    async def async_wait_for_closed_early(self, count: int = 1, within_s: float = 5.0) -> bool:
        return await asyncio.to_thread(self.wait_for_closed_early, count, within_s)

    def _wait(self, predicate: Callable[[], bool], timeout: float) -> bool:
        # The condition's lock is re-entrant, so the predicates may read the records.
        with self._condition:
            return self._condition.wait_for(predicate, timeout)

    def _record(
        self, method: str, path: str, headers: dict[str, str], body: Any
    ) -> RecordedRequest:
        with self._condition:
            request = RecordedRequest(len(self._requests), method, path, headers, body)
            self._requests.append(request)
            self._condition.notify_all()
            return request

    def _finish(self, request: RecordedRequest, outcome: str) -> None:
        with self._condition:
            request.outcome = outcome
            self._condition.notify_all()

    def _next_script(self, request: RecordedRequest) -> Script:
        with self._condition:
            if self._scripts:
                return self._scripts.popleft()
        if self.responder is not None and (script := self.responder(request)) is not None:
            return script
        return self.default

    # -- the event loop thread ------------------------------------------------------------

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        server = await self._loop.create_server(lambda: _Connection(self), host="127.0.0.1", port=0)
        self.port = server.sockets[0].getsockname()[1]
        self._started.set()
        try:
            await self._stopping.wait()
        finally:
            server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            for connection in list(self._connections):
                if connection.transport is not None:
                    connection.transport.abort()
            await server.wait_closed()

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- responses -------------------------------------------------------------------------

    async def _respond(self, connection: _Connection, request: RecordedRequest) -> bool:
        """Answer one request; False when the connection must not be reused."""
        if request.method == "GET" and request.path.rstrip("/").endswith("/models"):
            return await self._respond_models(connection, request)
        if request.method != "POST" or not (
            request.path.endswith("/chat/completions") or request.path.endswith("/messages")
        ):
            self._write_json(connection, 404, {"error": {"message": "no such route"}})
            self._finish(request, "complete")
            return True

        script = self._next_script(request)
        if script.hang_before_headers:
            await asyncio.Event().wait()
        if script.status != 200:
            self._write_json(connection, script.status, self._error_body(request, script))
            self._finish(request, "complete")
            return True

        events = (
            _AnthropicEvents(request, script)
            if request.is_anthropic
            else _OpenAIEvents(request, script)
        )
        connection.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
            b"transfer-encoding: chunked\r\nconnection: keep-alive\r\n\r\n"
        )
        for event in events.opening():
            connection.write_chunk(event)
        for index, piece in enumerate(script.chunks):
            if index == script.hang_after:
                await asyncio.Event().wait()
            if index == script.drop_after:
                return self._drop(connection, request)
            if index == script.error_after:
                connection.write_chunk(events.error(script.error_message))
                return self._end_body(connection, request)
            if index == script.truncate_after:
                return self._end_body(connection, request)
            if script.delay_s:
                await asyncio.sleep(script.delay_s)
            connection.write_chunk(events.delta(piece))
        count = len(script.chunks)
        if script.hang_after is not None and script.hang_after >= count:
            await asyncio.Event().wait()
        if script.drop_after is not None and script.drop_after >= count:
            return self._drop(connection, request)
        if script.error_after is not None and script.error_after >= count:
            connection.write_chunk(events.error(script.error_message))
            return self._end_body(connection, request)
        if script.truncate_after is not None and script.truncate_after >= count:
            return self._end_body(connection, request)
        for event in events.tool_calls():
            if script.delay_s:
                await asyncio.sleep(script.delay_s)
            connection.write_chunk(event)
        for event in events.closing():
            connection.write_chunk(event)
        return self._end_body(connection, request)

    def _end_body(self, connection: _Connection, request: RecordedRequest) -> bool:
        connection.write(b"0\r\n\r\n")
        self._finish(request, "complete")
        return True

    def _drop(self, connection: _Connection, request: RecordedRequest) -> bool:
        self._finish(request, "dropped")
        assert connection.transport is not None
        connection.transport.abort()
        return False

    async def _respond_models(self, connection: _Connection, request: RecordedRequest) -> bool:
        if self.models_delay_s:
            await asyncio.sleep(self.models_delay_s)
        if self.models_status != 200:
            script = Script(status=self.models_status)
            self._write_json(connection, self.models_status, self._error_body(request, script))
        elif request.is_anthropic:
            data = [
                {
                    "type": "model",
                    "id": name,
                    "display_name": name,
                    "created_at": "2025-01-01T00:00:00Z",
                }
                for name in self.models
            ]
            first, last = (self.models[0], self.models[-1]) if self.models else (None, None)
            body = {"data": data, "has_more": False, "first_id": first, "last_id": last}
            self._write_json(connection, 200, body)
        else:
            listed: list[dict[str, Any]] = [
                {"id": name, "object": "model", "created": 0, "owned_by": "test"}
                for name in self.models
            ]
            self._write_json(connection, 200, {"object": "list", "data": listed})
        self._finish(request, "complete")
        return True

    @staticmethod
    def _error_body(request: RecordedRequest, script: Script) -> dict[str, Any]:
        if request.is_anthropic:
            kind = "api_error" if script.status >= 500 else "invalid_request_error"
            return {"type": "error", "error": {"type": kind, "message": script.error_message}}
        kind = "server_error" if script.status >= 500 else "invalid_request_error"
        return {"error": {"message": script.error_message, "type": kind, "code": None}}

    @staticmethod
    def _write_json(connection: _Connection, status: int, body: Any) -> None:
        payload = json.dumps(body).encode()
        reason = _REASONS.get(status, "Error")
        connection.write(
            f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(payload)}\r\nconnection: keep-alive\r\n\r\n".encode()
            + payload
        )


def _sse(data: Any, event: str | None = None) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data)
    prefix = f"event: {event}\n" if event else ""
    return f"{prefix}data: {text}\n\n".encode()


class _OpenAIEvents:
    def __init__(self, request: RecordedRequest, script: Script) -> None:
        body = request.body if isinstance(request.body, dict) else {}
        self.model = str(body.get("model", "test-model"))
        self.script = script
        options = body.get("stream_options") or {}
        self.include_usage = bool(options.get("include_usage"))

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        chunk = {
            "id": "chatcmpl-test",
            "object": "chat.completion.chunk",
            "created": 1_700_000_000,
            "model": self.model,
            "choices": choices,
            **extra,
        }
        return _sse(chunk)

    def opening(self) -> list[bytes]:
        delta = {"role": "assistant", "content": ""}
        return [self._chunk([{"index": 0, "delta": delta, "finish_reason": None}])]

    def delta(self, text: str) -> bytes:
        return self._chunk([{"index": 0, "delta": {"content": text}, "finish_reason": None}])

    def error(self, message: str) -> bytes:
        return _sse({"error": {"message": message, "type": "server_error"}})

    def tool_calls(self) -> list[bytes]:
        events: list[bytes] = []
        for index, call in enumerate(self.script.tool_calls):
            opening = {
                "index": index,
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": ""},
            }
            events.append(self._tool_delta(opening))
            for piece in call.arguments:
                events.append(self._tool_delta({"index": index, "function": {"arguments": piece}}))
        return events

    def _tool_delta(self, call: dict[str, Any]) -> bytes:
        delta = {"tool_calls": [call]}
        return self._chunk([{"index": 0, "delta": delta, "finish_reason": None}])

    def closing(self) -> list[bytes]:
        reason = "tool_calls" if self.script.tool_calls else "stop"
        events = [self._chunk([{"index": 0, "delta": {}, "finish_reason": reason}])]
        if self.script.usage and self.include_usage:
            completion = self.script.completion_tokens
            if completion is None:
                completion = len(self.script.chunks)
            usage = {
                "prompt_tokens": self.script.prompt_tokens,
                "completion_tokens": completion,
                "total_tokens": self.script.prompt_tokens + completion,
            }
            events.append(self._chunk([], usage=usage))
        events.append(_sse("[DONE]"))
        return events


class _AnthropicEvents:
    def __init__(self, request: RecordedRequest, script: Script) -> None:
        body = request.body if isinstance(request.body, dict) else {}
        self.model = str(body.get("model", "test-model"))
        self.script = script

    def opening(self) -> list[bytes]:
        message: dict[str, Any] = {
            "id": "msg_test",
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
        }
        if self.script.usage:
            message["usage"] = {"input_tokens": self.script.prompt_tokens, "output_tokens": 1}
        block: dict[str, Any] = {"type": "content_block_start", "index": 0}
        return [
            _sse({"type": "message_start", "message": message}, "message_start"),
            _sse({**block, "content_block": {"type": "text", "text": ""}}, "content_block_start"),
            _sse({"type": "ping"}, "ping"),
        ]

    def delta(self, text: str) -> bytes:
        delta: dict[str, Any] = {"type": "content_block_delta", "index": 0}
        return _sse({**delta, "delta": {"type": "text_delta", "text": text}}, "content_block_delta")

    def error(self, message: str) -> bytes:
        error = {"type": "error", "error": {"type": "overloaded_error", "message": message}}
        return _sse(error, "error")

    def tool_calls(self) -> list[bytes]:
        if not self.script.tool_calls:
            return []
        # The text block ends first; each tool call is a block of its own after it.
        events = [_sse({"type": "content_block_stop", "index": 0}, "content_block_stop")]
        for number, call in enumerate(self.script.tool_calls, start=1):
            block = {"type": "tool_use", "id": call.id, "name": call.name, "input": {}}
            start = {"type": "content_block_start", "index": number, "content_block": block}
            events.append(_sse(start, "content_block_start"))
            for piece in call.arguments:
                delta = {"type": "input_json_delta", "partial_json": piece}
                event = {"type": "content_block_delta", "index": number, "delta": delta}
                events.append(_sse(event, "content_block_delta"))
            stop = {"type": "content_block_stop", "index": number}
            events.append(_sse(stop, "content_block_stop"))
        return events

    def closing(self) -> list[bytes]:
        reason = "tool_use" if self.script.tool_calls else "end_turn"
        delta: dict[str, Any] = {
            "type": "message_delta",
            "delta": {"stop_reason": reason, "stop_sequence": None},
        }
        if self.script.usage:
            completion = self.script.completion_tokens
            if completion is None:
                completion = len(self.script.chunks)
            delta["usage"] = {"output_tokens": completion}
        events = (
            []
            if self.script.tool_calls
            else [_sse({"type": "content_block_stop", "index": 0}, "content_block_stop")]
        )
        return [
            *events,
            _sse(delta, "message_delta"),
            _sse({"type": "message_stop"}, "message_stop"),
        ]
