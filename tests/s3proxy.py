"""A TCP proxy in front of the S3 test server that can delay replies or go down.

Delaying replies widens the window between an object being written and its
entries being acknowledged, which is where exactly-once archival is tested.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading

from sidecar.devserver import free_port


class S3Proxy:
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.delay = 0.0  # seconds before each reply chunk is passed on
        self.down = False  # refuse (reset) every connection
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._connections: set[asyncio.StreamWriter] = set()

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

    def _drop_all(self) -> None:
        for writer in list(self._connections):
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
        self._connections.add(writer)
        try:
            await asyncio.gather(
                self._pipe(reader, up_writer, delay=False),
                self._pipe(up_reader, writer, delay=True),
            )
        finally:
            self._connections.discard(writer)
            for w in (writer, up_writer):
                with contextlib.suppress(Exception):
                    w.close()

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, delay: bool
    ) -> None:
        try:
            while data := await reader.read(65536):
                if delay and self.delay:
                    await asyncio.sleep(self.delay)
                if self.down:
                    writer.transport.abort()
                    return
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()
