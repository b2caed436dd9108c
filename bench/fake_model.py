"""What the `fake` model costs its own process: CPU per piece, its paced streams read to the end.

    python bench/fake_model.py [STREAMS]      # default 1,000

As in `realtime.py paced`: the streams start within one second and each gives 150 pieces at
50 per second, here read by a bare `async for` on uvloop (the servers' loop), with no server
around them. Both servers of `realtime.py` stream this model, so this is its share of each
one's CPU per token there.
"""

from __future__ import annotations

import asyncio
import sys
import time

import uvloop

from helpline.agents.providers.fake import FakeChatModel
from helpline.agents.schemas import ChatMessage

PIECES = 150
PACE_MS = 20


async def read_streams(streams: int) -> float:
    """CPU seconds per piece over `streams` paced streams started within one second."""
    model = FakeChatModel()
    request = [ChatMessage(role="user", content=f"[[tokens={PIECES} delay_ms={PACE_MS}]]")]

    async def read_one() -> int:
        pieces = 0
        async for _ in model.stream(request):
            pieces += 1
        return pieces - 1  # the last event is the usage

    started = time.process_time()
    readers = []
    for _ in range(streams):
        readers.append(asyncio.create_task(read_one()))
        await asyncio.sleep(1 / streams)
    pieces = sum(await asyncio.gather(*readers))
    return (time.process_time() - started) / pieces


def main() -> None:
    streams = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    per_piece_s = uvloop.run(read_streams(streams))
    cost_us = per_piece_s * 1e6
    print(f"the fake model alone, {streams:,} paced streams: {cost_us:.2f} us CPU per piece")


if __name__ == "__main__":
    main()
