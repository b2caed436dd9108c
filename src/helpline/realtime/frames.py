"""Server frames, shared by WebSocket and SSE (SPEC.md: WebSocket, Server-Sent Events frames).

Server → client frames (JSON objects):

- `{"type": "message", "message": <Message>}` — a message was stored
- `{"type": "token", "message_id", "reply_to", "seq", "content"}` — a piece of an answer (a merged
  frame carries several pieces and the `seq` of the last one)
- `{"type": "complete", "message_id", "reply_to", "seq", "message", "usage"}` — answer finished
- `{"type": "cancelled", "message_id", "reply_to", "seq", "message"}` — answer stopped
- `{"type": "failed", "message_id", "reply_to", "seq", "code", "detail", "message"}` — model failed
- `{"type": "error", "code", "message", "reply_to"?}` — a bad frame or a refused request
- `{"type": "status", "status", "assigned_agent_id"}` — the conversation's status changed
- `{"type": "pong"}`, `{"type": "typing", "user_id"}`

A `Frame` is encoded to JSON once, however many sockets it goes to; only frames merged for a
client that fell behind are encoded again.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import orjson

ANSWER_EVENT_TYPES = frozenset({"token", "complete", "cancelled", "failed"})
FINAL_EVENT_TYPES = frozenset({"complete", "cancelled", "failed"})


def _default(value: object) -> object:
    if isinstance(value, uuid.UUID):
        return str(value)
    raise TypeError(f"cannot encode {type(value).__name__}")


def dumps(data: dict[str, Any]) -> str:
    return orjson.dumps(data, default=_default).decode()


@dataclass(slots=True)
class Frame:
    """One server frame, with the routing facts kept beside its JSON object.

    `type`, `message_id` and `seq` are read off `data` once: every subscriber's queue looks at
    them for every frame.
    """

    data: dict[str, Any]
    conversation_id: uuid.UUID
    created_at: float = field(default_factory=time.time)
    _encoded: str | None = None
    type: str = field(init=False)
    message_id: str | None = field(init=False)
    seq: int | None = field(init=False)

    def __post_init__(self) -> None:
        data = self.data
        self.type = str(data["type"])
        message_id = data.get("message_id")
        self.message_id = None if message_id is None else str(message_id)
        seq = data.get("seq")
        self.seq = None if seq is None else int(seq)

    @property
    def is_answer_event(self) -> bool:
        return self.type in ANSWER_EVENT_TYPES

    @property
    def is_final(self) -> bool:
        return self.type in FINAL_EVENT_TYPES

    def encoded(self) -> str:
        if self._encoded is None:
            self._encoded = dumps(self.data)
        return self._encoded

    def to_wire(self) -> bytes:
        """For a shared backend: the frame with its routing facts."""
        return orjson.dumps(
            {"c": str(self.conversation_id), "t": self.created_at, "d": self.encoded()}
        )

    @classmethod
    def from_wire(cls, raw: bytes | str) -> Frame:
        envelope = orjson.loads(raw)
        encoded = envelope["d"]
        return cls(
            data=orjson.loads(encoded),
            conversation_id=uuid.UUID(envelope["c"]),
            created_at=float(envelope["t"]),
            _encoded=encoded,
        )

    def sse(self) -> bytes:
        """The frame as a Server-Sent Event (answer events carry `id: <message_id>:<seq>`)."""
        if self.is_answer_event:
            return f"id: {self.message_id}:{self.seq}\ndata: {self.encoded()}\n\n".encode()
        return f"data: {self.encoded()}\n\n".encode()


def merge_pieces(first: Frame, pieces: list[str], seq: int) -> Frame:
    """One `token` frame of `pieces` (the first frame's, then later ones) and the last `seq`."""
    data = dict(first.data)
    data["content"] = "".join(pieces)
    data["seq"] = seq
    return Frame(data=data, conversation_id=first.conversation_id, created_at=first.created_at)


def token_frame(
    conversation_id: uuid.UUID,
    message_id: uuid.UUID | str,
    reply_to: str | None,
    seq: int,
    text: str,
) -> Frame:
    return Frame(
        data={
            "type": "token",
            "message_id": str(message_id),  # the engine passes it as text, once per answer
            "reply_to": reply_to,
            "seq": seq,
            "content": text,
        },
        conversation_id=conversation_id,
    )


def message_frame(conversation_id: uuid.UUID, message: dict[str, Any]) -> Frame:
    return Frame(data={"type": "message", "message": message}, conversation_id=conversation_id)


def status_frame(
    conversation_id: uuid.UUID, status: str, assigned_agent_id: uuid.UUID | None
) -> Frame:
    return Frame(
        data={
            "type": "status",
            "status": status,
            "assigned_agent_id": None if assigned_agent_id is None else str(assigned_agent_id),
        },
        conversation_id=conversation_id,
    )


def typing_frame(conversation_id: uuid.UUID, user_id: uuid.UUID) -> Frame:
    return Frame(data={"type": "typing", "user_id": str(user_id)}, conversation_id=conversation_id)


def error_data(code: str, message: str, reply_to: str | None = None) -> dict[str, Any]:
    data: dict[str, Any] = {"type": "error", "code": code, "message": message}
    if reply_to is not None:
        data["reply_to"] = reply_to
    return data
