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
    status: int
    wire_s: float  # request sent -> answer headers received
    total_s: float  # from the burst's start, client time included
    retry_after: str | None
    body: dict[str, Any]


async def burst(
    url: str, path: str, bodies: list[dict[str, Any]], headers: dict[str, str] | None = None
) -> list[Answer]:
    """All the requests at once, on as many connections (opened and kept alive beforehand)."""
    limits = httpx.Limits(max_connections=len(bodies), max_keepalive_connections=len(bodies))
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:
        await asyncio.gather(*(http.get("/healthz") for _ in bodies))  # the connections, warm
        started = time.perf_counter()

        async def one(body: dict[str, Any]) -> Answer:
            marks: dict[str, float] = {}

            async def trace(name: str, info: Any) -> None:
                if name.endswith(("send_request_headers.started", "receive_response_headers.complete")):
                    marks[name.rsplit(".", 2)[-2]] = time.perf_counter()

            reply = await http.post(path, json=body, headers=headers, extensions={"trace": trace})
            wire = marks["receive_response_headers"] - marks["send_request_headers"]
            return Answer(
                reply.status_code,
                wire,
                time.perf_counter() - started,
                reply.headers.get("retry-after"),
                reply.json(),
            )

        return list(await asyncio.gather(*(one(body) for body in bodies)))


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
