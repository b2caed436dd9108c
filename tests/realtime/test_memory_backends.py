"""The in-process event log: what a `resume` reads on the embedded default."""

from __future__ import annotations

import asyncio
import uuid

from helpline.realtime.backends import MemoryEventLog
from helpline.realtime.frames import Frame, token_frame

# Long enough that a busy machine's pauses stay well inside the margins below.
RETENTION_S = 2.0


def piece(message_id: uuid.UUID, seq: int) -> Frame:
    return token_frame(uuid.uuid4(), message_id, "ref", seq, f"piece {seq}")


async def test_a_sealed_log_is_read_until_its_retention_ends_then_dropped() -> None:
    log = MemoryEventLog(retention_s=RETENTION_S)
    first, second, streaming = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    for message_id in (first, second, streaming):
        await log.append(message_id, piece(message_id, 1))
        await log.append(message_id, piece(message_id, 2))
    await log.seal(first)
    await asyncio.sleep(RETENTION_S / 2)
    await log.seal(second)
    after_first = await log.read_after(first, 1)
    assert after_first is not None
    assert [frame.seq for frame in after_first] == [2]

    await asyncio.sleep(RETENTION_S * 0.65)  # past the first log's retention, not the second's
    assert await log.read_after(first, 0) is None
    kept = await log.read_after(second, 0)
    assert kept is not None
    assert [frame.seq for frame in kept] == [1, 2]

    await asyncio.sleep(RETENTION_S / 2)
    assert await log.read_after(second, 0) is None
    # An answer still streaming is never dropped: only sealed logs expire.
    streaming_log = await log.read_after(streaming, 0)
    assert streaming_log is not None
    assert len(streaming_log) == 2


async def test_sealing_again_restarts_the_retention() -> None:
    log = MemoryEventLog(retention_s=RETENTION_S)
    first, second = uuid.uuid4(), uuid.uuid4()
    await log.append(first, piece(first, 1))
    await log.append(second, piece(second, 1))
    await log.seal(first)
    await log.seal(second)
    await asyncio.sleep(RETENTION_S / 2)
    await log.seal(first)
    await asyncio.sleep(
        RETENTION_S * 0.65
    )  # past `second`'s retention, within `first`'s second one
    assert await log.read_after(second, 0) is None
    assert await log.read_after(first, 0) is not None
