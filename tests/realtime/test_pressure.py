"""The event loop's lag: the signal that the process is behind."""

from __future__ import annotations

import asyncio
import time

from helpline.realtime.pressure import LoopLagMonitor
from tests.realtime.helpers import eventually


def hog_the_loop() -> None:
    """A callback that runs for 50 ms without yielding, as CPU-bound work on the loop would."""
    time.sleep(0.05)


async def test_an_idle_loop_is_not_behind() -> None:
    """Not behind in most readings: on a machine shared with other tests a stretch of them can
    say otherwise (the process descheduled for some ms, or a garbage collection, looks like a
    late loop; one such stall spans several readings)."""
    monitor = LoopLagMonitor(sample_every_s=0.005)
    monitor.start()
    readings: list[tuple[bool, float]] = []
    try:
        for _ in range(40):
            await asyncio.sleep(0.01)
            readings.append((monitor.behind, monitor.busy))
    finally:
        await monitor.stop()
    assert [behind for behind, _ in readings].count(True) < len(readings) // 2
    assert sorted(busy for _, busy in readings)[len(readings) // 2] < 0.5  # the median reading


async def test_a_loop_kept_full_of_short_callbacks_is_behind() -> None:
    """Timers run on time (each callback is short), but the loop has no time to spare.

    (A low threshold: on a machine shared with other tests the loop's thread gets only part of
    a core, however busy it is.)"""
    monitor = LoopLagMonitor(sample_every_s=0.01, busy_after=0.3)
    monitor.start()
    seen_busy = False

    async def churn() -> None:
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            spin_until = time.thread_time() + 0.0005  # half a millisecond of CPU, then yield
            while time.thread_time() < spin_until:
                pass
            await asyncio.sleep(0)

    async def watch() -> None:
        nonlocal seen_busy
        while not seen_busy:
            seen_busy = monitor.behind and monitor.lag_s <= monitor.behind_after_s
            await asyncio.sleep(0.001)

    try:
        await asyncio.sleep(0.02)
        watcher = asyncio.create_task(watch())
        await churn()
        watcher.cancel()
        assert seen_busy
        await eventually(lambda: not monitor.behind, within=10.0)
    finally:
        await monitor.stop()


async def test_a_blocked_loop_is_behind_until_it_catches_up() -> None:
    monitor = LoopLagMonitor(sample_every_s=0.005)
    monitor.start()
    try:
        await asyncio.sleep(0.02)
        asyncio.get_running_loop().call_soon(hog_the_loop)
        # The hog's reading (a late reading of a few ms may come first on a shared machine).
        await eventually(lambda: monitor.lag_s >= 0.03, within=1.0, interval=0.001)
        assert monitor.behind
        # A busy machine may hold the loop back now and then: give it time to see a prompt wake.
        await eventually(lambda: not monitor.behind, within=10.0)
    finally:
        await monitor.stop()
    assert monitor.lag_s == 0.0
