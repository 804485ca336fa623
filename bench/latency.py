"""A loopback TCP proxy that adds a fixed delay to every round trip, to stand in for a Redis that
is not on the same machine (another pod, another zone) in a benchmark.

Each chunk is held for half the delay in each direction, counted from when it arrived, so pipelined
commands are not delayed one after the other: a round trip gains `delay_s`, whatever it carries.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time


class LatencyProxy:
    def __init__(self, target_port: int, delay_s: float, host: str = "127.0.0.1") -> None:
        self.target_port = target_port
        self.half = delay_s / 2
        self.host = host
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="latency-proxy", daemon=True)

    def start(self) -> LatencyProxy:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("latency proxy did not start")
        return self

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._serve, self.host, 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        server_reader, server_writer = await asyncio.open_connection(self.host, self.target_port)
        await asyncio.gather(
            self._forward(client_reader, server_writer), self._forward(server_reader, client_writer)
        )

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                arrived, data = await held.get()
                if not data:
                    break
                await asyncio.sleep(max(0.0, arrived + self.half - time.monotonic()))
                writer.write(data)
                await writer.drain()

        delivery = asyncio.create_task(deliver())
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                held.put_nowait((time.monotonic(), data))
        held.put_nowait((time.monotonic(), b""))
        with contextlib.suppress(ConnectionError):
            await delivery
            writer.close()
