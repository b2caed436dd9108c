"""A client's bounded queue of frames: fan-out never waits on a client.

The broker calls `FrameQueue.put` synchronously for every subscriber; one writer task per client
drains the queue at the client's own pace. While a client keeps up, it gets a frame per event;
when its queue backs up, pending `token` events of the same answer are merged into one frame
(the `seq` of the last one, up to `MAX_MERGED_CHARS` of text), so the text never has a gap and
a slow client costs less, not more.
A client whose queue still fills up (or whose socket stops taking data) is a slow consumer: the
caller closes it (`4008`), and it may reconnect and resume.

The queue also keeps, per answer, the highest `seq` it has taken, so that a frame is never
delivered twice, and can hold an answer's live frames while its log is replayed (`resume`), so
that replayed and live frames join without a gap or a duplicate.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from helpline.realtime.frames import Frame, merge_pieces

# WebSocket close codes (SPEC.md: WebSocket).
CLOSE_GOING_AWAY = 1001
CLOSE_TRY_AGAIN_LATER = 1013
CLOSE_UNAUTHORIZED = 4001
CLOSE_FORBIDDEN = 4003
CLOSE_NOT_FOUND = 4004
CLOSE_SLOW_CONSUMER = 4008


class SlowConsumer(Exception):
    """The client's queue is full."""


class QueueClosed(Exception):
    """The queue was closed (the client left or was closed)."""


# A merged `token` frame stops growing here: a stuck client's queue then fills up (and it is
# closed as a slow consumer) rather than its backlog going out as one huge frame.
MAX_MERGED_CHARS = 16 * 1024


class FrameQueue:
    __slots__ = (
        "max_frames",
        "max_pending_bytes",
        "on_ready",
        "_items",
        "_pending_bytes",
        "_waiter",
        "_closed",
        "overflowed",
        "_tail_pieces",
        "_tail_seq",
        "_tail_chars",
        "_taken_seq",
        "_held",
    )

    def __init__(
        self,
        max_frames: int,
        max_pending_bytes: int = 4 * 1024 * 1024,
        *,
        on_ready: Callable[[], None] | None = None,
    ) -> None:
        self.max_frames = max_frames
        self.max_pending_bytes = max_pending_bytes
        # Called when a frame (or an overflow) is there and nobody waits in `get`: a socket
        # starts its writer then, so an idle socket has no writer task at all.
        self.on_ready = on_ready
        # A list, not a deque: an empty deque costs 600 bytes per idle socket, and a queue
        # holds a few frames (pending pieces are merged into the last one).
        self._items: list[Frame] = []
        self._pending_bytes = 0
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False
        self.overflowed = False
        # Pieces merged into the last queued `token` frame, joined once when it is taken: a
        # frame per piece would cost a dict copy and a longer string each time.
        self._tail_pieces: list[str] | None = None
        self._tail_seq = 0
        self._tail_chars = 0
        self._taken_seq: dict[str, int] = {}
        self._held: dict[str, list[Frame]] = {}

    def __len__(self) -> int:
        return len(self._items)

    @property
    def closed(self) -> bool:
        return self._closed

    def put(self, frame: Frame) -> None:
        """Take a frame (never blocks); flags overflow instead of growing without bound."""
        if self._closed:
            return
        if frame.is_answer_event:
            message_id = frame.message_id
            assert message_id is not None
            held = self._held.get(message_id)
            if held is not None:
                held.append(frame)
                return
            seq = frame.seq or 0
            taken = self._taken_seq.get(message_id)
            if taken is None and frame.type == "token" and seq > 1:
                # Joined mid-answer: pieces without the text before them are of no use, and they
                # would repeat what a `resume` replays. The final frame still holds the message.
                return
            if seq <= (taken or 0):
                return
            self._taken_seq[message_id] = seq
            if frame.type == "token" and self._items:
                last = self._items[-1]
                content: str = frame.data["content"]
                if self._tail_pieces is None:
                    self._tail_chars = len(last.data.get("content") or "")
                if (
                    last.type == "token"
                    and last.message_id == message_id
                    and self._tail_chars + len(content) <= MAX_MERGED_CHARS
                ):
                    if self._tail_pieces is None:
                        self._tail_pieces = [last.data["content"]]
                    self._tail_pieces.append(content)
                    self._tail_chars += len(content)
                    self._tail_seq = seq
                    self._pending_bytes += len(content)
                    self._check_bounds()
                    return
        self._seal_tail()
        self._items.append(frame)
        self._pending_bytes += len(frame.data.get("content") or "") + 64
        self._check_bounds()
        self._wake()

    def _seal_tail(self) -> None:
        """Turn the pieces merged into the last frame into one frame."""
        if self._tail_pieces is not None:
            self._items[-1] = merge_pieces(self._items[-1], self._tail_pieces, self._tail_seq)
            self._tail_pieces = None
        self._tail_chars = 0

    def _check_bounds(self) -> None:
        if len(self._items) > self.max_frames or self._pending_bytes > self.max_pending_bytes:
            self.overflowed = True
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            if not waiter.done():
                waiter.set_result(None)
        elif self.on_ready is not None:
            self.on_ready()

    def take(self) -> Frame | None:
        """The next frame, None when there is none; raises `SlowConsumer` after an overflow."""
        if self.overflowed:
            raise SlowConsumer
        if not self._items:
            return None
        if len(self._items) == 1:
            self._seal_tail()
        frame = self._items.pop(0)
        self._pending_bytes -= len(frame.data.get("content") or "") + 64
        if not self._items:
            self._pending_bytes = 0
        return frame

    async def get(self) -> Frame:
        """The next frame; raises `SlowConsumer` after an overflow, `QueueClosed` once closed."""
        while True:
            frame = self.take()
            if frame is not None:
                return frame
            if self._closed:
                raise QueueClosed
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def close(self) -> None:
        self._closed = True
        self._wake()

    def hold(self, message_id: str, after_seq: int) -> None:
        """Start a replay of `message_id` after `after_seq`: live frames wait until `release`."""
        self._held[message_id] = []
        self._taken_seq[message_id] = after_seq
        self._seal_tail()
        # Frames of this answer still queued past `after_seq` would repeat what the replay sends;
        # those up to it are not in the replay and still go out.
        kept = [
            frame
            for frame in self._items
            if frame.message_id != message_id or (frame.seq or 0) <= after_seq
        ]
        if len(kept) != len(self._items):
            self._items = kept

    def release(self, message_id: str, replayed: list[Frame]) -> None:
        """Queue the replayed frames and the live ones that arrived meanwhile, in `seq` order,
        each `seq` once (a replayed frame first).

        The two overlap either way: the live frames may start before the replay ends, or come
        from before it — a replay of a finished answer is its stored final frame alone, when the
        answer ended while its log was being read.
        """
        held = self._held.pop(message_id, [])
        for frame in sorted([*replayed, *held], key=lambda frame: frame.seq or 0):
            self.put(frame)

    def taken_seq(self, message_id: str) -> int:
        return self._taken_seq.get(message_id, 0)
