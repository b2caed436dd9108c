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
    monitor = LoopLagMonitor(sample_every_s=0.005)
    monitor.start()
    try:
        await asyncio.sleep(0.05)
        assert not monitor.behind
    finally:
        await monitor.stop()


async def test_a_blocked_loop_is_behind_until_it_catches_up() -> None:
    monitor = LoopLagMonitor(sample_every_s=0.005)
    monitor.start()
    try:
        await asyncio.sleep(0.02)
        asyncio.get_running_loop().call_soon(hog_the_loop)
        await eventually(lambda: monitor.behind, within=1.0, interval=0.001)
        assert monitor.lag_s >= 0.03
        # A busy machine may hold the loop back now and then: give it time to see a prompt wake.
        await eventually(lambda: not monitor.behind, within=10.0)
    finally:
        await monitor.stop()
    assert monitor.lag_s == 0.0
