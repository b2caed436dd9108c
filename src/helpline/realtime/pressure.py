"""How busy this process is, read off the event loop: the signal to send fewer, larger frames.

While the loop keeps up, every piece of an answer goes out in a frame of its own, at once. When
it falls behind — too many streams for one core — a frame per piece only makes it fall further
behind: the engine then joins an answer's pieces for a moment before it logs and publishes them,
and sockets let pieces gather before they send. Clients see fewer, larger `token` frames and
nothing else; the first piece of an answer is never held back.

Two measures, either of which means behind: the overshoot of a short sleep (how late the loop
runs a timer that is due), and how busy the loop's thread was meanwhile. A loop kept full by
many short callbacks (a frame per piece to thousands of sockets) still runs its timers on time,
yet has no time to spare: joining pieces is what frees it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from helpline.core import metrics

SAMPLE_EVERY_S = 0.01
# An idle loop overshoots by up to a millisecond (epoll's timeout resolution).
BEHIND_AFTER_S = 0.002
# The share of a sample's time the loop's thread spent on the CPU.
BUSY_AFTER = 0.9


class LoopLagMonitor:
    def __init__(
        self,
        *,
        sample_every_s: float = SAMPLE_EVERY_S,
        behind_after_s: float = BEHIND_AFTER_S,
        busy_after: float = BUSY_AFTER,
    ) -> None:
        self.sample_every_s = sample_every_s
        self.behind_after_s = behind_after_s
        self.busy_after = busy_after
        self.lag_s = 0.0
        self.busy = 0.0
        self._task: asyncio.Task[None] | None = None

    @property
    def behind(self) -> bool:
        return self.lag_s > self.behind_after_s or self.busy >= self.busy_after

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(
                self._sample_forever(), name="loop-lag-monitor"
            )

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.lag_s = 0.0
        self.busy = 0.0

    async def _sample_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started, cpu_started = loop.time(), time.thread_time()
            await asyncio.sleep(self.sample_every_s)
            elapsed = loop.time() - started
            self.lag_s = max(0.0, elapsed - self.sample_every_s)
            # The loop's own thread: the CPU of worker threads is not the loop's.
            self.busy = (time.thread_time() - cpu_started) / elapsed
            metrics.EVENT_LOOP_LAG.set(self.lag_s)
