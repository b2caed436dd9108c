"""`LLM_PROVIDER=fake`: a deterministic model with no network, for tests, demos and benchmarks.

Without instructions it answers one fixed sentence that quotes the question. Tests — also tests
that drive a server running in another process — steer it through the text of the **last user
message**: every `[[...]]` block in it is a set of directives (and is left out of the quoted
question). Directives are `key=value` pairs or bare flags separated by spaces; a value with
spaces goes in double quotes, where `\\"` and `\\\\` escape a quote and a backslash.

    [[tokens=50 delay_ms=20]]     50 pieces, one every 20 ms
    [[reply="Exact answer."]]     answer exactly this text
    [[fail_after=5]]              5 pieces, then `LLMServiceError`
    [[hang_after=3]]              3 pieces, then wait forever (until cancelled)
    [[usage=off]]                 report no provider usage: an estimate comes instead
    [[tool=escalate_to_human reason="Wants a refund"]]    call a tool first (see below)

| directive | meaning |
|---|---|
| `reply="text"` | the answer's text (otherwise the fixed sentence) |
| `tokens=N` | exactly N pieces: the words of the reply (or of the sentence), repeated or cut |
| `delay_ms=N` | a piece every N ms (default: the instance's `delay_ms`, 0) |
| `first_delay_ms=N` | the first piece after N ms instead (time to first token) |
| `fail_after=N` | raise `LLMServiceError` after N pieces (`fail` = `fail_after=0`) |
| `hang_after=N` | stop after N pieces and wait until cancelled (`hang` = `hang_after=0`) |
| `usage=off` | end with an estimated `Usage` (as for a provider that reports none) |
| `tool=NAME key="value" …` | call tool `NAME`, the block's other pairs being its arguments |

**Tool calls.** A block with `tool=NAME` asks for a tool instead of giving directives: every
other pair in that block is one of the call's arguments (a JSON object of strings), e.g.
`[[tool=search_knowledge_base query="refund window"]]`; several such blocks ask for several
calls at once, in order. When the model is offered tools (`stream(..., tools=...)`) and the
messages after the last user message hold no tool result yet, it answers with those calls
(`ToolCall`s with ids `call_1`, `call_2`, …, then its `Usage`) and no text; once the results
are in, it answers with its text as usual. Offered no tools, it ignores these blocks.

Pieces are words with their leading whitespace, so concatenating the `TextDelta`s rebuilds the
text exactly. Pieces are due on a schedule from the stream's start, as a remote model streams
however fast it is read: a reader that fell behind gets the overdue pieces at once, rather than
every delay adding up its lateness. As from a network stream, the pieces that fell due while the
reader was away come out together, and the stream yields to the event loop before each piece
that was not yet due when it last came back, and before every piece when there is no delay:
cancellation lands at once, and a stream never holds the loop for long. Streams wait for their
pieces on one clock per event loop that wakes, each millisecond something is due, all the
streams due then (as a network card hands over the packets that came meanwhile): one timer per
millisecond rather than one per piece, which cuts what a paced stream costs its process by a
third (`bench/fake_model.py`), so that benchmarks with thousands of streams measure the server
rather than its stand-in model.
Usage is reported as a provider would: prompt tokens estimated from the messages, completion
tokens = the number of pieces. Unknown directives and bad values are ignored (and logged).

The instance counts its streams — `active_streams` (running now), `completed_streams`,
`failed_streams`, `cancelled_streams` (stopped by cancellation or closed early) — and keeps the
last requests' messages in `requests` (and the names of the tools offered with them in
`offered_tools`), so tests can check that a cancel reached the provider.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import weakref
from collections import deque
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Any, overload

import structlog

from helpline.agents.exceptions import LLMServiceError
from helpline.agents.schemas import ChatMessage, TextDelta, ToolCall, ToolSpec, Usage
from helpline.agents.tokens import estimate_prompt_tokens, estimate_tokens

log = structlog.get_logger(__name__)

DEFAULT_MODEL = "fake-1"
_BLOCK = re.compile(r"\[\[(.*?)\]\]", re.DOTALL)
_DIRECTIVE = re.compile(r'([A-Za-z_][\w-]*)(?:=("(?:[^"\\]|\\.)*"|\S*))?')
_PIECE = re.compile(r"\s*\S+")
_INT_KEYS = frozenset({"tokens", "delay_ms", "first_delay_ms", "fail_after", "hang_after"})
_FLAGS = {"fail": "fail_after", "hang": "hang_after"}
REQUESTS_KEPT = 100
# The piece clock's resolution; uvloop's timers have no finer one.
CLOCK_TICK_S = 0.001


@dataclass(frozen=True, slots=True)
class Script:
    """What one fake answer does, read from the directives of the last user message."""

    question: str
    reply: str | None = None
    tokens: int | None = None
    delay_ms: float | None = None
    first_delay_ms: float | None = None
    fail_after: int | None = None
    hang_after: int | None = None
    usage: bool = True
    # (tool name, arguments) of each `[[tool=...]]` block, in order.
    tool_calls: tuple[tuple[str, dict[str, str]], ...] = ()


def _tool_block(block: str) -> tuple[str, dict[str, str]] | None:
    """The tool call a `[[tool=NAME key="value" …]]` block asks for, or None for other blocks."""
    pairs = [(key, _unquote(raw)) for key, raw in _DIRECTIVE.findall(block)]
    name = next((value for key, value in pairs if key.lower() == "tool" and value), None)
    if name is None:
        return None
    return name, {key: value for key, value in pairs if key.lower() != "tool"}


def parse_script(text: str) -> Script:
    """Read the `[[...]]` directives in `text`; the rest of the text is the question."""
    values: dict[str, Any] = {}
    tool_calls: list[tuple[str, dict[str, str]]] = []
    for block in _BLOCK.findall(text):
        if (tool_call := _tool_block(block)) is not None:
            tool_calls.append(tool_call)
            continue
        for key, raw in _DIRECTIVE.findall(block):
            key = key.lower().replace("-", "_")
            if key in _FLAGS and not raw:
                values[_FLAGS[key]] = 0
            elif key == "reply" and raw:
                values["reply"] = _unquote(raw)
            elif key == "usage" and raw:
                values["usage"] = _unquote(raw).lower() not in {"off", "false", "no", "0"}
            elif key in _INT_KEYS:
                try:
                    number = int(_unquote(raw))
                except ValueError:
                    log.warning("fake_model.bad_directive", directive=key, value=raw)
                    continue
                values[key] = max(0, number)
            else:
                log.warning("fake_model.unknown_directive", directive=key)
    question = " ".join(_BLOCK.sub(" ", text).split())
    return Script(question=question, tool_calls=tuple(tool_calls), **values)


def _unquote(raw: str) -> str:
    if len(raw) >= 2 and raw.startswith('"') and raw.endswith('"'):
        return re.sub(r"\\(.)", r"\1", raw[1:-1])
    return raw


def default_answer(question: str) -> str:
    """The fixed sentence answered when no `reply` is given."""
    subject = question if len(question) <= 200 else question[:197].rstrip() + "..."
    if not subject:
        return "Thanks for reaching out. This is a demo answer from the fake model provider."
    return (
        f'Thanks for your question: "{subject}". This is a demo answer from the fake model '
        "provider; connect a real model to get useful answers."
    )


def split_pieces(text: str) -> list[str]:
    """Words with their leading whitespace; `"".join(split_pieces(t)) == t`."""
    pieces = _PIECE.findall(text)
    trailing = text[len("".join(pieces)) :]
    if trailing:
        if pieces:
            pieces[-1] += trailing
        else:
            pieces = [trailing]
    return pieces


def _sized(pieces: list[str], count: int) -> list[str]:
    """Exactly `count` pieces: `pieces` repeated (with a space between rounds) or cut."""
    if count <= len(pieces):
        return pieces[:count]
    words = [piece.strip() for piece in pieces] or ["token"]
    return [words[0], *(f" {words[i % len(words)]}" for i in range(1, count))]


class PieceClock:
    """Wakes the streams of one event loop at their pieces' due times, a timer per tick.

    Each wait has its own future (cancelling one waiter leaves the others be); the streams due
    within the same tick share one timer, set when the first of them asks. It holds no
    reference to its loop: `_clocks` keeps a clock only as long as its loop lives.
    """

    def __init__(self) -> None:
        self._waiters: dict[int, list[asyncio.Future[None]]] = {}

    def wait_until(self, when: float) -> asyncio.Future[None]:
        """A future done at the first tick at or after `when` (the running loop's clock)."""
        loop = asyncio.get_running_loop()
        tick = math.ceil(when / CLOCK_TICK_S)
        waiter: asyncio.Future[None] = loop.create_future()
        waiters = self._waiters.get(tick)
        if waiters is None:
            self._waiters[tick] = [waiter]
            loop.call_at(tick * CLOCK_TICK_S, self._wake, tick)
        else:
            waiters.append(waiter)
        return waiter

    def _wake(self, tick: int) -> None:
        for waiter in self._waiters.pop(tick):
            if not waiter.done():  # a cancelled wait
                waiter.set_result(None)


_clocks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, PieceClock] = (
    weakref.WeakKeyDictionary()
)


def piece_clock() -> PieceClock:
    """The running loop's `PieceClock`."""
    loop = asyncio.get_running_loop()
    clock = _clocks.get(loop)
    if clock is None:
        clock = _clocks[loop] = PieceClock()
    return clock


class FakeChatModel:
    """A scripted chat model: deterministic text, optional delays, failures and hangs."""

    provider = "fake"

    def __init__(self, *, model: str = DEFAULT_MODEL, delay_ms: float = 0.0) -> None:
        self.model = model
        self.delay_ms = delay_ms
        self.active_streams = 0
        self.completed_streams = 0
        self.failed_streams = 0
        self.cancelled_streams = 0
        self.requests: deque[tuple[ChatMessage, ...]] = deque(maxlen=REQUESTS_KEPT)
        # The names of the tools offered with each request (empty when none were).
        self.offered_tools: deque[tuple[str, ...]] = deque(maxlen=REQUESTS_KEPT)

    def pieces_for(self, script: Script) -> list[str]:
        """The text pieces this script answers."""
        text = default_answer(script.question) if script.reply is None else script.reply
        pieces = split_pieces(text)
        return pieces if script.tokens is None else _sized(pieces, script.tokens)

    @overload
    def stream(
        self, messages: Sequence[ChatMessage]
    ) -> AsyncGenerator[TextDelta | Usage, None]: ...

    @overload
    def stream(
        self, messages: Sequence[ChatMessage], *, tools: Sequence[ToolSpec]
    ) -> AsyncGenerator[TextDelta | ToolCall | Usage, None]: ...

    def stream(
        self, messages: Sequence[ChatMessage], *, tools: Sequence[ToolSpec] = ()
    ) -> AsyncGenerator[TextDelta | ToolCall | Usage, None]:
        """Stream the scripted answer to the last user message, then its `Usage`.

        Offered `tools`, a message with `[[tool=...]]` blocks is answered with those tool calls
        first (see the module docstring).
        """
        messages = tuple(messages)
        self.requests.append(messages)
        self.offered_tools.append(tuple(spec.name for spec in tools))
        return self._stream(messages, offers_tools=bool(tools))

    async def _stream(
        self, messages: tuple[ChatMessage, ...], *, offers_tools: bool
    ) -> AsyncGenerator[TextDelta | ToolCall | Usage, None]:
        last_user_index = max(
            (index for index, message in enumerate(messages) if message.role == "user"),
            default=-1,
        )
        last_user = messages[last_user_index].content if last_user_index >= 0 else ""
        script = parse_script(last_user)
        answered = any(m.role == "tool" for m in messages[last_user_index + 1 :])
        calls_tools = offers_tools and bool(script.tool_calls) and not answered
        pieces = [] if calls_tools else self.pieces_for(script)
        delay_ms = self.delay_ms if script.delay_ms is None else script.delay_ms
        first_delay_ms = delay_ms if script.first_delay_ms is None else script.first_delay_ms

        self.active_streams += 1
        outcome = "cancelled"
        try:
            if calls_tools:
                calls = [
                    ToolCall(id=f"call_{number}", name=name, arguments=json.dumps(arguments))
                    for number, (name, arguments) in enumerate(script.tool_calls, start=1)
                ]
                await asyncio.sleep(first_delay_ms / 1000)
                for call in calls:
                    yield call
                outcome = "completed"
                yield Usage(
                    prompt_tokens=estimate_prompt_tokens(messages),
                    completion_tokens=sum(
                        estimate_tokens(call.name + call.arguments) for call in calls
                    ),
                    estimated=not script.usage,
                )
                return
            clock = piece_clock()
            loop = asyncio.get_running_loop()
            due = returned_at = loop.time()  # returned_at: when the stream last had the loop back
            for index, piece in enumerate(pieces):
                if index == script.fail_after:
                    outcome = "failed"
                    raise LLMServiceError("The fake model failed as scripted")
                if index == script.hang_after:
                    await asyncio.Event().wait()
                delay_s = (first_delay_ms if index == 0 else delay_ms) / 1000
                due += delay_s
                # Due by the time the stream last had the loop back: already "received".
                if delay_s == 0 or due > returned_at:
                    if due > loop.time():
                        await clock.wait_until(due)
                    else:
                        await asyncio.sleep(0)
                    returned_at = loop.time()
                yield TextDelta(piece)
            # A failure or hang scripted at the end (N ≥ the number of pieces) happens there.
            if script.fail_after is not None and script.fail_after >= len(pieces):
                outcome = "failed"
                raise LLMServiceError("The fake model failed as scripted")
            if script.hang_after is not None and script.hang_after >= len(pieces):
                await asyncio.Event().wait()
            prompt_tokens = estimate_prompt_tokens(messages)
            # The answer is whole once its usage is out, even if the reader stops right there.
            outcome = "completed"
            if script.usage:
                yield Usage(prompt_tokens=prompt_tokens, completion_tokens=len(pieces))
            else:
                yield Usage(
                    prompt_tokens=prompt_tokens,
                    completion_tokens=estimate_tokens("".join(pieces)),
                    estimated=True,
                )
        finally:
            self.active_streams -= 1
            if outcome == "completed":
                self.completed_streams += 1
            elif outcome == "failed":
                self.failed_streams += 1
            else:
                self.cancelled_streams += 1

    async def check(self) -> None:
        """Always reachable."""

    async def aclose(self) -> None:
        """Nothing to close."""
