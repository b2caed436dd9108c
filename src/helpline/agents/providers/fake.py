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

| directive | meaning |
|---|---|
| `reply="text"` | the answer's text (otherwise the fixed sentence) |
| `tokens=N` | exactly N pieces: the sentence's words, repeated or cut (not with `reply`) |
| `delay_ms=N` | wait N ms before each piece (default: the instance's `delay_ms`, 0) |
| `first_delay_ms=N` | wait N ms before the first piece instead (time to first token) |
| `fail_after=N` | raise `LLMServiceError` after N pieces (`fail` = `fail_after=0`) |
| `hang_after=N` | stop after N pieces and wait until cancelled (`hang` = `hang_after=0`) |
| `usage=off` | end with an estimated `Usage` (as for a provider that reports none) |

Pieces are words with their leading whitespace, so concatenating the `TextDelta`s rebuilds the
text exactly. Every piece is awaited (`asyncio.sleep`, zero by default), so the stream yields
to the event loop once per piece, like a network stream, and cancellation lands at once.
Usage is reported as a provider would: prompt tokens estimated from the messages, completion
tokens = the number of pieces. Unknown directives and bad values are ignored (and logged).

The instance counts its streams — `active_streams` (running now), `completed_streams`,
`failed_streams`, `cancelled_streams` (stopped by cancellation or closed early) — and keeps the
last requests' messages in `requests`, so tests can check that a cancel reached the provider.
"""

from __future__ import annotations

import asyncio
import re
from collections import deque
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Any

import structlog

from helpline.agents.exceptions import LLMServiceError
from helpline.agents.schemas import ChatMessage, TextDelta, Usage
from helpline.agents.tokens import estimate_prompt_tokens, estimate_tokens

log = structlog.get_logger(__name__)

DEFAULT_MODEL = "fake-1"
_BLOCK = re.compile(r"\[\[(.*?)\]\]", re.DOTALL)
_DIRECTIVE = re.compile(r'([A-Za-z_][\w-]*)(?:=("(?:[^"\\]|\\.)*"|\S*))?')
_PIECE = re.compile(r"\s*\S+")
_INT_KEYS = frozenset({"tokens", "delay_ms", "first_delay_ms", "fail_after", "hang_after"})
_FLAGS = {"fail": "fail_after", "hang": "hang_after"}
REQUESTS_KEPT = 100


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


def parse_script(text: str) -> Script:
    """Read the `[[...]]` directives in `text`; the rest of the text is the question."""
    values: dict[str, Any] = {}
    for block in _BLOCK.findall(text):
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
    return Script(question=question, **values)


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

    def pieces_for(self, script: Script) -> list[str]:
        """The text pieces this script answers."""
        if script.reply is not None:
            return split_pieces(script.reply)
        pieces = split_pieces(default_answer(script.question))
        return pieces if script.tokens is None else _sized(pieces, script.tokens)

    async def stream(
        self, messages: Sequence[ChatMessage]
    ) -> AsyncGenerator[TextDelta | Usage, None]:
        """Stream the scripted answer to the last user message, then its `Usage`."""
        messages = tuple(messages)
        self.requests.append(messages)
        last_user = next((m.content for m in reversed(messages) if m.role == "user"), "")
        script = parse_script(last_user)
        pieces = self.pieces_for(script)
        delay_ms = self.delay_ms if script.delay_ms is None else script.delay_ms
        first_delay_ms = delay_ms if script.first_delay_ms is None else script.first_delay_ms

        self.active_streams += 1
        outcome = "cancelled"
        try:
            for index, piece in enumerate(pieces):
                if index == script.fail_after:
                    outcome = "failed"
                    raise LLMServiceError("The fake model failed as scripted")
                if index == script.hang_after:
                    await asyncio.Event().wait()
                await asyncio.sleep((first_delay_ms if index == 0 else delay_ms) / 1000)
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
