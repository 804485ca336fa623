"""Refusals under a burst: how fast a gateway whose model's backlog is full answers a burst of requests
(ten times the bound by default), what each refusal costs it in CPU, and what its memory does.

    .venv/bin/python -m bench.burst                          # this checkout
    .venv/bin/python -m bench.burst --baseline ../ldm-main   # and another checkout, alternately

One real Redis, one gateway (no worker: every request of a burst is refused), the demo model. Two
clients per round (`tests/burst.py`): httpx's AsyncClient on warm connections (wire latency from
its trace, and end to end, which includes httpx's own CPU), and raw sockets that write every request
back to back and time each answer from its own write: the gateway's latency, without the client's.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path

import httpx

from service.paths import REPO_ROOT, bundled_model
from tests.burst import burst, percentile, raw_burst, rss_bytes
from tests.gateway_env import GatewayProcess
from tests.redis_server import RedisServer

from .machine import cpu_description, load_average, process_cpu_s

BODY = {"prompt": "a red circle", "steps": 4}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bound", type=int, default=20, help="LDM_MAX_BACKLOG (default: %(default)s)")
    p.add_argument("--burst", type=int, default=0, help="requests per burst (default: 10 x the bound)")
    p.add_argument("--rounds", type=int, default=5, help="bursts per client and side (default: %(default)s)")
    p.add_argument("--baseline", type=Path, default=None, help="another checkout to measure alike")
    return p.parse_args()


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def measure(
    name: str, root: Path, server: RedisServer, folder: Path, bound: int, n: int, rounds: int
) -> None:
    server.client().flushall()
    env = {"LDM_MAX_BACKLOG": str(bound), "LDM_LOG_LEVEL": "WARNING", "LDM_EXPIRY_SWEEP_S": "60"}
    gateway = GatewayProcess(server.url, {"shapes": bundled_model()}, folder, env, root=root).start()
    try:
        with httpx.Client(base_url=gateway.url, timeout=30) as http:
            for _ in range(bound):  # the backlog, full
                http.post("/v1/txt2img", json=BODY, headers={"Prefer": "respond-async"}).raise_for_status()
        rss = rss_bytes(gateway.pid)
        print(f"\n{name} ({root}): bound {bound}, bursts of {n}; gateway RSS {rss / 2**20:.1f} MB")
        for _ in range(rounds):
            bodies, headers = [BODY] * n, {"Prefer": "respond-async"}
            result = asyncio.run(burst(gateway.url, "/v1/txt2img", bodies, headers, gateway.pid))
            failed = [a.body["error"] for a in result.answers if a.status == 0]
            statuses = sorted({a.status for a in result.answers})
            wire = [a.wire_s for a in result.answers]
            total = [a.total_s for a in result.answers]
            print(
                f"  httpx: {statuses} wire p50 {ms(percentile(wire, 50))} p99 {ms(percentile(wire, 99))}; "
                f"end to end p50 {ms(percentile(total, 50))} p99 {ms(percentile(total, 99))}; "
                f"gateway CPU {result.server_cpu_s * 1000 / n:.2f} ms/refusal, "
                f"client CPU {result.client_cpu_s * 1000 / n:.2f} ms/request"
                + (f"; {len(failed)} without an answer ({failed[0]})" if failed else "")
            )
            cpu = process_cpu_s(gateway.pid)
            answers = raw_burst("127.0.0.1", gateway.http_port, "/v1/txt2img", BODY, n)
            cpu = process_cpu_s(gateway.pid) - cpu
            latency = [seconds for _, seconds in answers]
            print(
                f"  raw:   {sorted({status for status, _ in answers})} p50 {ms(percentile(latency, 50))} "
                f"p99 {ms(percentile(latency, 99))} max {ms(max(latency))}; "
                f"gateway CPU {cpu * 1000 / n:.2f} ms/refusal"
            )
        now = rss_bytes(gateway.pid)
        print(f"  gateway RSS {now / 2**20:.1f} MB, grew {(now - rss) / 2**20:.1f} MB")
    finally:
        gateway.stop()


def main() -> None:
    args = parse_args()
    n = args.burst or 10 * args.bound
    print(cpu_description())
    print(f"{load_average()} before the runs (a machine shared with other jobs)")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        server = RedisServer(folder / "redis")
        server.start()
        try:
            sides = [("this checkout", REPO_ROOT)]
            if args.baseline is not None:
                sides.append(("baseline", args.baseline.resolve()))
            for name, root in sides:
                measure(name, root, server, folder, args.bound, n, args.rounds)
        finally:
            server.kill()
    print(f"\n{load_average()} after the runs")


if __name__ == "__main__":
    main()
