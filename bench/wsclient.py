"""A lean WebSocket client for load generation (an asyncio protocol, RFC 6455 by hand).

A general-purpose client spends tens of microseconds per frame in Python; thousands of
streams at 50 tokens/s would measure the client, not the server. This one parses only what the
benchmarks need: text frames (with the server's optional permessage-deflate), close frames, and
pings (answered). It can stop reading (`pause`) to play a client that never reads.
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import struct
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

TextHandler = Callable[[bytes, float], None]


def _mask(payload: bytes) -> bytes:
    key = os.urandom(4)
    masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return key + masked


def encode_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    length = len(payload)
    if length < 126:
        header = struct.pack("!BB", 0x80 | opcode, 0x80 | length)
    elif length < 65536:
        header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, length)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, length)
    return header + _mask(payload)


@dataclass(eq=False)
class WsClient(asyncio.Protocol):
    on_text: TextHandler
    deflate: bool = False
    transport: asyncio.Transport | None = None
    opened: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    closed: asyncio.Future[int] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    _buffer: bytearray = field(default_factory=bytearray)
    _handshake_done: bool = False
    _inflater: zlib._Decompress | None = None
    _fragments: list[bytes] = field(default_factory=list)
    _fragment_compressed: bool = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if not self._handshake_done:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self._buffer[:end]).decode("latin-1")
            del self._buffer[: end + 4]
            if " 101 " not in head.split("\r\n", 1)[0]:
                self.opened.set_exception(ConnectionError(head.split("\r\n", 1)[0]))
                return
            self._handshake_done = True
            if self.deflate and "permessage-deflate" in head.lower():
                self._inflater = zlib.decompressobj(-zlib.MAX_WBITS)
            self.opened.set_result(None)
        self._parse()

    def _parse(self) -> None:
        buffer = self._buffer
        now = time.perf_counter()
        while len(buffer) >= 2:
            first, second = buffer[0], buffer[1]
            length = second & 0x7F
            offset = 2
            if length == 126:
                if len(buffer) < 4:
                    return
                length = struct.unpack_from("!H", buffer, 2)[0]
                offset = 4
            elif length == 127:
                if len(buffer) < 10:
                    return
                length = struct.unpack_from("!Q", buffer, 2)[0]
                offset = 10
            if len(buffer) < offset + length:
                return
            payload = bytes(buffer[offset : offset + length])
            del buffer[: offset + length]
            opcode = first & 0x0F
            fin = bool(first & 0x80)
            rsv1 = bool(first & 0x40)
            if opcode in (0x1, 0x2, 0x0):
                if opcode != 0x0:
                    self._fragment_compressed = rsv1
                self._fragments.append(payload)
                if fin:
                    message = b"".join(self._fragments)
                    self._fragments.clear()
                    if self._fragment_compressed and self._inflater is not None:
                        message = self._inflater.decompress(message + b"\x00\x00\xff\xff")
                    self.on_text(message, now)
            elif opcode == 0x8:
                code = struct.unpack_from("!H", payload)[0] if len(payload) >= 2 else 1005
                if not self.closed.done():
                    self.closed.set_result(code)
                if self.transport is not None:
                    self.transport.close()
            elif opcode == 0x9 and self.transport is not None:
                self.transport.write(encode_frame(payload, 0xA))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_exception(exc or ConnectionError("closed during handshake"))
        if not self.closed.done():
            self.closed.set_result(1006)

    def send_text(self, text: str) -> None:
        assert self.transport is not None
        self.transport.write(encode_frame(text.encode()))

    def pause(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(encode_frame(struct.pack("!H", 1000), 0x8))
            self.transport.close()


async def connect(
    url: str, on_text: TextHandler, *, deflate: bool = False, receive_buffer: int | None = None
) -> WsClient:
    """Open a WebSocket; `receive_buffer` sets the socket's before it connects (it then stays
    that small: the kernel's autotuning would let a client that never reads take MBs)."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if receive_buffer is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.setblocking(False)
    await loop.sock_connect(sock, (host, port))
    _, client = await loop.create_connection(
        lambda: WsClient(on_text=on_text, deflate=deflate), sock=sock
    )
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
    )
    if deflate:
        request += "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
    assert client.transport is not None
    client.transport.write((request + "\r\n").encode())
    await client.opened
    return client
