"""A loopback TCP proxy that adds a fixed delay to every round trip, to stand in for a Redis that
is not on the same machine (another pod, another zone) in a benchmark.

Each chunk is held for half the delay in each direction, counted from when it arrived, so pipelined
commands are not delayed one after the other: a round trip gains `delay_s`, whatever it carries.

Threads, not asyncio: an event loop sleeps in epoll, whose timeout is rounded up to whole
milliseconds, so a 1 ms delay became 2.4 ms; `time.sleep` holds a chunk to within tens of
microseconds. Each direction of each connection has a reader (stamps chunks as they arrive) and a
writer (sends each one once its time has come).
"""

from __future__ import annotations

import contextlib
import queue
import socket
import threading
import time


class LatencyProxy:
    def __init__(self, target_port: int, delay_s: float, host: str = "127.0.0.1") -> None:
        self.target_port = target_port
        self.half = delay_s / 2
        self.host = host
        self._listener = socket.create_server((host, 0))
        self.port = int(self._listener.getsockname()[1])
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._stopped = threading.Event()

    def start(self) -> LatencyProxy:
        threading.Thread(target=self._accept, name="latency-proxy", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        self._listener.close()
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.close()

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection((self.host, self.target_port))
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._sockets += [client, server]
            self._pipe(client, server)
            self._pipe(server, client)

    def _pipe(self, source: socket.socket, target: socket.socket) -> None:
        held: queue.SimpleQueue[tuple[float, bytes]] = queue.SimpleQueue()

        def read() -> None:
            with contextlib.suppress(OSError):
                while data := source.recv(65536):
                    held.put((time.monotonic(), data))
            held.put((time.monotonic(), b""))

        def write() -> None:
            while True:
                arrived, data = held.get()
                if not data:
                    break
                wait = arrived + self.half - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                try:
                    target.sendall(data)
                except OSError:
                    break
            with contextlib.suppress(OSError):
                target.shutdown(socket.SHUT_WR)

        threading.Thread(target=read, name="latency-proxy-read", daemon=True).start()
        threading.Thread(target=write, name="latency-proxy-write", daemon=True).start()
