"""Bursts of concurrent requests at a gateway, for tests/test_gateway_burst.py and bench/burst.py.

Two clients. `burst` is httpx's AsyncClient on warm keep-alive connections: its answers carry the
wire latency (from the request's first byte out to its answer's headers in, httpx's trace) beside the
end-to-end time, which on a small machine is mostly httpx's own CPU (about 2 ms a request here: the
200th request of a burst leaves 400 ms after the first). `raw_burst` opens the connections first,
then writes every request in one tight loop (a prebuilt byte string each) and times each answer from
its own write: the gateway's latency under the burst, with next to nothing of the client's.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import selectors
import socket
import time
from dataclasses import dataclass
from typing import Any

import httpx


@dataclass(frozen=True)
class Answer:
    status: int  # 0: no answer (the connection failed; `body` says how)
    wire_s: float  # request sent -> answer headers received
    total_s: float  # from the burst's start, client time included
    retry_after: str | None
    body: dict[str, Any]


PER_CLIENT = 20


@dataclass(frozen=True)
class Burst:
    answers: list[Answer]
    server_cpu_s: float  # CPU the server process spent during the burst (0 without its pid)
    client_cpu_s: float  # this process's


async def burst(
    url: str,
    path: str,
    bodies: list[dict[str, Any]],
    headers: dict[str, str] | None = None,
    server_pid: int | None = None,
) -> Burst:
    """All the requests at once, each on a connection of its own, opened and kept alive beforehand.
    They are spread over clients of `PER_CLIENT` connections: httpcore's pool scans all of its
    connections for each request, which with hundreds in one pool costs more than the requests."""
    clients = [
        httpx.AsyncClient(
            base_url=url,
            timeout=60,
            limits=httpx.Limits(max_connections=PER_CLIENT, max_keepalive_connections=PER_CLIENT),
        )
        for _ in range(math.ceil(len(bodies) / PER_CLIENT))
    ]
    try:
        await asyncio.gather(*(clients[i // PER_CLIENT].get("/healthz") for i in range(len(bodies))))
        server_cpu = cpu_s(server_pid) if server_pid else 0.0
        client_cpu = time.process_time()
        started = time.perf_counter()

        async def one(http: httpx.AsyncClient, body: dict[str, Any]) -> Answer:
            marks: dict[str, float] = {}

            async def trace(name: str, info: Any) -> None:
                if name.endswith(("send_request_headers.started", "receive_response_headers.complete")):
                    marks[name.rsplit(".", 2)[-2]] = time.perf_counter()

            try:
                reply = await http.post(path, json=body, headers=headers, extensions={"trace": trace})
            except httpx.TransportError as e:  # counted, not raised: a burst reports what it got
                return Answer(0, 0.0, time.perf_counter() - started, None, {"error": repr(e)})
            wire = marks["receive_response_headers"] - marks["send_request_headers"]
            return Answer(
                reply.status_code,
                wire,
                time.perf_counter() - started,
                reply.headers.get("retry-after"),
                reply.json(),
            )

        calls = (one(clients[i // PER_CLIENT], body) for i, body in enumerate(bodies))
        answers = list(await asyncio.gather(*calls))
        server_cpu = cpu_s(server_pid) - server_cpu if server_pid else 0.0
        return Burst(answers, server_cpu, time.process_time() - client_cpu)
    finally:
        for client in clients:
            await client.aclose()


def raw_burst(host: str, port: int, path: str, body: dict[str, Any], n: int) -> list[tuple[int, float]]:
    """n connections, then n requests written back to back; (status, seconds from its write to its
    answer's first bytes) each."""
    data = json.dumps(body).encode()
    request = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Prefer: respond-async\r\nContent-Length: {len(data)}\r\n\r\n"
    ).encode() + data
    connections = [socket.create_connection((host, port)) for _ in range(n)]
    selector = selectors.DefaultSelector()
    sent: dict[socket.socket, float] = {}
    out: list[tuple[int, float]] = []
    try:
        for conn in connections:
            sent[conn] = time.perf_counter()
            conn.sendall(request)
            selector.register(conn, selectors.EVENT_READ)
        deadline = time.monotonic() + 60
        while len(out) < n and time.monotonic() < deadline:
            for key, _ in selector.select(timeout=1):
                conn = key.fileobj
                assert isinstance(conn, socket.socket)
                head = conn.recv(65536)
                out.append((int(head[9:12] or 0), time.perf_counter() - sent[conn]))
                selector.unregister(conn)
    finally:
        selector.close()
        for conn in connections:
            conn.close()
    return out


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def rss_bytes(pid: int) -> int:
    """Resident memory of a process (Linux /proc)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
