"""A burst of ten times the backlog's bound at a real gateway over real HTTP (httpx's AsyncClient on
loopback), a real Redis and a worker with the demo model: every refusal answered at once (429 with
Retry-After), the gateway's memory bounded, and every job it accepted finishes.

Latency is asserted on a burst from raw sockets (the gateway's own, with next to nothing of the
client's; httpx spends about 2 ms of CPU per request), and more loosely than the service's aim (under
100 ms at p99, which `bench/burst.py` measures and bench/README.md reports): this 2-core machine is
shared with other jobs."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.paths import bundled_model
from service.queue import keys

from .burst import burst, percentile, raw_burst, rss_bytes
from .gateway_env import GatewayProcess
from .redis_server import RedisServer
from .workers import WorkerProcess, wait_for

pytestmark = pytest.mark.slow
BOUND = 20
BODY = {"prompt": "a red circle", "steps": 4}


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[RedisServer, GatewayProcess, WorkerProcess]]:
    folder: Path = tmp_path_factory.mktemp("burst")
    server = RedisServer(folder / "redis")
    server.start()
    demo = bundled_model()
    worker = WorkerProcess("w1", server.url, {"shapes": demo}, folder, max_wait_ms=0).start()
    env = {"LDM_MAX_BACKLOG": str(BOUND), "LDM_RETRY_AFTER_S": "1", "LDM_LOG_LEVEL": "WARNING"}
    gateway = GatewayProcess(server.url, {"shapes": demo}, folder, env)
    try:
        gateway.start()
        worker.wait_ready(server.client())
        yield server, gateway, worker
    finally:
        worker.stop()
        gateway.stop()
        server.kill()
        print(gateway.log()[-3000:], worker.log()[-3000:])  # shown when a test fails


def test_a_burst_of_ten_times_the_bound(stack: tuple[RedisServer, GatewayProcess, WorkerProcess]) -> None:
    server, gateway, worker = stack
    headers = {"Prefer": "respond-async"}
    httpx.post(f"{gateway.url}/v1/txt2img", json=BODY, headers=headers).raise_for_status()  # warm
    rss = rss_bytes(gateway.pid)
    result = asyncio.run(burst(gateway.url, "/v1/txt2img", [BODY] * (10 * BOUND), headers, gateway.pid))
    grown = rss_bytes(gateway.pid) - rss
    accepted = [a for a in result.answers if a.status == 202]
    refused = [a for a in result.answers if a.status != 202]
    assert {a.status for a in refused} <= {429}, {a.status: a.body for a in refused}
    # The warm-up job may hold a slot; the worker frees slots while the burst lasts (about 0.5 s).
    assert len(accepted) >= BOUND - 1 and len(refused) >= 5 * BOUND
    assert all(a.retry_after == "1" for a in refused)
    wire = [a.wire_s for a in refused]
    cpu_ms = result.server_cpu_s * 1000 / len(result.answers)
    print(
        f"refusals: wire p50 {percentile(wire, 50) * 1000:.1f} ms, p99 {percentile(wire, 99) * 1000:.1f} ms; "
        f"gateway CPU {cpu_ms:.2f} ms/request; RSS grew {grown / 2**20:.1f} MB"
    )
    # Wire times here include the client's own event loop (2 ms of CPU per request, on the cores the
    # gateway, Redis and the worker share): the raw burst below is the measure, this a sanity bound.
    assert percentile(wire, 99) < 1.0
    assert cpu_ms < 1.5  # about 0.3 ms here (1 to 3 ms before refusals were answered early)
    # The same burst from raw sockets, written back to back: the gateway's latency, not httpx's.
    raw = [
        s
        for status, s in raw_burst("127.0.0.1", gateway.http_port, "/v1/txt2img", BODY, 10 * BOUND)
        if status == 429
    ]
    print(
        f"raw sockets: refusals p50 {percentile(raw, 50) * 1000:.1f} ms, "
        f"p99 {percentile(raw, 99) * 1000:.1f} ms"
    )
    assert len(raw) >= 5 * BOUND and percentile(raw, 99) < 0.25  # aim: 0.1 (bench/burst.py)
    assert rss_bytes(gateway.pid) - rss < 50 * 2**20

    def finished() -> bool:
        states = [httpx.get(f"{gateway.url}/v1/jobs/{a.body['id']}").json()["status"] for a in accepted]
        assert "failed" not in states and "expired" not in states, states
        return all(s == "succeeded" for s in states)

    wait_for(finished, 120, f"{len(accepted)} accepted jobs to finish", every_s=0.5)
    wait_for(lambda: server.client().xlen(keys.jobs("shapes")) == 0, 120, "the backlog to drain")
    assert worker.alive
