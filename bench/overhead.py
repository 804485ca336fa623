"""The service's overhead: one image through HTTP (gateway, Redis, worker and back) against the same
request on the engine in-process, both on one torch thread.

    .venv/bin/python -m bench.overhead              # the bundled demo model if present, else a tiny one
    .venv/bin/python -m bench.overhead --runs 40 --model path/to/model --steps 20

The in-process side is `Engine.generate` plus the PNG encoding (what the worker sends back), so both
sides end with the same PNG. The service side is a synchronous `POST /v1/txt2img` by httpx, JSON and
base64 decoding included, against a real gateway process, a real redis-server and a real worker
process (batch wait 0: a lone job starts at once). Runs alternate between the two sides after warm-up.
"""

from __future__ import annotations

import argparse
import base64
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import httpx
import redis
import torch

from bench.latency import LatencyProxy
from service.ldm.engine import Engine, GenerationRequest
from service.ldm.images import png_bytes
from service.paths import bundled_model
from tests.gateway_env import GatewayProcess, write_tiny_own_model
from tests.redis_server import RedisServer
from tests.workers import WorkerProcess

PROMPT = "a large red circle on the left on a gray background"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="model folder (default: demo model, else tiny)")
    p.add_argument("--runs", type=int, default=20, help="timed runs per side (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=3, help="untimed runs per side (default: %(default)s)")
    p.add_argument("--steps", type=int, default=20, help="denoising steps (default: %(default)s)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--redis-latency-ms",
        type=float,
        default=0.0,
        help="added to every Redis round trip of the worker and gateway, through a loopback proxy, "
        "to stand in for a Redis on another machine (default: %(default)s)",
    )
    return p.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model, which = args.model, "given"
        if model is None:
            demo = bundled_model()
            model, which = (
                (demo, "bundled demo model") if (demo / "model.safetensors").exists() else (None, "")
            )
        if model is None:
            model, which = write_tiny_own_model(folder / "tiny"), "tiny random model (no demo model found)"
        engine = Engine.load(model)
        request = GenerationRequest(prompt=PROMPT, steps=args.steps, seed=args.seed)
        resolved = engine.resolve(request)
        body = {"prompt": PROMPT, "steps": args.steps, "seed": args.seed}

        def in_process() -> bytes:
            (result,) = engine.generate([request])
            assert result.image is not None
            return png_bytes(result.image, result.request.parameters())

        server = RedisServer(folder / "redis")
        server.start()
        url = server.url
        proxy = None
        if args.redis_latency_ms > 0:
            proxy = LatencyProxy(server.port, args.redis_latency_ms / 1000).start()
            url = f"redis://127.0.0.1:{proxy.port}/0"
        env = {"LDM_TEST_FAULTS": "0", "LDM_LOG_LEVEL": "WARNING"}
        worker = WorkerProcess("bench", url, {"bench": model}, folder, max_wait_ms=0, env=env).start()
        gateway = GatewayProcess(url, {"bench": model}, folder, {"LDM_LOG_LEVEL": "WARNING"})
        try:
            gateway.start()
            worker.wait_ready(server.client(), timeout_s=120)
            with httpx.Client(base_url=gateway.url, timeout=120) as http:
                stages: dict[str, list[float]] = {"queue_ms": [], "inference_ms": [], "total_ms": []}

                def service() -> bytes:
                    reply = http.post("/v1/txt2img", json=body)
                    reply.raise_for_status()
                    answer = reply.json()
                    for name, values in stages.items():
                        values.append(answer["timings"][name])
                    return base64.b64decode(answer["images"][0]["png_base64"])

                report(which, model, resolved, args, in_process, service)
                medians = ", ".join(f"{k} {statistics.median(v):.1f}" for k, v in stages.items())
                print(f"HTTP side, p50 of the answers' timings (warm-up included): {medians}")
                if proxy is not None:
                    direct, delayed = ping_ms(server.url), ping_ms(url)
                    print(
                        f"Redis round trip (PING p50): direct {direct:.2f} ms, through the proxy the worker "
                        f"and gateway use {delayed:.2f} ms (--redis-latency-ms {args.redis_latency_ms})"
                    )
        finally:
            worker.stop()
            gateway.stop()
            server.kill()
            if proxy is not None:
                proxy.stop()


def ping_ms(url: str, n: int = 200) -> float:
    client = redis.Redis.from_url(url)
    times = []
    for _ in range(n):
        started = time.perf_counter()
        client.ping()
        times.append((time.perf_counter() - started) * 1000)
    client.close()
    return statistics.median(times)


def report(which: str, model: Path, resolved: object, args: argparse.Namespace, *sides: object) -> None:
    in_process, service = sides
    assert callable(in_process) and callable(service)
    for _ in range(args.warmup):
        in_process()
        service()
    times: dict[str, list[float]] = {"in-process": [], "HTTP": []}
    for _ in range(args.runs):
        for name, side in (("in-process", in_process), ("HTTP", service)):
            started = time.perf_counter()
            side()
            times[name].append((time.perf_counter() - started) * 1000)
    load = os.getloadavg()[0]
    print(f"model: {which}: {model}")
    print(f"request: {resolved}".replace("ResolvedRequest", "")[:200])
    print(f"torch {torch.__version__}, 1 thread each; {args.runs} runs per side after {args.warmup} warm-up")
    print(f"load average {load:.1f} on {os.cpu_count()} cores after the runs")
    for name, values in times.items():
        p50, p90 = statistics.median(values), statistics.quantiles(values, n=10)[-1]
        print(f"{name:10s}  p50 {p50:8.1f} ms   p90 {p90:8.1f} ms   min {min(values):8.1f} ms")
    base, over = statistics.median(times["in-process"]), statistics.median(times["HTTP"])
    print(f"ratio HTTP/in-process {over / base:.3f} (target <= 1.05); added {over - base:.1f} ms (p50)")


if __name__ == "__main__":
    main()
