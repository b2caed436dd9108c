"""Process lifecycle: the draining flag and the work to do before the server stops.

`helpline serve` takes SIGTERM/SIGINT over from uvicorn: it calls `Lifecycle.drain()` first
(readiness turns 503, new answers are refused, answers in flight get `SHUTDOWN_GRACE_S` to
finish, sockets close with 1001) and only then lets uvicorn stop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import structlog

log = structlog.get_logger(__name__)

DrainHook = Callable[[float], Awaitable[None]]


class Lifecycle:
    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self.draining = False
        self._hooks: list[tuple[str, DrainHook]] = []
        self._drained = asyncio.Event()
        self._drain_task: asyncio.Task[None] | None = None

    def on_drain(self, name: str, hook: DrainHook) -> None:
        """Register `hook(deadline)` to run when draining starts; hooks run concurrently."""
        self._hooks.append((name, hook))

    async def drain(self) -> None:
        """Start draining (idempotent) and wait until every hook has finished."""
        if self._drain_task is None:
            self.draining = True
            self._drain_task = asyncio.create_task(self._run_hooks())
        await asyncio.shield(self._drain_task)

    async def _run_hooks(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.grace_s
        log.info("lifecycle.draining", grace_s=self.grace_s, hooks=[n for n, _ in self._hooks])

        async def run(name: str, hook: DrainHook) -> None:
            try:
                await hook(deadline)
            except Exception:
                log.exception("lifecycle.drain_hook_failed", hook=name)

        await asyncio.gather(*(run(name, hook) for name, hook in self._hooks))
        self._drained.set()
        log.info("lifecycle.drained")


_current: Lifecycle | None = None


def set_current(lifecycle: Lifecycle | None) -> None:
    """The lifecycle of the app served by this process (used by the server's signal handler)."""
    global _current
    _current = lifecycle


def get_current() -> Lifecycle | None:
    return _current


def install_signal_handlers(lifecycle: Lifecycle) -> None:
    """Chain SIGTERM/SIGINT in this worker: drain first, then hand over to the server's handler.

    uvicorn's own shutdown closes WebSockets with 1012 and waits for open streams without a
    timeout; draining before it starts lets answers finish (or be stored) and sockets close with
    1001. Works under `helpline serve`, `--workers N` and plain `uvicorn` alike. Only the main
    thread may set signal handlers, so servers run in a thread (tests) keep their own.
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(sig)
        if not callable(previous):
            continue

        def handler(signum: int, frame: object, previous: object = previous) -> None:
            def hand_over() -> None:
                assert callable(previous)
                previous(signum, frame)

            if lifecycle.draining:  # a second signal: stop now
                hand_over()
                return

            async def drain_then_exit() -> None:
                await lifecycle.drain()
                hand_over()

            loop.call_soon_threadsafe(lambda: loop.create_task(drain_then_exit()))

        signal.signal(sig, handler)
