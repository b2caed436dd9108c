"""A client's bounded frame queue: merging, replay joins, overflow (no database needed)."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from helpline.realtime.connection import (
    MAX_MERGED_CHARS,
    FrameQueue,
    QueueClosed,
    SlowConsumer,
)
from helpline.realtime.frames import Frame, message_frame, token_frame

CONVERSATION = uuid.uuid4()
ANSWER = uuid.uuid4()
OTHER_ANSWER = uuid.uuid4()
PIECES = ["Hello", " there", ",", " how", " can", " I", " help", "?"]


def token(seq: int, message_id: uuid.UUID = ANSWER) -> Frame:
    return token_frame(CONVERSATION, message_id, "q1", seq, PIECES[(seq - 1) % len(PIECES)])


def complete(seq: int, message_id: uuid.UUID = ANSWER) -> Frame:
    return Frame(
        data={"type": "complete", "message_id": str(message_id), "reply_to": "q1", "seq": seq},
        conversation_id=CONVERSATION,
    )


def note(text: str = "hi") -> Frame:
    return message_frame(CONVERSATION, {"id": str(uuid.uuid4()), "content": text})


async def take_all(queue: FrameQueue) -> list[Frame]:
    frames: list[Frame] = []
    while len(queue):
        frames.append(await queue.get())
    return frames


def text_of(frames: list[Frame]) -> str:
    return "".join(str(f.data["content"]) for f in frames if f.type == "token")


async def test_a_client_that_keeps_up_gets_a_frame_per_token() -> None:
    queue = FrameQueue(16)
    received = []
    for seq in range(1, 4):
        queue.put(token(seq))
        received.append(await queue.get())
    assert [(f.seq, f.data["content"]) for f in received] == [
        (1, "Hello"),
        (2, " there"),
        (3, ","),
    ]


async def test_pending_tokens_merge_into_one_frame_with_the_last_seq() -> None:
    queue = FrameQueue(16)
    for seq in range(1, 6):
        queue.put(token(seq))
    assert len(queue) == 1
    merged = await queue.get()
    assert merged.type == "token"
    assert merged.seq == 5
    assert merged.data["content"] == "Hello there, how can"
    assert merged.data["message_id"] == str(ANSWER)
    assert merged.data["reply_to"] == "q1"
    # A merged frame is encoded with its merged content.
    assert '"content":"Hello there, how can"' in merged.encoded()


async def test_a_merged_frame_stops_growing_at_its_size_limit() -> None:
    queue = FrameQueue(64)
    piece = "x" * 1000
    count = 2 * MAX_MERGED_CHARS // len(piece) + 1
    for seq in range(1, count + 1):
        queue.put(token_frame(CONVERSATION, ANSWER, "q1", seq, piece))

    frames = await take_all(queue)

    assert len(frames) == 3
    assert all(len(f.data["content"]) <= MAX_MERGED_CHARS for f in frames)
    assert [f.seq for f in frames][-1] == count
    assert text_of(frames) == piece * count


async def test_tokens_do_not_merge_across_another_frame() -> None:
    queue = FrameQueue(16)
    queue.put(token(1))
    queue.put(note())
    queue.put(token(2))
    queue.put(token(3))
    frames = await take_all(queue)
    assert [(f.type, f.seq) for f in frames] == [("token", 1), ("message", None), ("token", 3)]
    assert text_of(frames) == "Hello there,"


async def test_tokens_of_different_answers_do_not_merge() -> None:
    queue = FrameQueue(16)
    queue.put(token(1, ANSWER))
    queue.put(token(1, OTHER_ANSWER))
    queue.put(token(2, OTHER_ANSWER))
    frames = await take_all(queue)
    assert [(f.message_id, f.seq) for f in frames] == [
        (str(ANSWER), 1),
        (str(OTHER_ANSWER), 2),
    ]


async def test_a_frame_already_taken_is_not_delivered_again() -> None:
    queue = FrameQueue(16)
    queue.put(token(1))
    queue.put(token(2))
    assert (await queue.get()).seq == 2
    queue.put(token(2))
    queue.put(token(1))
    assert len(queue) == 0
    queue.put(token(3))
    assert (await queue.get()).data["content"] == ","


async def test_hold_and_release_join_the_replay_and_live_frames_without_gap_or_duplicate() -> None:
    queue = FrameQueue(64)
    # The client saw up to seq 2 over an earlier socket; seq 3 is still queued here unsent.
    queue.put(token(3))
    queue.hold(str(ANSWER), after_seq=2)
    # Live frames arrive while the log is being read...
    queue.put(token(5))
    queue.put(token(6))
    queue.put(note())  # frames of other kinds are not held
    # ...and the log has 3 to 5 (it was read before 6 was appended).
    queue.release(str(ANSWER), [token(3), token(4), token(5)])
    queue.put(token(7))
    queue.put(complete(8))

    frames = await take_all(queue)
    answer = [f for f in frames if f.is_answer_event]
    assert text_of(answer) == "".join(PIECES[2:7])  # exactly the text after seq 2
    assert answer[-1].type == "complete"
    seqs = [f.seq or 0 for f in answer]
    assert seqs[-1] == 8
    assert seqs == sorted(seqs)
    assert len(seqs) == len(set(seqs))
    assert [f.type for f in frames].count("message") == 1


async def test_a_replay_after_what_was_taken_keeps_the_frames_still_queued() -> None:
    queue = FrameQueue(64)
    # Taken up to seq 2 but not yet sent (the client fell behind): a replay after seq 2, as a
    # resend asks for, must not drop them.
    queue.put(token(1))
    queue.put(token(2))
    queue.hold(str(ANSWER), after_seq=queue.taken_seq(str(ANSWER)))
    queue.put(token(4))
    queue.release(str(ANSWER), [token(3), token(4)])

    frames = await take_all(queue)

    assert text_of(frames) == "".join(PIECES[:4])
    assert [f.seq for f in frames] == sorted({f.seq for f in frames})


async def test_live_frames_held_before_a_replay_of_the_final_frame_alone_are_kept() -> None:
    """The log was empty when read and the answer ended during the database read: the replay
    is its stored final frame, the text came live meanwhile."""
    queue = FrameQueue(64)
    queue.hold(str(ANSWER), after_seq=0)
    queue.put(token(1))
    queue.put(token(2))
    queue.put(complete(3))
    queue.release(str(ANSWER), [complete(3)])
    frames = await take_all(queue)
    assert text_of(frames) == "Hello there"
    assert [f.type for f in frames] == ["token", "complete"]  # the two pieces merged, once
    assert frames[-1].seq == 3


async def test_release_of_a_replay_that_has_everything_drops_the_held_duplicates() -> None:
    queue = FrameQueue(64)
    queue.hold(str(ANSWER), after_seq=0)
    queue.put(token(1))
    queue.put(token(2))
    queue.release(str(ANSWER), [token(1), token(2), token(3), complete(4)])
    frames = await take_all(queue)
    assert text_of(frames) == "Hello there,"
    assert frames[-1].type == "complete"
    assert [f.type for f in frames].count("complete") == 1


async def test_too_many_queued_frames_is_a_slow_consumer() -> None:
    queue = FrameQueue(8)
    for _ in range(8):
        queue.put(note())
    assert not queue.overflowed
    queue.put(note())
    assert queue.overflowed
    with pytest.raises(SlowConsumer):
        await queue.get()


async def test_too_many_pending_bytes_is_a_slow_consumer() -> None:
    queue = FrameQueue(8, max_pending_bytes=1000)
    big = "x" * 100
    for seq in range(1, 20):
        queue.put(token_frame(CONVERSATION, ANSWER, "q1", seq, big))
    assert len(queue) == 1  # merged into one frame, but its size is still counted
    assert queue.overflowed
    with pytest.raises(SlowConsumer):
        await queue.get()


async def test_get_waits_for_the_next_frame() -> None:
    queue = FrameQueue(8)
    waiting = asyncio.create_task(queue.get())
    await asyncio.sleep(0)
    assert not waiting.done()
    queue.put(token(1))
    async with asyncio.timeout(1):
        assert (await waiting).seq == 1


async def test_a_closed_queue_ends_its_reader_and_takes_nothing_more() -> None:
    queue = FrameQueue(8)
    waiting = asyncio.create_task(queue.get())
    await asyncio.sleep(0)
    queue.close()
    with pytest.raises(QueueClosed):
        async with asyncio.timeout(1):
            await waiting
    queue.put(token(1))
    assert len(queue) == 0
    assert queue.closed


async def test_a_queue_that_joins_mid_answer_skips_its_pieces_until_a_resume() -> None:
    queue = FrameQueue(16)
    queue.put(token(4))  # subscribed after the answer's first pieces went out
    queue.put(token(5))
    assert len(queue) == 0
    queue.hold(str(ANSWER), after_seq=0)
    queue.put(token(6))
    queue.release(str(ANSWER), [token(seq) for seq in range(1, 6)])
    queue.put(complete(7))
    frames = await take_all(queue)
    assert text_of(frames) == "".join(PIECES[:6])
    assert frames[-1].type == "complete"


async def test_a_queue_that_joins_mid_answer_still_gets_its_final_frame() -> None:
    queue = FrameQueue(16)
    queue.put(token(4))
    queue.put(complete(5))
    frames = await take_all(queue)
    assert [(f.type, f.seq) for f in frames] == [("complete", 5)]
