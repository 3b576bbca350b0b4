"""A proxy in front of the S3 test server that can delay replies, go down, hang, or strip
the `If-None-Match` request header.

Delaying replies widens the window between an object being written and its
entries being acknowledged, which is where exactly-once archival is tested.
Stripping `If-None-Match` plays an S3-compatible server that ignores conditional
writes; hanging plays one that accepts connections and never answers.

Requests are parsed minimally (HTTP/1.1 heads; bodies by Content-Length, which is how
aiobotocore sends them, after `Expect: 100-continue`); keep-alive connections carry
several requests one after another, so the method of the last request sent is the one
whose reply flows back. Replies are passed through unparsed. A request this parser does
not understand (chunked bodies) turns the rest of its connection into a plain pipe.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from dataclasses import dataclass

from sidecar.devserver import free_port

HEAD_END = b"\r\n\r\n"


@dataclass
class _Connection:
    writer: asyncio.StreamWriter
    method: bytes = b""  # of the request whose reply is flowing back
    swallowed: bool = False  # a request or reply was dropped while hanging


class S3Proxy:
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.delay = 0.0  # seconds before each reply chunk is passed on
        # Delay only the replies to these methods (e.g. {"PUT"}); empty: every reply.
        self.delay_methods: set[str] = set()
        self.down = False  # refuse (reset) every connection
        self.strip_if_none_match = False  # remove the conditional-write header
        self.hanging = False  # accept and read, never answer
        self.requests: list[str] = []  # "METHOD path" of every request seen
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._connections: dict[asyncio.StreamWriter, _Connection] = {}

    def start(self) -> S3Proxy:
        self._thread.start()
        self._started.wait(10)
        return self

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def set_down(self, down: bool) -> None:
        self.down = down
        if down:
            self._loop.call_soon_threadsafe(self._drop_all)

    def set_hanging(self, hanging: bool) -> None:
        """Stop answering (requests are read and dropped, replies in flight withheld); when
        it ends, connections that lost a request or reply are reset (their client gave up
        on them), so no late reply answers the wrong request."""
        self.hanging = hanging
        if not hanging:
            self._loop.call_soon_threadsafe(self._drop_swallowed)

    def _drop_all(self) -> None:
        for writer in list(self._connections):
            writer.transport.abort()

    def _drop_swallowed(self) -> None:
        for writer, connection in list(self._connections.items()):
            if connection.swallowed:
                writer.transport.abort()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", self.port)
        )
        self._started.set()
        try:
            self._loop.run_forever()
        finally:
            server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.down:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.transport.abort()
            return
        connection = self._connections[writer] = _Connection(writer)
        try:
            await asyncio.gather(
                self._requests(reader, up_writer, connection),
                self._replies(up_reader, writer, connection),
            )
        finally:
            self._connections.pop(writer, None)
            for w in (writer, up_writer):
                with contextlib.suppress(Exception):
                    w.close()

    async def _requests(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, connection: _Connection
    ) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(HEAD_END)
                except asyncio.IncompleteReadError:
                    return
                lines = head[: -len(HEAD_END)].split(b"\r\n")
                method = lines[0].split(b" ", 1)[0]
                headers = [
                    line
                    for line in lines[1:]
                    if not (self.strip_if_none_match and line.lower().startswith(b"if-none-match:"))
                ]
                fields = {
                    name.strip().lower(): value.strip()
                    for name, _, value in (line.partition(b":") for line in headers)
                }
                self.requests.append(b" ".join(lines[0].split(b" ")[:2]).decode())
                connection.method = method
                forward = not self.hanging
                if forward:
                    writer.write(b"\r\n".join([lines[0], *headers]) + HEAD_END)
                    await writer.drain()
                else:
                    connection.swallowed = True
                if b"chunked" in fields.get(b"transfer-encoding", b"").lower():
                    await self._pipe(reader, writer, connection, delay=False)
                    return
                left = int(fields.get(b"content-length", b"0") or 0)
                while left > 0:
                    data = await reader.read(min(left, 65536))
                    if not data:
                        return
                    left -= len(data)
                    if forward and not self.hanging:
                        writer.write(data)
                        await writer.drain()
        except (ConnectionError, OSError, ValueError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def _replies(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, connection: _Connection
    ) -> None:
        await self._pipe(reader, writer, connection, delay=True)

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        connection: _Connection,
        *,
        delay: bool,
    ) -> None:
        try:
            while data := await reader.read(65536):
                if delay and self.delay and self._delays(connection, data):
                    await asyncio.sleep(self.delay)
                if self.down:
                    writer.transport.abort()
                    return
                if self.hanging:
                    connection.swallowed = True
                    continue
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    def _delays(self, connection: _Connection, data: bytes) -> bool:
        if not self.delay_methods:
            return True
        if data.startswith(b"HTTP/1.1 100"):  # the interim "go on, send the body"
            return False
        return connection.method.decode() in self.delay_methods
