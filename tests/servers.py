"""Servers the tests start on 127.0.0.1: the app under uvicorn, in a thread or a process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import uvicorn
from fastapi import FastAPI

from helpline.core.config import Settings
from helpline.main import create_app

T = TypeVar("T")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until_up(url: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1.0).status_code < 500:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"server at {url} did not come up in {timeout} s")


def _serve(
    runner: asyncio.Runner, server: uvicorn.Server, sockets: list[socket.socket] | None
) -> None:
    with runner:
        runner.run(server.serve(sockets=sockets))


@dataclass
class LiveServer:
    server: uvicorn.Server
    thread: threading.Thread
    port: int
    loop: asyncio.AbstractEventLoop

    async def run_in_server(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run `coroutine` in the server's event loop, to use what is bound to it (its pool)."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coroutine, self.loop))

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @classmethod
    @contextmanager
    def start(cls, settings: Settings, ws: str = "wsproto") -> Iterator[LiveServer]:
        with cls.serve(create_app(settings), ws=ws) as live:
            yield live

    @classmethod
    @contextmanager
    def serve(
        cls, app: FastAPI, ws: str = "wsproto", listener: socket.socket | None = None
    ) -> Iterator[LiveServer]:
        """Serve an app built by the test (its lifespan runs in the server).

        On `listener` (a bound socket) when given, for socket options its connections inherit.
        """
        port = free_port() if listener is None else int(listener.getsockname()[1])
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=port,
            ws=ws,  # type: ignore[arg-type]
            log_config=None,
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=5,
        )
        server = uvicorn.Server(config)
        runner = asyncio.Runner(loop_factory=config.get_loop_factory())
        sockets = None if listener is None else [listener]
        thread = threading.Thread(target=_serve, args=(runner, server, sockets), daemon=True)
        thread.start()
        live = cls(server=server, thread=thread, port=port, loop=runner.get_loop())
        try:
            wait_until_up(f"{live.http_url}/health/live")
            yield live
        finally:
            server.should_exit = True
            thread.join(timeout=15)


@dataclass
class ProcessServer:
    """`helpline serve` in a child process, configured through its environment."""

    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @classmethod
    def start(
        cls,
        env: dict[str, str],
        log_dir: Path,
        *,
        workers: int = 1,
        port: int | None = None,
        timeout: float = 60.0,
    ) -> ProcessServer:
        port = port or free_port()
        log_path = log_dir / f"server-{port}-{time.monotonic_ns()}.log"
        command = [sys.executable, "-m", "helpline.cli", "serve", "--port", str(port)]
        if workers > 1:
            command += ["--workers", str(workers)]
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(
                command,
                env={**os.environ, **env},
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        server = cls(process=process, port=port, log_path=log_path)
        try:
            wait_until_up(f"{server.http_url}/health/live", timeout=timeout)
        except RuntimeError:
            server.kill()
            raise RuntimeError(f"server did not start:\n{log_path.read_text()[-4000:]}") from None
        return server

    def restart(self, env: dict[str, str], timeout: float = 60.0) -> None:
        """Start again on the same port (after it was killed)."""
        replacement = ProcessServer.start(
            env, self.log_path.parent, port=self.port, timeout=timeout
        )
        self.process, self.log_path = replacement.process, replacement.log_path

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def wait(self, timeout: float) -> int:
        return self.process.wait(timeout=timeout)

    def kill(self) -> None:
        """SIGKILL the whole process group (workers included)."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")
